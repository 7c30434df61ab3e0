"""The comparison tab's handlers: both sides on the current image and names (not the last
Segment's), a second model loaded on demand and kept, per-side labels, the per-class table and
the prompt maps of two sides on one colour scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import compare, gpu, overlay
from app.compare import LOADED, Comparisons, Side, SideModels
from app.inference import Handlers, load_model
from otseg import OTSegPredictor, from_pretrained
from otseg.errors import UserError
from tests.demo_helpers import tiny_dirs, tiny_zegclip_dir, write_photo

NAMES = "cat, class0, sky"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    clip, model = tiny_dirs(root)
    return clip, model, tiny_zegclip_dir(root, clip)


@pytest.fixture
def comparisons(dirs, tmp_path) -> Comparisons:
    _, model, zegclip = dirs
    loaded = load_model(str(model))
    handlers = Handlers(loaded, tmp_path / "dl")
    return Comparisons(handlers, SideModels(loaded, extra=[str(zegclip)]))


def direct(model_ref: str, image: Path, names: list[str], **knobs):
    """The same prediction straight from the library (what a side must show)."""
    predictor = OTSegPredictor(from_pretrained(model_ref))
    predictor.set_image(np.asarray(Image.open(image).convert("RGB")))
    predictor.set_vocabulary(names)
    return predictor.predict(**knobs)


def test_compare_runs_on_the_current_image_not_the_last_segmented_one(comparisons, dirs, tmp_path):
    """The bug this tab had: after a new upload, "Compare on this image" compared the previous
    image. Now both sides run on the image and names given, and the page's result is kept."""
    h = comparisons.handlers
    first = write_photo(tmp_path / "a.png")
    second = write_photo(tmp_path / "b.png", h=64, w=100, seed=3)
    knobs = {"attention": "sinkhorn", "lam": 0.5, "use_mps": True}
    session = h.segment(None, str(first), "cat, class0", knobs)
    page_labels = session.labels.copy()
    sides = (Side(LOADED, "sinkhorn"), Side(LOADED, "zegclip"))
    session, out = comparisons.compare(session, str(second), NAMES, "slide", 0.5, True, 0.5, sides)
    assert out["images"][0].shape == out["images"][1].shape == (64, 100, 3)
    want = direct(str(dirs[1]), second, ["cat", "class0", "sky"], attention="zegclip")
    got = session.comparison["sides"][1]
    assert got["attention"] == "zegclip" and got["prompt_maps"] is None
    np.testing.assert_array_equal(session.labels, page_labels)  # the page's result untouched
    assert session.names == ["cat", "class0"]
    # the drawn right side is the zegclip prediction on the second image
    colors = overlay.palette(3)
    np.testing.assert_array_equal(
        out["images"][1],
        overlay.overlay(out["images"][1] * 0 + _rgb(second), want.labels, colors, 0.5),
    )


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_second_model_is_loaded_on_demand_kept_and_labelled(
    comparisons, dirs, tmp_path, monkeypatch
):
    zegclip = str(dirs[2])
    photo = write_photo(tmp_path / "p.png", seed=5)
    loads = []
    original = SideModels._load
    monkeypatch.setattr(SideModels, "_load", lambda self, s: loads.append(s) or original(self, s))
    sides = (Side(LOADED, "default"), Side(zegclip, "default"))
    session, out = comparisons.compare(None, str(photo), NAMES, "slide", 0.3, True, 0.5, sides)
    left, right = out["labels"]
    assert "`sinkhorn`** (λ = 0.30)" in left and "OTSeg: Multi-Prompt Sinkhorn" in left
    assert f"ZegCLIP (`{zegclip}`) · `zegclip`** (no MPS map, so no λ)" in right
    assert "ZegCLIP's own inference" in right
    want_left = direct(str(dirs[1]), photo, ["cat", "class0", "sky"], lam=0.3)
    want_right = direct(zegclip, photo, ["cat", "class0", "sky"])
    assert want_right.attention == "zegclip"
    changed = 100 * np.mean(want_left.labels != want_right.labels)
    assert out["changed"] == pytest.approx(changed)
    comparisons.compare(session, str(photo), NAMES, "slide", 0.3, True, 0.5, sides)
    assert loads == [zegclip]  # kept: the second comparison loads nothing
    with pytest.raises(UserError, match="offered ones"):
        comparisons.compare(session, str(photo), NAMES, "slide", 0.3, True, 0.5,
                            (Side(LOADED, "default"), Side("someone/else", "default")))  # fmt: skip
    with pytest.raises(UserError, match="has no attention “none”"):
        comparisons.compare(session, str(photo), NAMES, "slide", 0.3, True, 0.5,
                            (Side(LOADED, "none"), Side(LOADED, "default")))  # fmt: skip


def test_second_models_beyond_the_limit_are_dropped(dirs):
    loaded = load_model(str(dirs[1]))
    models = SideModels(loaded, extra=[str(dirs[2]), str(dirs[1])], keep=1)
    first = models.get(str(dirs[2]))
    assert gpu.is_registered(first.key)
    models.get(str(dirs[1]))
    assert not gpu.is_registered(first.key)  # the least recently used one is forgotten


def test_difference_table_against_counted_pixels(comparisons, tmp_path):
    photo = write_photo(tmp_path / "p.png", seed=9)
    sides = (Side(LOADED, "sinkhorn"), Side(LOADED, "softmax"))
    session, out = comparisons.compare(None, str(photo), NAMES, "slide", 0.5, True, 0.5, sides)
    predictor = session.compare_predictors[LOADED]["predictor"]
    a = predictor.predict(attention="sinkhorn", lam=0.5).labels
    b = predictor.predict(attention="softmax", lam=0.5).labels
    for i, row in enumerate(out["table"]):
        in_a, in_b = a == i, b == i
        union = (in_a | in_b).sum()
        assert row[0] == ["cat", "class0", "sky"][i]
        assert row[1] == ("seen / seen" if i == 1 else "novel / novel")
        assert row[2] == pytest.approx(100 * in_a.mean(), abs=0.05)
        assert row[3] == pytest.approx(100 * in_b.mean(), abs=0.05)
        assert row[4] == pytest.approx(100 * (in_b.mean() - in_a.mean()), abs=0.1)
        assert row[5] == pytest.approx(
            100 * (in_a & in_b).sum() / union if union else 100, abs=0.05
        )


def test_prompt_maps_of_both_sides_share_one_colour_scale(comparisons, tmp_path, monkeypatch):
    drawn = []
    grid = overlay.prompt_score_grid
    monkeypatch.setattr(
        overlay, "prompt_score_grid", lambda *a, **k: drawn.append(k) or grid(*a, **k)
    )
    photo = write_photo(tmp_path / "p.png", seed=11)
    sides = (Side(LOADED, "sinkhorn"), Side(LOADED, "softmax"))
    session, _ = comparisons.compare(None, str(photo), NAMES, "slide", 0.5, True, 0.5, sides)
    maps = [s["prompt_maps"][0] for s in session.comparison["sides"]]
    lo = min(float(m.min()) for m in maps)
    hi = max(float(m.max()) for m in maps)
    out = comparisons.prompt_maps(session, "cat")
    assert out["note"] == f"One colour scale for both sides: {lo:.3g} to {hi:.3g}."
    assert all(isinstance(g, Image.Image) for g in out["grids"])
    assert [(k["vmin"], k["vmax"], k["shared"]) for k in drawn] == [(lo, hi, True)] * 2

    sides = (Side(LOADED, "sinkhorn"), Side(LOADED, "zegclip"))
    session, _ = comparisons.compare(session, str(photo), NAMES, "slide", 0.5, True, 0.5, sides)
    out = comparisons.prompt_maps(session, "cat")
    assert (
        out["grids"][1] is None and "Right: no per-prompt maps (it has no MPS map)" in out["note"]
    )
    with pytest.raises(UserError, match="one of the compared classes"):
        comparisons.prompt_maps(session, "dog")


def test_shared_scale_draws_equal_values_in_equal_colours():
    """Two grids whose maps span 0–0.17 and 0–0.44: with one range a value has one colour in
    both; each on its own range (before), 0.17 was the top colour of one and mid of the other."""
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None, None, None].repeat(8, axis=2)
    small, large = ramp * 0.17, ramp * 0.44
    lo, hi = overlay.shared_range([small, large])
    assert (lo, hi) == (0.0, pytest.approx(0.44))
    args = {"tile": 64, "columns": 1}
    grid_a = np.asarray(overlay.prompt_score_grid(small, 0, ["{}"], "x", vmin=lo, vmax=hi, **args))
    grid_b = np.asarray(overlay.prompt_score_grid(large, 0, ["{}"], "x", vmin=lo, vmax=hi, **args))
    col = 4 + 63  # the tile's last column: 0.17 on the left grid, 0.44 on the right
    at_017 = int(round(0.17 / 0.44 * 63)) + 4
    np.testing.assert_allclose(grid_a[8, col], grid_b[8, at_017], atol=6)
    alone = np.asarray(overlay.prompt_score_grid(small, 0, ["{}"], "x", **args))
    assert np.abs(alone[8, col].astype(int) - grid_a[8, col].astype(int)).max() > 60


def test_default_sides_and_variant_labels(comparisons):
    left, right = comparisons.default_sides()
    assert left == Side(LOADED, "default") and right == Side(LOADED, "zegclip")
    labels = dict((v, k) for k, v in compare.variant_choices(comparisons.handlers.loaded))
    assert labels["zegclip"].startswith("ZegCLIP's inference")
    refs = [v for _, v in comparisons.models.choices()]
    assert refs[0] == LOADED and "zegclip:coco-transductive" in refs
    assert "original:coco-transductive" in refs and "original:voc-fully" not in refs
