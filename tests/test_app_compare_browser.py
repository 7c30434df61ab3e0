"""The comparison tab in a real Chromium with two tiny models: the demo's OTSeg and ZegCLIP's
weights as ``zegclip:<setting>``, downloaded and converted on demand through the local HTTP
mirror (as ``original:`` is tested). Per-side labels, differing share, per-class table, a new
upload compared without pressing Segment, prompt maps of two sides on one scale."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from http_mirror import serve
from PIL import Image

from app.inference import load_model
from app.main import build_demo
from factories import fixture_config, parity_fixture
from otseg.models.zegclip import zegclip_config
from otseg.weights import original
from otseg.weights.original import ZEGCLIPS, OriginalModel
from tests.browser import browser_session
from tests.demo_helpers import tiny_dirs, write_photo

SETTING = "tiny-voc-inductive"
DRIVE_ID = "zegclipTinyBrowser"
NPY = "voc12_tiny_single.npy"


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def _choose(page, elem_id: str, label: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=label, exact=True).click()


def _slider_size(page) -> list[int]:
    return page.evaluate(
        "() => { const i = document.querySelector('#slider img');"
        " return i ? [i.naturalWidth, i.naturalHeight] : []; }"
    )


@pytest.fixture
def zegclip_mirror(tmp_path, monkeypatch):
    fx = parity_fixture("tiny_voc_inductive")
    buffer = io.BytesIO()
    np.save(buffer, np.load(fx / "text_embedding.npy")[:, 0])  # (K, C) fp16, as ZegCLIP's
    npy = buffer.getvalue()
    entry = OriginalModel(
        SETTING, "tiny ZegCLIP fixture", DRIVE_ID, NPY,
        zegclip_config(fixture_config(fx), ("a photo of a {}",)),
        embeddings_size=len(npy), embeddings_sha256=hashlib.sha256(npy).hexdigest(),
        release=original.ZEGCLIP_RELEASE,
    )  # fmt: skip
    monkeypatch.setitem(ZEGCLIPS, SETTING, entry)
    monkeypatch.setenv("OTSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with serve({DRIVE_ID: (fx / "official.pth").read_bytes(), NPY: npy}) as mirror:
        monkeypatch.setenv("OTSEG_ORIGINAL_MIRROR", mirror.url)
        yield mirror


@pytest.mark.browser
def test_compare_two_models_in_the_browser(tmp_path, zegclip_mirror):
    _, model_dir = tiny_dirs(tmp_path)
    first = write_photo(tmp_path / "first.png", h=96, w=128)
    second = write_photo(tmp_path / "second.png", h=80, w=120, seed=4)
    with browser_session(build_demo(load_model(str(model_dir))), "compare") as session:
        page = session.page
        page.locator("#image input[type=file]").set_input_files(str(first))
        page.locator("#image img").first.wait_for()
        page.locator("#vocab textarea").fill("class0, class3")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#legend').innerText.includes('class3')")

        # right side: ZegCLIP's weights, fetched through the mirror on this click
        page.get_by_role("tab", name="Compare").click()
        _choose(page, "right_model", f"ZegCLIP, tiny ZegCLIP fixture (zegclip:{SETTING})")
        _choose(page, "right_attention", "the model's own")
        page.locator("#compare").click()
        page.wait_for_function(
            "document.querySelector('#compare_note').innerText.includes('differ')"
        )
        sides = _text(page, "compare_sides")
        assert "Left: this demo's OTSeg model · sinkhorn (λ = 0.50)" in sides
        assert f"ZegCLIP (authors' weights, tiny ZegCLIP fixture) (zegclip:{SETTING})" in sides
        assert "· zegclip (no MPS map, so no λ)" in sides
        assert sorted(zegclip_mirror.requests) == sorted([DRIVE_ID, NPY])
        table = _text(page, "compare_table")
        assert "class0" in table and "class3" in table and "seen / seen" in table
        assert _slider_size(page) == [128, 96]
        session.screenshot("two-models")

        # a new upload, no Segment: the comparison runs on it (it used to show the old image)
        page.locator("#image input[type=file]").set_input_files(str(second))
        page.wait_for_function("document.querySelector('#stale').innerText.includes('changed')")
        before = _text(page, "compare_note")
        page.locator("#compare").click()
        page.wait_for_function(
            "([before]) => { const i = document.querySelector('#slider img');"
            " return i && i.naturalWidth === 120; }",
            arg=[before],
        )
        assert _slider_size(page) == [120, 80]
        assert len(zegclip_mirror.requests) == 2  # the second model was kept, not fetched again

        # prompt maps: ZegCLIP's side has none; with Sinkhorn on both, one scale for both
        page.locator("#compare_maps").click()
        page.wait_for_function(
            "document.querySelector('#compare_maps_note').innerText.includes('no per-prompt maps')"
        )
        page.locator("#compare_grid_left img").wait_for()
        _choose(page, "right_attention", "Softmax (multi-prompt ablation)")
        page.locator("#compare").click()
        page.wait_for_function(
            "document.querySelector('#compare_sides').innerText.includes('softmax')"
        )
        page.locator("#compare_maps").click()
        page.wait_for_function(
            "document.querySelector('#compare_maps_note').innerText.includes('One colour scale')"
        )
        page.locator("#compare_grid_right img").wait_for()
        assert Image.open(session.screenshot("prompt-maps-shared-scale")).size[0] > 0
        assert session.page_errors == []
