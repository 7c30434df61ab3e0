"""Whole-image inference: sizes, and equality with slide inference when one window covers all."""

from __future__ import annotations

import numpy as np
import torch

from factories import tiny_model
from otseg.inference.slide import slide_inference
from otseg.inference.whole import whole_inference, whole_input, whole_size


def test_whole_size_rounds_to_patches():
    assert whole_size(512, 683, 16) == (512, 688)
    assert whole_size(512, 681, 16) == (512, 688)
    assert whole_size(512, 679, 16) == (512, 672)
    assert whole_size(5, 41, 16) == (16, 48)
    x = torch.randn(1, 3, 41, 71)
    assert whole_input(x, 16).shape == (1, 3, 48, 64)
    same = torch.randn(1, 3, 32, 48)
    assert whole_input(same, 16) is same


def test_whole_equals_slide_for_one_window_and_runs_any_aspect():
    model = tiny_model().eval()
    text = model.embed_text(model.config.class_names)
    cfg = model.config
    with torch.inference_mode():

        def run(x):
            return model(x, text).scores

        image = torch.randn(1, 3, cfg.test_crop, cfg.test_crop)
        slide = slide_inference(
            run, image, crop=cfg.test_crop, stride=cfg.test_stride, out_size=(50, 50)
        )
        whole = whole_inference(run, image, patch=cfg.vision.patch_size, out_size=(50, 50))
        torch.testing.assert_close(whole, slide)
        wide = torch.randn(1, 3, cfg.test_crop, 2 * cfg.test_crop + 10)
        probs = whole_inference(run, wide, patch=cfg.vision.patch_size, out_size=(30, 70))
    assert probs.shape == (1, len(cfg.class_names), 30, 70)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 30, 70))


def test_predictor_whole_mode_is_one_pass_and_equals_whole_inference():
    import pytest

    from factories import random_photo
    from otseg.inference.predictor import OTSegPredictor
    from otseg.inference.preprocess import to_model_input

    model = tiny_model().eval()
    cfg = model.config
    photo = random_photo(seed=4)  # 80×112: 64×96 at the test scale, slide takes 2 windows
    names = list(cfg.class_names)
    calls = []
    p = OTSegPredictor(model, mode="whole")  # the default backend
    encode = p.tower
    p.tower = lambda x: calls.append(x.shape) or encode(x)
    p.set_image(photo)
    p.set_vocabulary(names)
    pred = p.predict()
    assert len(calls) == 1 and calls[0][-2] % 16 == 0 and calls[0][-1] % 16 == 0
    assert pred.labels.shape == photo.shape[:2]
    assert pred.prompt_maps.shape[:2] == (len(names), cfg.num_prompts)
    with torch.inference_mode():
        text = model.embed_text(names)
        seen = torch.tensor([i in cfg.seen for i in range(len(names))])
        x = to_model_input(photo, cfg.resize_short, cfg.pixel_mean, cfg.pixel_std)
        ref = whole_inference(
            lambda w: model(w, text, seen=seen).scores,
            x,
            patch=cfg.vision.patch_size,
            out_size=photo.shape[:2],
        )
    np.testing.assert_allclose(pred.probs, ref[0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        OTSegPredictor(model, mode="tiles")
