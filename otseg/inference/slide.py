"""Slide-window inference (mmseg ``slide_inference``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..nn.ensemble import resize

Box = tuple[int, int, int, int]  # y1, x1, y2, x2


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[Box]:
    """Window boxes covering an image; the last row/column is shifted to end at the border."""
    n_h = -(-max(height - crop, 0) // stride) + 1  # ⌈max(H − c, 0) / s⌉ + 1
    n_w = -(-max(width - crop, 0) // stride) + 1
    boxes = []
    for i in range(n_h):
        for j in range(n_w):
            y2, x2 = min(i * stride + crop, height), min(j * stride + crop, width)
            boxes.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))
    return boxes


def crops(image: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
    """(1, 3, H, W) → (len(boxes), 3, c, c) (all boxes have one size)."""
    return torch.cat([image[..., y1:y2, x1:x2] for y1, x1, y2, x2 in boxes])


def merge_windows(
    outputs: Sequence[torch.Tensor], boxes: Sequence[Box], size: tuple[int, int]
) -> torch.Tensor:
    """Average per-window maps (each (1, K, h, w)) into (1, K, H, W), dividing by coverage."""
    if len(boxes) == 1 and tuple(boxes[0]) == (0, 0, *size):
        return outputs[0]  # one window covering the image
    k = outputs[0].shape[1]
    total = outputs[0].new_zeros(1, k, *size)
    count = outputs[0].new_zeros(1, 1, *size)
    for out, (y1, x1, y2, x2) in zip(outputs, boxes, strict=True):
        total[..., y1:y2, x1:x2] += out
        count[..., y1:y2, x1:x2] += 1
    return total / count


def to_probabilities(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Averaged window scores (1, K, H', W') → (1, K, H, W) softmax at the original size."""
    return resize(scores.float(), size).softmax(dim=1)


def window_probabilities(
    outputs: Sequence[torch.Tensor],
    boxes: Sequence[Box],
    size: tuple[int, int],
    out_size: tuple[int, int],
) -> torch.Tensor:
    """Per-window scores (each (1, K, h, w), the size of its box; see
    ``PostProcessing.postprocess``) of an image of ``size`` at the test scale → (1, K, *out_size)
    probabilities: average over windows, resize to the original size, softmax over classes."""
    return to_probabilities(merge_windows(outputs, boxes, size), out_size)


def slide_inference(
    run: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    crop: int,
    stride: int,
    out_size: tuple[int, int],
) -> torch.Tensor:
    """One ``run`` per window (crop (1, 3, c, c) → scores (1, K, c, c)), as the original: the
    Sinkhorn stopping rule is global over a call, so windows are not batched (see
    "Sinkhorn stopping rule" in docs/original-behaviour.md).

    image: (1, 3, H, W) normalised at the test scale. Returns (1, K, *out_size) probabilities.
    """
    boxes = slide_windows(image.shape[-2], image.shape[-1], crop, stride)
    outputs = [run(image[..., y1:y2, x1:x2]) for y1, x1, y2, x2 in boxes]
    return window_probabilities(outputs, boxes, tuple(image.shape[-2:]), out_size)
