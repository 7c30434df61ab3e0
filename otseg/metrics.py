"""Confusion-matrix segmentation metrics (mmseg ``eval_metrics`` semantics).

The state is one int64 (K, K) tensor, rows = ground truth, columns = prediction. It is a plain
tensor so that distributed callers sum it across processes (``all_reduce`` / ``reduce``) before
calling :func:`compute_metrics`. A class absent from both the ground truth and the predictions
has IoU NaN and is left out of every mean, as mmseg does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch


def new_confusion(num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zero int64 (K, K) confusion matrix."""
    return torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)


def update(
    confusion: torch.Tensor,
    pred: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Add one batch to ``confusion`` in place and return it.

    Args:
        confusion: int64 (K, K), rows = label, columns = prediction.
        pred: integer (...) predicted ids in 0..K-1.
        label: integer (...) same shape, ids in 0..K-1 or ``ignore_index``.
    Raises:
        ValueError: on shape mismatch or ids outside 0..K-1 (other than ``ignore_index``).
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and label {tuple(label.shape)} differ")
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()
    if pred.numel() == 0:
        return confusion
    for name, ids in (("label", label), ("pred", pred)):
        if ids.min() < 0 or ids.max() >= num_classes:
            raise ValueError(
                f"{name} ids must be in 0..{num_classes - 1} or {ignore_index}, "
                f"got {int(ids.min())}..{int(ids.max())}"
            )
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes**2)
    confusion += counts.view(num_classes, num_classes).to(confusion.device)
    return confusion


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def harmonic_iou(miou_seen: float, miou_unseen: float) -> float:
    """hIoU = 2·s·u / (s + u); 0 when either is 0, NaN when either is NaN."""
    if math.isnan(miou_seen) or math.isnan(miou_unseen):
        return math.nan
    if miou_seen <= 0 or miou_unseen <= 0:
        return 0.0
    return 2 * miou_seen * miou_unseen / (miou_seen + miou_unseen)


@dataclass(frozen=True)
class SegMetrics:
    """Metrics as fractions in [0, 1]; NaN where undefined (class absent, no unseen classes)."""

    class_names: tuple[str, ...]
    unseen: tuple[int, ...]  # ids of the unseen classes; empty when fully supervised
    iou: tuple[float, ...]  # per class: TP / (TP + FP + FN)
    acc: tuple[float, ...]  # per class: TP / (TP + FN)
    aacc: float  # all pixels: Σ TP / Σ labelled
    miou: float  # mean IoU over all classes
    miou_seen: float
    miou_unseen: float
    hiou: float  # harmonic mean of miou_seen and miou_unseen

    def summary(self) -> dict[str, float]:
        """The headline numbers in percent. Without unseen classes (fully supervised, or
        cross-dataset) mIoU(unseen) and hIoU do not exist and are left out."""
        keys = ("miou", "miou_seen", "miou_unseen", "hiou", "aacc")
        if not self.unseen:
            keys = ("miou", "miou_seen", "aacc")
        return {k: 100 * getattr(self, k) for k in keys}


def compute_metrics(
    confusion: torch.Tensor, class_names: Sequence[str], unseen: Sequence[int] = ()
) -> SegMetrics:
    """Per-class and mean metrics from a (K, K) confusion matrix (summed over processes)."""
    conf = confusion.detach().double().cpu()
    if conf.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion {tuple(conf.shape)} does not match {len(class_names)} names")
    tp = conf.diag()
    gt, predicted = conf.sum(1), conf.sum(0)
    iou = (tp / (gt + predicted - tp)).tolist()  # 0/0 → NaN: absent from GT and prediction
    acc = (tp / gt).tolist()
    total = float(conf.sum())
    unseen_set = set(unseen)
    seen_iou = [v for i, v in enumerate(iou) if i not in unseen_set]
    unseen_iou = [v for i, v in enumerate(iou) if i in unseen_set]
    miou_seen, miou_unseen = _nanmean(seen_iou), _nanmean(unseen_iou)
    return SegMetrics(
        class_names=tuple(class_names),
        unseen=tuple(sorted(unseen_set)),
        iou=tuple(iou),
        acc=tuple(acc),
        aacc=float(tp.sum()) / total if total else math.nan,
        miou=_nanmean(iou),
        miou_seen=miou_seen,
        miou_unseen=miou_unseen,
        hiou=harmonic_iou(miou_seen, miou_unseen),
    )


def _pct(value: float) -> str:
    return "   n/a" if math.isnan(value) else f"{100 * value:6.2f}"


def format_table(metrics: SegMetrics) -> str:
    """A per-class table (IoU, Acc in %; n/a where undefined, e.g. a class absent from the
    labels) followed by the summary line."""
    width = max(10, *(len(n) for n in metrics.class_names))
    lines = [f"{'class':<{width}}  split    IoU    Acc", "-" * (width + 22)]
    for i, name in enumerate(metrics.class_names):
        split = "unseen" if i in metrics.unseen else "seen"
        lines.append(f"{name:<{width}}  {split:<6} {_pct(metrics.iou[i])} {_pct(metrics.acc[i])}")
    lines.append("-" * (width + 22))
    unseen = (
        f"mIoU(unseen) {_pct(metrics.miou_unseen)}  hIoU {_pct(metrics.hiou)}"
        if metrics.unseen
        else "hIoU n/a (no unseen classes)"
    )
    lines.append(
        f"mIoU {_pct(metrics.miou)}  mIoU(seen) {_pct(metrics.miou_seen)}  {unseen}  "
        f"aAcc {_pct(metrics.aacc)}"
    )
    return "\n".join(lines)


def to_json(metrics: SegMetrics, indent: int | None = 2) -> str:
    """JSON text of all fields (fractions in [0, 1]); NaN is written as null."""

    def clean(value: object) -> object:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps({k: clean(v) for k, v in asdict(metrics).items()}, indent=indent)
