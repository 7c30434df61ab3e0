"""The model directory format: what is written where, and how a directory becomes a model.

A model directory (local or a Hub repo) holds:
    config.json                   {"format": "otseg", "model": <registered type>, "config": ...}
    model.safetensors             trained weights (prompts, their projection and norm, decoder);
                                  the frozen image tower too when config.clip_model is None
    text_embeddings.safetensors   optional stored prompt embeddings (K, N, C) + class names
    README.md                     model card
The frozen CLIP towers are loaded through open_clip from ``config.clip_model``. The model class
comes from :mod:`otseg.registry`, by the type name config.json gives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .. import registry
from ..errors import CheckpointError
from .clip import load_clip
from .hub import CONFIG_NAME, TEXT_NAME, WEIGHTS_NAME, locate_model, resolve_file
from .model_card import render_model_card

FORMAT = "otseg"
FORMAT_VERSION = 1


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    *,
    card: dict[str, Any] | None = None,
) -> Path:
    """Write the model directory (see module docstring). ``card``: extra model-card facts
    (e.g. ``{"metrics": {...}, "training": {...}}``), also stored in config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.trained_state_dict().items()}
    _atomic(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    bank = getattr(getattr(model, "text", None), "bank", None)  # OTSeg's stored embeddings
    if bank:
        names = list(bank)
        emb = torch.stack([bank[n] for n in names]).contiguous()
        meta = {"class_names": json.dumps(names), "templates": json.dumps(model.config.templates)}
        _atomic(
            directory / TEXT_NAME, lambda p: save_file({"embeddings": emb}, str(p), metadata=meta)
        )
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": registry.model_type(model),
        "config": model.config.to_dict(),
        "text_embeddings": TEXT_NAME if bank else None,
        "card": card or {},
    }
    _atomic(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(info, indent=2)))
    (directory / "README.md").write_text(render_model_card(model.config, card or {}, bool(bank)))
    return directory


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def read_config(path: Path) -> tuple[Any, dict[str, Any]]:
    """The config (of the type config.json names) and the whole config.json."""
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if info.get("format") != FORMAT:
        raise CheckpointError(
            f'{path} is not an otseg config (no "format": "otseg"); original OTSeg '
            f"checkpoints must first be converted with `otseg convert`"
        )
    kind = info.get("model", "otseg")  # directories written before ZegOT say nothing
    if kind not in registry.names():
        raise CheckpointError(
            f'{path}: unknown "model": {kind!r}; expected one of {registry.names()}'
        )
    return registry.get(kind).config_class.from_dict(info["config"]), info


def load_text_bank(path: Path) -> dict[str, torch.Tensor]:
    """Stored prompt embeddings by class name, each (N, C)."""
    with safe_open(str(path), framework="pt") as f:
        names = json.loads(f.metadata()["class_names"])
        emb = f.get_tensor("embeddings")
    if emb.shape[0] != len(names):
        raise CheckpointError(f"{path}: {emb.shape[0]} embeddings for {len(names)} class names")
    return {n: emb[i] for i, n in enumerate(names)}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load trained weights strictly: every expected key present with its shape, nothing extra."""
    expected = model.trained_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        lines = [f"{source} does not match the model config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                lines.append(
                    f"  {title} ({len(items)}): "
                    + ", ".join(items[:6])
                    + (" ..." if len(items) > 6 else "")
                )
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=False)


def load_directory(
    repo_or_dir: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
) -> nn.Module:
    """Build and load the model a directory or Hub repo holds (its type from config.json), in
    eval mode on the CPU."""
    repo_or_dir = locate_model(repo_or_dir)
    kw = {"revision": revision, "cache_dir": cache_dir, "token": token}
    config, info = read_config(resolve_file(repo_or_dir, CONFIG_NAME, **kw))
    weights = resolve_file(repo_or_dir, WEIGHTS_NAME, **kw)
    bank = None
    if info.get("text_embeddings"):
        bank = load_text_bank(resolve_file(repo_or_dir, info["text_embeddings"], **kw))
    clip = tokenizer = None
    if config.clip_model is not None:
        clip, tokenizer = load_clip(config.clip_model, config.clip_pretrained, cache_dir=cache_dir)
    model = registry.build(config, clip=clip, tokenizer=tokenizer, text_bank=bank)
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e})") from None
    load_weights(model, state, str(weights))
    model.card = info.get("card", {})
    return model.eval()
