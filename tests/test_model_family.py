"""What OTSeg and ZegOT answer the same way: which model it is (``otseg.registry.model_type``) and
gradient checkpointing of the trainable path (``set_grad_checkpointing``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from factories import tiny_model, tiny_zegot
from otseg.config import tiny_config
from otseg.models.zegot import zegot_tiny_config
from otseg.registry import model_type


def _build(kind: str) -> nn.Module:
    return tiny_model() if kind == "otseg" else tiny_zegot()


def test_model_type_of_models_configs_and_config_holders():
    otseg, zegot = _build("otseg"), _build("zegot")
    assert model_type(otseg) == model_type(tiny_config()) == "otseg"
    assert model_type(zegot) == model_type(zegot_tiny_config()) == "zegot"

    class Holder:  # e.g. the demo's RemoteModel: only the config crosses to the session
        config = zegot.config

    assert model_type(Holder()) == "zegot"
    wrapped = nn.Sequential(zegot)  # like a DDP wrapper: no config of its own
    with pytest.raises(TypeError, match="got Sequential"):
        model_type(wrapped)


def _block_norms(model: nn.Module) -> list[nn.Module]:
    """The first norm of every block on the path the prompt gradients take."""
    tower = model.image_encoder if model_type(model) == "otseg" else model.prompts.tower
    return [block.ln_1 for block in tower.transformer.resblocks]


def _recomputed_blocks(model: nn.Module) -> int:
    """Block forwards run again during backward of one training step."""
    calls = []
    hooks = [n.register_forward_hook(lambda *_: calls.append(1)) for n in _block_norms(model)]
    try:
        model.train()
        torch.manual_seed(0)  # the same crop (and prompt dropout) each call
        s = model.config.vision.image_size
        text = model.training_class_names if model_type(model) == "zegot" else model.training_text
        out = model(torch.randn(1, 3, s, s), text)
        forward = len(calls)
        out.decoder_map.float().sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return len(calls) - forward


@pytest.mark.parametrize("kind", ["otseg", "zegot"])
def test_grad_checkpointing_recomputes_every_block_in_backward(kind):
    model = _build(kind)
    blocks = len(_block_norms(model))
    assert _recomputed_blocks(model) == 0  # off as built (tiny configs)
    model.set_grad_checkpointing(True)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert _recomputed_blocks(model) == blocks
    for name, g in grads.items():  # the same gradients, recomputed
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g)
    model.set_grad_checkpointing(False)
    assert _recomputed_blocks(model) == 0
