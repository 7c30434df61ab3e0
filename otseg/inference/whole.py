"""Whole-image inference: one pass over the resized image instead of overlapping windows.

The image tower interpolates its position table to the image's token grid, so the test-scale
image (sides rounded to whole patches) goes through the tower and the head once. A 375×500
photo at short side 512 becomes 32×43 = 1376 tokens in one pass, instead of two 512 windows
of 1024 tokens each: about 30 % less work, and one head call instead of two.

Not the original's protocol (it slides 512 windows at stride 426): labels differ near window
borders and on objects far from the training crop size. Slide inference stays the default and
the parity path; this is the "fast" setting of the demo.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .slide import to_probabilities


def whole_size(height: int, width: int, patch: int) -> tuple[int, int]:
    """Each side rounded to the nearest multiple of ``patch`` (at least one patch)."""
    return (
        max(patch, round(height / patch) * patch),
        max(patch, round(width / patch) * patch),
    )


def whole_input(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(1, 3, H, W) normalised image → (1, 3, H', W') with H', W' multiples of ``patch``."""
    size = whole_size(image.shape[-2], image.shape[-1], patch)
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def whole_inference(
    run: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    patch: int,
    out_size: tuple[int, int],
) -> torch.Tensor:
    """One ``run`` (image (1, 3, H', W') → scores (1, K, H', W')) over the whole image.

    image: (1, 3, H, W) normalised at the test scale. Returns (1, K, *out_size) probabilities,
    post-processed like :func:`otseg.inference.slide.slide_inference`.
    """
    return to_probabilities(run(whole_input(image, patch)), out_size)
