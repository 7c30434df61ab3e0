"""Multi-Prompt Sinkhorn (MPS) score maps: prompts compete for pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..config import HeadConfig
from .sinkhorn import sinkhorn

TRANSPORTS = ("sinkhorn", "softmax")


@dataclass
class Transport:
    """Pixel ↔ prompt assignment of one attention or score-map call."""

    similarity: torch.Tensor  # (B, K, M, N) cosine similarity S
    plan: torch.Tensor  # (B, K, M, N) transport plan T (columns sum to 1/N)


def transport_plan(
    similarity: torch.Tensor,
    kind: str = "sinkhorn",
    *,
    eps: float = 0.05,
    max_iter: int = 100,
    tol: float | None = 1e-6,
) -> torch.Tensor:
    """(B, K, M, N) similarities → (B, K, M, N) plan with each prompt's mass 1/N over pixels.

    ``sinkhorn`` solves entropic OT with both marginals uniform (prompts compete for pixels);
    ``softmax`` is the same without the pixel marginal: an independent softmax over pixels of
    S/ε per prompt, scaled by 1/N (the ablation the paper compares against).
    """
    if kind == "sinkhorn":
        # 1 − cosine lies in [0, 2]: the domain is chosen without reading the data back.
        return sinkhorn(1.0 - similarity, eps=eps, max_iter=max_iter, tol=tol, cost_range=2.0)
    if kind == "softmax":
        return torch.softmax(similarity.float() / eps, dim=-2) / similarity.shape[-1]
    raise ValueError(f"transport must be one of {TRANSPORTS}, got {kind!r}")


def cosine_similarity(pixels: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """S[..., k, m, n] = ⟨n(pixel_m), n(query_kn)⟩ in float32, also under autocast (a bf16 S
    would move the Sinkhorn plan by ~2 %). The one similarity of OTSeg's MPS map and decoder
    attention and of ZegOT's block maps.

    pixels (..., M, C), queries (..., K, N, C), leading dims broadcast (B, or ZegOT's (L, B)
    blocks against (B,) queries) → (..., K, M, N).
    """
    with torch.autocast(device_type=pixels.device.type, enabled=False):
        p = F.normalize(pixels.float(), dim=-1)
        q = F.normalize(queries.float(), dim=-1)
        return torch.einsum("...mc,...knc->...kmn", p, q)


class SinkhornConstants(Protocol):
    """The transport constants of a head config (OTSeg's ``HeadConfig``, ZegOT's head)."""

    sinkhorn_eps: float
    sinkhorn_max_iter: int
    sinkhorn_thresh: float | None


def transport_args(cfg: SinkhornConstants, kind: str) -> dict[str, float | int | None]:
    """The keyword arguments of :func:`transport_plan` from a head config (OTSeg's or ZegOT's:
    ``sinkhorn_eps``, ``sinkhorn_max_iter``, ``sinkhorn_thresh``); ``softmax`` takes only ε."""
    if kind == "softmax":
        return {"eps": cfg.sinkhorn_eps}
    return {"eps": cfg.sinkhorn_eps, "max_iter": cfg.sinkhorn_max_iter, "tol": cfg.sinkhorn_thresh}


def refine(
    similarity: torch.Tensor, kind: str = "sinkhorn", **plan_args
) -> tuple[torch.Tensor, Transport]:
    """The transport refinement S* = M·N·T ⊙ S of OTSeg's MPS map and ZegOT's MPOT layers.

    similarity: (B, K, M, N) S; ``plan_args`` go to :func:`transport_plan` (see
    :func:`transport_args`). M·N scaling: T has mean 1/(M·N), so S* stays at the scale of S.
    Returns S* (B, K, M, N) and the :class:`Transport`.
    """
    plan = transport_plan(similarity, kind, **plan_args)
    m, n = similarity.shape[-2:]
    return m * n * plan * similarity, Transport(similarity=similarity, plan=plan)


def mps_score(
    pixels: torch.Tensor,
    queries: torch.Tensor,
    kind: str = "sinkhorn",
    **sinkhorn_args,
) -> tuple[torch.Tensor, Transport]:
    """MPS[b,k,m] = Σ_n M·N·T[b,k,m,n]·S[b,k,m,n] with S the pixel–prompt cosine similarity.

    Args:
        pixels: (B, M, C) pixel embeddings.
        queries: (B, K, N, C) per-prompt class queries.

    Returns:
        score (B, K, M) and the :class:`Transport` (per-prompt maps are M·N·T·S).
    """
    refined, tr = refine(cosine_similarity(pixels, queries), kind, **sinkhorn_args)
    return refined.sum(-1), tr


def mps_maps(
    pixels: torch.Tensor,
    queries: torch.Tensor,
    grid: tuple[int, int],
    kind: str,
    cfg: HeadConfig,
) -> tuple[torch.Tensor, torch.Tensor, Transport]:
    """:func:`mps_score` with the head's Sinkhorn constants, laid out on the token grid.

    Returns score (B, K, h, w), per-prompt maps M·N·T·S (B, K, N, h, w) and the transport.
    """
    refined, tr = refine(cosine_similarity(pixels, queries), kind, **transport_args(cfg, kind))
    b, k, m, n = refined.shape
    per_prompt = refined.permute(0, 1, 3, 2)  # (B, K, N, M)
    return refined.sum(-1).reshape(b, k, *grid), per_prompt.reshape(b, k, n, *grid), tr
