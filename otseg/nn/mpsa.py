"""Cross-attention from class-prompt queries to pixels: Multi-Prompt Sinkhorn Attention (MPSA)
or the softmax attention of the ZegCLIP baseline, on one set of weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..config import HeadConfig
from .mps import Transport, mps_score, transport_args

ATTENTIONS = ("sinkhorn", "softmax")


class PromptPixelAttention(nn.Module):
    """q/k/v/proj projections shared by both variants (keys match ``multihead_attn.*``)."""

    def __init__(self, dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(cfg.attn_dropout)

    def forward(
        self, queries: torch.Tensor, pixels: torch.Tensor, attention: str = "sinkhorn"
    ) -> tuple[torch.Tensor, torch.Tensor, Transport | None]:
        """queries (B, K, N, C), pixels (B, M, C) → output (B, K, N, C), mask (B, K, M), transport."""
        if attention == "sinkhorn":
            return self._sinkhorn(queries, pixels)
        if attention == "softmax":
            return self._softmax(queries, pixels)
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")

    def _sinkhorn(self, queries, pixels):
        kind = "sinkhorn"
        mask, tr = mps_score(
            self.k(pixels), self.q(queries), kind, **transport_args(self.cfg, kind)
        )
        v = self.v(pixels)
        # The plan is not rescaled: each query's weights over pixels sum to 1/N, as the original.
        out = torch.einsum("bkmn,bmc->bknc", self.attn_drop(tr.plan).to(v.dtype), v)
        return self.proj(out), mask, tr

    def _softmax(self, queries, pixels):
        b, k, n, c = queries.shape
        h = self.cfg.softmax_heads
        q = self.q(queries).reshape(b, k * n, h, c // h).transpose(1, 2)  # (B, H, KN, d)
        key = self.k(pixels).reshape(b, -1, h, c // h).transpose(1, 2)  # (B, H, M, d)
        v = self.v(pixels).reshape(b, -1, h, c // h).transpose(1, 2)
        logits = q @ key.transpose(-2, -1) * (c // h) ** -0.5  # (B, H, KN, M)
        # ZegCLIP's mask: pre-softmax logits averaged over heads (and here over prompts).
        mask = logits.mean(1).reshape(b, k, n, -1).mean(2)
        weights = self.attn_drop(logits.softmax(-1))
        out = (weights @ v).transpose(1, 2).reshape(b, k, n, c)
        plan = weights.mean(1).reshape(b, k, n, -1).transpose(-2, -1) / n  # (B, K, M, N)
        return self.proj(out), mask, Transport(similarity=plan.new_zeros(()), plan=plan)


@contextmanager
def fixed_sinkhorn(model: nn.Module, iterations: int | None) -> Iterator[None]:
    """Run ``model`` (with ``config.head`` and prompt–pixel attentions) with exactly
    ``iterations`` Sinkhorn iterations and no early stop: nothing is read back from the device,
    so the head can be batched, exported or captured in a CUDA graph. None changes nothing.
    Restored on exit, so checkpoints, evaluation and the export keep the original rule."""
    if iterations is None:
        yield
        return
    config = model.config
    head = dataclasses.replace(config.head, sinkhorn_max_iter=iterations, sinkhorn_thresh=None)
    attentions = [m for m in model.modules() if isinstance(m, PromptPixelAttention)]
    model.config = config.replace(head=head)
    for attention in attentions:
        attention.cfg = head
    try:
        yield
    finally:
        model.config = config
        for attention in attentions:
            attention.cfg = config.head
