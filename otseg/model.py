"""OTSeg: wires the image tower, prompt embeddings, MPS path, decoder and ensemble.

One forward serves training and inference and returns the same :class:`OTSegOutput`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .clip_image import ImageEmbedding, PromptedViT
from .clip_text import PromptEmbedder, TextTower
from .config import OTSegConfig
from .decoder import Decoder, combine_masks, relationship_queries
from .ensemble import calibrate, fuse
from .mps import Transport, mps_score
from .mpsa import ATTENTIONS

DEFAULT_MASK_COMBINE = {"sinkhorn": "sigmoid_geomean", "softmax": "last"}


@dataclass
class OTSegOutput:
    """Named maps of one forward. S = config image size, (h, w) = token grid."""

    decoder_map: torch.Tensor  # (B, K, S, S) decoder map D↑ (raw, before the sigmoid)
    score_map: torch.Tensor | None  # (B, K, S, S) MPS map↑ (raw), None with the branch off
    logits: torch.Tensor  # (B, K, S, S) (1 − λ)·D↑ + λ·MPS↑
    scores: torch.Tensor  # (B, K, H, W) σ(logits) − calibration on seen, at the input size
    layer_masks: list[torch.Tensor]  # per decoder layer, (B, K, h, w)
    queries: list[torch.Tensor]  # relationship queries, then each layer's, (B, K, N, C)
    transports: list[Transport]  # the MPS call (if on), then one per decoder layer
    prompt_maps: torch.Tensor | None  # (B, K, N, h, w) per-prompt MPS maps M·N·T·S
    embedding: ImageEmbedding


class OTSeg(nn.Module):
    """The OTSeg segmentor. Build with :func:`build_model` or ``otseg.hub.from_pretrained``."""

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
        """(K', N, C) embeddings of the classes supervised in training (spec §2)."""
        names = [self.config.class_names[i] for i in self.config.training_class_ids]
        return self.embed_text(names)

    # -- the head ---------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor | ImageEmbedding,
        text: torch.Tensor,
        *,
        attention: str = "sinkhorn",
        use_mps: bool = True,
        lam: float | None = None,
        seen: torch.Tensor | None = None,
        calibration: float | None = None,
        mask_combine: str | None = None,
    ) -> OTSegOutput:
        """Segment a batch of crops.

        Args:
            images: (B, 3, H, W) normalised crops, or their cached :class:`ImageEmbedding`.
            text: (K, N, C) prompt embeddings (see :meth:`embed_text`).
            attention: ``"sinkhorn"`` (OTSeg's MPSA/MPS) or ``"softmax"`` (ZegCLIP baseline).
            use_mps: include the MPS score-map branch.
            lam: weight of the MPS map in the ensemble (default: config, 0.5).
            seen: (K,) bool, classes that get the seen calibration (default: none).
            calibration: value subtracted on seen classes (default: config).
            mask_combine: ``"sigmoid_geomean"`` or ``"last"`` (default: by attention).
        """
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        cfg = self.config
        emb = images if isinstance(images, ImageEmbedding) else self.encode_image(images)
        b, c, h, w = emb.pixels.shape
        in_size = (h * cfg.vision.patch_size, w * cfg.vision.patch_size)
        if not isinstance(images, ImageEmbedding):
            in_size = tuple(images.shape[-2:])
        pixels = emb.pixels.flatten(2).transpose(1, 2)  # (B, M, C), m = y·w + x
        q0 = relationship_queries(self.decoder.q_proj, emb.cls, text)

        transports: list[Transport] = []
        score_map = prompt_maps = None
        if use_mps:
            head = cfg.head
            sargs = {} if attention == "softmax" else {
                "max_iter": head.sinkhorn_max_iter, "tol": head.sinkhorn_thresh,
            }  # fmt: skip
            score, tr = mps_score(pixels, q0, attention, eps=head.sinkhorn_eps, **sargs)
            transports.append(tr)
            m, n = tr.plan.shape[-2:]
            prompt_maps = (m * n * tr.plan * tr.similarity).permute(0, 1, 3, 2)
            prompt_maps = prompt_maps.reshape(b, -1, n, h, w)
            score_map = self._upsample(score.reshape(b, -1, h, w))

        dec = self.decoder(q0, pixels, attention)
        transports.extend(dec.transports)
        masks = [m.reshape(b, -1, h, w) for m in dec.masks]
        mode = mask_combine or DEFAULT_MASK_COMBINE[attention]
        decoder_map = self._upsample(combine_masks(masks, mode))

        logits = fuse(decoder_map, score_map, cfg.ensemble_lambda if lam is None else lam)
        weight = cfg.calibration if calibration is None else calibration
        scores = calibrate(logits, seen, weight)
        if scores.shape[-2:] != in_size:  # e.g. 420 crops on a 480 model (§11 #18)
            scores = F.interpolate(scores, size=in_size, mode="bilinear", align_corners=False)
        return OTSegOutput(
            decoder_map=decoder_map,
            score_map=score_map,
            logits=logits,
            scores=scores,
            layer_masks=masks,
            queries=[q0, *dec.queries],
            transports=transports,
            prompt_maps=prompt_maps,
            embedding=emb,
        )

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        s = self.config.vision.image_size
        return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)

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
        clip: an open_clip ``CLIP`` whose frozen towers to use (see ``otseg.hub.load_clip``);
            None builds a randomly initialised image tower from the config and no text tower.
        tokenizer: the open_clip tokenizer matching ``clip``.
        text_bank: stored prompt embeddings, class name → (N, C).
    """
    visual = clip.visual if clip is not None else None
    tower = TextTower(clip, tokenizer) if clip is not None else None
    embedder = PromptEmbedder(config.templates, tower=tower, bank=text_bank)
    return OTSeg(config, PromptedViT(config.vision, visual), embedder, tower)
