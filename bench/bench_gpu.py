"""Every GPU number in one run (ratios measured side by side on one device).

    python bench/bench_gpu.py                      # CUDA, ViT-B/16 dimensions, random weights
    python bench/bench_gpu.py --device cpu --quick # smoke test of every section, tiny model

(a) Sinkhorn at the VOC (K=20, M=1024, N=6) and COCO (K=171, M=1024, N=8) shapes: the
    original algorithm (verbatim, host sync per iteration), ours under the original stopping
    rule, and ours with the same iteration count fixed (no host read; checked with CUDA's sync
    debug mode);
(b) the head (decode of two 512 windows, VOC vocabulary): original rule per window, fixed
    iterations eager, and the fixed-iteration head captured whole in a CUDA graph (and, with
    --compile, last as (f): ``torch.compile(mode="reduce-overhead")`` on the same head);
(c) predictor throughput at 512² (set_image + predict, one image at a time) fp32/bf16/fp16,
    and batched forward throughput with the fixed-iteration head;
(d) end to end on a 375×500 photo (two windows): an original-style loop (open_clip attention
    blocks, the verbatim original Sinkhorn, one window per call) vs our predictor, and
    ``otseg.inference.serving.SlideServer`` (windows batched, fixed iterations, tower and head in one
    CUDA graph on CUDA, eager elsewhere), each from the photo to labels and probabilities on
    the host; label agreement with the original-style loop;
(e) training steps/s of the VOC inductive and COCO transductive ViT-B/16 presets on synthetic
    512² batches of 4, bf16 and fp32, fixed Sinkhorn iterations (``train.step_timer``: the
    step of a run).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a plain checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_core import (  # noqa: E402
    clip_like_cost,
    original_sinkhorn,
    original_style,
    photo_375x500,
    segmenter,
    uptime,
    vit_b16_model,
)

from otseg.inference.serving import SlideServer, capture_cuda_graph  # noqa: E402
from otseg.nn.clip_image import ImageEmbedding  # noqa: E402
from otseg.nn.mpsa import fixed_sinkhorn  # noqa: E402
from otseg.nn.sinkhorn import sinkhorn  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Mean ms per call of ``fn()`` over ``repeats`` calls queued back to back."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) * 1000 / repeats


def host_syncs(fn, device: torch.device) -> int | str:
    """Number of synchronising CUDA calls in ``fn()`` (CUDA's sync debug mode)."""
    if device.type != "cuda":
        return "n/a"
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def build(quick: bool, device: torch.device):
    if quick:
        sys.path.insert(0, str(REPO / "tests"))
        from factories import tiny_model

        torch.manual_seed(0)
        return tiny_model().to(device).eval()
    return vit_b16_model().to(device)


def section_sinkhorn(device, repeats, quick) -> None:
    print("\n(a) Sinkhorn, one problem per call, mean ms; max |Δ| vs the original")
    print(
        f"{'shape':<24}{'original':>10}{'ours rule':>11}{'ours fixed':>12}{'iters':>7}"
        f"{'orig/rule':>11}{'orig/fixed':>12}{'syncs fix/rule':>15}{'max |Δ|':>10}"
    )
    shapes = {"VOC K=20 M=1024 N=6": (20, 1024, 6), "COCO K=171 M=1024 N=8": (171, 1024, 8)}
    if quick:
        shapes = {"quick K=5 M=64 N=6": (5, 64, 6)}
    for name, (k, m, n) in shapes.items():
        cost = clip_like_cost(k, m, n).to(device)
        _, iters = sinkhorn(cost, return_iterations=True)
        ref = original_sinkhorn(cost)
        fixed = sinkhorn(cost, max_iter=iters, tol=None, cost_range=2.0)
        delta = max((sinkhorn(cost) - ref).abs().max().item(), (fixed - ref).abs().max().item())
        t_orig = timed(lambda: original_sinkhorn(cost), device, repeats)
        t_rule = timed(lambda: sinkhorn(cost), device, repeats)
        t_fixed = timed(
            lambda: sinkhorn(cost, max_iter=iters, tol=None, cost_range=2.0), device, repeats
        )
        syncs = host_syncs(lambda: sinkhorn(cost, max_iter=iters, tol=None, cost_range=2.0), device)
        syncs = f"{syncs}/{host_syncs(lambda: sinkhorn(cost), device)}"  # fixed / rule
        print(
            f"{name:<24}{t_orig:>10.3f}{t_rule:>11.3f}{t_fixed:>12.3f}{iters:>7}"
            f"{t_orig / t_rule:>10.2f}x{t_orig / t_fixed:>11.2f}x{syncs!s:>15}{delta:>10.1e}"
        )


def two_windows(model, device):
    """The head's inputs for two random crops: (text (K, N, C), their image embedding)."""
    s = model.config.test_crop
    text = model.embed_text(list(model.config.class_names))
    return text, model.encode_image(torch.randn(2, 3, s, s, device=device))


def section_head(model, device, repeats, iterations) -> None:
    cfg = model.config
    text, emb = two_windows(model, device)
    one = [ImageEmbedding(emb.pixels[i : i + 1], emb.cls[i : i + 1]) for i in range(2)]
    print(f"\n(b) head on 2 windows ({len(cfg.class_names)} classes), mean ms")
    t_rule = timed(lambda: [model.decode(e, text) for e in one], device, repeats)
    ref = torch.cat([model.decode(e, text).decoder for e in one])
    with fixed_sinkhorn(model, iterations):
        t_fixed = timed(lambda: model.decode(emb, text), device, repeats)
        fixed = model.decode(emb, text).decoder
        syncs = host_syncs(lambda: model.decode(emb, text), device)
        row = (
            f"original rule per window {t_rule:.2f}   fixed {iterations} its batched {t_fixed:.2f}"
        )
        if device.type == "cuda":
            pixels = emb.pixels.clone()

            def head(p):
                return model.decode(ImageEmbedding(p, emb.cls), text).decoder

            replay, _, out = capture_cuda_graph(head, pixels)
            t_graph = timed(replay, device, repeats)
            row += f"   CUDA graph {t_graph:.2f} ({t_rule / t_graph:.1f}x vs rule)"
    print(row)
    print(
        f"host syncs in the fixed head: {syncs}; max |Δ| decoder map fixed vs rule "
        f"{(fixed - ref).abs().max().item():.1e}"
    )


def section_compile(model, device, repeats, iterations) -> None:
    """``torch.compile(mode="reduce-overhead")`` on the fixed-iteration head (last: slow)."""
    text, emb = two_windows(model, device)
    with fixed_sinkhorn(model, iterations):

        def head(p):
            return model.decode(ImageEmbedding(p, emb.cls), text).decoder

        t_eager = timed(lambda: head(emb.pixels), device, repeats)
        t0 = time.perf_counter()
        compiled = torch.compile(head, mode="reduce-overhead")
        for _ in range(3):
            compiled(emb.pixels)
        sync(device)
        t_compile = time.perf_counter() - t0
        t = timed(lambda: compiled(emb.pixels), device, repeats)
        delta = (compiled(emb.pixels) - head(emb.pixels)).abs().max().item()
    print(
        f"\n(f) fixed-iteration head, 2 windows: eager {t_eager:.2f} ms, torch.compile "
        f"reduce-overhead {t:.2f} ms ({t_eager / t:.1f}x; compile {t_compile:.0f} s, "
        f"max |Δ| {delta:.1e})"
    )


def section_throughput(model, device, repeats, iterations, batch) -> None:
    cfg = model.config
    s = cfg.test_crop
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, size=(s, s, 3), dtype=np.uint8)
    names = list(cfg.class_names)
    print(f"\n(c) throughput at {s}², images/s")
    x = torch.randn(batch, 3, s, s, device=device)
    text = model.embed_text(names)
    for precision, dtype in DTYPES.items():
        t_pred = timed(segmenter(model, photo, precision), device, repeats)
        amp = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
        with fixed_sinkhorn(model, iterations), amp:
            t_batch = timed(lambda: model(x, text).output, device, max(1, repeats // 2))
        print(
            f"{precision:<6} predictor (1 image, rule) {1000 / t_pred:>8.1f}   "
            f"forward batch {batch} (fixed {iterations} its) {1000 * batch / t_batch:>8.1f}"
        )


def section_end_to_end(model, device, repeats, iterations) -> None:
    photo = photo_375x500()
    names = list(model.config.class_names)
    print("\n(d) end to end, 375×500 photo (2 windows), mean ms; label agreement")
    predict = segmenter(model, photo, "fp32")
    with original_style():
        ref = predict().labels
        t_orig = timed(predict, device, repeats)
    t_ours = timed(predict, device, repeats)
    agree = (predict().labels == ref).mean()
    print(
        f"original-style loop {t_orig:.1f}   our predictor fp32 {t_ours:.1f} "
        f"({t_orig / t_ours:.2f}x, labels {agree:.4f})"
    )
    predict_bf16 = segmenter(model, photo, "bf16")
    t_bf16 = timed(predict_bf16, device, repeats)
    print(
        f"our predictor bf16 {t_bf16:.1f} ({t_orig / t_bf16:.2f}x, labels "
        f"{(predict_bf16().labels == ref).mean():.4f})"
    )
    for precision in ("fp32", "bf16"):
        server = SlideServer(model, names, iterations=iterations, precision=precision)
        t_serve = timed(lambda server=server: server(photo), device, repeats)
        agree = (server(photo).labels == ref).mean()
        graph = "CUDA graph" if server.cuda_graph else "eager"
        print(
            f"otseg.inference.serving.SlideServer {precision} (windows batched, {iterations} its, {graph}) "
            f"{t_serve:.1f} ({t_orig / t_serve:.2f}x vs original-style, labels {agree:.4f})"
        )


def section_train(device, steps, iterations, quick) -> None:
    """The training step of a run (``train.step_timer``) on synthetic crops."""
    from accelerate.state import AcceleratorState, GradientState

    from train.step_timer import time_training_step

    rows = []
    presets = ["tiny"] if quick else ["voc-inductive", "coco-transductive"]
    batch = 2 if quick else 4
    for preset in presets:
        for precision in ("bf16", "no"):
            AcceleratorState._reset_state(reset_partial_state=True)  # one setting per Accelerator
            GradientState._reset_state()
            seconds = time_training_step(
                preset,
                batch=batch,
                mixed_precision=precision,
                steps=steps,
                warmup=2,
                sinkhorn_iters=iterations,
                tf32=True,
                cpu=device.type == "cpu",
            )
            name = "fp32 (TF32 matmuls)" if precision == "no" else precision
            rows.append(f"{preset} {name} {1 / seconds:.2f} steps/s ({batch / seconds:.0f} img/s)")
    print(
        f"\n(e) training step (train.step_timer), batch {batch}, fixed {iterations} Sinkhorn "
        "iterations, median step:"
    )
    for row in rows:
        print("  " + row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny model, few repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=10, help="fixed Sinkhorn iterations")
    ap.add_argument("--batch", type=int, default=16, help="batched-forward throughput batch")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile on the head")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip (a..e)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.repeats, args.batch, args.train_steps = 2, 2, 2
    skip = set(args.skip.split(","))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"torch {torch.__version__}, device {device} ({name}), uptime: {uptime()}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
        torch.backends.cudnn.allow_tf32 = False
    model = build(args.quick, device)
    with torch.inference_mode():
        if "a" not in skip:
            section_sinkhorn(device, args.repeats, args.quick)
        if "b" not in skip:
            section_head(model, device, args.repeats, args.iterations)
        if "c" not in skip:
            section_throughput(model, device, args.repeats, args.iterations, args.batch)
        if "d" not in skip:
            section_end_to_end(model, device, args.repeats, args.iterations)
    if "e" not in skip:
        section_train(device, args.train_steps, args.iterations, args.quick)
        if device.type == "cuda":  # train.step_timer turns TF32 on; (f) compares fp32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    if args.compile:
        with torch.inference_mode():
            section_compile(model, device, args.repeats, args.iterations)
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"uptime: {uptime()}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
