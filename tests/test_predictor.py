"""Predictor: caching of image/text/head work, class order, misuse and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from factories import random_photo, save_tiny_clip, tiny_model
from otseg.inference.predictor import OTSegPredictor
from otseg.inference.preprocess import ImageError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    clip = save_tiny_clip(tmp_path_factory.mktemp("clip"))
    return tiny_model(clip=f"local-dir:{clip}")


def counting(predictor):
    """Count the predictor's image-tower runs (whatever backend runs it) and head runs."""
    calls = {"image": 0, "decode": 0}
    enc, dec = predictor.tower, predictor.model.decode

    def encode_image(x):
        calls["image"] += 1
        return enc(x)

    def decode(*a, **k):
        calls["decode"] += 1
        return dec(*a, **k)

    predictor.tower, predictor.model.decode = encode_image, decode
    return calls


def test_predict_shapes_and_seen_marking(model):
    p = OTSegPredictor(model)
    p.set_image(random_photo(100, 150))
    p.set_vocabulary(["cat", "class0", "class1", "tree"])
    r = p.predict()
    assert r.labels.shape == (100, 150) and r.labels.dtype == np.int32
    assert r.probs.shape == (4, 100, 150)
    np.testing.assert_allclose(r.probs.sum(0), 1.0, atol=1e-5)
    assert (r.labels == r.probs.argmax(0)).all()
    assert r.seen == [False, True, False, False]  # class1 is unseen in the tiny split
    assert r.prompt_maps.shape[:2] == (4, 3)
    assert r.class_names == ["cat", "class0", "class1", "tree"]
    p.set_vocabulary(["cat", "class0", "class1", "tree"], seen=(True, False, True, False))
    assert p.predict().seen == [True, False, True, False]  # given: kept as is
    with pytest.raises(ValueError, match="seen has 3 entries for 4 class names"):
        p.set_vocabulary(["cat", "class0", "class1", "tree"], seen=[True] * 3)


def test_relambda_and_attention_switch_reuse_cached_work(model):
    p = OTSegPredictor(model)
    calls = counting(p)
    try:
        p.set_image(
            random_photo(80, 160, seed=3)
        )  # 64×128 at test scale: 3 windows, 3 encoder passes
        p.set_vocabulary(["class0", "class2", "dog"])
        assert calls == {"image": 3, "decode": 0}
        a = p.predict(lam=0.5)
        assert calls == {"image": 3, "decode": 3}
        b = p.predict(lam=0.0)
        assert calls == {"image": 3, "decode": 3} and not np.allclose(a.probs, b.probs)
        p.predict(attention="softmax")
        p.predict(attention="softmax", lam=0.9)
        assert calls == {"image": 3, "decode": 6}
        again = p.predict(lam=0.5)
        np.testing.assert_array_equal(again.probs, a.probs)
        p.set_vocabulary(["class0", "dog"])  # new vocabulary: head re-runs, image does not
        p.predict()
        assert calls == {"image": 3, "decode": 9}
    finally:
        del p.model.decode


def test_user_class_order_is_kept(model):
    p = OTSegPredictor(model)
    p.set_image(random_photo(seed=5))
    names = ["class0", "car", "class3", "road"]
    p.set_vocabulary(names)
    a = p.predict()
    p.set_vocabulary(names[::-1])
    b = p.predict()
    np.testing.assert_allclose(a.probs, b.probs[::-1], atol=1e-6)
    assert b.class_names == names[::-1]


def test_misuse_and_bad_input(model):
    p = OTSegPredictor(model)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict()
    p.set_image(Image.fromarray(random_photo()))
    with pytest.raises(RuntimeError, match="set_vocabulary"):
        p.predict()
    with pytest.raises(ValueError, match="empty"):
        p.set_vocabulary([])
    with pytest.raises(ValueError, match="duplicate"):
        p.set_vocabulary(["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="non-empty"):
        p.set_vocabulary(["cat", "  "])
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16', 'fp16'\)"):
        OTSegPredictor(model, precision="int8")
    with pytest.raises(ValueError, match="device 'cuda:99' is not usable here: "):
        OTSegPredictor(model, device="cuda:99")
    with pytest.raises(ValueError, match="a list of strings, not one string"):
        p.set_vocabulary("cat, dog")
    p.set_vocabulary(["cat", "dog"])
    with pytest.raises(ValueError, match="attention"):
        p.predict(attention="sparsemax")
    with pytest.raises(ImageError, match="16 px"):
        p.set_image(np.zeros((1, 1, 3), np.uint8))
    rgba = np.zeros((40, 50, 4), np.uint8)
    p.set_image(rgba)
    sixteen = (random_photo().astype(np.uint16) * 257)[..., 0]
    p.set_image(sixteen)
    assert p.predict().labels.shape == sixteen.shape


def test_bf16_precision_runs_and_mostly_agrees(model):
    img = random_photo(seed=9)
    results = []
    for precision in ("fp32", "bf16"):
        p = OTSegPredictor(model, precision=precision)
        p.set_image(img)
        p.set_vocabulary(["class0", "class2", "grass"])
        results.append(p.predict())
    assert (results[0].labels == results[1].labels).mean() > 0.8
    assert np.abs(results[0].probs - results[1].probs).max() > 0  # bf16 really ran
