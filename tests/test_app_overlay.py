"""Pure drawing on synthetic images: palette, blend formula, shares, PNG, legend, score grid."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.overlay import (
    can_draw,
    caption_font,
    class_shares,
    colormap,
    label_image,
    label_png_bytes,
    legend_html,
    legend_rows,
    overlay,
    palette,
    prompt_score_grid,
    to_hex,
)


@pytest.fixture
def scene() -> tuple[np.ndarray, np.ndarray]:
    """A 6×8 image and a label map: left half class 0, top-right class 2, bottom-right -1."""
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    labels = np.zeros((6, 8), dtype=np.int64)
    labels[:3, 4:] = 2
    labels[3:, 4:] = -1
    return image, labels


def test_palette_is_deterministic_and_ignores_global_rng():
    np.random.seed(0)
    first = palette(200)
    state = np.random.get_state()
    np.random.seed(123)
    assert np.array_equal(first, palette(200))
    np.random.seed(0)
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # untouched by palette()


def test_palette_prefix_is_stable_and_colours_distinct():
    big = palette(256)
    assert big.dtype == np.uint8 and big.shape == (256, 3)
    assert np.array_equal(palette(20), big[:20])
    assert np.array_equal(palette(5), big[:5])
    assert len({tuple(c) for c in big}) == 256
    l1 = np.abs(big[:, None].astype(int) - big[None].astype(int)).sum(-1)
    np.fill_diagonal(l1, 10_000)
    assert l1[:20, :20].min() >= 40  # the hand-picked 20 are far apart
    assert l1[:200, :200].min() >= 10  # up to MAX_CLASSES no near-duplicates
    assert palette(0).shape == (0, 3)
    assert to_hex(big[0]) == "#e6194b"


def test_overlay_matches_the_blend_formula(scene):
    image, labels = scene
    colors = palette(3)
    for opacity in (0.0, 0.3, 0.5, 1.0):
        out = overlay(image, labels, colors, opacity)
        assert out.dtype == np.uint8 and out.shape == image.shape
        expected = np.rint((1 - opacity) * image[0, 0] + opacity * colors[0].astype(float))
        assert np.array_equal(out[0, 0], expected.astype(np.uint8))
        expected = np.rint((1 - opacity) * image[0, 7] + opacity * colors[2].astype(float))
        assert np.array_equal(out[0, 7], expected.astype(np.uint8))
        assert np.array_equal(out[5, 7], image[5, 7])  # negative label: untouched
    assert np.array_equal(overlay(image, labels, colors, 0.0), image)
    assert np.array_equal(
        overlay(image, labels, colors, 1.0)[:, :4], np.broadcast_to(colors[0], (6, 4, 3))
    )


def test_overlay_exact_values_at_opacity_0_25():
    image = np.full((1, 2, 3), 100, dtype=np.uint8)
    colors = np.array([[0, 0, 0], [255, 255, 255]], dtype=np.uint8)
    out = overlay(image, np.array([[0, 1]]), colors, 0.25)
    assert out.tolist() == [[[75, 75, 75], [139, 139, 139]]]  # 75 and rint(138.75)


def test_overlay_rejects_bad_inputs(scene):
    image, labels = scene
    with pytest.raises(ValueError, match="do not match"):
        overlay(image, labels[:, :4], palette(3))
    with pytest.raises(ValueError, match="out of range"):
        overlay(image, labels, palette(2))
    with pytest.raises(ValueError, match="opacity"):
        overlay(image, labels, palette(3), 1.5)
    with pytest.raises(ValueError, match="uint8"):
        overlay(image.astype(np.float32), labels, palette(3))


def test_class_shares_sum_to_100_over_labelled_pixels(scene):
    _, labels = scene
    shares = class_shares(labels, 4)
    assert shares.tolist() == pytest.approx([24 / 36 * 100, 0.0, 12 / 36 * 100, 0.0])
    assert shares.sum() == pytest.approx(100.0)
    assert class_shares(np.full((2, 2), -1), 3).tolist() == [0.0, 0.0, 0.0]


def test_label_png_round_trips_ids_and_embeds_palette(scene):
    _, labels = scene
    colors = palette(3)
    decoded = Image.open(io.BytesIO(label_png_bytes(labels, colors)))
    assert decoded.mode == "P"
    assert np.array_equal(np.array(decoded), np.where(labels < 0, 255, labels))
    table = np.array(decoded.getpalette()).reshape(-1, 3)
    assert np.array_equal(table[:3], colors)


def test_label_png_round_trips_256_classes():
    labels = np.arange(256).reshape(16, 16)
    decoded = Image.open(io.BytesIO(label_png_bytes(labels, palette(256))))
    assert np.array_equal(np.array(decoded), labels)
    with pytest.raises(ValueError, match="at most 256"):
        label_image(np.array([[-1, 0]]), palette(256))  # no id left for the ignore index


def test_legend_rows_keep_order_badges_and_shares(scene):
    _, labels = scene
    rows = legend_rows(["sky", "cat", "tree"], palette(3), labels, [True, False, True])
    assert [r.name for r in rows] == ["sky", "cat", "tree"]
    assert [r.badge for r in rows] == ["seen", "novel", "seen"]
    assert [r.color for r in rows] == [to_hex(c) for c in palette(3)]
    assert sum(r.share for r in rows) == pytest.approx(100.0)
    assert rows[1].share == 0.0
    assert [r.badge for r in legend_rows(["a", "b", "c"], palette(3), labels)] == ["", "", ""]


def test_legend_html_escapes_names(scene):
    _, labels = scene
    rows = legend_rows(["<b>x</b>", "a & b", "c"], palette(3), labels)
    page = legend_html(rows)
    assert "<b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page and "a &amp; b" in page


def test_colormap_hits_anchor_colours_and_is_monotone_in_green():
    rgb = colormap(np.array([0.0, 0.5, 1.0]))
    assert rgb.tolist() == [[68, 1, 84], [33, 144, 141], [253, 231, 37]]
    ramp = colormap(np.linspace(0, 1, 64))
    assert np.all(np.diff(ramp[:, 1].astype(int)) >= 0)
    assert colormap(np.full((2, 2), 3.0)).tolist() == [[[68, 1, 84]] * 2] * 2  # flat map
    assert colormap(np.array([5.0]), vmin=0, vmax=1).tolist() == [[253, 231, 37]]  # clipped


def test_prompt_score_grid_layout_and_shared_scale():
    scores = np.zeros((2, 3, 4, 8), dtype=np.float32)
    scores[1, 0] = 1.0  # class 1: prompt 0 high, prompts 1 and 2 low
    templates = ("a photo of a {}.", "a part of a {}.", "a segment of a {}.")
    grid = prompt_score_grid(scores, 1, templates, class_name="cat", tile=40, columns=4)
    pixels = np.array(grid)
    font_h = caption_font(12).size
    assert grid.mode == "RGB" and grid.width == 3 * (40 + 4) + 4  # 3 prompts: one full row
    assert pixels[4 + 10, 4 + 20].tolist() == [253, 231, 37]  # tile 0: top of the shared scale
    assert pixels[4 + 10, 48 + 20].tolist() == [68, 1, 84]  # tile 1: bottom of the shared scale
    caption = pixels[4 + 20 + 3 : 4 + 20 + 6 + font_h, 4:44]
    assert (caption < 128).any()  # a caption was drawn under tile 0
    scale_top = 4 + 20 + font_h + 10 + 4
    bar = pixels[scale_top + 2, 8 : grid.width - 8]
    assert bar[0].tolist() == [68, 1, 84] and bar[-1].tolist() == [253, 231, 37]
    with pytest.raises(ValueError, match="templates"):
        prompt_score_grid(scores, 0, templates[:2])
    with pytest.raises(ValueError, match="class_id"):
        prompt_score_grid(scores, 2, templates)


def test_prompt_score_grid_has_no_blank_tiles():
    """6 prompts under at most 4 columns: 3 per row, both rows full."""
    scores = np.ones((1, 6, 4, 4), dtype=np.float32)
    scores[0, :, 0, 0] = 0.0
    grid = np.array(prompt_score_grid(scores, 0, ["{}"] * 6, "x", tile=40, columns=4))
    assert grid.shape[1] == 3 * 44 + 4
    font_h = caption_font(12).size
    for row in range(2):
        y = 4 + row * (40 + font_h + 10) + 30
        assert all(grid[y, 4 + c * 44 + 30].tolist() == [253, 231, 37] for c in range(3))


def test_captions_draw_cjk_or_leave_the_name_out():
    font = caption_font(18)
    assert can_draw(font, "cat") and not can_draw(font, "\U000f0001")
    assert can_draw(font, "猫"), f"no CJK font found ({font.path}); install fonts-wqy-microhei"
    scores = np.random.default_rng(0).random((1, 2, 4, 4)).astype(np.float32)
    grid = prompt_score_grid(scores, 0, ["a {}.", "the {}."], "猫", tile=80)
    assert grid.width == 2 * 84 + 4
    placeholder = prompt_score_grid(scores, 0, ["a {}.", "the {}."], "(class)", tile=80)
    assert not np.array_equal(np.asarray(grid), np.asarray(placeholder))  # 猫 was drawn


def test_captions_leave_out_a_name_the_font_cannot_draw(monkeypatch):
    from PIL import ImageFont

    import app.overlay

    monkeypatch.setattr(app.overlay, "caption_font", ImageFont.load_default)  # Latin only
    assert not can_draw(ImageFont.load_default(12), "猫")
    scores = np.random.default_rng(0).random((1, 2, 4, 4)).astype(np.float32)
    grids = [prompt_score_grid(scores, 0, ["a {}.", "the {}."], name, tile=80)
             for name in ("猫", "(class)")]  # fmt: skip
    assert np.array_equal(np.asarray(grids[0]), np.asarray(grids[1]))  # no boxes drawn
