"""Command-line entry points fail on bad input the same way: one line, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from otseg.errors import CheckpointError, UserError, run
from otseg.inference.preprocess import ImageError

ROOT = Path(__file__).resolve().parents[1]


def exit_of(main, capsys):
    with pytest.raises(SystemExit) as e:
        run(main)
    return e.value.code, capsys.readouterr().err


def raiser(exc):
    def main():
        raise exc

    return main


def test_run_exit_codes_and_messages(capsys, monkeypatch):
    monkeypatch.delenv("OTSEG_TRACEBACK", raising=False)
    assert exit_of(lambda: None, capsys) == (0, "")
    assert exit_of(lambda: {"miou": 1.0}, capsys) == (0, "")
    assert exit_of(lambda: 3, capsys) == (3, "")
    assert exit_of(raiser(UserError("bad λ\nmore")), capsys) == (2, "error: bad λ\n")
    assert exit_of(raiser(CheckpointError("not a checkpoint")), capsys)[0] == 2
    assert exit_of(raiser(ImageError("not an image")), capsys)[0] == 2
    assert exit_of(raiser(FileNotFoundError("no such file x")), capsys) == (
        2,
        "error: no such file x\n",
    )
    assert exit_of(raiser(SystemExit("error: recipe not found")), capsys) == (
        2,
        "error: recipe not found\n",
    )
    assert exit_of(raiser(SystemExit(0)), capsys) == (0, "")  # e.g. --help
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run(raiser(ZeroDivisionError()))
    monkeypatch.setenv("OTSEG_TRACEBACK", "1")
    with pytest.raises(UserError):
        run(raiser(UserError("shown with traceback")))


def test_an_internal_value_error_keeps_its_traceback(capsys, monkeypatch):
    """Only a UserError is bad input: a plain ValueError is a bug and is not turned into one
    line."""
    monkeypatch.delenv("OTSEG_TRACEBACK", raising=False)
    with pytest.raises(ValueError, match="shape mismatch") as e:
        run(raiser(ValueError("shape mismatch inside the decoder")))
    assert not isinstance(e.value, UserError)
    assert "error:" not in capsys.readouterr().err


def test_a_malformed_recipe_file_is_one_line(tmp_path, capsys):
    from train.recipe import load_recipe

    bad = tmp_path / "bad.toml"
    bad.write_text("iterations = = 3\n")
    code, err = exit_of(lambda: load_recipe(bad), capsys)
    assert (
        code == 2 and err.startswith(f"error: {bad} is not valid TOML (") and err.count("\n") == 1
    )

    other = tmp_path / "recipe.json"
    other.write_text("{}")
    assert exit_of(lambda: load_recipe(other), capsys) == (
        2,
        f"error: {other}: a recipe is a .toml file (see train/configs/)\n",
    )


COMMANDS = {
    "convert": [
        "-m", "otseg", "convert", "/nonexistent.pth", "--text-embeddings", "/nonexistent.npy",
        "--preset", "voc-inductive", "--output", "OUT",
    ],
    "convert --original": ["-m", "otseg.weights.convert", "--original", "voc-fully", "--output", "OUT"],
    "publish": ["-m", "otseg", "publish", "ORG", "--only", "coco", "--output", "OUT"],
    "unknown command": ["-m", "otseg", "segmnet", "x.jpg"],
    "train": ["-m", "train.train", "--config", "/nonexistent.toml"],
    "evaluate": ["-m", "train.evaluate", "--model", "OUT", "--dataset", "voc", "--data-root", "OUT"],
    "export_onnx": ["-m", "otseg", "export-onnx", "/nonexistent/model", "OUT"],
    "app": ["app.py", "--device", "cuda:7"],
    "app --model": ["app.py", "--model", "does/not/exist"],
    "app --model original:": ["app.py", "--model", "original:nope"],
}  # fmt: skip


def test_entry_points_fail_in_one_line(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("OTSEG_TRACEBACK", None)
    procs = {
        name: subprocess.Popen(
            [sys.executable, *[str(tmp_path) if a == "OUT" else a for a in args]],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in COMMANDS.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err, (name, err)
        assert lines[-1].startswith("error: "), (name, err)
        assert len([line for line in lines if line.startswith("error")]) == 1, (name, err)


def test_otseg_command_lists_its_subcommands(capsys):
    """``otseg`` with no arguments (or --help) lists every subcommand and exits 0."""
    from otseg.cli import COMMANDS, dispatch

    assert dispatch([]) == 0
    shown = capsys.readouterr().out
    assert all(f"  {name}" in shown for name in COMMANDS)
    with pytest.raises(SystemExit, match="unknown command 'nope'; choose one of: convert"):
        dispatch(["nope"])
