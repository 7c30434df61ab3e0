"""Pure drawing: palette, blended overlay, legend, palette PNG, per-prompt score grids.

Everything takes and returns numpy arrays or PIL images; nothing here imports gradio or torch,
and nothing touches a global random state, so the same inputs always draw the same pixels.
Label maps are ``(H, W)`` integer arrays of ids into the class list; a negative id means
"no label" and leaves the image pixel untouched.
"""

from __future__ import annotations

import colorsys
import functools
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Sasha Trubetskoy's 20 distinct colours, in his recommended order
_DISTINCT_20 = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)  # fmt: skip
_GOLDEN = 0.618033988749895
_BLOCK = 27
_SAT_VAL = (
    (0.85, 0.95), (0.55, 0.75), (0.85, 0.60), (0.45, 0.95), (0.70, 0.80),
    (0.95, 0.75), (0.60, 0.60), (0.70, 0.95), (0.45, 0.80),
)  # fmt: skip

# viridis sampled at 0, 1/8, ..., 1; linear interpolation between anchors is within a few
# levels of the full 256-entry table
_VIRIDIS_ANCHORS = np.array(
    [
        (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
        (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
    ],
    dtype=np.float64,
)  # fmt: skip


def palette(num_classes: int) -> np.ndarray:
    """Deterministic colours for ``num_classes`` classes.

    Returns:
        ``(K, 3)`` uint8 RGB. The first 20 are hand-picked distinct colours; later ones walk the
        hue circle by the golden ratio, 27 at a time for each of 9 (saturation, value) pairs.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    colors = list(_DISTINCT_20[:num_classes])
    for i in range(len(_DISTINCT_20), num_classes):
        j = i - len(_DISTINCT_20)
        # blocks of 27 golden-ratio hues per (saturation, value) pair: consecutive golden
        # hues stay well apart, whereas a short s/v cycle aligns with Fibonacci strides
        sat, val = _SAT_VAL[(j // _BLOCK) % len(_SAT_VAL)]
        hue = (0.05 + j * _GOLDEN) % 1.0
        colors.append(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)))
    return np.array(colors, dtype=np.uint8).reshape(num_classes, 3)


def to_hex(color: Sequence[int]) -> str:
    """``(r, g, b)`` in 0..255 → ``"#rrggbb"``."""
    r, g, b = (int(c) for c in color)
    return f"#{r:02x}{g:02x}{b:02x}"


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be an (H, W) integer array, got {labels.dtype} {labels.shape}"
        )
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"label id {labels.max()} out of range for {num_classes} classes")


def overlay(
    image: np.ndarray, labels: np.ndarray, colors: np.ndarray, opacity: float = 0.5
) -> np.ndarray:
    """Blend class colours over an image.

    ``out = round((1 - opacity) * image + opacity * colors[labels])`` per channel, computed in
    float64; pixels with a negative label keep ``image``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        labels: ``(H, W)`` integer class ids, ``< len(colors)``.
        colors: ``(K, 3)`` uint8 RGB, e.g. ``palette(K)``.
        opacity: in [0, 1]; 0 returns the image, 1 the flat colour map.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.dtype} {image.shape}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match image {image.shape[:2]}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    _check_labels(labels, len(colors))
    # The formula for every (class, channel, image value) is a (K + 1, 3, 256) table (last row:
    # "no label", the identity); a table look-up per pixel is ~3× faster than blending in float.
    x = np.arange(256, dtype=np.float64)
    table = np.empty((len(colors) + 1, 3, 256), dtype=np.uint8)
    table[:-1] = np.rint((1.0 - opacity) * x + opacity * np.asarray(colors, np.float64)[..., None])
    table[-1] = x
    rows = np.where(labels >= 0, labels, len(colors)).astype(np.intp)
    return table.reshape(-1)[(rows[..., None] * 3 + np.arange(3)) * 256 + image]


def class_shares(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Percentage of labelled pixels per class.

    Returns:
        ``(K,)`` float64 in [0, 100], summing to 100 (all zeros if no pixel is labelled).
    """
    _check_labels(labels, num_classes)
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=num_classes).astype(np.float64)
    total = counts.sum()
    return counts * (100.0 / total) if total else counts


@dataclass(frozen=True)
class LegendRow:
    name: str  # class name as the user typed it
    color: str  # "#rrggbb"
    badge: str  # "seen", "novel", or "" when the model's training split is unknown
    share: float  # % of labelled pixels, 0..100


def legend_rows(
    names: Sequence[str],
    colors: np.ndarray,
    labels: np.ndarray,
    seen: Sequence[bool] | None = None,
) -> list[LegendRow]:
    """One legend row per class, in the user's order (absent classes get share 0)."""
    if seen is not None and len(seen) != len(names):
        raise ValueError(f"{len(seen)} seen flags for {len(names)} names")
    shares = class_shares(labels, len(names))
    return [
        LegendRow(
            name=name,
            color=to_hex(colors[i]),
            badge="" if seen is None else ("seen" if seen[i] else "novel"),
            share=float(shares[i]),
        )
        for i, name in enumerate(names)
    ]


def legend_html(rows: Sequence[LegendRow]) -> str:
    """A compact HTML legend; names are escaped, so user text never becomes markup."""
    items = []
    for row in rows:
        badge = f' <small class="badge-{row.badge}">{row.badge}</small>' if row.badge else ""
        items.append(
            f'<li><span style="display:inline-block;width:0.9em;height:0.9em;'
            f'background:{row.color}"></span> {html.escape(row.name)}{badge} '
            f"<small>{row.share:.1f}%</small></li>"
        )
    return '<ul class="otseg-legend">' + "".join(items) + "</ul>"


def label_image(labels: np.ndarray, colors: np.ndarray) -> Image.Image:
    """Label map → palette ("P" mode) image whose pixel values are the class ids.

    Negative labels are stored as 255 (the usual ignore index), so at most 255 classes may be
    used then; otherwise up to 256. The palette holds ``colors`` (ignore index black).
    """
    num_classes = len(colors)
    _check_labels(labels, num_classes)
    has_ignore = labels.size > 0 and labels.min() < 0
    if num_classes > (255 if has_ignore else 256):
        raise ValueError(f"a palette PNG holds at most 256 ids, got {num_classes} classes")
    ids = np.ascontiguousarray(np.where(labels < 0, 255, labels), dtype=np.uint8)
    out = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:num_classes] = colors
    out.putpalette(table.ravel().tolist())
    return out


def label_png_bytes(labels: np.ndarray, colors: np.ndarray) -> bytes:
    """``label_image`` encoded as PNG; ``np.array(Image.open(...))`` gives back the ids."""
    buffer = io.BytesIO()
    label_image(labels, colors).save(buffer, format="PNG")  # optimize=True: 10-30× slower
    return buffer.getvalue()


def colormap(
    values: np.ndarray, vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Float map → viridis-like RGB.

    Args:
        values: any-shape float array. NaNs are drawn as the lowest colour.
        vmin, vmax: range mapped to the ends of the map; default the array's min and max.

    Returns:
        ``values.shape + (3,)`` uint8 RGB.
    """
    values = np.asarray(values, dtype=np.float64)
    lo = np.nanmin(values) if vmin is None else vmin
    hi = np.nanmax(values) if vmax is None else vmax
    scale = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    t = np.clip(np.nan_to_num(scale, nan=0.0), 0.0, 1.0) * (len(_VIRIDIS_ANCHORS) - 1)
    i = np.minimum(t.astype(np.int64), len(_VIRIDIS_ANCHORS) - 2)
    frac = (t - i)[..., None]
    rgb = (1.0 - frac) * _VIRIDIS_ANCHORS[i] + frac * _VIRIDIS_ANCHORS[i + 1]
    return np.rint(rgb).astype(np.uint8)


# Caption fonts, first found wins: CJK-covering fonts first (Debian fonts-wqy-microhei is in
# packages.txt for the Space and installed by .ci/run), then Latin/Greek/Cyrillic DejaVu.
FONT_FILES = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
)


@functools.cache
def caption_font(size: int = 18) -> ImageFont.FreeTypeFont:
    """The first installed font of ``OTSEG_FONT`` / :data:`FONT_FILES`, else Pillow's own."""
    for path in (os.environ.get("OTSEG_FONT", ""), *FONT_FILES):
        if path and Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def can_draw(font: ImageFont.FreeTypeFont, text: str) -> bool:
    """Whether ``font`` has a glyph for every character (missing ones draw as a box)."""
    missing = _glyph(font, "\U000f0000")  # a private-use code point: no font has it
    return all(ch.isspace() or _glyph(font, ch) != missing for ch in set(text))


def _glyph(font: ImageFont.FreeTypeFont, ch: str) -> bytes:
    image = Image.new("L", (2 * font.size, 2 * font.size))
    ImageDraw.Draw(image).text((0, 0), ch, font=font, fill=255)
    return image.tobytes()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """Truncate ``text`` with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _columns(num_prompts: int, most: int) -> int:
    """Tiles per row: a divisor of N up to ``most`` (full rows), else ``most``."""
    for cols in range(min(most, num_prompts), 1, -1):
        if num_prompts % cols == 0 and cols >= min(3, num_prompts):
            return cols
    return max(1, min(most, num_prompts))


def prompt_score_grid(
    scores: np.ndarray,
    class_id: int,
    templates: Sequence[str],
    class_name: str = "",
    tile: int = 240,
    columns: int = 4,
) -> Image.Image:
    """One colour-mapped tile per prompt for one class, captioned by the filled template, and a
    colour scale with the value range underneath.

    All N tiles share one colour scale (the class's min and max over prompts), so tiles can be
    compared with each other. Rows are full where a divisor of N allows; otherwise the last row
    is centred. Captions use :func:`caption_font`; a class name that font cannot draw is left
    out of the captions rather than drawn as boxes.

    Args:
        scores: ``(K, N, h, w)`` float score maps (any resolution; tiles are resized bilinearly).
        class_id: which of the K classes to show.
        templates: N prompt templates with a ``{}`` for the class name.
        class_name: fills the templates' ``{}``.
        tile: tile width in pixels; the height follows the maps' aspect ratio.
        columns: at most this many tiles per row.

    Returns:
        RGB image: ``ceil(N / cols)`` rows of tiles, each with a caption strip below, then the
        colour scale.
    """
    scores = np.asarray(scores)
    if scores.ndim != 4:
        raise ValueError(f"scores must be (K, N, h, w), got shape {scores.shape}")
    num_prompts = scores.shape[1]
    if len(templates) != num_prompts:
        raise ValueError(f"{len(templates)} templates for {num_prompts} prompt maps")
    if not 0 <= class_id < scores.shape[0]:
        raise ValueError(f"class_id {class_id} out of range for {scores.shape[0]} classes")
    maps = scores[class_id].astype(np.float32)
    lo, hi = float(np.nanmin(maps)), float(np.nanmax(maps))
    font = caption_font(max(12, tile // 11))
    name = class_name if can_draw(font, class_name) else "(class)"
    pad, caption_h = 4, font.size + 10
    tile_h = max(1, round(tile * maps.shape[1] / maps.shape[2]))  # keep the map's aspect
    cols = _columns(num_prompts, columns)
    rows = -(-num_prompts // cols)
    row_h = tile_h + caption_h
    scale_h = 2 * font.size + 16
    width = cols * (tile + pad) + pad
    grid = Image.new("RGB", (width, rows * row_h + scale_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for n, template in enumerate(templates):
        row, col = divmod(n, cols)
        in_row = min(cols, num_prompts - row * cols)
        x = pad + col * (tile + pad) + (cols - in_row) * (tile + pad) // 2  # centre a short row
        y = pad + row * row_h
        resized = np.asarray(Image.fromarray(maps[n]).resize((tile, tile_h)))
        grid.paste(Image.fromarray(colormap(resized, lo, hi)), (x, y))
        title = template.replace("{}", name) if "{}" in template else template
        draw.text((x + 2, y + tile_h + 4), _fit(draw, title, font, tile - 4), fill=(0, 0, 0),
                  font=font)  # fmt: skip
    _colour_scale(draw, grid, font, lo, hi, top=pad + rows * row_h + 4)
    return grid


def _colour_scale(draw, grid: Image.Image, font, lo: float, hi: float, top: int) -> None:
    """A horizontal viridis bar across the grid, labelled with the value at each end."""
    left, right = 8, grid.width - 8
    bar = colormap(np.linspace(0.0, 1.0, right - left)[None].repeat(font.size // 2 + 4, 0))
    grid.paste(Image.fromarray(bar), (left, top))
    y = top + bar.shape[0] + 2
    draw.text((left, y), f"{lo:.3g}", fill=(0, 0, 0), font=font)
    high = f"{hi:.3g}"
    draw.text((right - draw.textlength(high, font=font), y), high, fill=(0, 0, 0), font=font)
    middle = "score (one scale for all prompts)"
    draw.text(((grid.width - draw.textlength(middle, font=font)) / 2, y), middle,
              fill=(80, 80, 80), font=font)  # fmt: skip
