"""ZegOT's decoder D_θ: FPN + ASPP over the score maps of one class at a time.

The paper names the parts (FPN, ASPP, upsampling) and its input cat[S̄_1..S̄_L, Σ_n S*]. It runs
here per class with shared weights (classes in the batch dimension), so any number and order
of classes works and permuting the classes permutes the output.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ZegOTHeadConfig


def _conv(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    # No normalisation layer: a per-sample norm would erase the absolute score level (whether
    # the class is present at all), and BatchNorm would mix statistics across classes.
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation),
        nn.ReLU(inplace=True),
    )


class ScoreMapDecoder(nn.Module):
    """(B, K, L, h, w) DFA maps + (B, K, h, w) MPOT map → (B, K, h, w) logits."""

    def __init__(self, num_blocks: int, cfg: ZegOTHeadConfig) -> None:
        super().__init__()
        c, stages = cfg.decoder_channels, cfg.fpn_stages
        self.per_stage = num_blocks // stages
        # FPN (SETR-MLA style: one scale): consecutive blocks form a stage.
        self.lateral = nn.ModuleList(nn.Conv2d(self.per_stage, c, 1) for _ in range(stages))
        self.smooth = nn.ModuleList(_conv(c, c, 3) for _ in range(stages))
        aspp_in = stages * c + 1
        self.aspp = nn.ModuleList(
            _conv(aspp_in, c, 1 if d == 1 else 3, d) for d in cfg.aspp_dilations
        )
        self.pool = _conv(aspp_in, c, 1)  # image-pooling branch
        self.fuse = _conv((len(cfg.aspp_dilations) + 1) * c, c, 1)
        self.logit = nn.Conv2d(c, 1, 1)

    def forward(self, dfa: torch.Tensor, mpot: torch.Tensor) -> torch.Tensor:
        b, k, blocks, h, w = dfa.shape
        x = dfa.reshape(b * k, blocks, h, w)
        stages = x.split(self.per_stage, dim=1)
        merged, top = [], None
        for lateral, stage in zip(reversed(self.lateral), reversed(stages), strict=True):
            top = lateral(stage) if top is None else lateral(stage) + top  # top-down add
            merged.append(top)
        levels = [smooth(m) for smooth, m in zip(self.smooth, reversed(merged), strict=True)]
        x = torch.cat([*levels, mpot.reshape(b * k, 1, h, w).to(x.dtype)], dim=1)
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, h, w)
        x = self.fuse(torch.cat([*(branch(x) for branch in self.aspp), pooled], dim=1))
        return self.logit(x).reshape(b, k, h, w)
