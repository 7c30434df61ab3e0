"""Never lose work: a run killed with SIGKILL and resumed ends with the uninterrupted run's
weights; half-written checkpoints are ignored; old checkpoints are rotated."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_helpers import REPO, TRAIN, digest, env, run, tiny_args

from otseg.data.synthetic import write_synthetic
from train.checkpoint import complete_checkpoints, latest_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate")]


STEPS = ["--max-iters", "40", "--checkpoint-every", "5", "--keep-checkpoints", "2", "--no-eval"]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path):
    data = write_synthetic(tmp_path / "data", "voc", num_train=16, num_val=2)
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(TRAIN + tiny_args(data, full, *STEPS))
    ckpts = complete_checkpoints(full / "checkpoints")
    assert [p.name for p in ckpts] == ["checkpoint_00000035", "checkpoint_00000040"]  # rotated

    proc = subprocess.Popen(
        TRAIN + tiny_args(data, killed, *STEPS),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = killed / "checkpoints" / "checkpoint_00000005"
    deadline = time.monotonic() + 60
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model").exists()
    done = latest_checkpoint(killed / "checkpoints")
    assert done is not None and int(done.name.split("_")[1]) < 40

    # a crash mid-save leaves a temporary folder; a folder without meta.json is incomplete
    (killed / "checkpoints" / ".tmp-checkpoint_00000095").mkdir()
    fake = killed / "checkpoints" / "checkpoint_00000090"
    (fake / "model").mkdir(parents=True)
    assert latest_checkpoint(killed / "checkpoints") == done

    result = run(TRAIN + tiny_args(data, killed, *STEPS, "--resume-from", "latest"))
    assert f"resumed from {done}" in result.stderr
    assert digest(killed / "model" / "model.safetensors") == digest(
        full / "model" / "model.safetensors"
    )
    assert not (killed / "checkpoints" / ".tmp-checkpoint_00000095").exists()
    meta = json.loads((killed / "checkpoints" / "checkpoint_00000040" / "meta.json").read_text())
    assert meta["step"] == 40 and meta["micro_step"] == 80  # 2 accumulation steps per step


def test_resume_from_an_incomplete_checkpoint_is_refused(tmp_path: Path):
    from train.train import main

    data = write_synthetic(tmp_path / "data", "voc", num_train=4, num_val=1)
    bad = tmp_path / "run" / "checkpoints" / "checkpoint_00000003"
    bad.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        main(tiny_args(data, tmp_path / "run", "--resume-from", str(bad), "--max-iters", "3"))
