"""Relationship descriptor and the query decoder."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HeadConfig
from .mps import Transport
from .mpsa import PromptPixelAttention


def relationship_queries(q_proj: nn.Linear, cls: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Q⁰[b,k,n] = q_proj([g_b ⊙ t_kn ; t_kn]).  cls (B, C), text (K, N, C) → (B, K, N, C)."""
    b = cls.shape[0]
    text = text.to(cls.dtype).unsqueeze(0).expand(b, -1, -1, -1)
    return q_proj(torch.cat([cls[:, None, None, :] * text, text], dim=-1))


def class_queries(text: torch.Tensor) -> torch.Tensor:
    """ZegCLIP's text: one embedding per class. (K, N, C) → (K, 1, C) float32: a single prompt
    is kept as it is (as ZegCLIP uses its stored fp16 file), several are averaged and
    L2-renormalised (ZegCLIP's multi-template class embedding)."""
    text = text.float()
    if text.shape[1] == 1:
        return text
    return F.normalize(text.mean(dim=1, keepdim=True), dim=-1)


class DecoderLayer(nn.Module):
    """Post-norm layer without self-attention: cross-attention to pixels, then an FFN."""

    def __init__(self, dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.multihead_attn = PromptPixelAttention(dim, cfg)
        self.linear1 = nn.Linear(dim, cfg.ffn_dim)
        self.linear2 = nn.Linear(cfg.ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout)  # inside the FFN
        self.dropout2 = nn.Dropout(cfg.dropout)  # on the attention output
        self.dropout3 = nn.Dropout(cfg.dropout)  # on the FFN output

    def forward(self, queries, pixels, attention: str):
        """queries (B, K, N, C), pixels (B, M, C) → queries, mask (B, K, M), transport."""
        attn, mask, transport = self.multihead_attn(queries, pixels, attention)
        q = self.norm2(queries + self.dropout2(attn))
        ffn = self.linear2(self.dropout(torch.relu(self.linear1(q))))
        return self.norm3(q + self.dropout3(ffn)), mask, transport


@dataclass
class DecoderOutput:
    queries: list[torch.Tensor] = field(default_factory=list)  # per layer, (B, K, N, C)
    masks: list[torch.Tensor] = field(default_factory=list)  # per layer, (B, K, M)
    transports: list[Transport] = field(default_factory=list)


class Decoder(nn.Module):
    """The relationship descriptor followed by ``num_layers`` decoder layers."""

    def __init__(self, dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.q_proj = nn.Linear(2 * dim, dim)
        layer = DecoderLayer(dim, cfg)
        # As the original (``_get_clones``): the layers start as identical copies of one layer.
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(cfg.num_layers))

    def forward(
        self, q0: torch.Tensor, pixels: torch.Tensor, attention: str = "sinkhorn"
    ) -> DecoderOutput:
        out = DecoderOutput()
        q = q0
        for layer in self.layers:
            q, mask, transport = layer(q, pixels, attention)
            out.queries.append(q)
            out.masks.append(mask)
            out.transports.append(transport)
        return out


def combine_masks(masks: list[torch.Tensor], mode: str = "sigmoid_geomean") -> torch.Tensor:
    """Layer masks (each (B, K, ...)) → decoder map.

    ``sigmoid_geomean`` (OTSeg): last raw mask × Π_{l<L} σ(mask_l)^{1/(L−1)}, multiplied in
    layer order, as the original; ``last`` (ZegCLIP): the last mask alone.
    """
    if mode == "last" or len(masks) == 1:
        return masks[-1]
    if mode != "sigmoid_geomean":
        raise ValueError(f"mask_combine must be 'sigmoid_geomean' or 'last', got {mode!r}")
    out = masks[-1]
    power = 1.0 / (len(masks) - 1)
    for m in masks[:-1]:
        out = out * torch.sigmoid(m) ** power
    return out
