"""Confusion-matrix metrics against hand-computed values (mmseg eval_metrics semantics)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from otseg.metrics import (
    compute_metrics,
    format_table,
    harmonic_iou,
    new_confusion,
    to_json,
    update,
)

LABEL = torch.tensor([[0, 0, 1], [1, 2, 255]])
PRED = torch.tensor([[0, 1, 1], [1, 0, 2]])


def test_confusion_matrix_by_hand():
    conf = update(new_confusion(3), PRED, LABEL, 3)
    # rows = GT, columns = prediction; the (255 → 2) pixel is ignored
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert conf.dtype == torch.int64


def test_per_class_and_mean_metrics_by_hand():
    m = compute_metrics(update(new_confusion(3), PRED, LABEL, 3), ["a", "b", "c"], unseen=[2])
    assert m.iou == pytest.approx((1 / 3, 2 / 3, 0.0))  # 1/(2+2-1), 2/(2+3-2), 0/(1+0-0)
    assert m.acc == pytest.approx((1 / 2, 1.0, 0.0))
    assert m.aacc == pytest.approx(3 / 5)
    assert m.miou == pytest.approx(1 / 3)
    assert m.miou_seen == pytest.approx(1 / 2) and m.miou_unseen == 0.0
    assert m.hiou == 0.0  # an unseen mIoU of 0 gives hIoU 0


def test_absent_class_is_excluded_and_predicted_only_class_counts_zero():
    label = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 2])  # class 2 predicted, never in GT; class 3 nowhere
    m = compute_metrics(update(new_confusion(4), pred, label, 4), list("abcd"), unseen=[1, 3])
    assert math.isnan(m.iou[3]) and math.isnan(m.acc[3]) and math.isnan(m.acc[2])
    assert m.iou[:3] == pytest.approx((1.0, 0.5, 0.0))
    assert m.miou == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3, NaN left out
    assert m.miou_seen == pytest.approx(0.5) and m.miou_unseen == pytest.approx(0.5)
    assert m.hiou == pytest.approx(0.5)


def test_hiou():
    assert harmonic_iou(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert harmonic_iou(0.8, 0.0) == 0.0 and harmonic_iou(0.0, 0.5) == 0.0
    assert math.isnan(harmonic_iou(0.8, math.nan))
    m = compute_metrics(update(new_confusion(3), PRED, LABEL, 3), ["a", "b", "c"])
    assert math.isnan(m.miou_unseen) and math.isnan(m.hiou)  # fully supervised: no unseen


def test_confusion_is_additive_across_batches_and_processes():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 5, (4, 16, 16), generator=g)
    label[label == 4] = 255
    pred = torch.randint(0, 4, (4, 16, 16), generator=g)
    whole = update(new_confusion(4), pred, label, 4)
    rank0 = update(new_confusion(4), pred[:2], label[:2], 4)
    rank1 = update(new_confusion(4), pred[2:], label[2:], 4)
    assert torch.equal(rank0 + rank1, whole)  # what an all-reduce(SUM) computes
    assert int(whole.sum()) == int((label != 255).sum())


def test_update_rejects_bad_input():
    with pytest.raises(ValueError, match="label ids"):
        update(new_confusion(3), torch.tensor([0]), torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="pred ids"):
        update(new_confusion(3), torch.tensor([-1]), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="differ"):
        update(new_confusion(3), torch.zeros(2, 2), torch.zeros(2, 3), 3)
    assert update(new_confusion(2), torch.tensor([7]), torch.tensor([255]), 2).sum() == 0


def test_table_and_json():
    m = compute_metrics(
        update(new_confusion(4), torch.tensor([0, 1]), torch.tensor([0, 1]), 4),
        ["cat", "dog", "pottedplant", "sofa"],
        unseen=[2, 3],
    )
    table = format_table(m)
    assert "pottedplant" in table and "unseen" in table and "hIoU" in table
    assert "100.00" in table and "   n/a" in table and "nan" not in table
    data = json.loads(to_json(m))
    assert data["iou"] == [1.0, 1.0, None, None] and data["miou_unseen"] is None
    assert data["class_names"][2] == "pottedplant" and data["unseen"] == [2, 3]
    assert m.summary()["miou_seen"] == pytest.approx(100.0)


def test_no_unseen_classes_leave_out_unseen_metrics():
    """Fully supervised (or cross-dataset): mIoU(unseen) and hIoU are undefined, not NaN."""
    m = compute_metrics(update(new_confusion(3), PRED, LABEL, 3), ["a", "b", "c"])
    assert set(m.summary()) == {"miou", "miou_seen", "aacc"}
    line = format_table(m).splitlines()[-1]
    assert "hIoU n/a (no unseen classes)" in line and "unseen)" not in line and "nan" not in line

    def refuse(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    data = json.loads(to_json(m), parse_constant=refuse)
    assert data["hiou"] is None and data["miou_unseen"] is None and data["unseen"] == []
