"""How well the tiny recipes learn synthetic shapes, over several data seeds: the range the
docs quote for ``tiny-fully`` and ``zegot-tiny-fully``.

For every seed, ``python -m otseg.data.synthetic DIR --layout voc --num-train 64 --num-val 16
--seed S`` (the README's data is seed 0), then ``python -m train.train --config CONFIG
--data-root DIR --cpu`` (the recipe's own seed and schedule); prints the final mIoU of each
run (``metrics.json``), its seconds, and their minimum, median and maximum. ZegOT's result also
depends on the thread count (``--threads``; the tests run with 1). Run:
``OMP_WAIT_POLICY=PASSIVE python bench/tiny_learning.py --config zegot-tiny-fully --seeds 0 1 2 3 4 5``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_seed(
    config: str, seed: int, work: Path, threads: str, overrides: list[str]
) -> tuple[float, float]:
    """(mIoU in [0, 1], seconds of the training run) of ``config`` on the data of ``seed``."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=threads, HF_HUB_OFFLINE="1")
    env.pop("ACCELERATE_USE_CPU", None)
    data, out = work / f"data-{seed}", work / f"run-{seed}"
    subprocess.run(
        [sys.executable, "-m", "otseg.data.synthetic", str(data), "--layout", "voc",
         "--num-train", "64", "--num-val", "16", "--seed", str(seed)],
        cwd=REPO, env=env, check=True, capture_output=True,
    )  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "train.train", "--config", config, "--data-root", str(data),
         "--output-dir", str(out), "--cpu", "--log-with", "none",
         *(a for item in overrides for a in ("--set", item))],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"seed {seed}: train.train failed\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    return json.loads((out / "metrics.json").read_text())["miou"], seconds


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``) with its bf16 matrix flags, else the platform's."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())  # fmt: skip
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    extra = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(extra)})" if extra else name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="zegot-tiny-fully", help="a tiny recipe of train/configs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="data seeds")
    p.add_argument(
        "--threads", default="1", help="OMP_NUM_THREADS of each run (1: as the tests run)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override of every run (repeatable)")  # fmt: skip
    args = p.parse_args()
    print(f"{args.config} {' '.join(args.overrides)}: {cpu_name()}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f} at start")  # fmt: skip
    print("| data seed | mIoU | seconds |\n|---|---|---|")
    scores = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            miou, seconds = run_seed(args.config, seed, Path(tmp), args.threads, args.overrides)
            scores.append(miou)
            print(f"| {seed} | {miou:.3f} | {seconds:.0f} |", flush=True)
    print(
        f"mIoU over data seeds {args.seeds}: min {min(scores):.3f}, median "
        f"{statistics.median(scores):.3f}, max {max(scores):.3f} (load {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
