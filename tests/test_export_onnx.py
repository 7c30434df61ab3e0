"""ONNX export: the prompted tower and the fixed-iteration head run in ONNX Runtime with the
same outputs as torch (any number of classes)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from factories import tiny_model
from otseg.inference.export_onnx import export_head, export_tower, fixed_head_inputs, main
from otseg.nn.mpsa import fixed_sinkhorn


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_tower_and_head_match_torch(tmp_path):
    model = tiny_model().eval()
    export_tower(model, tmp_path / "tower.onnx")
    export_head(model, tmp_path / "head.onnx", iterations=4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        emb = model.encode_image(x)
    pixels, cls = session(tmp_path / "tower.onnx").run(None, {"images": x.numpy()})
    np.testing.assert_allclose(pixels, emb.pixels.numpy(), atol=1e-5)
    np.testing.assert_allclose(cls, emb.cls.numpy(), atol=1e-5)
    head = session(tmp_path / "head.onnx")
    for k in (3, 7):  # the class count is a dynamic axis
        text = torch.randn(k, model.config.num_prompts, model.config.vision.embed_dim)
        with torch.no_grad(), fixed_sinkhorn(model, 4):
            ref = model.decode(emb, text)
        feeds = {name: v.numpy() for name, v in fixed_head_inputs(emb, text).items()}
        decoder, score = head.run(None, feeds)
        assert decoder.shape == (2, k, 4, 4)
        np.testing.assert_allclose(decoder, ref.decoder.numpy(), atol=1e-5)
        np.testing.assert_allclose(score, ref.score.numpy(), atol=1e-5)
    assert model.config.head.sinkhorn_thresh is not None  # the original rule is restored


def test_command_line_writes_both_files(tmp_path, capsys):
    directory = tiny_model().save_pretrained(tmp_path / "model")
    main([str(directory), str(tmp_path / "out.onnx"), "--iterations", "3"])
    assert (tmp_path / "out.onnx").is_file() and (tmp_path / "out.head.onnx").is_file()
    assert "3 fixed Sinkhorn iterations" in capsys.readouterr().out


def test_missing_onnx_packages_raise_a_user_error_not_system_exit(tmp_path, monkeypatch):
    """A library call of the export must not exit the process."""
    import sys

    import pytest

    from otseg.errors import UserError

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript → ImportError
    with pytest.raises(UserError, match="onnxscript"):
        export_tower(tiny_model().eval(), tmp_path / "tower.onnx")
