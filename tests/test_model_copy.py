"""Models copy and pickle whole (their text caches hold a lock): ``copy.deepcopy`` (e.g. for a
frozen teacher or an EMA copy) and ``torch.save(model)``."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from factories import tiny_model, tiny_zegot


def _roundtrip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("kind", ["otseg", "zegot"])
@pytest.mark.parametrize("clone", [copy.deepcopy, _roundtrip])
def test_copy_and_pickle_give_an_equal_model_with_its_own_lock(kind, clone):
    model = tiny_model() if kind == "otseg" else tiny_zegot()
    model.eval()
    names = list(model.config.class_names)
    cache = model.text if kind == "otseg" else model.prompts
    with torch.no_grad():
        text = model.embed_text(names)  # fills the cache before the copy
        x = torch.randn(1, 3, 64, 64)
        ref = model(x, text).scores
        twin = clone(model)
        assert twin.embed_text(names).equal(text)
        assert twin(x, twin.embed_text(names)).scores.equal(ref)
    twin_cache = twin.text if kind == "otseg" else twin.prompts
    assert twin_cache._lock is not cache._lock
    with twin_cache._lock:  # a working lock of its own
        assert not cache._lock.locked()
