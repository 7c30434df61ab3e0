"""A stateful predictor: encode an image once, then re-predict cheaply with other knobs.

otseg.segment(image, ["cat", "sofa"], model="path/or/hub-id")  # one call → Prediction

predictor = OTSegPredictor.from_pretrained("path/or/hub-id")
predictor.set_image(Image.open("photo.jpg"))
predictor.set_vocabulary(["cat", "sofa", "lamp"])
result = predictor.predict(attention="sinkhorn", lam=0.5)   # result.labels: (H, W)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import UserError
from ..nn.clip_image import ImageEmbedding
from ..nn.ensemble import TokenMaps, WindowScores, resize
from ..nn.variants import check_lam, describe, resolve_for
from ..vocabulary import check_names, check_vocabulary
from .allocator import keep_freed_memory
from .engine import auto_precision, image_tower
from .precision import PRECISIONS, autocast_dtype, precision_context  # noqa: F401 - re-exported
from .preprocess import ImageLike, ModelInput, load_image, prepare
from .slide import Box, crops, merge_windows, slide_windows, window_probabilities
from .whole import whole_input

# "slide": overlapping test_crop windows, as the original (the default and the parity path);
# "whole": one pass over the whole test-scale image (otseg.inference.whole), faster, not the original's.
MODES = ("slide", "whole")
PROMPT_MAP_STRIDE = 8  # per-prompt maps are returned at 1/8 of the test-scale image


KNOBS = ("attention", "lam", "use_mps", "calibrate_seen")  # predict()'s keyword arguments


def known_attentions() -> tuple[str, ...]:
    """Every ``attention`` value some model of the family accepts (a typo is refused before
    any model is loaded; the loaded model's own list is checked before its first use)."""
    from ..models import OTSeg, TrainingFreeOTSeg, ZegOT

    return tuple(dict.fromkeys(a for m in (OTSeg, ZegOT, TrainingFreeOTSeg) for a in m.attentions))


def check_knobs(knobs: dict[str, Any], attentions: Sequence[str] | None = None) -> None:
    """A one-line ``UserError`` unless ``knobs`` are valid keyword arguments of
    :meth:`OTSegPredictor.predict`, checked before any model is at hand: known names,
    ``attention`` None or one of ``attentions`` (default :func:`known_attentions`), ``lam``
    None or a number in [0, 1], the switches None or booleans. What a variant allows (no λ for
    ``"zegclip"``) is settled by :func:`otseg.nn.variants.resolve_for` once the model is known."""
    unknown = [k for k in knobs if k not in KNOBS]
    if unknown:
        raise UserError(
            f"unknown keyword argument {', '.join(map(repr, unknown))}; the prediction "
            f"settings are {', '.join(KNOBS)}"
        )
    attentions = tuple(attentions) if attentions is not None else known_attentions()
    attention = knobs.get("attention")
    if attention is not None and (not isinstance(attention, str) or attention not in attentions):
        raise UserError(f"attention must be one of {attentions}, got {attention!r}")
    if knobs.get("lam") is not None:
        check_lam(knobs["lam"])
    for flag in ("use_mps", "calibrate_seen"):
        if knobs.get(flag) is not None and not isinstance(knobs[flag], bool | np.bool_):
            raise UserError(f"{flag} must be True or False, got {knobs[flag]!r}")


@runtime_checkable
class SegmentationModel(Protocol):
    """What :class:`OTSegPredictor` needs from a model. :class:`otseg.models.otseg.OTSeg`,
    :class:`otseg.models.training_free.TrainingFreeOTSeg` and ZegOT satisfy it; the post-processing
    comes from :class:`otseg.nn.ensemble.PostProcessing`.

    ``config`` must provide ``class_names`` and ``seen`` (the training split, for the seen
    rule), ``templates``, the test scale (``resize_short``, ``pixel_mean``, ``pixel_std``,
    ``test_crop``, ``test_stride``) and what ``postprocess`` reads (``vision.image_size``,
    ``ensemble_lambda``, ``calibration``).
    """

    config: Any
    attentions: tuple[str, ...]  # values ``decode`` accepts for ``attention``
    # Optional: ``default_attention`` (the variant used when none is asked for, else
    # "sinkhorn") and ``variants`` (variant → one sentence on what it computes).

    @property
    def device(self) -> torch.device: ...  # where images and embeddings are put

    def eval(self) -> Any: ...

    def encode_image(self, images: torch.Tensor) -> Any:
        """(1, 3, H, W) normalised slide window, or the whole image in ``mode="whole"``
        → an embedding that ``decode`` takes back."""

    def embed_text(self, names: Sequence[str]) -> torch.Tensor:
        """K class names → (K, N, C) prompt embeddings."""

    def decode(self, emb: Any, text: torch.Tensor, *, attention: str, use_mps: bool) -> TokenMaps:
        """Head maps at the token grid: ``decoder``, ``score`` (None without MPS) and
        ``prompt_maps`` ((1, K, N, h, w) per-prompt maps, or None without MPS)."""

    def postprocess(
        self,
        maps: TokenMaps,
        *,
        lam: float | None = None,
        seen: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
        inplace: bool = False,
    ) -> WindowScores:
        """See :meth:`otseg.nn.ensemble.PostProcessing.postprocess`."""


@dataclass
class Prediction:
    """Result of :meth:`OTSegPredictor.predict`, in the user's class order."""

    labels: np.ndarray  # (H, W) int32 class index at the original image size
    probs: np.ndarray  # (K, H, W) float32 softmax over the K classes
    class_names: list[str]
    seen: list[bool]  # True where the class got the seen calibration
    prompt_maps: np.ndarray | None  # (K, N, H/8', W/8') per-prompt MPS maps (test scale / 8)
    templates: tuple[str, ...]  # the N prompt templates, in prompt order
    attention: str  # the variant that ran
    lam: float | None  # None: the variant has no MPS map, so no λ ("zegclip")
    use_mps: bool
    description: str = ""  # what the variant computes, one sentence
    backend: str = "torch"  # what ran the image tower (see otseg.inference.engine)
    precision: str = "fp32"  # of the image tower and head


class OTSegPredictor:
    """Caches the image embedding of every slide window and the vocabulary's text embeddings;
    also caches the head's maps per (attention, MPS on/off), so a new λ only re-fuses.

    precision: ``"fp32"`` (the default and the parity path), ``"bf16"`` (the engine's bf16 for
    the image tower, autocast for the rest) or ``"fp16"`` (autocast, for GPUs); ``"auto"``: bf16
    on a CPU with AMX or AVX512-BF16, else fp32 (:func:`otseg.inference.engine.auto_precision`).
    mode: ``"slide"`` (overlapping windows, as the original) or ``"whole"`` (one pass over the
    whole image, see :mod:`otseg.inference.whole`: ~1.5× less work on a 4:3 photo; labels differ).
    backend: what runs the image tower: ``"auto"`` (``$OTSEG_BACKEND``, else OpenVINO on an
    x86-64 CPU where it is installed, else PyTorch), ``"torch"``, ``"openvino"``,
    ``"inductor"`` (see :mod:`otseg.inference.engine`). The chosen one is
    ``predictor.backend``.
    """

    def __init__(
        self,
        model: SegmentationModel,
        *,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        mode: str = "slide",
        backend: str = "auto",
    ) -> None:
        if precision != "auto":
            autocast_dtype(precision)  # a bad name fails here, before any work
        if mode not in MODES:
            raise UserError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = model.eval()
        if device is not None:
            try:
                self.model.to(device)
            except (RuntimeError, AssertionError) as e:  # CPU-only torch asserts on "cuda"
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"device {str(device)!r} is not usable here: {reason}") from None
        if self.model.device.type == "cpu":
            keep_freed_memory()
        if precision == "auto":
            precision = auto_precision(self.model.device)
        self.precision = precision
        self.mode = mode
        self.tower = image_tower(self.model, backend, precision)
        crop = (self.model.config.test_crop, self.model.config.test_crop)
        # Convert (or load) the engine now, not in the first set_image; whole mode runs the
        # dynamic-shape model, which any size other than the crop selects.
        self.tower.prepare(crop if mode == "slide" else (crop[0], crop[1] + 16))
        self.backend = self.tower.backend
        self.reset_image()
        self._names: list[str] | None = None
        self._text: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, repo_or_dir: str, **kwargs) -> OTSegPredictor:
        from ..weights.pretrained import from_pretrained

        device = kwargs.pop("device", None)
        precision = kwargs.pop("precision", "fp32")
        options = {k: kwargs.pop(k) for k in ("mode", "backend") if k in kwargs}
        autocast_dtype(precision)  # bad options fail before the model is loaded
        if options.get("mode", "slide") not in MODES:
            raise UserError(f"mode must be one of {MODES}, got {options['mode']!r}")
        model = from_pretrained(repo_or_dir, **kwargs)
        return cls(model, device=device, precision=precision, **options)

    # -- state ------------------------------------------------------------------------------
    def reset_image(self) -> None:
        self._embeddings: list[ImageEmbedding] = []
        self._boxes: list[Box] = []
        self._scaled_size: tuple[int, int] | None = None
        self.original_size: tuple[int, int] | None = None
        self._maps: dict[tuple[str, bool], Any] = {}  # head maps and merged prompt maps

    @property
    def is_image_set(self) -> bool:
        return self.original_size is not None

    def _autocast(self):
        return precision_context(self.model.device, self.precision)

    @torch.inference_mode()
    def set_image(self, image: ImageLike | ModelInput) -> None:
        """Run the image encoder once on every slide window of ``image`` (PIL, HWC uint8 array,
        path or bytes, see :func:`otseg.inference.preprocess.load_image` for what is accepted;
        or already prepared for this model by :func:`otseg.inference.preprocess.prepare`)."""
        prepared = prepare(image, self.model.config)
        rgb, x = prepared.rgb, prepared.x.to(self.model.device)
        cfg = self.model.config
        if self.mode == "whole":
            x = whole_input(x, cfg.vision.patch_size)
            boxes = [(0, 0, x.shape[-2], x.shape[-1])]
        else:
            boxes = slide_windows(x.shape[-2], x.shape[-1], cfg.test_crop, cfg.test_stride)
        self.reset_image()
        # One window at a time: a batch of two gains only a few percent on a CPU. The tower
        # applies the precision itself (autocast for PyTorch, the engine's own bf16).
        self._embeddings = [self.tower(window) for window in crops(x, boxes).split(1)]
        self._boxes = boxes
        self._scaled_size = (x.shape[-2], x.shape[-1])
        self.original_size = rgb.shape[:2]

    def set_vocabulary(self, names: Sequence[str], seen: Sequence[bool] | None = None) -> None:
        """Set the K class names (kept in this order).

        seen: per name, whether it gets the seen-class calibration. By default a name is seen
        when it matches one of the model's seen training classes, ignoring case, spaces,
        hyphens and underscores (:func:`otseg.vocabulary.mark_seen`).
        """
        names, seen = check_vocabulary(names, self.model.config, seen)
        self._text = self.model.embed_text(names)
        self._names = names
        self._seen = torch.tensor(seen, dtype=torch.bool)
        self._maps = {}

    # -- prediction -------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(
        self,
        *,
        attention: str | None = None,
        lam: float | None = None,
        use_mps: bool | None = None,
        calibrate_seen: bool = True,
    ) -> Prediction:
        """Label map and per-class probabilities at the original image size.

        Args:
            attention: the variant (default: the model's, ``"sinkhorn"`` except for ZegCLIP's
                models). OTSeg and ZegCLIP weights: ``"sinkhorn"`` (OTSeg), ``"softmax"``
                (the multi-prompt softmax ablation), ``"zegclip"`` (ZegCLIP's inference: one
                query per class, no MPS branch); ZegOT: ``"sinkhorn"`` (MPOT), ``"softmax"``,
                ``"none"``. :data:`otseg.nn.variants.VARIANTS` says what each computes.
            lam: MPS weight in the ensemble, in [0, 1] (default: the model's, 0.5); with
                ``"zegclip"`` there is no MPS map and passing λ is an error.
            use_mps: use the MPS score-map branch (default: on; λ is ignored without it);
                ``"zegclip"`` has none (True is an error).
            calibrate_seen: subtract the model's calibration from seen classes.
        """
        knobs = resolve_for(self.model, attention, lam, use_mps)
        if not isinstance(calibrate_seen, bool | np.bool_):
            raise UserError(f"calibrate_seen must be True or False, got {calibrate_seen!r}")
        if not self.is_image_set:
            raise RuntimeError("call set_image() before predict()")
        if self._text is None:
            raise RuntimeError("call set_vocabulary() before predict()")
        attention, lam, use_mps = knobs.attention, knobs.lam, knobs.use_mps
        seen = self._seen if calibrate_seen else None
        window_scores = [
            self.model.postprocess(
                m, lam=lam, seen=seen, size=(y2 - y1, x2 - x1), inplace=True
            ).scores
            for m, (y1, x1, y2, x2) in zip(
                self._head_maps(attention, use_mps), self._boxes, strict=True
            )
        ]
        probs = window_probabilities(
            window_scores, self._boxes, self._scaled_size, self.original_size
        )[0]
        labels = _channel_argmax(probs)
        return Prediction(
            labels=labels.cpu().numpy(),
            probs=probs.cpu().numpy(),
            class_names=list(self._names),
            seen=self._seen.tolist() if calibrate_seen else [False] * len(self._names),
            prompt_maps=self._prompt_maps(attention, use_mps),
            templates=prompt_labels(self.model.config),
            attention=attention,
            lam=lam,
            use_mps=use_mps,
            description=describe(self.model, attention),
            backend=self.backend,
            precision=self.precision,
        )

    def _head_maps(self, attention: str, use_mps: bool) -> list:
        key = (attention, use_mps)
        if key not in self._maps:
            with self._autocast():
                # One window per call: the Sinkhorn stopping rule is global over a call.
                self._maps[key] = [
                    self.model.decode(emb, self._text, attention=attention, use_mps=use_mps)
                    for emb in self._embeddings
                ]
        return self._maps[key]

    def _prompt_maps(self, attention: str, use_mps: bool) -> np.ndarray | None:
        """Per-prompt MPS maps merged over windows (independent of λ, so cached)."""
        if not use_mps:
            return None
        key = ("prompt_maps", attention)
        if key not in self._maps:
            self._maps[key] = self._merge_prompt_maps(self._head_maps(attention, True))
        return self._maps[key]

    def _merge_prompt_maps(self, maps: list) -> np.ndarray:
        s = PROMPT_MAP_STRIDE
        size = (self._scaled_size[0] // s, self._scaled_size[1] // s)
        boxes = [tuple(v // s for v in box) for box in self._boxes]
        tiles = []
        for m, (y1, x1, y2, x2) in zip(maps, boxes, strict=True):
            pm = m.prompt_maps.float()[0]  # (K, N, h, w)
            k, n = pm.shape[:2]
            tiles.append(resize(pm.reshape(1, k * n, *pm.shape[-2:]), (y2 - y1, x2 - x1)))
        merged = merge_windows(tiles, boxes, size)
        return merged.reshape(k, n, *size).cpu().numpy()


def prompt_labels(config: Any) -> tuple[str, ...]:
    """What each of the N prompts of a class is, as templates ("{}" = the name): the config's
    ``prompt_labels`` where it averages templates into one prompt (ZegCLIP), else its
    templates."""
    return tuple(getattr(config, "prompt_labels", config.templates))


def _channel_argmax(x: torch.Tensor) -> torch.Tensor:
    """(K, H, W) → (H, W) int32 index of the first maximum; ~7× faster on CPU than
    ``argmax(0)``, which reduces over the strided leading dimension."""
    best = x.amax(0)
    labels = torch.zeros(best.shape, dtype=torch.int32, device=x.device)
    for k in range(x.shape[0] - 1, -1, -1):  # descending, so the first maximum wins ties
        labels.masked_fill_(x[k] == best, k)
    return labels


@functools.lru_cache(maxsize=2)
def _load(source: str) -> OTSegPredictor:
    return OTSegPredictor.from_pretrained(source)


def segment(
    image: ImageLike,
    names: Sequence[str],
    *,
    model: str | Path | SegmentationModel | OTSegPredictor,
    **knobs: Any,
) -> Prediction:
    """Segment one image into the given class names, in one call.

    Args:
        image: PIL image, HWC uint8 array, path or bytes.
        names: the K class names, in the order of the result.
        model: a loaded model, a predictor, or where to load one from (a directory, a Hub
            repo id or ``original:<setting>``; the two most recent are kept loaded).
        knobs: ``attention``, ``lam``, ``use_mps``, ``calibrate_seen`` (see
            :meth:`OTSegPredictor.predict`).
    """
    # every argument is checked, and the image decoded, before a model is loaded or run
    check_knobs(knobs)
    names = check_names(names)
    rgb = load_image(image)
    if isinstance(model, OTSegPredictor):
        predictor = model
    elif isinstance(model, str | Path):
        predictor = _load(str(model))
    else:
        predictor = OTSegPredictor(model)
    knobs_ = {k: knobs.get(k) for k in ("attention", "lam", "use_mps")}
    resolve_for(predictor.model, **knobs_)  # what this model allows, before its encoder runs
    predictor.set_image(rgb)
    predictor.set_vocabulary(names)
    return predictor.predict(**knobs)
