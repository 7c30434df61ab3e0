"""Prediction → what the components show: annotations, legend, summary, downloads, prompt maps.

Pure functions of numpy arrays (plus one that writes the download files), no gradio, no torch,
so they are tested on synthetic label maps.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from app import overlay

MAX_SIDE = 1024  # images are shown and segmented at most this large (the model sees ≤ 512)


def fit_image(rgb: np.ndarray, max_side: int = MAX_SIDE) -> tuple[np.ndarray, str]:
    """Downscale ``(H, W, 3)`` uint8 so its longer side is at most ``max_side``.

    Returns the image and a note for the user ("" when nothing changed).
    """
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb, ""
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(
        Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    )
    return small, f"The image ({w}×{h} px) was downscaled to {size[0]}×{size[1]} px."


def annotated_value(
    image: np.ndarray, labels: np.ndarray, names: Sequence[str], opacity: float
) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """``gr.AnnotatedImage`` value: one mask per present class, its alpha set by ``opacity``.

    Returns:
        ``(image, [(mask, name), ...])`` with masks ``(H, W)`` float32 in {0, opacity}.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    base, masks = overlay.annotations(image, labels, names)
    return base, [(mask * np.float32(opacity), name) for mask, name in masks]


def summary(
    names: Sequence[str],
    labels: np.ndarray,
    colors: np.ndarray,
    seen: Sequence[bool] | None,
    **facts,
) -> dict:
    """JSON-able description of one result: the classes in order with colour, seen flag, share.

    ``facts`` (mode, attention, lam, ...) are copied in front of ``"classes"``.
    """
    rows = overlay.legend_rows(names, colors, labels, seen)
    h, w = labels.shape
    classes = [
        {"id": i, "name": r.name, "color": r.color, "seen": None if seen is None else bool(seen[i]),
         "share": round(r.share, 2)}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    return {**facts, "image_size": [w, h], "classes": classes}


def write_downloads(
    directory: Path, labels: np.ndarray, colors: np.ndarray, info: dict
) -> list[str]:
    """Write the palette label map (pixel value = class id) and the class list as JSON.

    Files go to a fresh sub-folder of ``directory``; sub-folders older than an hour are removed
    first, so a long-running server does not fill its disk.

    Returns:
        ``[label_png_path, classes_json_path]``.
    """
    _prune(directory, max_age_s=3600.0)
    folder = directory / uuid.uuid4().hex
    folder.mkdir(parents=True)
    png = folder / "otseg-labels.png"
    png.write_bytes(overlay.label_png_bytes(labels, colors))
    classes = folder / "otseg-classes.json"
    classes.write_text(json.dumps(info, indent=2, ensure_ascii=False))
    return [str(png), str(classes)]


def _prune(directory: Path, max_age_s: float) -> None:
    if not directory.is_dir():
        return
    cutoff = time.time() - max_age_s
    for folder in directory.iterdir():
        try:
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                for f in folder.iterdir():
                    f.unlink()
                folder.rmdir()
        except OSError:
            pass  # another request is cleaning the same folder


def prompt_overlap(maps: np.ndarray) -> float:
    """Mean pairwise cosine similarity between the N per-prompt maps of one class.

    Args:
        maps: ``(N, h, w)`` non-negative score maps.

    Returns:
        In [0, 1] for non-negative maps: 1 when all prompts highlight the same pixels, lower
        when they spread over different regions (what Sinkhorn's pixel marginal encourages).
    """
    flat = np.asarray(maps, dtype=np.float64).reshape(maps.shape[0], -1)
    n = flat.shape[0]
    if n < 2:
        return 1.0
    unit = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    gram = unit @ unit.T
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


def changed_share(a: np.ndarray, b: np.ndarray) -> float:
    """Percentage of pixels whose label differs between two label maps of one shape."""
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    return float(100.0 * np.mean(a != b)) if a.size else 0.0
