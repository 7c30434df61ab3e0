"""Deep feature alignment (DFA) and multi-prompt optimal transport (MPOT) over image blocks.

S_i = f_i · g_GA^T per block i; DFA maps S̄_i = Σ_n S_i; MPOT refines the maps of a few blocks
with a transport plan each, S_i* = M·N·T_i ⊙ S_i, and combines them with a geometric mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...nn.mps import Transport, cosine_similarity, refine, transport_args
from .config import ZegOTHeadConfig

TRANSPORTS = ("sinkhorn", "softmax", "none")  # "none": S_i* = S_i (the paper's no-MPOT row)


@dataclass
class MPOTMaps:
    """Per-prompt maps of the MPOT layers and their combination, at M pixels."""

    refined: torch.Tensor  # (d, B, K, M, N) S_i* of each MPOT layer, in the order given
    combined: torch.Tensor  # (B, K, M, N) S* = Π_i φ_i(S_i*)^{1/d}
    transports: list[Transport]  # one per MPOT layer (empty for "none")


def block_similarities(blocks: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every block's pixels with every class prompt, in float32 (OTSeg's
    :func:`~otseg.nn.mps.cosine_similarity`, also under autocast).

    blocks: (L, B, C, h, w) unit-norm patch embeddings; queries: (B, K, N, C) (any norm).
    Returns (L, B, K, M, N) with m = y·w + x.
    """
    return cosine_similarity(blocks.flatten(3).transpose(-1, -2), queries)  # (L, B, M, C)


def refine_layer(
    similarity: torch.Tensor, kind: str, cfg: ZegOTHeadConfig
) -> tuple[torch.Tensor, Transport | None]:
    """One layer: (B, K, M, N) S → S* = M·N·T ⊙ S (OTSeg's :func:`~otseg.nn.mps.refine`;
    ``none``: S itself) and its transport."""
    if kind == "none":
        return similarity, None
    if kind not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {kind!r}")
    return refine(similarity, kind, **transport_args(cfg, kind))


def geometric_mean(
    refined: torch.Tensor, last: str = "identity", clamp: float = 1e-6
) -> torch.Tensor:
    """Π_i φ_i(S_i*)^{1/d} in log space (Eq. 8): φ = σ for every layer but the last, whose map
    is used as it is (``last="identity"``, clamped to ≥ ``clamp`` since a fractional power of a
    negative value is undefined) or also through σ (``last="sigmoid"``).

    refined: (d, ...) maps of the d layers, last layer last. Returns (...).
    """
    d = refined.shape[0]
    if last == "sigmoid":
        logs = F.logsigmoid(refined).sum(0)
    elif last == "identity":
        logs = F.logsigmoid(refined[:-1]).sum(0) + refined[-1].clamp(min=clamp).log()
    else:
        raise ValueError(f"mpot_last must be 'identity' or 'sigmoid', got {last!r}")
    return torch.exp(logs / d)


def mpot(
    similarities: torch.Tensor, layers: Sequence[int], kind: str, cfg: ZegOTHeadConfig
) -> MPOTMaps:
    """MPOT over the 1-based ``layers`` of (L, B, K, M, N) block similarities; each layer's
    transport problems are solved in their own call (the stopping rule is per call)."""
    refined, transports = [], []
    for i in layers:
        s, tr = refine_layer(similarities[i - 1], kind, cfg)
        refined.append(s)
        if tr is not None:
            transports.append(tr)
    stacked = torch.stack(refined)
    return MPOTMaps(
        refined=stacked,
        combined=geometric_mean(stacked.float(), cfg.mpot_last, cfg.mpot_clamp),
        transports=transports,
    )
