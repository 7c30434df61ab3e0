"""Golden float64 checks of what the original's reference outputs do not cover: the ZegCLIP
softmax attention and decoder map, and the order of the per-prompt maps.

The ZegCLIP reference below is written from the ZegCLIP paper and code description, per head
and per class with explicit loops: queries one per class, q/k/v/proj linear maps with bias,
8 heads, logits q·k/√d softmaxed over pixels, per-layer map = pre-softmax logits averaged over
heads, post-norm layers without self-attention (attention → add & LayerNorm → ReLU FFN → add
& LayerNorm), and the decoder map = the last layer's map alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from factories import random_photo, tiny_model
from otseg.inference.predictor import OTSegPredictor
from otseg.nn.clip_image import ImageEmbedding


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def zegclip_maps(model, pixels: torch.Tensor, cls: torch.Tensor, text: torch.Tensor, heads: int):
    """pixels (M, C), cls (C,), text (K, C) → per-layer maps, each (K, M), float64."""
    dec = model.decoder
    q = linear(dec.q_proj, torch.cat([cls * text, text], dim=-1))  # (K, C)
    k_cls, m = q.shape[0], pixels.shape[0]
    width = q.shape[1] // heads
    maps = []
    for layer in dec.layers:
        att = layer.multihead_attn
        qq, kk, vv = linear(att.q, q), linear(att.k, pixels), linear(att.v, pixels)
        out = torch.zeros_like(q)
        layer_map = torch.zeros(k_cls, m, dtype=q.dtype)
        for h in range(heads):
            cols = slice(h * width, (h + 1) * width)
            for c in range(k_cls):
                logits = torch.stack([qq[c, cols] @ kk[j, cols] for j in range(m)])
                logits = logits / math.sqrt(width)
                layer_map[c] += logits / heads
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                out[c, cols] = (weights[:, None] * vv[:, cols]).sum(0)
        q = layer_norm(layer.norm2, q + linear(att.proj, out))
        ffn = linear(layer.linear2, torch.relu(linear(layer.linear1, q)))
        q = layer_norm(layer.norm3, q + ffn)
        maps.append(layer_map)
    return maps


@pytest.fixture(scope="module")
def model():
    m = tiny_model(seed=5).double()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # distinct layers and non-trivial norms and biases
        for name, p in m.decoder.named_parameters():
            gain = 1.0 if name.endswith(("norm2.weight", "norm3.weight")) else 0.0
            p.copy_(gain + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def test_softmax_attention_matches_zegclip(model):
    g = torch.Generator().manual_seed(7)
    h, w, c = 3, 4, model.config.vision.embed_dim
    pixels = torch.nn.functional.normalize(
        torch.randn(1, c, h, w, generator=g, dtype=torch.float64), dim=1
    )
    cls = torch.nn.functional.normalize(torch.randn(1, c, generator=g, dtype=torch.float64), dim=1)
    text = torch.randn(4, 1, c, generator=g, dtype=torch.float64)  # ZegCLIP: one prompt a class
    heads = model.config.head.softmax_heads
    assert c // heads > 1  # so that a missing 1/√d changes the maps
    with torch.no_grad():
        maps = model.decode(ImageEmbedding(pixels, cls), text, attention="softmax", use_mps=False)
        want = zegclip_maps(model, pixels[0].flatten(1).T, cls[0], text[:, 0], heads)
    for got, ref in zip(maps.layer_masks, want, strict=True):
        torch.testing.assert_close(got[0], ref.reshape(-1, h, w), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(maps.decoder[0], want[-1].reshape(-1, h, w), atol=1e-12, rtol=1e-10)


def test_per_prompt_maps_follow_the_template_order(model):
    """prompt_maps[:, k, n] = M·N·T·S of prompt n, S computed here from query n (the MPS path
    computes S in float32); and the predictor returns them in the same order."""
    g = torch.Generator().manual_seed(8)
    c = model.config.vision.embed_dim
    pixels = torch.nn.functional.normalize(
        torch.randn(1, c, 4, 4, generator=g, dtype=torch.float64), dim=1
    )
    cls = torch.nn.functional.normalize(torch.randn(1, c, generator=g, dtype=torch.float64), dim=1)
    text = model.embed_text(model.config.class_names).double()
    with torch.no_grad():
        maps = model.decode(ImageEmbedding(pixels, cls), text)
    q0 = maps.queries[0][0]  # (K, N, C) relationship queries
    plan = maps.transports[0].plan[0]  # (K, M, N)
    k, n = q0.shape[:2]
    pix = pixels[0].flatten(1).T  # (M, C)
    m = pix.shape[0]
    for i in range(n):
        s = torch.nn.functional.normalize(q0[:, i], dim=-1) @ pix.T  # (K, M) cosine
        want = (m * n * plan[:, :, i] * s).reshape(k, 4, 4)
        torch.testing.assert_close(maps.prompt_maps[0, :, i].double(), want, atol=1e-5, rtol=0)
    assert (maps.prompt_maps[0, :, 0] - maps.prompt_maps[0, :, -1]).abs().max() > 1e-3

    # through the predictor: one window covering the image, maps at 1/8 of it
    net = tiny_model(seed=5)
    p = OTSegPredictor(net)
    p.set_image(random_photo(64, 64, seed=9))
    p.set_vocabulary(list(net.config.class_names))
    got = p.predict().prompt_maps  # (K, N, 8, 8)
    tile = p._head_maps("sinkhorn", True)[0].prompt_maps[0]  # (K, N, 4, 4)
    want = torch.nn.functional.interpolate(tile, size=(8, 8), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
