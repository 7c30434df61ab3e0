"""Helpers of the training tests: launching ``train.train`` in subprocesses, comparing weights."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "train.train"]


def env(**extra: str) -> dict[str, str]:
    """The test environment for a child process (offline, 1 thread per process, repo on path)."""
    out = dict(os.environ)
    for key in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        out.pop(key, None)
    out.update(
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        OMP_WAIT_POLICY="PASSIVE",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    out.update(extra)
    return out


def tiny_args(
    data: Path, out: Path, *extra: str, cpu: bool = True, config: str = "tiny"
) -> list[str]:
    """Arguments of a run of the tiny recipe ``config`` (``zegot-tiny``, ...) on ``data``
    writing to ``out``."""
    args = ["--config", config, "--data-root", str(data), "--output-dir", str(out)]
    return args + ["--log-with", "none"] + (["--cpu"] if cpu else []) + list(extra)


def run(cmd: list[str], timeout: float = 120, **env_extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reset_accelerate() -> None:
    """Forget the process-wide Accelerate state between in-process ``main()`` calls."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
