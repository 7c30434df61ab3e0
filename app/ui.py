"""Layout and wiring of the demo: components, events and their API names; no model logic.

API (``gradio_client``; state is kept per client session):
    /segment      image, vocabulary, attention, lam, use_mps, opacity → overlay outputs
    /rerender     attention, lam, use_mps, opacity → overlay outputs (cached embeddings)
    /redraw       opacity → overlay outputs (drawing only)
    /compare      lam, use_mps, opacity → (sinkhorn, softmax) slider, Markdown
    /prompt_maps  class name, lam → sinkhorn grid, softmax grid, Markdown
    /preset       preset name → vocabulary text
Overlay outputs: annotated image, legend HTML, [label PNG, classes JSON], summary JSON.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gradio as gr

from app import vocab
from app.inference import ATTENTION_LABELS, Handlers, Session, UserError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CSS = ".otseg-legend{list-style:none;padding-left:0;columns:2}.badge-seen{color:#1a7f37}.badge-novel{color:#9a6700}"
API_SNIPPET = """```python
from gradio_client import Client, handle_file
client = Client("http://127.0.0.1:7860/")
overlay, legend, files, info, _ = client.predict(
    handle_file("assets/chelsea.jpg"), "cat, eye, nose, background",
    "sinkhorn", 0.5, True, 0.5, api_name="/segment")
print([(c["name"], c["seen"], c["share"]) for c in info["classes"]])
client.predict("softmax", 0.8, True, 0.5, api_name="/rerender")  # no encoder re-run
```"""

try:  # ZeroGPU on Hugging Face Spaces; a no-op elsewhere
    import spaces

    def gpu(fn):
        return spaces.GPU(duration=60)(fn)

except ImportError:

    def gpu(fn):
        return fn


PROGRESS = gr.Progress()  # gradio injects a per-request tracker where this is the default


def examples() -> list[list[str]]:
    """``[[image path, vocabulary], ...]`` from ``assets/examples.json``."""
    data = json.loads((ASSETS / "examples.json").read_text())
    return [[str(ASSETS / e["file"]), e["vocabulary"]] for e in data["examples"]]


def user_errors(fn):
    """Turn bad-input errors into a ``gr.Error`` toast (no traceback; the server keeps going)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError) as e:
            raise gr.Error(str(e), print_exception=False) from None

    return wrapper


def build(handlers: Handlers) -> gr.Blocks:
    """The demo's ``gr.Blocks`` (not launched; queue settings are applied by ``app.main``)."""
    mode = handlers.loaded.mode
    with gr.Blocks(title="OTSeg — zero-shot segmentation") as demo:
        gr.Markdown(
            "# OTSeg: zero-shot semantic segmentation\nUpload a photo, list what to find, "
            "press **Segment**. Compare Sinkhorn attention (OTSeg, ECCV 2024) with softmax."
        )
        gr.Markdown(handlers.loaded.status, elem_id="mode")
        session = gr.State(None, time_to_live=3600)
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(
                    type="filepath",
                    label="Image",
                    sources=["upload", "clipboard"],
                    elem_id="image",
                    height=320,
                )
                text = gr.Textbox(label="Class names", lines=3, elem_id="vocab", placeholder="cat, sofa, lamp, background",
                                  info="Comma- or newline-separated; your order sets the colours.")  # fmt: skip
                with gr.Row():
                    preset = gr.Dropdown(
                        list(vocab.PRESETS), value=None, label="Preset vocabulary", scale=3
                    )
                    load_preset = gr.Button("Load preset", scale=1, size="sm")
                with gr.Accordion("No background class? Read this", open=False):
                    gr.Markdown(vocab.BACKGROUND_NOTE)
                attention = gr.Radio([(v, k) for k, v in ATTENTION_LABELS.items()], value="sinkhorn",
                                     label="Attention", elem_id="attention")  # fmt: skip
                lam = gr.Slider(
                    0,
                    1,
                    value=0.5,
                    step=0.05,
                    label="Ensemble λ (0: decoder only, 1: MPS score map only)",
                    elem_id="lam",
                )
                use_mps = gr.Checkbox(value=True, label="Use the MPS score map", elem_id="use_mps")
                opacity = gr.Slider(
                    0, 1, value=0.5, step=0.05, label="Overlay opacity", elem_id="opacity"
                )
                run = gr.Button(
                    "Segment", variant="primary", elem_id="segment", interactive=mode != "none"
                )
                gr.Examples(
                    examples(),
                    inputs=[image, text],
                    cache_examples=False,
                    label="Examples (mixing seen and novel classes)",
                )
            with gr.Column(scale=3):
                with gr.Tab("Overlay"):
                    annotated = gr.AnnotatedImage(
                        label="Segmentation (hover a legend item)", elem_id="overlay", height=480
                    )
                    legend = gr.HTML(elem_id="legend", label="Legend")
                    files = gr.File(
                        label="Label map (palette PNG, pixel = class id) and class list",
                        file_count="multiple",
                        elem_id="files",
                    )
                    with gr.Accordion("Details (JSON)", open=False):
                        info = gr.JSON(
                            label="Classes, colours, seen/novel, pixel shares", elem_id="info"
                        )
                with gr.Tab("Sinkhorn vs softmax"):
                    compare = gr.Button("Compare on this image", elem_id="compare")
                    slider = gr.ImageSlider(
                        label="left: Sinkhorn · right: softmax", elem_id="slider"
                    )
                    compare_note = gr.Markdown(label="agreement")
                with gr.Tab("Per-prompt maps"):
                    gr.Markdown("Score map of each prompt (M·N·T·S) for one class. Sinkhorn makes prompts compete "
                                "for pixels, so they spread over different regions; softmax lets them overlap.")  # fmt: skip
                    with gr.Row():
                        prompt_class = gr.Dropdown(
                            [], label="Class", elem_id="prompt_class", scale=3
                        )
                        show_maps = gr.Button("Show prompt maps", scale=1, elem_id="show_maps")
                    with gr.Row():
                        grid_sinkhorn = gr.Image(
                            label="Sinkhorn", type="pil", elem_id="grid_sinkhorn"
                        )
                        grid_softmax = gr.Image(label="Softmax", type="pil", elem_id="grid_softmax")
                    maps_note = gr.Markdown(label="overlap")
                with gr.Accordion("Use it from Python (gradio_client)", open=False):
                    gr.Markdown(API_SNIPPET)

        overlay_out = [annotated, legend, files, info]

        def show(sess: Session, opacity_value: float) -> list:
            out = handlers.outputs(sess, float(opacity_value))
            return [
                gr.AnnotatedImage(value=out["annotated"], color_map=out["color_map"]),
                out["legend"],
                out["files"],
                out["summary"],
            ]

        @gpu
        @user_errors
        def on_segment(
            image, vocabulary, attention, lam, use_mps, opacity, sess, progress=PROGRESS
        ):
            # preprocess=False: the image arrives as its upload record, read by otseg itself
            path = image.get("path") if isinstance(image, dict) else image
            knobs = {"attention": attention, "lam": float(lam), "use_mps": bool(use_mps)}
            sess = handlers.segment(sess, path, vocabulary, knobs, progress)
            names = sess.names
            choice = gr.Dropdown(choices=names, value=names[0])
            return [*show(sess, opacity), choice, sess]

        @gpu
        @user_errors
        def on_rerender(attention, lam, use_mps, opacity, sess):
            knobs = {"attention": attention, "lam": float(lam), "use_mps": bool(use_mps)}
            sess = handlers.rerender(sess, knobs)
            return [*show(sess, opacity), sess]

        @user_errors
        def on_redraw(opacity, sess):
            return show(sess, opacity)

        @gpu
        @user_errors
        def on_compare(lam, use_mps, opacity, sess):
            out = handlers.compare(sess, float(lam), bool(use_mps), float(opacity))
            note = (
                f"Labels differ on **{out['changed']:.1f}%** of the pixels (λ = {float(lam):.2f})."
            )
            return out["images"], note

        @gpu
        @user_errors
        def on_prompt_maps(class_name, lam, sess):
            out = handlers.prompt_maps(sess, class_name, float(lam))
            o = out["overlap"]
            note = (f"Mean pairwise overlap of the prompt maps (cosine, 1 = identical): "
                    f"Sinkhorn **{o['sinkhorn']:.2f}**, softmax **{o['softmax']:.2f}**.")  # fmt: skip
            return out["grids"]["sinkhorn"], out["grids"]["softmax"], note

        @user_errors
        def on_preset(preset):
            if not preset:
                raise UserError("Choose a preset first.")
            return vocab.preset_text(preset)

        inputs = [image, text, attention, lam, use_mps, opacity, session]
        run.click(
            on_segment,
            inputs,
            [*overlay_out, prompt_class, session],
            api_name="segment",
            preprocess=False,
        )
        text.submit(
            on_segment,
            inputs,
            [*overlay_out, prompt_class, session],
            api_name=False,
            preprocess=False,
        )
        knob_in = [attention, lam, use_mps, opacity, session]
        rerender_out = [*overlay_out, session]
        attention.input(
            on_rerender, knob_in, rerender_out, api_name="rerender", trigger_mode="always_last"
        )
        lam.release(on_rerender, knob_in, rerender_out, api_name=False, trigger_mode="always_last")
        use_mps.input(
            on_rerender, knob_in, rerender_out, api_name=False, trigger_mode="always_last"
        )
        opacity.release(on_redraw, [opacity, session], overlay_out, api_name="redraw",
                        concurrency_limit=8, trigger_mode="always_last")  # fmt: skip
        compare.click(
            on_compare, [lam, use_mps, opacity, session], [slider, compare_note], api_name="compare"
        )
        show_maps.click(
            on_prompt_maps,
            [prompt_class, lam, session],
            [grid_sinkhorn, grid_softmax, maps_note],
            api_name="prompt_maps",
        )
        load_preset.click(on_preset, preset, text, api_name="preset", concurrency_limit=None)
    return demo
