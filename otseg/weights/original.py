"""The authors' released checkpoints: OTSeg's nine (``original:<setting>``) and ZegCLIP's six
(``zegclip:<setting>``), one table each, their sources (download → verify) and where converted
copies are cached (the conversion is :mod:`otseg.weights.convert`).

    OTSegPredictor.from_pretrained("original:coco-transductive")     # cached after first use
    OTSegPredictor.from_pretrained("zegclip:coco-transductive")      # ZegCLIP's own weights
    otseg convert --original coco-transductive --output otseg-coco-transductive
    otseg convert --zegclip coco-transductive --output zegclip-coco-transductive

Checkpoints come from the Google-Drive links in the README of github.com/cubeyoung/OTSeg (or
github.com/ZiqinZhou66/ZegCLIP), the text embeddings (``.npy``) from the same repository at the
pinned commit. With ``OTSEG_ORIGINAL_MIRROR=URL`` all come from ``$URL/<drive id>`` and
``$URL/<npy name>`` instead (plain HTTP; for firewalled machines and for the tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import registry
from ..config import OTSegConfig
from ..errors import UserError
from .download import DownloadError, download, offline

PREFIX = "original:"
REPO = "cubeyoung/OTSeg"
COMMIT = "08010511be3152bcdd5cb1ff8e30b9cd17bbcb8f"  # 0801051, the commit the port follows
EMBEDDING_URL = (
    f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/configs/_base_/datasets/text_embedding/"
)
MIRROR_ENV = "OTSEG_ORIGINAL_MIRROR"
CACHE_ENV = "OTSEG_CACHE"
REPORTED_SOURCE = (
    "OTSeg+ rows of the main results table (paper arXiv 2403.14183, project page "
    "https://cubeyoung.github.io/OTSeg_project/); the released code ensembles the MPS and "
    "decoder paths, which is OTSeg+"
)
# name → (bytes, sha256) of the .npy files at COMMIT (git objects of the pinned commit)
EMBEDDING_FILES = {
    "voc12_otseg.npy": (
        123008, "bfc4c8d37e592f7e77ef01c2e3f78bdee0192e2c66504e97df6d717791384918"
    ),
    "context_otseg.npy": (
        483456, "97761152420cf78dcac02d71a0e2760f94b88803af825d6eb7cf0454fc497cfe"
    ),
    "coco_otseg.npy": (
        2801792, "854bd2d9587ea41a926d3ac72f875985c9e84f48f8d5e7113b9c3286db121eed"
    ),
}  # fmt: skip
DATASET_TITLES = {"voc": "PASCAL VOC", "context": "PASCAL Context", "coco": "COCO-Stuff"}


@dataclass(frozen=True)
class Release:
    """Where one family of released checkpoints comes from."""

    prefix: str  # "original:" — how references name them
    family: str  # "original" — the cache folder
    model: str  # "OTSeg" — in titles
    repo: str  # GitHub owner/name whose README links the checkpoints
    commit: str  # the pinned commit of that repository
    reported_source: str  # where the reported numbers come from
    repo_stem: str  # "otseg" — published as ORG/<repo_stem>-<setting>

    @property
    def embedding_url(self) -> str:
        return (
            f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/configs/_base_/"
            "datasets/text_embedding/"
        )


OTSEG_RELEASE = Release(PREFIX, "original", "OTSeg", REPO, COMMIT, REPORTED_SOURCE, "otseg")


@dataclass(frozen=True)
class OriginalModel:
    """One released checkpoint. ``reported``: the authors' numbers (None: not in the source)."""

    name: str  # "coco-transductive"
    title: str  # "COCO-Stuff transductive"
    drive_id: str
    embeddings: str  # the .npy file name
    preset: str | OTSegConfig  # a preset name, or a config (tests: tiny models)
    reported: dict[str, float | None] = field(default_factory=dict)
    checkpoint_size: int | None = None  # unknown until someone downloads the real file
    checkpoint_sha256: str | None = None
    embeddings_size: int | None = None
    embeddings_sha256: str | None = None
    note: str = ""  # known problems, shown in the model card
    refused: str = ""  # non-empty: this setting cannot be used, and why
    release: Release = OTSEG_RELEASE

    @property
    def ref(self) -> str:
        """The one-word reference: ``original:coco-transductive``."""
        return self.release.prefix + self.name

    @property
    def config(self) -> OTSegConfig:
        return registry.get_preset(self.preset) if isinstance(self.preset, str) else self.preset

    @property
    def drive_url(self) -> str:
        return f"https://drive.google.com/file/d/{self.drive_id}/view"


def _title(dataset: str, setting: str) -> str:
    """ "COCO-Stuff transductive", "PASCAL VOC fully supervised", ..."""
    return f"{DATASET_TITLES[dataset]} {'fully supervised' if setting == 'fully' else setting}"


def _entry(dataset: str, setting: str, drive_id: str, u: float, s: float, h: float | None, **kw):
    npy = "voc12_otseg.npy" if dataset == "voc" else f"{dataset}_otseg.npy"
    size, sha = EMBEDDING_FILES[npy]
    return OriginalModel(
        name=f"{dataset}-{setting}",
        title=_title(dataset, setting),
        drive_id=drive_id,
        embeddings=npy,
        preset=f"{dataset}-{setting}",
        reported={"mIoU(U)": u, "mIoU(S)": s, "hIoU": h},
        embeddings_size=size,
        embeddings_sha256=sha,
        **kw,
    )


VOC_ST_NOTE = (
    "The original VOC transductive and fully configs name context_otseg.npy (59 classes) by "
    "mistake; the checkpoint is used with voc12_otseg.npy, the only file that fits it. "
)
SAME_LINK = (
    "The authors' README links the same Google-Drive file for VOC transductive and VOC fully "
    "supervised, so the VOC fully supervised checkpoint is not available; which training the "
    "shared file comes from cannot be checked."
)
COCO_H = None  # the COCO-Stuff hIoU column is missing from the copy of the table we have
ORIGINALS: dict[str, OriginalModel] = {
    m.name: m
    for m in (
        _entry("voc", "inductive", "1UjyrFxQ0TTSDiQYse5MxAvHVyhJpqgMA", 81.6, 93.3, 87.1),
        _entry(
            "voc", "transductive", "1SPXHxDl7znsOqUi9APnl3qx9BvmUbfny", 94.3, 94.3, 94.4,
            note=VOC_ST_NOTE + SAME_LINK,
        ),
        _entry(
            "voc", "fully", "1SPXHxDl7znsOqUi9APnl3qx9BvmUbfny", 95.0, 94.1, 94.6,
            note=VOC_ST_NOTE + SAME_LINK,
            refused=SAME_LINK + " Use original:voc-transductive (the file both links point to).",
        ),
        _entry("context", "inductive", "1ZtNRtUR4fnl1b-oTc44v5HhmXhyx_w4-", 60.4, 55.2, 57.7),
        _entry(
            "context", "transductive", "1AZspmBiyjeOzMg5Aq165CcPz3ZLA-_BS", 67.0, 54.0, 59.8,
            note="Tested by the authors with 420-pixel windows on the 480-pixel model (kept).",
        ),
        _entry("context", "fully", "1wTAC7uACPV66VEtlh0qzRMXmNN9mk5gU", 78.4, 54.5, 65.5),
        _entry("coco", "inductive", "11t3cnRicO9esJrvRjx5O4jL_1v1FDPa8", 41.8, 41.5, COCO_H),
        _entry("coco", "transductive", "1BhxxmuW0R7Pyt2Ty4ERzg9lkKbZQmUY0", 62.6, 41.4, COCO_H),
        _entry("coco", "fully", "1j4dDVz4hWUum68AdQC2n5FDkrstY-zhI", 63.2, 41.5, COCO_H),
    )
}  # fmt: skip

# -- ZegCLIP (CVPR 2023): OTSeg's baseline, six released checkpoints ---------------------------
ZEGCLIP_PREFIX = "zegclip:"
ZEGCLIP_RELEASE = Release(
    prefix=ZEGCLIP_PREFIX,
    family="zegclip",
    model="ZegCLIP",
    repo="ZiqinZhou66/ZegCLIP",
    commit="9ba4bb5c9b621c04005fb9cef7254e79bb9c9991",  # 9ba4bb5 (2023-05-11)
    reported_source=(
        "the 'Pretrained models' table of the README of github.com/ZiqinZhou66/ZegCLIP at "
        "commit 9ba4bb5 (paper arXiv 2212.03588); the authors report the average of several "
        "training runs and release one of them"
    ),
    repo_stem="zegclip",
)
# name → (bytes, sha256) of the (K, C) float16 .npy files the released configs load
ZEGCLIP_EMBEDDING_FILES = {
    "voc12_single.npy": (  # "a photo of a {}"
        20608, "72d3642e34bc3031fefa2fe31a43ee84b52ebb5f97b85d380f7b0d777b253ea7"
    ),
    "coco_multi.npy": (  # renormalised mean of 15 templates
        175232, "49190f380a10e8b0df5c006b7f0a9d14aedba5ae7382d43a606d7fb8b39e7798"
    ),
}  # fmt: skip


def _zegclip(dataset: str, setting: str, drive_id: str, pacc, s, u, h) -> OriginalModel:
    npy = "voc12_single.npy" if dataset == "voc" else "coco_multi.npy"
    size, sha = ZEGCLIP_EMBEDDING_FILES[npy]
    return OriginalModel(
        name=f"{dataset}-{setting}",
        title=_title(dataset, setting),
        drive_id=drive_id,
        embeddings=npy,
        preset=f"zegclip-{dataset}-{setting}",
        reported={"pAcc": pacc, "mIoU(S)": s, "mIoU(U)": u, "hIoU": h},
        embeddings_size=size,
        embeddings_sha256=sha,
        release=ZEGCLIP_RELEASE,
    )


ZEGCLIPS: dict[str, OriginalModel] = {
    m.name: m
    for m in (
        _zegclip("voc", "inductive", "1MqIFntWtTQk3HPiZp8hysI7CQIDTXteS", 94.6, 91.9, 77.8, 84.3),
        _zegclip("voc", "transductive", "1PsXOd_A9Pww3ftclTDVWKcAvNIOAn6E-", 96.2, 92.3, 89.9, 91.1),
        _zegclip("voc", "fully", "1oBj2FRV17TAKKrSexg4SUKa4I0egEwaj", 96.3, 92.4, 90.9, 91.6),
        _zegclip("coco", "inductive", "12M6T97o9wyxbJKrR7zLfFMDsGVTiq4WY", 62.0, 40.2, 41.1, 40.8),
        _zegclip("coco", "transductive", "1S8ia0-0oAUELxQXWqz0OlKoEv68gUuMp", 69.2, 40.7, 59.9, 48.5),
        _zegclip("coco", "fully", "1DvUpYZa0rtPUBOjsYWwt-TEs6YdvUG0C", 69.9, 40.7, 63.2, 49.6),
    )
}  # fmt: skip
TABLES = {PREFIX: ORIGINALS, ZEGCLIP_PREFIX: ZEGCLIPS}  # prefix → its table
RELEASED_PREFIXES = tuple(TABLES)


def available(prefix: str = PREFIX) -> list[str]:
    """Names of the settings of one release (``"original:"`` or ``"zegclip:"``) that can be
    downloaded, in table order."""
    return [name for name, m in TABLES[prefix].items() if not m.refused]


def get_original(name: str) -> OriginalModel:
    """The table entry for ``name`` (with or without the ``original:`` prefix).

    Raises ValueError for an unknown name or a setting that cannot be used.
    """
    key = name.removeprefix(PREFIX).strip().lower()
    if key not in ORIGINALS:
        raise UserError(
            f"unknown original setting {name!r}; choose one of: "
            + ", ".join(PREFIX + n for n in available())
        )
    entry = ORIGINALS[key]
    if entry.refused:
        raise UserError(f"{PREFIX}{key} cannot be used: {entry.refused}")
    return entry


def get_released(ref: str) -> OriginalModel:
    """The table entry of ``original:<setting>`` or ``zegclip:<setting>`` (a bare setting is
    OTSeg's); a one-line :class:`UserError` naming the choices otherwise."""
    if not ref.startswith(ZEGCLIP_PREFIX):
        return get_original(ref)
    key = ref.removeprefix(ZEGCLIP_PREFIX).strip().lower()
    if key not in ZEGCLIPS:
        raise UserError(
            f"unknown ZegCLIP setting {ref!r}; choose one of: "
            + ", ".join(ZEGCLIP_PREFIX + n for n in available(ZEGCLIP_PREFIX))
        )
    return ZEGCLIPS[key]


# -- sources --------------------------------------------------------------------------------
def _mirror() -> str | None:
    url = os.environ.get(MIRROR_ENV, "").strip()
    return url.rstrip("/") if url else None


def fetch(entry: OriginalModel, directory: Path, *, quiet: bool = False) -> tuple[Path, Path]:
    """Download and verify the checkpoint and its ``.npy`` into ``directory``."""
    if offline():
        raise DownloadError(
            f"{entry.ref} must be downloaded, but HF_HUB_OFFLINE=1 forbids it; run "
            "once with network access (the converted model is cached) or unset HF_HUB_OFFLINE"
        )
    mirror = _mirror()
    npy = download(
        directory / entry.embeddings,
        url=f"{mirror or entry.release.embedding_url.rstrip('/')}/{entry.embeddings}",
        what=f"the text embeddings {entry.embeddings}",
        size=entry.embeddings_size,
        sha256=entry.embeddings_sha256,
        quiet=quiet,
    )
    checkpoint = download(
        directory / f"{entry.name}.pth",
        url=f"{mirror}/{entry.drive_id}" if mirror else None,
        drive_id=None if mirror else entry.drive_id,
        what=f"the {entry.title} checkpoint",
        size=entry.checkpoint_size,
        sha256=entry.checkpoint_sha256,
        quiet=quiet,
    )
    return checkpoint, npy


def card_for(entry: OriginalModel) -> dict[str, Any]:
    """Model-card facts: where the weights come from, and the authors' reported numbers."""
    release = entry.release
    numbers = {k: ("not in the source" if v is None else v) for k, v in entry.reported.items()}
    lines = [
        f"Converted from the authors' released checkpoint, Google-Drive file `{entry.drive_id}` "
        f"({entry.drive_url}), linked from the README of https://github.com/{release.repo} at "
        f"commit `{release.commit[:7]}`, with the text embeddings `{entry.embeddings}` of that "
        "commit. The conversion keeps every trained weight and checks every key; the numbers "
        "below are the authors' reported ones, not measured on this copy.",
    ]
    if entry.note:
        lines += ["", f"Known problems: {entry.note}"]
    return {
        "title": f"{release.model} (authors' weights, {entry.title})",
        "description": "\n".join(lines),
        "reported": {"source": release.reported_source, **numbers} if entry.reported else {},
        "source": {
            "repository": f"https://github.com/{release.repo}",
            "commit": release.commit,
            "setting": entry.name,
            "checkpoint": {
                "google_drive_id": entry.drive_id,
                "url": entry.drive_url,
                "size": entry.checkpoint_size or "unknown",
                "sha256": entry.checkpoint_sha256 or "unknown",
            },
            "text_embeddings": {
                "file": entry.embeddings,
                "url": release.embedding_url + entry.embeddings,
                "sha256": entry.embeddings_sha256 or "unknown",
            },
        },
    }


# -- cache ----------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$OTSEG_CACHE``, else ``otseg/`` in the Hugging Face home (``$HF_HOME``, else
    ``$XDG_CACHE_HOME/huggingface``, else ``~/.cache/huggingface``), read at call time."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(hf_home).expanduser() / "otseg"
