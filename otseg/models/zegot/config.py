"""ZegOT configuration: frozen dataclasses and the named presets (``zegot-<dataset>-<setting>``).

A :class:`ZegOTConfig` shares the vocabulary/split fields, test-time constants and CLIP source
with :class:`otseg.config.OTSegConfig` (same names, same meaning); what differs is the head:
learned text prompts, MPOT over several image-tower blocks and a convolutional decoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ...config import IMAGENET_MEAN, IMAGENET_STD, SplitConfigMixin, VisionConfig
from ...data.classes import CLASS_NAMES, UNSEEN
from ...data.prompts import TEMPLATES_6
from ...errors import UserError

MPOT_LAST = ("identity", "sigmoid")
PROMPT_SOURCES = ("learned", "templates")
# The image tower of ZegOT is CLIP's own: no visual prompts.
FROZEN_VIT = VisionConfig(num_prompt_tokens=0, deep_prompt_layers=0, prompt_dropout=0.0)


@dataclass(frozen=True)
class TextConfig:
    """CLIP text tower dimensions: used to build a random tower when ``clip_model`` is None
    (tiny test models) and checked against a loaded CLIP otherwise."""

    width: int = 512  # token-embedding width = width of the learned context vectors
    layers: int = 12
    heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408  # open_clip's BPE tokenizer


@dataclass(frozen=True)
class ZegOTHeadConfig:
    """Learned prompts, MPOT and decoder."""

    num_prompts: int = 4  # N learned prompts, shared by all classes
    # "learned" (ZegOT) or "templates": the hand-crafted prompts below instead (the ablation of
    # the paper's Table 8a; the context vectors then stay fixed and unused)
    prompt_source: str = "learned"
    hand_crafted: tuple[str, ...] = TEMPLATES_6[:4]  # N templates with "{}" for the name
    context_length: int = 8  # l context vectors per prompt, in front of the class name
    prompt_init_std: float = 0.02  # N(0, std²) initialisation (CoOp)
    text_checkpointing: bool = False  # gradient checkpointing of the text blocks in training
    mpot_layers: tuple[int, ...] = (8, 9, 10, 11, 12)  # 1-based image-tower blocks in MPOT
    mpot_last: str = "identity"  # φ of the last MPOT layer: "identity" (paper) | "sigmoid"
    mpot_clamp: float = 1e-6  # the identity layer's map is clamped to ≥ this before its log
    sinkhorn_eps: float = 0.05
    sinkhorn_max_iter: int = 100
    sinkhorn_thresh: float = 1e-6
    decoder_channels: int = 64  # FPN and ASPP width
    fpn_stages: int = 4  # the blocks' maps form this many FPN stages (blocks split evenly)
    aspp_dilations: tuple[int, ...] = (1, 3, 6, 9)


@dataclass(frozen=True)
class ZegOTConfig(SplitConfigMixin):
    """Everything needed to rebuild a ZegOT model and run it the way it was trained."""

    vision: VisionConfig = FROZEN_VIT
    text: TextConfig = field(default_factory=TextConfig)
    head: ZegOTHeadConfig = field(default_factory=ZegOTHeadConfig)
    dataset: str = "voc"  # "voc" | "context" | "coco" | any name for a custom dataset
    class_names: tuple[str, ...] = CLASS_NAMES["voc"]  # training vocabulary, dataset id order
    unseen: tuple[int, ...] = UNSEEN["voc"]  # ids never supervised with their label
    setting: str = "transductive"  # "inductive" | "transductive" | "fully"
    ensemble_lambda: float = 0.8  # weight of the MPOT map Y; the decoder map gets 1 − λ
    calibration: float = 0.0  # seen-class calibration; ZegOT has none (kept for the predictor)
    resize_short: int = 512  # test-time short side (520 for Context)
    test_crop: int = 512  # slide window size
    test_stride: int = 426  # slide window stride
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    # open_clip name and pretrained tag of the frozen towers; None: random towers of the
    # config's sizes, stored with the trained weights (tiny test models).
    clip_model: str | None = "ViT-B-16-quickgelu"
    clip_pretrained: str | None = "openai"
    # Transductive schedule, as fractions of the iterations: seen-only before ``self_train_start``;
    # pseudo-labels from a frozen copy taken there until ``frozen_teacher_until`` (the current
    # model labels when the two are equal: VOC), then from the current model.
    self_train_start: float = 0.2
    frozen_teacher_until: float = 0.2

    def __post_init__(self) -> None:
        self.check_split()
        h = self.head
        if h.prompt_source not in PROMPT_SOURCES:
            raise UserError(
                f"prompt_source must be one of {PROMPT_SOURCES}, got {h.prompt_source!r}"
            )
        if h.prompt_source == "templates" and (
            len(h.hand_crafted) != h.num_prompts or any("{}" not in t for t in h.hand_crafted)
        ):
            raise UserError(
                f"prompt_source 'templates' needs num_prompts ({h.num_prompts}) templates "
                f"containing '{{}}', got {h.hand_crafted}"
            )
        if h.mpot_last not in MPOT_LAST:
            raise UserError(f"mpot_last must be one of {MPOT_LAST}, got {h.mpot_last!r}")
        bad = [i for i in h.mpot_layers if not 1 <= i <= self.vision.layers]
        if not h.mpot_layers or bad:
            raise UserError(
                f"mpot_layers must be non-empty block numbers in 1..{self.vision.layers}, "
                f"got {h.mpot_layers}"
            )
        if self.vision.layers % h.fpn_stages:
            raise UserError(
                f"{self.vision.layers} blocks do not split into {h.fpn_stages} FPN stages"
            )
        if self.vision.num_prompt_tokens:
            raise UserError("ZegOT's image tower has no visual prompts (num_prompt_tokens=0)")
        if not 0.0 <= self.self_train_start <= self.frozen_teacher_until <= 1.0:
            raise UserError("need 0 ≤ self_train_start ≤ frozen_teacher_until ≤ 1")

    @property
    def num_prompts(self) -> int:
        return self.head.num_prompts

    @property
    def templates(self) -> tuple[str, ...]:
        """Display names of the N prompts (what the predictor reports per prompt)."""
        if self.head.prompt_source == "templates":
            return self.head.hand_crafted
        return tuple(f"learned prompt {i + 1}" for i in range(self.head.num_prompts))


def _benchmark(dataset: str, setting: str) -> ZegOTConfig:
    context = dataset == "context"
    return ZegOTConfig(
        vision=dataclasses.replace(FROZEN_VIT, image_size=480 if context else 512),
        dataset=dataset,
        class_names=CLASS_NAMES[dataset],
        unseen=UNSEEN[dataset],
        setting=setting,
        resize_short=520 if context else 512,
        test_crop=480 if context else 512,
        test_stride=80 if context else 426,
        # VOC labels with the current model; Context and COCO with a copy frozen until 50 %.
        frozen_teacher_until=0.2 if dataset == "voc" else 0.5,
    )


def zegot_tiny_config(**changes) -> ZegOTConfig:
    """A tiny ZegOT with random towers (stored with the weights), for tests."""
    base = ZegOTConfig(
        vision=VisionConfig(
            image_size=64, width=64, layers=4, heads=2, embed_dim=32,
            num_prompt_tokens=0, deep_prompt_layers=0, prompt_dropout=0.0,
        ),
        text=TextConfig(width=32, layers=2, heads=2),
        head=ZegOTHeadConfig(
            num_prompts=4, context_length=2, mpot_layers=(3, 4), decoder_channels=8,
            fpn_stages=2, aspp_dilations=(1, 2),
        ),
        dataset="tiny",
        class_names=tuple(f"class{i}" for i in range(5)),
        unseen=(1, 3),
        setting="inductive",
        resize_short=64,
        test_crop=64,
        test_stride=48,
        clip_model=None,
        clip_pretrained=None,
        frozen_teacher_until=0.5,  # transductive: exercise the frozen-teacher window too
    )  # fmt: skip
    return base.replace(**changes)


PRESETS: dict[str, ZegOTConfig] = {
    f"zegot-{dataset}-{setting}": _benchmark(dataset, setting)
    for dataset in ("voc", "context", "coco")
    for setting in ("inductive", "transductive")
}
PRESETS["zegot-tiny"] = zegot_tiny_config()
