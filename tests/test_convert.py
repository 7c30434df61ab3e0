"""The converter CLI and its errors on wrong inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from factories import fixture_config, parity_fixture
from otseg.models.otseg import OTSeg
from otseg.weights.convert import main, map_keys


@pytest.fixture(scope="module")
def fx():
    return parity_fixture("tiny_voc_inductive")


@pytest.fixture
def config_json(tmp_path, fx):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fixture_config(fx).to_dict()))
    return path


def test_cli_converts_and_the_result_reproduces_the_original(fx, tmp_path, config_json, capsys):
    out = tmp_path / "converted"
    args = [str(fx / "official.pth"), "--text-embeddings", str(fx / "text_embedding.npy")]
    assert main([*args, "--config", str(config_json), "--output", str(out)]) == 0
    assert "stored class names" in capsys.readouterr().out
    model = OTSeg.from_pretrained(out)
    stored = np.load(fx / "text_embedding.npy")  # (K, N, C) float16, used exactly as stored
    for i, name in enumerate(model.config.class_names):
        row = model.text.bank[name]
        assert row.dtype == torch.float16 and np.array_equal(row.numpy(), stored[i]), name
    ref = torch.load(fx / "outputs.pt", weights_only=True)
    seen = torch.tensor([i in model.config.seen for i in range(5)])
    with torch.no_grad():
        scores = model(ref["input"], model.embed_text(model.config.class_names), seen=seen).scores
    assert (scores - ref["seg_logit"]).abs().max() < 1e-5


def test_module_prefix_is_stripped_and_unused_keys_dropped(
    fx,
):
    state = torch.load(fx / "official.pth", weights_only=True)["state_dict"]
    renamed, dropped = map_keys({f"module.{k}": v for k, v in state.items()})
    assert all(not k.startswith("module.") for k in renamed)
    assert any(k.startswith("text_encoder.") for k in dropped)
    assert any(".self_attn." in k for k in dropped) and any("empty_weight" in k for k in dropped)
    assert len(renamed) + len(dropped) == len(state)


def run_cli(tmp_path, checkpoint, npy, config, capsys) -> str:
    code = main(
        [
            str(checkpoint),
            "--text-embeddings",
            str(npy),
            "--config",
            str(config),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    return capsys.readouterr().err


def test_errors_name_the_problem(fx, tmp_path, config_json, capsys):
    npy = fx / "text_embedding.npy"
    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    assert "not an OTSeg" in run_cli(tmp_path, tmp_path / "other.pth", npy, config_json, capsys)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert "not a readable PyTorch checkpoint" in run_cli(
        tmp_path, tmp_path / "junk.pth", npy, config_json, capsys
    )
    assert "not found" in run_cli(tmp_path, tmp_path / "missing.pth", npy, config_json, capsys)
    err = run_cli(tmp_path, npy, npy, config_json, capsys)  # a .npy given as the checkpoint
    assert err == f"error: {npy} is not a PyTorch checkpoint of tensors " + (
        "(torch.load(weights_only=True) refused it)\n"
    )
    assert "not an OTSegConfig JSON" in run_cli(tmp_path, fx / "official.pth", npy, npy, capsys)

    wrong = fixture_config(fx).replace(vision={"num_prompt_tokens": 4})
    (tmp_path / "wrong.json").write_text(json.dumps(wrong.to_dict()))
    err = run_cli(tmp_path, fx / "official.pth", npy, tmp_path / "wrong.json", capsys)
    assert "does not match the chosen config" in err and "prompt_embeddings" in err

    np.save(tmp_path / "ctx.npy", np.zeros((59, 3, 32), np.float16))
    err = run_cli(tmp_path, fx / "official.pth", tmp_path / "ctx.npy", config_json, capsys)
    assert "59 classes" in err and "voc12_otseg.npy" in err

    state = torch.load(fx / "official.pth", weights_only=True)["state_dict"]
    state["decode_head.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "extra.pth")
    assert "unknown checkpoint keys" in run_cli(
        tmp_path, tmp_path / "extra.pth", npy, config_json, capsys
    )
    del state["decode_head.extra.weight"], state["decode_head.q_proj.bias"]
    torch.save({"state_dict": state}, tmp_path / "short.pth")
    assert "missing" in run_cli(tmp_path, tmp_path / "short.pth", npy, config_json, capsys)


def test_real_preset_shapes_are_checked(fx, tmp_path, capsys):
    """The tiny checkpoint against the real VOC preset: a readable shape report, no crash."""
    err_code = main([
        str(fx / "official.pth"), "--text-embeddings", str(fx / "text_embedding.npy"),
        "--preset", "voc-inductive", "--output", str(tmp_path / "o"),
    ])  # fmt: skip
    assert err_code == 2
    assert "shape" in capsys.readouterr().err


def _mmcv_checkpoint(path, state):
    """An mmcv-era checkpoint: numpy scalars and arrays in ``meta``, hook state and the
    optimizer state, beside the state dict (as mmcv's save_checkpoint writes them)."""
    meta = {
        "epoch": np.int64(3),
        "iter": np.int64(20000),
        "seed": np.int32(0),
        "hook_msgs": {"best_score": np.float64(0.71), "last_ckpt": "iter_20000.pth"},
        "time": "Sat Oct 21 10:00:00 2023",
        "CLASSES": ("aeroplane", "bicycle"),
        "PALETTE": np.array([[128, 0, 0], [0, 128, 0]], np.uint8),
        "dtype": np.dtype("float32"),
        "flag": np.bool_(True),
    }
    optimizer = {
        "state": {0: {"step": np.int64(20000), "exp_avg": torch.zeros(3)}},
        "param_groups": [{"lr": np.float64(2e-4), "weight_decay": 0.01, "params": [0]}],
    }
    torch.save({"meta": meta, "state_dict": state, "optimizer": optimizer}, path)


def _as_numpy1(src, dst):
    """``src`` rewritten with the module name numpy 1.x pickles scalars and arrays under
    (``numpy.core.multiarray``; numpy 2 writes ``numpy._core.multiarray``)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                assert b"numpy._core.multiarray\n" in data
                data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            zout.writestr(info.filename, data)


def test_mmcv_checkpoints_with_numpy_values_are_read(tmp_path):
    from otseg.weights.convert import read_checkpoint

    state = {"backbone.w": torch.randn(2, 3), "decode_head.b": torch.arange(4)}
    _mmcv_checkpoint(tmp_path / "np2.pth", state)
    _as_numpy1(tmp_path / "np2.pth", tmp_path / "np1.pth")
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "np1.pth"))
    assert "numpy.core.multiarray.scalar" in unsafe  # what an mmcv-era file asks for
    for name in ("np2.pth", "np1.pth"):
        with pytest.raises(Exception, match="Unsupported global"):  # plain weights_only refuses
            torch.load(tmp_path / name, weights_only=True)
        read = read_checkpoint(tmp_path / name)
        assert read.keys() == state.keys()
        assert all(torch.equal(read[k], state[k]) for k in state)


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo never",))


class _NumpyCode:
    def __reduce__(self):
        return (np.load, ("weights.npy",))


@pytest.mark.parametrize(
    ("payload", "name"), [(_RunsCode(), "system"), (_NumpyCode(), "numpy.load")]
)
def test_checkpoints_referring_to_code_are_still_refused(tmp_path, payload, name):
    from otseg.errors import CheckpointError
    from otseg.weights.convert import read_checkpoint

    path = tmp_path / "code.pth"
    torch.save(
        {"meta": {"hook": payload, "iter": np.int64(1)}, "state_dict": {"w": torch.ones(1)}}, path
    )
    with pytest.raises(
        CheckpointError, match=rf"refused it: it refers to \S*{name}, which is not data"
    ):
        read_checkpoint(path)
