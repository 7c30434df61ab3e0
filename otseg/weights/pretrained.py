"""Hub I/O methods shared by the model classes (OTSeg, ZegOT); the work is in :mod:`otseg.weights.hub`,
imported on call because it imports the models itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self


class Pretrained:
    """``save_pretrained``, ``push_to_hub`` and ``from_pretrained`` for a model class."""

    def save_pretrained(self, directory: str | Path, *, card: dict | None = None) -> Path:
        """Write config.json, model.safetensors, stored text embeddings and a model card."""
        from .hub import save_pretrained

        return save_pretrained(self, directory, card=card)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, repo_or_dir: str | Path, **kwargs: Any) -> Self:
        """Load from a local directory, a Hub repo id (cache first; works offline) or
        ``original:<setting>``; a TypeError if it holds another kind of model
        (``otseg.from_pretrained`` loads any kind)."""
        from .hub import from_pretrained

        model = from_pretrained(repo_or_dir, **kwargs)
        if not isinstance(model, cls):
            raise TypeError(
                f"{repo_or_dir} holds a model of type {type(model).__name__}, not {cls.__name__}; "
                "load it with otseg.from_pretrained"
            )
        return model
