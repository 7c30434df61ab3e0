"""OTSeg: wires the image tower, prompt embeddings, MPS path, decoder and ensemble.

One forward serves training and inference and returns the same :class:`OTSegOutput`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import registry
from ..config import PRESETS, OTSegConfig
from ..errors import UserError
from ..nn.clip_image import ImageEmbedding, PromptedViT
from ..nn.clip_text import PromptEmbedder, TextTower
from ..nn.decoder import Decoder, class_queries, combine_masks, relationship_queries
from ..nn.ensemble import PostProcessing, WindowScores
from ..nn.mps import Transport, mps_maps
from ..nn.variants import NO_MPS, VARIANTS
from ..weights.pretrained import Pretrained

DEFAULT_MASK_COMBINE = {"sinkhorn": "sigmoid_geomean", "softmax": "last", "zegclip": "last"}
# the attention kernel (otseg.nn.mpsa) each variant runs in the decoder and the MPS map
KERNEL = {"sinkhorn": "sinkhorn", "softmax": "softmax", "zegclip": "softmax"}


@dataclass
class OTSegOutput(WindowScores):
    """Named maps of one forward: the post-processed maps (decoder_map, score_map, logits,
    output, scores; see :class:`WindowScores`), then the head's. (h, w) = token grid."""

    layer_masks: list[torch.Tensor]  # per decoder layer, (B, K, h, w)
    queries: list[torch.Tensor]  # relationship queries, then each layer's, (B, K, N, C)
    transports: list[Transport]  # the MPS call (if on), then one per decoder layer
    prompt_maps: torch.Tensor | None  # (B, K, N, h, w) per-prompt MPS maps M·N·T·S
    embedding: ImageEmbedding


@dataclass
class HeadMaps:
    """Head outputs at the token grid (h, w), before upsampling and fusion."""

    decoder: torch.Tensor  # (B, K, h, w) combined decoder map D
    score: torch.Tensor | None  # (B, K, h, w) MPS map, None with the branch off
    layer_masks: list[torch.Tensor]  # per decoder layer, (B, K, h, w)
    queries: list[torch.Tensor]  # relationship queries, then each layer's, (B, K, N, C)
    transports: list[Transport]  # the MPS call (if on), then one per decoder layer
    prompt_maps: torch.Tensor | None = None  # (B, K, N, h, w) per-prompt MPS maps M·N·T·S


class OTSeg(PostProcessing, Pretrained, nn.Module):
    """The OTSeg segmentor. Build with :func:`build_model` or ``otseg.weights.pretrained.from_pretrained``."""

    variants = VARIANTS  # attention variant → what it computes, one sentence
    attentions = tuple(VARIANTS)
    default_attention = "sinkhorn"

    def __init__(
        self,
        config: OTSegConfig,
        image_encoder: PromptedViT,
        text: PromptEmbedder,
        text_tower: TextTower | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.decoder = Decoder(config.vision.embed_dim, config.head)
        self.text = text
        self.text_tower = text_tower  # registered so .to(device) moves it; frozen

    # -- the two encoders -------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> ImageEmbedding:
        """images: (B, 3, H, W) normalised → pixel (B, C, H/16, W/16) and global (B, C)."""
        return self.image_encoder(images)

    def embed_text(self, names: Sequence[str]) -> torch.Tensor:
        """K class names → (K, N, C) float32 prompt embeddings on the model's device."""
        return self.text(names).to(self.decoder.q_proj.weight.device)

    @property
    def training_text(self) -> torch.Tensor:
        """(K', N, C) embeddings of the classes supervised in training."""
        return self.embed_text(list(self.config.training_class_names))

    # -- the head ---------------------------------------------------------------------------
    def decode(
        self,
        emb: ImageEmbedding,
        text: torch.Tensor,
        *,
        attention: str | None = None,
        use_mps: bool | None = None,
        mask_combine: str | None = None,
    ) -> HeadMaps:
        """Both branches of the head at the token grid (no upsampling, fusion or sigmoid).

        Args:
            emb: image embedding of B crops (pixels (B, C, h, w)).
            text: (K, N, C) prompt embeddings (see :meth:`embed_text`).
            attention: a variant of :data:`otseg.nn.variants.VARIANTS`: ``"sinkhorn"``
                (OTSeg), ``"softmax"`` (the multi-prompt softmax ablation) or ``"zegclip"``
                (ZegCLIP's inference: one query per class from the prompt mean, no MPS);
                default: the model's (:attr:`default_attention`).
            use_mps: include the MPS score-map branch (default: on, except for ``"zegclip"``,
                which has none: True is refused there).
            mask_combine: ``"sigmoid_geomean"`` or ``"last"`` (default: by attention).
        """
        attention = self.default_attention if attention is None else attention
        if attention not in self.attentions:
            raise UserError(f"attention must be one of {self.attentions}, got {attention!r}")
        if attention in NO_MPS:
            if use_mps:
                raise UserError(f"attention={attention!r} has no MPS score map; drop use_mps=True")
            use_mps, text = False, class_queries(text)
        elif use_mps is None:
            use_mps = True
        kernel = KERNEL[attention]
        b, _, h, w = emb.pixels.shape
        pixels = emb.pixels.flatten(2).transpose(1, 2)  # (B, M, C), m = y·w + x
        q0 = relationship_queries(self.decoder.q_proj, emb.cls, text)
        maps = HeadMaps(decoder=q0, score=None, layer_masks=[], queries=[q0], transports=[])
        if use_mps:
            maps.score, maps.prompt_maps, tr = mps_maps(
                pixels, q0, (h, w), kernel, self.config.head
            )
            maps.transports.append(tr)
        dec = self.decoder(q0, pixels, kernel)
        maps.transports.extend(dec.transports)
        maps.queries.extend(dec.queries)
        maps.layer_masks = [m.reshape(b, -1, h, w) for m in dec.masks]
        maps.decoder = combine_masks(
            maps.layer_masks, mask_combine or DEFAULT_MASK_COMBINE[attention]
        )
        return maps

    def forward(
        self,
        images: torch.Tensor | ImageEmbedding,
        text: torch.Tensor,
        *,
        attention: str | None = None,
        use_mps: bool | None = None,
        lam: float | None = None,
        seen: torch.Tensor | None = None,
        calibration: float | None = None,
        mask_combine: str | None = None,
    ) -> OTSegOutput:
        """Segment a batch of crops (training and inference alike).

        Args:
            images: (B, 3, H, W) normalised crops, or their cached :class:`ImageEmbedding`.
            text: (K, N, C) prompt embeddings.
            attention, use_mps, mask_combine: see :meth:`decode`.
            lam: weight of the MPS map in the ensemble (default: config, 0.5); refused with
                ``attention="zegclip"`` (no MPS map to weigh).
            seen: (K,) bool, classes that get the seen calibration (default: none).
            calibration: value subtracted on seen classes (default: config).
        """
        attention = self.default_attention if attention is None else attention
        if attention in NO_MPS and lam is not None:
            raise UserError(f"attention={attention!r} has no MPS score map, so λ does not apply")
        emb = images if isinstance(images, ImageEmbedding) else self.encode_image(images)
        maps = self.decode(
            emb, text, attention=attention, use_mps=use_mps, mask_combine=mask_combine
        )
        return OTSegOutput(
            **self.forward_scores(maps, images, lam=lam, seen=seen, calibration=calibration),
            layer_masks=maps.layer_masks,
            queries=maps.queries,
            transports=maps.transports,
            prompt_maps=maps.prompt_maps,
            embedding=emb,
        )

    # -- weights ----------------------------------------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes (prompts, their projection and norm, decoder); plus the frozen
        image tower when the config names no CLIP source to rebuild it from."""
        keep_frozen_image = self.config.clip_model is None
        out = {}
        for key, value in self.state_dict().items():
            if key.startswith("decoder.") or (
                key.startswith("image_encoder.") and ("prompt" in key or keep_frozen_image)
            ):
                out[key] = value
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the image tower's blocks in the backward pass of training forwards (the
        path the prompt gradients take); saves activation memory. Off when built."""
        self.image_encoder.grad_checkpointing = enabled

    @property
    def device(self) -> torch.device:
        return self.decoder.q_proj.weight.device


def build_model(
    config: OTSegConfig,
    *,
    clip: nn.Module | None = None,
    tokenizer=None,
    text_bank: dict[str, torch.Tensor] | None = None,
) -> OTSeg:
    """Assemble an OTSeg model.

    Args:
        config: the model config.
        clip: an open_clip ``CLIP`` whose frozen towers to use (see ``otseg.weights.clip.load_clip``);
            None builds a randomly initialised image tower from the config and no text tower.
        tokenizer: the open_clip tokenizer matching ``clip``.
        text_bank: stored prompt embeddings, class name → (N, C).
    """
    visual = clip.visual if clip is not None else None
    tower = TextTower(clip, tokenizer) if clip is not None else None
    embedder = PromptEmbedder(config.templates, tower=tower, bank=text_bank)
    return OTSeg(config, PromptedViT(config.vision, visual), embedder, tower)


registry.register(
    registry.ModelType(
        name="otseg",
        title="OTSeg",
        config_class=OTSegConfig,
        build=build_model,
        presets=PRESETS,
        about="Zero-shot semantic segmentation with multi-prompt Sinkhorn attention "
        "(OTSeg, ECCV 2024),",
    )
)
