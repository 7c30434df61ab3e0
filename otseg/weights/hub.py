"""The only module that talks to the Hugging Face Hub: save, load and push models, load CLIP.

A model directory (local or a Hub repo) holds:
    config.json                   {"format": "otseg", "model": "otseg" | "zegot", "config": ...}
    model.safetensors             trained weights (prompts, their projection and norm, decoder);
                                  the frozen image tower too when config.clip_model is None
    text_embeddings.safetensors   optional stored prompt embeddings (K, N, C) + class names
    README.md                     model card
The frozen CLIP towers are loaded through open_clip from ``config.clip_model``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file, safe_open, save_file

from ..config import OTSegConfig
from ..errors import UserError
from ..models.otseg import OTSeg, build_model

FORMAT = "otseg"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_NAME = "text_embeddings.safetensors"
CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class WeightsNotFoundError(FileNotFoundError):
    """Model files could not be found locally or downloaded; the message says what to do."""


class CheckpointError(UserError):
    """A file is not what it should be (wrong format, wrong or missing keys)."""


# -- resolving references and files --------------------------------------------------------
def locate_model(ref: str | Path) -> Path | str:
    """Where a model reference points: an existing local directory (a ``Path``), else a Hub
    repo id (the ``str``, resolved later from the cache or the Hub).

    A reference that reads as a path must exist locally, else a one-line :class:`UserError`
    names it and says what to do: a ``Path`` object, a string without an "org/" part, one that
    fails huggingface_hub's repo id check (which refuses a leading ".", "/" or "~", a backslash
    and more than one "/"), or one whose parent folder here holds models or runs ("runs/x"
    when runs/ holds other runs).
    ``original:`` references are resolved by :func:`from_pretrained` before this.
    """
    text = str(ref).strip()
    if not text:
        raise UserError("empty model reference; give a model directory or a Hub id like org/name")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(
            f"{text}: a file, not a model directory; give the folder with {CONFIG_NAME}"
        )
    parent = text.rsplit("/", 1)[0] if "/" in text else ""
    try:
        validate_repo_id(text)
        hub_id = not isinstance(ref, Path) and text.count("/") == 1
    except HFValidationError:
        hub_id = False
    if hub_id and not _holds_models(Path(parent)):
        return text
    why = f" ({parent}/ here holds models or runs, so it is read as a path)" if hub_id else ""
    raise UserError(
        f"{text}: no such directory{why}; train or convert a model into it "
        "(train.train --output-dir, otseg.weights.convert --output), or give a Hub repo id like org/name"
    )


def _holds_models(folder: Path, limit: int = 200) -> bool:
    """Whether ``folder`` exists and holds a model or training run (a subfolder with
    config.json or checkpoints/): then "folder/name" means a path, even if it reads as an
    org/name Hub id. A folder that merely shares the org's name (a source checkout's package
    folder, say) does not count. Looks at the first ``limit`` entries only."""
    if not folder.is_dir():
        return False
    try:
        for i, child in enumerate(folder.iterdir()):
            if i >= limit:
                break
            if (child / CONFIG_NAME).is_file() or (child / "checkpoints").is_dir():
                return True
    except OSError:
        return False
    return False


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_unreachable_reason() -> str | None:
    """Why the Hub endpoint cannot be reached (a 3 s TCP probe), or None.

    huggingface_hub retries a refused connection with back-off for ~23 s; probing first turns
    "no network" into an immediate, actionable error. Skipped when a proxy is configured.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=3).close()
    except OSError as e:
        return f"cannot reach {constants.ENDPOINT} ({e.__class__.__name__}: {e})"
    return None


def resolve_file(
    repo_or_dir: str | Path,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    required: bool = True,
) -> Path | None:
    """Local path of ``filename`` in a model directory or Hub repo (cache first, then network).

    Returns None for a missing optional file; raises :class:`WeightsNotFoundError` otherwise.
    """
    local = Path(repo_or_dir)
    if local.is_dir():
        path = local / filename
        if path.is_file():
            return path
        if required:
            raise WeightsNotFoundError(f"{filename} is missing from the model directory {local}")
        return None
    repo = str(repo_or_dir)
    kw = {"revision": revision, "cache_dir": cache_dir, "token": token}
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True, **kw))
    except HFValidationError:
        raise WeightsNotFoundError(
            f"{repo!r} is neither a local directory nor a valid Hub repo id (like 'org/name')"
        ) from None
    except LocalEntryNotFoundError:
        pass  # not cached yet
    if _offline():
        if not required:
            return None
        raise WeightsNotFoundError(
            f"{filename} of {repo!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 "
            f"forbids downloading it; download it while online (e.g. `hf download {repo}`) "
            f"or pass a local directory"
        )
    unreachable = hub_unreachable_reason()
    if unreachable:
        raise WeightsNotFoundError(
            f"{filename} of {repo!r} is not in the Hugging Face cache and {unreachable}; connect "
            f"to the internet, or download it elsewhere and pass a local directory"
        )
    try:
        return Path(hf_hub_download(repo, filename, etag_timeout=5, **kw))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise WeightsNotFoundError(
            f"no model at {repo!r} on the Hub ({type(e).__name__})"
        ) from None
    except EntryNotFoundError:
        if not required:
            return None
        raise WeightsNotFoundError(f"the Hub repo {repo!r} has no {filename}") from None
    except (OSError, ConnectionError) as e:
        raise WeightsNotFoundError(
            f"could not download {filename} of {repo!r} ({type(e).__name__}); check the network "
            f"or pass a local directory"
        ) from None


# -- CLIP -----------------------------------------------------------------------------------
def _cached_file(repo: str, filename: str, cache_dir: str | Path | None) -> Path | None:
    """``filename`` of ``repo`` if the Hugging Face cache holds it (never touches the network)."""
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def _clip_weights(repo: str, cache_dir: str | Path | None) -> Path:
    """The CLIP weight file of ``repo``: any candidate already cached (no network), else the
    first candidate the Hub has, downloaded (one file, never a second copy in another format)."""
    for name in CLIP_WEIGHT_NAMES:
        path = _cached_file(repo, name, cache_dir)
        if path is not None:
            return path
    for name in CLIP_WEIGHT_NAMES:
        path = resolve_file(repo, name, cache_dir=cache_dir, required=False)
        if path is not None:
            return path
    raise WeightsNotFoundError(f"the CLIP repo {repo!r} has none of {', '.join(CLIP_WEIGHT_NAMES)}")


def load_clip(model_name: str, pretrained: str | None = None, *, cache_dir: str | None = None):
    """Frozen open_clip CLIP and its tokenizer.

    ``model_name``: a built-in open_clip name ("ViT-B-16-quickgelu", weights from the
    ``pretrained`` tag or file), ``hf-hub:org/repo`` or ``local-dir:/path`` (an open_clip
    directory with ``open_clip_config.json`` and weights). Weights already in the Hugging Face
    cache are used without any network access; otherwise one weight file is downloaded.
    """
    import open_clip

    if model_name.startswith("hf-hub:"):
        repo = model_name[len("hf-hub:") :]
        # The cache first, as for the weights: resolve_file would take a local folder named
        # like the repo first, and the two files must come from one snapshot.
        config = _cached_file(repo, "open_clip_config.json", cache_dir) or resolve_file(
            repo, "open_clip_config.json", cache_dir=cache_dir
        )
        weights = _clip_weights(repo, cache_dir)
        if weights.parent != config.parent:  # both must sit in one snapshot for local-dir:
            raise WeightsNotFoundError(
                f"the cached files of {repo!r} come from different revisions; re-download it"
            )
        model_name = f"local-dir:{config.parent}"
    elif pretrained and not Path(pretrained).is_file():
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not cfg:
            raise WeightsNotFoundError(
                f"open_clip has no pretrained tag {pretrained!r} for {model_name}"
            )
        if cfg.get("hf_hub"):
            pretrained = str(_clip_weights(cfg["hf_hub"].rstrip("/"), cache_dir))
    if model_name.startswith("local-dir:") and not Path(model_name[10:]).is_dir():
        raise WeightsNotFoundError(f"CLIP directory not found: {model_name[10:]}")
    clip = open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir)
    tokenizer = open_clip.get_tokenizer(model_name)
    return clip.eval(), tokenizer


# -- saving ---------------------------------------------------------------------------------
def save_pretrained(
    model: OTSeg,
    directory: str | Path,
    *,
    card: dict[str, Any] | None = None,
) -> Path:
    """Write the model directory (see module docstring). ``card``: extra model-card facts
    (e.g. ``{"metrics": {...}, "training": {...}}``), also stored in config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.trained_state_dict().items()}
    _atomic(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    bank = getattr(getattr(model, "text", None), "bank", None)  # OTSeg's stored embeddings
    if bank:
        names = list(bank)
        emb = torch.stack([bank[n] for n in names]).contiguous()
        meta = {"class_names": json.dumps(names), "templates": json.dumps(model.config.templates)}
        _atomic(
            directory / TEXT_NAME, lambda p: save_file({"embeddings": emb}, str(p), metadata=meta)
        )
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_type(model),
        "config": model.config.to_dict(),
        "text_embeddings": TEXT_NAME if bank else None,
        "card": card or {},
    }
    _atomic(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(info, indent=2)))
    from .model_card import render_model_card

    (directory / "README.md").write_text(render_model_card(model.config, card or {}, bool(bank)))
    return directory


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


# -- loading --------------------------------------------------------------------------------
MODEL_TYPES = ("otseg", "zegot")


def model_type(model_or_config: Any) -> str:
    """Which model of the family something is: ``"zegot"`` or ``"otseg"``. The one rule, for
    models, configs and anything carrying a ``config`` (the demo's ``app.gpu.RemoteModel``,
    training-free CLIP, which is OTSeg's head): the type of the config decides. A TypeError for
    anything else, e.g. a DDP-wrapped model (unwrap it first)."""
    from ..models.zegot import ZegOTConfig

    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, ZegOTConfig):
        return "zegot"
    if isinstance(config, OTSegConfig):
        return "otseg"
    raise TypeError(
        f"model_type() takes an OTSeg or ZegOT model or config, got {type(model_or_config).__name__}"
    )


def build_any(config, **kwargs):
    """The builder of the config's model type (``clip``, ``tokenizer``, OTSeg's ``text_bank``)."""
    if model_type(config) == "zegot":
        from ..models.zegot import build_zegot

        kwargs.pop("text_bank", None)
        return build_zegot(config, **kwargs)
    return build_model(config, **kwargs)


def read_config(path: Path) -> tuple[OTSegConfig, dict[str, Any]]:
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if info.get("format") != FORMAT:
        raise CheckpointError(
            f'{path} is not an otseg config (no "format": "otseg"); original OTSeg '
            f"checkpoints must first be converted with `python -m otseg.weights.convert`"
        )
    kind = info.get("model", "otseg")  # directories written before ZegOT say nothing
    if kind not in MODEL_TYPES:
        raise CheckpointError(f'{path}: unknown "model": {kind!r}; expected one of {MODEL_TYPES}')
    if kind == "zegot":
        from ..models.zegot import ZegOTConfig

        return ZegOTConfig.from_dict(info["config"]), info
    return OTSegConfig.from_dict(info["config"]), info


def load_text_bank(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        names = json.loads(f.metadata()["class_names"])
        emb = f.get_tensor("embeddings")
    if emb.shape[0] != len(names):
        raise CheckpointError(f"{path}: {emb.shape[0]} embeddings for {len(names)} class names")
    return {n: emb[i] for i, n in enumerate(names)}


def load_weights(model: OTSeg, state: dict[str, torch.Tensor], source: str) -> None:
    """Load trained weights strictly: every expected key present with its shape, nothing extra."""
    expected = model.trained_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        lines = [f"{source} does not match the model config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                lines.append(
                    f"  {title} ({len(items)}): "
                    + ", ".join(items[:6])
                    + (" ..." if len(items) > 6 else "")
                )
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=False)


def from_pretrained(
    repo_or_dir: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    device: str | torch.device | None = None,
) -> OTSeg:
    """Load a model (OTSeg or ZegOT, as config.json says) from a local directory, a Hub repo
    id (cache first; offline-friendly) or ``original:<setting>`` (the authors' OTSeg checkpoint,
    downloaded and converted on first use)."""
    if str(repo_or_dir).startswith("original:"):
        from .original import cached

        repo_or_dir = cached(str(repo_or_dir))
    repo_or_dir = locate_model(repo_or_dir)
    kw = {"revision": revision, "cache_dir": cache_dir, "token": token}
    config, info = read_config(resolve_file(repo_or_dir, CONFIG_NAME, **kw))
    weights = resolve_file(repo_or_dir, WEIGHTS_NAME, **kw)
    bank = None
    if info.get("text_embeddings"):
        bank = load_text_bank(resolve_file(repo_or_dir, info["text_embeddings"], **kw))
    clip = tokenizer = None
    if config.clip_model is not None:
        clip, tokenizer = load_clip(config.clip_model, config.clip_pretrained, cache_dir=cache_dir)
    model = build_any(config, clip=clip, tokenizer=tokenizer, text_bank=bank)
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e})") from None
    load_weights(model, state, str(weights))
    model.card = info.get("card", {})
    return model.to(device).eval() if device is not None else model.eval()


def push_to_hub(
    model: OTSeg,
    repo_id: str,
    *,
    card: dict[str, Any] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload OTSeg model",
) -> str:
    """Save to a temporary directory and upload it as a model repo; returns the commit URL."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, card=card)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(info)
