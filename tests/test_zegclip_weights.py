"""ZegCLIP's released weights in one word (``zegclip:<setting>``): the table, download → verify →
convert → cache → load → predict against a local mirror server (no internet), the CLI and
publish, through the same machinery as ``original:``.

The stand-in checkpoint is the OTSeg parity fixture's: ZegCLIP's module tree is OTSeg's (its
code loads that file with only the text-encoder keys missing, checked with ZegCLIP's own code
at 9ba4bb5), so it is a ZegCLIP-format checkpoint of the tiny size. Its text file is (K, C)
fp16, as ZegCLIP's ``voc12_single.npy``.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from http_mirror import serve
from zegclip_reference import assert_same_probs, reference_slide, zegclip_scores

from factories import fixture_config, parity_fixture, random_photo
from otseg import OTSegPredictor, from_pretrained
from otseg.errors import UserError
from otseg.models.zegclip import ZegCLIP, zegclip_config
from otseg.registry import get_preset
from otseg.weights import convert, original, publish
from otseg.weights.convert import cached
from otseg.weights.original import ZEGCLIPS, OriginalModel, get_released

NAME = "tiny-voc-inductive"
REF = f"zegclip:{NAME}"
DRIVE_ID = "zegclipTinyDriveId"
NPY = "voc12_tiny_single.npy"
ORIGINAL_NAMES = {"q_proj": "decode_head.q_proj", "layer": "decode_head.decoder_1.layers.{}."}


@pytest.fixture(scope="module")
def fx() -> Path:
    return parity_fixture("tiny_voc_inductive")


def single_npy(fx: Path) -> bytes:
    """A (K, C) fp16 file: the fixture's first prompt of each class."""
    buffer = io.BytesIO()
    np.save(buffer, np.load(fx / "text_embedding.npy")[:, 0])
    return buffer.getvalue()


@pytest.fixture
def tiny(fx, monkeypatch, tmp_path) -> OriginalModel:
    """A ZegCLIP table entry for the fixture, the cache in tmp_path, downloads allowed."""
    npy = single_npy(fx)
    entry = OriginalModel(
        name=NAME,
        title="tiny ZegCLIP fixture",
        drive_id=DRIVE_ID,
        embeddings=NPY,
        preset=zegclip_config(fixture_config(fx), ("a photo of a {}",)),
        reported={"pAcc": 9.5, "mIoU(S)": 1.5, "mIoU(U)": 2.5, "hIoU": 3.5},
        embeddings_size=len(npy),
        embeddings_sha256=hashlib.sha256(npy).hexdigest(),
        release=original.ZEGCLIP_RELEASE,
    )
    monkeypatch.setitem(ZEGCLIPS, NAME, entry)
    monkeypatch.setenv("OTSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return entry


@pytest.fixture
def mirror(fx, tiny, monkeypatch):
    files = {DRIVE_ID: (fx / "official.pth").read_bytes(), NPY: single_npy(fx)}
    with serve(files) as m:
        monkeypatch.setenv("OTSEG_ORIGINAL_MIRROR", m.url + "/")
        yield m


def test_download_convert_cache_load_predict(fx, mirror, tmp_path, monkeypatch):
    predictor = OTSegPredictor.from_pretrained(REF)
    assert sorted(mirror.requests) == sorted([DRIVE_ID, NPY])
    assert sorted(p.name for p in (tmp_path / "cache" / "zegclip").iterdir()) == [
        f".{NAME}.lock",
        NAME,
    ]  # its own cache folder, nothing left behind
    model = predictor.model
    assert isinstance(model, ZegCLIP) and model.config.num_prompts == 1

    # ZegCLIP's inference on its weights and its (K, C) file, as stored (fp16, not renormalised)
    ref = torch.load(fx / "outputs.pt", weights_only=True)
    state = torch.load(fx / "official.pth", weights_only=True)["state_dict"]
    text = torch.from_numpy(np.load(fx / "text_embedding.npy")[:, :1])
    seen = torch.tensor([i in model.config.seen for i in range(5)])
    with torch.no_grad():
        got = model(ref["input"], model.embed_text(model.config.class_names), seen=seen).scores
    want = zegclip_scores(
        state, ref["backbone.visual"], ref["backbone.cls"], text, size=64, crop=64,
        seen=list(model.config.seen), weight=0.1, names=ORIGINAL_NAMES,
    )  # fmt: skip
    assert (got.double() - want).abs().max() < 1e-5

    predictor.set_image(random_photo())
    predictor.set_vocabulary(["class0", "class3"])
    result = predictor.predict()
    assert (result.attention, result.lam, result.use_mps) == ("zegclip", None, False)
    assert predictor.predict(attention="sinkhorn").lam == 0.5  # OTSeg's head on ZegCLIP weights

    card = (tmp_path / "cache" / "zegclip" / NAME / "README.md").read_text()
    assert "# ZegCLIP (authors' weights, tiny ZegCLIP fixture)" in card
    assert DRIVE_ID in card and "github.com/ZiqinZhou66/ZegCLIP" in card and "9ba4bb5" in card
    assert "Reported by the authors (not measured on this copy)" in card
    assert "| pAcc | 9.5 |" in card and "average of several training runs" in card
    assert "one CLIP text query per class" in card

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # second start: the cache, no request
    again = from_pretrained(REF)
    assert len(mirror.requests) == 2 and isinstance(again, ZegCLIP)
    assert again.card["source"]["checkpoint"]["google_drive_id"] == DRIVE_ID


def test_zegclip_and_original_are_cached_apart(fx, mirror, tmp_path, monkeypatch):
    """The same setting name in both tables: two entries, two folders, two model types."""
    OTSEG_DRIVE_ID = "otsegTinyDriveId"  # noqa: N806
    otseg_entry = OriginalModel(
        NAME, "tiny OTSeg", OTSEG_DRIVE_ID, "text_embedding.npy", fixture_config(fx)
    )
    monkeypatch.setitem(original.ORIGINALS, NAME, otseg_entry)
    mirror.files[OTSEG_DRIVE_ID] = (fx / "official.pth").read_bytes()
    mirror.files["text_embedding.npy"] = (fx / "text_embedding.npy").read_bytes()
    a, b = cached(REF, quiet=True), cached(f"original:{NAME}", quiet=True)
    assert a.parent.name == "zegclip" and b.parent.name == "original"
    assert type(from_pretrained(a)).__name__ == "ZegCLIP"
    assert type(from_pretrained(b)).__name__ == "OTSeg"


def test_without_mirror_drive_and_zegclips_github_are_asked(fx, tiny, monkeypatch):
    import gdown

    monkeypatch.delenv("OTSEG_ORIGINAL_MIRROR", raising=False)
    calls = []

    def fake(url=None, id=None, output=None, hasher=None, **kw):
        calls.append(url or f"drive:{id}")
        data = (fx / "official.pth").read_bytes() if id else single_npy(fx)
        Path(output).write_bytes(data)
        hasher.update(data)
        return output

    monkeypatch.setattr(gdown, "download", fake)
    assert (cached(REF, quiet=True) / "model.safetensors").is_file()
    assert calls == [
        "https://raw.githubusercontent.com/ZiqinZhou66/ZegCLIP/"
        "9ba4bb5c9b621c04005fb9cef7254e79bb9c9991/configs/_base_/datasets/text_embedding/" + NPY,
        f"drive:{DRIVE_ID}",
    ]


def test_wrong_embedding_file_is_refused(mirror, tmp_path):
    mirror.files[NPY] = mirror.files[NPY][:-1] + b"\x00"
    with pytest.raises(Exception, match="sha256 .* expected"):
        cached(REF, quiet=True)
    assert not (tmp_path / "cache" / "zegclip" / NAME).exists()


def test_convert_cli_and_publish(mirror, tmp_path, monkeypatch, capsys):
    out = tmp_path / "converted"
    assert convert.main(["--zegclip", NAME, "--output", str(out), "--keep-clip"]) == 0
    assert "5 stored class names" in capsys.readouterr().out
    assert "ZegCLIP (authors' weights" in (out / "README.md").read_text()
    assert type(from_pretrained(out)).__name__ == "ZegCLIP"

    pushed = []
    monkeypatch.setattr(
        "otseg.models.otseg.OTSeg.push_to_hub",
        lambda self, repo, card=None, private=False: pushed.append((repo, card["title"])) or "u",
    )
    assert convert.main(["--zegclip", NAME, "--output", str(out), "--push-to-hub", "me/z"]) == 0
    assert pushed == [("me/z", "ZegCLIP (authors' weights, tiny ZegCLIP fixture)")]
    assert publish.main(["me", "--only", REF, "--output", str(tmp_path / "pub")]) == 0
    assert pushed[-1] == (f"me/zegclip-{NAME}", "ZegCLIP (authors' weights, tiny ZegCLIP fixture)")
    assert (tmp_path / "pub" / f"zegclip-{NAME}" / "README.md").is_file()

    capsys.readouterr()
    assert convert.main(["--zegclip", "nope", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown ZegCLIP setting 'zegclip:nope'" in err
    with pytest.raises(SystemExit):
        convert.main(["--zegclip", NAME, "--original", NAME, "--output", str(out)])
    assert "not both" in capsys.readouterr().err


def test_the_table_matches_zegclips_readme():
    real = {n: m for n, m in ZEGCLIPS.items() if n != NAME}
    assert sorted(real) == sorted(
        f"{d}-{s}" for d in ("voc", "coco") for s in ("inductive", "transductive", "fully")
    )
    assert len({m.drive_id for m in real.values()}) == 6
    assert original.available(original.ZEGCLIP_PREFIX) == list(real)
    for m in real.values():
        config = get_preset(m.preset)
        assert type(config).__name__ == "ZegCLIPConfig" and config.num_prompts == 1
        assert m.embeddings == (
            "voc12_single.npy" if m.name.startswith("voc") else "coco_multi.npy"
        )
        assert config.vision.num_prompt_tokens == (10 if m.name.startswith("voc") else 100)
        assert config.calibration == (0.0 if m.name.endswith("transductive") else 0.1)
        assert set(m.reported) == {"pAcc", "mIoU(S)", "mIoU(U)", "hIoU"}
    assert get_preset("zegclip-voc-inductive").templates == ("a photo of a {}",)
    assert len(get_preset("zegclip-coco-inductive").templates) == 15
    assert real["coco-transductive"].reported == {
        "pAcc": 69.2, "mIoU(S)": 40.7, "mIoU(U)": 59.9, "hIoU": 48.5
    }  # fmt: skip
    assert get_released("zegclip:COCO-Transductive").title == "COCO-Stuff transductive"
    with pytest.raises(UserError, match="unknown ZegCLIP setting.*zegclip:voc-inductive"):
        get_released("zegclip:context-inductive")  # ZegCLIP released no Context model


def test_the_app_accepts_zegclip_references(tiny):
    from app.main import check_model

    check_model(REF)
    with pytest.raises(UserError, match="--model zegclip:nope: unknown ZegCLIP setting"):
        check_model("zegclip:nope")


def test_a_converted_zegclip_model_equals_the_test_procedure_end_to_end(fx, mirror):
    """Through the predictor with its defaults: the re-derived ZegCLIP test procedure."""
    predictor = OTSegPredictor.from_pretrained(REF)
    model = predictor.model
    image = random_photo(90, 70, seed=8)
    predictor.set_image(image)
    names = ["class4", "class1", "class2"]
    predictor.set_vocabulary(names)
    result = predictor.predict()
    text = torch.from_numpy(np.load(fx / "text_embedding.npy")[[4, 1, 2], :1])
    want = reference_slide(model, image, text, [0, 2], 0.1)
    assert_same_probs(result.probs, want)
    assert os.environ["OTSEG_CACHE"]  # the tiny fixture's cache, not the user's


def test_training_refuses_zegclip_presets():
    from train.recipe import load_recipe

    recipe = load_recipe("voc-inductive", ["preset=zegclip-voc-inductive", "model=zegclip"])
    with pytest.raises(UserError, match="ZegCLIP preset, for the authors' released weights"):
        recipe.validate()


def test_app_serves_a_zegclip_model(mirror, monkeypatch, capsys, tmp_path):
    """``python app.py --model zegclip:...`` in-process: downloads through the mirror, the page
    is titled ZegCLIP with ZegCLIP's inference preselected, and /segment runs it (no λ)."""
    import json
    import urllib.request

    import gradio as gr
    from gradio_client import handle_file

    from app.main import main
    from tests.browser import free_port
    from tests.demo_helpers import client, write_photo

    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)  # main() returns
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    main(["--model", REF, "--port", str(port)])
    try:
        photo = write_photo(tmp_path / "photo.png")
        *_, info = client(url).predict(
            handle_file(str(photo)), "class0, class3", "zegclip", 0.5, True, 0.5,
            api_name="/segment",
        )  # fmt: skip
        assert (info["attention"], info["lam"], info["use_mps"]) == ("zegclip", None, False)
        assert [k["seen"] for k in info["classes"]] == [True, False]
        config = json.loads(urllib.request.urlopen(url + "config").read())
        page = json.dumps(config)
        assert "ZegCLIP: zero-shot semantic segmentation" in page
        radio = next(c for c in config["components"] if c["props"].get("elem_id") == "attention")
        assert radio["props"]["value"] == "zegclip"
    finally:
        gr.close_all()
    assert "ZegCLIP (authors' weights, tiny ZegCLIP fixture)" in capsys.readouterr().out
    assert len(mirror.requests) == 2
