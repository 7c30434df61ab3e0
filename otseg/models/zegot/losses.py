"""ZegOT's loss: BCE 1 + focal 20 + dice 1 on σ of both maps (the MPOT map Y and the decoder
map Ỹ), through the project's loss function with ZegOT's weights."""

from __future__ import annotations

import torch

from ...nn.losses import otseg_losses

LOSS_WEIGHTS = {"bce_weight": 1.0, "mask_weight": 20.0, "dice_weight": 1.0}


def zegot_losses(output, targets: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """``decode.*`` (Ỹ) and ``score.*`` (Y) terms + ``loss``; ``loss_mask`` is the focal term.

    targets: (B, H, W) training targets (see :func:`otseg.nn.losses.remap_labels`).
    """
    return otseg_losses(output, targets, **LOSS_WEIGHTS, **kwargs)
