"""The browser harness itself: upload a photo into a gr.Image, click, see the output change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.browser import browser_session

PHOTO = Path(__file__).resolve().parents[1] / "assets" / "chelsea.jpg"  # 451×300


def _describe(image: np.ndarray | None) -> tuple[str, np.ndarray | None]:
    if image is None:
        return "no image", None
    height, width = image.shape[:2]
    return f"{width}x{height}", image[::-1]  # flipped upside down


def _demo():
    import gradio as gr

    with gr.Blocks() as demo:
        source = gr.Image(type="numpy", label="input", elem_id="source")
        run = gr.Button("Run", elem_id="run")
        size = gr.Textbox(label="size", value="nothing yet", elem_id="size")
        flipped = gr.Image(label="flipped", elem_id="flipped")
        run.click(_describe, inputs=source, outputs=[size, flipped], api_name="describe")
    return demo


@pytest.mark.browser
def test_upload_click_and_output_changes():
    with browser_session(_demo(), "smoke") as session:
        page = session.page
        size = page.locator("#size textarea")
        assert size.input_value() == "nothing yet"

        page.locator("#source input[type=file]").set_input_files(str(PHOTO))
        page.locator("#source img").wait_for()  # preview of the upload
        session.screenshot("uploaded")

        page.locator("#run").click()
        page.wait_for_function("() => document.querySelector('#size textarea').value === '451x300'")
        page.locator("#flipped img").wait_for()
        assert session.page_errors == []
