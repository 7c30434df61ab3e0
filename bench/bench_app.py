"""Demo latency on CPU with ViT-B/16 dimensions (random weights; no network).

Measures, through the demo's own handlers (``app.inference.Handlers``):
- time to first overlay: new image + new vocabulary → segment → overlay outputs drawn;
- re-render after a λ change (cached image and text embeddings and head maps);
- re-render after an attention switch (head re-run, no encoder);
- redraw after an opacity change (drawing only);
for fp32 and bf16 autocast. Run: ``OMP_WAIT_POLICY=PASSIVE python bench/bench_app.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import otseg  # noqa: E402, F401 - torchvision patch before open_clip
from app.inference import Handlers, LoadedModel  # noqa: E402
from otseg.config import get_preset  # noqa: E402
from otseg.model import build_model  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
VOCAB = "cat, eye, nose, ear, whiskers, background"


def build(precision: str) -> LoadedModel:
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16-quickgelu")  # random weights, no download
    model = build_model(
        get_preset("voc-inductive"),
        clip=clip,
        tokenizer=open_clip.get_tokenizer("ViT-B-16-quickgelu"),
    )
    return LoadedModel(model.eval(), "trained", "bench", precision=precision)


def photo_512(directory: Path, seed: int) -> str:
    """chelsea.jpg resized to 512 px on the long side, tinted per seed so every image is new."""
    img = Image.open(ASSETS / "chelsea.jpg").convert("RGB")
    img = img.resize((512, round(512 * img.height / img.width)))
    arr = np.asarray(img).astype(np.int16)
    arr = np.clip(arr + seed, 0, 255).astype(np.uint8)
    path = directory / f"photo{seed}.png"
    Image.fromarray(arr).save(path)
    return str(path)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(precision: str, repeats: int, directory: Path) -> dict[str, list[float]]:
    handlers = Handlers(build(precision), directory / "downloads")
    knobs = {"attention": "sinkhorn", "lam": 0.5, "use_mps": True}
    times: dict[str, list[float]] = {
        k: [] for k in ("first", "first_cached_text", "lambda", "attention", "opacity")
    }
    for r in range(repeats + 1):  # round 0 warms up (and fills the text cache)
        names = f"{VOCAB}, thing{r}"  # one new name per round: text tower runs for 8 prompts
        path = photo_512(directory, r)

        def first(path=path, names=names):
            session = handlers.segment(None, path, names, knobs)
            handlers.outputs(session, 0.5)
            return session

        start = time.perf_counter()
        session = first()
        t_first = time.perf_counter() - start
        t_cached = timed(
            lambda path=path: handlers.outputs(handlers.segment(None, path, VOCAB, knobs), 0.5)
        )
        t_lam = timed(
            lambda s=session: handlers.outputs(handlers.rerender(s, {**knobs, "lam": 0.8}), 0.5)
        )
        t_att = timed(
            lambda s=session: handlers.outputs(
                handlers.rerender(s, {**knobs, "attention": "softmax", "lam": 0.8}), 0.5
            )
        )
        t_opa = timed(lambda s=session: handlers.outputs(s, 0.8))
        if r:
            for key, value in zip(times, (t_first, t_cached, t_lam, t_att, t_opa), strict=True):
                times[key].append(value)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision:
            times = run(precision, args.repeats, Path(tmp))
            rows.append((precision, {k: statistics.median(v) for k, v in times.items()}))
    print(f"\nViT-B/16, 512×341 photo, {len(VOCAB.split(','))}+1 classes × 6 prompts, "
          f"{args.threads} threads, median of {args.repeats} (seconds)\n")  # fmt: skip
    print("| step | " + " | ".join(p for p, _ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    labels = {
        "first": "first overlay (new image, 1 new class name)",
        "first_cached_text": "first overlay, all names cached",
        "lambda": "re-render after λ change",
        "attention": "re-render after attention switch",
        "opacity": "redraw after opacity change",
    }
    for key, label in labels.items():
        print(f"| {label} | " + " | ".join(f"{t[key]:.2f}" for _, t in rows) + " |")


if __name__ == "__main__":
    main()
