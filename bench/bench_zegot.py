"""ZegOT vs OTSeg, measured in one run on this machine (ratios are what to compare).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_zegot.py [--threads 2] [--repeats 3]

Both models at ViT-B/16 dimensions with random weights (VOC presets, K = 20), one 512×512
photo (one slide window), fp32:
(a) predictor: ``set_image`` (image tower) and the first ``predict`` (head + fusion), and a
    re-predict from the cached image with the other transport (ZegOT: MPOT vs none vs softmax;
    OTSeg: Sinkhorn vs softmax). Rounds alternate between the models.
(b) text: 10 new class names → embeddings (ZegOT: 10 × 4 learned prompts; OTSeg: 10 × 6
    templates), cold (tower runs) and cached (dictionary look-up).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

import otseg  # noqa: F401 - torchvision patch before open_clip
from otseg.inference.predictor import OTSegPredictor
from otseg.models.otseg import build_model
from otseg.models.zegot import build_zegot
from otseg.models.zegot.towers import build_random_clip
from otseg.registry import get_preset

NEW_NAMES = ["giraffe", "kettle", "skateboard", "lighthouse", "cactus",
             "accordion", "wheelbarrow", "pelican", "chandelier", "canoe"]  # fmt: skip


def ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def build_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    zcfg = get_preset("zegot-voc-inductive").replace(clip_model=None, clip_pretrained=None)
    zegot = build_zegot(zcfg).eval()  # random ViT-B/16 towers
    ocfg = get_preset("voc-inductive").replace(clip_model=None, clip_pretrained=None)
    clip, tokenizer = build_random_clip(zcfg.vision, zcfg.text)
    otseg_model = build_model(ocfg, clip=clip, tokenizer=tokenizer).eval()
    return {"OTSeg": otseg_model, "ZegOT": zegot}


def bench_predictor(models: dict, repeats: int) -> None:
    image = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    names = list(get_preset("voc-inductive").class_names)
    predictors = {k: OTSegPredictor(m) for k, m in models.items()}
    for p in predictors.values():
        p.set_vocabulary(names)
    others = {"OTSeg": ["softmax"], "ZegOT": ["none", "softmax"]}
    rows: dict[str, dict[str, list[float]]] = {k: {} for k in models}
    for p in predictors.values():  # warm-up round, not timed
        p.set_image(image)
        p.predict(attention="sinkhorn")
    for _ in range(repeats):  # alternate the models round by round
        for name, p in predictors.items():
            r = rows[name]
            r.setdefault("set_image", []).append(ms(lambda p=p: p.set_image(image)))
            r.setdefault("predict (OT)", []).append(ms(lambda p=p: p.predict(attention="sinkhorn")))
            for att in others[name]:
                r.setdefault(f"re-predict {att}", []).append(
                    ms(lambda p=p, att=att: p.predict(attention=att))
                )
    print("\n(a) predictor, 512×512 photo, K=20, fp32, median ms")
    for name, r in rows.items():
        print(f"  {name}: " + ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in r.items()))
    z, o = rows["ZegOT"], rows["OTSeg"]
    first = {
        k: statistics.median(r["set_image"]) + statistics.median(r["predict (OT)"])
        for k, r in rows.items()
    }
    print(f"  first overlay ZegOT / OTSeg: {first['ZegOT'] / first['OTSeg']:.2f}")
    print(f"  ZegOT head, MPOT / none: "
          f"{statistics.median(z['predict (OT)']) / statistics.median(z['re-predict none']):.2f}")  # fmt: skip
    print(f"  set_image ZegOT / OTSeg: "
          f"{statistics.median(z['set_image']) / statistics.median(o['set_image']):.2f}")  # fmt: skip


def bench_text(models: dict, repeats: int) -> None:
    print("\n(b) 10 new class names → embeddings, median ms")
    for name, m in models.items():
        cold, cached = [], []
        for i in range(repeats):
            names = [f"{n} {i}" for n in NEW_NAMES]  # new names every round
            with torch.no_grad():
                cold.append(ms(lambda names=names: m.embed_text(names)))
                cached.append(ms(lambda names=names: m.embed_text(names)))
        print(
            f"  {name}: cold {statistics.median(cold):.0f}, cached {statistics.median(cached):.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load {os.getloadavg()[0]:.2f}")
    models = build_models()
    bench_predictor(models, args.repeats)
    bench_text(models, args.repeats)
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
