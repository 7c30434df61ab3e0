"""Hub I/O: save/load round trip, loading offline from a pre-filled HF cache, clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from factories import fill_hf_cache, random_photo, save_tiny_clip, tiny_model
from otseg.errors import CheckpointError, UserError, WeightsNotFoundError
from otseg.inference.predictor import OTSegPredictor
from otseg.models.otseg import OTSeg
from otseg.weights.hub import hub_unreachable_reason, locate_model, resolve_file
from otseg.weights.pretrained import from_pretrained


def outputs(model, x):
    with torch.no_grad():
        return model(x, model.embed_text(["class0", "class1", "class4"])).scores


def test_round_trip_without_clip_source(tmp_path):
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path / "m", card={"metrics": {"mIoU": 12.5, "hIoU": None}})
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "text_embeddings.safetensors"]
    info = json.loads((tmp_path / "m" / "config.json").read_text())
    assert info["format"] == "otseg" and info["card"]["metrics"]["mIoU"] == 12.5
    card = (tmp_path / "m" / "README.md").read_text()
    assert "mIoU | 12.50" in card and "| hIoU | n/a |" in card  # undefined, e.g. no unseen class
    loaded = OTSeg.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config  # tuples come back as tuples, nested configs as such
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(outputs(loaded, x), outputs(model, x), atol=0, rtol=0)


def test_stored_embeddings_round_trip_by_name_and_dtype(tmp_path):
    """Unsorted class names with float16 rows (as converted from the original .npy): each name
    gets its own row back, bit for bit, still float16."""
    names = ("sofa", "cat", "bus", "aeroplane", "dog")
    model = tiny_model(seed=6, class_names=names)
    g = torch.Generator().manual_seed(7)
    rows = {n: torch.randn(3, 32, generator=g).half() for n in names}
    model.text.bank = dict(rows)
    model.save_pretrained(tmp_path / "m")
    bank = OTSeg.from_pretrained(tmp_path / "m").text.bank
    assert list(bank) == list(names)
    for n in names:
        assert bank[n].dtype == torch.float16 and torch.equal(bank[n], rows[n]), n


def test_only_trained_weights_are_stored_when_clip_comes_from_open_clip(tmp_path):
    clip = save_tiny_clip(tmp_path / "clip")
    model = tiny_model(seed=4, clip=f"local-dir:{clip}")
    model.save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "m" / "model.safetensors")).keys()
    assert all(k.startswith("decoder.") or "prompt" in k for k in keys)
    assert not (tmp_path / "m" / "text_embeddings.safetensors").exists()
    loaded = OTSeg.from_pretrained(tmp_path / "m")
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(outputs(loaded, x), outputs(model, x), atol=0, rtol=0)


def test_loads_offline_from_a_prefilled_hub_cache(tmp_path):
    """Both the otseg repo and the CLIP repo it names come from the HF cache, no network."""
    cache = tmp_path / "hub"
    clip_dir = save_tiny_clip(tmp_path / "clip")
    fill_hf_cache(cache, "otseg-test/tiny-clip", {p.name: p for p in clip_dir.iterdir()})
    model = tiny_model(seed=5, clip=f"local-dir:{clip_dir}")
    model.config = model.config.replace(clip_model="hf-hub:otseg-test/tiny-clip")
    model.save_pretrained(tmp_path / "m")
    fill_hf_cache(cache, "otseg-test/tiny-otseg", {p.name: p for p in (tmp_path / "m").iterdir()})
    loaded = from_pretrained("otseg-test/tiny-otseg", cache_dir=cache)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(outputs(loaded, x), outputs(model, x), atol=0, rtol=0)
    p = OTSegPredictor.from_pretrained("otseg-test/tiny-otseg", cache_dir=cache)
    p.set_image(random_photo())
    p.set_vocabulary(["a novel thing", "class2"])  # novel names go through the cached text tower
    assert p.predict().probs.shape[0] == 2


def test_missing_weights_fail_fast_with_an_actionable_message(tmp_path):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE=1.*local directory"):
        from_pretrained("someone/not-downloaded", cache_dir=tmp_path)
    with pytest.raises(UserError, match="^no such//dir: no such directory; train or convert"):
        from_pretrained("no such//dir")
    (tmp_path / "half").mkdir()
    with pytest.raises(WeightsNotFoundError, match="config.json is missing"):
        from_pretrained(tmp_path / "half")
    assert time.perf_counter() - start < 2.0
    assert resolve_file(tmp_path / "half", "x.json", required=False) is None


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """Only an org/name id with no local folder of that name goes to the Hub (here: the cache)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    model = tiny_model(seed=6)
    model.save_pretrained(tmp_path / "runs" / "m")
    hint = "no such directory.*; train or convert a model into it .* org/name$"
    for ref in ("runs/x", "./x", "../x", "x", "/nonexistent/x", "~/no-such-otseg", "a/b/c",
                r"runs\x", Path("org/name"), "org/name.git", "C:/x"):  # fmt: skip
        with pytest.raises(UserError, match=f"^{re.escape(str(ref))}: {hint}"):
            from_pretrained(ref)
    with pytest.raises(UserError, match=r"^runs/x: no such directory \(runs/ here holds models"):
        OTSegPredictor.from_pretrained("runs/x")
    with pytest.raises(UserError, match="^runs/m/config.json: a file, not a model directory"):
        from_pretrained("runs/m/config.json")
    assert locate_model("runs/m") == Path("runs/m") == locate_model(Path("runs/m"))
    assert locate_model("runs") == Path("runs")  # any existing folder is local (then files fail)
    assert locate_model("org/name") == "org/name"  # no org/ folder here: a Hub id
    (tmp_path / "otseg").mkdir()  # a folder named like the org, holding no model (a checkout)
    (tmp_path / "otseg" / "hub.py").write_text("")
    assert locate_model("otseg/voc-inductive") == "otseg/voc-inductive"
    (tmp_path / "out" / "run1" / "checkpoints").mkdir(parents=True)  # a run, no config.json yet
    with pytest.raises(UserError, match=r"^out/x: no such directory \(out/ here holds models"):
        locate_model("out/x")
    with pytest.raises(WeightsNotFoundError, match=r"'org/name' is not in the Hugging Face cache"):
        from_pretrained("org/name", cache_dir=tmp_path / "hub")  # HF_HUB_OFFLINE=1 in tests
    assert isinstance(from_pretrained("runs/m"), OTSeg)


def test_offline_error_without_hf_hub_offline_is_quick(tmp_path):
    """With no network and no HF_HUB_OFFLINE, the error still comes quickly (no long retries)."""
    code = (
        "import otseg, time, sys; from otseg import from_pretrained; from otseg.errors import WeightsNotFoundError\n"
        "t = time.time()\n"
        "try: from_pretrained('someone/not-downloaded', cache_dir=sys.argv[1])\n"
        "except WeightsNotFoundError as e: print('ERR', round(time.time() - t, 1), e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: refused at once
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.stdout.startswith("ERR"), out.stderr[-2000:]
    assert float(out.stdout.split()[1]) < 15


def test_hub_unreachable_reason_probes_the_endpoint(monkeypatch):
    import socket

    from huggingface_hub import constants

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # refused at once
    assert hub_unreachable_reason().startswith("cannot reach http://127.0.0.1:9 (")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # the proxy decides: no probe
    assert hub_unreachable_reason() is None
    monkeypatch.delenv("HTTPS_PROXY")
    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_unreachable_reason() is None


def test_wrong_files_give_checkpoint_errors(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({"state_dict": {}}))
    with pytest.raises(CheckpointError, match="converted with `otseg convert`"):
        from_pretrained(tmp_path / "m")
    cfg["config"]["vision"]["num_prompt_tokens"] = 7
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape .*prompt_embeddings"):
        from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        from_pretrained(tmp_path / "m")


def test_push_to_hub_uploads_the_saved_directory(monkeypatch):
    """push_to_hub creates the repo and uploads exactly the save_pretrained files (no network:
    the Hub client is replaced by a recorder)."""
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kw):
            calls["create"] = (repo_id, kw)

        def upload_folder(self, repo_id, folder_path, commit_message):
            from pathlib import Path

            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["config"] = json.loads((Path(folder_path) / "config.json").read_text())
            return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = tiny_model().push_to_hub(
        "me/tiny", card={"metrics": {"hIoU": 1.0}}, private=True, token="t"
    )
    assert url.endswith("/commit/abc")
    assert calls["create"] == ("me/tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls["files"] == [
        "README.md",
        "config.json",
        "model.safetensors",
        "text_embeddings.safetensors",
    ]
    assert calls["config"]["card"]["metrics"]["hIoU"] == 1.0 and calls["token"] == "t"
