"""Layout and wiring of the demo: components, events and their API names; no model logic.

API (``gradio_client``; state is kept per client session):
    /segment      image, vocabulary, attention, lam, use_mps, opacity[, inference] → overlay
                  outputs; inference "slide" (default, the paper's) or "whole" (fast)
    /rerender     attention, lam, use_mps, opacity → overlay outputs (cached embeddings)
    /redraw       opacity → overlay image (drawing only)
    /compare      lam, use_mps, opacity → (sinkhorn, softmax) slider, Markdown
    /prompt_maps  class name → sinkhorn grid, softmax grid, Markdown
    /preset       preset name → vocabulary text
Overlay outputs: overlay image (JPEG), legend HTML, [label PNG, classes JSON], summary JSON.

In the page, λ, attention, MPS and opacity apply as soon as they are released; if the image or
the names changed since the last result, that first re-segments. Views computed for older
settings say so and offer a button.
"""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from app import vocab
from app.inference import (
    INFERENCE_LABELS,
    Handlers,
    Session,
    check_inference,
    check_opacity,
)
from otseg.errors import UserError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CSS = ".otseg-legend{list-style:none;padding-left:0;columns:2}.badge-seen{color:#1a7f37}.badge-novel{color:#9a6700}"
API_SNIPPET = """```python
from gradio_client import Client, handle_file
client = Client("http://127.0.0.1:7860/")
overlay, legend, files, info = client.predict(
    handle_file("assets/chelsea.jpg"), "cat, eye, nose, background",
    "sinkhorn", 0.5, True, 0.5, api_name="/segment")
print([(c["name"], c["seen"], c["share"]) for c in info["classes"]])
client.predict("softmax", 0.8, True, 0.5, api_name="/rerender")  # no encoder re-run
```"""
STALE = "⚠️ The image or the class names changed since this result: press **Segment** (or Enter)."
COMPARE_STALE = "⚠️ Out of date (settings or image changed): press **Compare** to update."
COMPARE_INTRO = {
    "OTSeg": "Compare Sinkhorn attention (OTSeg, ECCV 2024) with softmax.",
    "ZegOT": "Compare MPOT (ZegOT's optimal transport between its learned prompts and the "
    "pixels) with softmax.",
}
MAPS_STALE = "Pick a class (or press **Show prompt maps**) to see its maps for the current result."
PROGRESS = gr.Progress()  # gradio injects a per-request tracker where this is the default


def examples() -> list[list[str]]:
    """``[[image path, vocabulary], ...]`` from ``assets/examples.json``."""
    data = json.loads((ASSETS / "examples.json").read_text())
    return [[str(ASSETS / e["file"]), e["vocabulary"]] for e in data["examples"]]


def user_errors(fn):
    """Bad input (``UserError``) becomes a toast, its text escaped so it never renders as
    markup; any other exception propagates, so gradio logs its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None

    return wrapper


def _inputs_column(loaded) -> SimpleNamespace:
    """The inputs; the attention choices and the default λ are the loaded model's."""
    mode = loaded.mode
    c = SimpleNamespace()
    c.image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"],
                       elem_id="image", height=320)  # fmt: skip
    c.text = gr.Textbox(label="Class names", lines=1, max_lines=6, elem_id="vocab",
                        placeholder="cat, sofa, lamp, background",
                        info="Comma- or newline-separated; your order sets the colours. "
                        "Enter segments, Shift+Enter starts a new line.")  # fmt: skip
    with gr.Row():
        c.preset = gr.Dropdown(list(vocab.PRESETS), value=None, label="Preset vocabulary", scale=3)
        c.load_preset = gr.Button("Load preset", scale=1, size="sm")
    with gr.Accordion("No background class? Read this", open=False):
        gr.Markdown(vocab.BACKGROUND_NOTE)
    c.attention = gr.Radio([(v, k) for k, v in loaded.attention_labels.items()], value="sinkhorn",
                           label="Attention", elem_id="attention")  # fmt: skip
    c.lam = gr.Slider(0, 1, value=loaded.default_lam, step=0.05, elem_id="lam",
                      label="Ensemble λ (0: decoder only, 1: MPS score map only)")  # fmt: skip
    c.use_mps = gr.Checkbox(value=True, label="Use the MPS score map", elem_id="use_mps")
    c.speed = gr.Radio([(v, k) for k, v in INFERENCE_LABELS.items()], value="slide",
                       label="Inference", elem_id="speed")  # fmt: skip
    c.opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity", elem_id="opacity")
    c.run = gr.Button("Segment", variant="primary", elem_id="segment", interactive=mode != "none")
    gr.Examples(examples(), inputs=[c.image, c.text], cache_examples=False,
                label="Examples (mixing seen and novel classes)")  # fmt: skip
    return c


def _overlay_tab() -> SimpleNamespace:
    c = SimpleNamespace()
    c.overlay = gr.Image(label="Segmentation", format="jpeg", interactive=False,
                         elem_id="overlay", height=480)  # fmt: skip
    c.legend = gr.HTML(elem_id="legend", label="Legend")
    c.files = gr.File(label="Label map (palette PNG, pixel = class id) and class list",
                      file_count="multiple", elem_id="files")  # fmt: skip
    with gr.Accordion("Details (JSON)", open=False):
        c.info = gr.JSON(label="Classes, colours, seen/novel, pixel shares", elem_id="info")
    return c


def _compare_tab(loaded) -> SimpleNamespace:
    c = SimpleNamespace()
    c.button = gr.Button("Compare on this image", elem_id="compare")
    c.slider = gr.ImageSlider(label=f"left: {loaded.transport_name} · right: softmax",
                              elem_id="slider", format="jpeg")  # fmt: skip
    c.note = gr.Markdown(elem_id="compare_note")
    return c


def _prompt_maps_tab(loaded) -> SimpleNamespace:
    c = SimpleNamespace()
    name = loaded.transport_name
    gr.Markdown(f"Score map of each prompt (M·N·T·S) for one class, on one colour scale. {name} "
                "makes prompts compete for pixels, so they spread over different regions; "
                "softmax lets them overlap.")  # fmt: skip
    with gr.Row():
        c.choice = gr.Dropdown([], label="Class", elem_id="prompt_class", scale=3)
        c.button = gr.Button("Show prompt maps", scale=1, elem_id="show_maps")
    c.sinkhorn = gr.Image(label=name, type="pil", elem_id="grid_sinkhorn", format="png")
    c.softmax = gr.Image(label="Softmax", type="pil", elem_id="grid_softmax", format="png")
    c.note = gr.Markdown(elem_id="maps_note")
    return c


def build(handlers: Handlers) -> gr.Blocks:
    """The demo's ``gr.Blocks`` (not launched; queue settings are applied by ``app.main``)."""
    loaded = handlers.loaded
    with gr.Blocks(title=f"{loaded.model_name} — zero-shot segmentation") as demo:
        gr.Markdown(
            f"# {loaded.model_name}: zero-shot semantic segmentation\nUpload a photo, list what "
            f"to find, press **Segment**. {COMPARE_INTRO[loaded.model_name]}"
        )
        gr.Markdown(handlers.loaded.status, elem_id="mode")
        session = gr.State(None, time_to_live=3600)
        with gr.Row():
            with gr.Column(scale=2):
                ins = _inputs_column(handlers.loaded)
            with gr.Column(scale=3):
                stale = gr.Markdown(elem_id="stale")  # above the tabs: it concerns all of them
                with gr.Tab("Overlay"):
                    ov = _overlay_tab()
                ov.stale = stale
                with gr.Tab(f"{loaded.transport_name} vs softmax"):
                    cmp = _compare_tab(loaded)
                with gr.Tab("Per-prompt maps"):
                    pm = _prompt_maps_tab(loaded)
                with gr.Accordion("Use it from Python (gradio_client)", open=False):
                    gr.Markdown(API_SNIPPET)
        _wire_page(handlers, session, ins, ov, cmp, pm)
        _wire_compare(handlers, session, ins, cmp)
        _wire_prompt_maps(handlers, session, pm)
        _wire_api(handlers, session, ins, ov)
    return demo


def _overlay_values(handlers: Handlers, sess: Session, opacity, redraw: bool = False) -> list:
    """Values of the overlay tab's outputs (overlay, legend, files, summary)."""
    if redraw:  # same labels: legend, downloads and summary stay as they are
        return [handlers.draw(sess, opacity), gr.skip(), gr.skip(), gr.skip()]
    out = handlers.outputs(sess, opacity)
    return [out["overlay"], out["legend"], out["files"], out["summary"]]


def _wire_page(handlers: Handlers, session, ins, ov, cmp, pm) -> None:
    """Segment, the live settings and the out-of-date banner: each result refreshes every view
    (the overlay), clears those of an older result or marks them out of date."""
    overlay_out = [ov.overlay, ov.legend, ov.files, ov.info]
    page_out = [*overlay_out, ov.stale, pm.choice, pm.sinkhorn, pm.softmax, pm.note,
                cmp.slider, cmp.note, session]  # fmt: skip
    settings = [ins.attention, ins.lam, ins.use_mps, ins.opacity]

    def page_values(sess: Session, opacity, segmented: bool, redraw: bool = False) -> list:
        """Overlay outputs plus what the other views show after this result."""
        views = [gr.skip()] * 4
        if segmented:  # views of the previous result are cleared, the class list refreshed
            choice = gr.Dropdown(choices=sess.names, value=sess.names[0])
            views = [choice, None, None, MAPS_STALE]
        current = (sess.version, sess.knobs["lam"], sess.knobs["use_mps"], opacity)
        if sess.compared is None or sess.compared == current:
            compare = [gr.skip(), gr.skip()]
        else:
            compare = [None if segmented else gr.skip(), COMPARE_STALE]
        return [*_overlay_values(handlers, sess, opacity, redraw), "", *views, *compare, sess]

    @user_errors
    def on_segment(image, text, attention, lam, use_mps, opacity, speed, sess, progress=PROGRESS):
        knobs, opacity = handlers.check_knobs(attention, lam, use_mps), check_opacity(opacity)
        sess = handlers.segment(sess, image, text, knobs, progress, check_inference(speed))
        return page_values(sess, opacity, segmented=True)

    @user_errors
    def on_settings(image, text, attention, lam, use_mps, opacity, speed, sess, progress=PROGRESS):
        """A setting released: redraw, re-fuse or re-segment as needed."""
        if not image:
            return [gr.skip()] * len(page_out)
        if not handlers.is_current(sess, image, text, speed):
            return on_segment(image, text, attention, lam, use_mps, opacity, speed, sess, progress)
        knobs, opacity = handlers.check_knobs(attention, lam, use_mps), check_opacity(opacity)
        if knobs == sess.knobs:
            return page_values(sess, opacity, segmented=False, redraw=True)
        return page_values(handlers.rerender(sess, knobs), opacity, segmented=False)

    def on_inputs_changed(image, text, speed, sess):
        return "" if sess is None or handlers.is_current(sess, image, text, speed) else STALE

    @user_errors
    def on_preset(preset):
        if not preset:
            raise UserError("Choose a preset first.")
        return vocab.preset_text(preset)

    page_in = [ins.image, ins.text, *settings, ins.speed, session]
    seg = {"fn": on_segment, "inputs": page_in, "outputs": page_out, "preprocess": False}
    ins.run.click(**seg, api_name=False)
    ins.text.submit(**seg, api_name=False)
    live = {"fn": on_settings, "inputs": page_in, "outputs": page_out, "preprocess": False,
            "api_name": False, "trigger_mode": "always_last", "show_progress": "minimal"}  # fmt: skip
    ins.attention.input(**live)
    ins.use_mps.input(**live)
    ins.lam.release(**live)
    ins.opacity.release(**live)
    ins.speed.input(**live)
    changed = {"fn": on_inputs_changed, "inputs": [ins.image, ins.text, ins.speed, session],
               "outputs": ov.stale, "preprocess": False, "api_name": False,
               "concurrency_limit": None, "show_progress": "hidden",
               "trigger_mode": "always_last"}  # fmt: skip
    ins.image.change(**changed)
    ins.text.change(**changed)
    ins.load_preset.click(on_preset, ins.preset, ins.text, api_name="preset",
                          concurrency_limit=None, preprocess=False)  # fmt: skip


def _wire_compare(handlers: Handlers, session, ins, cmp) -> None:
    @user_errors
    def on_compare(lam, use_mps, opacity, sess):
        out = handlers.compare(sess, {"lam": lam, "use_mps": use_mps}, opacity)
        note = f"Labels differ on **{out['changed']:.1f}%** of the pixels (λ = {float(lam):.2f})."
        return out["images"], note, sess

    cmp.button.click(on_compare, [ins.lam, ins.use_mps, ins.opacity, session],
                     [cmp.slider, cmp.note, session], api_name="compare",
                     preprocess=False)  # fmt: skip


def _wire_prompt_maps(handlers: Handlers, session, pm) -> None:
    name = handlers.loaded.transport_name

    @user_errors
    def on_prompt_maps(class_name, sess):
        out = handlers.prompt_maps(sess, class_name)
        o = out["overlap"]
        note = (f"Mean pairwise overlap of the prompt maps (cosine, 1 = identical): "
                f"{name} **{o['sinkhorn']:.2f}**, softmax **{o['softmax']:.2f}**.")  # fmt: skip
        return out["grids"]["sinkhorn"], out["grids"]["softmax"], note

    event = {"fn": on_prompt_maps, "inputs": [pm.choice, session],
             "outputs": [pm.sinkhorn, pm.softmax, pm.note], "preprocess": False}  # fmt: skip
    pm.button.click(**event, api_name="prompt_maps")
    pm.choice.input(**event, api_name=False)  # picking a class shows its maps


def _wire_api(handlers: Handlers, session, ins, ov) -> None:
    """/segment, /rerender, /redraw: overlay outputs only, on a button the page never shows."""
    overlay_out = [ov.overlay, ov.legend, ov.files, ov.info]
    settings = [ins.attention, ins.lam, ins.use_mps, ins.opacity]

    @user_errors
    def api_segment(image, text, attention, lam, use_mps, opacity, speed, sess):
        knobs, opacity = handlers.check_knobs(attention, lam, use_mps), check_opacity(opacity)
        sess = handlers.segment(sess, image, text, knobs, mode=check_inference(speed))
        return [*_overlay_values(handlers, sess, opacity), sess]

    @user_errors
    def api_rerender(attention, lam, use_mps, opacity, sess):
        sess = handlers.rerender(sess, handlers.check_knobs(attention, lam, use_mps))
        return [*_overlay_values(handlers, sess, opacity), sess]

    @user_errors
    def api_redraw(opacity, sess):
        return handlers.draw(sess, opacity)

    hidden = gr.Button(visible=False)
    hidden.click(api_segment, [ins.image, ins.text, *settings, ins.speed, session],
                 [*overlay_out, session], api_name="segment", preprocess=False)  # fmt: skip
    hidden.click(api_rerender, [*settings, session], [*overlay_out, session],
                 api_name="rerender", preprocess=False)  # fmt: skip
    hidden.click(api_redraw, [ins.opacity, session], ov.overlay, api_name="redraw",
                 concurrency_limit=8, preprocess=False)  # fmt: skip
