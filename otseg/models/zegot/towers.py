"""ZegOT's two frozen CLIP towers: the image tower returning every block's patch tokens, and the
text tower run on learned context vectors in front of each class name (CoOp-style prompts)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config import VisionConfig
from ...errors import UserError
from ...nn.clip_image import (
    FrozenClipTower,
    ImageEmbedding,
    block_forward,
    clip_tokens,
)
from ...nn.clip_text import LockedCache, TextTower
from .config import TextConfig


@dataclass
class LayeredEmbedding(ImageEmbedding):
    """:class:`ImageEmbedding` of the last block plus the patch tokens of every block."""

    blocks: torch.Tensor  # (L, B, C, h, w) unit-norm patch embeddings of blocks 1..L


class FrozenViT(FrozenClipTower):
    """CLIP's own ViT forward (no prompts); each block's patch tokens go through the frozen
    ``ln_post`` and ``proj`` into C, the path CLIP gives the last block's tokens."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> LayeredEmbedding:
        """images: (B, 3, H, W) normalised, H and W multiples of the patch size."""
        x, h, w = clip_tokens(self, images)
        b = x.shape[0]
        blocks = []
        for block in self.transformer.resblocks:
            x = block_forward(block, x)
            blocks.append(x[:, 1:])
        tokens = self.ln_post(torch.stack(blocks)) @ self.proj  # (L, B, M, C)
        tokens = F.normalize(tokens, dim=-1).transpose(2, 3).reshape(len(blocks), b, -1, h, w)
        cls = F.normalize(self.ln_post(x[:, 0]) @ self.proj, dim=-1)
        return LayeredEmbedding(pixels=tokens[-1], cls=cls, blocks=tokens)


class LearnedPrompts(LockedCache, nn.Module):
    """N prompts of l free context vectors, run with each class name through the frozen text
    tower: ``[V_1 … V_l] <name> .`` → (K, N, C). Embeddings of a name are cached until the
    vectors change (an optimizer step or a load bumps the parameter's version)."""

    def __init__(
        self,
        tower: TextTower,
        num_prompts: int,
        length: int,
        *,
        init_std: float = 0.02,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.tower = tower
        width = tower.token_embedding.weight.shape[1]
        self.ctx = nn.Parameter(torch.randn(num_prompts, length, width) * init_std)
        self.checkpointing = checkpointing
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_key: tuple | None = None
        self._token_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def prompts(self, names: Sequence[str]) -> list[str]:
        """The tokenizer's view of each name's prompt: one placeholder word per vector."""
        prefix = " ".join(["X"] * self.ctx.shape[1])
        return [f"{prefix} {name}." for name in names]

    def _check_lengths(self, names: Sequence[str], prompts: Sequence[str]) -> None:
        """A ``ValueError`` naming the class names (not the placeholder prompts) that do not fit."""
        try:
            self.tower.check_lengths(prompts)
        except ValueError:
            bad = []
            for name, prompt in zip(names, prompts, strict=True):
                try:
                    self.tower.check_lengths([prompt])
                except ValueError:
                    bad.append(name)
            raise UserError(
                f"{len(bad)} class name(s) too long for CLIP's text context after the "
                f"{self.ctx.shape[1]} learned prompt vectors, e.g. {bad[0][:80]!r}; use shorter "
                f"class names"
            ) from None

    def tokens(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, L) prompt token ids up to the longest end token and their (K,) end positions,
        on ``ctx``'s device. Cached per name list: training encodes the same names every step,
        and tokenising then copying to the GPU each time would wait for the GPU."""
        key = (tuple(names), self.ctx.device)
        with self._lock:
            hit = self._token_cache.get(key)
        if hit is not None:
            return hit
        prompts = self.prompts(names)
        self._check_lengths(names, prompts)
        hit = self.tower.tokenize(prompts, self.ctx.device)
        with self._lock:
            if len(self._token_cache) >= 16:  # name lists of inference calls: keep it small
                self._token_cache.clear()
            self._token_cache[key] = hit
        return hit

    def encode(self, names: Sequence[str]) -> torch.Tensor:
        """K names → (K, N, C) unit-norm float32 embeddings; differentiable in ``ctx``."""
        tokens, eot = self.tokens(names)
        length = tokens.shape[1]
        n, length_ctx, _ = self.ctx.shape
        k = len(names)
        words = self.tower.token_embedding(tokens)  # (K, L, W)
        words = words.to(self.ctx.dtype).unsqueeze(0).expand(n, -1, -1, -1)
        ctx = self.ctx.unsqueeze(1).expand(-1, k, -1, -1)
        x = torch.cat([words[:, :, :1], ctx, words[:, :, 1 + length_ctx :]], dim=2)  # (N, K, L, W)
        out = self.tower.encode_embeddings(
            x.reshape(n * k, length, -1),
            eot.repeat(n),
            checkpointing=self.checkpointing and self.training,
        )
        return out.reshape(n, k, -1).transpose(0, 1)

    def forward(self, names: Sequence[str]) -> torch.Tensor:
        """K names → (K, N, C): encoded with gradients while grad mode is on, else cached."""
        if torch.is_grad_enabled() and self.ctx.requires_grad:
            return self.encode(names)
        key = (self.ctx._version, self.ctx.data_ptr(), self.ctx.device)
        with self._lock:
            if key != self._cache_key:
                self._cache, self._cache_key = {}, key
            missing = [n for n in dict.fromkeys(names) if n not in self._cache]
        if missing:
            with torch.no_grad():
                encoded = self.encode(missing)
            with self._lock:
                self._cache.update(zip(missing, encoded, strict=True))
        with self._lock:
            return torch.stack([self._cache[n] for n in names])


def build_random_clip(vision: VisionConfig, text: TextConfig) -> tuple[nn.Module, object]:
    """A randomly initialised open_clip CLIP (QuickGELU) of the configs' sizes and the BPE
    tokenizer: the towers of a model whose config names no CLIP weights (tiny test models)."""
    import open_clip

    clip = open_clip.CLIP(
        embed_dim=vision.embed_dim,
        quick_gelu=True,
        vision_cfg={
            "image_size": vision.image_size,
            "layers": vision.layers,
            "width": vision.width,
            "head_width": vision.width // vision.heads,
            "patch_size": vision.patch_size,
            "mlp_ratio": vision.mlp_ratio,
        },
        text_cfg={
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "heads": text.heads,
            "layers": text.layers,
        },
    )
    return clip.eval(), open_clip.get_tokenizer("ViT-B-16")
