"""Model configuration: small frozen dataclasses and the named presets of the paper.

A config fully describes a model: architecture, vocabulary it was trained on, zero-shot split,
inference constants and where the frozen CLIP weights come from. It round-trips through JSON
(``to_dict`` / ``from_dict``) and is stored as ``config.json`` beside the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .data.classes import CLASS_NAMES, UNSEEN
from .data.prompts import TEMPLATES_6, TEMPLATES_8
from .errors import UserError

SETTINGS = ("inductive", "transductive", "fully")
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT image tower with deep visual prompts (VPT)."""

    image_size: int = 512  # S: model resolution; position grid is S/patch_size square
    patch_size: int = 16
    width: int = 768  # transformer width
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512  # C: output projection = text dim = decoder dim
    num_prompt_tokens: int = 10  # P (100 for COCO)
    deep_prompt_layers: int = 11  # prompt sets replaced before blocks 1..deep_prompt_layers
    prompt_dropout: float = 0.1  # train only

    def __post_init__(self) -> None:
        if self.deep_prompt_layers not in (0, self.layers - 1):
            raise UserError(
                f"deep_prompt_layers must be 0 or layers − 1 = {self.layers - 1} (a prompt set "
                f"before every block), got {self.deep_prompt_layers}"
            )


@dataclass(frozen=True)
class HeadConfig:
    """Relationship descriptor, decoder with MPSA, MPS path and Sinkhorn constants."""

    num_layers: int = 3
    ffn_dim: int = 2048
    dropout: float = 0.1  # decoder dropouts, train only
    attn_dropout: float = 0.1  # dropout on the transport plan / softmax weights, train only
    softmax_heads: int = 8  # heads of the ZegCLIP softmax attention variant
    sinkhorn_eps: float = 0.05
    sinkhorn_max_iter: int = 100
    sinkhorn_thresh: float = 1e-6


class SplitConfigMixin:
    """What every model config of the family shares: the zero-shot split of its vocabulary and
    the JSON round trip. Needs the fields ``class_names``, ``unseen`` and ``setting``."""

    @property
    def seen(self) -> tuple[int, ...]:
        """Seen (base) class ids, ascending; all classes when fully supervised."""
        if self.setting == "fully":
            return tuple(range(len(self.class_names)))
        unseen = set(self.unseen)
        return tuple(i for i in range(len(self.class_names)) if i not in unseen)

    @property
    def training_class_ids(self) -> tuple[int, ...]:
        """Rows of the text embeddings used in training (``t[base_class]`` when inductive)."""
        if self.setting == "inductive":
            return self.seen
        return tuple(range(len(self.class_names)))

    @property
    def training_class_names(self) -> tuple[str, ...]:
        """The names of :attr:`training_class_ids`, in that order."""
        return tuple(self.class_names[i] for i in self.training_class_ids)

    def check_split(self) -> None:
        if self.setting not in SETTINGS:
            raise UserError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        k = len(self.class_names)
        bad = [i for i in self.unseen if not 0 <= i < k]
        if bad:
            raise UserError(f"unseen ids {bad} out of range for {k} classes")

    def replace(self, **changes: Any):
        """A copy with top-level fields changed; nested config fields accept dicts of changes."""
        for key, value in changes.items():
            if isinstance(value, dict) and dataclasses.is_dataclass(getattr(self, key, None)):
                changes[key] = dataclasses.replace(getattr(self, key), **value)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Inverse of :meth:`to_dict` (JSON lists become tuples, nested dicts their configs)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(fields)
        if unknown:
            raise UserError(f"unknown config fields: {sorted(unknown)}")
        defaults = cls()
        out = {}
        for key, value in data.items():
            default = getattr(defaults, key)
            if dataclasses.is_dataclass(default) and isinstance(value, dict):
                value = type(default)(**{k: _tuples(v) for k, v in value.items()})
            out[key] = _tuples(value)
        return cls(**out)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@dataclass(frozen=True)
class OTSegConfig(SplitConfigMixin):
    """Everything needed to rebuild a model and run it the way it was trained."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    dataset: str = "voc"  # "voc" | "context" | "coco" | any name for a custom dataset
    class_names: tuple[str, ...] = CLASS_NAMES["voc"]  # training vocabulary, dataset id order
    unseen: tuple[int, ...] = UNSEEN["voc"]  # ids never supervised with their label
    setting: str = "inductive"  # "inductive" | "transductive" | "fully"
    templates: tuple[str, ...] = TEMPLATES_6  # N prompt templates per class
    ensemble_lambda: float = 0.5  # weight of the MPS map in the ensemble (decoder gets 1 − λ)
    calibration: float = 0.1  # subtracted from σ(ensemble) of seen classes (0 when transductive)
    resize_short: int = 512  # test-time short side (520 for Context)
    test_crop: int = 512  # slide window size
    test_stride: int = 426  # slide window stride
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # ImageNet stats, as the original
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    # Frozen CLIP towers: an open_clip model name ("ViT-B-16-quickgelu", "hf-hub:org/repo",
    # "local-dir:/path") and pretrained tag/file. None: the frozen image tower is stored with
    # the trained weights and there is no text tower (vocabulary limited to stored embeddings).
    clip_model: str | None = "ViT-B-16-quickgelu"
    clip_pretrained: str | None = "openai"

    def __post_init__(self) -> None:
        self.check_split()
        if not self.templates or any("{}" not in t for t in self.templates):
            raise UserError("templates must be non-empty strings containing '{}'")

    @property
    def num_prompts(self) -> int:
        return len(self.templates)


def _benchmark(dataset: str, setting: str) -> OTSegConfig:
    context = dataset == "context"
    vision = VisionConfig(
        image_size=480 if context else 512,
        num_prompt_tokens=100 if dataset == "coco" else 10,
    )
    crop, stride = (480, 80) if context else (512, 426)
    if context and setting == "transductive":
        crop = 420  # the original tests Context ST with 420 crops on a 480 model
    return OTSegConfig(
        vision=vision,
        dataset=dataset,
        class_names=CLASS_NAMES[dataset],
        unseen=() if setting == "fully" else UNSEEN[dataset],
        setting=setting,
        templates=TEMPLATES_6 if dataset == "voc" else TEMPLATES_8,
        calibration=0.0 if setting == "transductive" else 0.1,
        resize_short=520 if context else 512,
        test_crop=crop,
        test_stride=stride,
    )


def tiny_config(**changes: Any) -> OTSegConfig:
    """A 0.2M-parameter model with the real structure, for tests (the parity fixtures' sizes)."""
    base = OTSegConfig(
        vision=VisionConfig(
            image_size=64, width=64, layers=2, heads=2, embed_dim=32,
            num_prompt_tokens=2, deep_prompt_layers=1,
        ),
        head=HeadConfig(ffn_dim=128),
        dataset="tiny",
        class_names=tuple(f"class{i}" for i in range(5)),
        unseen=(1, 3),
        templates=TEMPLATES_6[:3],
        resize_short=64,
        test_crop=64,
        test_stride=48,
        clip_model=None,
        clip_pretrained=None,
    )  # fmt: skip
    return base.replace(**changes)


PRESETS: dict[str, OTSegConfig] = {
    f"{dataset}-{setting}": _benchmark(dataset, setting)
    for dataset in ("voc", "context", "coco")
    for setting in SETTINGS
}
PRESETS["tiny"] = tiny_config()
