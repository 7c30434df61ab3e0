"""Our block forward and prompt handling equal open_clip's modules on the same weights."""

from __future__ import annotations

import pytest
import torch

import otseg.nn.clip_image as clip_image
from factories import randomise_, tiny_model
from otseg.nn.clip_image import block_forward


@pytest.fixture(scope="module")
def block():
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock

    # every weight random: zero attention biases and unit LayerNorms hide scaling and swaps
    return randomise_(ResidualAttentionBlock(96, 4, act_layer=QuickGELU), seed=0).eval()


@pytest.mark.parametrize("tokens", [1, 37, 130])
def test_block_forward_equals_open_clip(block, tokens):
    x = torch.randn(2, tokens, 96)
    with torch.no_grad():
        torch.testing.assert_close(block_forward(block, x), block(x), atol=1e-5, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(block_forward(block, x), block(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tokens", [9, 130])
def test_masked_block_forward_equals_open_clip(block, tokens):
    """The text tower's causal mask, in CPU inference and in the portable (autograd) path."""
    mask = torch.full((tokens, tokens), float("-inf")).triu_(1)
    x = torch.randn(3, tokens, 96)
    with torch.inference_mode():
        want = block(x, attn_mask=mask)
        torch.testing.assert_close(block_forward(block, x, mask), want, atol=1e-5, rtol=0)
    got = block_forward(block, x.clone().requires_grad_(), mask)
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)


def test_block_forward_gradients_equal_open_clip(block):
    x = torch.randn(1, 20, 96, requires_grad=True)
    (g_ours,) = torch.autograd.grad(block_forward(block, x).square().sum(), x)
    (g_ref,) = torch.autograd.grad(block(x).square().sum(), x)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-4, rtol=1e-5)


def test_other_block_types_run_as_themselves():
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    scaled = ResidualAttentionBlock(32, 2, ls_init_value=0.5).eval()  # LayerScale, nn.GELU
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        assert torch.equal(block_forward(scaled, x), scaled(x))


@pytest.mark.parametrize("mode", ["inference", "no_grad", "grad"])
def test_tower_equals_open_clip_blocks(monkeypatch, mode):
    """The whole prompted tower (prompt rows overwritten in place without autograd, concatenated
    with it) equals the concatenating loop through open_clip's own block modules."""
    encoder = tiny_model().image_encoder.eval()
    images = torch.randn(2, 3, 64, 80)
    ctx = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}
    with ctx[mode]():
        ours = encoder(images)
    monkeypatch.setattr(clip_image, "block_forward", lambda block, x: block(x))
    with torch.enable_grad():
        ref = encoder(images)
    torch.testing.assert_close(ours.pixels, ref.pixels.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.cls, ref.cls.detach(), atol=1e-5, rtol=0)


def test_bf16_path_is_close_and_keeps_the_residual_stream_fp32(block):
    x = torch.randn(2, 130, 96)
    with torch.inference_mode():
        want = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = block_forward(block, x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)


def test_zegot_tower_equals_open_clip_blocks(monkeypatch):
    import otseg.models.zegot.towers as towers
    from otseg.models.zegot import build_zegot, zegot_tiny_config

    encoder = build_zegot(zegot_tiny_config()).eval().image_encoder
    images = torch.randn(2, 3, 64, 80)
    ours = encoder(images)
    monkeypatch.setattr(towers, "block_forward", lambda block, x: block(x))
    ref = encoder(images)
    torch.testing.assert_close(ours.blocks, ref.blocks, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.cls, ref.cls, atol=1e-5, rtol=0)


def test_zegot_tower_equals_open_clip_visual_block_by_block():
    """ZegOT's tower against open_clip's own ``VisionTransformer`` on random weights: the global
    embedding equals ``visual(images)``, and block i's patch tokens equal the tokens after
    open_clip's first i blocks, through ``ln_post`` and ``proj`` (written out here)."""
    import torch.nn.functional as F

    from otseg.models.zegot import zegot_tiny_config
    from otseg.models.zegot.towers import FrozenViT
    from otseg.nn.clip_image import build_visual

    cfg = zegot_tiny_config().vision
    visual = randomise_(build_visual(cfg), seed=4).eval()
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    got = FrozenViT(cfg, visual)(images)
    with torch.no_grad():
        torch.testing.assert_close(got.cls, F.normalize(visual(images), dim=-1), atol=1e-5, rtol=0)
        x = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, h·w, W)
        cls = visual.class_embedding.expand(2, 1, -1)
        x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
        for i, block in enumerate(visual.transformer.resblocks):
            x = block(x)
            tokens = F.normalize(visual.ln_post(x[:, 1:]) @ visual.proj, dim=-1)  # (B, M, C)
            want = tokens.transpose(1, 2).reshape(got.blocks[i].shape)
            torch.testing.assert_close(got.blocks[i], want, atol=1e-5, rtol=0)


def test_prompted_tower_equals_the_paper_on_random_weights():
    """OTSeg's prompted ViT written out from open_clip's modules: the class embedding added to
    the class token's position too (as the original), the shallow prompts after the class token,
    block i ≥ 1 preceded by deep prompt set i − 1 replacing the prompt rows, then
    ``prompt_norm`` and ``ln_post`` in that order. Every weight random (norms and biases too)."""
    import torch.nn.functional as F

    encoder = randomise_(tiny_model(seed=3).image_encoder, seed=5).eval()
    p = encoder.cfg.num_prompt_tokens
    assert encoder.deep_prompt_embeddings.shape[0] >= 1  # deep prompts are exercised
    images = torch.randn(2, 3, 64, 64)  # the model size: positions are used as stored
    with torch.inference_mode():
        got = encoder(images)
    with torch.no_grad():
        x = encoder.conv1(images).flatten(2).transpose(1, 2)  # (B, 16, W)
        pos, cls = encoder.positional_embedding, encoder.class_embedding
        first = (cls + pos[0] + cls).expand(2, 1, -1)  # the class embedding, twice
        x = encoder.ln_pre(torch.cat([first, x + pos[1:]], dim=1))
        shallow = encoder.prompt_proj(encoder.prompt_embeddings).expand(2, -1, -1)
        x = torch.cat([x[:, :1], shallow, x[:, 1:]], dim=1)
        for i, block in enumerate(encoder.transformer.resblocks):
            if i >= 1:
                deep = encoder.prompt_proj(encoder.deep_prompt_embeddings[i - 1])
                x = torch.cat([x[:, :1], deep.expand(2, -1, -1), x[:, 1 + p :]], dim=1)
            x = block(x)
        x = encoder.ln_post(encoder.prompt_norm(x)) @ encoder.proj
        pixels = F.normalize(x[:, 1 + p :], dim=-1).transpose(1, 2).reshape(2, -1, 4, 4)
    torch.testing.assert_close(got.pixels, pixels, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.cls, F.normalize(x[:, 0], dim=-1), atol=1e-5, rtol=0)


def test_positions_resize_bilinearly_without_corner_alignment():
    """A 2×2 position grid resized to 4×4: along each axis the samples sit at source
    coordinates −0.25, 0.25, 0.75, 1.25 (half-pixel centres, clamped at the border), i.e.
    weights 0, ¼, ¾, 1 between the two source values. The class row is kept."""
    from otseg.nn.clip_image import resize_positions

    table = torch.tensor([[9.0], [0.0], [1.0], [2.0], [3.0]])  # class, then rows [[0, 1], [2, 3]]
    a = torch.tensor([0.0, 0.25, 0.75, 1.0])
    want = (2 * a[:, None] + a[None, :]).reshape(16, 1)  # value = 2·y + x
    got = resize_positions(table, 4)
    assert got[0].item() == 9.0
    torch.testing.assert_close(got[1:], want)
    assert resize_positions(table, 2) is table
