"""ONNX Runtime backend for the image tower (CPU, fp32): ``OTSegPredictor(..., backend=
"onnxruntime")``.

The prompted tower is exported once per set of weights (``otseg.inference.export_onnx``) into ``onnx/``
of the otseg cache, beside the converted original models (``$OTSEG_CACHE``, else
``$HF_HOME/otseg``, default ``~/.cache/huggingface/otseg``; ~350 MB for ViT-B/16), and run by
an ONNX Runtime session; outputs equal torch's to ~1e-6. Needs ``onnxruntime``, and ``onnx``
and ``onnxscript`` for the first export (requirements-dev.txt). Slide windows only: the export
has a fixed input size (the model's test crop).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from ..models.otseg import OTSeg
from ..nn.clip_image import ImageEmbedding
from .export_onnx import export_tower


def cache_dir() -> Path:
    from ..weights.original import cache_root

    return cache_root() / "onnx"


def tower_key(model: OTSeg, size: int) -> str:
    """Digest of the tower's configuration, input size and weights (names, shapes, values)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{model.config.vision}|{size}".encode())
    for name, value in model.image_encoder.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class OnnxTower:
    """Callable like ``model.encode_image`` on (B, 3, S, S) crops → :class:`ImageEmbedding`."""

    backend = "onnxruntime"
    precision = "fp32"

    def prepare(self, size: tuple[int, int]) -> None:
        """Nothing to do: the session exists (the same interface as the engines' towers)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(
                "backend='onnxruntime' needs onnxruntime: pip install -r requirements-dev.txt"
            ) from None

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy wait
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.size = self.session.get_inputs()[0].shape[-1]

    def __call__(self, images: torch.Tensor) -> ImageEmbedding:
        if tuple(images.shape[-2:]) != (self.size, self.size):
            raise UserError(
                f"the ONNX tower takes {self.size}×{self.size} crops, got "
                f"{tuple(images.shape[-2:])}: use mode='slide' or the torch backend"
            )
        x = images.detach().float().cpu().contiguous().numpy()
        pixels, cls = self.session.run(None, {"images": x})
        return ImageEmbedding(pixels=torch.from_numpy(pixels), cls=torch.from_numpy(cls))


def onnx_tower(model: OTSeg, size: int | None = None) -> OnnxTower:
    """The cached ONNX tower of ``model`` for ``size`` crops (default: the test crop),
    exporting it on first use."""
    size = size or model.config.test_crop
    path = cache_dir() / f"tower-{tower_key(model, size)}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            part = Path(tmp) / path.name
            export_tower(model, part, size=size)
            for extra in Path(tmp).iterdir():  # external weight files, if the exporter wrote any
                if extra != part:
                    os.replace(extra, path.parent / extra.name)
            os.replace(part, path)  # last and atomic: a crash never leaves half a model
    return OnnxTower(path)
