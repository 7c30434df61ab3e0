"""The demo in a real Chromium: pick an example, segment, switch attention, move λ."""

from __future__ import annotations

import pytest

from app.inference import load_model
from app.main import build_demo
from tests.browser import browser_session
from tests.demo_helpers import tiny_dirs

LEGEND = "document.querySelector('#legend').innerText"
MASKS = "Array.from(document.querySelectorAll('#overlay img')).map(i => i.src).join(' ')"


def _wait_changed(page, expression: str, before: str) -> str:
    page.wait_for_function(f"(before) => ({expression}) !== before", arg=before)
    return page.evaluate(expression)


@pytest.mark.browser
def test_example_segment_switch_attention_move_lambda(tmp_path):
    _, model_dir = tiny_dirs(tmp_path)
    with browser_session(build_demo(load_model(str(model_dir))), "demo") as session:
        page = session.page
        assert "Trained OTSeg" in page.locator("#mode").inner_text()

        page.get_by_text("cat, eye, nose, ear, whiskers, background").first.click()
        page.locator("#image img").first.wait_for()
        assert page.locator("#vocab textarea").input_value().startswith("cat, eye")

        page.locator("#segment").click()
        page.wait_for_function(f"({LEGEND}).includes('whiskers')")
        page.locator("#overlay img").first.wait_for()
        legend, masks = page.evaluate(LEGEND), page.evaluate(MASKS)
        assert "novel" in legend and "%" in legend
        session.screenshot("sinkhorn")

        page.locator("#attention").get_by_text("Softmax (baseline)").click()
        masks = _wait_changed(page, MASKS, masks)
        legend = _wait_changed(page, LEGEND, legend)
        session.screenshot("softmax")

        track = page.locator("#lam input[type=range]").bounding_box()  # click its right end
        page.mouse.click(track["x"] + track["width"] - 1, track["y"] + track["height"] / 2)
        masks = _wait_changed(page, MASKS, masks)
        _wait_changed(page, LEGEND, legend)
        assert page.locator("#lam input[type=range]").input_value() == "1"
        session.screenshot("lambda-1")
        assert session.page_errors == []
