"""ZegOT on tiny random towers: equivariance, gradients, MPOT, learned prompts, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from factories import tiny_zegot
from otseg.errors import CheckpointError, UserError
from otseg.inference.predictor import OTSegPredictor
from otseg.models.zegot import PRESETS, ZegOT, build_zegot, zegot_tiny_config
from otseg.models.zegot.mpot import block_similarities, geometric_mean, mpot, refine_layer
from otseg.registry import get_preset
from otseg.weights.pretrained import from_pretrained


@pytest.fixture(scope="module")
def model() -> ZegOT:
    return tiny_zegot()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_presets_follow_the_paper():
    assert {f"zegot-{d}-{s}" for d in ("voc", "context", "coco")
            for s in ("inductive", "transductive")} | {"zegot-tiny"} == set(PRESETS)  # fmt: skip
    voc = get_preset("zegot-voc-transductive")
    assert voc.ensemble_lambda == 0.8 and voc.head.mpot_layers == (8, 9, 10, 11, 12)
    assert (voc.num_prompts, voc.head.context_length, voc.vision.layers) == (4, 8, 12)
    assert (
        voc.frozen_teacher_until == 0.2
        and get_preset("zegot-coco-transductive").frozen_teacher_until == 0.5
    )
    assert get_preset("zegot-context-inductive").vision.image_size == 480
    with pytest.raises(ValueError, match="mpot_layers"):
        zegot_tiny_config(head={"mpot_layers": (5,)})


@pytest.mark.parametrize("attention", ["sinkhorn", "softmax", "none"])
def test_permuting_classes_permutes_every_output(model, images, attention):
    names = list(model.config.class_names)
    perm = [3, 0, 4, 2, 1]
    with torch.no_grad():
        a = model(images, model.embed_text(names), attention=attention)
        b = model(images, model.embed_text([names[i] for i in perm]), attention=attention)
    for field in ("decoder_map", "score_map", "logits", "prompt_maps", "dfa_maps"):
        torch.testing.assert_close(
            getattr(b, field), getattr(a, field)[:, perm], atol=1e-5, rtol=1e-4
        )


def test_gradients_reach_prompts_ga_and_decoder_only(images):
    m = tiny_zegot().train()
    out = m(images, list(m.training_class_names))
    (out.decoder_map.sum() + out.score_map.sum()).backward()
    with_grad = {
        n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert "prompts.ctx" in with_grad and "q_proj.weight" in with_grad
    assert any(n.startswith("decoder.") for n in with_grad)
    assert not [n for n in with_grad if n.startswith(("image_encoder.", "prompts.tower."))]
    assert not any(p.requires_grad for p in m.image_encoder.parameters())
    assert not any(p.requires_grad for p in m.prompts.tower.parameters())


def test_mpot_plans_have_uniform_marginals(model, images):
    emb = model.encode_image(images[:1])
    g = torch.nn.functional.normalize(torch.randn(1, 3, 4, 32), dim=-1)
    sims = block_similarities(emb.blocks, g)
    maps = mpot(sims, (3, 4), "sinkhorn", model.config.head)
    assert len(maps.transports) == 2
    m = sims.shape[-2]
    for tr in maps.transports:
        torch.testing.assert_close(tr.plan.sum(-2), torch.full_like(tr.plan.sum(-2), 1 / 4 + 1e-8))
        torch.testing.assert_close(
            tr.plan.sum(-1), torch.full_like(tr.plan.sum(-1), 1 / m), atol=1e-5, rtol=1e-3
        )


def test_none_equals_untransported_maps(model, images):
    emb = model.encode_image(images[:1])
    g = torch.randn(1, 3, 4, 32)
    sims = block_similarities(emb.blocks, g)
    maps = mpot(sims, (3, 4), "none", model.config.head)
    torch.testing.assert_close(maps.refined, sims[2:4])
    assert maps.transports == []
    refined, _ = refine_layer(sims[3], "sinkhorn", model.config.head)
    assert not torch.allclose(refined, sims[3])


def test_block_similarities_stay_float32_under_bf16_autocast():
    """ZegOT's maps go through OTSeg's fp32 similarity: bf16 activations (as autocast makes
    them) give the float64 cosine of those activations to 1e-6; a bf16 similarity is off by
    ~1e-2 and moves the Sinkhorn plans by ~2 %."""
    g = torch.Generator().manual_seed(0)
    blocks = F.normalize(torch.randn(2, 1, 32, 4, 4, generator=g), dim=2)
    queries = torch.randn(1, 3, 4, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b16, q16 = blocks @ torch.eye(4), queries @ torch.eye(32)  # bf16 activations
        assert b16.dtype == q16.dtype == torch.bfloat16
        sims = block_similarities(b16, q16)
    assert sims.dtype == torch.float32 and sims.shape == (2, 1, 3, 16, 4)
    p = F.normalize(b16.double().flatten(3), dim=2)  # (L, B, C, M)
    q = F.normalize(q16.double(), dim=-1)
    exact = torch.einsum("lbcm,bknc->lbkmn", p, q)
    torch.testing.assert_close(sims.double(), exact, rtol=0, atol=1e-6)


def test_zegot_transports_are_solved_on_float32_similarities_under_bf16(model, images):
    emb = model.encode_image(images[:1])
    text = model.embed_text(list(model.config.class_names))
    with torch.no_grad():
        fp32 = model.decode(emb, text)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.decode(emb, text)
    for tr, ref in zip(bf16.transports, fp32.transports, strict=True):
        assert tr.similarity.dtype == torch.float32
        # only the GA layer's bf16 matmul differs now: ~0.5 % (a bf16 similarity: ~1.8 %)
        assert ((tr.plan - ref.plan).abs().sum() / ref.plan.abs().sum()).item() < 0.01


@pytest.mark.parametrize("last", ["identity", "sigmoid"])
def test_geometric_mean_matches_direct_float64(last):
    g = torch.Generator().manual_seed(0)
    refined = torch.rand(3, 2, 5, 4, generator=g, dtype=torch.float64) * 2 - 0.5
    d = refined.shape[0]
    direct = torch.ones(2, 5, 4, dtype=torch.float64)
    for i in range(d):
        x = refined[i]
        phi = x.clamp(min=1e-6) if (i == d - 1 and last == "identity") else 1 / (1 + torch.exp(-x))
        direct = direct * phi ** (1.0 / d)
    torch.testing.assert_close(
        geometric_mean(refined.float(), last).double(), direct, rtol=1e-5, atol=1e-7
    )


def test_learned_prompts_truncate_and_match_the_full_context(model):
    prompts = model.prompts
    names = ["cat", "a very long and unusual thing"]
    tokens = prompts.tower.tokenizer(prompts.prompts(names))
    assert (tokens[:, 1 : 1 + prompts.ctx.shape[1]] == tokens[0, 1]).all()  # one "X" per vector
    with torch.no_grad():
        short = prompts.encode(names)
        tower = prompts.tower
        words = tower.token_embedding(tokens).unsqueeze(0).expand(4, -1, -1, -1)
        n_ctx = prompts.ctx.shape[1]
        ctx = prompts.ctx.unsqueeze(1).expand(-1, 2, -1, -1)
        x = torch.cat([words[:, :, :1], ctx, words[:, :, 1 + n_ctx :]], 2).reshape(8, 77, -1)
        x = tower.transformer(x + tower.positional_embedding, attn_mask=tower.attn_mask)
        full = (
            tower.ln_final(x)[torch.arange(8), tokens.argmax(-1).repeat(4)] @ tower.text_projection
        )
        full = torch.nn.functional.normalize(full, dim=-1).reshape(4, 2, -1).transpose(0, 1)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-4)


def test_too_long_names_are_named_in_the_error(model):
    with pytest.raises(UserError, match=r"1 class name\(s\) too long .* 'word word"):
        model.embed_text(["cat", "word " * 80])


def test_text_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        m = tiny_zegot(head={"text_checkpointing": checkpointing}).train()
        m.embed_text(["cat", "dog"]).sum().backward()
        grads.append(m.prompts.ctx.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_reordered_names_reorder_the_embeddings_in_training():
    """The token cache of a training step must not hand back the old order for the same set of
    names; each row equals the name encoded alone."""
    m = tiny_zegot().train()
    names = ["cat", "dog", "traffic light"]
    alone = {n: m.embed_text([n])[0].detach() for n in names}
    for order in (names, names[::-1], ["dog", "traffic light", "cat"]):
        got = m.embed_text(order)
        assert got.requires_grad
        want = torch.stack([alone[n] for n in order])
        torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-5)


def test_training_steps_tokenise_a_name_list_once():
    m = tiny_zegot().train()
    calls = []
    tokenizer = m.prompts.tower.tokenizer
    m.prompts.tower.tokenizer = lambda prompts: calls.append(list(prompts)) or tokenizer(prompts)
    first = m.embed_text(["cat", "dog"])  # grad mode: encoded every step, tokenised once
    again = m.embed_text(["cat", "dog"])
    m.embed_text(["dog"])
    assert len(calls) == 2 and first.requires_grad
    torch.testing.assert_close(first, again)
    fresh = build_zegot(zegot_tiny_config()).train()
    fresh.load_state_dict(m.state_dict())  # an uncached model computes the same embeddings
    torch.testing.assert_close(fresh.embed_text(["cat", "dog"]), first)


def test_new_names_are_encoded_once_and_recomputed_after_an_update(model):
    calls = []
    original = model.prompts.encode
    model.prompts.encode = lambda names: calls.append(list(names)) or original(names)
    try:
        with torch.no_grad():
            a = model.embed_text(["cat", "dog"])
            b = model.embed_text(["dog", "bird", "cat"])
            assert calls == [["cat", "dog"], ["bird"]]
            torch.testing.assert_close(b[0], a[1])
            model.prompts.ctx.add_(0.1)  # an optimizer step changes the vectors
            c = model.embed_text(["cat"])
            model.prompts.ctx.sub_(0.1)
        assert calls[-1] == ["cat"] and not torch.allclose(c[0], a[0])
    finally:
        del model.prompts.encode


def test_save_load_round_trip_and_predictor(model, images, tmp_path):
    model.save_pretrained(tmp_path)
    info = json.loads((tmp_path / "config.json").read_text())
    assert info["model"] == "zegot"
    loaded = from_pretrained(tmp_path)
    assert isinstance(loaded, ZegOT) and loaded.config == model.config
    names = ["class0", "sofa", "class4"]
    with torch.no_grad():
        a = model(images, model.embed_text(names))
        b = loaded(images, loaded.embed_text(names))
    torch.testing.assert_close(a.output, b.output, atol=0, rtol=0)

    predictor = OTSegPredictor.from_pretrained(str(tmp_path))
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8))
    predictor.set_vocabulary(names)
    result = predictor.predict(attention="none")
    assert result.labels.shape == (50, 90) and result.lam == 0.8
    assert result.templates == tuple(f"learned prompt {i}" for i in range(1, 5))
    assert result.prompt_maps.shape[:2] == (3, 4)

    info["model"] = "other"
    (tmp_path / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="unknown"):
        from_pretrained(tmp_path)


def test_otseg_directory_is_not_a_zegot(tmp_path):
    from factories import tiny_model

    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="OTSeg"):
        ZegOT.from_pretrained(tmp_path)


def test_decoder_size_at_vit_b16_dims():
    from otseg.models.zegot.decoder import ScoreMapDecoder

    cfg = get_preset("zegot-voc-inductive")
    n = sum(p.numel() for p in ScoreMapDecoder(12, cfg.head).parameters())
    assert 0.5e6 < n < 0.7e6  # FPN 4×64 + ASPP (1, 3, 6, 9) + pooling over 257 channels


def test_push_to_hub_uploads_a_zegot_directory(model, monkeypatch):
    """No network: the Hub client is replaced by a recorder."""
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            calls["create"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            from pathlib import Path

            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["config"] = json.loads((Path(folder_path) / "config.json").read_text())
            calls["card"] = (Path(folder_path) / "README.md").read_text()
            return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert model.push_to_hub("me/zegot-tiny").endswith("/commit/abc")
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert calls["config"]["model"] == "zegot" and "# ZegOT" in calls["card"]


def test_hand_crafted_prompt_ablation(images, tmp_path):
    m = tiny_zegot(head={"prompt_source": "templates"}).train()
    cfg = m.config
    assert cfg.templates == cfg.head.hand_crafted and len(cfg.templates) == 4
    with torch.no_grad():
        prompts = ["a photo of a sofa.", "a portrait of a sofa.", "a part of a sofa.",
                   "a segment of a sofa."]  # fmt: skip
        expected = m.prompts.tower(prompts).reshape(1, 4, -1)
    torch.testing.assert_close(m.embed_text(["sofa"]), expected)
    out = m(images, list(m.training_class_names))
    (out.decoder_map.sum() + out.score_map.sum()).backward()
    assert m.prompts.ctx.grad is None and m.prompt_parameters() == []
    assert m.q_proj.weight.grad is not None
    m.save_pretrained(tmp_path)
    assert from_pretrained(tmp_path).config.head.prompt_source == "templates"
    with pytest.raises(ValueError, match="prompt_source"):
        zegot_tiny_config(head={"prompt_source": "handmade"})
    with pytest.raises(ValueError, match="templates"):
        zegot_tiny_config(head={"prompt_source": "templates", "num_prompts": 3})


def test_zegot_directory_is_not_an_otseg(tmp_path):
    """Each class loads only its own kind; otseg.from_pretrained loads either."""
    import otseg
    from otseg.models.otseg import OTSeg

    build_zegot(zegot_tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="type ZegOT, not OTSeg"):
        OTSeg.from_pretrained(tmp_path)
    assert isinstance(otseg.from_pretrained(tmp_path), ZegOT)
