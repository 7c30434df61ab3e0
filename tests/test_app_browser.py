"""The demo in a real Chromium: example, Enter to segment, live settings, fresh views, escaped
toasts. Also saves the README picture (``tests/artifacts/demo-readme.png``)."""

from __future__ import annotations

import pytest

from app.inference import load_model
from app.main import build_demo
from tests.browser import browser_session
from tests.demo_helpers import tiny_dirs

LEGEND = "document.querySelector('#legend').innerText"
OVERLAY = "(document.querySelector('#overlay img') || {}).src || ''"
STALE = "document.querySelector('#stale').innerText"


def _wait_changed(page, expression: str, before: str) -> str:
    page.wait_for_function(f"(before) => ({expression}) !== before", arg=before)
    return page.evaluate(expression)


def _release_slider(page, elem_id: str, fraction: float) -> None:
    slider = page.locator(f"#{elem_id} input[type=range]")
    slider.scroll_into_view_if_needed()
    track = slider.bounding_box()
    x = track["x"] + 1 + (track["width"] - 2) * fraction
    page.mouse.click(x, track["y"] + track["height"] / 2)


@pytest.mark.browser
def test_live_settings_fresh_views_and_escaped_messages(tmp_path, monkeypatch):
    _, model_dir = tiny_dirs(tmp_path)
    model_dir = model_dir.rename(tmp_path / "tiny-random-otseg")
    monkeypatch.chdir(tmp_path)  # the mode line then names the model without a temp path
    with browser_session(build_demo(load_model(model_dir.name)), "demo") as session:
        page = session.page
        assert "Trained OTSeg" in page.locator("#mode").inner_text()
        vocab = page.locator("#vocab textarea")

        # an example, then Enter in the class-name box segments; Shift+Enter is a new line
        page.get_by_text("cat, eye, nose, ear, whiskers, background").first.click()
        page.locator("#image img").first.wait_for()
        vocab.click()
        page.keyboard.press("End")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("fur")
        assert vocab.input_value().endswith("background\nfur")
        page.keyboard.press("Enter")
        page.wait_for_function(f"({LEGEND}).includes('fur')")
        assert vocab.input_value().endswith("background\nfur")  # Enter added no line
        overlay, legend = page.evaluate(OVERLAY), page.evaluate(LEGEND)
        assert overlay and "novel" in legend and "%" in legend
        session.screenshot("readme")

        # settings apply on release, without pressing Segment
        page.locator("#attention").get_by_text("Softmax (baseline)").click()
        overlay = _wait_changed(page, OVERLAY, overlay)
        _release_slider(page, "lam", 1.0)
        overlay = _wait_changed(page, OVERLAY, overlay)
        assert page.locator("#lam input[type=range]").input_value() == "1"
        _release_slider(page, "opacity", 0.8)
        overlay = _wait_changed(page, OVERLAY, overlay)

        # the comparison and the prompt maps belong to one result ...
        page.get_by_role("tab", name="Sinkhorn vs softmax").click()
        page.locator("#compare").click()
        page.wait_for_function(
            "document.querySelector('#compare_note').innerText.includes('differ')"
        )
        _release_slider(page, "lam", 0.0)  # a setting changed: the comparison says so
        page.wait_for_function(
            "document.querySelector('#compare_note').innerText.includes('Out of date')"
        )
        page.get_by_role("tab", name="Per-prompt maps").click()
        page.locator("#show_maps").click()
        page.locator("#grid_sinkhorn img").wait_for()
        session.screenshot("prompt-maps")

        # ... new names: the overlay says it is out of date until the next result
        vocab.fill("cat, sofa")
        page.wait_for_function(f"({STALE}).includes('changed since this result')")
        page.get_by_role("tab", name="Overlay").click()
        _release_slider(page, "lam", 0.5)  # a setting re-segments with the current names
        page.wait_for_function(f"({LEGEND}).includes('sofa') && !({LEGEND}).includes('fur')")
        page.wait_for_function(f"({STALE}).trim() === ''")
        page.get_by_role("tab", name="Per-prompt maps").click()
        page.wait_for_function("!document.querySelector('#grid_sinkhorn img')")  # cleared
        assert "Pick a class" in page.locator("#maps_note").inner_text()
        page.get_by_role("tab", name="Sinkhorn vs softmax").click()
        assert "Out of date" in page.locator("#compare_note").inner_text()

        # user text in a message is shown as text, never as markup
        payload = 'cat, <img src=x id=injected onerror="window.__hit=1">'
        vocab.fill(payload)
        page.keyboard.press("Enter")
        toast = page.get_by_test_id("toast-body").first
        toast.wait_for()
        assert "<img src=x id=injected" in toast.inner_text()
        assert page.locator("#injected").count() == 0
        assert page.evaluate("window.__hit") is None
        assert session.page_errors == []
