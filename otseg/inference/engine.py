"""Image-tower backends: PyTorch eager, OpenVINO and Inductor, and the per-machine choice.

The image tower (OTSeg's prompted ViT, ZegOT's, the training-free one: a model's
``image_encoder``) is almost all of a CPU prediction's time. Three backends run it:

- ``"torch"``: the model's own forward (eager PyTorch; bf16 as autocast). Any device.
- ``"openvino"``: the tower exported with ``torch.export`` and converted by OpenVINO
  (``ov.convert_model``), compiled for the CPU with ``INFERENCE_PRECISION_HINT`` fp32 or bf16.
  One model with a fixed input shape for slide windows, one with a dynamic height and width
  for whole-image inference (a few percent slower, so windows keep the fixed one). The
  converted model is written to ``engines/`` of the otseg cache (``$OTSEG_CACHE``, else
  ``$HF_HOME/otseg``; where converted checkpoints go, so a Space with persistent storage keeps
  it), under a key of the tower's weights, input shape, precision and the OpenVINO and torch
  versions: the first start converts (~10 s for ViT-B/16 on 2 cores), later starts load it.
- ``"inductor"``: ``torch.compile`` with ``freezing`` (weights folded into the compiled code),
  in-process: compiled on the first call of each input shape (~15 s for ViT-B/16 on 2 cores,
  every start), needs a C++ compiler at run time.

``backend="auto"`` (the default; ``$OTSEG_BACKEND`` overrides it) picks OpenVINO for a CPU
model on x86-64 with AVX2 when ``openvino`` is installed (it measured fastest, see
docs/benchmarks.md), and PyTorch everywhere else (GPUs, ARM, models without an
``image_encoder`` module).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import os
import platform
import queue
import re
import tempfile
import threading
import warnings
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..nn.clip_image import ImageEmbedding
from .precision import autocast_dtype, precision_context

BACKENDS = ("auto", "torch", "openvino", "inductor")
BACKEND_ENV = "OTSEG_BACKEND"
ENGINE_PRECISIONS = ("fp32", "bf16")  # what the engines run; fp16 stays with torch (GPUs)
OPENVINO_PIN = "openvino==2026.4.1"
_OV_HINT = {"fp32": "f32", "bf16": "bf16"}
_FORMAT = 1  # bump when the exported module or the key changes meaning


# -- the machine --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuInfo:
    """What the choices below read about the CPU: its name, ISA flags and architecture."""

    model: str
    flags: frozenset[str]
    machine: str  # platform.machine(), lower case: "x86_64", "amd64", "aarch64", "arm64"

    @property
    def x86_64(self) -> bool:
        return self.machine in {"x86_64", "amd64"}

    @property
    def bf16(self) -> bool:
        """Native bf16 arithmetic: AMX-BF16 tiles or AVX512-BF16 dot products."""
        return bool({"amx_bf16", "avx512_bf16"} & self.flags)

    @property
    def isa(self) -> str:
        """The flags that matter here, for printing: ``avx2 avx512f avx512_bf16 amx_bf16``."""
        shown = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
        return " ".join(f for f in shown if f in self.flags) or "(none of avx2/avx512/amx)"


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU, from ``/proc/cpuinfo`` on Linux (elsewhere: no flags known)."""
    model, flags = platform.processor() or "unknown CPU", frozenset()
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = found.group(1).strip() if found else model
        found = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
        flags = frozenset(found.group(1).split()) if found else flags
    return CpuInfo(model=model, flags=flags, machine=platform.machine().lower())


def installed(package: str) -> bool:
    """Whether ``package`` can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


def exportable(model: Any) -> bool:
    """Whether ``model`` has the tower an engine runs: an ``image_encoder`` module whose forward
    is ``model.encode_image`` (OTSeg, ZegOT, training-free; not the demo's remote stand-in)."""
    return isinstance(getattr(model, "image_encoder", None), nn.Module)


def choose_backend(
    requested: str | None = "auto",
    *,
    device: torch.device | str = "cpu",
    model: Any = None,
    precision: str = "fp32",
    info: CpuInfo | None = None,
    available: Callable[[str], bool] = installed,
) -> str:
    """The backend that runs ``model``'s image tower on ``device`` in ``precision``.

    requested: a name in :data:`BACKENDS`; ``"auto"`` (or None) reads ``$OTSEG_BACKEND`` first,
    then decides by the CPU (``info``, default :func:`cpu_info`) and what is installed
    (``available``). An explicit engine that cannot run here is a :class:`UserError`.
    """
    name = requested or "auto"
    if name == "auto":
        name = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
        source = f"{BACKEND_ENV}={name!r}"
    else:
        source = f"backend={name!r}"
    if name not in BACKENDS:
        raise UserError(f"{source}: the backend must be one of {BACKENDS}")
    device = torch.device(device)
    if name == "auto":
        info = info or cpu_info()
        usable = device.type == "cpu" and precision in ENGINE_PRECISIONS
        usable = usable and (model is None or exportable(model))
        if usable and info.x86_64 and "avx2" in info.flags and available("openvino"):
            return "openvino"
        return "torch"
    if name == "torch":
        return name
    if device.type != "cpu":
        raise UserError(f"{source} runs on the CPU only; the model is on {device}")
    if model is not None and not exportable(model):
        raise UserError(f"{source} needs a model with an image_encoder module")
    if precision not in ENGINE_PRECISIONS:
        raise UserError(f"{source} runs {' or '.join(ENGINE_PRECISIONS)}, got {precision!r}")
    if name == "openvino" and not available("openvino"):
        raise UserError(f"{source} needs OpenVINO: pip install {OPENVINO_PIN}")
    return name


def auto_precision(device: torch.device | str = "cpu", info: CpuInfo | None = None) -> str:
    """``"bf16"`` on a CPU with AMX-BF16 or AVX512-BF16, else ``"fp32"`` (also on GPUs: the
    demo keeps its former default there)."""
    if torch.device(device).type != "cpu":
        return "fp32"
    return "bf16" if (info or cpu_info()).bf16 else "fp32"


# -- towers -------------------------------------------------------------------------------------
class ImageTower(ABC):
    """Runs a model's image tower: ``tower(images)`` → the embedding ``model.encode_image``
    returns. images: (B, 3, H, W) normalised. ``backend`` and ``precision`` say what runs."""

    backend: str
    precision: str
    model: Any

    @abstractmethod
    def __call__(self, images: torch.Tensor) -> Any:
        """The embedding of ``images``, as ``model.encode_image`` returns it."""

    def prepare(self, size: tuple[int, int]) -> None:
        """Convert/compile for (1, 3, *size) inputs now rather than on the first call."""
        return None  # nothing to prepare for an eager tower


class TorchTower(ImageTower):
    """``model.encode_image`` under the precision's autocast (eager PyTorch)."""

    backend = "torch"

    def __init__(self, model: Any, precision: str = "fp32") -> None:
        autocast_dtype(precision)
        self.model, self.precision = model, precision

    def __call__(self, images: torch.Tensor) -> Any:
        with precision_context(self.model.device, self.precision):
            return self.model.encode_image(images)


class _Fields(nn.Module):
    """The tower with its embedding's fields as a tuple of tensors (what exporters take)."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        emb = self.tower(images)
        return tuple(getattr(emb, f.name) for f in dataclasses.fields(emb))


def _embedding_type(model: Any) -> type:
    return getattr(model, "embedding_type", ImageEmbedding)


def _check_engine(backend: str, precision: str, model: Any) -> None:
    choose_backend(backend, device=model.device, model=model, precision=precision)


class OpenVinoTower(ImageTower):
    """The tower in OpenVINO on the CPU (see the module doc). One image per inference: a batch
    is run image by image. Thread-safe (one infer request per concurrent call)."""

    backend = "openvino"

    def __init__(
        self,
        model: Any,
        precision: str = "fp32",
        *,
        threads: int | None = None,
        cache: Path | None = None,
    ) -> None:
        _check_engine(self.backend, precision, model)
        import openvino as ov

        self._model, self.precision = weakref.ref(model), precision
        self.cache = cache or engine_cache_dir()
        self.threads = threads or torch.get_num_threads()
        self.version = ov.__version__
        self._core = ov.Core()
        self._fields = [f.name for f in dataclasses.fields(_embedding_type(model))]
        self._compiled: dict[tuple[int, int] | None, Any] = {}  # None: the dynamic model
        self._requests: dict[int, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self.static_size = (model.config.test_crop, model.config.test_crop)
        self.loaded_from_cache: dict[tuple[int, int] | None, bool] = {}

    def prepare(self, size: tuple[int, int]) -> None:
        self._compiled_for(tuple(size))

    def _compiled_for(self, size: tuple[int, int]):
        shape = size if size == self.static_size else None
        compiled = self._compiled.get(shape)
        if compiled is None:
            with self._lock:
                compiled = self._compiled.get(shape)
                if compiled is None:
                    compiled = self._compile(shape)
                    self._compiled[shape] = compiled
                    self._requests[id(compiled)] = queue.SimpleQueue()
        return compiled

    def _compile(self, shape: tuple[int, int] | None):
        key = engine_key(self.model, shape, self.precision, f"openvino-{self.version}")
        xml = self.cache / f"openvino-{key}.xml"
        self.loaded_from_cache[shape] = xml.is_file()
        if not xml.is_file():
            self._convert(shape, xml)
        config = {
            "INFERENCE_PRECISION_HINT": _OV_HINT[self.precision],
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
            # Threads not pinned to cores: on a shared machine (other processes, a Space's VM)
            # pinned threads wait for their busy core; unpinned ran 1.1-1.3x faster here.
            "ENABLE_CPU_PINNING": False,
        }
        return self._core.compile_model(self._core.read_model(str(xml)), "CPU", config)

    def _convert(self, shape: tuple[int, int] | None, xml: Path) -> None:
        import openvino as ov

        example = torch.zeros(1, 3, *(shape or self.static_size))
        program = export_tower(self.model, example, dynamic=shape is None)
        with warnings.catch_warnings():  # torch's pytree deprecations, raised inside OpenVINO
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
            converted = ov.convert_model(program)
        xml.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=xml.parent) as tmp:
            part = Path(tmp) / xml.name
            ov.save_model(converted, str(part), compress_to_fp16=False)  # fp32 weights as they are
            os.replace(part.with_suffix(".bin"), xml.with_suffix(".bin"))
            os.replace(part, xml)  # last and atomic: the .xml marks a complete model

    def __call__(self, images: torch.Tensor) -> Any:
        if images.shape[0] != 1:
            parts = [self(image) for image in images.split(1)]
            return _embedding_type(self.model)(
                **{
                    f: torch.cat([getattr(p, f) for p in parts], dim=_batch_dim(f))
                    for f in self._fields
                }
            )
        compiled = self._compiled_for(tuple(images.shape[-2:]))
        requests = self._requests[id(compiled)]
        try:
            request = requests.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            x = images.detach().float().cpu().contiguous().numpy()
            request.infer({0: x})
            out = [
                torch.from_numpy(request.get_output_tensor(i).data.copy())
                for i in range(len(self._fields))
            ]
        finally:
            requests.put(request)
        return _embedding_type(self.model)(**dict(zip(self._fields, out, strict=True)))

    @property
    def model(self) -> Any:
        return _alive(self._model)


def _alive(ref: weakref.ref) -> Any:
    model = ref()
    if model is None:
        raise RuntimeError("the model of this image tower no longer exists")
    return model


def _batch_dim(field: str) -> int:
    """ZegOT's ``blocks`` are (L, B, C, h, w); every other field is batch-first."""
    return 1 if field == "blocks" else 0


class InductorTower(ImageTower):
    """The tower through ``torch.compile`` (Inductor, ``freezing=True``), compiled in-process on
    the first call of each input shape; bf16 runs the compiled tower under autocast."""

    backend = "inductor"

    def __init__(self, model: Any, precision: str = "fp32") -> None:
        _check_engine(self.backend, precision, model)
        self._model, self.precision = weakref.ref(model), precision
        self._compiled = torch.compile(_Fields(model.image_encoder).eval(), dynamic=False)
        self._fields = [f.name for f in dataclasses.fields(_embedding_type(model))]

    @property
    def model(self) -> Any:
        return _alive(self._model)

    def prepare(self, size: tuple[int, int]) -> None:
        with torch.inference_mode():
            self(torch.zeros(1, 3, *size))

    def __call__(self, images: torch.Tensor) -> Any:
        import torch._inductor.config as inductor

        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with inductor.patch(freezing=True), autocast, torch.no_grad():
            out = self._compiled(images.float())
        return _embedding_type(self.model)(
            **{f: t.float() for f, t in zip(self._fields, out, strict=True)}
        )


_ENGINES = {"openvino": OpenVinoTower, "inductor": InductorTower}
_SHARED: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def image_tower(
    model: Any, backend: str | None = "auto", precision: str = "fp32", **options: Any
) -> ImageTower:
    """The image tower of ``model`` on the chosen backend (see :func:`choose_backend`).

    Engine towers are shared within the process per model, backend, precision and options
    (every predictor of one model reuses the compiled tower), and rebuilt when a tensor of the
    tower is replaced or modified in place (inference tensors: only a replacement is seen).
    options: ``threads`` and ``cache`` of :class:`OpenVinoTower`."""
    name = choose_backend(backend, device=model.device, model=model, precision=precision)
    if name == "torch":
        return TorchTower(model, precision)
    stamp = _state_stamp(model.image_encoder)
    key = (name, precision, tuple(sorted(options.items())))
    with _SHARED_LOCK:
        towers = _SHARED.setdefault(model, {})
        hit = towers.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        tower = _ENGINES[name](model, precision, **options)
        towers[key] = (stamp, tower)
    return tower


def _state_stamp(module: nn.Module) -> tuple:
    """Identity and in-place version of every tensor of ``module``'s state (cheap)."""
    return tuple(
        (t.data_ptr(), None if t.is_inference() else t._version)
        for t in module.state_dict().values()
    )


# -- export and the cache key -------------------------------------------------------------------
def export_tower(model: Any, example: torch.Tensor, *, dynamic: bool = False):
    """``torch.export`` of ``model.image_encoder`` on (1, 3, H, W) images → an ExportedProgram
    with the embedding's fields as outputs; ``dynamic``: any H and W (multiples of the patch)."""
    shapes = ({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},) if dynamic else None
    with torch.no_grad():
        return torch.export.export(
            _Fields(model.image_encoder).eval(), (example,), dynamic_shapes=shapes
        )


def weights_digest(module: nn.Module) -> str:
    """Digest of a module's state (names, dtypes, shapes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, value in module.state_dict().items():
        value = value.detach().cpu().contiguous()
        h.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def engine_key(model: Any, shape: tuple[int, int] | None, precision: str, engine: str) -> str:
    """Cache key of a converted tower: the tower's structure and weights, the input shape (None:
    dynamic), the precision, the engine and torch versions."""
    tower = model.image_encoder
    h = hashlib.blake2b(digest_size=12)
    for part in (
        _FORMAT,
        type(model).__name__,
        repr(tower),  # structure, including settings shown by extra_repr (e.g. dense mode)
        getattr(getattr(model, "config", None), "vision", None),
        weights_digest(tower),
        "dynamic" if shape is None else f"{shape[0]}x{shape[1]}",
        precision,
        engine,
        torch.__version__,
    ):
        h.update(f"{part}\n".encode())
    return h.hexdigest()


ENGINE_CACHE_ENV = "OTSEG_ENGINE_CACHE"


def engine_cache_dir() -> Path:
    """``$OTSEG_ENGINE_CACHE``, else ``engines/`` of the otseg cache
    (:func:`otseg.weights.original.cache_root`), read at call time."""
    from ..weights.original import cache_root

    if os.environ.get(ENGINE_CACHE_ENV):
        return Path(os.environ[ENGINE_CACHE_ENV]).expanduser()
    return cache_root() / "engines"
