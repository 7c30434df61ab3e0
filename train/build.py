"""Builders of a training run: model config, model (with its frozen CLIP), data loaders.

Everything here is deterministic given the recipe's seed, so every process of a distributed
run (and a resumed run) builds the same model and iterates the same data order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from otseg.config import OTSegConfig
from otseg.data.augment import EvalTransform, TrainTransform, collate
from otseg.data.datasets import TEST_MAX_LONG, build_dataset, check_label_values
from otseg.errors import UserError
from otseg.models.otseg import OTSeg, build_model
from otseg.models.zegot import build_zegot
from otseg.registry import get_preset, model_type
from otseg.weights.hub import CONFIG_NAME, WEIGHTS_NAME
from otseg.weights.store import load_text_bank, load_weights, read_config
from train.recipe import Recipe


def read_class_file(path: Path) -> tuple[str, ...]:
    """One class name per line (blank lines skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path} (one class name per line)")
    return tuple(n.strip() for n in path.read_text().splitlines() if n.strip())


def build_config(recipe: Recipe) -> OTSegConfig:
    """The model config: the recipe's preset, its setting override and, for a custom dataset,
    the dataset's class names (``<data_root>/classes.txt``) and ``unseen_classes``."""
    config = get_preset(recipe.preset)
    changes: dict = {}
    if recipe.dataset == "custom":
        names = read_class_file(Path(recipe.data_root) / "classes.txt")
        unknown = sorted(set(recipe.unseen_classes) - set(names))
        if unknown:
            raise UserError(f"unseen_classes {unknown} are not in {recipe.data_root}/classes.txt")
        changes.update(
            dataset=Path(recipe.data_root).name or "custom",
            class_names=names,
            unseen=tuple(names.index(n) for n in recipe.unseen_classes),
        )
    setting = recipe.setting or config.setting
    if recipe.setting is not None:
        changes["setting"] = setting
        if isinstance(config, OTSegConfig):  # ZegOT has no seen-class calibration
            changes["calibration"] = 0.0 if setting == "transductive" else 0.1
    if setting == "fully":
        changes["unseen"] = ()
    elif not changes.get("unseen", config.unseen):
        raise UserError(f"the {setting} setting needs unseen classes (set unseen_classes)")
    return config.replace(**changes) if changes else config


def random_text_bank(config: OTSegConfig, seed: int) -> dict[str, torch.Tensor]:
    """Class name → (N, C) random unit vectors: the stored vocabulary of a model without a
    text tower (``clip_model=None``, the tiny preset). Distinct per class, fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    n, c = config.num_prompts, config.vision.embed_dim
    return {
        name: F.normalize(torch.randn(n, c, generator=g), dim=-1) for name in config.class_names
    }


def _is_model_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def resolve_init(path: str | Path, step: int | None = None) -> Path:
    """An otseg model directory from ``init_from``: a model directory itself, a checkpoint (its
    ``model/``), or a run directory: its checkpoint of ``step`` (the inductive step the protocol
    starts from) or, without a step, its only candidate; several candidates are refused."""
    from train.checkpoint import META, checkpoint_dir, complete_checkpoints

    path = Path(path)
    if not path.exists():  # local only: never a Hub id
        raise UserError(
            f"init_from {path}: no such directory; give the run, checkpoint or model directory "
            "of the inductive training (train.train --output-dir) to start from"
        )
    if _is_model_dir(path):
        return path
    if (path / META).is_file() and _is_model_dir(path / "model"):
        return path / "model"
    found = complete_checkpoints(path / "checkpoints")
    steps = [int(p.name.rsplit("_", 1)[1]) for p in found]
    if step is not None and (found or _is_model_dir(path / "model")):
        wanted = checkpoint_dir(path / "checkpoints", step)
        if wanted in found:
            return wanted / "model"
        raise FileNotFoundError(
            f"init_from {path}: the protocol starts from the inductive checkpoint of step {step}, "
            f"but {wanted} does not exist (checkpoints of steps {steps}); pass a model or "
            f"checkpoint directory explicitly"
        )
    candidates = found + ([path] if _is_model_dir(path / "model") else [])
    if len(candidates) == 1:
        return candidates[0] / "model"
    if candidates:
        raise UserError(
            f"init_from {path} is ambiguous: a run directory with a final model and checkpoints "
            f"of steps {steps}; pass one of them, e.g. {path / 'model'} or {found[-1]}"
        )
    raise FileNotFoundError(
        f"init_from {str(path)!r}: no otseg model (config.json + model.safetensors), checkpoint "
        f"or run directory with checkpoints there"
    )


def init_facts(recipe: Recipe, source: Path | None) -> dict[str, Any]:
    """What ``recipe.init_from`` resolved to, for the log, ``recipe.json`` and the model card:
    ``init_from_resolved`` (absolute model directory) and ``init_from_step`` (the step of the
    checkpoint or of the exported run, None when unknown); empty without ``init_from``."""
    from train.checkpoint import META

    if source is None:
        return {}
    step = None
    if (source.parent / META).is_file():  # a checkpoint's model
        step = json.loads((source.parent / META).read_text()).get("step")
    else:  # an exported model: its card's steps
        _, info = read_config(source / CONFIG_NAME)
        step = (info.get("card") or {}).get("training", {}).get("steps")
    return {"init_from_resolved": str(source.resolve()), "init_from_step": step}


def load_frozen_clip(config: OTSegConfig, weights: str | None = None):
    """The frozen open_clip model and tokenizer of ``config`` (weights from a local file when
    given), with an actionable error when the weights are neither cached nor downloadable."""
    from otseg.errors import WeightsNotFoundError
    from otseg.weights.clip import load_clip

    pretrained = weights or config.clip_pretrained
    try:
        return load_clip(config.clip_model, pretrained)
    except WeightsNotFoundError as e:
        raise WeightsNotFoundError(
            f"cannot load the frozen CLIP {config.clip_model} ({pretrained}): {e}. Run once "
            f"with network access (the weights are then cached), or point training at a local "
            f"open_clip weights file: --set clip_weights=/path/open_clip_pytorch_model.bin"
        ) from None


def training_text_bank(
    recipe: Recipe, config: OTSegConfig, source: Path | None
) -> dict[str, torch.Tensor] | None:
    """Stored prompt embeddings to train with: the recipe's original ``.npy`` (as stored, fp16),
    else those stored with the ``init_from`` model (a converted original checkpoint keeps
    its embeddings), else random ones for a model without a text tower; None: CLIP's tower."""
    if recipe.text_embeddings:
        from otseg.weights.convert import read_text_embeddings

        return read_text_embeddings(recipe.text_embeddings, config)
    if source is not None:
        _, info = read_config(source / CONFIG_NAME)
        if info.get("text_embeddings"):
            return load_text_bank(source / info["text_embeddings"])
    return random_text_bank(config, recipe.seed) if config.clip_model is None else None


def init_source(recipe: Recipe) -> Path | None:
    """The model directory ``recipe.init_from`` resolves to (:func:`resolve_init`), or None."""
    return resolve_init(recipe.init_from, recipe.init_from_iter) if recipe.init_from else None


def build_training_model(
    recipe: Recipe, config: OTSegConfig, *, source: Path | None = None
) -> OTSeg:
    """The model to train: frozen CLIP (``load_clip``) or the config's random frozen tower,
    fresh prompts and decoder, or the weights of ``recipe.init_from`` (weights only).

    source: the model directory ``recipe.init_from`` resolved to (:func:`init_source`);
    resolved here when not given.
    """
    torch.manual_seed(recipe.seed)
    if source is None:
        source = init_source(recipe)
    if model_type(config) == "zegot":  # random towers when clip_model is None
        clip = tokenizer = None
        if config.clip_model is not None:
            clip, tokenizer = load_frozen_clip(config, recipe.clip_weights)
        model = build_zegot(config, clip=clip, tokenizer=tokenizer)
    elif config.clip_model is None:
        model = build_model(config, text_bank=training_text_bank(recipe, config, source))
    else:
        clip, tokenizer = load_frozen_clip(config, recipe.clip_weights)
        bank = training_text_bank(recipe, config, source)
        model = build_model(config, clip=clip, tokenizer=tokenizer, text_bank=bank)
    if source is not None:
        from safetensors.torch import load_file

        src_config, _ = read_config(source / CONFIG_NAME)
        if src_config.vision != config.vision:
            raise UserError(f"init_from {source}: image tower {src_config.vision} differs")
        load_weights(model, load_file(str(source / WEIGHTS_NAME)), str(source))
    return model


def freeze_unreached(model: OTSeg) -> list[str]:
    """Freeze the trainable parameters that no training map depends on and return their names.

    The last decoder layer's updated queries are never used (only its mask is), so its value,
    output projection, FFN and norms get no gradient; the original keeps them in AdamW, which
    skips parameters without a gradient, so leaving them out changes nothing. Without them every
    trainable parameter gets a gradient and DDP needs no unused-parameter search. Found with one
    forward/backward pass on a blank crop (global RNG untouched).
    """
    s = model.config.vision.image_size
    with torch.random.fork_rng(devices=[]):  # ZegOT's training_text carries prompt gradients
        out = model(torch.zeros(1, 3, s, s, device=model.device), model.training_text)
        maps = [m for m in (out.decoder_map, out.score_map) if m is not None]
        torch.stack([m.float().sum() for m in maps]).sum().backward()
    unreached = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        p.grad = None
        if name in unreached:
            p.requires_grad_(False)
    return unreached


class EpochSampler(Sampler[int]):
    """A permutation of the dataset per epoch from ``default_rng([seed, epoch])``: identical on
    every process and after a resume, independent of any global RNG."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist())


LABEL_SAMPLE = 100  # label files per split read at start (all with --check-all-labels)


def require_data_root(recipe: Recipe) -> Path:
    """The recipe's dataset root, or an error saying how to get it."""
    root = Path(recipe.data_root)
    if not root.exists():
        raise FileNotFoundError(
            f"dataset root not found: {root} (pass --data-root; for the tiny presets write the"
            f" synthetic data first: python -m otseg.data.synthetic {root})"
        )
    return root


def check_labels(
    recipe: Recipe, *, evaluate: bool = True, all_files: bool = False
) -> dict[str, tuple[int, int]]:
    """Check the label values of the training split, and of the validation split when it will
    be evaluated (:func:`otseg.data.datasets.check_label_values`: a value that is no class id
    stops the run naming the file, the value and the conversion probably missed).

    A built-in dataset's labels are sampled (``LABEL_SAMPLE`` files per split, spread over
    it); a custom dataset's, or with ``all_files``, every file is read.
    Returns split → (files read, files in the split).
    """
    require_data_root(recipe)
    splits = (recipe.train_split, recipe.val_split) if evaluate else (recipe.train_split,)
    limit = None if all_files or recipe.dataset == "custom" else LABEL_SAMPLE
    read = {}
    for split in dict.fromkeys(splits):
        dataset = build_dataset(recipe.dataset, recipe.data_root, split)
        read[split] = (check_label_values(dataset, limit), len(dataset))
    return read


def build_train_loader(
    recipe: Recipe, config: OTSegConfig, per_device_batch: int, *, pin_memory: bool = False
) -> DataLoader:
    """Augmented training crops, ``per_device_batch`` per step, the last partial
    batch dropped. The loader's own generator keeps iterator creation off the global RNG."""
    require_data_root(recipe)
    transform = TrainTransform.for_config(
        config, recipe.img_scale, ratio_range=recipe.ratio_range, cat_max_ratio=recipe.cat_max_ratio
    )
    dataset = build_dataset(
        recipe.dataset, recipe.data_root, recipe.train_split, transform, seed=recipe.seed
    )
    if len(dataset) < per_device_batch:
        raise UserError(f"{len(dataset)} training images < per-device batch {per_device_batch}")
    return DataLoader(
        dataset,
        batch_size=per_device_batch,
        pin_memory=pin_memory,
        sampler=EpochSampler(len(dataset), recipe.seed),
        drop_last=True,
        collate_fn=collate,
        num_workers=recipe.num_workers,
        generator=torch.Generator().manual_seed(recipe.seed),
    )


def build_eval_loader(
    dataset: str, root: str | Path, split: str, config: OTSegConfig, num_workers: int = 0
) -> DataLoader:
    """One test-scale image per batch (sizes differ), labels at the original size; the
    dataset's test resize (the short side, and ADE20K's long-side cap: ``TEST_MAX_LONG``)."""
    transform = EvalTransform.for_config(config, max_long=TEST_MAX_LONG.get(dataset))
    data = build_dataset(dataset, root, split, transform)
    return DataLoader(data, batch_size=1, collate_fn=collate, num_workers=num_workers)


def set_epoch(loader: DataLoader, sampler: EpochSampler, epoch: int) -> None:
    """Select the shuffle order and the augmentation stream of pass ``epoch``.

    ``sampler`` is the :class:`EpochSampler` the loader was built with. An Accelerate loader
    re-applies its own epoch counter at every ``iter()`` (``skip_first_batches`` copies it), so
    that counter is set too, or a resumed run would replay epoch 0.
    """
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    sampler.set_epoch(epoch)


def use_tf32(device: torch.device, enabled: bool = True) -> None:
    """TF32 matmuls and convolutions on CUDA, as the original's torch 1.10 did by default on
    Ampere and newer GPUs; a no-op elsewhere."""
    if device.type == "cuda" and enabled:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def describe_model(model: OTSeg) -> str:
    """Parameter counts: trainable (in the optimizer) vs frozen."""
    trainable = sum(p.numel() for p in model.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable / 1e6:.2f}M trainable parameters, {(total - trainable) / 1e6:.2f}M frozen"


def dump_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))


def check_distributed(num_processes: int) -> None:
    """Stop when the launcher started several processes that Accelerate does not connect (each
    would train alone on the full batch, with no gradient synchronisation)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if num_processes != world:
        raise SystemExit(
            f"error: launched as {world} processes (WORLD_SIZE={world}) but Accelerate runs "
            f"{num_processes} process: gradients would not be synchronised. Without GPUs, use "
            f"`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {world} -m train.train ...` or pass "
            f"--cpu; note `accelerate launch --cpu --num_processes N` starts only one process."
        )
