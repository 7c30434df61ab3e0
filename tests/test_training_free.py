"""Training-free mode on a tiny random CLIP: features, head, predictor, builder errors."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from otseg.errors import WeightsNotFoundError
from otseg.inference.predictor import OTSegPredictor
from otseg.models.training_free import CLIP_MEAN, TrainingFreeOTSeg, build_training_free
from otseg.nn.clip_image import ImageEmbedding
from otseg.weights.clip import load_clip
from tests.factories import random_photo, randomise_, save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def model(clip_dir) -> TrainingFreeOTSeg:
    return build_training_free(
        f"local-dir:{clip_dir}", None, resize_short=64, test_crop=64, test_stride=48
    )


def test_config_describes_frozen_clip(model):
    cfg = model.config
    assert (cfg.vision.width, cfg.vision.embed_dim, cfg.vision.layers) == (64, 32, 2)
    assert cfg.class_names == () and cfg.seen == () and cfg.calibration == 0.0
    assert cfg.num_prompts == 8 and cfg.pixel_mean == CLIP_MEAN
    assert not any(p.requires_grad for p in model.parameters())


def test_dense_features_are_maskclip_value_path(model, clip_dir):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 48, 80)
    emb = model.encode_image(images)
    assert emb.pixels.shape == (2, 32, 3, 5) and emb.cls.shape == (2, 32)
    assert torch.allclose(emb.pixels.norm(dim=1), torch.ones(2, 3, 5), atol=1e-5)
    # reference: CLIP's own forward for the global token, the value path for the patches
    clip, _ = load_clip(f"local-dir:{clip_dir}")
    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    from otseg.nn.clip_image import resize_positions

    pos = resize_positions(v.positional_embedding, (3, 5))
    x = v.ln_pre(torch.cat([v.class_embedding.expand(2, 1, -1), x], 1) + pos)
    x = v.transformer.resblocks[0](x)
    last = v.transformer.resblocks[1]
    attn = last.attn
    w_v, b_v = attn.in_proj_weight[128:], attn.in_proj_bias[128:]
    dense = attn.out_proj(last.ln_1(x) @ w_v.T + b_v)[:, 1:]
    ref = F.normalize(v.ln_post(dense) @ v.proj, dim=-1).transpose(1, 2).reshape(2, 32, 3, 5)
    assert torch.allclose(emb.pixels, ref, atol=1e-5)
    cls_ref = F.normalize(v.ln_post(last(x)[:, 0]) @ v.proj, dim=-1)
    assert torch.allclose(emb.cls, cls_ref, atol=1e-5)


def test_clearclip_variant_differs(clip_dir):
    clear = build_training_free(f"local-dir:{clip_dir}", None, dense="clearclip")
    mask = build_training_free(f"local-dir:{clip_dir}", None)
    images = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(clear.encode_image(images).pixels, mask.encode_image(images).pixels)
    with pytest.raises(ValueError, match="dense must be one of"):
        build_training_free(f"local-dir:{clip_dir}", None, dense="nope")


@pytest.mark.parametrize("dense", ["maskclip", "clearclip"])
def test_dense_features_on_random_weights(clip_dir, dense):
    """Both dense modes written out from the last block's weights, every weight random (norms
    and attention biases too): MaskCLIP's value path, ClearCLIP's query–query attention per
    head; no residual, no feed-forward; then ln_post and proj."""
    net = build_training_free(f"local-dir:{clip_dir}", None, dense=dense)
    v = randomise_(net.visual, seed=7)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = net.encode_image(images).pixels
        x = v.conv1(images).flatten(2).transpose(1, 2)  # the model's grid: positions as stored
        x = v.ln_pre(torch.cat([v.class_embedding.expand(2, 1, -1), x], 1) + v.positional_embedding)
        x = v.transformer.resblocks[0](x)
        last = v.transformer.resblocks[1]
        attn = last.attn
        width, heads = x.shape[-1], attn.num_heads
        q, _, values = (last.ln_1(x) @ attn.in_proj_weight.T + attn.in_proj_bias).split(width, -1)
        if dense == "clearclip":
            d = width // heads
            out = torch.empty_like(values)
            for h in range(heads):
                cols = slice(h * d, (h + 1) * d)
                weights = torch.softmax(q[..., cols] @ q[..., cols].transpose(1, 2) / d**0.5, -1)
                out[..., cols] = weights @ values[..., cols]
            values = out
        tokens = attn.out_proj(values)[:, 1:]
        want = F.normalize(v.ln_post(tokens) @ v.proj, dim=-1).transpose(1, 2).reshape(got.shape)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_head_maps_are_centred_prompt_averages(model):
    """Decoder map = 50·(mean over prompts of the cosine − its mean over classes); score map =
    50·(Σ_n M·N·T·S / N − mean over classes) with T = softmax over pixels of S/0.05, over N."""
    g = torch.Generator().manual_seed(9)
    pixels = F.normalize(torch.randn(1, 32, 3, 4, generator=g), dim=1)
    cls = F.normalize(torch.randn(1, 32, generator=g), dim=1)
    text = F.normalize(torch.randn(3, 8, 32, generator=g), dim=-1)
    maps = model.decode(ImageEmbedding(pixels, cls), text, attention="softmax")
    s = torch.einsum("cm,knc->kmn", pixels[0].flatten(1).double(), text.double())  # (K, M, N)
    m, n = s.shape[1:]
    decoder = s.mean(-1)
    score = (m * n * torch.softmax(s / 0.05, dim=1) / n * s).sum(-1) / n
    for got, want in ((maps.decoder, decoder), (maps.score, score)):
        want = 50 * (want - want.mean(0, keepdim=True))
        torch.testing.assert_close(got[0].flatten(1).double(), want, atol=1e-4, rtol=1e-5)


def test_decode_both_transports(model):
    emb = model.encode_image(torch.randn(1, 3, 64, 64))
    text = model.embed_text(["cat", "dog", "sky"])
    assert text.shape == (3, 8, 32)
    sink = model.decode(emb, text, attention="sinkhorn")
    soft = model.decode(emb, text, attention="softmax")
    assert sink.decoder.shape == sink.score.shape == (1, 3, 4, 4)
    assert sink.prompt_maps.shape == (1, 3, 8, 4, 4)
    assert torch.allclose(sink.decoder, soft.decoder)  # the decoder map has no transport
    assert not torch.allclose(sink.score, soft.score)
    # Sinkhorn: every prompt carries mass 1/N over the pixels
    plan = sink.transports[0].plan
    assert torch.allclose(plan.sum(-2), torch.full((1, 3, 8), 1 / 8), atol=1e-4)
    assert torch.allclose(sink.decoder.sum(1), torch.zeros(1, 4, 4), atol=1e-4)  # centred
    assert model.decode(emb, text, use_mps=False).score is None
    with pytest.raises(ValueError, match="attention must be one of"):
        model.decode(emb, text, attention="linear")


def test_predictor_runs_unchanged(model):
    predictor = OTSegPredictor(model)
    predictor.set_image(random_photo(80, 112))
    predictor.set_vocabulary(["cat", "dog", "sky"])
    result = predictor.predict(attention="softmax", lam=1.0)
    assert result.labels.shape == (80, 112) and result.seen == [False] * 3
    assert result.prompt_maps.shape[:2] == (3, 8)
    bf16 = OTSegPredictor(model, precision="bf16")
    bf16.set_image(random_photo(80, 112))
    bf16.set_vocabulary(["cat", "dog"])
    assert bf16.predict().labels.shape == (80, 112)


def test_missing_weights_fail_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError):
        build_training_free(f"local-dir:{tmp_path / 'none'}", None)
    with pytest.raises(WeightsNotFoundError):
        build_training_free("hf-hub:nobody/no-such-clip")  # HF_HUB_OFFLINE=1 in tests
    assert time.perf_counter() - start < 5
