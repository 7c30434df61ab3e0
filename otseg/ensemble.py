"""λ-fusion of the decoder and MPS maps and the seen-class calibration."""

from __future__ import annotations

import torch


def fuse(decoder_map: torch.Tensor, score_map: torch.Tensor | None, lam: float) -> torch.Tensor:
    """(1 − λ)·D + λ·MPS, both (B, K, H, W); D alone when the MPS branch is off.

    λ = 0.5 is the paper's (hard-coded) balancing factor.
    """
    if score_map is None:
        return decoder_map
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return (1.0 - lam) * decoder_map + lam * score_map


def calibrate(
    logits: torch.Tensor, seen: torch.Tensor | None, weight: float, *, inplace: bool = False
) -> torch.Tensor:
    """σ(logits) with ``weight`` subtracted on seen classes.

    Args:
        logits: (B, K, H, W) fused map.
        seen: (K,) bool, True for classes the model was supervised on; None = no calibration.
        inplace: overwrite ``logits`` (inference only: saves two full-size copies).
    Returns:
        (B, K, H, W) calibrated sigmoid scores, not probabilities: the original merges slide
        windows on these values (docs/original-behaviour.md).
    """
    out = logits.sigmoid_() if inplace else torch.sigmoid(logits)
    if seen is None or weight == 0.0:
        return out
    shift = (seen.to(device=out.device, dtype=out.dtype) * weight)[None, :, None, None]
    return out.sub_(shift) if inplace else out - shift
