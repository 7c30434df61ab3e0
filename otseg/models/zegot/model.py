"""ZegOT: learned text prompts matched to the frozen CLIP image tower's pixels of several blocks
by optimal transport (MPOT), a score-map decoder, and the λ ensemble.

Same interface as :class:`otseg.models.otseg.OTSeg` (``encode_image``, ``embed_text``, ``decode``,
``forward``, ``upsample``, hub I/O), so the predictor, the training loop and the demo take
either model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ... import registry
from ...errors import UserError
from ...nn.clip_text import PromptEmbedder, TextTower
from ...nn.decoder import relationship_queries
from ...nn.ensemble import PostProcessing, WindowScores
from ...nn.mps import Transport
from ...weights.pretrained import Pretrained
from .config import PRESETS, ZegOTConfig
from .decoder import ScoreMapDecoder
from .mpot import TRANSPORTS, MPOTMaps, block_similarities, mpot
from .towers import FrozenViT, LayeredEmbedding, LearnedPrompts, build_random_clip


@dataclass
class ZegOTMaps:
    """Head outputs at the token grid (h, w), before upsampling and fusion."""

    decoder: torch.Tensor  # (B, K, h, w) decoder logits Ỹ
    score: torch.Tensor | None  # (B, K, h, w) MPOT map Σ_n S*, None with the branch off
    prompt_maps: torch.Tensor  # (B, K, N, h, w) per learned prompt, S*
    dfa: torch.Tensor  # (B, K, L, h, w) DFA maps S̄_i of every block
    mpot: MPOTMaps
    transports: list[Transport]  # one per MPOT layer (none for transport "none")


@dataclass
class ZegOTOutput(WindowScores):
    """Named maps of one forward: the post-processed maps as in
    :class:`otseg.models.otseg.OTSegOutput` (decoder_map: the decoder logits Ỹ↑; score_map: the MPOT
    map Y↑, None with the branch off; output: σ(λ·Y↑ + (1 − λ)·Ỹ↑), calibration 0 by
    default), then ZegOT's head maps."""

    prompt_maps: torch.Tensor  # (B, K, N, h, w) per learned prompt, S*
    dfa_maps: torch.Tensor  # (B, K, L, h, w)
    mpot: MPOTMaps
    transports: list[Transport]
    embedding: LayeredEmbedding


class ZegOT(PostProcessing, Pretrained, nn.Module):
    """The ZegOT segmentor. Build with :func:`build_zegot` or ``otseg.weights.pretrained.from_pretrained``."""

    embedding_type = LayeredEmbedding  # what encode_image returns
    attentions = TRANSPORTS

    def __init__(
        self, config: ZegOTConfig, image_encoder: FrozenViT, prompts: LearnedPrompts
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.prompts = prompts
        c = config.vision.embed_dim
        self.q_proj = nn.Linear(2 * c, c)  # the GA layer Q
        self.hand_crafted = None
        if config.head.prompt_source == "templates":  # the hand-crafted-prompt ablation
            self.hand_crafted = PromptEmbedder(config.head.hand_crafted, tower=prompts.tower)
            prompts.ctx.requires_grad_(False)
        self.decoder = ScoreMapDecoder(config.vision.layers, config.head)

    # -- the two encoders -------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> LayeredEmbedding:
        """images: (B, 3, H, W) normalised → every block's pixels (L, B, C, h, w) + global (B, C)."""
        return self.image_encoder(images)

    def embed_text(self, names: Sequence[str]) -> torch.Tensor:
        """K class names → (K, N, C) float32 embeddings of the learned prompts (with gradients
        in grad mode, cached per name otherwise)."""
        if self.hand_crafted is not None:
            return self.hand_crafted(list(names)).to(self.device)
        return self.prompts(list(names))

    @property
    def training_class_names(self) -> tuple[str, ...]:
        return self.config.training_class_names

    @property
    def training_text(self) -> torch.Tensor:
        """(K', N, C) embeddings of the classes supervised in training."""
        return self.embed_text(self.training_class_names)

    # -- the head ---------------------------------------------------------------------------
    def decode(
        self,
        emb: LayeredEmbedding,
        text: torch.Tensor,
        *,
        attention: str = "sinkhorn",
        use_mps: bool = True,
    ) -> ZegOTMaps:
        """GA, DFA, MPOT and the decoder at the token grid (no upsampling, fusion or sigmoid).

        Args:
            emb: image embedding of B crops (blocks (L, B, C, h, w)).
            text: (K, N, C) prompt embeddings (see :meth:`embed_text`).
            attention: MPOT transport: ``"sinkhorn"``, ``"softmax"`` or ``"none"``.
            use_mps: include the MPOT map Y in the output (the decoder always reads it).
        """
        if attention not in TRANSPORTS:
            raise UserError(f"attention must be one of {TRANSPORTS}, got {attention!r}")
        blocks, b, _, h, w = emb.blocks.shape
        g = F.normalize(relationship_queries(self.q_proj, emb.cls, text), dim=-1)  # (B, K, N, C)
        sims = block_similarities(emb.blocks, g)  # (L, B, K, M, N)
        dfa = sims.sum(-1).permute(1, 2, 0, 3).reshape(b, -1, blocks, h, w)  # S̄_i = Σ_n S_i
        maps = mpot(sims, self.config.head.mpot_layers, attention, self.config.head)
        k, n = g.shape[1:3]
        score = maps.combined.sum(-1).reshape(b, k, h, w)  # M(S*)
        return ZegOTMaps(
            decoder=self.decoder(dfa, score),
            score=score if use_mps else None,
            prompt_maps=maps.combined.transpose(2, 3).reshape(b, k, n, h, w),
            dfa=dfa,
            mpot=maps,
            transports=maps.transports,
        )

    def forward(
        self,
        images: torch.Tensor | LayeredEmbedding,
        text: torch.Tensor | Sequence[str],
        *,
        attention: str = "sinkhorn",
        use_mps: bool = True,
        lam: float | None = None,
        seen: torch.Tensor | None = None,
        calibration: float | None = None,
    ) -> ZegOTOutput:
        """Segment a batch of crops (training and inference alike).

        Args:
            images: (B, 3, H, W) normalised crops, or their cached :class:`LayeredEmbedding`.
            text: (K, N, C) prompt embeddings, or K class names (encoded here, with gradients
                to the prompts: training passes names so distributed runs sync them).
            attention, use_mps: see :meth:`decode`.
            lam: weight of the MPOT map Y in the ensemble (default: config, 0.8).
            seen: (K,) bool, classes that get the seen calibration (default: none).
            calibration: value subtracted on seen classes (default: config, 0).
        """
        emb = images if isinstance(images, LayeredEmbedding) else self.encode_image(images)
        if not isinstance(text, torch.Tensor):
            text = self.embed_text(text)
        maps = self.decode(emb, text, attention=attention, use_mps=use_mps)
        return ZegOTOutput(
            **self.forward_scores(maps, images, lam=lam, seen=seen, calibration=calibration),
            prompt_maps=maps.prompt_maps,
            dfa_maps=maps.dfa,
            mpot=maps.mpot,
            transports=maps.transports,
            embedding=emb,
        )

    # -- weights ----------------------------------------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes (prompt vectors, GA layer, decoder); plus both frozen towers
        when the config names no CLIP source to rebuild them from."""
        keep_frozen = self.config.clip_model is None
        return {
            k: v
            for k, v in self.state_dict().items()
            if keep_frozen or not k.startswith(("image_encoder.", "prompts.tower."))
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the text tower's blocks in the backward pass of training forwards (the
        path the prompt gradients take; the image tower runs without gradients); saves
        activation memory. Built as ``config.head.text_checkpointing`` says."""
        self.prompts.checkpointing = enabled

    def prompt_parameters(self) -> list[nn.Parameter]:
        """The learned context vectors (their own learning rate in training)."""
        return [self.prompts.ctx] if self.hand_crafted is None else []

    @property
    def device(self) -> torch.device:
        return self.q_proj.weight.device


def build_zegot(config: ZegOTConfig, *, clip: nn.Module | None = None, tokenizer=None) -> ZegOT:
    """Assemble a ZegOT model.

    Args:
        config: the model config.
        clip: an open_clip ``CLIP`` whose frozen towers to use (see ``otseg.weights.clip.load_clip``);
            None builds random towers of the config's sizes (their weights are then stored
            with the model).
        tokenizer: the open_clip tokenizer matching ``clip``.
    """
    if clip is None:
        clip, tokenizer = build_random_clip(config.vision, config.text)
    tower = TextTower(clip, tokenizer)
    h = config.head
    prompts = LearnedPrompts(
        tower,
        h.num_prompts,
        h.context_length,
        init_std=h.prompt_init_std,
        checkpointing=h.text_checkpointing,
    )
    return ZegOT(config, FrozenViT(config.vision, clip.visual), prompts)


def _build(config: ZegOTConfig, *, clip=None, tokenizer=None, text_bank=None) -> ZegOT:
    return build_zegot(config, clip=clip, tokenizer=tokenizer)  # ZegOT stores no text bank


registry.register(
    registry.ModelType(
        name="zegot",
        title="ZegOT",
        config_class=ZegOTConfig,
        build=_build,
        presets=PRESETS,
        about="Zero-shot semantic segmentation with learned text prompts and multi-prompt "
        "optimal\ntransport over CLIP's image blocks (ZegOT, OTSeg's predecessor; trained with "
        "otseg),",
        learned_prompts=True,
    )
)
