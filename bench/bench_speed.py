"""Image tower, slide vs whole inference and ONNX Runtime, measured in one run on this CPU.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_speed.py [--threads 2] [--repeats 5] [--onnx]

ViT-B/16 dimensions (VOC preset, randomly initialised open_clip ``ViT-B-16-quickgelu``, no
download), fp32 unless stated. Variants are alternated within each repeat, so machine load
hits them alike; the ratios are what to compare. ``uptime`` is printed before and after.
Every variant runs with :func:`otseg.inference.allocator.keep_freed_memory` (as the predictor sets it on
a CPU); run with ``OTSEG_MALLOC=default`` to measure glibc's default allocator instead.

(a) image tower per 512 window: open_clip's own ``VisionTransformer.forward`` (1025 tokens),
    our prompted tower run through open_clip's block modules (1035 tokens, the previous
    implementation) and our tower (same 1035 tokens, our block forward: oneDNN GEMMs on
    prepacked weights, per-head attention); max |Δ| of ours vs the open_clip-block tower;
(b) slide inference of a 375×500 photo (two 512 windows) through the predictor, fp32 and bf16
    autocast: ours vs the same predictor with open_clip's block modules (and with --onnx, the
    ONNX Runtime tower, exported once into $OTSEG_CACHE);
(c) whole-image inference vs slide: time, and label agreement on the example photos (random
    weights, so agreement measures the protocol difference only, not quality);
(d) with --onnx: the exported image tower and fixed-iteration head in ONNX Runtime vs torch;
(e) the floor: the GEMM FLOPs of one window's tower at the rate oneDNN's GEMM reaches here on
    the tower's largest matrix product (fp32 and bf16; beside ``F.linear`` on the same product),
    against the measured tower.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a plain checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_core import photo_375x500, segmenter, uptime, vit_b16_model  # noqa: E402

import otseg.nn.clip_image as clip_image  # noqa: E402
from otseg.inference.allocator import keep_freed_memory  # noqa: E402
from otseg.inference.preprocess import load_image, to_model_input  # noqa: E402
from otseg.inference.slide import slide_inference  # noqa: E402
from otseg.inference.whole import whole_inference  # noqa: E402


def alternate(variants: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall ms and median CPU ms (this process, all threads) of each zero-argument
    callable, run in turn ``repeats`` times after a warm-up. On a shared machine the CPU-time
    ratio is the steadier one: waiting for a core does not count."""
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for i in range(repeats + 1):
        for name, fn in variants.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            if i:
                wall[name].append((time.perf_counter() - t) * 1000)
                cpu[name].append((time.process_time() - c) * 1000)
    med = statistics.median
    return {k: med(v) for k, v in wall.items()}, {k: med(v) for k, v in cpu.items()}


def table(t: dict, c: dict, labels: dict[str, str], ratios: list[tuple[str, str]]) -> None:
    """Rows of wall and CPU milliseconds, then ``slow / fast`` ratios of both."""
    print(f"{'':<46}{'wall ms':>9}{'CPU ms':>9}")
    for name, label in labels.items():
        print(f"{label:<46}{t[name]:>9.1f}{c[name]:>9.1f}")
    for slow, fast in ratios:
        print(
            f"{labels[slow]} / {labels[fast]}: wall {t[slow] / t[fast]:.2f}x, "
            f"CPU {c[slow] / c[fast]:.2f}x"
        )


@contextmanager
def open_clip_blocks():
    """Run our tower through open_clip's own block modules (the previous implementation)."""
    ours = clip_image.block_forward
    clip_image.block_forward = lambda block, x: block(x)
    try:
        yield
    finally:
        clip_image.block_forward = ours


def bench_tower(model, repeats: int) -> None:
    from otseg.nn.clip_image import build_visual

    enc = model.image_encoder
    cfg = model.config.vision
    visual = build_visual(cfg).eval()  # open_clip's tower at 512², given our weights below
    for name in ("conv1", "ln_pre", "transformer", "ln_post"):
        setattr(visual, name, getattr(enc, name))
    visual.class_embedding, visual.proj = enc.class_embedding, enc.proj
    visual.positional_embedding = enc.positional_embedding
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size)

    def previous():
        with open_clip_blocks():
            return enc(x)

    ours, ref = enc(x), previous()
    delta = max((ours.pixels - ref.pixels).abs().max(), (ours.cls - ref.cls).abs().max())
    t, c = alternate(
        {"open_clip": lambda: visual(x), "previous": previous, "ours": lambda: enc(x)}, repeats
    )
    print(f"\n(a) image tower, one {cfg.image_size}² window, fp32, medians")
    labels = {
        "open_clip": "open_clip VisionTransformer (1025 tokens)",
        "previous": "ours via open_clip blocks (1035 tokens)",
        "ours": "ours (1035 tokens)",
    }
    table(t, c, labels, [("open_clip", "ours"), ("previous", "ours")])
    print(f"max |ours - ours via open_clip blocks| = {delta:.1e}")


def bench_slide(model, repeats: int, onnx: bool = False) -> None:
    photo = photo_375x500()
    print("\n(b) 375×500 photo, set_image + predict (2 slide windows), medians")
    for precision in ("fp32", "bf16"):
        run = segmenter(model, photo, precision)

        def previous(run=run):
            with open_clip_blocks():
                return run()

        if precision == "fp32":
            exact = run().labels
            assert (exact == previous().labels).mean() > 0.999
        else:  # two bf16 roundings: report how often each keeps the fp32 labels
            print(
                f"bf16 labels equal to fp32: ours {(run().labels == exact).mean():.4f}, "
                f"via open_clip blocks (autocast) {(previous().labels == exact).mean():.4f}"
            )
        variants = {"previous": previous, "ours": run}
        labels = {"previous": f"{precision} via open_clip blocks", "ours": f"{precision} ours"}
        ratios = [("previous", "ours")]
        if precision == "fp32" and onnx:
            variants["onnx"] = segmenter(model, photo, precision, backend="onnxruntime")
            labels["onnx"] = "fp32 ours, onnxruntime tower"
            ratios += [("previous", "onnx"), ("ours", "onnx")]
            agree = (variants["onnx"]().labels == run().labels).mean()
        t, c = alternate(variants, repeats)
        table(t, c, labels, ratios)
        if precision == "fp32" and onnx:
            print(f"labels onnxruntime vs torch: {agree:.4f} equal")


def bench_whole(model, repeats: int) -> None:
    cfg = model.config
    text = model.embed_text(list(cfg.class_names))

    def run(x):
        return model(x, text).scores

    def prepare(rgb):
        return to_model_input(rgb, cfg.resize_short, cfg.pixel_mean, cfg.pixel_std)

    def slide(x, size):
        return slide_inference(run, x, crop=cfg.test_crop, stride=cfg.test_stride, out_size=size)

    def whole(x, size):
        return whole_inference(run, x, patch=cfg.vision.patch_size, out_size=size)

    photo = photo_375x500()
    x = prepare(photo)
    t, c = alternate(
        {"slide": lambda: slide(x, photo.shape[:2]), "whole": lambda: whole(x, photo.shape[:2])},
        repeats,
    )
    print("\n(c) whole-image vs slide inference (model forward, fp32), 375×500 photo, medians")
    table(
        t, c, {"slide": "slide (2 windows)", "whole": "whole (32×43 tokens)"}, [("slide", "whole")]
    )
    print("label agreement of whole with slide (random weights):")
    for path in sorted((REPO / "assets").glob("*.jpg")):
        rgb = load_image(path)
        x = prepare(rgb)
        a = slide(x, rgb.shape[:2]).argmax(1)
        b = whole(x, rgb.shape[:2]).argmax(1)
        print(f"  {path.name:<14}{rgb.shape[0]}×{rgb.shape[1]:<6}{(a == b).float().mean():.3f}")


def bench_onnx(model, repeats: int) -> None:
    import tempfile

    import onnxruntime as ort

    from otseg.inference.export_onnx import (
        HEAD_ITERATIONS,
        export_head,
        export_tower,
        fixed_head_inputs,
    )
    from otseg.nn.mpsa import fixed_sinkhorn

    cfg = model.config
    x = torch.randn(1, 3, cfg.test_crop, cfg.test_crop)
    text = model.embed_text(list(cfg.class_names))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # like PASSIVE
    with tempfile.TemporaryDirectory() as tmp:
        tower_path, head_path = Path(tmp) / "tower.onnx", Path(tmp) / "head.onnx"
        export_tower(model, tower_path, size=cfg.test_crop)
        iterations = HEAD_ITERATIONS
        export_head(model, head_path, iterations=iterations, num_classes=len(cfg.class_names))
        tower = ort.InferenceSession(str(tower_path), opts, providers=["CPUExecutionProvider"])
        head = ort.InferenceSession(str(head_path), opts, providers=["CPUExecutionProvider"])
    emb = model.encode_image(x)
    feeds = fixed_head_inputs(emb, text)
    pix, cls = tower.run(None, {"images": x.numpy()})
    with fixed_sinkhorn(model, iterations):
        torch_head = model.decode(emb, text)
    onnx_head = head.run(None, {k: v.numpy() for k, v in feeds.items()})
    print(f"\n(d) ONNX Runtime {ort.__version__} vs torch, fp32, median ms")
    print(
        f"max |Δ| tower pixels {np.abs(pix - emb.pixels.numpy()).max():.1e}, "
        f"cls {np.abs(cls - emb.cls.numpy()).max():.1e}; head ({iterations} fixed iterations) "
        f"decoder map {np.abs(onnx_head[0] - torch_head.decoder.numpy()).max():.1e}"
    )

    def bf16_tower():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.encode_image(x)

    t, c = alternate(
        {
            "torch tower": lambda: model.encode_image(x),
            "torch bf16 tower": bf16_tower,
            "onnx tower": lambda: tower.run(None, {"images": x.numpy()}),
            "torch head": lambda: model.decode(emb, text),  # the original rule
            "onnx head": lambda: head.run(None, {k: v.numpy() for k, v in feeds.items()}),
        },
        repeats,
    )
    labels = {
        "torch tower": "tower, torch fp32",
        "onnx tower": "tower, onnxruntime fp32",
        "torch bf16 tower": "tower, torch bf16 autocast",
        "torch head": "head, torch (original rule)",
        "onnx head": f"head, onnxruntime ({iterations} iterations)",
    }
    pairs = [("torch tower", "onnx tower"), ("onnx tower", "torch bf16 tower")]
    table(t, c, labels, pairs + [("torch head", "onnx head")])


def tower_flops(cfg, tokens: int) -> tuple[float, float]:
    """(dense GEMM FLOPs, attention GEMM FLOPs) of one ViT window of ``tokens`` tokens."""
    w, layers = cfg.width, cfg.layers
    hidden = int(w * cfg.mlp_ratio)
    dense = 2 * tokens * w * (3 * w + w + 2 * hidden) * layers  # QKV, out, two MLP layers
    attention = 2 * 2 * tokens * tokens * w * layers  # QKᵀ and PV over all heads
    return dense, attention


def bench_floor(model, repeats: int) -> None:
    cfg = model.config.vision
    grid = cfg.image_size // cfg.patch_size
    tokens = 1 + cfg.num_prompt_tokens + grid * grid
    hidden = int(cfg.width * cfg.mlp_ratio)
    dense, attention = tower_flops(cfg, tokens)
    gemm = 2 * tokens * cfg.width * hidden
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    print(f"\n(e) floor: one {cfg.image_size}² window, {tokens} tokens, medians")
    print(f"tower GEMM work: {dense / 1e9:.0f} GFLOP dense + {attention / 1e9:.0f} GFLOP attention")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(tokens, cfg.width).to(dtype)
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.randn(hidden, cfg.width).to(dtype))
        bias = torch.zeros(hidden, dtype=dtype)

        def product(a=a, weight=weight, bias=bias):
            return torch.ops.mkldnn._linear_pointwise(a, weight, bias, "none", [], "")

        def tower(dtype=dtype):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                return model.encode_image(x)

        plain = torch.randn(hidden, cfg.width).to(dtype)

        def default(a=a, plain=plain, bias=bias):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                return torch.nn.functional.linear(a, plain, bias)

        t, _ = alternate({"gemm": product, "F.linear": default, "tower": tower}, repeats)
        rate = gemm / (t["gemm"] / 1000)
        floor = (dense + attention) / rate * 1000
        print(
            f"{name}: oneDNN GEMM {tokens}×{cfg.width}×{hidden} {t['gemm']:.2f} ms = "
            f"{rate / 1e9:.0f} GFLOP/s (F.linear {t['F.linear']:.2f} ms, "
            f"{t['F.linear'] / t['gemm']:.2f}x slower) → GEMM floor {floor:.0f} ms per window "
            f"({2 * floor:.0f} ms for two); tower measured {t['tower']:.0f} ms"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--onnx", action="store_true", help="also compare ONNX Runtime")
    ap.add_argument("--only", choices=["tower", "slide", "whole", "onnx", "floor"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} repeats")
    # As the predictor does on a CPU; every variant below shares it (OTSEG_MALLOC=default: off).
    print(f"glibc keeps freed memory (otseg.inference.allocator): {keep_freed_memory()}")
    print(f"uptime: {uptime()}")
    model = vit_b16_model()
    with torch.inference_mode():
        if args.only in (None, "tower"):
            bench_tower(model, args.repeats)
        if args.only in (None, "slide"):
            bench_slide(model, args.repeats, args.onnx)
        if args.only in (None, "whole"):
            bench_whole(model, args.repeats)
        if args.only in (None, "floor"):
            bench_floor(model, args.repeats)
    if args.onnx or args.only == "onnx":
        with torch.inference_mode():
            bench_onnx(model, args.repeats)
    print(f"uptime: {uptime()}")


if __name__ == "__main__":
    main()
