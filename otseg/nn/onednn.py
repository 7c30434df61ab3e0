"""oneDNN GEMMs for CPU inference.

oneDNN's GEMM runs at about twice the rate of the GEMM behind ``F.linear`` (and inside CPU
``scaled_dot_product_attention``) in fp32 on the AVX-512 machine we measure on
(``bench/bench_speed.py``). It has no autograd formula, so only inference without gradients
on an x86-64 CPU takes it; training, GPUs, other CPUs and export (tracing) keep the portable
ops, and so does everything with ``OTSEG_ONEDNN=0``. Weights are reordered once into oneDNN's
blocked layout and cached beside their module (rebuilt when a weight is replaced or modified
in place).
"""

from __future__ import annotations

import os
import platform
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

T = TypeVar("T")


def _available(op: str) -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(getattr(torch.ops.mkldnn, op))
    except (AttributeError, RuntimeError):
        return False


def _bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _wanted() -> bool:
    """x86-64 only (where it was measured; ARM builds may run oneDNN's reference kernels), and
    not when ``OTSEG_ONEDNN=0``."""
    if os.environ.get("OTSEG_ONEDNN", "").strip() == "0":
        return False
    return platform.machine().lower() in {"x86_64", "amd64"}


AVAILABLE = _wanted() and _available("_linear_pointwise") and _available("_reorder_linear_weight")
BF16 = AVAILABLE and _bf16_supported()


def tracing() -> bool:
    """Under torch.compile or torch.export (ONNX export): keep the portable ops."""
    compiler = torch.compiler
    exporting = getattr(compiler, "is_exporting", lambda: False)
    return compiler.is_compiling() or exporting()


def inference_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The GEMM dtype when ``x`` takes the oneDNN path: fp32, or bf16 under CPU bf16 autocast;
    None otherwise (autograd, another device, other dtypes, tracing)."""
    if not (AVAILABLE and x.device.type == "cpu" and not torch.is_grad_enabled() and not tracing()):
        return None
    if torch.is_autocast_enabled("cpu"):
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and BF16
        return torch.bfloat16 if bf16 else None
    return torch.float32 if x.dtype == torch.float32 else None


def pack(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(out, in) weight → oneDNN's blocked layout in ``dtype``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous())


def linear(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor | None], act: str = "none"):
    """(..., in) @ packed weight + bias, with oneDNN's fused activation ``act`` (e.g. "swish")."""
    return torch.ops.mkldnn._linear_pointwise(x, packed[0], packed[1], act, [], "")


def linear_add(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor], residual):
    """``residual + x @ W.T + b``: one oneDNN call when both share a dtype, else a GEMM and an
    add (bf16 GEMMs on an fp32 residual stream, as under autocast)."""
    if x.dtype == residual.dtype:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, *packed, "add")
    return residual + linear(x, packed)


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def cached(
    owner: nn.Module, dtype: torch.dtype, weights: Sequence[torch.Tensor], build: Callable[[], T]
) -> T:
    """``build()`` for ``owner`` and ``dtype``, reused while ``weights`` are the same tensors
    with the same contents version (inference tensors have no version counter: for them
    only a replacement is noticed). Concurrent first calls build once."""
    key = tuple((w.data_ptr(), None if w.is_inference() else w._version) for w in weights)

    def lookup():
        hit = _CACHE.get(owner, {}).get(dtype)
        return hit[1] if hit is not None and hit[0] == key else None

    value = lookup()
    if value is None:
        with _LOCK:
            value = lookup()
            if value is None:
                value = build()
                _CACHE.setdefault(owner, {})[dtype] = (key, value)
    return value


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose fp32 CPU inference runs
    through oneDNN on a packed copy of the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inference_dtype(x) != torch.float32:
            return F.linear(x, self.weight, self.bias)
        params = (self.weight,) if self.bias is None else (self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        packed = cached(self, torch.float32, params, lambda: (pack(self.weight, x.dtype), bias))
        return linear(x, packed)
