"""An independent, functional re-derivation of ZegCLIP's inference for the tests: prompt mean →
one query per class → 8-head softmax attention → last layer's map → σ − calibration on seen
classes, and ZegCLIP's slide test procedure around it. Written from ZegCLIP's description (the
facts, not its code); it reads weights by name and shares no code with ``otseg``'s head.

Checked against ZegCLIP's own code (github ZiqinZhou66/ZegCLIP @ 9ba4bb5, its head and
segmentor run with the mm* libraries stubbed) on the OTSeg parity fixture's weights: equal to 0
(one fp16 prompt) and 1.2e-7 (three-prompt mean) on every score of ``encode_decode``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from otseg.inference.preprocess import prepare


def _lin(state, name, x):
    return x @ state[name + ".weight"].double().T + state[name + ".bias"].double()


def _ln(state, name, x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * state[name + ".weight"].double() + state[
        name + ".bias"
    ].double()


def zegclip_head(state, pixels, cls, text, *, q_proj, layer, heads=8, num_layers=3):
    """ZegCLIP's last-layer map (B, K, h, w) in float64 from weights read by name.

    text (K, N, C): one prompt used as it is, several averaged and renormalised (ZegCLIP's
    class embedding). q_proj / layer: the weight names of the relationship descriptor and of
    decoder layer i (``layer.format(i)``)."""
    b, c, h, w = pixels.shape
    t = text.double()
    t = t[:, 0] if t.shape[1] == 1 else t.mean(1) / t.mean(1).norm(dim=-1, keepdim=True)
    x = pixels.double().flatten(2).transpose(1, 2)  # (B, M, C)
    g = cls.double()
    q = _lin(state, q_proj, torch.cat([g[:, None] * t[None], t[None].expand(b, -1, -1)], -1))
    d = c // heads
    last = None
    for i in range(num_layers):
        p = layer.format(i)
        qh = _lin(state, p + "multihead_attn.q", q).reshape(b, -1, heads, d)
        kh = _lin(state, p + "multihead_attn.k", x).reshape(b, -1, heads, d)
        vh = _lin(state, p + "multihead_attn.v", x).reshape(b, -1, heads, d)
        logits = torch.einsum("bkhd,bmhd->bhkm", qh, kh) / math.sqrt(d)
        last = logits.mean(1)  # (B, K, M): pre-softmax logits averaged over heads
        out = torch.einsum("bhkm,bmhd->bkhd", logits.softmax(-1), vh).reshape(b, -1, c)
        q = _ln(state, p + "norm2", q + _lin(state, p + "multihead_attn.proj", out))
        q = _ln(
            state, p + "norm3", q + _lin(state, p + "linear2", _lin(state, p + "linear1", q).relu())
        )
    return last.reshape(b, -1, h, w)


OURS = {"q_proj": "decoder.q_proj", "layer": "decoder.layers.{}."}


def zegclip_scores(state, pixels, cls, text, *, size, crop, seen, weight, names=OURS):
    """σ(last map ↑ size) − weight on seen classes, resized to the crop: (B, K, crop, crop)."""
    last = zegclip_head(state, pixels, cls, text, **names)
    out = F.interpolate(last, size=(size, size), mode="bilinear", align_corners=False).sigmoid()
    out[:, seen] -= weight
    if crop != size:
        out = F.interpolate(out, size=(crop, crop), mode="bilinear", align_corners=False)
    return out


def assert_same_probs(got: np.ndarray, want: torch.Tensor, atol: float = 1e-5) -> None:
    """Probabilities equal, and so their logs up to a per-pixel constant: the averaged window
    scores themselves (softmax over sigmoid scores is flat, so probabilities alone would hide
    score errors of ~1e-3)."""
    want = want.numpy()
    assert np.abs(got - want).max() < atol
    log_got, log_want = np.log(got), np.log(want)
    centred = (log_got - log_got.mean(0)) - (log_want - log_want.mean(0))
    assert np.abs(centred).max() < 10 * atol


def reference_slide(model, image, names_text, seen, weight):
    """ZegCLIP's test procedure written out: windows of the prepared image, the re-derived head
    per window (the image tower, not under test here, is the model's), average, resize to the
    original size, softmax over classes. Returns (K, H, W) probabilities."""
    cfg = model.config
    prepared = prepare(image, cfg)
    x = prepared.x
    h, w = x.shape[-2:]
    crop, stride = cfg.test_crop, cfg.test_stride
    k = names_text.shape[0]
    acc = torch.zeros(1, k, h, w, dtype=torch.float64)
    count = torch.zeros(1, 1, h, w, dtype=torch.float64)
    state = model.state_dict()
    for i in range(max(h - crop + stride - 1, 0) // stride + 1):
        for j in range(max(w - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            with torch.no_grad():
                emb = model.encode_image(x[:, :, y1:y2, x1:x2])
            scores = zegclip_scores(
                state, emb.pixels, emb.cls, names_text, size=cfg.vision.image_size,
                crop=y2 - y1, seen=seen, weight=weight,
            )  # fmt: skip
            acc[:, :, y1:y2, x1:x2] += scores
            count[:, :, y1:y2, x1:x2] += 1
    avg = acc / count
    out = F.interpolate(avg, size=prepared.rgb.shape[:2], mode="bilinear", align_corners=False)
    return out.softmax(1)[0]
