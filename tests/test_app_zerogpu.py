"""The ZeroGPU boundary: only plain tensors cross it, and a user's session pickles.

On a ZeroGPU Space ``spaces.GPU`` runs each decorated function in a GPU worker process and
pickles its arguments and results. Off a Space the real ``spaces`` package returns the function
unchanged, so these tests check that our functions are the ones it decorates and then replace
the worker with a stand-in that pickles every argument and result and refuses anything that is
not a CPU tensor, array, string or number. The plain-CPU path is covered by test_app_e2e.py.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from torch import nn

from app import gpu
from app.compare import Comparisons, Side
from app.inference import Handlers, LoadedModel, load_model
from otseg.models.zegot import build_zegot, zegot_tiny_config
from otseg.registry import model_type
from tests.demo_helpers import client, pickling_gpu, served, tiny_dirs, write_photo

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "assets" / "chelsea.jpg"


@pytest.fixture
def worker_calls(monkeypatch) -> list[str]:
    """Every app.gpu function behind the pickling stand-in; yields the names called."""
    calls: list[str] = []
    for name in gpu.GPU_FUNCTIONS:
        monkeypatch.setattr(gpu, name, pickling_gpu(getattr(gpu, name), calls))
    return calls


def test_spaces_decorates_exactly_the_boundary_functions():
    code = (
        "import spaces\n"
        "assert spaces.GPU(len) is len  # off a Space (no GPU): the function itself\n"
        "seen = []\n"
        "spaces.GPU = lambda *a, **k: (lambda fn: seen.append(fn.__name__) or fn)\n"
        "import app.gpu\n"
        "print(','.join(seen))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SPACES_ZERO_GPU", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().split(",") == list(gpu.GPU_FUNCTIONS)


class _RefuseModules(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, nn.Module):
            raise AssertionError(f"the session holds a model ({type(obj).__name__})")
        return NotImplemented


def _dumps(session) -> bytes:
    import io

    buffer = io.BytesIO()
    _RefuseModules(buffer).dump(session)
    return buffer.getvalue()


def test_session_is_plain_picklable_data(tmp_path, worker_calls):
    _, model_dir = tiny_dirs(tmp_path)
    handlers = Handlers(load_model(str(model_dir)), tmp_path / "dl")
    knobs = {"attention": "sinkhorn", "lam": 0.5, "use_mps": True}
    session = handlers.segment(None, str(write_photo(tmp_path / "p.png")), "cat, class0", knobs)
    handlers.rerender(session, {**knobs, "attention": "softmax"})
    other = str(write_photo(tmp_path / "q.png", seed=2))  # the comparison's own predictor
    comparisons = Comparisons(handlers)
    sides = (Side("loaded", "sinkhorn"), Side("loaded", "zegclip"))
    comparisons.compare(session, other, "cat, class0", "slide", 0.5, True, 0.5, sides)
    comparisons.prompt_maps(session, "cat")
    handlers.prompt_maps(session, "cat")
    assert set(worker_calls) == set(gpu.GPU_FUNCTIONS)

    restored = pickle.loads(_dumps(session))  # what a pickling session store would hand back
    calls = len(worker_calls)
    again = handlers.rerender(restored, {**knobs, "lam": 0.2})
    before = handlers.rerender(session, {**knobs, "lam": 0.2})
    assert np.array_equal(again.labels, before.labels)
    assert len(worker_calls) == calls  # λ re-fuses cached maps: no GPU call at all


@pytest.mark.parametrize("mode", ["trained", "training-free"])
def test_demo_end_to_end_through_the_pickling_boundary(tmp_path, worker_calls, mode):
    clip_dir, model_dir = tiny_dirs(tmp_path)
    if mode == "trained":
        loaded = load_model(str(model_dir))
    else:
        loaded = load_model(None, clip_model=f"local-dir:{clip_dir}", clip_pretrained=None)
    assert loaded.mode == mode, loaded.status
    with served(loaded) as url:
        c = client(url)
        overlay, _, files, info = c.predict(handle_file(str(CAT)), "cat, grass, class0",
                                            "sinkhorn", 0.5, True, 0.5, api_name="/segment")  # fmt: skip
        assert [k["name"] for k in info["classes"]] == ["cat", "grass", "class0"]
        assert Image.open(overlay).size == Image.open(CAT).size
        *_, info = c.predict("softmax", 0.8, True, 0.5, api_name="/rerender")
        assert info["attention"] == "softmax"
        c.predict(0.9, api_name="/redraw")
        _, (left, right), *_ = c.predict(
            handle_file(str(CAT)), "cat, grass, class0", "slide", 0.5, True, 0.5, "loaded",
            "sinkhorn", "loaded", "softmax", api_name="/compare",
        )  # fmt: skip
        assert Image.open(left).size == Image.open(right).size
        *_, note = c.predict("grass", api_name="/prompt_maps")
        assert "overlap" in note
        # bad names are refused before the worker, where the message would be lost
        with pytest.raises(AppError, match="CLIP tokens long"):
            c.predict(handle_file(str(CAT)), "cat, " + "ж" * 60, "sinkhorn", 0.5, True, 0.5,
                      api_name="/segment")  # fmt: skip
    assert {"encode_image", "embed_text", "decode"} <= set(worker_calls)


def test_plain_cpu_model_registry_is_used_by_key(tmp_path):
    """The predictor of a session holds a key, not the model; an unknown key says so."""
    _, model_dir = tiny_dirs(tmp_path)
    loaded = load_model(str(model_dir))
    session = Handlers(loaded).new_session()
    assert session.predictor.model.key == loaded.key and gpu._lookup(loaded.key)[0] is loaded.model
    with pytest.raises(RuntimeError, match="no model is registered"):
        gpu.RemoteModel("nobody")
    assert isinstance(LoadedModel(None, "none", "x").key, type(None))


@pytest.mark.parametrize("kind", ["otseg", "zegot"])
def test_a_session_knows_which_model_it_runs(tmp_path, kind):
    """The session's stand-in holds only the key and config; it is the same model type."""
    if kind == "otseg":
        _, model_dir = tiny_dirs(tmp_path)
    else:
        torch.manual_seed(0)
        model_dir = build_zegot(zegot_tiny_config()).save_pretrained(tmp_path / "zegot")
    loaded = load_model(str(model_dir))
    remote = Handlers(loaded).new_session().predictor.model
    assert isinstance(remote, gpu.RemoteModel)
    assert model_type(remote) == model_type(loaded.model) == kind
    assert loaded.is_zegot == (kind == "zegot")
    assert LoadedModel(None, "none", "x").is_zegot is False


def test_only_new_class_names_cross_to_the_text_tower(tmp_path, monkeypatch):
    """A session's text cache: a name is embedded once, whatever vocabulary it comes back in."""
    _, model_dir = tiny_dirs(tmp_path)
    handlers = Handlers(load_model(str(model_dir)), tmp_path / "dl")
    sent: list[list[str]] = []
    embed = gpu.embed_text
    monkeypatch.setattr(
        gpu, "embed_text", lambda key, names: sent.append(names) or embed(key, names)
    )
    knobs = {"attention": "sinkhorn", "lam": 0.5, "use_mps": True}
    photo = str(write_photo(tmp_path / "p.png"))
    session = handlers.segment(None, photo, "cat, dog", knobs)
    handlers.segment(session, photo, "dog, sky, cat", knobs)
    handlers.segment(session, str(write_photo(tmp_path / "q.png", seed=1)), "sky, cat", knobs)
    assert sent == [["cat", "dog"], ["sky"]]
    many = [f"thing {i}" for i in range(gpu.TEXT_BATCH + 4)]  # a bounded GPU call per batch
    handlers.segment(session, photo, ", ".join(["cat", *many]), knobs)
    assert sent[2:] == [many[: gpu.TEXT_BATCH - 1], many[gpu.TEXT_BATCH - 1 :]]
    sent.clear()  # any caller of the session's model: a bounded GPU call per batch
    session.predictor.model.embed_text([f"other {i}" for i in range(gpu.TEXT_BATCH + 1)])
    assert [len(names) for names in sent] == [gpu.TEXT_BATCH, 1]


def test_bf16_runs_the_tower_in_bf16_inside_the_boundary(tmp_path):
    """--precision bf16: the image tower runs in bf16 in the GPU worker, where the model runs
    (autocast on PyTorch, the engine's own bf16 on the auto-chosen engine)."""
    _, model_dir = tiny_dirs(tmp_path)
    model = load_model(str(model_dir)).model
    crop = model.config.test_crop
    windows = torch.randn(1, 3, crop, crop)
    with torch.inference_mode():
        want = model.encode_image(windows).pixels
    for backend in ("torch", "auto"):
        fp32 = gpu.encode_image(gpu.register(model, "fp32", backend), windows)["pixels"]
        key = gpu.register(model, "bf16", backend)
        bf16 = gpu.encode_image(key, windows)["pixels"].float()
        assert gpu.tower_info(key)[1] == "bf16"
        assert (fp32 - want).abs().max() < 1e-4, backend
        assert 1e-5 < (bf16 - want).abs().max() < 5e-2, backend  # rounded: bf16 ran
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\)"):
        gpu.register(model, "fp16")
