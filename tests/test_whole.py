"""Whole-image inference: sizes, and equality with slide inference when one window covers all."""

from __future__ import annotations

import torch

from factories import tiny_model
from otseg.slide import slide_inference
from otseg.whole import whole_inference, whole_input, whole_size


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
