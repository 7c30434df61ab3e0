"""``python app.py`` settings that cannot work end in one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.main import check_device, check_model
from otseg.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_missing_cuda_and_mps_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(
        ValueError, match=r"^--device cuda: no CUDA GPU is usable here .*--device cpu$"
    ):
        check_device("cuda")
    with pytest.raises(ValueError, match=r"^--device cuda:1: no CUDA GPU"):
        check_device("cuda:1")
    with pytest.raises(ValueError, match=r"^--device mps: Apple MPS is not available here"):
        check_device("mps")
    with pytest.raises(ValueError, match=r"^--device gpu: unknown device; use cpu, cuda or mps$"):
        check_device("gpu")
    assert check_device(None) == "cpu" and check_device("cpu") == "cpu"


def test_app_py_exits_with_one_line_before_loading_any_weights():
    out = subprocess.run(
        [sys.executable, "app.py", "--device", "tpu", "--clip", "local-dir:/nonexistent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --device tpu: unknown device; use cpu, cuda or mps"
    assert "CLIP" not in out.stdout + out.stderr


def test_model_that_cannot_exist_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"^--model does/not/exist: no such directory; train or"):
        check_model("does/not/exist")
    with pytest.raises(ValueError, match=r"^--model original:nope: unknown original setting"):
        check_model("original:nope")
    with pytest.raises(ValueError, match=r"^--model original:voc-fully: .* cannot be used"):
        check_model("original:voc-fully")
    with pytest.raises(ValueError, match=r"the directory has no config.json; is it a model\?$"):
        check_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    for fine in (None, "", str(tmp_path), "org/name", "original:coco-transductive"):
        check_model(fine)  # whether the repo exists is only known when loading


def test_a_missing_model_directory_stops_the_demo_at_start(tmp_path, monkeypatch):
    """``runs/x`` where runs/ holds a run is a path, not a Hub id: one line, exit 2, no page."""
    from app.main import main

    (tmp_path / "runs" / "earlier" / "checkpoints").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--model", "runs/x", "--device", "cpu"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(
        "error: --model runs/x: no such directory (runs/ here holds models or runs, so it is read "
        "as a path); "
        "train or convert a model into it"
    )
    assert out.stderr.count("\n") == 1 and "Running on" not in out.stdout
    monkeypatch.setenv("OTSEG_MODEL", "./my-model")  # the environment variable: the same rule
    monkeypatch.setattr("app.main.load_model", lambda *a, **k: pytest.fail("loaded ./my-model"))
    with pytest.raises(UserError, match=r"^--model ./my-model: no such directory; "):
        main(["--device", "cpu"])  # python app.py prints it as one line (otseg.cli.run)


def test_environment_settings_are_checked_like_flags(monkeypatch, capsys):
    from app.main import parse_args

    monkeypatch.delenv("OTSEG_BACKEND", raising=False)
    monkeypatch.delenv("OTSEG_PRECISION", raising=False)
    assert (parse_args([]).precision, parse_args([]).backend) == ("auto", "auto")
    monkeypatch.setenv("OTSEG_PORT", "8080")
    monkeypatch.setenv("OTSEG_PRECISION", "bf16")
    monkeypatch.setenv("OTSEG_BACKEND", "torch")
    args = parse_args([])
    assert (args.port, args.precision, args.backend) == (8080, "bf16", "torch")
    assert parse_args(["--backend", "openvino"]).backend == "openvino"  # the flag wins
    for name, value, message in (
        ("OTSEG_PORT", "abc", "argument --port: invalid int value: 'abc'"),
        ("OTSEG_PRECISION", "fp16", "OTSEG_PRECISION=fp16: use auto, fp32 or bf16"),
        ("OTSEG_BACKEND", "tensorrt", "OTSEG_BACKEND=tensorrt: use auto, torch, openvino"),
    ):
        monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as e:
            parse_args([])
        assert e.value.code == 2 and message in capsys.readouterr().err
        monkeypatch.delenv(name)


def test_the_default_is_otseg_and_none_chooses_training_free(tmp_path, monkeypatch, capsys):
    """No --model: the authors' COCO-Stuff OTSeg; --model none / OTSEG_MODEL=none: the
    training-free mode, said so on the page; the default that cannot be had falls back to it
    and the page says why."""
    import gradio as gr

    from app.inference import DEFAULT_MODEL, LoadedModel, load_model
    from app.main import main, parse_args
    from tests.browser import free_port
    from tests.demo_helpers import tiny_dirs

    monkeypatch.delenv("OTSEG_MODEL", raising=False)
    assert parse_args([]).model == DEFAULT_MODEL == "original:coco-transductive"
    requested = []

    def fake_load(model, **kwargs):
        requested.append(model)
        return LoadedModel(None, "none", "nothing")

    monkeypatch.setattr("app.main.load_model", fake_load)
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)  # main() returns
    try:
        main(["--model", "none", "--port", str(free_port())])
        monkeypatch.setenv("OTSEG_MODEL", "none")
        main(["--port", str(free_port())])
    finally:
        gr.close_all()
    assert requested == [None, None]

    clip, _ = tiny_dirs(tmp_path)
    monkeypatch.setenv("OTSEG_CACHE", str(tmp_path / "empty-cache"))  # offline, nothing cached
    chosen = load_model(None, clip_model=f"local-dir:{clip}", clip_pretrained=None)
    assert chosen.mode == "training-free" and "(`--model none`)" in chosen.status
    fallback = load_model(DEFAULT_MODEL, clip_model=f"local-dir:{clip}", clip_pretrained=None)
    assert fallback.mode == "training-free"
    assert fallback.status.startswith(
        "⚠️ Could not load the default model, the authors' OTSeg trained on COCO-Stuff, "
        "`original:coco-transductive`: "
    )
    assert (
        "HF_HUB_OFFLINE" in fallback.status and "**Training-free mode** instead" in fallback.status
    )


def test_precision_auto_and_backend_reach_the_model(monkeypatch):
    import app.main

    class Stop(Exception):  # ends main() once the model was loaded, before the server starts
        pass

    class LoadNow:  # the background loader, run in this thread
        def __init__(self, load, failed):
            self.load = load

        def start(self):
            self.load()
            raise Stop

    seen = {}

    def load_model(model, **kwargs):
        seen.update(kwargs)
        return app.main.LoadedModel(None, "none", "nothing")

    monkeypatch.delenv("OTSEG_PRECISION", raising=False)
    monkeypatch.delenv("OTSEG_BACKEND", raising=False)
    monkeypatch.setattr(app.main, "load_model", load_model)
    monkeypatch.setattr(app.main, "ModelLoader", LoadNow)
    for flags, cpu_bf16, want in (
        ([], True, ("bf16", "auto")),  # auto: bf16 on a CPU with native bf16
        ([], False, ("fp32", "auto")),
        (["--precision", "fp32", "--backend", "torch"], True, ("fp32", "torch")),
    ):
        flagged = "bf16" if cpu_bf16 else "fp32"
        monkeypatch.setattr(app.main, "auto_precision", lambda device, p=flagged: p)
        with pytest.raises(Stop):
            app.main.main(["--device", "cpu", "--model", "none", *flags])
        assert (seen["precision"], seen["backend"]) == want
