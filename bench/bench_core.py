"""Core benchmarks, measured in one run on this machine (ratios are what to compare).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_core.py [--threads 2] [--repeats 5]

(a) Sinkhorn: ours vs the original algorithm (verbatim, with its per-iteration host sync) vs a
    softmax over pixels, on the VOC (K=20, M=1024, N=6) and COCO (K=171, M=1024, N=8) shapes;
(b) predictor latency for a 512×512 photo with ViT-B/16 dimensions (random weights), fp32 and
    bf16 autocast, Sinkhorn vs softmax attention;
(c) re-predict from cached features with a new λ, and with the other attention variant;
(d) text encoding of 10 classes × 6 prompts with the CLIP ViT-B/16 text tower, cold and cached.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a plain checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

import otseg  # noqa: E402, F401 - torchvision patch before open_clip
import otseg.nn.clip_image as clip_image  # noqa: E402
import otseg.nn.mps as mps  # noqa: E402
from otseg.inference.predictor import OTSegPredictor  # noqa: E402
from otseg.models.otseg import build_model  # noqa: E402
from otseg.nn.sinkhorn import sinkhorn  # noqa: E402
from otseg.registry import get_preset  # noqa: E402


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def original_sinkhorn(cost: torch.Tensor, eps: float = 0.05) -> torch.Tensor:
    """The original ``Sinkhorn_log_exp_sum`` (plain loop, host sync every iteration), for timing."""
    bk, m, n = cost.shape
    mu = torch.full((bk, m), 1.0 / m, device=cost.device)
    nu = torch.full((bk, n), 1.0 / n, device=cost.device)
    u, v = torch.zeros_like(mu), torch.zeros_like(nu)

    def kernel(u, v):
        k = -cost + u.unsqueeze(-1) + v.unsqueeze(-2)
        k /= eps
        return k

    for _ in range(100):
        u0 = u
        u = eps * (torch.log(mu + 1e-8) - torch.logsumexp(kernel(u, v), dim=2)) + u
        kt = kernel(u, v).permute(0, 2, 1).contiguous()
        v = eps * (torch.log(nu + 1e-8) - torch.logsumexp(kt, dim=2)) + v
        if (u - u0).abs().mean().item() < 1e-6:
            break
    return torch.exp(kernel(u, v))


@contextmanager
def original_style():
    """open_clip's attention blocks and the verbatim original Sinkhorn (the original's loop)."""
    block_forward, sink = clip_image.block_forward, mps.sinkhorn

    def original(cost, *, eps, max_iter, tol, cost_range=None):
        batch = cost.shape[:-2]
        plan = original_sinkhorn(cost.float().reshape(-1, *cost.shape[-2:]), eps)
        return plan.reshape(*batch, *cost.shape[-2:])

    clip_image.block_forward = lambda block, x: block(x)
    mps.sinkhorn = original
    try:
        yield
    finally:
        clip_image.block_forward, mps.sinkhorn = block_forward, sink


def clip_like_cost(k: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Cosine similarities in CLIP's typical range (0.1–0.35), as a (K, M, N) cost."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(k, m, 1, generator=g) * 0.04 + 0.22
    return 1 - (base + torch.randn(k, m, n, generator=g) * 0.01)


def bench_sinkhorn(repeats: int) -> None:
    print("\n(a) Sinkhorn on one crop, median ms")
    print(
        f"{'shape':<22}{'original':>10}{'ours':>10}{'ours fixed-10':>15}{'softmax':>10}{'orig/ours':>11}{'iters':>7}"
    )
    for name, (k, m, n) in {
        "VOC K=20 M=1024 N=6": (20, 1024, 6),
        "COCO K=171 M=1024 N=8": (171, 1024, 8),
    }.items():
        cost = clip_like_cost(k, m, n)
        _, iters = sinkhorn(cost, return_iterations=True)
        torch.testing.assert_close(sinkhorn(cost), original_sinkhorn(cost), atol=1e-7, rtol=1e-4)
        t_orig = timed(lambda: original_sinkhorn(cost), repeats)
        t_ours = timed(lambda: sinkhorn(cost), repeats)
        t_fixed = timed(lambda: sinkhorn(cost, max_iter=10, tol=None, cost_range=2.0), repeats)
        t_soft = timed(lambda: torch.softmax((1 - cost) / 0.05, dim=1), repeats)
        print(
            f"{name:<22}{t_orig:>10.2f}{t_ours:>10.2f}{t_fixed:>15.2f}{t_soft:>10.2f}{t_orig / t_ours:>10.2f}x{iters:>7}"
        )


def vit_b16_model():
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16-quickgelu")  # random weights, no download
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    return build_model(get_preset("voc-inductive"), clip=clip, tokenizer=tokenizer).eval()


def photo_375x500() -> np.ndarray:
    """The chelsea example photo, 300×451, resized to 375×500 (two 512 windows at test scale)."""
    from PIL import Image

    photo = Image.open(REPO / "assets" / "chelsea.jpg").convert("RGB")
    return np.asarray(photo.resize((500, 375)))


def segmenter(model, photo: np.ndarray, precision: str = "fp32", **options):
    """A zero-argument callable: ``set_image(photo)`` + ``predict()`` on a predictor of
    ``model`` with its own class names (the end-to-end step every benchmark times)."""
    p = OTSegPredictor(model, precision=precision, **options)
    p.set_vocabulary(list(model.config.class_names))

    def run():
        p.set_image(photo)
        return p.predict()

    return run


def bench_predictor(model, repeats: int) -> None:
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, size=(512, 512, 3), dtype=np.uint8)
    names = list(model.config.class_names)
    print(
        "\n(b) predictor, 512×512 photo, VOC-20 vocabulary, median ms (set_image + first predict)"
    )
    print(
        f"{'precision':<10}{'sinkhorn':>10}{'softmax':>10}{'ratio':>8}   (c) new λ   other attention"
    )
    for precision in ("fp32", "bf16"):
        p = OTSegPredictor(model, precision=precision)
        p.set_vocabulary(names)
        row = {"sinkhorn": [], "softmax": []}
        for _ in range(repeats + 1):  # alternate the variants so machine drift hits both alike
            for attention in row:
                t = time.perf_counter()
                p.set_image(photo)
                p.predict(attention=attention)
                row[attention].append((time.perf_counter() - t) * 1000)
        row = {k: statistics.median(v[1:]) for k, v in row.items()}
        p.set_image(photo)
        p.predict(attention="sinkhorn")
        lams = iter(np.linspace(0.05, 0.95, 1000))
        t_lam = timed(lambda: p.predict(attention="sinkhorn", lam=float(next(lams))), repeats)

        def switch():
            p._maps.clear()  # drop cached head maps: measure the head re-run alone
            p.predict(attention="softmax")

        t_switch = timed(switch, repeats)
        ratio = row["sinkhorn"] / row["softmax"]
        print(
            f"{precision:<10}{row['sinkhorn']:>10.0f}{row['softmax']:>10.0f}{ratio:>8.3f}   {t_lam:>9.1f}   {t_switch:>15.1f}"
        )


def bench_text(model, repeats: int) -> None:
    names = [f"object number {i}" for i in range(10)]
    embedder = model.text

    def cold():
        embedder._cache.clear()
        embedder(names)

    t_cold = timed(cold, repeats)
    embedder(names)
    t_cached = timed(lambda: embedder(names), repeats)
    print(
        f"\n(d) text encoding, 10 classes × {len(embedder.templates)} prompts: cold {t_cold:.0f} ms, cached {t_cached:.2f} ms"
    )


def uptime() -> str:
    """The load line of ``uptime`` (quote it with every number)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} repeats")
    print(f"uptime: {uptime()}")
    bench_sinkhorn(args.repeats)
    model = vit_b16_model()
    with torch.inference_mode():
        bench_predictor(model, args.repeats)
        bench_text(model, args.repeats)
    print(f"uptime: {uptime()}")


if __name__ == "__main__":
    main()
