"""What ``otseg segment`` reads and writes: the images named on the command line, each image's
output files, the run summary, and which images a previous run finished.

For an image ``DIR/trip/photo.jpg`` given as ``DIR``, the outputs under ``--out`` are
``trip/photo.labels.png`` (pixel value = class index; a palette PNG up to 256 classes),
``trip/photo.overlay.jpg``, with ``--masks`` ``trip/photo.masks/NN-name.png`` (0/255, one per
class present) and ``trip/photo.json`` (classes, seen/novel, pixel shares, settings), written
last: a JSON marks a finished image. Every file goes to a temporary name and is renamed into
place, so an interruption leaves no partial file. ``summary.csv``/``summary.jsonl``: one row
per image of the run.
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import __version__
from .draw import class_shares, label_png_bytes, overlay, palette, to_hex
from .errors import UserError
from .inference.batch import Segmented

IMAGE_EXTENSIONS = frozenset(
    [
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
    ]
)
LIST_EXTENSIONS = frozenset((".txt", ".lst", ".list"))
TMP_SUFFIX = ".otseg-tmp"
SUMMARY_CSV, SUMMARY_JSONL = "summary.csv", "summary.jsonl"
STATUSES = ("segmented", "already done", "failed")  # of an image in the run summary


# -- inputs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One image to segment and where its outputs go."""

    path: Path  # the image file, as found
    key: str  # its outputs' path under --out without suffix, "/"-separated ("trip/photo")

    def output(self, out: Path, suffix: str) -> Path:
        return out / f"{self.key}{suffix}"


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def collect_inputs(specs: Sequence[str], *, exclude: Path | None = None) -> list[Job]:
    """The images named by ``specs``, each an image file (any extension: a bad one is reported
    when it is read), a folder (searched recursively for image extensions, hidden entries
    skipped), a glob (``"photos/**/*.jpg"``, for shells that do not expand it) or a text file
    (``.txt``/``.lst``/``.list``) of paths, one per line, relative to the file's folder.

    Outputs mirror the paths below the folder, glob prefix or common folder of a list; files
    under ``exclude`` (the output folder) are not inputs. The same file named twice is taken
    once. Raises a UserError for a spec that names nothing, and for two images that would write
    the same outputs.
    """
    exclude = exclude.resolve() if exclude is not None else None
    found: list[tuple[Path, Path]] = []  # (file, the folder its outputs are named from)
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = [f for f in _folder_images(path) if not _under(f, exclude)]
            if not files:
                raise UserError(
                    f"{spec}: no image files in this folder (looked for "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            found += [(f, path) for f in files]
        elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            found += _listed(path)
        elif path.is_file():
            found.append((path, path.parent))
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file() and is_image_name(Path(m))]
            files = [f for f in files if not _under(f, exclude)]
            if not files:
                raise UserError(f"{spec}: the pattern matches no image file")
            found += [(f, _glob_root(spec)) for f in files]
        else:
            raise UserError(f"{spec}: no such file or folder, and not a pattern that matches one")
    seen: set[Path] = set()
    unique = []
    for file, root in found:
        if (resolved := file.resolve()) not in seen:
            seen.add(resolved)
            unique.append((file, root))
    return _name_outputs(unique)


def _folder_images(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and is_image_name(Path(name)):
                files.append(Path(dirpath) / name)
    return files


def _under(file: Path, folder: Path | None) -> bool:
    return folder is not None and file.resolve().is_relative_to(folder)


def _glob_root(pattern: str) -> Path:
    """The folder of a pattern's part before its first wildcard ("a/b*/c.jpg" → "a")."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), parts))
    return Path(*fixed) if fixed else Path(".")


def _listed(list_file: Path) -> list[tuple[Path, Path]]:
    lines = list_file.read_text(encoding="utf-8").splitlines()
    paths = [line.strip() for line in lines]
    folder = list_file.parent.absolute()
    files = [
        Path(os.path.normpath(folder / Path(p).expanduser()))
        for p in paths
        if p and not p.startswith("#")
    ]
    if not files:
        raise UserError(f"{list_file}: the list names no image file")
    root = Path(os.path.commonpath([f.parent for f in files]))
    return [(f, root) for f in files]


def _name_outputs(found: list[tuple[Path, Path]]) -> list[Job]:
    """Output keys: the path below its root without the suffix ("trip/photo"), or with it
    ("trip/photo.png") where two images would otherwise share a key."""
    rel = [file.absolute().relative_to(root.absolute()) for file, root in found]
    plain = [r.with_suffix("").as_posix() for r in rel]
    counts: dict[str, int] = {}
    for key in plain:
        counts[key] = counts.get(key, 0) + 1
    keys = [r.as_posix() if counts[k] > 1 else k for r, k in zip(rel, plain, strict=True)]
    owner: dict[str, Path] = {}
    for (file, _), key in zip(found, keys, strict=True):
        if key in owner:
            raise UserError(
                f"{owner[key]} and {file} would write the same outputs ({key}.*); segment them "
                "into different --out folders"
            )
        owner[key] = file
    return [Job(file, key) for (file, _), key in zip(found, keys, strict=True)]


# -- vocabulary -----------------------------------------------------------------------------
def parse_names(text: str) -> list[str]:
    """Class names separated by commas or newlines; blank entries and ``#`` lines dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [n.strip() for n in re.split(r"[,\n]", "\n".join(lines)) if n.strip()]


# -- writing --------------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place: readers see
    the old file or the whole new one, and an interruption leaves no partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _file_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._")[:60] or "class"


def write_outputs(
    job: Job, out: Path, result: Segmented, settings: dict, *, overlay_jpeg: bool, masks: bool
) -> dict:
    """Write one image's files (its JSON last) and return its summary record."""
    labels = result.labels
    pred = result.prediction
    names = pred.class_names
    colors = palette(len(names))
    shares = class_shares(labels, len(names))
    stem = Path(job.key).name
    outputs: dict[str, Any] = {"labels": f"{stem}.labels.png"}
    write_atomic(job.output(out, ".labels.png"), label_png_bytes(labels, colors))
    if overlay_jpeg:
        drawn = overlay(result.image, labels, colors, settings["opacity"])
        write_atomic(job.output(out, ".overlay.jpg"), _jpeg(drawn))
        outputs["overlay"] = f"{stem}.overlay.jpg"
    if masks:
        outputs["masks"] = {}
        for k in np.flatnonzero(shares):
            rel = f"{stem}.masks/{k:0{len(str(len(names) - 1))}d}-{_file_name(names[k])}.png"
            mask = Image.fromarray(((labels == k) * 255).astype(np.uint8))
            write_atomic(out / Path(job.key).parent / rel, _png(mask))
            outputs["masks"][names[k]] = rel
    h, w = labels.shape
    info = {
        "input": str(job.path),
        "image_size": [w, h],
        "segmented_size": [pred.labels.shape[1], pred.labels.shape[0]],
        "classes": [
            {
                "id": k,
                "name": n,
                "color": to_hex(colors[k]),
                "seen": bool(pred.seen[k]),
                "share": round(float(shares[k]), 4),
            }
            for k, n in enumerate(names)
        ],  # fmt: skip
        "outputs": outputs,
        "settings": settings,
        "otseg_version": __version__,
    }
    write_atomic(job.output(out, ".json"), json.dumps(info, indent=2, ensure_ascii=False).encode())
    return record(job, "segmented", info)


def record(job: Job, status: str, info: dict | None = None, reason: str = "") -> dict:
    """One row of the run summary."""
    return {
        "input": str(job.path),
        "status": status,
        "reason": reason,
        "json": f"{job.key}.json" if info else "",
        "image_size": info["image_size"] if info else None,
        "shares": {c["name"]: c["share"] for c in info["classes"]} if info else {},
    }


def sweep_temporary(out: Path) -> None:
    """Remove temporary files a killed run left behind (only this tool's, by their suffix)."""
    if out.is_dir():
        for tmp in out.rglob(f"*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


def write_summary(out: Path, records: list[dict], names: Sequence[str]) -> None:
    """``summary.jsonl`` (one record per image) and ``summary.csv`` (the same, one share column
    per class), in input order."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_atomic(out / SUMMARY_JSONL, lines.encode())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["input", "status", "reason", "json", "width", "height"]
                    + [f"share:{n}" for n in names])  # fmt: skip
    for r in records:
        w, h = r["image_size"] or ("", "")
        writer.writerow([r["input"], r["status"], r["reason"], r["json"], w, h]
                        + [r["shares"].get(n, "") for n in names])  # fmt: skip
    write_atomic(out / SUMMARY_CSV, buffer.getvalue().encode())


# -- resuming -------------------------------------------------------------------------------
def plan(
    jobs: list[Job], out: Path, settings: dict, *, overlay_jpeg: bool, masks: bool, overwrite: bool
) -> tuple[dict[int, dict], list[int]]:
    """Which images are finished (index → summary record, from their JSON) and which to do.

    An image is finished when its JSON has the same settings and names every requested output,
    and those files exist. A JSON with other settings is refused (UserError) unless
    ``overwrite``: a run never silently replaces results made differently.
    """
    done: dict[int, dict] = {}
    todo: list[int] = []
    differ: list[tuple[Job, dict]] = []
    wanted = ["labels"] + (["overlay"] if overlay_jpeg else []) + (["masks"] if masks else [])
    expected = json.loads(json.dumps(settings))  # as it reads back from a JSON
    for i, job in enumerate(jobs):
        info = None if overwrite else _read_json(job.output(out, ".json"))
        if info is None:
            todo.append(i)
        elif info.get("settings") != expected:
            differ.append((job, info.get("settings") or {}))
        elif all(k in info["outputs"] for k in wanted) and _outputs_exist(job, out, info):
            done[i] = record(job, "already done", info)
        else:
            todo.append(i)
    if differ:
        job, old = differ[0]
        changed = [k for k in expected if old.get(k) != expected[k]]
        raise UserError(
            f"{len(differ)} image(s) in {out} were segmented with other settings "
            f"({', '.join(changed)} differ in {job.key}.json); pass --overwrite to redo them, "
            "or choose another --out"
        )
    return done, todo


def _read_json(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("outputs"), dict) else None


def _outputs_exist(job: Job, out: Path, info: dict) -> bool:
    folder = job.output(out, "").parent
    files = [v for k, v in info["outputs"].items() if k != "masks"]
    files += list(info["outputs"].get("masks", {}).values())
    return all((folder / f).is_file() for f in files)
