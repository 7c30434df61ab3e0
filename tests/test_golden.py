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

from factories import random_photo, randomise_, tiny_model, tiny_zegot
from otseg.inference.predictor import OTSegPredictor
from otseg.nn.clip_image import ImageEmbedding


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T.to(x.dtype) + layer.bias.to(x.dtype)


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


# -- OTSeg's own head: MPSA, the sigmoid-geomean decoder map and the MPS map ------------------
EPS, ITERATIONS = 0.08, 40  # not the defaults (0.05, stopping rule): the config must reach them


def sinkhorn_plan(cost: np.ndarray, eps: float, iterations: int) -> np.ndarray:
    """The original's log-domain iteration, float64 numpy, a fixed number of (u, v) updates
    with marginals 1/M + 1e-8 and 1/N + 1e-8. cost (M, N) → plan (M, N)."""
    m, n = cost.shape
    u, v = np.zeros(m), np.zeros(n)
    for _ in range(iterations):
        u = u + eps * (np.log(1 / m + 1e-8) - _lse((-cost + u[:, None] + v) / eps, 1))
        v = v + eps * (np.log(1 / n + 1e-8) - _lse((-cost + u[:, None] + v) / eps, 0))
    return np.exp((-cost + u[:, None] + v) / eps)


def _lse(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, C), b (N, C) → (M, N) cosine similarities, float64."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.T


def transported_map(pixels, queries, transport: str):
    """MPS map of one class: pixels (M, C), queries (N, C) → (M,) Σ_n M·N·T·S, plan (M, N) and
    S (M, N). ``softmax``: T = softmax over pixels of S/ε, divided by N."""
    s = cosine(pixels, queries)
    m, n = s.shape
    if transport == "sinkhorn":
        t = torch.from_numpy(sinkhorn_plan((1 - s).numpy(), EPS, ITERATIONS))
    else:
        t = torch.softmax(s / EPS, dim=0) / n
    return (m * n * t * s).sum(1), t, s


def otseg_maps(model, pixels, cls, text, transport: str):
    """OTSeg's head from the paper, per class, float64: pixels (M, C), cls (C,), text (K, N, C)
    → MPS map (K, M), per-layer maps [(K, M)], decoder map (K, M)."""
    dec = model.decoder
    q0 = linear(dec.q_proj, torch.cat([cls * text, text], dim=-1))  # (K, N, C)
    k_cls, m = q0.shape[0], pixels.shape[0]
    mps = torch.stack([transported_map(pixels, q0[c], transport)[0] for c in range(k_cls)])
    q, layer_maps = q0, []
    for layer in dec.layers:
        att = layer.multihead_attn
        keys, values = linear(att.k, pixels), linear(att.v, pixels)
        out, layer_map = torch.zeros_like(q), torch.zeros(k_cls, m, dtype=q.dtype)
        for c in range(k_cls):
            layer_map[c], plan, _ = transported_map(keys, linear(att.q, q[c]), "sinkhorn")
            out[c] = plan.T @ values  # the plan is not rescaled: weights sum to 1/N
        q = layer_norm(layer.norm2, q + linear(att.proj, out))
        q = layer_norm(layer.norm3, q + linear(layer.linear2, torch.relu(linear(layer.linear1, q))))
        layer_maps.append(layer_map)
    power = 1 / (len(layer_maps) - 1)
    decoder = layer_maps[-1]
    for x in layer_maps[:-1]:
        decoder = decoder * torch.sigmoid(x) ** power
    return mps, layer_maps, decoder


@pytest.fixture(scope="module")
def otseg_model():
    head = {"sinkhorn_eps": EPS, "sinkhorn_max_iter": ITERATIONS, "sinkhorn_thresh": None}
    m = tiny_model(seed=11, head=head).double()
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():  # every decoder parameter random: biases, norms, distinct layers
        for name, p in m.decoder.named_parameters():
            gain = 1.0 if name.endswith(("norm2.weight", "norm3.weight")) else 0.0
            p.copy_(gain + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def random_window(seed: int, c: int, h: int = 3, w: int = 4):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, c, h, w, generator=g, dtype=torch.float64)
    pixels = pixels / pixels.norm(dim=1, keepdim=True)
    cls = torch.randn(1, c, generator=g, dtype=torch.float64)
    return pixels, cls / cls.norm(), g


def test_sinkhorn_head_matches_the_paper(otseg_model):
    """MPSA in every decoder layer, the sigmoid-geomean decoder map and the MPS map (with this
    config's ε and iteration count) equal a per-class float64 transcription of the paper.
    The model computes cosines and plans in float32, hence the 1e-5."""
    model = otseg_model
    c, n = model.config.vision.embed_dim, model.config.num_prompts
    pixels, cls, g = random_window(13, c)
    text = torch.randn(4, n, c, generator=g, dtype=torch.float64)
    with torch.no_grad():
        maps = model.decode(ImageEmbedding(pixels, cls), text, attention="sinkhorn")
        mps, layer_maps, decoder = otseg_maps(
            model, pixels[0].flatten(1).T, cls[0], text, "sinkhorn"
        )
    for got, want in zip(maps.layer_masks, layer_maps, strict=True):
        torch.testing.assert_close(got[0].flatten(1).double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps.decoder[0].flatten(1).double(), decoder, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps.score[0].flatten(1).double(), mps, atol=1e-5, rtol=1e-5)


def test_mps_map_under_softmax_matches_the_formula(otseg_model):
    """The MPS branch with ``attention="softmax"``: T = softmax over pixels of S/ε, over N."""
    model = otseg_model
    c, n = model.config.vision.embed_dim, model.config.num_prompts
    pixels, cls, g = random_window(14, c)
    text = torch.randn(3, n, c, generator=g, dtype=torch.float64)
    with torch.no_grad():
        maps = model.decode(ImageEmbedding(pixels, cls), text, attention="softmax")
        mps, _, _ = otseg_maps(model, pixels[0].flatten(1).T, cls[0], text, "softmax")
    torch.testing.assert_close(maps.score[0].flatten(1).double(), mps, atol=1e-5, rtol=1e-5)


# -- ZegOT: GA, DFA, MPOT and the decoder's independence of the other classes -----------------
@pytest.fixture(scope="module")
def zegot_model():
    head = {"sinkhorn_eps": EPS, "sinkhorn_max_iter": ITERATIONS, "sinkhorn_thresh": None}
    return randomise_(tiny_zegot(seed=15, head=head), seed=16)  # float32, as ZegOT's head runs


def zegot_maps(model, blocks, cls, text, transport: str):
    """ZegOT's Eqs. per class, float64: blocks (L, M, C), cls (C,), text (K, N, C) → DFA maps
    (K, L, M) = Σ_n S_i, MPOT map (K, M) = Σ_n Π_i φ_i(S_i*)^{1/d} with φ = σ except the last
    layer (clamped identity), and the per-prompt maps (K, N, M)."""
    g = linear(model.q_proj, torch.cat([cls * text, text], dim=-1))  # (K, N, C), the GA layer
    layers = model.config.head.mpot_layers
    dfa, mpot_map, prompt_maps = [], [], []
    for c in range(g.shape[0]):
        sims = [cosine(block, g[c]) for block in blocks]  # L × (M, N)
        dfa.append(torch.stack([s.sum(1) for s in sims]))
        refined = []
        for i in layers:
            s = sims[i - 1]
            if transport == "none":
                refined.append(s)
            else:
                refined.append(transported_map(blocks[i - 1], g[c], transport)[1] * s.numel() * s)
        d = len(refined)
        combined = refined[-1].clamp(min=1e-6) ** (1 / d)
        for r in refined[:-1]:
            combined = combined * torch.sigmoid(r) ** (1 / d)
        mpot_map.append(combined.sum(1))
        prompt_maps.append(combined.T)
    return torch.stack(dfa), torch.stack(mpot_map), torch.stack(prompt_maps)


@pytest.mark.parametrize("transport", ["sinkhorn", "softmax", "none"])
def test_zegot_dfa_and_mpot_maps_match_the_paper(zegot_model, transport):
    from otseg.models.zegot.towers import LayeredEmbedding

    model = zegot_model
    cfg = model.config
    layers, c, n = cfg.vision.layers, cfg.vision.embed_dim, cfg.num_prompts
    g = torch.Generator().manual_seed(17)
    blocks = torch.randn(layers, 1, c, 3, 4, generator=g, dtype=torch.float64)
    blocks = blocks / blocks.norm(dim=2, keepdim=True)
    cls = torch.randn(1, c, generator=g, dtype=torch.float64)
    text = torch.randn(3, n, c, generator=g, dtype=torch.float64)
    cls = cls / cls.norm()
    emb = LayeredEmbedding(pixels=blocks[-1].float(), cls=cls.float(), blocks=blocks.float())
    with torch.no_grad():
        maps = model.decode(emb, text.float(), attention=transport)
        dfa, mpot_map, prompt_maps = zegot_maps(
            model, blocks[:, 0].flatten(2).transpose(1, 2), cls[0], text, transport
        )
    close = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(maps.dfa[0].flatten(2).double(), dfa, **close)
    torch.testing.assert_close(maps.score[0].flatten(1).double(), mpot_map, **close)
    torch.testing.assert_close(maps.prompt_maps[0].flatten(2).double(), prompt_maps, **close)


def test_zegot_class_logits_do_not_depend_on_the_other_classes(zegot_model):
    """Adding a class leaves the other classes' maps unchanged (permuting them, as the ZegOT
    tests check, cannot see a pooling over classes)."""
    model = zegot_model
    g = torch.Generator().manual_seed(18)
    images = torch.randn(1, 3, 64, 64, generator=g)
    text = torch.randn(4, model.config.num_prompts, 32, generator=g)
    with torch.no_grad():
        emb = model.encode_image(images)
        three = model.decode(emb, text[:3])
        four = model.decode(emb, text)
    for field in ("decoder", "score", "dfa", "prompt_maps"):
        torch.testing.assert_close(
            getattr(four, field)[:, :3], getattr(three, field), atol=1e-6, rtol=0
        )


def test_zegot_decoder_wiring(zegot_model):
    """The score-map decoder written out per class: blocks split into consecutive FPN stages,
    lateral 1×1 convs added top-down (from the last stage), each sum smoothed, the levels in
    stage order with the MPOT map as one more channel, ASPP branches and an image-pooling
    branch, fused, then one logit channel."""
    dec = zegot_model.decoder
    g = torch.Generator().manual_seed(19)
    dfa = torch.randn(1, 2, zegot_model.config.vision.layers, 3, 4, generator=g)
    mpot_map = torch.randn(1, 2, 3, 4, generator=g)
    with torch.no_grad():
        got = dec(dfa, mpot_map)
        for c in range(2):
            x = dfa[0, c][None]  # (1, L, h, w)
            per = x.shape[1] // len(dec.lateral)
            stages = [x[:, i * per : (i + 1) * per] for i in range(len(dec.lateral))]
            sums = [None] * len(stages)
            top = None
            for i in reversed(range(len(stages))):
                lateral = dec.lateral[i](stages[i])
                top = lateral if top is None else lateral + top
                sums[i] = top
            levels = [torch.relu(dec.smooth[i][0](s)) for i, s in enumerate(sums)]
            x = torch.cat([*levels, mpot_map[0, c][None, None]], dim=1)
            branches = [torch.relu(branch[0](x)) for branch in dec.aspp]
            pooled = torch.relu(dec.pool[0](x.mean(dim=(2, 3), keepdim=True))).expand(-1, -1, 3, 4)
            fused = torch.relu(dec.fuse[0](torch.cat([*branches, pooled], dim=1)))
            want = dec.logit(fused)[0, 0]
            torch.testing.assert_close(got[0, c], want, atol=1e-5, rtol=1e-5)
