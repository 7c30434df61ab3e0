"""Prediction → what the components show: image fitting, legend, summary, downloads, prompt maps.

Pure functions of numpy arrays (plus one that writes the download files), no gradio, no torch,
so they are tested on synthetic label maps.
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from app import overlay

MAX_SIDE = 1024  # images are shown and segmented at most this large (the model sees ≤ 512)
DOWNLOAD_AGE_S = 3600.0  # download folders older than this are removed ...
PRUNE_EVERY_S = 60.0  # ... by at most one scan of the download directory this often
_pruned_at: dict[Path, float] = {}  # download directory → time.time() of its last scan


def stored_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of an image file as displayed (EXIF rotation applied), read from its
    header only; None if the header cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            rotated = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientation
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return (h, w) if rotated else (w, h)


def fit_image(
    rgb: np.ndarray, original: tuple[int, int] | None = None, max_side: int = MAX_SIDE
) -> tuple[np.ndarray, str]:
    """Downscale ``(H, W, 3)`` uint8 so its longer side is at most ``max_side``.

    Args:
        rgb: the decoded image (possibly already reduced while decoding a huge JPEG).
        original: ``(width, height)`` of the file as uploaded, for the note.

    Returns the image and a note for the user ("" when it is shown at its original size).
    """
    h, w = rgb.shape[:2]
    original = original or (w, h)
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = np.asarray(
            Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        )
    shown = (rgb.shape[1], rgb.shape[0])
    if shown == tuple(original):
        return rgb, ""
    return rgb, (
        f"The image ({original[0]}×{original[1]} px) was downscaled to {shown[0]}×{shown[1]} px."
    )


def summary(rows: Sequence[overlay.LegendRow], image_size: tuple[int, int], **facts) -> dict:
    """JSON-able description of one result: the classes (``overlay.legend_rows``, in order)
    with colour, seen flag (None without a training split) and share.

    ``image_size`` is the label map's ``(H, W)``; ``facts`` (mode, attention, lam, ...) are
    copied in front of ``"classes"``.
    """
    h, w = image_size
    classes = [
        {"id": i, "name": r.name, "color": r.color, "seen": _SEEN.get(r.badge),
         "share": round(r.share, 2)}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    return {**facts, "image_size": [w, h], "classes": classes}


_SEEN = {"seen": True, "novel": False}  # legend badge → JSON seen flag ("" → None)


def write_downloads(
    directory: Path, labels: np.ndarray, colors: np.ndarray, info: dict, stem: str = "otseg"
) -> list[str]:
    """Write the palette label map (pixel value = class id) and the class list as JSON.

    Files go to a fresh sub-folder of ``directory``, named ``<stem>-labels.png`` and
    ``<stem>.json`` (``stem`` made file-name safe). Sub-folders older than an hour are removed,
    at most once a minute (every re-render writes here), so a long-running server does not fill
    its disk.

    Returns:
        ``[label_png_path, classes_json_path]``.
    """
    now = time.time()
    if now - _pruned_at.get(directory, 0.0) >= PRUNE_EVERY_S:
        _pruned_at[directory] = now
        _prune(directory, max_age_s=DOWNLOAD_AGE_S)
    folder = directory / uuid.uuid4().hex
    folder.mkdir(parents=True)
    stem = re.sub(r"[^\w.-]+", "_", stem).strip("._")[:80] or "otseg"
    png = folder / f"{stem}-labels.png"
    png.write_bytes(overlay.label_png_bytes(labels, colors))
    classes = folder / f"{stem}.json"
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
