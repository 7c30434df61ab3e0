"""Demo latency end to end through HTTP (``gradio_client``), with the handler time beside it.

A ViT-B/16-sized OTSeg (VOC preset, randomly initialised open_clip ``ViT-B-16-quickgelu``, no
download) is served on localhost; for each example photo with its suggested vocabulary:
- first overlay: /segment (upload, image and text towers, head, drawing, encoding, download);
- λ change: /rerender with a new λ (cached head maps: re-fuse only);
- attention switch: /rerender alternating sinkhorn/softmax (first switch runs the head once,
  the rest are cached; both are reported);
- opacity change: /redraw (drawing only).
"handler" is the same work called in-process on the demo's ``Handlers`` (no HTTP, no image
encoding by gradio). The overlay encoding is compared with the encoding the demo used before,
a ``gr.AnnotatedImage`` with one PNG mask per class, on the same result.

Run: ``OMP_WAIT_POLICY=PASSIVE python bench/bench_app.py [--precision fp32 bf16]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_core import vit_b16_model  # noqa: E402

import otseg  # noqa: E402, F401 - torchvision patch before open_clip
from app.inference import Handlers, LoadedModel  # noqa: E402
from app.main import build_demo  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
STEPS = ("first", "lambda", "attention_first", "attention", "opacity")
LABELS = {
    "first": "first overlay (new image and names)",
    "lambda": "re-render after λ change",
    "attention_first": "first switch to softmax (head runs)",
    "attention": "re-render after attention switch (cached)",
    "opacity": "redraw after opacity change",
}


def build(precision: str) -> LoadedModel:
    return LoadedModel(vit_b16_model(), "trained", "bench", precision=precision)


def examples() -> list[tuple[Path, str]]:
    data = json.loads((ASSETS / "examples.json").read_text())
    return [(ASSETS / e["file"], e["vocabulary"]) for e in data["examples"]]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def through_http(
    url: str, photo: Path, names: str, rounds: int, files: bool = False
) -> dict[str, list[float]]:
    """One client session on one photo, ``gradio_client`` with its defaults (it downloads every
    file an endpoint returns). ``files=True``: /rerender also returns the label PNG and the
    class JSON (what every re-render returned before it became optional)."""
    from gradio_client import Client, handle_file

    c = Client(url, verbose=False)
    t: dict[str, list[float]] = {k: [] for k in STEPS}
    t["first"].append(timed(lambda: c.predict(handle_file(str(photo)), names, "sinkhorn", 0.5,
                                              True, 0.5, api_name="/segment")))  # fmt: skip
    t["attention_first"].append(
        timed(lambda: c.predict("softmax", 0.5, True, 0.5, files, api_name="/rerender"))
    )
    for r in range(rounds):  # alternate the three cheap steps
        lam = 0.3 + 0.1 * (r % 4)
        t["lambda"].append(
            timed(lambda: c.predict("softmax", lam, True, 0.5, files, api_name="/rerender"))
        )
        att = ("sinkhorn", "softmax")[r % 2]
        t["attention"].append(
            timed(lambda: c.predict(att, lam, True, 0.5, files, api_name="/rerender"))
        )
        t["opacity"].append(timed(lambda: c.predict(0.3 + 0.1 * (r % 5), api_name="/redraw")))
    return t


def in_process(handlers: Handlers, photo: Path, names: str, rounds: int) -> dict[str, list[float]]:
    knobs = {"attention": "sinkhorn", "lam": 0.5, "use_mps": True}
    t: dict[str, list[float]] = {k: [] for k in STEPS}
    box = {}

    def first():
        box["s"] = handlers.segment(None, str(photo), names, knobs)
        handlers.outputs(box["s"], 0.5)

    t["first"].append(timed(first))
    s = box["s"]
    soft = {**knobs, "attention": "softmax"}
    t["attention_first"].append(timed(lambda: handlers.outputs(handlers.rerender(s, soft), 0.5)))
    for r in range(rounds):
        lam = 0.3 + 0.1 * (r % 4)
        k = {**soft, "lam": lam}
        t["lambda"].append(timed(lambda: handlers.outputs(handlers.rerender(s, k), 0.5)))
        k2 = {**k, "attention": ("sinkhorn", "softmax")[r % 2]}
        t["attention"].append(timed(lambda: handlers.outputs(handlers.rerender(s, k2), 0.5)))
        t["opacity"].append(timed(lambda: handlers.draw(s, 0.3 + 0.1 * (r % 5))))
    box["session"] = s
    return t


def encoding_ratio(handlers: Handlers, session) -> tuple[float, float]:
    """Median seconds to encode one result for the browser: old AnnotatedImage (PNG per class
    mask) vs the one JPEG overlay now used."""
    import gradio as gr

    from app import overlay

    image, labels, names = session.image, session.labels, session.names
    masks = [((labels == k).astype(np.float32) * 0.5, names[k]) for k in np.unique(labels)]
    colors = {name: overlay.to_hex(session.colors[i]) for i, name in enumerate(names)}
    old = gr.AnnotatedImage(color_map=colors)
    new = gr.Image(format="jpeg")
    drawn = overlay.overlay(image, labels, session.colors, 0.5)
    t_old = [timed(lambda: old.postprocess((image, masks))) for _ in range(5)]
    t_new = [timed(lambda: new.postprocess(drawn)) for _ in range(5)]
    return statistics.median(t_old), statistics.median(t_new)


def noop_round_trip(rounds: int) -> float:
    """Median seconds of a gradio_client call to an endpoint that does nothing: the floor that
    HTTP, the queue and the client add to every step on this machine, at this load."""
    import gradio as gr
    from gradio_client import Client

    with gr.Blocks() as demo:
        number = gr.Number()
        number.change(lambda x: x, number, number, api_name="noop")
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        c = Client(demo.local_url, verbose=False)
        return statistics.median(
            timed(lambda: c.predict(1, api_name="/noop")) for _ in range(rounds)
        )
    finally:
        demo.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6, help="cheap steps per photo")
    p.add_argument("--precision", nargs="+", default=["fp32"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()  # fmt: skip
    print(
        f"CPU: {cpu}; load before: {os.getloadavg()[0]:.2f} (1-min average), {os.cpu_count()} CPUs"
    )
    if os.getloadavg()[0] > 1.0:
        print("the machine is busy: HTTP times include waiting for a CPU")
    for precision in args.precision:
        loaded = build(precision)
        with tempfile.TemporaryDirectory() as tmp:
            handlers = Handlers(loaded, Path(tmp))
            demo = build_demo(loaded)
            demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
            http = {k: [] for k in STEPS}
            bare = {k: [] for k in STEPS}
            local = {k: [] for k in STEPS}
            floor = []
            try:
                for photo, names in examples():  # alternate HTTP and in-process per photo
                    for k, v in through_http(demo.local_url, photo, names, args.rounds).items():
                        http[k] += v
                    for k, v in through_http(
                        demo.local_url, photo, names, args.rounds, files=True
                    ).items():
                        bare[k] += v
                    for k, v in in_process(handlers, photo, names, args.rounds).items():
                        local[k] += v
                    floor.append(noop_round_trip(args.rounds))
            finally:
                demo.close()
            session = handlers.segment(None, str(ASSETS / "chelsea.jpg"), examples()[1][1],
                                       {"attention": "sinkhorn", "lam": 0.5, "use_mps": True})  # fmt: skip
            old, new = encoding_ratio(handlers, session)
        print(f"\n{precision}, ViT-B/16, the 5 example photos with their vocabularies (5–6 "
              f"classes), {args.threads} threads; median (max) in ms\n")  # fmt: skip
        print("| step | HTTP, gradio_client defaults | HTTP, /rerender files=True | handler |")
        print("|---|---|---|---|")
        for key, label in LABELS.items():
            cells = [f"{1e3 * statistics.median(t[key]):.0f} ({1e3 * max(t[key]):.0f})"
                     for t in (http, bare, local)]  # fmt: skip
            print(f"| {label} | " + " | ".join(cells) + " |")
        print(f"\ngradio_client round trip of a no-op endpoint (the floor): "
              f"{1e3 * statistics.median(floor):.0f} ms")  # fmt: skip
        print(f"encoding one result (chelsea.jpg, 6 classes): AnnotatedImage with a PNG per "
              f"mask {1e3 * old:.0f} ms, one JPEG overlay {1e3 * new:.1f} ms "
              f"({old / new:.0f}× less)")  # fmt: skip
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
