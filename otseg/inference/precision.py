"""Precision names of the predictor and the serving path, and the autocast they mean."""

from __future__ import annotations

import contextlib

import torch

from ..errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for ``"fp32"``: no autocast)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def precision_context(
    device: torch.device | str, precision: str, *, cache_enabled: bool = True
) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` on ``device``'s type, or nothing for ``"fp32"``.

    cache_enabled=False: no weight-cast cache (a CUDA graph must not capture casts that
    outlive the capture)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype, cache_enabled=cache_enabled)
