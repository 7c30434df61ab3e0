"""CLIP ViT image tower with deep visual prompts → pixel and global embeddings.

The transformer blocks, patch embedding and norms are open_clip's modules (so OpenAI CLIP
weights load directly); the forward is ours, because OTSeg inserts and replaces prompt tokens
between blocks and interpolates positions to any token grid. Each block runs through
:func:`block_forward` over the block's own weights: one fused QKV projection and
``scaled_dot_product_attention`` instead of ``nn.MultiheadAttention`` (whose inference path
materialises the attention matrix), with in-place activations when no gradient is needed; equal
to open_clip's block to ~1e-6 in fp32 (see tests). On a CPU, inference runs the whole tower on
an inference engine instead (:mod:`otseg.inference.engine`), exported from this forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VisionConfig
from ..errors import UserError


@dataclass
class ImageEmbedding:
    """Output of the image tower for a batch of crops."""

    pixels: torch.Tensor  # (B, C, h, w) unit-norm pixel embeddings
    cls: torch.Tensor  # (B, C) unit-norm global embedding


class FrozenClipTower(nn.Module):
    """The frozen parts of an open_clip ``VisionTransformer`` (patch embedding, positions resized
    to the config's grid, blocks, final norm and projection); subclasses add their forward."""

    def __init__(self, cfg: VisionConfig, visual: nn.Module | None = None) -> None:
        super().__init__()
        visual = build_visual(cfg) if visual is None else visual
        check_visual(visual, cfg)
        self.cfg = cfg
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = nn.Parameter(
            resize_positions(visual.positional_embedding.detach(), cfg.image_size // cfg.patch_size)
        )
        self.ln_pre = visual.ln_pre
        self.transformer = visual.transformer
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.requires_grad_(False)


class PromptedViT(FrozenClipTower):
    """The frozen CLIP tower plus trainable VPT prompts; state-dict keys match the original
    ``backbone.*`` names minus the prefix."""

    def __init__(self, cfg: VisionConfig, visual: nn.Module | None = None) -> None:
        super().__init__(cfg, visual)  # the CLIP tower stays frozen; only the prompts train
        w, p = cfg.width, cfg.num_prompt_tokens
        bound = math.sqrt(6.0 / float(3 * cfg.patch_size**2 + w))  # VPT init
        self.prompt_embeddings = nn.Parameter(torch.empty(1, p, w).uniform_(-bound, bound))
        self.deep_prompt_embeddings = nn.Parameter(
            torch.empty(cfg.deep_prompt_layers, p, w).uniform_(-bound, bound)
        )
        self.prompt_proj = nn.Linear(w, w)
        nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        self.prompt_norm = nn.LayerNorm(w, eps=1e-6)
        self.prompt_dropout = nn.Dropout(cfg.prompt_dropout)
        self.grad_checkpointing = False

    def _prompts(self, embeddings: torch.Tensor, batch: int) -> torch.Tensor:
        return self.prompt_dropout(self.prompt_proj(embeddings).expand(batch, -1, -1))

    def forward(self, images: torch.Tensor) -> ImageEmbedding:
        """images: (B, 3, H, W) normalised, H and W multiples of the patch size."""
        x, h, w = clip_tokens(self, images, class_in_position=True)
        b, p = x.shape[0], self.cfg.num_prompt_tokens
        x = torch.cat([x[:, :1], self._prompts(self.prompt_embeddings, b), x[:, 1:]], dim=1)
        deep = self.deep_prompt_embeddings.shape[0]
        grad = torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.resblocks):
            if 1 <= i <= deep:
                prompts = self._prompts(self.deep_prompt_embeddings[i - 1 : i], b)
                if grad:
                    x = torch.cat([x[:, :1], prompts, x[:, 1 + p :]], dim=1)
                else:  # x is this forward's own intermediate: overwrite the prompt rows
                    x[:, 1 : 1 + p] = prompts
            if self.grad_checkpointing and self.training and grad:
                x = checkpoint(block_forward, block, x, use_reentrant=False)
            else:
                x = block_forward(block, x)
        x = self.ln_post(self.prompt_norm(x)) @ self.proj  # both norms, as the original
        pixels = x[:, -h * w :].transpose(1, 2).reshape(b, -1, h, w)
        return ImageEmbedding(pixels=F.normalize(pixels, dim=1), cls=F.normalize(x[:, 0], dim=-1))


_QUICK_GELU = 1.702  # QuickGELU(y) = y·σ(1.702·y) = swish(1.702·y) / 1.702


def block_forward(
    block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """open_clip ``ResidualAttentionBlock`` (pre-norm, QuickGELU MLP) on (B, L, W) tokens.

    attn_mask: None, or an additive (L, L) float mask (the text tower's causal mask).
    Same weights and result as ``block(x, attn_mask=attn_mask)``; any other block type runs
    as itself.
    """
    attn = getattr(block, "attn", None)
    if not (
        isinstance(attn, nn.MultiheadAttention)
        and attn.in_proj_weight is not None
        and attn.batch_first
        and isinstance(block.ls_1, nn.Identity)
        and isinstance(block.ls_2, nn.Identity)
        and not hasattr(block, "ln_1_kv")
        and type(block.mlp.gelu).__name__ == "QuickGELU"
    ):
        return block(x, attn_mask=attn_mask)
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    x = x + F.linear(y.transpose(1, 2).reshape(b, n, c), attn.out_proj.weight, attn.out_proj.bias)
    y = F.linear(block.ln_2(x), block.mlp.c_fc.weight, block.mlp.c_fc.bias)
    if torch.is_grad_enabled():
        y = y * torch.sigmoid(_QUICK_GELU * y)
    else:
        y.mul_(torch.sigmoid(_QUICK_GELU * y))
    return x + F.linear(y, block.mlp.c_proj.weight, block.mlp.c_proj.bias)


def build_visual(cfg: VisionConfig) -> nn.Module:
    """A randomly initialised open_clip ViT with QuickGELU and the config's dimensions."""
    from open_clip.model import VisionTransformer
    from open_clip.transformer import QuickGELU

    return VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        layers=cfg.layers,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        output_dim=cfg.embed_dim,
        act_layer=QuickGELU,
    )


def check_visual(visual: nn.Module, cfg: VisionConfig) -> None:
    """Raise a readable error when an open_clip image tower does not match the config."""
    found = {
        "patch_size": visual.conv1.kernel_size[0],
        "width": visual.conv1.out_channels,
        "layers": len(visual.transformer.resblocks),
        "heads": visual.transformer.resblocks[0].attn.num_heads,
        "embed_dim": visual.proj.shape[1] if visual.proj is not None else None,
    }
    wrong = {k: (v, getattr(cfg, k)) for k, v in found.items() if v != getattr(cfg, k)}
    if wrong:
        detail = ", ".join(f"{k}: CLIP has {a}, config wants {b}" for k, (a, b) in wrong.items())
        raise UserError(f"CLIP image tower does not match the model config ({detail})")
    act = visual.transformer.resblocks[0].mlp.gelu
    if type(act).__name__ != "QuickGELU":
        raise UserError(
            "CLIP image tower uses nn.GELU; OpenAI CLIP weights need QuickGELU "
            "(use 'ViT-B-16-quickgelu' or quick_gelu=True)"
        )


def clip_tokens(
    visual: nn.Module, images: torch.Tensor, *, class_in_position: bool = False
) -> tuple[torch.Tensor, int, int]:
    """CLIP's input tokens (no prompts): patch embedding, class token, positions resized to the
    grid, ``ln_pre``. ``visual``: an open_clip ``VisionTransformer`` or a
    :class:`FrozenClipTower`. images (B, 3, H, W) → tokens (B, 1 + h·w, W), h, w.

    class_in_position: also add the class embedding to the class token's position, as the
    original OTSeg does (so the class token carries it twice).
    """
    x = visual.conv1(images)  # (B, W, h, w)
    b, _, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype)
    pos = resize_positions(visual.positional_embedding.to(x.dtype), (h, w))
    if class_in_position:
        pos = torch.cat([pos[:1] + cls, pos[1:]], dim=0)
    return visual.ln_pre(torch.cat([cls.expand(b, 1, -1), x], dim=1) + pos), h, w


def resize_positions(pos: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize the spatial rows of a (1 + g², W) position table to ``grid``.

    Returns (1 + h·w, W); the identity when the grid already matches.
    """
    h, w = (grid, grid) if isinstance(grid, int) else grid
    g = int(math.isqrt(pos.shape[0] - 1))
    # While exporting, always interpolate (the identity at the same grid, exactly): comparing the
    # grid with g would specialise a dynamic-shape export to the table's grid.
    if not torch.compiler.is_exporting() and (g, g) == (h, w):
        return pos
    spatial = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], spatial.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)
