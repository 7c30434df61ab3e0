"""The public API (``import otseg``), the model Protocol and the one "seen" rule."""

from __future__ import annotations

import numpy as np
import pytest

import otseg
from app.inference import LoadedModel
from factories import random_photo, save_tiny_clip, tiny_model
from otseg.inference.predictor import OTSegPredictor, SegmentationModel
from otseg.vocabulary import mark_seen


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def model(clip_dir):
    return tiny_model(clip=f"local-dir:{clip_dir}")


def test_public_names():
    for name in (
        "OTSegPredictor", "Prediction", "OTSeg", "ZegOT", "ZegOTConfig", "TrainingFreeOTSeg",
        "OTSegConfig", "SlideServer", "from_pretrained", "get_preset", "segment",
    ):  # fmt: skip
        assert name in otseg.__all__ and hasattr(otseg, name)
    assert set(otseg.registry.names()) >= {"otseg", "zegot"}  # importing otseg registers all
    assert otseg.from_pretrained is otseg.weights.pretrained.from_pretrained
    assert otseg.OTSeg is otseg.models.otseg.OTSeg


def test_segment_one_call_equals_the_predictor(model, tmp_path):
    photo = random_photo(70, 90, seed=1)
    names = ["class2", "tree", "class1"]
    p = OTSegPredictor(model)
    p.set_image(photo)
    p.set_vocabulary(names)
    want = p.predict(lam=0.3)
    model.save_pretrained(tmp_path / "m")
    for source in (model, str(tmp_path / "m"), tmp_path / "m", OTSegPredictor(model)):
        got = otseg.segment(photo, names, model=source, lam=0.3)
        assert isinstance(got, otseg.Prediction) and got.class_names == names
        np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        otseg.segment(photo, [], model=model)


def test_models_satisfy_the_protocol(model, clip_dir):
    from otseg.models.training_free import build_training_free
    from otseg.models.zegot import build_zegot, zegot_tiny_config

    free = build_training_free(f"local-dir:{clip_dir}", None, resize_short=64, test_crop=64)
    for m in (model, free, build_zegot(zegot_tiny_config()).eval()):
        assert isinstance(m, SegmentationModel), type(m).__name__
    assert not isinstance(object(), SegmentationModel)


def test_library_and_demo_mark_seen_names_alike(model):
    """Names match training classes ignoring case, spaces, hyphens and underscores."""
    names = ["Class0", "class 2", "class4", "class_1", "cat"]
    want = [True, True, True, False, False]  # class1 is unseen in the tiny split
    p = OTSegPredictor(model)
    p.set_image(random_photo(seed=2))
    p.set_vocabulary(names)
    assert p.predict().seen == want
    cfg = model.config
    assert LoadedModel(model, "trained", "test").mark_seen(names) == want  # demo badges
    assert mark_seen(names, cfg.class_names, cfg.seen) == want


def test_every_argument_is_checked_before_any_model_is_loaded_or_run(model, monkeypatch):
    """A mistake costs no model load and no encoder run: each is refused with its own
    one-line message while loading or running anything would fail the test."""
    from otseg.inference import predictor
    from otseg.inference.preprocess import ImageError

    monkeypatch.setattr(predictor, "_load", lambda source: pytest.fail(f"loaded {source}"))
    photo = random_photo(40, 40, seed=2)
    cases = [
        ((photo, ["cat"]), {"lamda": 0.3}, ValueError, r"unknown keyword argument 'lamda'"),
        ((photo, ["cat"]), {"lam": 1.5}, ValueError, r"lam must be a number in \[0, 1\]"),
        ((photo, ["cat"]), {"lam": "half"}, ValueError, r"lam must be a number in \[0, 1\]"),
        ((photo, ["cat"]), {"attention": "sparsemax"}, ValueError, r"attention must be one of"),
        ((photo, ["cat"]), {"use_mps": "yes"}, ValueError, r"use_mps must be True or False"),
        ((photo, "cat, dog"), {}, ValueError, r"a list of strings, not one string"),
        ((photo, ["cat", "cat"]), {}, ValueError, r"duplicate class names"),
        ((123, ["cat"]), {}, ImageError, r"must be a file path, bytes, .* got int"),
        ((b"not an image", ["cat"]), {}, ImageError, r"not a readable image"),
    ]
    for args, knobs, error, message in cases:
        with pytest.raises(error, match=message):
            otseg.segment(*args, model="org/never-loaded", **knobs)

    # a value only another model type takes: refused by the loaded model, before its encoder
    def no_encoder(*a, **k):
        pytest.fail("the image encoder ran")

    monkeypatch.setattr(model, "encode_image", no_encoder)
    with pytest.raises(
        ValueError,
        match=r"attention must be one of \('sinkhorn', 'softmax', 'zegclip'\), got 'none'",
    ):
        otseg.segment(photo, ["cat"], model=model, attention="none")


def test_the_predictor_checks_its_settings_before_work(model, monkeypatch):
    from otseg.weights import pretrained

    monkeypatch.setattr(pretrained, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    for options, message in (({"mode": "fast"}, "mode must be one of"),
                             ({"precision": "int8"}, "precision must be one of")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            OTSegPredictor.from_pretrained("org/never-loaded", **options)
    p = OTSegPredictor(model)
    p.set_image(random_photo(40, 40, seed=3))
    p.set_vocabulary(["cat", "dog"])
    for knobs, message in (({"lam": 5}, "lam must be"), ({"calibrate_seen": 1}, "True or False")):
        with pytest.raises(ValueError, match=message):
            p.predict(**knobs)
    assert p.predict(lam=np.float32(0.25)).lam == 0.25
