"""Training-free OTSeg: frozen CLIP dense features scored against the N prompts of each class.

Used when no trained OTSeg checkpoint is available. Satisfies
:class:`otseg.inference.predictor.SegmentationModel`, so ``OTSegPredictor(TrainingFreeOTSeg(...))``
works unchanged, with both transports (Sinkhorn or softmax) and λ.

Dense features follow MaskCLIP (Zhou et al., "Extract Free Dense Labels from CLIP", ECCV 2022):
in the last block the query-key attention is replaced by the value path, so each patch keeps
its own content, ``v = out_proj(W_v · ln_1(x))``. Like ClearCLIP (Lan et al., ECCV 2024), the
residual connection and the feed-forward network of that block are dropped, which ClearCLIP
shows removes most of the noise in CLIP's dense maps; then ``ln_post`` and ``proj`` map the
patches into the text space. ``dense="clearclip"`` uses ClearCLIP's query-query attention
instead of the pure value path. The global (CLS) embedding is CLIP's own, unchanged.

Head (no learned parameters):
- decoder map D[k] = τ·(mean_n cos(pixel, prompt_kn) − mean over classes), τ = ``SCALE``;
- score map (MPS, otseg.nn.mps.mps_score with the chosen transport, queries = the raw prompt
  embeddings) divided by N, then centred and scaled the same way, so λ mixes two maps of
  comparable range;
- per-prompt maps M·N·T·S as in the trained model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HeadConfig, OTSegConfig, VisionConfig
from ..data.prompts import TEMPLATES_8
from ..errors import UserError
from ..nn.clip_image import ImageEmbedding, block_forward, clip_tokens
from ..nn.clip_text import PromptEmbedder, TextTower
from ..nn.ensemble import PostProcessing
from ..nn.mps import mps_maps
from ..nn.mpsa import ATTENTIONS
from .otseg import HeadMaps

# OpenAI CLIP normalisation (0..255 scale); the trained OTSeg models use ImageNet stats instead
CLIP_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_STD = (68.5005327, 66.6321579, 70.32316305)
SCALE = 50.0  # τ: cosine differences of ~0.02 become logit differences of ~1
DENSE_MODES = ("maskclip", "clearclip")


def training_free_config(
    visual: nn.Module,
    *,
    clip_model: str | None,
    clip_pretrained: str | None,
    resize_short: int = 448,
    test_crop: int = 448,
    test_stride: int = 320,
) -> OTSegConfig:
    """An :class:`OTSegConfig` describing the frozen CLIP: no training classes, no calibration.

    The test scale (short side 448, 448 crops, stride 320) is below the trained models' 512/426
    so that a 4:3 photo needs two windows of 28×28 tokens: ~2× faster on a 2-core CPU.
    """
    block = visual.transformer.resblocks[0]
    vision = VisionConfig(
        image_size=test_crop,
        patch_size=visual.conv1.kernel_size[0],
        width=visual.conv1.out_channels,
        layers=len(visual.transformer.resblocks),
        heads=block.attn.num_heads,
        mlp_ratio=block.mlp.c_fc.out_features / visual.conv1.out_channels,
        embed_dim=visual.proj.shape[1],
        num_prompt_tokens=0,
        deep_prompt_layers=0,
        prompt_dropout=0.0,
    )
    return OTSegConfig(
        vision=vision,
        head=HeadConfig(dropout=0.0, attn_dropout=0.0),
        dataset="training-free",
        class_names=(),
        unseen=(),
        templates=TEMPLATES_8,
        calibration=0.0,
        resize_short=resize_short,
        test_crop=test_crop,
        test_stride=test_stride,
        pixel_mean=CLIP_MEAN,
        pixel_std=CLIP_STD,
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
    )


class DenseClipTower(nn.Module):
    """The frozen CLIP image tower with MaskCLIP/ClearCLIP dense features in its last block
    (see the module doc): the model's ``image_encoder``, which engines export as one module."""

    def __init__(self, visual: nn.Module, dense: str = "maskclip") -> None:
        super().__init__()
        if dense not in DENSE_MODES:
            raise UserError(f"dense must be one of {DENSE_MODES}, got {dense!r}")
        self.visual = visual
        self.dense = dense

    def extra_repr(self) -> str:
        return f"dense={self.dense!r}"

    def forward(self, images: torch.Tensor) -> ImageEmbedding:
        """images: (B, 3, H, W) CLIP-normalised → pixels (B, C, H/p, W/p), cls (B, C), unit-norm."""
        v = self.visual
        x, h, w = clip_tokens(v, images)
        b = x.shape[0]
        blocks = v.transformer.resblocks
        for block in blocks[:-1]:
            x = block_forward(block, x)
        last = blocks[-1]
        cls_out = block_forward(last, x)[:, 0]  # the global embedding keeps the full last block
        dense = self._dense_tokens(last, x)[:, 1:]
        out = v.ln_post(torch.cat([cls_out[:, None], dense], dim=1)) @ v.proj
        pixels = out[:, 1:].transpose(1, 2).reshape(b, -1, h, w)
        return ImageEmbedding(pixels=F.normalize(pixels, dim=1), cls=F.normalize(out[:, 0], dim=-1))

    def _dense_tokens(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, L, W) tokens entering the last block → (B, L, W) attention output only
        (no residual, no feed-forward)."""
        attn: nn.MultiheadAttention = block.attn
        y = block.ln_1(x)
        q, _, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        if self.dense == "clearclip":
            b, n, width = q.shape
            heads = attn.num_heads
            qh = q.reshape(b, n, heads, width // heads).transpose(1, 2)  # (B, H, L, d)
            vh = v.reshape(b, n, heads, width // heads).transpose(1, 2)
            v = F.scaled_dot_product_attention(qh, qh, vh).transpose(1, 2).reshape(b, n, width)
        out = attn.out_proj(v)
        return block.ls_1(out) if hasattr(block, "ls_1") else out


class TrainingFreeOTSeg(PostProcessing, nn.Module):
    """Frozen CLIP (image and text towers) with a parameter-free MPS head; see module doc."""

    attentions = ATTENTIONS

    def __init__(
        self, config: OTSegConfig, clip: nn.Module, tokenizer, *, dense: str = "maskclip"
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = DenseClipTower(clip.visual, dense)
        self.text_tower = TextTower(clip, tokenizer)
        self.text = PromptEmbedder(config.templates, tower=self.text_tower)
        self.card: dict = {}
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def visual(self) -> nn.Module:
        """CLIP's image tower (open_clip ``VisionTransformer``)."""
        return self.image_encoder.visual

    @property
    def dense(self) -> str:
        return self.image_encoder.dense

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    # -- the two encoders -------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> ImageEmbedding:
        """images: (B, 3, H, W) CLIP-normalised → pixels (B, C, H/p, W/p), cls (B, C), unit-norm."""
        return self.image_encoder(images)

    def embed_text(self, names: Sequence[str]) -> torch.Tensor:
        """K class names → (K, N, C) float32 unit-norm prompt embeddings on the model's device."""
        return self.text(names).to(self.device)

    # -- the head ---------------------------------------------------------------------------
    def decode(
        self,
        emb: ImageEmbedding,
        text: torch.Tensor,
        *,
        attention: str = "sinkhorn",
        use_mps: bool = True,
        mask_combine: str | None = None,
    ) -> HeadMaps:
        """Parameter-free maps at the token grid; same fields as :meth:`OTSeg.decode`.

        Args:
            emb: pixels (B, C, h, w) unit-norm.
            text: (K, N, C) prompt embeddings.
            attention: transport of the MPS map, ``"sinkhorn"`` or ``"softmax"``.
            use_mps: compute the MPS score map and per-prompt maps.
            mask_combine: ignored (there are no decoder layers).
        """
        if attention not in ATTENTIONS:
            raise UserError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        b, _, h, w = emb.pixels.shape
        pixels = emb.pixels.flatten(2).transpose(1, 2).float()  # (B, M, C)
        queries = text.to(pixels.dtype).expand(b, -1, -1, -1)  # (B, K, N, C)
        similarity = torch.einsum("bmc,bknc->bkm", pixels, F.normalize(queries, dim=-1))
        decoder = _centre(similarity / text.shape[1]).reshape(b, -1, h, w)
        maps = HeadMaps(
            decoder=decoder, score=None, layer_masks=[decoder], queries=[queries], transports=[]
        )
        if use_mps:
            score, maps.prompt_maps, tr = mps_maps(
                pixels, queries, (h, w), attention, self.config.head
            )
            maps.score = _centre(score / queries.shape[2])
            maps.transports.append(tr)
        return maps


def _centre(x: torch.Tensor) -> torch.Tensor:
    """(B, K, ...) similarities → τ·(x − mean over K): only differences between classes matter."""
    return SCALE * (x - x.mean(dim=1, keepdim=True))


def build_training_free(
    clip_model: str = "ViT-B-16-quickgelu",
    pretrained: str | None = "openai",
    *,
    cache_dir: str | None = None,
    dense: str = "maskclip",
    **scale,
) -> TrainingFreeOTSeg:
    """Load frozen CLIP through :func:`otseg.weights.clip.load_clip` and wrap it.

    Raises ``otseg.errors.WeightsNotFoundError`` quickly when the weights are missing or offline.
    ``scale``: ``resize_short``, ``test_crop``, ``test_stride`` (see :func:`training_free_config`).
    """
    from ..weights.clip import load_clip

    clip, tokenizer = load_clip(clip_model, pretrained, cache_dir=cache_dir)
    config = training_free_config(
        clip.visual, clip_model=clip_model, clip_pretrained=pretrained, **scale
    )
    return TrainingFreeOTSeg(config, clip, tokenizer, dense=dense).eval()
