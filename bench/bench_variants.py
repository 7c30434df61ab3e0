"""Time of each attention variant on one photo, measured in one run (ratios are what to compare).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_variants.py [--threads 2] [--repeats 5]

ViT-B/16 dimensions with random weights (the cost does not depend on the values): the VOC
(K = 20 names, N = 6 prompts, 10 visual prompts) and COCO-Stuff (K = 171, N = 8, 100 visual
prompts) configs, the 375×500 example photo (two 512 slide windows), fp32. For each variant:

- head: ``predict(attention=...)`` on the cached image embedding (what switching the variant
  costs in the demo; the image tower is not run again);
- end to end: ``set_image`` + ``predict`` (the image tower dominates, the same for all).

Prints the CPU model and flags, torch threads, and the load before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from bench_core import photo_375x500, uptime  # noqa: E402

import otseg  # noqa: E402, F401 - torchvision patch before open_clip
from otseg.inference.predictor import OTSegPredictor  # noqa: E402
from otseg.models.otseg import build_model  # noqa: E402
from otseg.registry import get_preset  # noqa: E402

VARIANTS = ("sinkhorn", "softmax", "zegclip")


def cpu_line() -> str:
    """The CPU model and the flags that decide the speed of these kernels."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return (
        f"{model}; flags: {', '.join(f for f in wanted if f in flags) or 'none of ' + str(wanted)}"
    )


def interleaved_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each callable, run in rounds (a, b, c, a, b, c, ...) so that a
    change of load during the run falls on every variant alike; one warm-up round first."""
    times = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def model_for(preset: str):
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16-quickgelu")  # random weights, no download
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    return build_model(get_preset(preset), clip=clip, tokenizer=tokenizer).eval()


def bench(preset: str, repeats: int) -> None:
    model = model_for(preset)
    names = list(model.config.class_names)
    photo = photo_375x500()
    predictor = OTSegPredictor(model)
    predictor.set_vocabulary(names)  # the text tower runs here, once (cached afterwards)
    predictor.set_image(photo)

    def head(attention):
        def run():
            predictor.set_vocabulary(names)  # clears the cached head maps; the text is cached
            predictor.predict(attention=attention)

        return run

    def end_to_end(attention):
        def run():
            predictor.set_image(photo)
            predictor.predict(attention=attention)

        return run

    cfg = model.config
    print(f"\n{preset}: K = {len(names)} names, N = {cfg.num_prompts} prompts, "
          f"{cfg.vision.num_prompt_tokens} visual prompts; medians of {repeats}")  # fmt: skip
    heads = interleaved_ms({a: head(a) for a in VARIANTS}, repeats)
    ends = interleaved_ms({a: end_to_end(a) for a in VARIANTS}, repeats)
    print(f"{'variant':<10}{'head ms':>10}{'÷ sinkhorn':>12}{'end to end ms':>16}")
    for a in VARIANTS:
        ratio = heads[a] / heads["sinkhorn"]
        print(f"{a:<10}{heads[a]:>10.0f}{ratio:>12.2f}{ends[a]:>16.0f}")
    print(f"uptime: {uptime()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--presets", nargs="+", default=["voc-inductive", "coco-transductive"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_line()}")
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, photo 375×500")
    print(f"uptime: {uptime()}")
    with torch.inference_mode():
        for preset in args.presets:
            bench(preset, args.repeats)
    print(f"\nuptime: {uptime()}")


if __name__ == "__main__":
    main()
