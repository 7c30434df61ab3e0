"""The authors' released models: registry, download → verify → convert → cache → load → predict
against a local mirror server (no internet), and every failure's message."""

from __future__ import annotations

import hashlib
import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from http_mirror import serve

from factories import (
    PARITY_DIR,
    fixture_config,
    parity_fixture,
    random_photo,
    save_tiny_clip,
    skip_or_fail,
    tiny_model,
)
from otseg.errors import CheckpointError
from otseg.inference.predictor import OTSegPredictor
from otseg.models.otseg import OTSeg
from otseg.registry import get_preset
from otseg.weights import convert, original, publish
from otseg.weights.convert import cached, read_text_embeddings
from otseg.weights.download import DownloadError, download
from otseg.weights.original import ORIGINALS, OriginalModel, get_original

NAME = "tiny-voc-inductive"
DRIVE_ID = "tinyDriveId0123"


@pytest.fixture(scope="module")
def fx() -> Path:
    return parity_fixture("tiny_voc_inductive")


@pytest.fixture
def tiny(fx, monkeypatch, tmp_path) -> OriginalModel:
    """A registry entry for the parity fixture (an original-format checkpoint of the tiny
    config), the cache in tmp_path and downloads allowed."""
    npy = (fx / "text_embedding.npy").read_bytes()
    entry = OriginalModel(
        name=NAME,
        title="tiny parity fixture",
        drive_id=DRIVE_ID,
        embeddings="text_embedding.npy",
        preset=fixture_config(fx),
        reported={"mIoU(U)": 1.5, "mIoU(S)": 2.5, "hIoU": None},
        embeddings_size=len(npy),
        embeddings_sha256=hashlib.sha256(npy).hexdigest(),
        note="a test entry",
    )
    monkeypatch.setitem(ORIGINALS, NAME, entry)
    monkeypatch.setenv("OTSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return entry


@pytest.fixture
def mirror(fx, tiny, monkeypatch):
    files = {
        DRIVE_ID: (fx / "official.pth").read_bytes(),
        "text_embedding.npy": (fx / "text_embedding.npy").read_bytes(),
    }
    with serve(files) as m:
        monkeypatch.setenv("OTSEG_ORIGINAL_MIRROR", m.url + "/")
        yield m


def cache_entries(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache" / "original"
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def test_download_convert_cache_load_predict(fx, mirror, tmp_path, monkeypatch):
    predictor = OTSegPredictor.from_pretrained(f"original:{NAME}")
    assert sorted(mirror.requests) == sorted([DRIVE_ID, "text_embedding.npy"])
    assert cache_entries(tmp_path) == [NAME]  # no temporary folder or download left behind

    # the converted weights reproduce the original implementation's output
    model = predictor.model
    ref = torch.load(fx / "outputs.pt", weights_only=True)
    seen = torch.tensor([i in model.config.seen for i in range(5)])
    with torch.no_grad():
        scores = model(ref["input"], model.embed_text(model.config.class_names), seen=seen).scores
    assert (scores - ref["seg_logit"]).abs().max() < 1e-5
    predictor.set_image(random_photo())
    predictor.set_vocabulary(["class0", "class3"])
    assert predictor.predict().labels.shape == (80, 112)

    card = (tmp_path / "cache" / "original" / NAME / "README.md").read_text()
    assert "# OTSeg (authors' weights, tiny parity fixture)" in card
    assert DRIVE_ID in card and "github.com/cubeyoung/OTSeg" in card and "0801051" in card
    assert "Reported by the authors (not measured on this copy)" in card
    assert "| hIoU | not in the source |" in card and "a test entry" in card

    # second start: from the cache, no request, even offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    again = OTSegPredictor.from_pretrained(f"original:{NAME}")
    assert time.perf_counter() - start < 2.0
    assert len(mirror.requests) == 2
    assert again.model.card["source"]["checkpoint"]["google_drive_id"] == DRIVE_ID


@pytest.mark.parametrize(
    ("target", "mode", "message"),
    [
        (DRIVE_ID, "truncate", "broke off .*run the command again"),
        (DRIVE_ID, "truncate-unannounced", "incomplete zip archive .*run the command again"),
        (DRIVE_ID, "html", "answered with a web page instead of the tiny parity fixture"),
        ("text_embedding.npy", "truncate-unannounced", "has 544 bytes, expected 1,088"),
        ("text_embedding.npy", "html", "web page instead of the text embeddings"),
    ],
)
def test_bad_downloads_fail_clearly_and_leave_no_cache_entry(
    mirror, tmp_path, target, mode, message
):
    mirror.modes[target] = mode
    start = time.perf_counter()
    with pytest.raises(DownloadError, match=message) as info:
        cached(NAME, quiet=True)
    assert time.perf_counter() - start < 10
    assert "\n" not in str(info.value)
    assert cache_entries(tmp_path) == []
    mirror.modes.clear()  # the next try succeeds
    assert (cached(NAME, quiet=True) / "config.json").is_file()


@pytest.mark.parametrize("mode", ["", "truncate"])
def test_download_leaves_nothing_behind_when_a_check_or_the_transfer_fails(tmp_path, mode):
    """``download`` on its own (no temporary folder around it): a failure leaves no file."""
    with serve({"f.bin": b"x" * 100}) as m:
        m.modes["f.bin"] = mode
        with pytest.raises(DownloadError, match="expected 101" if not mode else "broke off"):
            download(tmp_path / "f.bin", url=f"{m.url}/f.bin", what="f", size=101, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_wrong_or_missing_files(mirror, tmp_path):
    mirror.files["text_embedding.npy"] = mirror.files["text_embedding.npy"][:-1] + b"\x00"
    with pytest.raises(DownloadError, match="sha256 .* expected"):
        cached(NAME, quiet=True)
    del mirror.files[DRIVE_ID]
    mirror.files["text_embedding.npy"] = (
        parity_fixture("tiny_voc_inductive") / "text_embedding.npy"
    ).read_bytes()
    with pytest.raises(DownloadError, match="HTTP 404"):
        cached(NAME, quiet=True)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    mirror.files[DRIVE_ID] = archive.getvalue()
    with pytest.raises(CheckpointError, match="fixture checkpoint: it is not a readable PyTorch"):
        cached(NAME, quiet=True)
    assert cache_entries(tmp_path) == []


def test_no_network_and_offline_fail_within_seconds(tiny, monkeypatch):
    monkeypatch.setenv("OTSEG_ORIGINAL_MIRROR", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(DownloadError, match="127.0.0.1:9 is unreachable.*OTSEG_ORIGINAL_MIRROR"):
        cached(NAME, quiet=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE=1 forbids"):
        cached(NAME, quiet=True)
    assert time.perf_counter() - start < 10


def test_unknown_and_refused_settings():
    with pytest.raises(
        ValueError, match="unknown original setting 'coco'.*original:coco-inductive"
    ):
        get_original("coco")
    with pytest.raises(ValueError, match="same Google-Drive file.*original:voc-transductive"):
        get_original("original:voc-fully")
    assert get_original("original:COCO-Transductive").name == "coco-transductive"


def test_without_mirror_drive_and_github_are_asked(fx, tiny, monkeypatch):
    """Without a mirror the checkpoint comes by Drive id, the .npy from GitHub at the pinned
    commit (gdown replaced by a recorder); a Drive quota page becomes an actionable message."""
    import gdown
    from gdown.exceptions import FileURLRetrievalError

    monkeypatch.delenv("OTSEG_ORIGINAL_MIRROR", raising=False)
    calls = []

    def fake(url=None, id=None, output=None, hasher=None, **kw):
        calls.append(url or f"drive:{id}")
        if id is not None and len(calls) > 2:
            raise FileURLRetrievalError(
                "Failed to retrieve file url:\n\n\tToo many users have viewed or downloaded "
                "this file recently.\n\nYou may still be able to access the file from the browser"
            )
        data = (fx / ("official.pth" if id else "text_embedding.npy")).read_bytes()
        Path(output).write_bytes(data)
        hasher.update(data)
        return output

    monkeypatch.setattr(gdown, "download", fake)
    assert (cached(NAME, quiet=True) / "model.safetensors").is_file()
    assert calls == [original.EMBEDDING_URL + "text_embedding.npy", f"drive:{DRIVE_ID}"]
    assert "/cubeyoung/OTSeg/08010511be3152bcdd5cb1ff8e30b9cd17bbcb8f/configs/" in calls[0]

    monkeypatch.setenv("OTSEG_CACHE", str(Path(os.environ["OTSEG_CACHE"]) / "other"))
    with pytest.raises(DownloadError, match="Too many users.*quota.*drive.google.com/file/d/"):
        cached(NAME, quiet=True)


def test_convert_cli_original(mirror, tmp_path, capsys):
    out = tmp_path / "converted"
    assert convert.main(["--original", NAME, "--output", str(out), "--keep-clip"]) == 0
    assert "stored class names" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "README.md", "config.json", "model.safetensors", "text_embeddings.safetensors",
    }  # fmt: skip
    assert not any(p.name.startswith(".otseg-download") for p in tmp_path.iterdir())
    assert "authors' weights" in (out / "README.md").read_text()

    assert convert.main(["--original", "nope", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown original setting" in err
    with pytest.raises(SystemExit) as code:
        convert.main(["x.pth", "--original", NAME, "--output", str(out)])
    err = capsys.readouterr().err
    assert (
        code.value.code == 2
        and err.startswith("error: --original brings")
        and "drop CHECKPOINT" in err
    )
    with pytest.raises(SystemExit):
        convert.main(["--output", str(out)])
    assert capsys.readouterr().err.count("\n") == 1  # one line, no usage block


def test_publish_dry_run_and_push(mirror, tmp_path, monkeypatch, capsys):
    pushed = []
    monkeypatch.setattr(
        "otseg.models.otseg.OTSeg.push_to_hub",
        lambda self, repo, card=None, private=False: pushed.append((repo, card["title"])) or "url",
    )
    out = tmp_path / "pub"
    assert publish.main(["me", "--only", NAME, "--output", str(out), "--dry-run"]) == 0
    assert (out / f"otseg-{NAME}" / "README.md").is_file() and pushed == []
    assert publish.main(["me", "--only", NAME, "--output", str(out)]) == 0
    assert pushed == [(f"me/otseg-{NAME}", "OTSeg (authors' weights, tiny parity fixture)")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        publish.main(["me", "--only", "voc-fully"])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: original:voc-fully cannot be used") and err.count("\n") == 1


def test_the_registry_matches_the_original_repository():
    assert len([n for n in ORIGINALS if n != NAME]) == 9
    assert ORIGINALS["voc-transductive"].drive_id == ORIGINALS["voc-fully"].drive_id
    assert "voc-fully" not in original.available()
    assert len({m.drive_id for m in ORIGINALS.values()}) == 8
    for m in ORIGINALS.values():
        get_preset(m.preset)
        assert m.reported["mIoU(U)"] and m.reported["mIoU(S)"]
        assert m.title in card_title(m)
    assert original.get_original("coco-transductive").title == "COCO-Stuff transductive"


def card_title(m: OriginalModel) -> str:
    return original.card_for(m)["title"]


def test_pinned_embedding_files_fit_their_presets():
    """The shared copies of the pinned .npy files: size and sha256 as in the table, and the
    (K, N, C) shape each preset expects."""
    folder = PARITY_DIR.parent / "original-text-embeddings"
    if not folder.is_dir():
        skip_or_fail(f"{folder} not found (copies of the original .npy files)")
    for m in ORIGINALS.values():
        path = folder / m.embeddings
        data = path.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == original.EMBEDDING_FILES[
            m.embeddings
        ]
        bank = read_text_embeddings(path, m.config)
        assert len(bank) == len(m.config.class_names)
        assert np.isfinite(next(iter(bank.values())).float().numpy()).all()


@pytest.mark.browser
def test_app_serves_its_page_while_the_model_downloads(mirror, monkeypatch, capsys):
    """``python app.py --model original:...`` in-process, the checkpoint held half-way by the
    mirror: the page is up and shows the download with its percentage, a Segment sent
    meanwhile waits instead of failing, and both finish once the download does."""
    import re

    import gradio as gr
    from gradio_client import handle_file

    from app.main import main
    from tests.browser import chromium, free_port, open_page
    from tests.demo_helpers import client, write_photo

    mirror.modes[DRIVE_ID] = "hold"
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)  # main() returns
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    main(["--model", f"original:{NAME}", "--port", str(port)])
    try:
        with chromium() as context, open_page(context, url, "loading") as session:
            page = session.page
            mode = "(document.querySelector('#mode') || {}).innerText || ''"
            # the stage line comes first, the percentage once the mirror has sent bytes
            page.wait_for_function(f"/checkpoint: \\d+ %/.test({mode})")
            shown = re.search(r"checkpoint: (\d+) %", page.evaluate(mode))
            assert shown and 0 < int(shown.group(1)) < 100, page.evaluate(mode)
            photo = write_photo(Path(os.environ["OTSEG_CACHE"]) / "photo.png")
            job = client(url).submit(
                handle_file(str(photo)), "class0, class3", "sinkhorn", 0.5, True, 0.5,
                api_name="/segment",
            )  # fmt: skip
            time.sleep(1.0)
            assert not job.done()  # waiting for the model, not refused
            mirror.release.set()
            *_, info = job.result(timeout=120)
            assert [k["seen"] for k in info["classes"]] == [True, False]
            page.wait_for_function(f'({mode}).includes("authors\' weights, tiny parity")')
        assert "OTSeg (authors' weights, tiny parity fixture)" in capsys.readouterr().out
    finally:
        mirror.release.set()
        gr.close_all()
    assert len(mirror.requests) == 2


def test_app_shows_a_download_failure_instead_of_a_traceback(tiny, monkeypatch):
    from app.inference import load_model

    monkeypatch.setenv("OTSEG_ORIGINAL_MIRROR", "http://127.0.0.1:9")
    loaded = load_model(f"original:{NAME}", clip_model="local-dir:/nonexistent")
    assert loaded.mode == "none"
    assert f"Could not load `original:{NAME}`: cannot download" in loaded.status


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    for var in ("OTSEG_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert original.cache_root() == Path.home() / ".cache" / "huggingface" / "otseg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert original.cache_root() == tmp_path / "xdg" / "huggingface" / "otseg"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert original.cache_root() == tmp_path / "hf" / "otseg"
    monkeypatch.setenv("OTSEG_CACHE", str(tmp_path / "mine"))
    assert original.cache_root() == tmp_path / "mine"


def original_format(model) -> bytes:
    """``model``'s image tower and decoder under the original checkpoint's key names."""
    state = {}
    for key, value in model.state_dict().items():
        for old, new in convert.RENAMES:
            if key.startswith(new):
                state[old + key[len(new) :]] = value.clone()
    buffer = io.BytesIO()
    torch.save({"meta": {}, "state_dict": state}, buffer)
    return buffer.getvalue()


def test_image_tower_is_compared_with_open_clip(tmp_path, monkeypatch):
    """A model whose frozen tower comes from open_clip (a tiny local CLIP here): the converted
    copy reproduces the original, and a checkpoint whose tower differs is reported."""
    clip = save_tiny_clip(tmp_path / "clip")
    model = tiny_model(seed=2, clip=f"local-dir:{clip}")
    bank = torch.nn.functional.normalize(torch.randn(5, 3, 32), dim=-1).half().numpy()
    buffer = io.BytesIO()
    np.save(buffer, bank)
    entry = OriginalModel("tiny-clip", "tiny with CLIP", "clipDriveId", "e.npy", model.config)
    monkeypatch.setitem(ORIGINALS, entry.name, entry)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    checkpoint = original_format(model)
    with serve({"clipDriveId": checkpoint, "e.npy": buffer.getvalue()}) as m:
        monkeypatch.setenv("OTSEG_ORIGINAL_MIRROR", m.url)
        monkeypatch.setenv("OTSEG_CACHE", str(tmp_path / "a"))
        loaded = OTSeg.from_pretrained("original:tiny-clip")
        assert loaded.card["image_tower_check"]["max_abs_diff"] == 0.0
        x = torch.randn(1, 3, 64, 64)
        names = list(model.config.class_names)
        bank_t = torch.from_numpy(bank)
        with torch.no_grad():
            want = model(x, bank_t).scores
            got = loaded(x, loaded.embed_text(names)).scores
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

        model.image_encoder.ln_post.weight.data += 0.01
        m.files["clipDriveId"] = original_format(model)
        monkeypatch.setenv("OTSEG_CACHE", str(tmp_path / "b"))
        with pytest.warns(UserWarning, match="image tower differs from local-dir:.*--keep-clip"):
            loaded = OTSeg.from_pretrained("original:tiny-clip")
        assert loaded.card["image_tower_check"]["at"] == "ln_post.weight"
