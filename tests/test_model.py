"""The assembled model: attention switch, MPS branch, λ, calibration, train/eval output type."""

from __future__ import annotations

import pytest
import torch

from factories import tiny_model
from otseg.models.otseg import OTSegOutput


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def run(model, batch, **kw):
    with torch.no_grad():
        return model(batch, model.embed_text(model.config.class_names), **kw)


def test_shapes(model, batch):
    out = run(model, batch)
    k, n = 5, model.config.num_prompts
    assert out.decoder_map.shape == out.score_map.shape == out.logits.shape == (2, k, 64, 64)
    assert out.scores.shape == (2, k, 64, 64)
    assert out.prompt_maps.shape == (2, k, n, 4, 4)
    assert [m.shape for m in out.layer_masks] == [(2, k, 4, 4)] * 3
    # per-prompt maps sum to the MPS map
    torch.testing.assert_close(
        out.prompt_maps.sum(2),
        model.decode(out.embedding, model.embed_text(model.config.class_names)).score,
    )


def test_attention_variants_share_weights_but_differ(model, batch):
    sk, sm = run(model, batch, attention="sinkhorn"), run(model, batch, attention="softmax")
    assert not torch.allclose(sk.decoder_map, sm.decoder_map)
    # softmax attention weights sum to 1 over pixels per query; Sinkhorn plans to 1/N
    n = model.config.num_prompts
    torch.testing.assert_close(sm.transports[-1].plan.sum(-2), torch.full((2, 5, n), 1 / n))
    torch.testing.assert_close(
        sk.transports[-1].plan.sum(-2), torch.full((2, 5, n), 1 / n), atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match="attention"):
        run(model, batch, attention="linear")


def test_mps_off_and_lambda(model, batch):
    off = run(model, batch, use_mps=False)
    assert off.score_map is None and off.prompt_maps is None
    torch.testing.assert_close(off.logits, off.decoder_map)
    for lam in (0.0, 0.3, 1.0):
        out = run(model, batch, lam=lam)
        torch.testing.assert_close(out.logits, (1 - lam) * out.decoder_map + lam * out.score_map)
    with pytest.raises(ValueError, match="lam"):
        run(model, batch, lam=1.5)


def test_seen_calibration(model, batch):
    seen = torch.tensor([True, False, True, False, True])
    plain, cal = run(model, batch), run(model, batch, seen=seen)
    diff = plain.scores - cal.scores
    torch.testing.assert_close(diff[:, seen], torch.full_like(diff[:, seen], 0.1))
    assert diff[:, ~seen].abs().max() == 0


def test_same_output_type_in_train_and_eval(batch):
    model = tiny_model()
    model.train()
    out = model(batch, model.training_text)
    assert isinstance(out, OTSegOutput) and out.decoder_map.shape[1] == 3  # seen classes only
    out.decoder_map.sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("prompt" in n) or n.startswith("decoder.") for n in trainable)
    assert model.image_encoder.transformer.resblocks[0].attn.in_proj_weight.grad is None


def test_non_square_crops_and_other_grid_sizes(model):
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 80), model.embed_text(["class0", "class1"]))
    assert out.layer_masks[0].shape == (1, 2, 3, 5)
    assert out.scores.shape == (1, 2, 48, 80)


def test_bf16_autocast_runs(model, batch):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, model.embed_text(model.config.class_names))
    ref = run(model, batch)
    assert out.transports[0].plan.dtype == torch.float32
    assert (out.scores.float().argmax(1) == ref.scores.argmax(1)).float().mean() > 0.8


def test_prompt_sets_before_every_block_or_none():
    from otseg.config import VisionConfig

    assert VisionConfig(layers=4, deep_prompt_layers=3).deep_prompt_layers == 3
    assert VisionConfig(layers=4, num_prompt_tokens=0, deep_prompt_layers=0).layers == 4
    with pytest.raises(ValueError, match="deep_prompt_layers"):
        VisionConfig(layers=12, deep_prompt_layers=5)


def test_fixed_iterations_apply_inside_the_context_only(model, batch):
    """fixed_sinkhorn changes the iteration count of the MPS map and every decoder layer while
    it is entered, and restores the stopping rule on exit."""
    from otseg.nn.mpsa import fixed_sinkhorn

    before = run(model, batch)
    with fixed_sinkhorn(model, 2):
        inside = run(model, batch)
    after = run(model, batch)
    for i in range(len(before.transports)):
        assert not torch.allclose(inside.transports[i].plan, before.transports[i].plan)
        assert torch.equal(after.transports[i].plan, before.transports[i].plan)
    assert torch.equal(after.logits, before.logits)
