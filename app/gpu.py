"""The ZeroGPU boundary: the process-wide models and the only functions that run them.

On a ZeroGPU Space, ``spaces.GPU`` runs each decorated function in a worker process that holds
the GPU, pickling every argument and result on the way. So the three functions below take and
return only CPU tensors, strings and numbers; the model itself never crosses: it is looked up
by key in a module-level registry filled once at start-up, which the worker inherits. Off a
Space ``spaces.GPU`` returns the function unchanged, and without ``spaces`` nothing is wrapped.

:class:`RemoteModel` stands in for the model inside each user's ``OTSegPredictor``: it offers
what the predictor uses, forwards the expensive parts through this boundary and holds only the
key, the config and that user's text embeddings, so a whole predictor pickles into ``gr.State``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import torch
from torch import nn

from otseg.errors import UserError
from otseg.inference.engine import ImageTower, image_tower
from otseg.inference.predictor import precision_context
from otseg.models.otseg import HeadMaps
from otseg.nn.clip_image import ImageEmbedding
from otseg.nn.ensemble import PostProcessing
from otseg.nn.variants import default_attention

GPU_SECONDS = 60  # ZeroGPU time limit per call; a call is one window or up to TEXT_BATCH names
TEXT_BATCH = 16  # class names per text-tower call at most
TEXT_CACHE = 1024  # class names whose embeddings one session keeps
GPU_FUNCTIONS = ("encode_image", "embed_text", "decode")
PRECISIONS = ("fp32", "bf16")  # the demo's choices of the predictor's precisions

_MODELS: dict[str, tuple[nn.Module, str]] = {}  # key → (model on its device, precision)
_COUNTER = itertools.count()  # keys are never reused, also after unregister()
_TOWERS: dict[str, ImageTower] = {}  # key → what runs its image tower (otseg.inference.engine)


def register(model: nn.Module, precision: str = "fp32", backend: str = "auto") -> str:
    """Make ``model`` (already on its device, in eval mode) callable through this boundary.

    backend: what runs the image tower (``otseg.inference.engine.choose_backend``); an engine
    converts or loads its model for slide windows here, at start-up."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    key = f"{type(model).__name__}-{next(_COUNTER)}"
    tower = image_tower(model.eval(), backend, precision)
    tower.prepare((model.config.test_crop, model.config.test_crop))
    _MODELS[key], _TOWERS[key] = (model, precision), tower
    return key


def tower_info(key: str) -> tuple[str, str]:
    """(backend, precision) that run the image tower of the model registered as ``key``."""
    _lookup(key)
    return _TOWERS[key].backend, _TOWERS[key].precision


def unregister(key: str | None) -> None:
    """Forget a model (the comparison tab drops second models it no longer keeps); sessions
    still holding its key get a new predictor on their next comparison."""
    _MODELS.pop(key, None)
    _TOWERS.pop(key, None)


def is_registered(key: str | None) -> bool:
    return key in _MODELS


def _lookup(key: str) -> tuple[nn.Module, str]:
    if key not in _MODELS:
        raise RuntimeError(f"no model is registered as {key!r}; call app.gpu.register() first")
    return _MODELS[key]


def _on_gpu(fn):
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=GPU_SECONDS)(fn)


def _embedding_type(model: nn.Module) -> type:
    """The dataclass ``model.encode_image`` returns (ZegOT's carries every block's pixels)."""
    return getattr(model, "embedding_type", ImageEmbedding)


def _cpu(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().cpu()


@_on_gpu
def encode_image(key: str, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Image tower. windows: (B, 3, c, c) normalised crops → the embedding's tensors by field
    name: pixels (B, C, h, w), cls (B, C) (ZegOT also every block's pixels)."""
    model, _ = _lookup(key)
    with torch.inference_mode():  # the tower applies the precision
        emb = _TOWERS[key](windows.to(model.device))
    return {f.name: _cpu(getattr(emb, f.name)) for f in dataclasses.fields(emb)}


@_on_gpu
def embed_text(key: str, names: list[str]) -> torch.Tensor:
    """Text tower. K class names → (K, N, C) float32 prompt embeddings."""
    model, _ = _lookup(key)
    with torch.inference_mode():
        return _cpu(model.embed_text(list(names)).float())


@_on_gpu
def decode(
    key: str,
    embedding: dict[str, torch.Tensor],
    text: torch.Tensor,
    attention: str,
    use_mps: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The head on one window's embedding (``encode_image``'s tensors), text (K, N, C) →
    decoder map (1, K, h, w), MPS map (1, K, h, w) and per-prompt maps (1, K, N, h, w); the
    last two are None without MPS."""
    model, precision = _lookup(key)
    device = model.device
    emb = _embedding_type(model)(**{k: v.to(device) for k, v in embedding.items()})
    with torch.inference_mode(), precision_context(model.device, precision):
        maps = model.decode(emb, text.to(device), attention=attention, use_mps=bool(use_mps))
    return _cpu(maps.decoder), _cpu(maps.score), _cpu(maps.prompt_maps)


class RemoteModel(PostProcessing):
    """The model as one user's predictor sees it; every call goes through the boundary above.
    Post-processing has no weights, so it runs here, on the config."""

    def __init__(self, key: str) -> None:
        model, _ = _lookup(key)
        self.key = key
        self.config = model.config
        self.attentions = model.attentions
        self.default_attention = default_attention(model)
        self.variants = dict(getattr(model, "variants", {}))
        self._embedding = _embedding_type(model)
        self._text: dict[str, torch.Tensor] = {}  # class name → (N, C) float32, CPU

    device = torch.device("cpu")  # where the predictor keeps its caches

    def eval(self) -> RemoteModel:
        return self

    def encode_image(self, images: torch.Tensor) -> ImageEmbedding:
        return self._embedding(**encode_image(self.key, images.cpu()))

    def embed_text(self, names: Sequence[str]) -> torch.Tensor:
        """K names → (K, N, C); only names this session has not seen yet cross the boundary,
        ``TEXT_BATCH`` per call."""
        missing = [n for n in dict.fromkeys(names) if n not in self._text]
        for i in range(0, len(missing), TEXT_BATCH):
            batch = missing[i : i + TEXT_BATCH]
            self._text.update(zip(batch, embed_text(self.key, batch), strict=True))
        for old in list(self._text)[: max(0, len(self._text) - TEXT_CACHE)]:
            if old not in names:
                del self._text[old]
        return torch.stack([self._text[n] for n in names])

    def decode(
        self,
        emb: ImageEmbedding,
        text: torch.Tensor,
        *,
        attention: str = "sinkhorn",
        use_mps: bool = True,
    ) -> HeadMaps:
        fields = {f.name: getattr(emb, f.name) for f in dataclasses.fields(emb)}
        decoder, score, prompt_maps = decode(self.key, fields, text, attention, use_mps)
        return HeadMaps(
            decoder=decoder,
            score=score,
            layer_masks=[],
            queries=[],
            transports=[],
            prompt_maps=prompt_maps,
        )
