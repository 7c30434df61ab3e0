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
