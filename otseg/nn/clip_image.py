"""CLIP ViT image tower with deep visual prompts → pixel and global embeddings.

The transformer blocks, patch embedding and norms are open_clip's modules (so OpenAI CLIP
weights load directly); the forward is ours, because OTSeg inserts and replaces prompt tokens
between blocks and interpolates positions to any token grid. Each block runs through
:func:`block_forward` over the block's own weights: on a CPU without autograd, oneDNN GEMMs on
weights packed once (bias, residual and QuickGELU fused) and per-head attention; elsewhere one
fused QKV projection and ``scaled_dot_product_attention`` instead of ``nn.MultiheadAttention``
(whose inference path materialises the attention matrix), with in-place activations when no
gradient is needed. Both equal open_clip's block to ~1e-6 in fp32 (see tests).
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
from . import onednn


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
_PER_HEAD_MIN_TOKENS = 128  # CPU attention runs per head from this sequence length on


def block_forward(
    block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """open_clip ``ResidualAttentionBlock`` (pre-norm, QuickGELU MLP) on (B, L, W) tokens.

    attn_mask: None, or an additive (L, L) float mask (the text tower's causal mask).
    Same weights and result as ``block(x, attn_mask=attn_mask)``; any other block type runs
    as itself. CPU inference (fp32, or bf16 autocast) takes :func:`_cpu_block_forward`;
    autograd, GPUs and export take the portable path below.
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
    dtype = onednn.inference_dtype(x)
    if dtype is not None:
        return _cpu_block_forward(block, x, dtype, attn_mask)
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


# -- CPU inference through oneDNN (see otseg.nn.onednn) ------------------------------------------


@dataclass(frozen=True)
class _PackedBlock:
    """One block's weights in oneDNN's layout and the compute dtype, with the attention scale
    folded into the query rows and QuickGELU's 1.702 folded into the MLP (oneDNN fuses
    swish(y) = y·σ(y) into the GEMM, not y·σ(1.702·y)). Each field: (weight, bias)."""

    qkv: tuple[torch.Tensor, torch.Tensor]
    out: tuple[torch.Tensor, torch.Tensor]
    fc: tuple[torch.Tensor, torch.Tensor]
    proj: tuple[torch.Tensor, torch.Tensor]


def _block_weights(block: nn.Module) -> tuple[torch.Tensor, ...]:
    attn, mlp = block.attn, block.mlp
    return (
        attn.in_proj_weight,
        attn.in_proj_bias,
        attn.out_proj.weight,
        attn.out_proj.bias,
        mlp.c_fc.weight,
        mlp.c_fc.bias,
        mlp.c_proj.weight,
        mlp.c_proj.bias,
    )


def _pack_block(block: nn.Module, dtype: torch.dtype) -> _PackedBlock:
    w_qkv, b_qkv, w_out, b_out, w_fc, b_fc, w_proj, b_proj = (
        w.detach().float().clone() for w in _block_weights(block)
    )
    c = w_out.shape[0]
    scale = (c // block.attn.num_heads) ** -0.5  # as scaled_dot_product_attention
    w_qkv[:c] *= scale
    b_qkv[:c] *= scale

    def packed(w: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return onednn.pack(w, dtype), bias.to(dtype)

    return _PackedBlock(
        qkv=packed(w_qkv, b_qkv),
        out=packed(w_out, b_out),
        fc=packed(w_fc * _QUICK_GELU, b_fc * _QUICK_GELU),
        proj=packed(w_proj / _QUICK_GELU, b_proj),
    )


def _cpu_block_forward(
    block: nn.Module, x: torch.Tensor, dtype: torch.dtype, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """:func:`block_forward` for CPU inference: oneDNN GEMMs on prepacked weights with the
    bias, residual and QuickGELU fused, and :func:`_attention`.
    x (B, L, W) → (B, L, W) fp32; ``dtype`` (fp32 or bf16) is the GEMMs' dtype."""
    p = onednn.cached(block, dtype, _block_weights(block), lambda: _pack_block(block, dtype))
    b, n, c = x.shape
    heads = block.attn.num_heads
    with torch.autocast("cpu", enabled=False):
        rows = x.reshape(b * n, c).float()
        qkv = onednn.linear(block.ln_1(rows).to(dtype), p.qkv)
        y = _attention(qkv.view(b, n, 3, heads, c // heads), attn_mask)
        rows = onednn.linear_add(y, p.out, rows)
        y = onednn.linear(block.ln_2(rows).to(dtype), p.fc, "swish")  # 1.702 · QuickGELU
        rows = onednn.linear_add(y, p.proj, rows)
    return rows.view(b, n, c)


def _attention(qkv: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention. qkv (B, L, 3, heads, d), queries pre-scaled → (B·L, heads·d).

    Long sequences (image windows) run one head at a time as two oneDNN GEMMs and a softmax;
    oneDNN needs contiguous operands (a strided one is ~1000× slower). Short ones (text
    prompts: many sequences of a few tokens) run batched through
    ``scaled_dot_product_attention``, where per-head calls would cost more than the work.
    """
    b, n, _, heads, d = qkv.shape
    if attn_mask is not None or n < _PER_HEAD_MIN_TOKENS:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, L, d) each
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
        return y.transpose(1, 2).reshape(b * n, heads * d)
    q = qkv[:, :, 0].transpose(1, 2).contiguous()  # (B, heads, L, d)
    k = qkv[:, :, 1].transpose(1, 2).contiguous()
    v_t = qkv[:, :, 2].permute(0, 2, 3, 1).contiguous()  # (B, heads, d, L)
    out = qkv.new_empty(b, n, heads, d)
    for i in range(b):
        for h in range(heads):
            weights = torch.softmax(onednn.linear(q[i, h], (k[i, h], None)), dim=-1)
            out[i, :, h] = onednn.linear(weights, (v_t[i, h], None))
    return out.view(b * n, heads * d)


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
