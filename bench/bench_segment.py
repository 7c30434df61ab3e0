"""``otseg segment`` throughput on this CPU: images per second of the whole command (decode,
segment, draw, write), measured in one run.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_segment.py [--threads 2] [--images 10] [--repeats 2]
        [--size 500x375]     # --size 4032x3024: phone photos (12 MP)

ViT-B/16 dimensions (VOC preset, randomly initialised open_clip ``ViT-B-16-quickgelu``, no
download; the command's model loading is replaced by this model, so what is timed is the run
itself: text encoding once, then every image). The photos are the five example photos at
``--size`` (default 500×375: two 512 windows each), repeated to ``--images``, with six class
names. Variants alternate within each repeat after one warm-up round, so load hits them alike;
compare the ratios. Printed: the CPU
model and its AMX/AVX-512-BF16 flags, the thread count, ``uptime`` before and after.

(a) the command as shipped on a CPU: the predictor (original Sinkhorn stopping rule), two
    loading threads, a writer thread, label PNG + overlay JPEG + JSON per image;
(b) the same without loading threads (``--workers 0``): what the threads buy;
(c) ``--precision bf16``;
(d) ``--iterations 10``: the batched fixed-iteration windows (the GPU path) on this CPU;
(e) a plain Python loop a user would write: ``set_image`` + ``predict`` per path and a label
    PNG saved with Pillow, no threads.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a plain checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_core import uptime, vit_b16_model  # noqa: E402
from PIL import Image  # noqa: E402

import otseg.segment_cli as segment_cli  # noqa: E402
from otseg.inference.predictor import OTSegPredictor  # noqa: E402

NAMES = ["cat", "person", "sofa", "plant", "wall", "sky"]


def cpu_line() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = sorted(set(re.findall(r"\b(amx_\w+|avx512_bf16|avx512f)\b", text)))
    return f"{model.group(1) if model else 'unknown CPU'}; flags: {' '.join(flags) or 'none'}"


def photos(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    examples = sorted((REPO / "assets").glob("*.jpg"))
    paths = []
    for i in range(count):
        image = Image.open(examples[i % len(examples)]).convert("RGB").resize(size)
        path = folder / f"photo{i:03d}.jpg"
        image.save(path, quality=92)
        paths.append(path)
    return paths


def command(model, inputs: Path, out: Path, *flags: str):
    """A zero-argument callable running ``otseg segment`` on ``inputs`` into a fresh ``out``."""

    def run() -> None:
        shutil.rmtree(out, ignore_errors=True)
        argv = [str(inputs), "--model", "vit-b16", "--names", ", ".join(NAMES), "--out", str(out)]
        with contextlib.redirect_stdout(io.StringIO()):  # its summary line
            code = segment_cli.main([*argv, "--quiet", *flags])
        assert code == 0, code

    return run


def plain_loop(model, paths: list[Path], out: Path):
    def run() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        predictor = OTSegPredictor(model)
        predictor.set_vocabulary(NAMES)
        for path in paths:
            predictor.set_image(path)
            labels = predictor.predict().labels.astype(np.uint8)
            Image.fromarray(labels).save(out / f"{path.stem}.png")

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", default="500x375", help="photo width x height")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(args.threads)
    print(cpu_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {uptime()}")
    model = vit_b16_model()
    segment_cli.load_model = lambda *a, **k: model  # the run, not the loading, is timed
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        paths = photos(tmp / "in", args.images, size)
        variants = {
            "(a) otseg segment (CPU default)": command(model, tmp / "in", tmp / "a"),
            "(b) --workers 0": command(model, tmp / "in", tmp / "b", "--workers", "0"),
            "(c) --precision bf16": command(model, tmp / "in", tmp / "c", "--precision", "bf16"),
            "(d) --iterations 10 (batched windows)": command(
                model, tmp / "in", tmp / "d", "--iterations", "10"
            ),
            "(e) plain predictor loop, label PNG only": plain_loop(model, paths, tmp / "e"),
        }
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(args.repeats + 1):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                if i:  # the first round warms up
                    seconds[name].append(time.perf_counter() - start)
    n = args.images
    print(
        f"\n{n} photos of {size[0]}×{size[1]}, {len(NAMES)} classes, median of {args.repeats} runs"
    )
    print(f"{'':<44}{'s/run':>8}{'images/s':>10}")
    base = statistics.median(seconds["(a) otseg segment (CPU default)"])
    for name, values in seconds.items():
        t = statistics.median(values)
        print(f"{name:<44}{t:>8.1f}{n / t:>10.2f}   ({t / base:.2f}× the time of (a))")
    print(uptime())


if __name__ == "__main__":
    main()
