"""The comparison tab: two sides on the current image and names, each a variant of the loaded
model or of a second model (``zegclip:coco-transductive`` against ``original:coco-transductive``,
say), loaded on demand and kept for later comparisons.

What a comparison returns: one overlay per side (an image slider), a label per side saying
exactly what it is (model, variant and its one-sentence description, λ and the MPS switch or
that they do not apply), the share of pixels whose label differs, a per-class difference table,
and, on request, the per-prompt maps of one class for both sides on one colour scale.

The comparison always uses the image and names in the inputs: when they are not the ones of
the last Segment, the loaded model's side encodes them in a predictor of its own (the page's
result is left alone), as does every second model.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from app import gpu, overlay, render
from app.inference import (
    Handlers,
    LoadedModel,
    Session,
    Upload,
    _first_line,
    _fraction,
    _read,
    check_inference,
    check_opacity,
    parse_names,
)
from otseg.draw import class_shares
from otseg.errors import UserError, WeightsNotFoundError
from otseg.inference.predictor import OTSegPredictor, Prediction
from otseg.inference.preprocess import ImageError, load_image
from otseg.nn.variants import NO_MPS, default_attention, describe, resolve_for
from otseg.registry import type_of
from otseg.weights.original import TABLES

LOADED = "loaded"  # a side's source: the model the demo was started with
DEFAULT = "default"  # a side's attention: the model's own variant
VARIANT_LABELS = {
    DEFAULT: "the model's own",
    "sinkhorn": "Sinkhorn (OTSeg)",
    "softmax": "Softmax (multi-prompt ablation)",
    "zegclip": "ZegCLIP's inference",
    "none": "no transport (ZegOT)",
}
MODELS_ENV = "OTSEG_COMPARE_MODELS"  # comma-separated extra references offered as a second model
KEEP_MODELS = 2  # second models kept loaded at most (the least recently used goes)
TABLE_HEADERS = ["class", "seen (left / right)", "left %", "right %", "Δ points", "same pixels %"]


@dataclass(frozen=True)
class Side:
    """One side of a comparison: where the model comes from and which variant runs."""

    source: str  # LOADED or a model reference (zegclip:…, original:…, a directory, a Hub id)
    attention: str  # DEFAULT or a variant name


def released_choices() -> list[tuple[str, str]]:
    """(label, reference) of every released checkpoint that can be downloaded."""
    out = []
    for table in TABLES.values():
        for entry in table.values():
            if not entry.refused:
                out.append((f"{entry.release.model}, {entry.title} ({entry.ref})", entry.ref))
    return out


class SideModels:
    """The loaded model plus second models loaded on demand (process-wide, shared read-only by
    every user like the loaded one), at most ``keep`` of them, the least recently used dropped.

    Only references offered in :meth:`choices` can be loaded: the released checkpoints and
    those the operator lists in ``OTSEG_COMPARE_MODELS`` (a public demo must not load whatever
    a visitor types)."""

    def __init__(
        self,
        loaded: LoadedModel | Handlers,
        extra: list[str] | None = None,
        keep: int = KEEP_MODELS,
    ) -> None:
        self._loaded = loaded  # the demo's handlers: their model once loaded in the background
        if extra is None:
            extra = [r.strip() for r in os.environ.get(MODELS_ENV, "").split(",") if r.strip()]
        self.extra = extra
        self.keep = keep
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def loaded(self) -> LoadedModel:
        """The demo's own model (what its handlers say, while it loads too)."""
        return self._loaded.loaded if isinstance(self._loaded, Handlers) else self._loaded

    def choices(self) -> list[tuple[str, str]]:
        here = "this demo's model"
        if self.loaded.model is not None:
            here = f"This demo's model ({type_of(self.loaded.model).title})"
        return [(here, LOADED), *((ref, ref) for ref in self.extra), *released_choices()]

    def title(self, source: str) -> str:
        """How a side's model is named in its label."""
        if source == LOADED:
            model = self.loaded.model
            return (getattr(model, "card", {}) or {}).get("title") or (
                f"this demo's {type_of(model).title} model"
            )
        model = self._models[source].model
        return (getattr(model, "card", {}) or {}).get("title") or type_of(model).title

    def get(self, source: str, progress=None) -> LoadedModel:
        """The model of ``source``, loading it first if needed (a UserError if it cannot be)."""
        if source == LOADED:
            if self.loaded.model is None:
                raise UserError(self.loaded.message)
            return self.loaded
        if source not in {value for _, value in self.choices()}:
            raise UserError(
                f"A second model must be one of the offered ones (the released checkpoints or "
                f"{MODELS_ENV}); got “{str(source)[:60]}”."
            )
        with self._lock:
            if source in self._models:
                self._models.move_to_end(source)
                return self._models[source]
            if progress is not None:
                progress(0.05, desc=f"Loading {source} (downloaded and converted on first use)")
            self._models[source] = self._load(source)
            while len(self._models) > self.keep:
                _, old = self._models.popitem(last=False)
                gpu.unregister(old.key)
            return self._models[source]

    def _load(self, source: str) -> LoadedModel:
        from otseg.weights.pretrained import from_pretrained

        try:
            net = from_pretrained(source)
        except (WeightsNotFoundError, UserError) as e:
            raise UserError(f"Could not load {source}: {_first_line(e)}") from None
        return LoadedModel(net.to(self.loaded.model.device).eval(), "trained", source,
                           self.loaded.precision, backend=self.loaded.backend)  # fmt: skip


def variant_choices(loaded: LoadedModel) -> list[tuple[str, str]]:
    """(label, value) of the attention dropdowns: the loaded model's own labels where it has
    the variant (ZegOT's "sinkhorn" is MPOT), the generic ones otherwise."""
    own = loaded.attention_labels if loaded.model is not None else {}
    return [(own.get(k, label), k) for k, label in VARIANT_LABELS.items()]


def check_side(source, attention, where: str) -> Side:
    if not isinstance(source, str) or not source:
        raise UserError(f"The {where} model must be chosen; got “{source}”.")
    if attention not in VARIANT_LABELS:
        raise UserError(
            f"The {where} attention must be one of {', '.join(VARIANT_LABELS)}; got “{attention}”."
        )
    return Side(source, attention)


def inputs_key(image_key, names, mode, lam, use_mps, opacity) -> tuple:
    """What a comparison depends on besides its sides: it is out of date when this changes."""
    return (image_key, tuple(names), mode, float(lam), bool(use_mps), float(opacity))


def session_inputs_key(session: Session, lam, use_mps, opacity) -> tuple:
    """:func:`inputs_key` of the page's current result."""
    return inputs_key(
        session.image_key, session.names, session.predictor.mode, lam, use_mps, opacity
    )


class Comparisons:
    """The comparison tab's handlers, around the demo's :class:`Handlers`."""

    def __init__(self, handlers: Handlers, models: SideModels | None = None) -> None:
        self.handlers = handlers
        self.models = models or SideModels(handlers)

    def default_sides(self) -> tuple[Side, Side]:
        """Left: the loaded model's own variant; right: ZegCLIP's inference on the same weights
        (or softmax where the model has no such variant, or for ZegCLIP's own weights)."""
        model = self.handlers.loaded.model
        own = default_attention(model) if model is not None else "sinkhorn"
        accepted = getattr(model, "attentions", ("sinkhorn", "softmax"))
        other = next((a for a in ("zegclip", "softmax") if a in accepted and a != own), own)
        return Side(LOADED, DEFAULT), Side(LOADED, other)

    def compare(
        self,
        session: Session | None,
        image,
        text,
        mode,
        lam,
        use_mps,
        opacity,
        sides: tuple[Side, Side],
        progress=None,
    ) -> tuple[Session, dict]:
        """Both sides on the image and names given (not necessarily the last Segment's)."""
        step = progress if progress is not None else (lambda *a, **k: None)
        lam, opacity = _fraction("λ", lam), check_opacity(opacity)
        mode = check_inference(mode)
        if not isinstance(use_mps, bool):
            raise UserError(f"use_mps must be true or false; got “{use_mps}”.")
        upload = image if isinstance(image, Upload) else Upload.from_value(image)
        if upload is None:
            raise UserError("Upload an image (or pick an example) first.")
        names = parse_names(text)
        self.handlers.wait_for_model(progress)
        session = session or self.handlers.new_session(mode)
        data = _read(upload.path)
        key = hashlib.sha1(data).hexdigest()
        rgb = None  # the image as segmented (decoded once, if a side needs it)
        results = []
        with session.lock:
            for i, side in enumerate(sides):
                loaded = self.models.get(side.source, step)
                found = self._predictor(session, side.source, loaded, key, names, mode)
                if found is None:  # a new image or names for this side's predictor
                    found = self._fresh_predictor(
                        session, side.source, loaded, data, key, names, mode, rgb, step
                    )
                predictor, rgb = found
                step(0.5 + 0.2 * i, desc="Segmenting")
                attention = side.attention
                if attention == DEFAULT:
                    attention = default_attention(loaded.model)
                if attention not in predictor.model.attentions:
                    raise UserError(
                        f"{self.models.title(side.source)} has no attention “{attention}”; "
                        f"choose one of {', '.join(predictor.model.attentions)}."
                    )
                variant = resolve_for(
                    predictor.model,
                    attention,
                    None if attention in NO_MPS else lam,
                    None if attention in NO_MPS else use_mps,
                )
                results.append((side, loaded, predictor.predict(**variant.as_dict())))
            session.comparison = {
                "names": names,
                "sides": [
                    {
                        "label": self.side_label(name, side, result),
                        "prompt_maps": result.prompt_maps,
                        "templates": result.templates,
                        "attention": result.attention,
                        "use_mps": result.use_mps,
                    }
                    for name, (side, _, result) in zip(("Left", "Right"), results, strict=True)
                ],
            }
            session.compared = inputs_key(key, names, mode, lam, use_mps, opacity)
        (_, _, left), (_, _, right) = results
        colors = overlay.palette(len(names))
        drawn = [overlay.overlay(rgb, r.labels, colors, opacity) for r in (left, right)]
        return session, {
            "images": tuple(drawn),
            "labels": [s["label"] for s in session.comparison["sides"]],
            "changed": render.changed_share(left.labels, right.labels),
            "table": difference_table(names, left, right),
            "names": names,
        }

    def _predictor(self, session, source, loaded, key, names, mode):
        """(predictor, image) of ``source`` already holding this image, names and mode, or
        None."""
        if (
            source == LOADED
            and session.labels is not None
            and (session.image_key, session.names, session.predictor.mode) == (key, names, mode)
        ):
            return session.predictor, session.image  # the page's result: nothing to encode
        entry = session.compare_predictors.get(source)
        if (
            entry is not None
            and (entry["key"], entry["names"], entry["model_key"]) == (key, names, loaded.key)
            and entry["predictor"].mode == mode
        ):
            return entry["predictor"], entry["image"]
        return None

    def _fresh_predictor(self, session, source, loaded, data, key, names, mode, rgb, step):
        entry = session.compare_predictors.get(source)
        reuse = (  # the same model (not dropped meanwhile) and mode: keep its encodings
            entry is not None
            and entry["model_key"] == loaded.key
            and gpu.is_registered(loaded.key)
            and entry["predictor"].mode == mode
        )
        predictor = (
            entry["predictor"]
            if reuse  # the tower's backend and precision apply behind the boundary (app.gpu)
            else OTSegPredictor(gpu.RemoteModel(loaded.key), mode=mode, backend="torch")
        )
        if reuse and entry["key"] == key:
            rgb = entry["image"]
        else:
            if rgb is None:
                step(0.1, desc="Reading the image")
                try:
                    rgb, _ = render.fit_image(load_image(data), render.stored_size(data))
                except ImageError as e:
                    raise UserError(f"Cannot use this file: {str(e).rstrip('.')}.") from None
            step(0.2, desc=f"Encoding the image ({self.models.title(source)})")
            predictor.set_image(rgb)
        if not reuse or entry["names"] != names or entry["key"] != key:
            step(0.35, desc=f"Encoding {len(names)} class names")
            try:
                seen = loaded.mark_seen(names)
                predictor.set_vocabulary(names, seen=seen or [False] * len(names))
            except UserError as e:
                raise UserError(_first_line(e)) from None
        session.compare_predictors[source] = {
            "predictor": predictor, "key": key, "names": names, "model_key": loaded.key,
            "image": rgb,
        }  # fmt: skip
        return predictor, rgb

    def side_label(self, name: str, side: Side, result: Prediction) -> str:
        """What a side is, exactly: model, variant, its description, λ and MPS."""
        source = "" if side.source == LOADED else f" (`{side.source}`)"
        if result.attention in NO_MPS:
            knobs = "no MPS map, so no λ"
        elif not result.use_mps:
            knobs = "MPS map off (decoder only)"
        else:
            knobs = f"λ = {result.lam:.2f}"
        return (
            f"**{name}: {self.models.title(side.source)}{source} · `{result.attention}`** "
            f"({knobs}) — {result.description or describe(None, result.attention)}"
        )

    def prompt_maps(self, session: Session | None, class_name) -> dict:
        """The per-prompt maps of one class for both sides, on one colour scale."""
        comparison = getattr(session, "comparison", None)
        if comparison is None:
            raise UserError("Press **Compare on this image** first.")
        names = comparison["names"]
        if class_name not in names:
            raise UserError(
                f"Class must be one of the compared classes ({', '.join(names[:8])}); "
                f"got “{str(class_name)[:40]}”."
            )
        k = names.index(class_name)
        sides = comparison["sides"]
        with_maps = [s for s in sides if s["prompt_maps"] is not None]
        lo_hi = (
            overlay.shared_range([s["prompt_maps"][k] for s in with_maps]) if with_maps else None
        )
        grids, notes = [], []
        for name, s in zip(("Left", "Right"), sides, strict=True):
            if s["prompt_maps"] is None:
                grids.append(None)
                why = "it has no MPS map" if s["attention"] in NO_MPS else "its MPS map is off"
                notes.append(f"{name}: no per-prompt maps ({why}).")
                continue
            grids.append(
                overlay.prompt_score_grid(
                    s["prompt_maps"], k, s["templates"], class_name,
                    vmin=lo_hi[0], vmax=lo_hi[1], shared=len(with_maps) == 2,
                )
            )  # fmt: skip
        scale = (
            f"One colour scale for both sides: {lo_hi[0]:.3g} to {lo_hi[1]:.3g}."
            if len(with_maps) == 2
            else ""
        )
        return {"grids": grids, "note": " ".join([scale, *notes]).strip()}


def difference_table(names: list[str], left: Prediction, right: Prediction) -> list[list]:
    """Per class: seen flags, pixel share on each side, their difference, and how many of the
    pixels either side gives the class both give it (the class masks' IoU, %)."""
    k = len(names)
    share_l = class_shares(left.labels, k)
    share_r = class_shares(right.labels, k)
    rows = []
    for i, name in enumerate(names):
        a, b = left.labels == i, right.labels == i
        union = int(np.logical_or(a, b).sum())
        same = 100.0 * np.logical_and(a, b).sum() / union if union else 100.0
        seen = f"{_seen(left, i)} / {_seen(right, i)}"
        left_pct, right_pct = float(share_l[i]), float(share_r[i])
        rows.append([name, seen, round(left_pct, 1), round(right_pct, 1),
                     round(right_pct - left_pct, 1), round(float(same), 1)])  # fmt: skip
    return rows


def _seen(result: Prediction, i: int) -> str:
    return "seen" if result.seen[i] else "novel"
