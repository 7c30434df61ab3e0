"""Training targets and losses: label remapping, transductive pseudo-labels, focal + dice."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..config import OTSegConfig
from .ensemble import WindowScores, fuse

IGNORE = 255


def remap_labels(labels: torch.Tensor, config: OTSegConfig) -> torch.Tensor:
    """Dataset ids → training targets of the head's output channels.

    labels: (B, H, W) integer, dataset class ids, 255 = ignore. Returns int64 where
    inductive: seen id → its position among the seen ids, unseen → −1;
    transductive: seen id kept, unseen → −1 (to be pseudo-labelled);
    fully supervised: unchanged. 255 stays 255.
    """
    labels = labels.long()
    if config.setting == "fully" or not config.unseen:
        return labels
    lut = _label_table(len(config.class_names), config.seen, config.setting, labels.device)
    return lut[labels.clamp(0, 255)]


# Built once per split and device: a table made from a Python list on every step would be a
# host-to-device copy, which waits for the GPU.
@functools.lru_cache(maxsize=32)
def _label_table(k: int, seen: tuple[int, ...], setting: str, device: torch.device) -> torch.Tensor:
    """(256,) int64: dataset id → training target (see :func:`remap_labels`)."""
    lut = torch.full((256,), IGNORE, dtype=torch.long)
    lut[:k] = -1
    ids = torch.tensor(seen, dtype=torch.long)
    lut[ids] = torch.arange(len(seen)) if setting == "inductive" else ids
    return lut.to(device)


@functools.lru_cache(maxsize=32)
def _seen_mask(k: int, seen: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(1, K, 1, 1) bool, True on the seen classes."""
    mask = torch.zeros(1, k, 1, 1, dtype=torch.bool)
    mask[0, list(seen)] = True
    return mask.to(device)


@torch.no_grad()
def pseudo_label(targets: torch.Tensor, output: WindowScores, config: OTSegConfig) -> torch.Tensor:
    """Fill unseen pixels (−1) with the best unseen class of σ(λ·MPS↑ + (1 − λ)·D↑); others → 255.

    The ground truth tells *where* unseen objects are, not which ones, as the original.
    targets: (B, H, W) from :func:`remap_labels`; output maps (B, K, S, S) with S = H = W.
    """
    if config.setting == "transductive":
        probs = torch.sigmoid(fuse(output.decoder_map, output.score_map, config.ensemble_lambda))
        seen = _seen_mask(probs.shape[1], config.seen, probs.device)
        guess = probs.float().masked_fill(seen, -1.0).argmax(1)
        targets = torch.where(targets == -1, guess, targets)
    return torch.where(targets == -1, torch.full_like(targets, IGNORE), targets)


def count_masks(targets: torch.Tensor) -> torch.Tensor:
    """Σ over images of the number of distinct non-ignored labels: a float tensor on the
    targets' device (no host synchronisation). targets: (B, H, W) int64 in 0..254 or 255."""
    b = targets.shape[0]
    present = torch.zeros(b, IGNORE + 1, dtype=torch.bool, device=targets.device)
    present.scatter_(1, targets.reshape(b, -1).clamp(0, IGNORE), True)
    return present[:, :IGNORE].sum().float()


def seg_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_masks: torch.Tensor | float,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Sigmoid focal loss over all K channels and dice over the present classes.

    logits: (B, K, S, S) raw map; targets: (B, H, W) int64, 255 = ignore (a negative for every
    class). Returns unweighted ``focal``, ``bce`` (normalised as focal), ``dice`` and ``acc``
    (top-1 %, ignore excluded).
    """
    logits = logits.float()
    if logits.shape[-2:] != targets.shape[-2:]:
        logits = F.interpolate(
            logits, size=targets.shape[-2:], mode="bilinear", align_corners=False
        )
    b, k = logits.shape[:2]
    valid = targets != IGNORE
    onehot = F.one_hot(torch.where(valid, targets, 0), k).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None]
    x, t = logits.flatten(2), onehot.flatten(2)  # (B, K, HW)
    prob = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = prob * t + (1 - prob) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    focal = (alpha_t * ce * (1 - p_t) ** gamma).mean(-1).sum() / num_masks
    bce = ce.mean(-1).sum() / num_masks
    present = t.sum(-1) > 0  # (B, K)
    dice = 1 - (2 * (prob * t).sum(-1) + 1) / (prob.sum(-1) + t.sum(-1) + 1)
    dice = (dice * present).sum() / num_masks
    # no boolean indexing (each would be a host synchronisation); 0 when nothing is labelled
    correct = ((logits.argmax(1) == targets) & valid).sum()
    acc = correct.float() / valid.sum().clamp(min=1) * 100
    return {"focal": focal, "bce": bce, "dice": dice, "acc": acc.detach()}


def otseg_losses(
    output: WindowScores,
    targets: torch.Tensor,
    *,
    mask_weight: float = 100.0,
    dice_weight: float = 1.0,
    bce_weight: float = 0.0,
    num_masks: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """The six logged values of the original (``decode.*`` on D↑, ``score.*`` on MPS↑) + ``loss``.

    ``loss_mask`` is the focal loss; with ``bce_weight`` > 0 a ``loss_bce`` term is added per map
    (ZegOT: BCE 1 + focal 20 + dice 1 on its decoder and MPOT maps).
    targets: (B, H, W) after :func:`remap_labels` / :func:`pseudo_label`.
    num_masks: the focal/dice normaliser; None: this batch's :func:`count_masks` (at least 1).
        Training passes 1 and divides by the whole optimizer step's count afterwards (see
        ``train.engine``), so any process count and accumulation optimise the same objective.
    """
    if num_masks is None:
        num_masks = count_masks(targets).clamp(min=1.0)
    out: dict[str, torch.Tensor] = {}
    maps = {"decode": output.decoder_map, "score": output.score_map}
    for name, logits in maps.items():
        if logits is None:
            continue
        parts = seg_loss(logits, targets, num_masks)
        out[f"{name}.loss_mask"] = mask_weight * parts["focal"]
        out[f"{name}.loss_dice"] = dice_weight * parts["dice"]
        if bce_weight:
            out[f"{name}.loss_bce"] = bce_weight * parts["bce"]
        out[f"{name}.acc_seg"] = parts["acc"]
    out["loss"] = sum(v for k, v in out.items() if "loss_" in k)
    return out
