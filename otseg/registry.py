"""The model registry: type name → config class, builder and named presets.

Each model module registers itself when imported (``otseg.models`` imports them all), so the
code that saves, loads, converts or trains a model finds its type here and never imports a model
by name. ``otseg/__init__`` imports ``otseg.models``, so the registry is full whenever any part
of the package is in use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class ModelType:
    """One registered kind of model."""

    name: str  # written as "model" into a saved directory's config.json
    title: str  # how people name it ("OTSeg", "ZegOT")
    config_class: type  # has from_dict() / to_dict()
    build: Callable[..., Any]  # build(config, *, clip=None, tokenizer=None, text_bank=None)
    presets: Mapping[str, Any] = field(default_factory=dict)  # preset name → config
    about: str = ""  # one sentence for model cards
    learned_prompts: bool = False  # prompts are trained weights, not filled-in templates


_TYPES: dict[str, ModelType] = {}


def register(kind: ModelType) -> ModelType:
    """Add a model type; registering the same name twice with another config class is a bug."""
    old = _TYPES.get(kind.name)
    if old is not None and old.config_class is not kind.config_class:
        raise ValueError(f"model type {kind.name!r} is already registered")
    _TYPES[kind.name] = kind
    return kind


def names() -> tuple[str, ...]:
    """Registered type names, in registration order."""
    return tuple(_TYPES)


def get(name: str) -> ModelType:
    """The registered type ``name``; a :class:`UserError` listing the known ones otherwise."""
    try:
        return _TYPES[name]
    except KeyError:
        raise UserError(f"unknown model type {name!r}; known: {', '.join(_TYPES)}") from None


def type_of(model_or_config: Any) -> ModelType:
    """The type of a model, a config, or anything carrying a ``config`` (the demo's remote model,
    training-free CLIP, which is OTSeg's head): the most derived registered config class that
    the config is an instance of. A TypeError for anything else (e.g. a DDP-wrapped model:
    unwrap it first)."""
    config = getattr(model_or_config, "config", model_or_config)
    matches = [t for t in _TYPES.values() if isinstance(config, t.config_class)]
    if not matches:
        raise TypeError(
            f"expected a model or config of a registered type ({', '.join(_TYPES)}), "
            f"got {type(model_or_config).__name__}"
        )
    return max(matches, key=lambda t: len(t.config_class.__mro__))


def model_type(model_or_config: Any) -> str:
    """The registered type name (``"otseg"``, ``"zegot"``, ...) of a model or config."""
    return type_of(model_or_config).name


def build(config: Any, **kwargs: Any) -> Any:
    """Build the model of ``config``'s type (``clip``, ``tokenizer``, ``text_bank``: see the
    type's builder; a builder ignores what its model does not take)."""
    return type_of(config).build(config, **kwargs)


def presets() -> dict[str, Any]:
    """Every registered preset, by name."""
    return {name: cfg for t in _TYPES.values() for name, cfg in t.presets.items()}


def get_preset(name: str) -> Any:
    """A named preset of any registered type: ``{voc,context,coco}-{inductive,transductive,
    fully}`` or ``tiny`` (OTSeg), ``zegot-{voc,context,coco}-{inductive,transductive}`` or
    ``zegot-tiny`` (ZegOT), ..."""
    known = presets()
    try:
        return known[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose from {sorted(known)}") from None
