"""Synced CPU processes (torchrun + gloo): parameters identical across ranks after a few
steps, 4 processes × 1 image train as 1 process accumulating 4 (the same objective), the
evaluation gathered across processes equals a one-process evaluation, and the unsynced launch
(the Accelerate trap) stops with a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, env, run, tiny_args

from otseg.data.synthetic import write_synthetic
from train.build import build_config, build_training_model
from train.recipe import load_recipe

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# Runs train.train without dropout: processes draw their dropout masks from their own RNG
# streams, so only without it can 4 processes and 1 accumulating process give the same weights.
NO_DROPOUT = """
import sys
import train.train as tt

build_config = tt.build_config
tt.build_config = lambda recipe: build_config(recipe).replace(
    vision={"prompt_dropout": 0.0}, head={"dropout": 0.0, "attn_dropout": 0.0}
)
tt.main(sys.argv[1:])
"""

# Runs train.train and, before the export, writes a digest of every rank's full state dict.
WRAPPER = """
import hashlib, sys
import train.train as tt

export = tt.export_model

def export_with_digest(accelerator, model, directory, **kwargs):
    h = hashlib.sha256()
    for key, value in sorted(accelerator.unwrap_model(model).state_dict().items()):
        h.update(key.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    rank = accelerator.process_index
    (directory.parent / f"params_rank{rank}.txt").write_text(h.hexdigest())
    (directory.parent / f"world_rank{rank}.txt").write_text(str(accelerator.num_processes))
    return export(accelerator, model, directory, **kwargs)

tt.export_model = export_with_digest
tt.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 5 validation images: the second process gets a repeated image that must not be counted
    return write_synthetic(tmp_path_factory.mktemp("data"), "voc", num_train=12, num_val=5)


def test_two_processes_stay_in_sync(tmp_path: Path, data: Path):
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    out = tmp_path / "run"
    args = tiny_args(data, out, "--max-iters", "4", "--checkpoint-every", "2")
    result = run(TORCHRUN + [str(script), *args], timeout=180, ACCELERATE_USE_CPU="1")
    assert "2 per device × 2 processes × 1 gradient-accumulation step" in result.stderr
    assert (out / "world_rank0.txt").read_text() == (out / "world_rank1.txt").read_text() == "2"
    assert (out / "params_rank0.txt").read_text() == (out / "params_rank1.txt").read_text()
    ckpt = out / "checkpoints" / "checkpoint_00000004"
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    # the 2-process evaluation counts each validation image once
    single = tmp_path / "single.json"
    run([sys.executable, "-m", "train.evaluate", "--model", str(out / "model"), "--dataset",
         "voc", "--data-root", str(data), "--class-names", "class0,class1,class2,class3,class4",
         "--cpu", "--num-workers", "0", "--output", str(single)])  # fmt: skip
    assert json.loads((out / "metrics.json").read_text()) == json.loads(single.read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs torchrun connects the processes")
def test_unsynced_launch_is_refused(tmp_path: Path, data: Path):
    # torchrun without ACCELERATE_USE_CPU on a machine without GPUs: two unconnected trainings
    cmd = TORCHRUN + ["-m", "train.train"]
    cmd += tiny_args(data, tmp_path / "run", "--max-iters", "2", cpu=False)
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "gradients would not be synchronised" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_four_processes_train_as_one_accumulating_four(tmp_path: Path, data: Path):
    from safetensors.torch import load_file

    script = tmp_path / "no_dropout.py"
    script.write_text(NO_DROPOUT)
    args = ["--max-iters", "2", "--no-eval", "--set", "per_device_batch=1", "--set",
            "warmup_iters=0"]  # fmt: skip
    one = run([sys.executable, str(script), *tiny_args(data, tmp_path / "one", *args)])
    assert "1 per device × 1 process × 4 gradient-accumulation steps" in one.stderr
    four = TORCHRUN[:-1] + ["4", str(script), *tiny_args(data, tmp_path / "four", *args)]
    result = run(four, timeout=240, ACCELERATE_USE_CPU="1")
    assert "1 per device × 4 processes × 1 gradient-accumulation step" in result.stderr
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "four" / "model" / "model.safetensors"))
    recipe = load_recipe("tiny")
    init = build_training_model(recipe, build_config(recipe)).trained_state_dict()
    assert a.keys() == b.keys() == init.keys()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # two real Adam steps
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


PUSH_WRAPPER = """
import os, sys, time
from pathlib import Path
import train.train as tt

rank = os.environ["RANK"]
try:
    tt.main(sys.argv[1:])
    code = 0
except SystemExit as e:
    code = e.code
out = Path(sys.argv[sys.argv.index("--output-dir") + 1])
(out / f"status_rank{rank}.txt").write_text(str(code))
time.sleep(3 if rank == "0" else 0)  # the launcher ends the others when one fails
raise SystemExit(code)
"""


@pytest.mark.slow
def test_a_failed_push_ends_every_process_with_status_3(tmp_path: Path):
    """The main process uploads; its failure is broadcast, so every process exits 3 (none
    exits 0 or waits for another) and the launcher fails naming it."""
    data = write_synthetic(tmp_path / "data", "voc", num_train=8, num_val=2)
    script = tmp_path / "wrapper.py"
    script.write_text(PUSH_WRAPPER)
    out = tmp_path / "run"
    done = subprocess.run(
        [*TORCHRUN, str(script),
         *tiny_args(data, out, "--max-iters", "1", "--no-eval", "--push-to-hub", "me/tiny")],
        cwd=REPO, env=env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and "exitcode  : 3" in done.stderr, done.stderr[-3000:]
    assert [(out / f"status_rank{r}.txt").read_text() for r in (0, 1)] == ["3", "3"]
    assert (out / "model" / "model.safetensors").is_file()
