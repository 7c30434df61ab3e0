"""The three attention variants compute what their one-sentence descriptions say.

- ``softmax``: the MPS plan is a softmax over pixels of S/ε divided by N (an independent
  float64 formula), and its score and prompt maps really differ from Sinkhorn's.
- ``zegclip``: ZegCLIP's inference (prompt mean → one query per class → 8-head softmax
  attention → last layer's map → σ − calibration on seen classes) against a small functional
  re-derivation that reads the weights by name; on the original implementation's parity
  fixture and end to end through ``OTSegPredictor.predict`` with its defaults, for VOC-,
  Context- and COCO-like settings, 1-prompt and multi-prompt banks.

The re-derivation (``tests/zegclip_reference.py``) was checked against ZegCLIP's own code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from zegclip_reference import OURS, assert_same_probs, reference_slide, zegclip_head, zegclip_scores

from factories import parity_fixture, random_photo, tiny_model
from otseg import OTSegPredictor, registry
from otseg.config import tiny_config
from otseg.errors import UserError
from otseg.models.zegclip import ZegCLIPConfig, build_zegclip, zegclip_config
from otseg.nn.clip_image import ImageEmbedding
from otseg.nn.mps import mps_score, transport_plan
from otseg.nn.variants import VARIANTS
from otseg.weights.convert import convert_checkpoint

# -- softmax ---------------------------------------------------------------------------------


def test_softmax_plan_and_mps_score_follow_the_formula():
    torch.manual_seed(0)
    b, k, m, n, eps = 2, 3, 20, 4, 0.05
    sim = torch.rand(b, k, m, n) * 2 - 1
    s = sim.double().numpy()
    e = np.exp((s - s.max(axis=2, keepdims=True)) / eps)
    want = e / e.sum(axis=2, keepdims=True) / n  # softmax over pixels, divided by N
    got = transport_plan(sim, "softmax", eps=eps)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-7, rtol=1e-5)

    pixels, queries = torch.randn(b, m, 8), torch.randn(b, k, n, 8)
    cos = np.einsum(
        "bmc,bknc->bkmn",
        pixels.double().numpy() / np.linalg.norm(pixels.double().numpy(), axis=-1, keepdims=True),
        queries.double().numpy() / np.linalg.norm(queries.double().numpy(), axis=-1, keepdims=True),
    )
    e = np.exp((cos - cos.max(axis=2, keepdims=True)) / eps)
    plan = e / e.sum(axis=2, keepdims=True) / n
    score, _ = mps_score(pixels, queries, "softmax", eps=eps)
    np.testing.assert_allclose(score.numpy(), (m * n * plan * cos).sum(-1), atol=1e-4, rtol=1e-5)


def test_sinkhorn_and_softmax_give_different_score_and_prompt_maps():
    """On the same weights and image the MPS score map, the per-prompt maps and the decoder map
    differ between the variants; Sinkhorn's plan spreads each pixel's mass 1/M over the prompts,
    softmax's does not."""
    model = tiny_model(seed=1)
    torch.manual_seed(1)
    emb = model.encode_image(torch.randn(1, 3, 64, 64))
    text = model.embed_text(list(model.config.class_names))
    with torch.no_grad():
        sk = model.decode(emb, text, attention="sinkhorn")
        sm = model.decode(emb, text, attention="softmax")
    for a, b in ((sk.score, sm.score), (sk.prompt_maps, sm.prompt_maps), (sk.decoder, sm.decoder)):
        assert (a - b).abs().max() > 0.05 * a.abs().max()
    m = sk.transports[0].plan.shape[2]
    rows_sk = sk.transports[0].plan.sum(-1)
    rows_sm = sm.transports[0].plan.sum(-1)
    assert (rows_sk - 1 / m).abs().max() < 1e-3 / m
    assert (rows_sm - 1 / m).abs().max() > 0.1 / m


def test_every_variant_is_documented_in_one_sentence():
    model = tiny_model()
    assert set(model.attentions) == set(VARIANTS) == {"sinkhorn", "softmax", "zegclip"}
    for sentence in VARIANTS.values():
        assert sentence.endswith(".") and sentence.count(". ") == 0


# -- ZegCLIP -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts", [1, 3])
@pytest.mark.parametrize("fixture", ["tiny_voc_inductive", "tiny_voc_transductive"])
def test_zegclip_variant_on_the_original_parity_fixture(fixture, prompts):
    """The original implementation's weights and image-tower outputs → our head's ``zegclip``
    variant equals the re-derivation (which reads the checkpoint's own key names)."""
    from factories import fixture_config

    fx = parity_fixture(fixture)
    ref = torch.load(fx / "outputs.pt", weights_only=True)
    state = torch.load(fx / "official.pth", weights_only=True)["state_dict"]
    config = fixture_config(fx)
    model = convert_checkpoint(state, config, fx / "text_embedding.npy")
    text = torch.from_numpy(np.load(fx / "text_embedding.npy"))[:, :prompts]
    emb = ImageEmbedding(pixels=ref["backbone.visual"], cls=ref["backbone.cls"])
    seen = torch.tensor([i in config.seen for i in range(len(config.class_names))])
    with torch.no_grad():
        got = model(emb, text, attention="zegclip", seen=seen).scores
    want = zegclip_scores(
        state, ref["backbone.visual"], ref["backbone.cls"], text,
        names={"q_proj": "decode_head.q_proj", "layer": "decode_head.decoder_1.layers.{}."},
        size=64, crop=64, seen=list(config.seen), weight=config.calibration,
    )  # fmt: skip
    assert (got.double() - want).abs().max() < 1e-5


SETTINGS = {  # tiny stand-ins for the real settings' test procedure
    "voc-inductive": {"calibration": 0.1},
    "voc-transductive": {"setting": "transductive", "calibration": 0.0},
    "context-transductive": {  # windows smaller than the model, as Context ST (420 on 480)
        "setting": "transductive", "calibration": 0.0, "test_crop": 32, "test_stride": 16,
    },
    "coco-inductive": {"vision": {"num_prompt_tokens": 4}, "calibration": 0.1, "test_stride": 40},
}  # fmt: skip


@pytest.mark.parametrize("prompts", [1, 3])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_zegclip_variant_end_to_end_through_the_predictor(setting, prompts):
    """``predict(attention="zegclip")`` with its defaults equals the re-derived ZegCLIP test
    procedure (probabilities to 1e-5, labels wherever two classes are not
    tied within 1e-5), with a 1- or 3-prompt bank."""
    changes = SETTINGS[setting]
    model = tiny_model(seed=3, templates=tuple(f"p{i} {{}}" for i in range(prompts)), **changes)
    image = random_photo(72, 100, seed=4)
    names = ["class3", "class0", "class2", "class4"]
    predictor = OTSegPredictor(model)
    predictor.set_image(image)
    predictor.set_vocabulary(names)
    result = predictor.predict(attention="zegclip")
    assert (result.attention, result.lam, result.use_mps) == ("zegclip", None, False)
    assert result.prompt_maps is None
    seen = [i for i, s in enumerate(result.seen) if s]
    assert seen == [1, 2, 3]  # class0, class2, class4 are the tiny config's seen classes
    want = reference_slide(model, image, model.embed_text(names), seen, model.config.calibration)
    assert_same_probs(result.probs, want)
    top2 = want.topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-5).numpy()  # not a near-tie between two classes
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(result.labels[clear], want.argmax(0).numpy()[clear])


def test_a_zegclip_model_uses_its_one_stored_prompt_as_stored_and_predicts_zegclip_by_default():
    """ZegCLIP's own models: fp16 rows of the authors' (K, C) file are used as stored (not
    renormalised, as ZegCLIP's code), and ``predict()`` with no arguments is ``"zegclip"``."""
    config = zegclip_config(tiny_config(), ("a photo of a {}",))
    assert isinstance(config, ZegCLIPConfig) and registry.model_type(config) == "zegclip"
    torch.manual_seed(5)
    rows = F.normalize(torch.randn(5, 1, 32), dim=-1)
    rows = (rows * (1 + 4e-3 * torch.randn(5, 1, 1))).half()  # norms 1 ± 1e-2, as fp16 files
    model = build_zegclip(config, text_bank=dict(zip(config.class_names, rows, strict=True)))
    model.eval()
    image = random_photo(seed=6)
    predictor = OTSegPredictor(model)
    predictor.set_image(image)
    predictor.set_vocabulary(["class1", "class4"])
    result = predictor.predict()
    assert result.attention == "zegclip" and "ZegCLIP's own inference" in result.description
    text = torch.stack([rows[1], rows[4]]).float()
    with torch.no_grad():  # the head's map itself, where a renormalisation would show (~0.5 %)
        emb = model.encode_image(torch.randn(1, 3, 64, 64))
        got = model.decode(emb, model.embed_text(["class1", "class4"]), attention="zegclip")
    want = zegclip_head(model.state_dict(), emb.pixels, emb.cls, text, **OURS)
    assert (got.decoder.double() - want).abs().max() < 1e-5 * want.abs().max()
    want = reference_slide(model, image, text, [1], 0.1)
    assert_same_probs(result.probs, want)
    sinkhorn = predictor.predict(attention="sinkhorn")
    assert sinkhorn.lam == 0.5 and sinkhorn.prompt_maps.shape[1] == 1


def test_lambda_and_mps_are_refused_for_zegclip_and_settled_elsewhere():
    model = tiny_model()
    predictor = OTSegPredictor(model)
    predictor.set_image(random_photo())
    predictor.set_vocabulary(["class0", "class1"])
    with pytest.raises(UserError, match="λ does not apply; drop lam=0.3"):
        predictor.predict(attention="zegclip", lam=0.3)
    with pytest.raises(UserError, match="no MPS score map; drop use_mps=True"):
        predictor.predict(attention="zegclip", use_mps=True)
    assert predictor.predict(attention="zegclip", use_mps=False).lam is None
    with pytest.raises(UserError, match="has no MPS score map, so λ does not apply"):
        model(torch.randn(1, 3, 64, 64), model.embed_text(["class0"]), attention="zegclip", lam=0.5)
    default = predictor.predict()
    assert (default.attention, default.lam, default.use_mps) == ("sinkhorn", 0.5, True)
    assert "OTSeg" in default.description
    with pytest.raises(UserError, match="attention must be one of"):
        predictor.predict(attention="zegclipp")


def test_a_zegclip_model_encodes_new_names_as_zegclip_did(tmp_path):
    """Names outside the stored file: the unit embeddings of the filled templates (open_clip's
    own encode_text here) averaged and renormalised, as ZegCLIP's get_embedding notebook; one
    template is used as it is."""
    from factories import save_tiny_clip
    from otseg.data.prompts import ZEGCLIP_15
    from otseg.weights.clip import load_clip

    clip, tokenizer = load_clip(f"local-dir:{save_tiny_clip(tmp_path / 'clip')}")
    for templates in (ZEGCLIP_15, ("a photo of a {}",)):
        config = zegclip_config(tiny_config(), templates)
        model = build_zegclip(config, clip=clip, tokenizer=tokenizer).eval()
        got = model.embed_text(["dining table", "cat"])
        assert got.shape == (2, 1, 32)
        for row, name in zip(got, ["dining table", "cat"], strict=True):
            with torch.no_grad():
                each = clip.encode_text(tokenizer([t.format(name) for t in templates])).double()
            each = each / each.norm(dim=-1, keepdim=True)
            mean = each.mean(0)
            torch.testing.assert_close(row[0].double(), mean / mean.norm(), atol=1e-6, rtol=0)
