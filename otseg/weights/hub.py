"""The only module that talks to the Hugging Face Hub: find a model's files (local folder, cache,
then download) and upload a folder. What the files mean is :mod:`otseg.weights.store`'s business.

A model directory (local or a Hub repo) holds:
    config.json                   {"format": "otseg", "model": "otseg" | "zegot", "config": ...}
    model.safetensors             trained weights (prompts, their projection and norm, decoder);
                                  the frozen image tower too when config.clip_model is None
    text_embeddings.safetensors   optional stored prompt embeddings (K, N, C) + class names
    README.md                     model card
The frozen CLIP towers are loaded through open_clip from ``config.clip_model``.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .. import progress
from ..errors import UserError, WeightsNotFoundError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_NAME = "text_embeddings.safetensors"
CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


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
        shown = progress.tqdm_class(f"Downloading {filename} of {repo}")
        return Path(hf_hub_download(repo, filename, etag_timeout=5, tqdm_class=shown, **kw))
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


def upload_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload model",
) -> str:
    """Create the model repo if needed and upload ``folder`` to it; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message
    )
    return str(info)


def cached_file(repo: str, filename: str, cache_dir: str | Path | None) -> Path | None:
    """``filename`` of ``repo`` if the Hugging Face cache holds it (never touches the network)."""
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, HFValidationError):
        return None
