"""The training losses against their formulas, written out per image, class and pixel in plain
Python (the parity fixtures check them too, but need the original's outputs)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from otseg.nn.losses import IGNORE, otseg_losses, seg_loss

ALPHA, GAMMA = 0.25, 2.0  # the original's focal constants


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def written_out(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> dict:
    """Focal, BCE, dice and accuracy of (B, K, H, W) logits and (B, H, W) targets, pixel by
    pixel. Ignored pixels (255) are negatives for every class; dice counts present classes."""
    b, k, h, w = logits.shape
    focal = bce = dice = 0.0
    for i in range(b):
        for c in range(k):
            f_sum = b_sum = inter = p_sum = t_sum = 0.0
            for y in range(h):
                for x in range(w):
                    p = sigmoid(float(logits[i, c, y, x]))
                    t = 1.0 if int(targets[i, y, x]) == c else 0.0
                    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
                    p_t = p if t else 1 - p
                    a_t = ALPHA if t else 1 - ALPHA
                    f_sum += a_t * ce * (1 - p_t) ** GAMMA
                    b_sum += ce
                    inter, p_sum, t_sum = inter + p * t, p_sum + p, t_sum + t
            focal += f_sum / (h * w)
            bce += b_sum / (h * w)
            if t_sum > 0:
                dice += 1 - (2 * inter + 1) / (p_sum + t_sum + 1)
    valid = targets != IGNORE
    correct = ((logits.argmax(1) == targets) & valid).sum().item()
    return {
        "focal": focal / num_masks,
        "bce": bce / num_masks,
        "dice": dice / num_masks,
        "acc": 100 * correct / valid.sum().item(),
    }


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    targets = torch.tensor(
        [
            [[0, 0, 2, 2, 255], [0, 2, 2, 255, 255], [0, 0, 2, 2, 2]],
            [[1, 1, 1, 3, 3], [1, 255, 3, 3, 3], [1, 1, 1, 1, 3]],
        ]
    )  # class 3 absent from image 0, classes 0 and 2 from image 1: dice skips them
    return logits, targets


def test_seg_loss_equals_the_written_out_formulas(case):
    logits, targets = case
    got = seg_loss(logits, targets, 3.0)
    want = written_out(logits, targets, 3.0)
    for key, value in want.items():
        assert got[key].item() == pytest.approx(value, rel=1e-6), key


def test_otseg_losses_weigh_both_maps_and_count_the_masks(case):
    """Default weights: focal × 100 + dice × 1 on the decoder map and on the MPS map, normalised
    by the number of (image, present class) pairs: 2 + 2 = 4 here."""
    logits, targets = case
    output = SimpleNamespace(decoder_map=logits, score_map=logits.flip(1))
    got = otseg_losses(output, targets)
    total = 0.0
    for name, maps in (("decode", logits), ("score", logits.flip(1))):
        want = written_out(maps, targets, 4.0)
        assert got[f"{name}.loss_mask"].item() == pytest.approx(100 * want["focal"], rel=1e-6)
        assert got[f"{name}.loss_dice"].item() == pytest.approx(want["dice"], rel=1e-6)
        total += 100 * want["focal"] + want["dice"]
    assert got["loss"].item() == pytest.approx(total, rel=1e-6)


def test_pseudo_labels_pick_the_best_unseen_class_of_the_fused_map():
    """Transductive: a pixel the ground truth marks unseen (−1) gets the unseen class with the
    highest σ((1 − λ)·D + λ·MPS), even where a seen class scores higher; labelled pixels keep
    their label, ignored ones stay ignored. Inductive: unseen pixels are ignored."""
    from otseg.config import tiny_config
    from otseg.nn.losses import pseudo_label

    config = tiny_config(setting="transductive", ensemble_lambda=0.3)  # unseen: 1 and 3
    decoder = torch.tensor([[5.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0, 0.0]])
    score = torch.tensor([[5.0, 0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 9.0, 0.0, 0.0]])
    # pixel 0: class 1 at λ = 0.3 (0.7 > 0.6), class 3 at λ = 0.5; seen class 0 is best of all
    output = SimpleNamespace(
        decoder_map=decoder.T.reshape(1, 5, 1, 2), score_map=score.T.reshape(1, 5, 1, 2)
    )
    targets = torch.tensor([[[-1, -1]]])
    assert pseudo_label(targets, output, config).tolist() == [[[1, 3]]]
    mixed = torch.tensor([[[2, IGNORE]]])
    assert pseudo_label(mixed, output, config).tolist() == [[[2, IGNORE]]]
    inductive = config.replace(setting="inductive")
    assert pseudo_label(targets, output, inductive).tolist() == [[[IGNORE, IGNORE]]]
