"""Pure drawing: palette, blended overlay, legend, palette PNG, per-prompt score grids.

The label-map drawing (palette, overlay, shares, palette PNG) is :mod:`otseg.draw`, shared with
``otseg segment`` and re-exported here; the legend and the prompt-map grids are the demo's own.
Everything takes and returns numpy arrays or PIL images; nothing here imports gradio or torch,
and nothing touches a global random state, so the same inputs always draw the same pixels.
Label maps are ``(H, W)`` integer arrays of ids into the class list; a negative id means
"no label" and leaves the image pixel untouched.
"""

from __future__ import annotations

import functools
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from otseg.draw import (  # noqa: F401 - the demo's drawing API, re-exported
    class_shares,
    label_image,
    label_png_bytes,
    overlay,
    palette,
    to_hex,
)

# viridis sampled at 0, 1/8, ..., 1; linear interpolation between anchors is within a few
# levels of the full 256-entry table
_VIRIDIS_ANCHORS = np.array(
    [
        (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
        (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
    ],
    dtype=np.float64,
)  # fmt: skip


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
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    shared: bool = False,
) -> Image.Image:
    """One colour-mapped tile per prompt for one class, captioned by the filled template, and a
    colour scale with the value range underneath.

    All N tiles share one colour scale (the class's min and max over prompts, or ``vmin`` to
    ``vmax``: pass one range, see :func:`shared_range`, to several grids so that their colours
    compare too; ``shared`` says so under the scale), so tiles can be compared with each other. Rows are full where a divisor of N allows; otherwise the last row
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
    lo = float(np.nanmin(maps)) if vmin is None else float(vmin)
    hi = float(np.nanmax(maps)) if vmax is None else float(vmax)
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
    label = "score (one scale for both grids)" if shared else "score (one scale for all prompts)"
    _colour_scale(draw, grid, font, lo, hi, top=pad + rows * row_h + 4, label=label)
    return grid


def shared_range(maps: Sequence[np.ndarray]) -> tuple[float, float]:
    """(min, max) over several arrays of maps: one colour scale for grids drawn side by side."""
    values = [np.asarray(m, dtype=np.float32) for m in maps]
    return (
        float(min(np.nanmin(v) for v in values)),
        float(max(np.nanmax(v) for v in values)),
    )


def _colour_scale(
    draw, grid: Image.Image, font, lo: float, hi: float, top: int, label: str
) -> None:
    """A horizontal viridis bar across the grid, labelled with the value at each end."""
    left, right = 8, grid.width - 8
    bar = colormap(np.linspace(0.0, 1.0, right - left)[None].repeat(font.size // 2 + 4, 0))
    grid.paste(Image.fromarray(bar), (left, top))
    y = top + bar.shape[0] + 2
    draw.text((left, y), f"{lo:.3g}", fill=(0, 0, 0), font=font)
    high = f"{hi:.3g}"
    draw.text((right - draw.textlength(high, font=font), y), high, fill=(0, 0, 0), font=font)
    ends = draw.textlength(f"{lo:.3g}", font=font) + draw.textlength(high, font=font)
    if draw.textlength(label, font=font) + ends + 16 <= right - left:  # else the ends only
        draw.text(((grid.width - draw.textlength(label, font=font)) / 2, y), label,
                  fill=(80, 80, 80), font=font)  # fmt: skip
