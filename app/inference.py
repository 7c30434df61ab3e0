"""Model loading (once per process), input validation and the event handlers of the demo.

The model is loaded once, registered with :mod:`app.gpu` and shared read-only by every user.
Everything of one user — the image, its embeddings, the vocabulary, the head's maps, the last
label map — lives in a :class:`Session` kept in that user's ``gr.State``: CPU tensors and
arrays only, so it pickles. A λ change only re-fuses the cached maps, an attention switch only
re-runs the head, an opacity change only re-draws.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from app import gpu, overlay, render, vocab
from app.loading import ModelLoader
from otseg.errors import UserError
from otseg.inference.predictor import OTSegPredictor
from otseg.inference.preprocess import ImageError, load_image
from otseg.nn.variants import NO_MPS, default_attention
from otseg.registry import model_type
from otseg.vocabulary import mark_seen

ATTENTION_LABELS = {  # otseg.VARIANTS says what each computes
    "sinkhorn": "Sinkhorn (OTSeg: MPS + MPSA)",
    "softmax": "Softmax (multi-prompt ablation)",
    "zegclip": "ZegCLIP's inference (one query per class, no MPS)",
}
ZEGOT_ATTENTION_LABELS = {  # ZegOT's transport between its learned prompts and the pixels
    "sinkhorn": "MPOT (optimal transport)",
    "softmax": "softmax",
    "none": "no transport",
}
# The demo's model when none is named: the authors' COCO-Stuff transductive OTSeg (its 171
# names cover everyday photos best); downloaded and converted once, then cached.
DEFAULT_MODEL = "original:coco-transductive"
NO_MODEL = "none"  # --model none / OTSEG_MODEL=none: the training-free mode, chosen explicitly
HOW_TO_TRAINED = (
    f"To see real OTSeg, start the app without `--model none` (the default, `{DEFAULT_MODEL}`, is "
    "the authors' weights, downloaded once and cached) or with `--model HUB_ID_OR_DIR` / "
    "`OTSEG_MODEL`."
)
log = logging.getLogger(__name__)
NEED_RESULT = "Upload an image and press Segment first."
ENGINE_LABELS = {  # the page's line on what runs the image tower
    "torch": "Image tower: PyTorch",
    "openvino": "Image tower: OpenVINO",
    "inductor": "Image tower: PyTorch Inductor (torch.compile)",
}
INFERENCE_LABELS = {  # the predictor's modes
    "slide": "Accurate: overlapping windows, as in the paper",
    "whole": "Fast: one pass over the whole image",
}


@dataclass
class LoadedModel:
    """The process-wide model and how the UI should describe it."""

    model: nn.Module | None  # OTSeg, ZegOT or TrainingFreeOTSeg; None when nothing was loaded
    mode: str  # "trained" | "training-free" | "none"
    status: str  # Markdown shown at the top of the page
    precision: str = "fp32"  # of the towers and head, applied inside app.gpu
    kind: str = "otseg"  # without a model: the type the page is laid out for (see ``planned``)
    lam: float = 0.5  # without a model: the λ the page starts with
    backend: str = "auto"  # what runs the image tower (otseg.inference.engine), inside app.gpu
    key: str | None = field(default=None, init=False)  # app.gpu registry key

    def __post_init__(self) -> None:
        if self.model is not None:
            self.key = gpu.register(self.model, self.precision, self.backend)
            self.backend, self.precision = gpu.tower_info(self.key)
            self.status += f"\n\n{ENGINE_LABELS[self.backend]}, {self.precision}."

    @property
    def message(self) -> str:
        """``status`` as plain text, for API clients and the server log."""
        return re.sub(r"[*`]|⚠️ ?", "", self.status).replace("\n\n", " ").strip()

    @property
    def is_zegot(self) -> bool:
        if self.model is None:
            return self.kind == "zegot"
        return model_type(self.model) == "zegot"

    @property
    def model_name(self) -> str:
        """``"ZegOT"``, ``"ZegCLIP"`` or ``"OTSeg"`` (also the training-free CLIP, which runs
        OTSeg's MPSA)."""
        kind = self.kind if self.model is None else model_type(self.model)
        return {"zegot": "ZegOT", "zegclip": "ZegCLIP"}.get(kind, "OTSeg")

    @property
    def transport_name(self) -> str:
        """The short name of ``attention="sinkhorn"`` for the loaded model: ZegOT's MPOT or
        OTSeg's Sinkhorn attention."""
        return "MPOT" if self.is_zegot else "Sinkhorn"

    @property
    def attention_labels(self) -> dict[str, str]:
        """Attention value → radio label, for the loaded model's variants."""
        if self.is_zegot:
            return ZEGOT_ATTENTION_LABELS
        accepted = getattr(self.model, "attentions", ATTENTION_LABELS)
        return {k: v for k, v in ATTENTION_LABELS.items() if k in accepted}

    @property
    def default_attention(self) -> str:
        """The variant the model runs by default (ZegCLIP's weights: ``"zegclip"``)."""
        if self.model is None:
            return "zegclip" if self.kind == "zegclip" else "sinkhorn"
        return default_attention(self.model)

    @property
    def default_lam(self) -> float:
        """The model's ensemble λ (ZegOT 0.8, OTSeg 0.5)."""
        return float(getattr(getattr(self.model, "config", None), "ensemble_lambda", self.lam))

    def mark_seen(self, names: list[str]) -> list[bool] | None:
        """Seen flags for a trained model; None (no badges) when there is no training split."""
        if self.mode != "trained":
            return None
        cfg = self.model.config
        return mark_seen(names, cfg.class_names, cfg.seen)


def planned(model: str | None) -> LoadedModel:
    """What the page can say about ``model`` before it has loaded (no weights read): its type
    and λ from a local or cached config.json, OTSeg's for ``original:`` and anything else."""
    kind, lam = "otseg", 0.5
    try:
        from otseg.weights.original import RELEASED_PREFIXES, get_released

        if model and model.startswith(RELEASED_PREFIXES):
            config = get_released(model).config
            kind, lam = model_type(config), float(config.ensemble_lambda)
        elif model:
            from otseg.weights.hub import CONFIG_NAME, cached_file

            local = Path(model) / CONFIG_NAME
            found = local if local.is_file() else cached_file(model, CONFIG_NAME, None)
            if found is not None:
                info = json.loads(Path(found).read_text())
                kind = info.get("model", "otseg")
                lam = float(
                    info.get("config", {}).get("ensemble_lambda", 0.8 if kind == "zegot" else 0.5)
                )
    except (OSError, ValueError, UserError, AttributeError, TypeError):
        pass  # the page keeps OTSeg's layout; loading says what is wrong
    return LoadedModel(None, "loading", "", kind=kind, lam=lam)


def load_model(
    model: str | None,
    *,
    clip_model: str = "ViT-B-16-quickgelu",
    clip_pretrained: str | None = "openai",
    precision: str = "fp32",
    device: str = "cpu",
    backend: str = "auto",
) -> LoadedModel:
    """A trained OTSeg or ZegOT from ``model`` (Hub id or directory, as its config.json says);
    else training-free CLIP; else none.

    Never raises for missing or wrong weights: the reason goes into ``status``. ``device`` must
    already be usable (see ``app.main.check_device``).
    """
    from otseg import progress
    from otseg.errors import WeightsNotFoundError
    from otseg.models.training_free import build_training_free
    from otseg.weights.pretrained import from_pretrained

    problem = ""
    if model:
        try:
            net = from_pretrained(model)
            cfg = net.config
            name = "ZegOT" if model_type(net) == "zegot" else "OTSeg"
            title = net.card.get("title") or f"Trained {name}"  # e.g. "OTSeg (authors' weights, …)"
            status = (
                f"**{title}** `{model}` — trained on *{cfg.dataset}* "
                f"({len(cfg.seen)} seen of {len(cfg.class_names)} classes). Names of its seen "
                "classes get a **seen** badge, all others **novel**."
            )
            return LoadedModel(net.to(device), "trained", status, precision, backend=backend)
        except (WeightsNotFoundError, UserError) as e:  # CheckpointError is a UserError
            what = "the default model, the authors' OTSeg trained on COCO-Stuff, " if (
                model == DEFAULT_MODEL) else ""  # fmt: skip
            problem = f"⚠️ Could not load {what}`{model}`: {_first_line(e)}\n\n"
    progress.report(f"Loading the training-free CLIP {clip_model}")
    try:
        net = build_training_free(clip_model, clip_pretrained)
    except (WeightsNotFoundError, UserError, RuntimeError) as e:  # RuntimeError: open_clip's
        status = (
            f"**No model loaded.** {problem}The CLIP weights `{clip_model}` / "
            f"`{clip_pretrained}` are not available ({_first_line(e)}). Run once with internet "
            "access so they are cached, or point `--clip`/`OTSEG_CLIP` at a local open_clip "
            f"directory (`local-dir:/path`). {HOW_TO_TRAINED}"
        )
        return LoadedModel(None, "none", status, precision)
    why = "instead" if problem else f"(`--model {NO_MODEL}`)"
    status = (
        f"{problem}**Training-free mode** {why} — no OTSeg checkpoint, so this runs the "
        f"frozen CLIP `{clip_model}` (MaskCLIP-style dense features) scored against "
        f"{net.config.num_prompts} prompts per class with MPS; masks are coarse and every name "
        f"is novel. {HOW_TO_TRAINED}"
    )
    return LoadedModel(net.to(device), "training-free", status, precision, backend=backend)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# -- validation (before any encoding) ---------------------------------------------------------
def _shown(value) -> str:
    """A user value inside a message: its text, never a Python object repr."""
    if isinstance(value, str | int | float | bool) or value is None:
        return f"“{str(value)[:40]}”"
    return f"a {type(value).__name__}"


def _fraction(label: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        raise UserError(f"{label} must be a number from 0 to 1; got {_shown(value)}.")
    return number


def check_knobs(attention, lam, use_mps, labels: dict[str, str] = ATTENTION_LABELS) -> dict:
    """The prediction settings, validated: ``{"attention", "lam", "use_mps"}``; ``labels``: the
    loaded model's attention choices."""
    if attention not in labels:
        raise UserError(f"Attention must be one of {', '.join(labels)}; got {_shown(attention)}.")
    if not isinstance(use_mps, bool):
        raise UserError(f"use_mps must be true or false; got {_shown(use_mps)}.")
    return {"attention": attention, "lam": _fraction("λ", lam), "use_mps": use_mps}


def check_opacity(opacity) -> float:
    return _fraction("Opacity", opacity)


def check_inference(mode) -> str:
    if mode not in INFERENCE_LABELS:
        raise UserError(
            f"Inference must be one of {', '.join(INFERENCE_LABELS)}; got {_shown(mode)}."
        )
    return mode


@dataclass(frozen=True)
class Upload:
    """An uploaded image file: where the server keeps it and the name the user gave it."""

    path: str
    name: str

    @classmethod
    def from_value(cls, value) -> Upload | None:
        """From a ``gr.Image`` upload record (``preprocess=False``) or a plain path."""
        if isinstance(value, dict):
            path = value.get("path")
            name = value.get("orig_name") or Path(str(path)).name
        else:
            path = value
            name = Path(str(value)).name if value else ""
        if not path:
            return None
        if not isinstance(path, str):
            raise UserError(f"The image must be an uploaded file; got {_shown(path)}.")
        return cls(path, str(name))


# -- one user's state -------------------------------------------------------------------------
@dataclass
class Session:
    """One user's state: their predictor (around :class:`app.gpu.RemoteModel`) and results."""

    predictor: OTSegPredictor
    image_key: str | None = None  # sha1 of the uploaded file
    image_path: str | None = None  # where the server keeps it (same path → same file)
    image_name: str = "image"  # file stem the user uploaded, for download names
    image: np.ndarray | None = None  # (H, W, 3) uint8 as segmented and shown
    note: str = ""  # e.g. "the image was downscaled"
    names: list[str] = field(default_factory=list)
    seen: list[bool] | None = None
    labels: np.ndarray | None = None  # (H, W) int32 of the last prediction
    knobs: dict = field(default_factory=dict)  # attention, lam, use_mps of the last prediction
    opacity: float | None = None  # of the overlay the page shows (None: none drawn yet)
    version: int = 0  # +1 per Segment: views computed for an older version are out of date
    compared: tuple | None = None  # app.compare.inputs_key the comparison was drawn for
    compare_predictors: dict = field(default_factory=dict)  # comparison side source → predictor
    comparison: dict | None = None  # the last comparison's per-side results (prompt maps)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["lock"]  # the only unpicklable member; a fresh one is made on unpickling
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock())

    @property
    def colors(self) -> np.ndarray:
        return overlay.palette(len(self.names))


class Handlers:
    """The demo's event handlers, bound to the process-wide :class:`LoadedModel`.

    Each returns plain numpy / PIL / dicts / file paths; ``app.ui`` turns them into components.
    """

    def __init__(
        self,
        loaded: LoadedModel | ModelLoader,
        download_dir: Path | None = None,
        reference: str | None = None,
    ) -> None:
        """loaded: the model, or a loader still loading it (``reference``: what it loads)."""
        if isinstance(loaded, LoadedModel):
            loaded = ModelLoader.finished(loaded)
        self.loader = loaded
        self.reference = reference
        self.planned = planned(reference) if not loaded.done else loaded.result
        self.download_dir = download_dir or Path(tempfile.gettempdir()) / "otseg-demo"
        self._example_files: list[tuple[Path, str]] = []
        self._examples: set[tuple[str, tuple[str, ...]]] = set()  # (image sha1, names)
        self._example_cache: dict[tuple, bytes] = {}  # (sha1, names, mode) → pickled Session

    def set_examples(self, examples: list[tuple[Path, str]]) -> None:
        """The example (image file, class names) pairs whose results are cached for everyone."""
        self._example_files = [(Path(path), text) for path, text in examples]
        self._examples = {
            (hashlib.sha1(Path(path).read_bytes()).hexdigest(), tuple(parse_names(text)))
            for path, text in self._example_files
        }

    @property
    def loaded(self) -> LoadedModel:
        """The model once loaded; until then what the page can say about it (``planned``)."""
        return self.loader.result if self.loader.done else self.planned

    def status(self) -> str:
        """The mode line: the loaded model, or the loading stage with its progress."""
        if self.loader.done:
            return self.loader.result.status
        return (
            f"⏳ **Loading the model** `{self.reference}` — {self.loader.stage} "
            f"({self.loader.elapsed:.0f} s). The page works meanwhile: a Segment waits for it."
        )

    def wait_for_model(self, progress=None) -> LoadedModel:
        """The loaded model, waiting for it while it loads (``progress`` shows the stage)."""
        if not self.loader.done:
            step = progress if progress is not None else _no_progress

            def show(stage) -> None:
                step(stage.fraction, desc=f"Loading the model: {stage}")

            try:
                self.loader.wait(show)
            except TimeoutError as e:
                raise UserError(
                    f"The model is still loading ({e}); try again in a minute."
                ) from None
        return self.loader.result

    def new_session(self, mode: str = "slide") -> Session:
        if self.loaded.model is None:
            raise UserError(self.loaded.message)
        return Session(self._predictor(gpu.RemoteModel(self.loaded.key), mode))

    @staticmethod
    def _predictor(model: gpu.RemoteModel, mode: str) -> OTSegPredictor:
        # The tower's backend and precision apply behind the boundary (app.gpu), not here.
        return OTSegPredictor(model, mode=mode, backend="torch")

    # -- the expensive step: image and vocabulary --------------------------------------------
    def segment(
        self,
        session: Session | None,
        image: Upload | str | None,
        text: str,
        knobs: dict,
        progress=None,
        mode: str = "slide",
    ) -> Session:
        """Encode the image (if new) and the vocabulary (if new), then predict with ``knobs``.

        mode: the predictor's inference mode (``INFERENCE_LABELS``); a change re-encodes.
        """
        # not ``progress or ...``: an idle gr.Progress() has length 0, so it is falsy
        step = progress if progress is not None else _no_progress
        knobs, mode = self._check_knobs(knobs), check_inference(mode)
        upload = image if isinstance(image, Upload) else Upload.from_value(image)
        if upload is None:
            raise UserError("Upload an image (or pick an example) first.")
        names = parse_names(text)
        self.wait_for_model(step)  # bad input is refused at once, even while the model loads
        data = _read(upload.path)
        key = hashlib.sha1(data).hexdigest()
        cached = self._example_cache.get((key, tuple(names), mode))
        if cached is not None and (
            session is None or (key, names) != (session.image_key, session.names)
        ):
            return self._from_example(cached, session, upload, knobs)
        session = session or self.new_session(mode)
        with session.lock:
            if session.predictor.mode != mode:  # same model and text cache, new image encoding
                session.predictor = self._predictor(session.predictor.model, mode)
                session.image_key, session.names = None, []
            pred = session.predictor
            if key != session.image_key:
                step(0.05, desc="Reading the image")
                try:
                    rgb, note = render.fit_image(load_image(data), render.stored_size(data))
                except ImageError as e:
                    raise UserError(f"Cannot use this file: {_explain(e)}") from None
                step(0.15, desc="Encoding the image")
                pred.set_image(rgb)
                session.image_key, session.image, session.note = key, rgb, note
                session.labels = None
            session.image_path, session.image_name = upload.path, Path(upload.name).stem
            if names != session.names:
                for i in range(0, len(names), gpu.TEXT_BATCH):  # one call per step: progress
                    step(0.4 + 0.4 * i / len(names), desc=f"Encoding {len(names)} class names")
                    try:
                        pred.model.embed_text(names[i : i + gpu.TEXT_BATCH])
                    except UserError as e:  # e.g. a name too long for CLIP's text context
                        raise UserError(_first_line(e)) from None
                seen = self.loaded.mark_seen(names)
                pred.set_vocabulary(names, seen=seen or [False] * len(names))
                session.names, session.seen = names, seen
            step(0.9, desc="Segmenting")
            self._predict(session, knobs)
            session.version += 1
            if (key, tuple(names)) in self._examples:  # the first run of an example: kept
                self._example_cache[key, tuple(names), mode] = pickle.dumps(session)
        return session

    def _from_example(self, cached: bytes, old: Session | None, upload: Upload, knobs) -> Session:
        """A fresh copy of an example's cached session (image and names already encoded, head
        maps cached), predicted with ``knobs``; views of ``old`` become out of date."""
        session = pickle.loads(cached)
        session.image_path, session.image_name = upload.path, Path(upload.name).stem
        session.version = (old.version if old is not None else 0) + 1
        session.compared = None
        with session.lock:
            self._predict(session, knobs)
        return session

    def warm_examples(self) -> None:
        """Segment every example once with the default settings (after the model has loaded),
        so a click on one is answered from the cache."""
        loaded = self.wait_for_model()
        if loaded.model is None:
            return
        knobs = {"attention": "sinkhorn", "lam": loaded.default_lam, "use_mps": True}
        for path, text in self._example_files:
            try:
                self.segment(None, str(path), text, knobs)
            except UserError:
                log.warning("example %s could not be cached", path, exc_info=True)

    def check_knobs(self, attention, lam, use_mps) -> dict:
        """:func:`check_knobs` against the loaded model's attention choices; a variant without
        the MPS map (``"zegclip"``) gets ``lam=None, use_mps=False`` (the page's λ and MPS
        switch do not apply to it)."""
        if attention in NO_MPS and lam is None and use_mps is False:  # already settled
            lam = 0.0
        knobs = check_knobs(attention, lam, use_mps, self.loaded.attention_labels)
        if knobs["attention"] in NO_MPS:
            knobs.update(lam=None, use_mps=False)
        return knobs

    def _check_knobs(self, knobs: dict) -> dict:
        return self.check_knobs(knobs["attention"], knobs["lam"], knobs["use_mps"])

    def _predict(self, session: Session, knobs: dict) -> None:
        result = session.predictor.predict(**knobs)
        session.labels = result.labels
        session.knobs = dict(knobs)

    def is_current(self, session: Session | None, image, text: str, mode: str) -> bool:
        """Whether ``session``'s result was computed for this image, these class names and this
        inference mode."""
        if session is None or session.labels is None or session.predictor.mode != mode:
            return False
        upload = Upload.from_value(image)
        if upload is None:
            return False
        if upload.path != session.image_path:
            try:
                if hashlib.sha1(Path(upload.path).read_bytes()).hexdigest() != session.image_key:
                    return False
            except OSError:
                return False
        try:
            return parse_names(text) == session.names
        except UserError:
            return False

    # -- cheap steps -------------------------------------------------------------------------
    def rerender(self, session: Session | None, knobs: dict) -> Session:
        """New λ / attention / MPS switch on the cached embeddings (no encoder runs)."""
        knobs = self._check_knobs(knobs)
        session = _require_result(session)
        with session.lock:
            self._predict(session, knobs)
        return session

    def draw(self, session: Session | None, opacity: float) -> np.ndarray:
        """The overlay of the session's last prediction: (H, W, 3) uint8."""
        opacity = check_opacity(opacity)
        session = _require_result(session)
        return overlay.overlay(session.image, session.labels, session.colors, opacity)

    def outputs(self, session: Session, opacity: float, with_files: bool = True) -> dict:
        """What the overlay tab shows for the session's last prediction (drawing only);
        ``files`` is None unless ``with_files``."""
        drawn = self.draw(session, opacity)
        colors = session.colors
        rows = overlay.legend_rows(session.names, colors, session.labels, session.seen)
        facts = {"mode": self.loaded.mode, **session.knobs, "inference": session.predictor.mode,
                 "backend": self.loaded.backend, "precision": self.loaded.precision,
                 "note": session.note}  # fmt: skip
        info = render.summary(rows, session.labels.shape, **facts)
        stem = f"{session.image_name}-otseg-{len(session.names)}-classes"
        return {
            "overlay": drawn,
            "legend": overlay.legend_html(rows),
            "summary": info,
            "files": render.write_downloads(self.download_dir, session.labels, colors, info, stem)
            if with_files
            else None,
        }

    def prompt_maps(self, session: Session | None, class_name) -> dict:
        """Per-prompt MPS maps of one class under Sinkhorn and under softmax (λ-independent)."""
        session = _require_result(session)
        if class_name not in session.names:
            shown = ", ".join(session.names[:8]) + ("…" if len(session.names) > 8 else "")
            raise UserError(
                f"Class must be one of the segmented classes ({shown}); got {_shown(class_name)}."
            )
        k = session.names.index(class_name)
        with session.lock:
            results = {
                att: session.predictor.predict(attention=att, use_mps=True)
                for att in ("sinkhorn", "softmax")
            }
        lo, hi = overlay.shared_range([r.prompt_maps[k] for r in results.values()])
        grids = {
            att: overlay.prompt_score_grid(
                r.prompt_maps, k, r.templates, class_name, vmin=lo, vmax=hi, shared=True
            )
            for att, r in results.items()
        }
        overlap = {
            att: render.prompt_overlap(np.clip(r.prompt_maps[k], 0, None))
            for att, r in results.items()
        }
        return {"grids": grids, "overlap": overlap}


def _no_progress(*args, **kwargs) -> None:
    pass


def parse_names(text) -> list[str]:
    if not isinstance(text, str):
        raise UserError(f"The class names must be text; got {_shown(text)}.")
    return vocab.parse_vocabulary(text)


def _explain(error: ImageError) -> str:
    """The reader's message as one sentence."""
    return str(error).rstrip(".") + "."


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"Cannot read the uploaded file ({e.strerror}).") from None


def _require_result(session: Session | None) -> Session:
    if session is None or session.labels is None:
        raise UserError(NEED_RESULT)
    return session
