"""One post-processing path: the predictor, slide inference of the model and evaluation agree,
on an inductive model with seen and unseen names and test crops smaller than the model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from factories import random_photo, tiny_model
from otseg.inference.predictor import OTSegPredictor
from otseg.inference.preprocess import to_model_input
from otseg.inference.slide import slide_inference
from otseg.metrics import compute_metrics, new_confusion, update

NAMES = ["class4", "class1", "class0", "class3"]  # seen, unseen, seen, unseen (tiny split)


@pytest.fixture(scope="module")
def model():
    # 48-px crops on a 64-px model (positions interpolated, head output resized to the crop);
    # a large calibration so that it changes labels on a random model.
    return tiny_model(seed=2, test_crop=48, test_stride=32, calibration=0.3)


@pytest.fixture(scope="module")
def photo():
    return random_photo(70, 110, seed=4)  # 64×100 at the test scale: 2×3 windows


def slide_probs(model, photo, names, *, seen, lam=None, **forward):
    """Slide inference with the model's forward pass, independently of the predictor."""
    cfg = model.config
    x = to_model_input(photo, cfg.resize_short, cfg.pixel_mean, cfg.pixel_std)
    text = model.embed_text(names)
    with torch.no_grad():
        return slide_inference(
            lambda w: model(w, text, seen=seen, lam=lam, **forward).scores,
            x,
            crop=cfg.test_crop,
            stride=cfg.test_stride,
            out_size=photo.shape[:2],
        )[0].numpy()


@pytest.mark.parametrize("lam", [None, 0.3])
def test_predictor_equals_slide_inference(model, photo, lam):
    p = OTSegPredictor(model)
    p.set_image(photo)
    p.set_vocabulary(NAMES)
    got = p.predict(lam=lam)
    assert got.seen == [True, False, True, False]
    seen = torch.tensor(got.seen)
    want = slide_probs(model, photo, NAMES, seen=seen, lam=lam)
    np.testing.assert_allclose(got.probs, want, atol=2e-6, rtol=0)
    assert (got.labels == want.argmax(0)).mean() > 0.999
    # the knobs matter here, so the equality above pins them
    plain = slide_probs(model, photo, NAMES, seen=None, lam=lam)
    assert (plain.argmax(0) != want.argmax(0)).any()
    other = slide_probs(model, photo, NAMES, seen=seen, lam=0.9)
    assert np.abs(other - want).max() > 1e-3


def test_switches_in_any_order_equal_slide_inference(model, photo):
    """MPS off, then on, then softmax, then Sinkhorn again on one predictor: each result is the
    model's own slide inference with those settings (the head's cache is per setting)."""
    p = OTSegPredictor(model)
    p.set_image(photo)
    p.set_vocabulary(NAMES)
    seen = torch.tensor([True, False, True, False])
    for attention, use_mps in (("sinkhorn", False), ("sinkhorn", True), ("softmax", True),
                               ("softmax", False), ("sinkhorn", True)):  # fmt: skip
        got = p.predict(attention=attention, use_mps=use_mps)
        want = slide_probs(model, photo, NAMES, seen=seen, attention=attention, use_mps=use_mps)
        np.testing.assert_allclose(got.probs, want, atol=2e-6, rtol=0)


def test_lambda_away_from_one_half(model, photo):
    """λ = 0.3 weighs the MPS map by 0.3 and the decoder map by 0.7 (not the other way)."""
    p = OTSegPredictor(model)
    p.set_image(photo)
    p.set_vocabulary(NAMES)
    p.predict(lam=0.3)
    maps = p._head_maps("sinkhorn", True)[0]  # first window, token grid
    up = [
        F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False)
        for m in (maps.decoder, maps.score)
    ]
    want = torch.sigmoid(0.7 * up[0] + 0.3 * up[1])
    torch.testing.assert_close(model.postprocess(maps, lam=0.3).output, want)
    assert (want - torch.sigmoid(0.3 * up[0] + 0.7 * up[1])).abs().max() > 1e-3


def test_evaluation_applies_the_seen_calibration(model, photo):
    """Evaluation's confusion matrix and hIoU come from the calibrated labels."""
    from accelerate import Accelerator

    from train.evaluate import evaluate

    cfg = model.config
    names = list(cfg.class_names)
    p = OTSegPredictor(model)
    p.set_image(photo)
    p.set_vocabulary(names)
    calibrated, plain = p.predict(), p.predict(calibrate_seen=False)
    assert (calibrated.labels != plain.labels).mean() > 0.01  # calibration changes labels
    gt = torch.from_numpy(plain.labels).long()[None]  # (1, H, W) ground truth
    batch = {
        "image": to_model_input(photo, cfg.resize_short, cfg.pixel_mean, cfg.pixel_std),
        "label": gt,
    }
    got = evaluate(
        Accelerator(cpu=True),
        model,
        [batch],
        names,
        seen=cfg.seen,
        unseen=cfg.unseen,
        crop=cfg.test_crop,
        stride=cfg.test_stride,
    )
    k = len(names)
    conf = update(new_confusion(k), torch.from_numpy(calibrated.labels)[None], gt, k)
    want = compute_metrics(conf, names, cfg.unseen)
    assert math.isfinite(want.hiou) and want.miou < 1.0
    for key, value in want.summary().items():
        assert got.summary()[key] == pytest.approx(value, abs=1e-9), key


def test_calibration_argument_overrides_the_config(model):
    """``calibration=`` replaces the config's value, on the seen classes only."""
    text = model.embed_text(NAMES)
    seen = torch.tensor([True, False, True, False])
    crop = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        plain = model(crop, text).output
        default = model(crop, text, seen=seen).output
        custom = model(crop, text, seen=seen, calibration=0.05).output
    shift = torch.tensor([0.05, 0.0, 0.05, 0.0])[None, :, None, None]
    torch.testing.assert_close(custom, plain - shift)
    torch.testing.assert_close(default, plain - 6 * shift)  # the config's 0.3
