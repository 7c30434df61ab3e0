"""Training recipes: a frozen dataclass loaded from ``train/configs/<name>.toml`` plus overrides.

``load_recipe("voc-inductive", ["per_device_batch=2", "data_root=/data/VOCdevkit/VOC2012"])``.
Override values are parsed as TOML values (``lr=1e-4``, ``img_scale=[1024, 256]``,
``init_from="runs/x"``); a value that is not valid TOML is taken as a string
(``data_root=/data/voc``); ``none`` clears an optional field.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otseg.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Recipe:
    """Everything a training run needs besides the model config (named by ``preset``)."""

    name: str  # recipe name, also the default output sub-folder
    preset: str  # model preset of ``otseg.config.PRESETS`` ("voc-inductive", "tiny", ...)
    dataset: str  # reader of ``otseg.data.datasets.build_dataset``: voc | context | coco | custom
    data_root: str  # dataset root in the layout that reader documents
    train_split: str  # "trainaug" (VOC), "train" (Context), "train2017" (COCO)
    val_split: str
    iterations: int  # optimizer steps
    crop_size: int  # training crop; must equal the model's S (the head outputs S)
    img_scale: tuple[int, int]  # Resize scale before the 0.5–2.0 ratio: (2048, 512) | (520, 520)
    checkpoint_interval: int  # save every this many steps (10k; 1k for the 10k schedule)
    global_batch: int = 16  # per-device batch × processes × grad-accum steps (original 4 × 4 × 1)
    per_device_batch: int = 4  # the most images per device and micro-step (memory bound);
    # the largest value ≤ this that forms global_batch on the launched processes is used
    lr: float = 2e-4  # effective lr of every trainable parameter, as the original
    weight_decay: float = 0.01  # on all trainable parameters, norms included, as the original
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_iters: int = 1500  # linear warmup from lr·warmup_ratio
    warmup_ratio: float = 1e-6
    min_lr: float = 1e-6  # poly floor
    power: float = 0.9  # poly exponent
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    init_from: str | None = None  # weights to start from (fresh optimizer and schedule)
    init_from_iter: int | None = None  # inductive step the original ST runs started from;
    # ``init_from`` = an inductive run directory picks its checkpoint of this step
    keep_steps: tuple[int, ...] = ()  # checkpoints saved and never rotated away (a later
    # stage starts there: the inductive run's step that transductive training starts from)
    eval_every: int = 0  # evaluate every N steps (0: only at the end); the best hIoU
    # (mIoU when no class is unseen) is exported to <run>/best
    seed: int = 0
    num_workers: int = 4
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (original: fp32)
    tf32: bool = True  # CUDA fp32 matmuls/convolutions in TF32, as torch 1.10 (the original's)
    # did by default on Ampere GPUs
    sinkhorn_iters: int | None = None  # training forward only: exactly this many Sinkhorn
    # iterations, no early stop and so no host synchronisation per iteration (the original
    # rule stops after 4–9); None: the original rule. Evaluation and export keep the original.
    model: str = "otseg"  # model type to train: otseg | zegot (must match the preset's)
    text_embeddings: str | None = None  # the original's (K, N, C) fp16 .npy prompt embeddings
    # (e.g. voc12_otseg.npy): train on them as stored instead of the CLIP text tower
    clip_weights: str | None = None  # a local open_clip weights file for the frozen CLIP
    # (instead of downloading the preset's "openai" weights)
    output_dir: str = "work_dirs"
    setting: str | None = None  # override the preset's setting: inductive | transductive | fully
    unseen_classes: tuple[str, ...] = ()  # custom datasets: class names never supervised
    prompt_lr: float | None = None  # ZegOT: lr of the learned prompt vectors (None: one group)
    prompt_weight_decay: float = 0.0  # ZegOT: weight decay of the prompt vectors

    def __post_init__(self) -> None:
        for key in ("iterations", "global_batch", "per_device_batch", "checkpoint_interval"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if self.eval_every < 0 or (self.sinkhorn_iters is not None and self.sinkhorn_iters < 1):
            raise UserError("eval_every must be ≥ 0 and sinkhorn_iters ≥ 1 (or none)")
        if self.warmup_iters < 0:
            raise UserError("warmup_iters must be ≥ 0")
        if len(self.img_scale) != 2 or len(self.ratio_range) != 2:
            raise UserError("img_scale and ratio_range take two values")
        if self.setting not in (None, "inductive", "transductive", "fully"):
            raise UserError(
                f"setting must be inductive, transductive or fully, got {self.setting!r}"
            )
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise UserError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision}")

    def validate(self) -> None:
        """Checks needing more than the recipe: the transductive start point, crop = S."""
        from otseg.registry import get_preset, model_type

        preset = get_preset(self.preset)
        # OTSeg's transductive stage continues an inductive model (ZegOT's schedule is one run)
        transductive = (self.setting or preset.setting) == "transductive"
        if transductive and model_type(preset) == "otseg" and not self.init_from:
            step = ""
            if self.init_from_iter:
                step = f", which picks its checkpoint of step {self.init_from_iter}"
            raise UserError(
                f"recipe {self.name!r} is transductive: it starts from an inductive model; pass "
                f"the inductive run's folder, e.g. --init-from runs/<inductive run>{step}"
            )
        if model_type(preset) == "zegclip":
            raise UserError(
                f"recipe {self.name!r}: {self.preset!r} is a ZegCLIP preset, for the authors' "
                "released weights (zegclip:<setting>); training covers OTSeg and ZegOT (an OTSeg "
                "model also runs ZegCLIP's inference: attention='zegclip')"
            )
        if model_type(preset) != self.model:
            raise UserError(
                f"recipe {self.name!r}: preset {self.preset!r} is a {model_type(preset)} model, "
                f"but model = {self.model!r}; set model = {model_type(preset)!r}"
            )
        if self.prompt_lr is not None and self.model != "zegot":
            raise UserError(
                f"recipe {self.name!r}: prompt_lr sets ZegOT's learned-prompt learning rate, but "
                f"an {self.model} model has no learned prompts; remove prompt_lr"
            )
        if self.text_embeddings and self.model == "zegot":
            raise UserError(
                f"recipe {self.name!r}: text_embeddings are OTSeg's fixed prompt embeddings; "
                f"ZegOT learns its prompts; remove text_embeddings"
            )
        size = preset.vision.image_size
        if self.crop_size != size:
            raise UserError(f"crop_size {self.crop_size} must equal the model size {size}")
        for key in ("text_embeddings", "clip_weights"):
            path = getattr(self, key)
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"{key}: no such file: {path}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_HINTS = typing.get_type_hints(Recipe)


def _coerce(key: str, value: Any) -> Any:
    """Convert a parsed value to the type of field ``key``."""
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if optional and (
        value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
    ):
        return None
    base = next(a for a in args if a is not type(None)) if optional else hint
    origin = typing.get_origin(base)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        item = typing.get_args(base)[0]
        return tuple(_scalar(key, item, v) for v in value)
    return _scalar(key, base, value)


def _scalar(key: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true/false, got {value!r}")
        return value
    if kind is str:
        return str(value)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}: expected {kind.__name__}, got {value!r}") from None
    if kind is int and isinstance(value, float) and number != value:
        raise UserError(f"{key}: expected an integer, got {value!r}")
    return number


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` → (key, value parsed as TOML, or the raw string)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override must look like key=value, got {item!r}")
    if key not in _HINTS:
        raise UserError(f"unknown recipe field {key!r}; fields: {sorted(_HINTS)}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, _coerce(key, value)


def recipe_path(name_or_path: str | Path) -> Path:
    """``train/configs/<name>.toml`` for a recipe name, else the given file (``.toml`` optional:
    ``train/configs/voc-inductive`` works as in the README command)."""
    path = Path(name_or_path)
    if path.is_file() and path.suffix != ".toml":
        raise UserError(f"{path}: a recipe is a .toml file (see train/configs/)")
    if path.suffix != ".toml":
        with_suffix = path.with_name(path.name + ".toml")
        path = with_suffix if with_suffix.is_file() else CONFIG_DIR / f"{path.name}.toml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        raise FileNotFoundError(f"recipe not found: {path}; built-in recipes: {names}")
    return path


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """A recipe file (name of a built-in recipe or a ``.toml`` path) with ``key=value`` overrides."""
    path = recipe_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e})") from None
    data.setdefault("name", path.stem)
    unknown = set(data) - set(_HINTS)
    if unknown:
        raise UserError(f"{path}: unknown recipe fields {sorted(unknown)}")
    values = {key: _coerce(key, value) for key, value in data.items()}
    values.update(parse_override(item) for item in overrides)
    return Recipe(**values)


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """``--config NAME|PATH`` (alias ``--recipe``) and repeatable ``--set key=value``."""
    parser.add_argument(
        "--config",
        "--recipe",
        dest="recipe",
        required=True,
        help="recipe: a name of train/configs (voc-inductive, tiny, ...) or a .toml path",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field (repeatable)",
    )


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return load_recipe(args.recipe, args.overrides)
