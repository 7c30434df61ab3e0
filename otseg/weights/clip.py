"""The frozen CLIP towers, from open_clip: built-in names, ``hf-hub:`` repos (cache first, one
weight file downloaded at most) and ``local-dir:`` folders."""

from __future__ import annotations

from pathlib import Path

from ..errors import WeightsNotFoundError
from . import hub
from .hub import CLIP_WEIGHT_NAMES, cached_file, resolve_file


def _clip_weights(repo: str, cache_dir: str | Path | None) -> Path:
    """The CLIP weight file of ``repo``: any candidate already cached (no network), else the
    first candidate the Hub has, downloaded (one file, never a second copy in another format)."""
    for name in CLIP_WEIGHT_NAMES:
        path = cached_file(repo, name, cache_dir)
        if path is not None:
            return path
    if hub._offline():  # resolve_file(required=False) would answer None: "absent", not "not cached"
        raise WeightsNotFoundError(
            f"the CLIP weights of {repo!r} ({' or '.join(CLIP_WEIGHT_NAMES)}) are not in the "
            "Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading them; run once with "
            f"network access (or `hf download {repo} {CLIP_WEIGHT_NAMES[0]}`), then offline "
            "starts use the cached copy"
        )
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
        config = cached_file(repo, "open_clip_config.json", cache_dir) or resolve_file(
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
