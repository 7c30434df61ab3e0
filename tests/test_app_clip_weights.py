"""The demo's CLIP weights: whatever the Hugging Face cache holds is used with no network, and a
first online run downloads one weight file, not every candidate format."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from factories import fill_hf_cache, save_tiny_clip
from otseg.errors import WeightsNotFoundError
from otseg.weights import clip, hub

REPO = "otseg-test/tiny-clip"

# Runs in a fresh interpreter: HF_HUB_OFFLINE unset and the Hub endpoint refusing connections,
# i.e. a laptop without network whose cache was filled by an earlier online run.
LOAD = """
import json, sys, time
import otseg, open_clip
from otseg.weights.clip import load_clip
cache, name, tag, config = sys.argv[1:5]
# a built-in-style name whose pretrained tag points at the cached Hub repo
open_clip.factory._MODEL_CONFIGS[name] = json.load(open(config))["model_cfg"]
open_clip.pretrained._PRETRAINED[name] = {
    "cached": open_clip.pretrained._pcfg(hf_hub="otseg-test/tiny-clip/")}
t = time.time()
clip, tok = load_clip(name, tag or None, cache_dir=cache)
print("OK", round(time.time() - t, 1), sum(p.numel() for p in clip.parameters()))
"""


def _offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: refused at once
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    return env


@pytest.mark.parametrize("how", ["hf-hub", "pretrained-tag"])
def test_cached_safetensors_load_without_network(tmp_path, how):
    clip_dir = save_tiny_clip(tmp_path / "clip")
    cache = tmp_path / "hub"
    # only the safetensors file is cached; the optional .bin is not, and the Hub is unreachable
    fill_hf_cache(cache, REPO, {p.name: p for p in clip_dir.iterdir()})
    name, tag = (f"hf-hub:{REPO}", "") if how == "hf-hub" else ("tiny-otseg-clip", "cached")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD,
            str(cache),
            name,
            tag,
            str(clip_dir / "open_clip_config.json"),
        ],
        capture_output=True,
        text=True,
        env=_offline_env(),
        timeout=120,
    )
    assert out.stdout.startswith("OK"), out.stderr[-2000:]
    assert float(out.stdout.split()[1]) < 10  # no network retries


def test_first_online_run_downloads_one_weight_file(tmp_path, monkeypatch):
    """Nothing cached, Hub reachable: only the preferred format is fetched; the next one only
    when the repo lacks the first."""
    clip_dir = save_tiny_clip(tmp_path / "clip")
    downloads: list[str] = []
    cached: set[str] = set()

    def fake_download(repo, filename, *, local_files_only=False, cache_dir=None, **kw):
        if local_files_only:
            if filename in cached:
                return str(clip_dir / filename)
            raise LocalEntryNotFoundError(f"{filename} not cached")
        if filename not in available:
            raise EntryNotFoundError(f"{repo} has no {filename}")
        downloads.append(filename)
        return str(clip_dir / filename)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(hub, "_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)

    available = {"open_clip_config.json", *hub.CLIP_WEIGHT_NAMES}
    assert clip._clip_weights(REPO, None).name == "open_clip_model.safetensors"
    assert downloads == ["open_clip_model.safetensors"]

    downloads.clear()
    available = {"open_clip_config.json", "open_clip_pytorch_model.bin"}
    assert clip._clip_weights(REPO, None).name == "open_clip_pytorch_model.bin"
    assert downloads == ["open_clip_pytorch_model.bin"]

    available = {"open_clip_config.json"}
    with pytest.raises(WeightsNotFoundError, match="has none of"):
        clip._clip_weights(REPO, None)

    # the second format already cached: used as is, the first is not fetched beside it
    available = {"open_clip_config.json", *hub.CLIP_WEIGHT_NAMES}
    cached = {"open_clip_pytorch_model.bin"}
    downloads.clear()
    assert clip._clip_weights(REPO, None).name == "open_clip_pytorch_model.bin"
    assert downloads == []


def test_clip_files_from_two_cached_revisions_are_refused(tmp_path, monkeypatch):
    """open_clip's local-dir: needs the config and the weights in one snapshot folder."""

    def cached_file(repo, filename, cache_dir):
        snapshot = "rev1" if filename == "open_clip_config.json" else "rev2"
        return tmp_path / snapshot / filename

    monkeypatch.setattr(clip, "cached_file", cached_file)
    with pytest.raises(WeightsNotFoundError, match="come from different revisions"):
        clip.load_clip(f"hf-hub:{REPO}")


def test_offline_with_nothing_cached_says_so(tmp_path, monkeypatch):
    """Not "the repo has none of the files": they are not cached and downloads are off; the
    demo's page says that and what to do."""
    from huggingface_hub import constants

    from app.inference import load_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub, "_offline", lambda: True)
    with pytest.raises(WeightsNotFoundError) as error:
        clip._clip_weights(REPO, None)
    assert "not in the Hugging Face cache" in str(error.value)
    assert "HF_HUB_OFFLINE=1 forbids" in str(error.value) and "has none of" not in str(error.value)
    loaded = load_model(None, clip_model="ViT-B-16-quickgelu", clip_pretrained="openai")
    assert loaded.mode == "none"
    assert "not in the Hugging Face cache" in loaded.status and "run once with" in loaded.status
