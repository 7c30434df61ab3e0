"""The demo on a tiny ZegOT directory, end to end through ``gradio_client``: the mode line, the
attention choices (MPOT / softmax / no transport), λ = 0.8 and the learned prompts' maps."""

from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client.exceptions import AppError
from PIL import Image

from app import overlay
from app.inference import ZEGOT_ATTENTION_LABELS, load_model
from factories import tiny_zegot
from tests.demo_helpers import client, served
from tests.test_app_e2e import CAT, label_map, page_config, segment


@pytest.fixture(scope="module")
def zegot_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("zegot") / "model"
    tiny_zegot().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def loaded(zegot_dir):
    loaded = load_model(str(zegot_dir))
    assert loaded.mode == "trained", loaded.status
    return loaded


@pytest.fixture(scope="module")
def url(loaded):
    with served(loaded) as url:
        yield url


def test_the_page_describes_zegot(loaded, url):
    assert "Trained ZegOT" in loaded.status and loaded.default_lam == 0.8
    assert loaded.attention_labels == ZEGOT_ATTENTION_LABELS
    config = page_config(url)
    for label in ("Trained ZegOT", "MPOT (optimal transport)", "softmax", "no transport"):
        assert label in config, label
    assert "Sinkhorn" not in config  # title, header, compare tab and prompt maps say MPOT
    for label in ("ZegOT — zero-shot segmentation", "Compare", "Left: attention"):
        assert label in config, label
    assert '"value": 0.8' in config.replace('"value":0.8', '"value": 0.8')  # the λ slider


def test_segment_with_each_transport_and_prompt_maps(url, monkeypatch):
    c = client(url)
    *_, info = segment(c, CAT, "cat, class0, sofa", attention="none", lam=0.8)
    assert info["attention"] == "none" and info["lam"] == 0.8
    assert [k["seen"] for k in info["classes"]] == [False, True, False]
    maps = {}
    for attention in ZEGOT_ATTENTION_LABELS:
        *_, files, info = c.predict(attention, 1.0, True, 0.5, True, api_name="/rerender")
        assert info["attention"] == attention
        maps[attention] = label_map(files)
    assert maps["sinkhorn"].shape == Image.open(CAT).size[::-1]
    with pytest.raises(AppError, match="sinkhorn, softmax, none"):
        c.predict("mpsa", 0.8, True, 0.5, api_name="/rerender")

    captions = []
    original = overlay.prompt_score_grid
    monkeypatch.setattr(
        overlay, "prompt_score_grid",
        lambda maps, k, templates, name, **kw: captions.append(tuple(templates))
        or original(maps, k, templates, name, **kw),
    )  # fmt: skip
    mpot, softmax, note = c.predict("sofa", api_name="/prompt_maps")
    assert "MPOT **" in note and "Sinkhorn" not in note
    assert Image.open(mpot).size == Image.open(softmax).size
    assert captions and set(captions) == {tuple(f"learned prompt {i}" for i in range(1, 5))}
