"""bench/gpu_checks.py (run on a GPU machine): its CPU smoke mode runs every section, and its
boundary check notices a result left on the device."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_quick_run_passes_every_section():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_checks.py"), "--device", "cpu", "--quick"],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "boundary check passed" in out.stdout
    assert out.stdout.count("s/step") == 4 and "FAILED" not in out.stdout
    assert "ZegOT: fp32" in out.stdout


def test_boundary_check_flags_a_result_off_the_cpu():
    from gpu_checks import checked_boundary

    fake = types.SimpleNamespace(
        GPU_FUNCTIONS=("encode_image", "decode"),
        encode_image=lambda: {"pixels": torch.zeros(1), "cls": torch.empty(1, device="meta")},
        decode=lambda: (torch.zeros(1), None, None),
    )
    results: list[str] = []
    originals = checked_boundary(fake, results)
    assert set(originals) == {"encode_image", "decode"}
    fake.encode_image()
    fake.decode()
    assert results == ["encode_image: 2 tensors, NOT CPU ['meta']", "decode: 1 tensors"]
