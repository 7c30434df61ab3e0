"""Training throughput and peak memory of the tiny preset on CPU: 1 process vs 2 (gloo).

Every configuration trains the same global batch (4 crops of 64×64 per optimizer step; 1
process accumulates 2 micro-batches of 2, 2 processes take 2 each). Steps/s comes from two run
lengths (the difference removes start-up, evaluation and export); peak memory is the largest
resident set (VmHWM) of any training process. Run:
``OMP_WAIT_POLICY=PASSIVE python bench/bench_train.py``.

``--bf16-plan voc12_otseg.npy`` instead measures how far a Sinkhorn plan computed from bf16 activations (as
under ``--mixed-precision bf16``) lies from the fp32 plan, with the similarity in bf16 (as
before) and in fp32 (as now): VOC's 20×6 original prompt embeddings against a 32×32 token
grid of noisy class mixtures (cosines 0.3–0.7).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAUNCH = {
    "1 process, 1 thread": ([sys.executable, "-m", "train.train", "--cpu"], "1"),
    "1 process, 2 threads": ([sys.executable, "-m", "train.train", "--cpu"], "2"),
    "2 processes, 1 thread each": (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "train.train"],
        "1",
    ),
}  # fmt: skip


def child(cmd: list[str]) -> None:
    """Run ``cmd`` and print the peak RSS (MiB) of its largest descendant process."""
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def timed(cmd: list[str], threads: str) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=threads, ACCELERATE_USE_CPU="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--", *cmd],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return time.perf_counter() - start, float(out.stdout.strip().splitlines()[-1])


def bf16_plan(npy: Path) -> None:
    """Print the relative L1 and max differences of bf16-activation plans to the fp32 plan."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from otseg.nn.mps import cosine_similarity, transport_plan

    text = torch.from_numpy(np.load(npy)).float()  # (20, 6, 512), stored as fp16
    g = torch.Generator().manual_seed(0)
    k, n, c = text.shape
    classes = torch.randint(0, k, (32 * 32,), generator=g)
    pixels = (text[classes].mean(1) + 0.06 * torch.randn(32 * 32, c, generator=g))[None]
    queries = text[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eye = torch.eye(c)
        p16, q16 = pixels @ eye, queries @ eye  # bf16 activations, as autocast makes them
        before = torch.einsum("bmc,bknc->bkmn", F.normalize(p16, dim=-1), F.normalize(q16, dim=-1))
        now = cosine_similarity(p16, q16)
    exact = transport_plan(cosine_similarity(pixels, queries))
    print("| similarity | plan vs fp32: relative L1 | relative max |")
    print("|---|---|---|")
    for name, sim in (("bf16 (before)", before), ("fp32 of bf16 activations (now)", now)):
        diff = transport_plan(sim.float()) - exact
        l1 = (diff.abs().sum() / exact.abs().sum()).item()
        print(
            f"| {name} | {100 * l1:.2f} % | {100 * diff.abs().max().item() / exact.max().item():.2f} % |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short", type=int, default=20, help="iterations of the short run")
    p.add_argument("--long", type=int, default=120, help="iterations of the long run")
    p.add_argument(
        "--bf16-plan",
        type=Path,
        metavar="VOC12_OTSEG_NPY",
        help="bf16 vs fp32 Sinkhorn plans on the original's voc12_otseg.npy "
        "(configs/_base_/datasets/text_embedding/ of the original repository)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.cmd)
    if args.bf16_plan:
        return bf16_plan(args.bf16_plan)
    from otseg.data.synthetic import write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic(Path(tmp) / "data", "voc", num_train=64, num_val=2)
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"tiny preset, global batch 4 (64×64 crops)")  # fmt: skip
        print("| launch | steps/s | images/s | peak RSS per process (MiB) |")
        print("|---|---|---|---|")
        for name, (launch, threads) in LAUNCH.items():
            times, peak = [], 0.0
            for iters in (args.short, args.long):
                out = Path(tmp) / f"{name}-{iters}".replace(" ", "_").replace(",", "")
                cmd = launch + ["--config", "tiny", "--data-root", str(data), "--output-dir",
                                str(out), "--max-iters", str(iters), "--checkpoint-every",
                                "100000", "--no-eval", "--log-with", "none"]  # fmt: skip
                seconds, rss = timed(cmd, threads)
                times.append(seconds)
                peak = max(peak, rss)
            rate = (args.long - args.short) / (times[1] - times[0])
            print(f"| {name} | {rate:.1f} | {4 * rate:.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
