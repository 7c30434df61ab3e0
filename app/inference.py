"""Model loading (once per process) and the event handlers of the demo.

The model is shared, read-only, by every user. Everything of one user — the image, its
embeddings, the vocabulary, the last label map — lives in a :class:`Session` kept in that
user's ``gr.State``. The predictor caches the image embedding, the text embeddings and the
head's maps, so a λ change only re-fuses, an attention switch only re-runs the head, and an
opacity change only re-draws.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from app import overlay, render, vocab
from otseg.predictor import OTSegPredictor
from otseg.preprocess import ImageError, load_image

ATTENTION_LABELS = {"sinkhorn": "Sinkhorn (OTSeg: MPS + MPSA)", "softmax": "Softmax (baseline)"}
HOW_TO_TRAINED = (
    "To see real OTSeg, start the app with `python app.py --model original:coco-transductive` "
    "(the authors' weights, downloaded once) or `--model <hub-id or dir>`, or set `OTSEG_MODEL`."
)


@dataclass
class LoadedModel:
    """The process-wide model and how the UI should describe it."""

    model: nn.Module | None  # OTSeg or TrainingFreeOTSeg; None when nothing could be loaded
    mode: str  # "trained" | "training-free" | "none"
    status: str  # Markdown shown at the top of the page
    precision: str = "fp32"
    device: str = "cpu"

    @property
    def train_names(self) -> tuple[str, ...]:
        return self.model.config.class_names if self.model is not None else ()

    def mark_seen(self, names: list[str]) -> list[bool] | None:
        """Seen flags for a trained model; None (no badges) when there is no training split."""
        if self.mode != "trained":
            return None
        cfg = self.model.config
        return vocab.mark_seen(names, cfg.class_names, cfg.seen)


def load_model(
    model: str | None,
    *,
    clip_model: str = "ViT-B-16-quickgelu",
    clip_pretrained: str | None = "openai",
    precision: str = "fp32",
    device: str = "cpu",
) -> LoadedModel:
    """A trained OTSeg from ``model`` (Hub id or directory); else training-free CLIP; else none.

    Never raises for missing or wrong weights: the reason goes into ``status``.
    """
    from otseg.hub import CheckpointError, WeightsNotFoundError
    from otseg.model import OTSeg
    from otseg.training_free import build_training_free

    problem = ""
    if model:
        try:
            net = OTSeg.from_pretrained(model, device=device)
            cfg = net.config
            title = net.card.get("title") or "Trained OTSeg"  # e.g. "OTSeg (authors' weights, …)"
            status = (
                f"**{title}** `{model}` — trained on *{cfg.dataset}* "
                f"({len(cfg.seen)} seen of {len(cfg.class_names)} classes). Names of its seen "
                "classes get a **seen** badge, all others **novel**."
            )
            return LoadedModel(net, "trained", status, precision, device)
        except (WeightsNotFoundError, CheckpointError, ValueError) as e:
            problem = f"⚠️ Could not load `{model}`: {e}\n\n"
    try:
        net = build_training_free(clip_model, clip_pretrained).to(device)
    except (WeightsNotFoundError, CheckpointError, ValueError, RuntimeError) as e:
        status = (
            f"{problem}**No model loaded** — the CLIP weights `{clip_model}` / "
            f"`{clip_pretrained}` are not available ({_first_line(e)}). Run once with internet "
            "access so they are cached, or point `--clip`/`OTSEG_CLIP` at a local open_clip "
            f"directory (`local-dir:/path`). {HOW_TO_TRAINED}"
        )
        return LoadedModel(None, "none", status, precision, device)
    status = (
        f"{problem}**Training-free mode** — no OTSeg checkpoint is configured, so this runs the "
        f"frozen CLIP `{clip_model}` (MaskCLIP-style dense features) scored against "
        f"{net.config.num_prompts} prompts per class with MPS; masks are coarse and every name "
        f"is novel. {HOW_TO_TRAINED}"
    )
    return LoadedModel(net, "training-free", status, precision, device)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__


@dataclass
class Session:
    """One user's state: their predictor (around the shared model) and last result."""

    predictor: OTSegPredictor
    lock: threading.Lock = field(default_factory=threading.Lock)
    image_key: str | None = None  # sha1 of the uploaded file
    image: np.ndarray | None = None  # (H, W, 3) uint8 as segmented and shown
    note: str = ""  # e.g. "the image was downscaled"
    names: list[str] = field(default_factory=list)
    seen: list[bool] | None = None
    labels: np.ndarray | None = None  # (H, W) int32 of the last prediction
    knobs: dict = field(default_factory=dict)  # attention, lam, use_mps of the last prediction

    @property
    def colors(self) -> np.ndarray:
        return overlay.palette(len(self.names))


class UserError(ValueError):
    """Bad input from the user; the UI shows the message as is."""


class Handlers:
    """The demo's event handlers, bound to the process-wide :class:`LoadedModel`.

    Each returns plain numpy / PIL / dicts / file paths; ``app.ui`` turns them into components.
    """

    def __init__(self, loaded: LoadedModel, download_dir: Path | None = None) -> None:
        self.loaded = loaded
        self.download_dir = download_dir or Path(tempfile.gettempdir()) / "otseg-demo"

    def new_session(self) -> Session:
        if self.loaded.model is None:
            raise UserError(self.loaded.status)
        return Session(OTSegPredictor(self.loaded.model, precision=self.loaded.precision))

    # -- the expensive step: image and vocabulary --------------------------------------------
    def segment(
        self,
        session: Session | None,
        image_path: str | None,
        text: str,
        knobs: dict,
        progress=None,
    ) -> Session:
        """Encode the image (if new) and the vocabulary (if new), then predict with ``knobs``."""
        step = progress or (lambda *a, **k: None)
        if not image_path:
            raise UserError("Upload an image (or pick an example) first.")
        names = vocab.parse_vocabulary(text)
        session = session or self.new_session()
        data = _read(image_path)
        key = hashlib.sha1(data).hexdigest()
        with session.lock:
            pred = session.predictor
            if key != session.image_key:
                step(0.05, desc="Reading the image")
                try:
                    rgb, note = render.fit_image(load_image(data))
                except ImageError as e:
                    raise UserError(f"Cannot use this file: {_explain(e)}") from None
                step(0.15, desc="Encoding the image")
                pred.set_image(rgb)
                session.image_key, session.image, session.note = key, rgb, note
            if names != session.names:
                model = self.loaded.model
                for i in range(0, len(names), 16):  # warm the text cache in steps, for progress
                    step(0.4 + 0.4 * i / len(names), desc=f"Encoding {len(names)} class names")
                    model.embed_text(names[i : i + 16])
                seen = self.loaded.mark_seen(names)
                pred.set_vocabulary(names, seen=seen or [False] * len(names))
                session.names, session.seen = names, seen
            step(0.9, desc="Segmenting")
            self._predict(session, knobs)
        return session

    def _predict(self, session: Session, knobs: dict) -> None:
        result = session.predictor.predict(
            attention=knobs["attention"], lam=knobs["lam"], use_mps=knobs["use_mps"]
        )
        session.labels = result.labels
        session.knobs = {k: knobs[k] for k in ("attention", "lam", "use_mps")}

    # -- cheap steps -------------------------------------------------------------------------
    def rerender(self, session: Session | None, knobs: dict) -> Session:
        """New λ / attention / MPS switch on the cached embeddings (no encoder runs)."""
        session = _require_result(session)
        with session.lock:
            self._predict(session, knobs)
        return session

    def outputs(self, session: Session, opacity: float) -> dict:
        """What the overlay tab shows for the session's last prediction (drawing only)."""
        session = _require_result(session)
        colors = session.colors
        facts = {"mode": self.loaded.mode, **session.knobs, "note": session.note}
        info = render.summary(session.names, session.labels, colors, session.seen, **facts)
        return {
            "annotated": render.annotated_value(
                session.image, session.labels, session.names, opacity
            ),
            "color_map": overlay.color_map(session.names, colors),
            "legend": overlay.legend_html(
                overlay.legend_rows(session.names, colors, session.labels, session.seen)
            ),
            "summary": info,
            "files": render.write_downloads(self.download_dir, session.labels, colors, info),
        }

    def compare(self, session: Session | None, lam: float, use_mps: bool, opacity: float) -> dict:
        """Sinkhorn and softmax overlays of the same image and vocabulary."""
        session = _require_result(session)
        with session.lock:
            labels = {
                att: session.predictor.predict(attention=att, lam=lam, use_mps=use_mps).labels
                for att in ("sinkhorn", "softmax")
            }
        colors = session.colors
        drawn = {
            att: overlay.overlay(session.image, lab, colors, opacity) for att, lab in labels.items()
        }
        changed = render.changed_share(labels["sinkhorn"], labels["softmax"])
        return {"images": (drawn["sinkhorn"], drawn["softmax"]), "changed": changed}

    def prompt_maps(self, session: Session | None, class_name: str, lam: float) -> dict:
        """Per-prompt MPS maps of one class under Sinkhorn and under softmax."""
        session = _require_result(session)
        if class_name not in session.names:
            raise UserError(
                f"Choose one of the segmented classes ({', '.join(session.names[:8])}…)."
            )
        k = session.names.index(class_name)
        grids, overlap = {}, {}
        with session.lock:
            for att in ("sinkhorn", "softmax"):
                result = session.predictor.predict(attention=att, lam=lam, use_mps=True)
                grids[att] = overlay.prompt_score_grid(
                    result.prompt_maps, k, result.templates, class_name
                )
                overlap[att] = render.prompt_overlap(np.clip(result.prompt_maps[k], 0, None))
        return {"grids": grids, "overlap": overlap}


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
        raise UserError("Upload an image and press Segment first.")
    return session
