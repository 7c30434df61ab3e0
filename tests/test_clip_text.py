"""Text side: the shortened-context encoder equals open_clip's full encode_text; caching; bank."""

from __future__ import annotations

import pytest
import torch

from factories import save_tiny_clip
from otseg.data.prompts import TEMPLATES_6
from otseg.nn.clip_text import PromptEmbedder, TextTower
from otseg.weights.clip import load_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = save_tiny_clip(tmp_path_factory.mktemp("clip"))
    return load_clip(f"local-dir:{d}")


def test_short_context_equals_open_clip_encode_text(clip):
    model, tokenizer = clip
    tower = TextTower(model, tokenizer)
    prompts = ["a photo of a dining table.", "a part of a dining table."] + [
        "a photo of a very long and unusual thing."
    ]
    with torch.no_grad():
        ref = model.encode_text(tokenizer(prompts), normalize=True)
    torch.testing.assert_close(tower(prompts), ref, atol=1e-6, rtol=1e-5)


def test_inference_runs_our_masked_block_forward(clip, monkeypatch):
    """Without autograd the text blocks run our block forward with the causal mask; with
    autograd (learned prompts) open_clip's transformer runs; both equal open_clip."""
    import otseg.nn.clip_text as clip_text

    model, tokenizer = clip
    tower = TextTower(model, tokenizer)
    masks = []
    ours = clip_text.block_forward
    monkeypatch.setattr(clip_text, "block_forward", lambda *a: masks.append(a[2]) or ours(*a))
    prompts = ["a photo of a cat.", "a bad photo of the dining table in the room."]
    tokens = tokenizer(prompts)
    with torch.no_grad():
        ref = model.encode_text(tokens, normalize=True)
        torch.testing.assert_close(tower(prompts), ref, atol=1e-6, rtol=1e-5)
    length = int(tokens.argmax(-1).max()) + 1
    assert len(masks) == len(model.transformer.resblocks)
    assert all(m.shape == (length, length) and torch.isinf(m).any() for m in masks)
    masks.clear()
    x = model.token_embedding(tokens[:, :length]).requires_grad_()
    got = tower.encode_embeddings(x, tokens.argmax(-1))
    got.sum().backward()
    assert not masks and x.grad is not None
    torch.testing.assert_close(got.detach(), ref, atol=1e-6, rtol=1e-5)


def test_embedder_fills_the_templates_in_order_for_each_name(clip):
    """Row k, prompt n = the tower's embedding of template n filled with name k, the prompt
    strings written out here (not through the template filling under test)."""
    tower = TextTower(*clip)
    emb = PromptEmbedder(("a photo of a {}.", "there is a {} in the scene.", "a {}."), tower=tower)
    got = emb(["red car", "sky"])
    with torch.no_grad():
        want = tower([
            "a photo of a red car.", "there is a red car in the scene.", "a red car.",
            "a photo of a sky.", "there is a sky in the scene.", "a sky.",
        ]).reshape(2, 3, -1)  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_embedder_caches_and_outputs_follow_a_reordering(clip):
    model, tokenizer = clip
    tower = TextTower(model, tokenizer)
    with torch.no_grad():
        single = {name: tower([t.replace("{}", name) for t in TEMPLATES_6]) for name in
                  ("cat", "dog", "bird")}  # fmt: skip
    calls = []
    original = tower.forward
    tower.forward = lambda prompts: calls.append(len(prompts)) or original(prompts)
    emb = PromptEmbedder(TEMPLATES_6, tower=tower)
    a = emb(["cat", "dog"])
    assert a.shape == (2, 6, 32) and calls == [12]
    b = emb(["dog", "cat", "bird"])  # only the new name is encoded, the cached ones reordered
    c = emb(["bird", "dog", "cat"])
    assert calls == [12, 6]
    for out, names in (
        (a, ["cat", "dog"]),
        (b, ["dog", "cat", "bird"]),
        (c, ["bird", "dog", "cat"]),
    ):
        want = torch.stack([single[n] for n in names])
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)


def test_bank_rows_are_used_as_stored_and_unknown_names_fail_without_tower():
    row = torch.randn(3, 8).half()
    emb = PromptEmbedder(TEMPLATES_6[:3], bank={"cat": row})
    out = emb(["cat"])
    assert out.dtype == torch.float32 and torch.equal(out[0], row.float())
    with pytest.raises(ValueError, match="no text encoder"):
        emb(["cat", "zebra"])


def test_overlong_names_are_refused(clip):
    emb = PromptEmbedder(TEMPLATES_6, tower=TextTower(*clip))
    with pytest.raises(ValueError, match="token text context"):
        emb(["word " * 80])


def test_the_text_context_holds_75_tokens_between_start_and_end(clip):
    """CLIP's 77 positions minus the start and end tokens: a 75-token prompt is encoded in full
    (equal to open_clip), a 76-token one is refused."""
    model, tokenizer = clip
    emb = PromptEmbedder(("a photo of a {}.",), tower=TextTower(model, tokenizer))
    fits = " ".join(["cat"] * 70)  # "a photo of a" (4) + 70 + "." (1) = 75 tokens
    prompt = f"a photo of a {fits}."
    assert int(tokenizer([prompt]).argmax(-1)) == 76  # the end token sits at the last position
    with torch.no_grad():
        want = model.encode_text(tokenizer([prompt]), normalize=True)
    torch.testing.assert_close(emb([fits])[:, 0], want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="token text context"):
        emb([fits + " cat"])
