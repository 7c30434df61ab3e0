"""Layout and wiring of the demo: components, events and their API names; no model logic.

API (``gradio_client``; state is kept per client session):
    /segment      image, vocabulary, attention, lam, use_mps, opacity[, inference] → overlay
                  outputs; inference "slide" (default, the paper's) or "whole" (fast)
    /rerender     attention, lam, use_mps, opacity[, files] → overlay outputs (cached
                  embeddings); files=True also writes and returns the downloads (else None)
    /redraw       opacity → overlay image (drawing only)
    /compare      image, vocabulary, inference, lam, use_mps, opacity, left model, left
                  attention, right model, right attention → side labels, (left, right) slider,
                  Markdown, per-class table (on the given image and names; app.compare)
    /compare_maps class name → left grid, right grid, Markdown (one colour scale)
    /prompt_maps  class_name → sinkhorn grid, softmax grid, overlap note
    /preset       preset name → vocabulary text
Overlay outputs: overlay (JPEG), legend (HTML), files ([label PNG, classes JSON]), info (dict).

In the page, λ, attention, MPS and opacity apply as they change (drag, click, arrow keys, a
typed number); if the image or the names changed since the last result, that first
re-segments, and so does "Show prompt maps". A line under the overlay says which settings the
shown result has. Views computed for older settings say so and offer a button. Bad input shows
one message and leaves every view as it was.
"""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from app import compare, vocab
from app.inference import (
    INFERENCE_LABELS,
    Handlers,
    Session,
    check_inference,
    check_opacity,
)
from otseg.errors import UserError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Badge colours per theme: each has a contrast of at least 4.5:1 on its theme's background
# (light: #1a7f37 5.1:1, #9a6700 4.9:1 on white; dark: #3fb950, #d29922 on Gradio's dark blocks).
CSS = (
    ".otseg-legend{list-style:none;padding-left:0;columns:2}"
    ":root{--otseg-seen:#1a7f37;--otseg-novel:#9a6700}"
    ".dark{--otseg-seen:#3fb950;--otseg-novel:#d29922}"
    ".otseg-legend small.badge-seen{color:var(--otseg-seen)}"
    ".otseg-legend small.badge-novel{color:var(--otseg-novel)}"
)
# On a narrow screen the result column sits under the inputs: bring it into view when a
# segmentation starts, where its progress shows (js of the event: returns its inputs as they are)
SCROLL_TO_RESULT = """(...args) => {
  if (window.matchMedia("(max-width: 768px)").matches) {
    document.getElementById("result")?.scrollIntoView({behavior: "smooth", block: "start"});
  }
  return args;
}"""
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
    "OTSeg": "Compare Sinkhorn attention (OTSeg, ECCV 2024) with softmax and with ZegCLIP's "
    "inference on the same weights, or with a second model (ZegCLIP's own weights, say).",
    "ZegCLIP": "Compare ZegCLIP's inference with OTSeg's Sinkhorn and softmax heads on the "
    "same weights, or with a second model (OTSeg's own weights, say).",
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
    """For the API: bad input (``UserError``) becomes the call's error, its text escaped so it
    never renders as markup; any other exception propagates, so gradio logs its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None

    return wrapper


def page_errors(untouched: gr.components.Component):
    """For the page: bad input (``UserError``) is shown once, as a toast (escaped), and every
    output keeps what it showed (a raised error would mark each output panel "Error" and drop
    the last good result). The handler returns a dict of outputs; other exceptions propagate.
    ``untouched``: one of its outputs (gradio wants a dict that names at least one)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as e:
                gr.Warning(html.escape(str(e), quote=False), title="Not applied")
                return {untouched: gr.skip()}

        return wrapper

    return decorate


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
    c.attention = gr.Radio([(v, k) for k, v in loaded.attention_labels.items()],
                           value=loaded.default_attention, label="Attention",
                           elem_id="attention")  # fmt: skip
    c.lam = gr.Slider(0, 1, value=loaded.default_lam, step=0.05, elem_id="lam",
                      label="Ensemble λ (0: decoder only, 1: MPS score map only)")  # fmt: skip
    c.use_mps = gr.Checkbox(value=True, label="Use the MPS score map", elem_id="use_mps")
    c.speed = gr.Radio([(v, k) for k, v in INFERENCE_LABELS.items()], value="slide",
                       label="Inference", elem_id="speed")  # fmt: skip
    c.opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity", elem_id="opacity")
    c.run = gr.Button("Segment", variant="primary", elem_id="segment", interactive=mode != "none")
    c.examples = gr.Examples(examples(), inputs=[c.image, c.text], cache_examples=False,
                             label="Examples (mixing seen and novel classes)")  # fmt: skip
    return c


def _overlay_tab() -> SimpleNamespace:
    c = SimpleNamespace()
    c.overlay = gr.Image(label="Segmentation", format="jpeg", interactive=False,
                         elem_id="overlay", height=480)  # fmt: skip
    c.applied = gr.Markdown(elem_id="applied", label="applied settings")
    c.legend = gr.HTML(elem_id="legend", label="Legend")
    c.files = gr.File(label="Label map (palette PNG, pixel = class id) and class list",
                      file_count="multiple", elem_id="files")  # fmt: skip
    with gr.Accordion("Details (JSON)", open=False):
        c.info = gr.JSON(label="Classes, colours, seen/novel, pixel shares", elem_id="info")
    return c


def _compare_tab(comparisons: compare.Comparisons) -> SimpleNamespace:
    """Two sides, each a model (this demo's or a second one, loaded on demand) and a variant."""
    c = SimpleNamespace()
    models = comparisons.models.choices()
    variants = compare.variant_choices(comparisons.handlers.loaded)
    left, right = comparisons.default_sides()
    gr.Markdown("Each side: a model (this demo's, or a second one — downloaded and converted "
                "on first use, then kept) and its attention variant. Runs on the image and "
                "names above, with the λ and MPS settings where a variant has them.")  # fmt: skip
    with gr.Row():
        c.left_model = gr.Dropdown(models, value=left.source, label="Left: model",
                                   elem_id="left_model", scale=3)  # fmt: skip
        c.left_attention = gr.Dropdown(variants, value=left.attention, label="Left: attention",
                                       elem_id="left_attention", scale=2)  # fmt: skip
    with gr.Row():
        c.right_model = gr.Dropdown(models, value=right.source, label="Right: model",
                                    elem_id="right_model", scale=3)  # fmt: skip
        c.right_attention = gr.Dropdown(variants, value=right.attention,
                                        label="Right: attention", elem_id="right_attention",
                                        scale=2)  # fmt: skip
    c.button = gr.Button("Compare on this image", elem_id="compare")
    c.sides = gr.Markdown(elem_id="compare_sides")
    c.slider = gr.ImageSlider(label="left · right", elem_id="slider", format="jpeg")
    c.note = gr.Markdown(elem_id="compare_note")
    c.table = gr.Dataframe(headers=compare.TABLE_HEADERS, interactive=False,
                           elem_id="compare_table", label="Per class")  # fmt: skip
    with gr.Row():
        c.choice = gr.Dropdown([], label="Class", elem_id="compare_class", scale=3)
        c.maps_button = gr.Button("Prompt maps of both sides", scale=1, elem_id="compare_maps")
    with gr.Row():
        c.left_maps = gr.Image(label="Left", type="pil", format="png",
                               elem_id="compare_grid_left")  # fmt: skip
        c.right_maps = gr.Image(label="Right", type="pil", format="png",
                                elem_id="compare_grid_right")  # fmt: skip
    c.maps_note = gr.Markdown(elem_id="compare_maps_note")
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
    c.note = gr.Markdown(elem_id="maps_note", label="overlap")
    return c


def build(handlers: Handlers) -> gr.Blocks:
    """The demo's ``gr.Blocks`` (not launched; queue settings are applied by ``app.main``)."""
    loaded = handlers.loaded
    handlers.set_examples([(Path(path), text) for path, text in examples()])
    comparisons = compare.Comparisons(handlers)
    with gr.Blocks(title=f"{loaded.model_name} — zero-shot segmentation") as demo:
        gr.Markdown(
            f"# {loaded.model_name}: zero-shot semantic segmentation\nUpload a photo, list what "
            f"to find, press **Segment**. {COMPARE_INTRO.get(loaded.model_name, COMPARE_INTRO['OTSeg'])}"
        )
        # called at every page load; also the API endpoint /status (the loading stage, or the model)
        status = gr.Markdown(handlers.status, elem_id="mode", label="mode")
        session = gr.State(None, time_to_live=3600)
        with gr.Row():
            with gr.Column(scale=2):
                ins = _inputs_column(handlers.loaded)
            with gr.Column(scale=3, elem_id="result"):
                stale = gr.Markdown(elem_id="stale")  # above the tabs: it concerns all of them
                with gr.Tab("Overlay"):
                    ov = _overlay_tab()
                ov.stale = stale
                with gr.Tab("Compare"):
                    cmp = _compare_tab(comparisons)
                with gr.Tab("Per-prompt maps"):
                    pm = _prompt_maps_tab(loaded)
                with gr.Accordion("Use it from Python (gradio_client)", open=False):
                    gr.Markdown(API_SNIPPET)
        _wire_page(handlers, session, ins, ov, cmp, pm)
        _wire_compare(comparisons, session, ins, cmp)
        _wire_api(handlers, session, ins, pm)
        _wire_loading(handlers, status, ins)
    return demo


def _info_schema() -> dict:
    """The summary JSON's fields, for the API description (``view_api()``)."""
    number, text = {"type": "number"}, {"type": "string"}
    row = {"id": {"type": "integer"}, "name": text, "color": {**text, "description": "#rrggbb"},
           "seen": {"type": "boolean", "description": "None without a training split"},
           "share": {**number, "description": "% of the pixels"}}  # fmt: skip
    return {
        "type": "object",
        "properties": {
            "mode": text, "attention": text, "lam": number, "use_mps": {"type": "boolean"},
            "inference": text, "note": text,
            "image_size": {"type": "array", "items": {"type": "integer"},
                           "description": "[width, height]"},
            "classes": {"type": "array", "items": {"type": "object", "properties": row}},
        },
    }  # fmt: skip


def _wire_page(handlers: Handlers, session, ins, ov, cmp, pm) -> None:
    """Segment, the live settings, the prompt maps and the out-of-date banner: each result
    refreshes the overlay, clears the views of an older result or marks them out of date.
    Handlers return a dict of the outputs they change; bad input changes none (``page_errors``)."""
    settings = [ins.attention, ins.lam, ins.use_mps, ins.opacity]
    page_in = [ins.image, ins.text, *settings, ins.speed, session]
    page_out = [ov.overlay, ov.applied, ov.legend, ov.files, ov.info, ov.stale, pm.choice,
                pm.sinkhorn, pm.softmax, pm.note, cmp.slider, cmp.note, session]  # fmt: skip

    def result(
        sess: Session, opacity: float, segmented: bool, redraw: bool = False, *, lam, use_mps
    ) -> dict:
        """The overlay tab for ``sess``'s prediction, and what the other views show after it
        (``lam``, ``use_mps``: the page's settings, which a comparison depends on)."""
        sess.opacity = opacity
        out = {ov.stale: "", ov.applied: applied_text(handlers, sess), session: sess}
        if redraw:  # same labels: legend, downloads and summary stay as they are
            out[ov.overlay] = handlers.draw(sess, opacity)
        else:
            drawn = handlers.outputs(sess, opacity)
            out.update({ov.overlay: drawn["overlay"], ov.legend: drawn["legend"],
                        ov.files: drawn["files"], ov.info: drawn["summary"]})  # fmt: skip
        if segmented:  # views of the previous result are cleared, the class list refreshed
            out.update({pm.choice: gr.Dropdown(choices=sess.names, value=sess.names[0]),
                        pm.sinkhorn: None, pm.softmax: None, pm.note: MAPS_STALE})  # fmt: skip
        current = compare.session_inputs_key(sess, lam, use_mps, opacity)
        if sess.compared is not None and sess.compared != current:
            out[cmp.note] = COMPARE_STALE
            if segmented:
                out[cmp.slider] = None
        return out

    def segment(image, text, attention, lam, use_mps, opacity, speed, sess, progress) -> dict:
        knobs, opacity = handlers.check_knobs(attention, lam, use_mps), check_opacity(opacity)
        sess = handlers.segment(sess, image, text, knobs, progress, check_inference(speed))
        return result(sess, opacity, segmented=True, lam=lam, use_mps=use_mps)

    @page_errors(session)
    def on_segment(image, text, attention, lam, use_mps, opacity, speed, sess, progress=PROGRESS):
        return segment(image, text, attention, lam, use_mps, opacity, speed, sess, progress)

    @page_errors(session)
    def on_settings(image, text, attention, lam, use_mps, opacity, speed, sess, progress=PROGRESS):
        """A setting changed (dragged, clicked, arrow keys or typed): redraw, re-fuse or
        re-segment as needed; nothing when it is what the result already shows."""
        if not image or lam is None or opacity is None:  # None: a number box being retyped
            return {session: gr.skip()}
        if not handlers.is_current(sess, image, text, speed):
            return segment(image, text, attention, lam, use_mps, opacity, speed, sess, progress)
        knobs, opacity = handlers.check_knobs(attention, lam, use_mps), check_opacity(opacity)
        page = {"lam": lam, "use_mps": use_mps}
        if knobs == sess.knobs:
            if opacity == sess.opacity:
                return {session: gr.skip()}  # e.g. the release after the last input event of a drag
            return result(sess, opacity, segmented=False, redraw=True, **page)
        return result(handlers.rerender(sess, knobs), opacity, segmented=False, **page)

    @page_errors(session)
    def on_prompt_maps(image, text, attention, lam, use_mps, opacity, speed, class_name, sess,
                       progress=PROGRESS):  # fmt: skip
        """The maps of the image and names on the page: a new image or new names are
        segmented first (never the maps of an older result)."""
        out = {}
        if image and not handlers.is_current(sess, image, text, speed):
            out = segment(image, text, attention, lam, use_mps, opacity, speed, sess, progress)
            sess = out[session]
        if sess is not None and class_name not in sess.names:
            class_name = sess.names[0] if sess.names else class_name
        maps = handlers.prompt_maps(sess, class_name)
        out.update({pm.choice: gr.Dropdown(choices=sess.names, value=class_name),
                    pm.sinkhorn: maps["grids"]["sinkhorn"], pm.softmax: maps["grids"]["softmax"],
                    pm.note: overlap_note(handlers, maps)})  # fmt: skip
        return out

    def on_inputs_changed(image, text, speed, sess):
        return "" if sess is None or handlers.is_current(sess, image, text, speed) else STALE

    @user_errors
    def on_preset(preset):
        if not preset:
            raise UserError("Choose a preset first.")
        return vocab.preset_text(preset)

    seg = {"fn": on_segment, "inputs": page_in, "outputs": page_out, "preprocess": False,
           "api_name": False, "js": SCROLL_TO_RESULT}  # fmt: skip
    ins.run.click(**seg)
    ins.text.submit(**seg)
    ins.examples.load_input_event.then(**seg)  # clicking an example runs it
    live = {"fn": on_settings, "inputs": page_in, "outputs": page_out, "preprocess": False,
            "api_name": False, "trigger_mode": "always_last", "show_progress": "minimal"}  # fmt: skip
    ins.attention.input(**live)
    ins.use_mps.input(**live)
    ins.speed.input(**live)
    for slider in (ins.lam, ins.opacity):
        slider.input(**live)  # dragging, arrow keys, typing in its number box
        slider.release(**live)  # the number box's value once it is left (clamped to 0-1)
    maps = {"fn": on_prompt_maps, "inputs": [*page_in[:-1], pm.choice, session],
            "outputs": page_out, "preprocess": False, "api_name": False}  # fmt: skip
    pm.button.click(**maps)
    pm.choice.input(**maps)  # picking a class shows its maps
    changed = {"fn": on_inputs_changed, "inputs": [ins.image, ins.text, ins.speed, session],
               "outputs": ov.stale, "preprocess": False, "api_name": False,
               "concurrency_limit": None, "show_progress": "hidden",
               "trigger_mode": "always_last"}  # fmt: skip
    ins.image.change(**changed)
    ins.text.change(**changed)
    ins.load_preset.click(on_preset, ins.preset, ins.text, api_name="preset",
                          concurrency_limit=None, preprocess=False)  # fmt: skip


def _wire_loading(handlers: Handlers, status, ins) -> None:
    """While the model loads, the mode line follows the stage once a second; when it is
    ready it shows the model (and Segment is disabled if there is none)."""
    planned = handlers.planned
    timer = gr.Timer(1.0, active=not handlers.loader.done)

    def on_tick():
        if not handlers.loader.done:
            return {status: handlers.status()}
        loaded = handlers.loaded
        out = {status: loaded.status, timer: gr.Timer(active=False),
               ins.run: gr.Button(interactive=loaded.mode != "none")}  # fmt: skip
        if loaded.attention_labels != planned.attention_labels:  # e.g. ZegOT → training-free
            choices = [(v, k) for k, v in loaded.attention_labels.items()]
            out[ins.attention] = gr.Radio(choices=choices, value=loaded.default_attention)
            out[ins.lam] = gr.Slider(value=loaded.default_lam)
        return out

    timer.tick(on_tick, None, [status, timer, ins.run, ins.attention, ins.lam], api_name=False,
               show_progress="hidden", queue=False)  # fmt: skip


def applied_text(handlers: Handlers, sess: Session) -> str:
    """The settings the shown result was computed with (a setting that could not be applied
    differs from what its control shows)."""
    k = sess.knobs
    if k["lam"] is None:  # a variant without the MPS map (ZegCLIP's inference)
        fusion = "no MPS map (λ does not apply)"
    else:
        fusion = f"λ = {k['lam']:.2f}" if k["use_mps"] else "MPS off (λ unused)"
    return (f"Shown: **{handlers.loaded.attention_labels[k['attention']]}**, {fusion}, "
            f"opacity {sess.opacity:.2f}, {sess.predictor.mode} inference.")  # fmt: skip


def overlap_note(handlers: Handlers, maps: dict) -> str:
    o = maps["overlap"]
    return (f"Mean pairwise overlap of the prompt maps (cosine, 1 = identical): "
            f"{handlers.loaded.transport_name} **{o['sinkhorn']:.2f}**, softmax "
            f"**{o['softmax']:.2f}**.")  # fmt: skip


def _wire_compare(comparisons: compare.Comparisons, session, ins, cmp) -> None:
    """Compare on the current inputs (re-encoding whatever is new), then the prompt maps. The
    page's buttons keep the views on bad input (a toast); /compare and /compare_maps, on hidden
    buttons, answer with the error."""
    outputs = [cmp.sides, cmp.slider, cmp.note, cmp.table, cmp.choice, cmp.left_maps,
               cmp.right_maps, cmp.maps_note, session]  # fmt: skip

    def run(image, text, speed, lam, use_mps, opacity, left_model, left_attention, right_model,
            right_attention, sess, progress) -> dict:  # fmt: skip
        sides = (
            compare.check_side(left_model, left_attention, "left"),
            compare.check_side(right_model, right_attention, "right"),
        )
        sess, out = comparisons.compare(
            sess, image, text, speed, lam, use_mps, opacity, sides, progress
        )
        return dict(zip(outputs, [
            "\n\n".join(out["labels"]), out["images"],
            f"Labels differ on **{out['changed']:.1f}%** of the pixels.", out["table"],
            gr.Dropdown(choices=out["names"], value=out["names"][0]), None, None, "", sess,
        ], strict=True))  # fmt: skip

    @page_errors(session)
    def on_compare(image, text, speed, lam, use_mps, opacity, left_model, left_attention,
                   right_model, right_attention, sess, progress=PROGRESS):  # fmt: skip
        return run(image, text, speed, lam, use_mps, opacity, left_model, left_attention,
                   right_model, right_attention, sess, progress)  # fmt: skip

    @user_errors
    def api_compare(image, text, speed, lam, use_mps, opacity, left_model, left_attention,
                    right_model, right_attention, sess):  # fmt: skip
        out = run(image, text, speed, lam, use_mps, opacity, left_model, left_attention,
                  right_model, right_attention, sess, None)  # fmt: skip
        return [out[o] for o in outputs]

    def maps(class_name, sess) -> dict:
        out = comparisons.prompt_maps(sess, class_name)
        return {cmp.left_maps: out["grids"][0], cmp.right_maps: out["grids"][1],
                cmp.maps_note: out["note"]}  # fmt: skip

    @page_errors(session)
    def on_compare_maps(class_name, sess):
        return maps(class_name, sess)

    @user_errors
    def api_compare_maps(class_name, sess):
        out = maps(class_name, sess)
        return [out[cmp.left_maps], out[cmp.right_maps], out[cmp.maps_note]]

    inputs = [ins.image, ins.text, ins.speed, ins.lam, ins.use_mps, ins.opacity,
              cmp.left_model, cmp.left_attention, cmp.right_model, cmp.right_attention, session]  # fmt: skip
    page = {"preprocess": False, "api_name": False}
    cmp.button.click(on_compare, inputs, outputs, **page)
    maps_out = [cmp.left_maps, cmp.right_maps, cmp.maps_note]
    cmp.maps_button.click(on_compare_maps, [cmp.choice, session], [*maps_out, session], **page)
    cmp.choice.input(on_compare_maps, [cmp.choice, session], [*maps_out, session], **page)
    hidden = gr.Button(visible=False)
    hidden.click(api_compare, inputs, outputs, api_name="compare", preprocess=False)
    hidden.click(api_compare_maps, [cmp.choice, session], maps_out, api_name="compare_maps",
                 preprocess=False)  # fmt: skip


def _wire_api(handlers: Handlers, session, ins, pm) -> None:
    """/segment, /rerender, /redraw, /prompt_maps: on hidden components named for the API."""
    settings = [ins.attention, ins.lam, ins.use_mps, ins.opacity]
    overlay = gr.Image(label="overlay", format="jpeg", visible=False)
    legend = gr.HTML(label="legend", visible=False)
    files = gr.File(label="files", file_count="multiple", visible=False)
    info = gr.JSON(label="info", visible=False)
    info.api_info = _info_schema  # a subclass would make gradio write a .pyi stub beside us
    want_files = gr.Checkbox(False, label="files", visible=False)
    class_name = gr.Textbox(label="class_name", visible=False)
    api_out = [overlay, legend, files, info, session]

    def values(sess: Session, opacity, with_files: bool = True) -> list:
        out = handlers.outputs(sess, opacity, with_files=with_files)
        return [out["overlay"], out["legend"], out["files"], out["summary"], sess]

    @user_errors
    def api_segment(image, text, attention, lam, use_mps, opacity, speed, sess):
        knobs, opacity = handlers.check_knobs(attention, lam, use_mps), check_opacity(opacity)
        sess = handlers.segment(sess, image, text, knobs, mode=check_inference(speed))
        return values(sess, opacity)

    @user_errors
    def api_rerender(attention, lam, use_mps, opacity, files, sess):
        """files: also write and return the label PNG and class JSON (not fetched by default:
        a re-render is then one image)."""
        knobs, opacity = handlers.check_knobs(attention, lam, use_mps), check_opacity(opacity)
        return values(handlers.rerender(sess, knobs), opacity, with_files=files is True)

    @user_errors
    def api_redraw(opacity, sess):
        return handlers.draw(sess, opacity)

    @user_errors
    def api_prompt_maps(class_name, sess):
        maps = handlers.prompt_maps(sess, class_name)
        grids = maps["grids"]
        return grids["sinkhorn"], grids["softmax"], overlap_note(handlers, maps)

    hidden = gr.Button(visible=False)
    hidden.click(api_segment, [ins.image, ins.text, *settings, ins.speed, session], api_out,
                 api_name="segment", preprocess=False)  # fmt: skip
    hidden.click(api_rerender, [*settings, want_files, session], api_out, api_name="rerender",
                 preprocess=False)  # fmt: skip
    hidden.click(api_redraw, [ins.opacity, session], overlay, api_name="redraw",
                 concurrency_limit=8, preprocess=False)  # fmt: skip
    hidden.click(api_prompt_maps, [class_name, session], [pm.sinkhorn, pm.softmax, pm.note],
                 api_name="prompt_maps", preprocess=False)  # fmt: skip
