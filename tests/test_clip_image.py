"""Our block forward and prompt handling equal open_clip's modules on the same weights."""

from __future__ import annotations

import pytest
import torch

import otseg.nn.clip_image as clip_image
from factories import tiny_model
from otseg.nn.clip_image import block_forward


@pytest.fixture(scope="module")
def block():
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock

    torch.manual_seed(0)
    return ResidualAttentionBlock(96, 4, act_layer=QuickGELU).eval()


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


def test_onednn_path_only_for_cpu_inference(block, monkeypatch):
    calls = []
    ours = clip_image._cpu_block_forward
    monkeypatch.setattr(clip_image, "_cpu_block_forward", lambda *a: calls.append(a[2]) or ours(*a))
    x = torch.randn(1, 9, 96)
    with torch.no_grad():
        block_forward(block, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            block_forward(block, x)
    assert calls == [torch.float32, torch.bfloat16]
    calls.clear()
    block_forward(block, x)  # autograd: F.linear and scaled_dot_product_attention
    assert not calls


def test_bf16_path_is_close_and_keeps_the_residual_stream_fp32(block):
    x = torch.randn(2, 130, 96)
    with torch.inference_mode():
        want = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = block_forward(block, x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)


def test_packed_weights_follow_weight_changes():
    """The oneDNN copies of a block's weights are rebuilt after an in-place update
    (``load_state_dict``) or when a weight tensor is replaced."""
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock

    torch.manual_seed(1)
    a = ResidualAttentionBlock(64, 4, act_layer=QuickGELU).eval()
    b = ResidualAttentionBlock(64, 4, act_layer=QuickGELU).eval()
    x = torch.randn(1, 17, 64)
    with torch.inference_mode():
        block_forward(a, x)
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(block_forward(a, x), b(x), atol=1e-5, rtol=0)
        a.mlp.c_fc.weight = torch.nn.Parameter(torch.randn_like(a.mlp.c_fc.weight))
        torch.testing.assert_close(block_forward(a, x), a(x), atol=1e-5, rtol=0)


def test_onednn_path_from_several_threads(block):
    """The demo serves users from worker threads: concurrent first calls pack once, correctly."""
    from concurrent.futures import ThreadPoolExecutor

    from open_clip.transformer import QuickGELU, ResidualAttentionBlock

    torch.manual_seed(2)
    fresh = ResidualAttentionBlock(96, 4, act_layer=QuickGELU).eval()
    xs = [torch.randn(1, 40, 96) for _ in range(4)]

    def run(x):
        with torch.inference_mode():
            return block_forward(fresh, x), fresh(x)

    with ThreadPoolExecutor(4) as pool:
        for got, want in pool.map(run, xs):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


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


def test_zegot_tower_global_embedding_equals_open_clip_visual():
    """The token path (patch embedding, class token, positions, ln_pre) and the pooled output of
    ZegOT's tower equal open_clip's own ``VisionTransformer`` forward on the same weights."""
    import torch.nn.functional as F

    from otseg.models.zegot import zegot_tiny_config
    from otseg.models.zegot.towers import FrozenViT
    from otseg.nn.clip_image import build_visual

    cfg = zegot_tiny_config().vision
    torch.manual_seed(0)
    visual = build_visual(cfg).eval()
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        want = F.normalize(visual(images), dim=-1)
    torch.testing.assert_close(FrozenViT(cfg, visual)(images).cls, want, atol=1e-5, rtol=0)
