"""Builders of a training run: model config, model (with its frozen CLIP), data loaders.

Everything here is deterministic given the recipe's seed, so every process of a distributed
run (and a resumed run) builds the same model and iterates the same data order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from otseg.config import OTSegConfig, get_preset
from otseg.data.augment import EvalTransform, TrainTransform, collate
from otseg.data.datasets import build_dataset
from otseg.hub import CONFIG_NAME, WEIGHTS_NAME, load_text_bank, load_weights, read_config
from otseg.model import OTSeg, build_model
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
            raise ValueError(f"unseen_classes {unknown} are not in {recipe.data_root}/classes.txt")
        changes.update(
            dataset=Path(recipe.data_root).name or "custom",
            class_names=names,
            unseen=tuple(names.index(n) for n in recipe.unseen_classes),
        )
    setting = recipe.setting or config.setting
    if recipe.setting is not None:
        changes.update(setting=setting, calibration=0.0 if setting == "transductive" else 0.1)
    if setting == "fully":
        changes["unseen"] = ()
    elif not changes.get("unseen", config.unseen):
        raise ValueError(f"the {setting} setting needs unseen classes (set unseen_classes)")
    return config.replace(**changes) if changes else config


def random_text_bank(config: OTSegConfig, seed: int) -> dict[str, torch.Tensor]:
    """Class name → (N, C) random unit vectors: the stored vocabulary of a model without a
    text tower (``clip_model=None``, the tiny preset). Distinct per class, fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    n, c = config.num_prompts, config.vision.embed_dim
    return {
        name: F.normalize(torch.randn(n, c, generator=g), dim=-1) for name in config.class_names
    }


def resolve_init(path: str | Path) -> Path:
    """An otseg model directory from ``init_from``: the directory itself, a checkpoint (its
    ``model/``), or a run directory (its export ``model/`` or its newest complete checkpoint)."""
    from train.checkpoint import latest_checkpoint

    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    latest = latest_checkpoint(path / "checkpoints") if path.is_dir() else None
    if latest is not None:
        return latest / "model"
    raise FileNotFoundError(
        f"init_from {str(path)!r}: no otseg model (config.json + model.safetensors), checkpoint "
        f"or run directory with checkpoints there"
    )


def build_training_model(recipe: Recipe, config: OTSegConfig) -> OTSeg:
    """The model to train: frozen CLIP (``load_clip``) or the config's random frozen tower,
    fresh prompts and decoder, or the weights of ``recipe.init_from`` (weights only)."""
    torch.manual_seed(recipe.seed)
    source = resolve_init(recipe.init_from) if recipe.init_from else None
    if config.clip_model is None:
        bank = random_text_bank(config, recipe.seed)
        if source is not None:
            _, info = read_config(source / CONFIG_NAME)
            if info.get("text_embeddings"):
                bank = load_text_bank(source / info["text_embeddings"])
        model = build_model(config, text_bank=bank)
    else:
        from otseg.hub import load_clip

        clip, tokenizer = load_clip(config.clip_model, config.clip_pretrained)
        model = build_model(config, clip=clip, tokenizer=tokenizer)
    if source is not None:
        from safetensors.torch import load_file

        src_config, _ = read_config(source / CONFIG_NAME)
        if src_config.vision != config.vision:
            raise ValueError(f"init_from {source}: image tower {src_config.vision} differs")
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
    with torch.random.fork_rng(devices=[]):
        out = model(torch.zeros(1, 3, s, s, device=model.device), model.training_text.detach())
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


def build_train_loader(recipe: Recipe, config: OTSegConfig) -> DataLoader:
    """Augmented training crops, ``per_device_batch`` per step, the last partial
    batch dropped. The loader's own generator keeps iterator creation off the global RNG."""
    transform = TrainTransform.for_config(
        config, recipe.img_scale, ratio_range=recipe.ratio_range, cat_max_ratio=recipe.cat_max_ratio
    )
    dataset = build_dataset(
        recipe.dataset, recipe.data_root, recipe.train_split, transform, seed=recipe.seed
    )
    if len(dataset) < recipe.per_device_batch:
        raise ValueError(
            f"{len(dataset)} training images < per-device batch {recipe.per_device_batch}"
        )
    return DataLoader(
        dataset,
        batch_size=recipe.per_device_batch,
        sampler=EpochSampler(len(dataset), recipe.seed),
        drop_last=True,
        collate_fn=collate,
        num_workers=recipe.num_workers,
        generator=torch.Generator().manual_seed(recipe.seed),
    )


def build_eval_loader(
    dataset: str, root: str | Path, split: str, config: OTSegConfig, num_workers: int = 0
) -> DataLoader:
    """One test-scale image per batch (sizes differ), labels at the original size."""
    data = build_dataset(dataset, root, split, EvalTransform.for_config(config))
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


def describe_model(model: OTSeg) -> str:
    """Parameter counts: trainable (in the optimizer) vs frozen."""
    trainable = sum(p.numel() for p in model.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable / 1e6:.2f}M trainable parameters, {(total - trainable) / 1e6:.2f}M frozen"


def dump_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
