"""Loading any model by reference, and the ``save_pretrained`` / ``push_to_hub`` /
``from_pretrained`` methods every model class inherits.

A reference is a local model directory, a Hub repo id (cache first; works offline) or a released
checkpoint's name (``original:<setting>``, ``zegclip:<setting>``: downloaded, converted and
cached on first use).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

from .. import progress
from .convert import cached
from .hub import upload_folder
from .original import RELEASED_PREFIXES
from .store import load_directory, save_pretrained


def from_pretrained(
    repo_or_dir: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Load a model (its type as its config.json says) from a local directory, a Hub repo id
    (cache first; offline-friendly), ``original:<setting>`` or ``zegclip:<setting>`` (the
    authors' OTSeg or ZegCLIP checkpoint, downloaded and converted on first use), in eval
    mode."""
    if str(repo_or_dir).startswith(RELEASED_PREFIXES):
        repo_or_dir = cached(str(repo_or_dir))
    progress.report("Loading the model (CLIP and the trained weights)")
    model = load_directory(repo_or_dir, revision=revision, cache_dir=cache_dir, token=token)
    return model.to(device) if device is not None else model


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    card: dict[str, Any] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload OTSeg model",
) -> str:
    """Save to a temporary directory and upload it as a model repo; returns the commit URL."""
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, card=card)
        return upload_folder(
            tmp, repo_id, private=private, token=token, commit_message=commit_message
        )


class Pretrained:
    """``save_pretrained``, ``push_to_hub`` and ``from_pretrained`` for a model class."""

    def save_pretrained(self, directory: str | Path, *, card: dict | None = None) -> Path:
        """Write config.json, model.safetensors, stored text embeddings and a model card."""
        return save_pretrained(self, directory, card=card)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, repo_or_dir: str | Path, **kwargs: Any) -> Self:
        """Load from a local directory, a Hub repo id (cache first; works offline) or
        ``original:<setting>``; a TypeError if it holds another kind of model
        (``otseg.from_pretrained`` loads any kind)."""
        model = from_pretrained(repo_or_dir, **kwargs)
        if not isinstance(model, cls):
            raise TypeError(
                f"{repo_or_dir} holds a model of type {type(model).__name__}, not {cls.__name__}; "
                "load it with otseg.from_pretrained"
            )
        return model
