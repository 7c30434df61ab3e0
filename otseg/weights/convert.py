"""Convert an original OTSeg (mmseg) checkpoint and its text-embedding ``.npy`` to our format;
the authors' released checkpoints (:mod:`otseg.weights.original`) are downloaded, converted and
cached here too.

    otseg convert iter_20000.pth --text-embeddings voc12_otseg.npy \\
        --preset voc-inductive --output otseg-voc-inductive [--push-to-hub org/name]
    otseg convert --original coco-transductive --output otseg-coco-transductive
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from .. import progress, registry
from ..config import PRESETS, OTSegConfig
from ..errors import CheckpointError, UserError, WeightsNotFoundError, fail
from ..nn.clip_image import PromptedViT
from .clip import load_clip
from .download import DownloadError
from .original import (
    ZEGCLIP_PREFIX,
    OriginalModel,
    cache_root,
    card_for,
    fetch,
    get_released,
)
from .store import load_weights

# Original prefix → ours. Everything else must be dropped explicitly below.
RENAMES = (
    ("backbone.", "image_encoder."),
    ("decode_head.decoder_1.layers.", "decoder.layers."),
    ("decode_head.q_proj.", "decoder.q_proj."),
)
# Never used by the original at inference or an unused loss buffer.
DROPPED = ("text_encoder.", ".self_attn.", ".norm1.", "decode_head.loss_decode.")


def _numpy_data_globals() -> list:
    """What ``torch.load(weights_only=True)`` may build from numpy: arrays, dtypes and scalars,
    under the names numpy 2 pickles them with and the ``numpy.core`` names of numpy 1.x (the
    mmcv era). Data constructors only: no numpy function that reads files or runs code."""
    import importlib

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
    dtype_classes = {type(np.dtype(t)) for t in set(np.sctypeDict.values())}
    named = [
        (fn, f"{module}.{fn.__name__}")
        for fn in (multiarray.scalar, multiarray._reconstruct)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    ]
    return [np.ndarray, np.dtype, *sorted(dtype_classes, key=str), *named]


NUMPY_DATA_GLOBALS = _numpy_data_globals()


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an mmcv checkpoint (``{'meta', 'state_dict', ...}``) or a bare one.

    Read with ``torch.load(weights_only=True)``: tensors, plain Python values and numpy data
    (the numpy scalars and arrays mmcv-era checkpoints keep in ``meta``, ``optimizer`` or hook
    state, see :data:`NUMPY_DATA_GLOBALS`); any other global (code) is refused.
    """
    try:
        with torch.serialization.safe_globals(NUMPY_DATA_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as e:  # torch's multi-paragraph advice to drop weights_only
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f": it refers to {found.group(1)}, which is not data" if found else ""
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint of tensors (torch.load(weights_only=True) "
            f"refused it{what})"
        ) from None
    except Exception as e:  # other unpickling errors have many types
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return state


def map_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename original keys to ours; returns (renamed, dropped keys). Unknown keys raise."""
    out, dropped, unknown = {}, [], []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if any(d in key or key.startswith(d) for d in DROPPED):
            dropped.append(key)
            continue
        for old, new in RENAMES:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            unknown.append(key)
    if not any(k.startswith("image_encoder.") for k in out) or not any(
        k.startswith("decoder.") for k in out
    ):
        raise CheckpointError(
            "this is not an OTSeg/ZegCLIP checkpoint: it has no 'backbone.*' and 'decode_head.*' "
            f"weights (first keys: {list(state)[:4]})"
        )
    if unknown:
        raise CheckpointError(f"unknown checkpoint keys ({len(unknown)}): {unknown[:6]}")
    return out, dropped


def read_text_embeddings(path: str | Path, config: OTSegConfig) -> dict[str, torch.Tensor]:
    """The original (K, N, C) ``.npy`` as a name → (N, C) bank, values kept as stored (fp16).
    A model with one prompt per class (ZegCLIP) also takes ZegCLIP's (K, C) files."""
    try:
        arr = np.load(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read text embeddings {path} ({e})") from None
    if arr.ndim == 2 and config.num_prompts == 1:
        arr = arr[:, None, :]
    want = (len(config.class_names), config.num_prompts, config.vision.embed_dim)
    if arr.ndim != 3 or arr.shape != want:
        hint = ""
        if arr.ndim == 3 and arr.shape[0] != want[0]:
            hint = (
                f" — it has {arr.shape[0]} classes; the model has {want[0]} "
                "(the original VOC transductive/fully configs name context_otseg.npy by mistake, "
                "use voc12_otseg.npy)"
            )
        raise CheckpointError(
            f"text embeddings {path} have shape {arr.shape}, expected {want}{hint}"
        )
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return {name: t[i] for i, name in enumerate(config.class_names)}


def convert_checkpoint(
    checkpoint: str | Path | dict[str, torch.Tensor],
    config: OTSegConfig,
    text_embeddings: str | Path,
) -> nn.Module:
    """An OTSeg model with the original weights. With ``config.clip_model`` set, the frozen
    image tower of the checkpoint is checked for shape and then left to open_clip."""
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    renamed, _ = map_keys(state)
    bank = read_text_embeddings(text_embeddings, config)
    model = registry.build(config, text_bank=bank)
    full = model.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)}, config {tuple(full[k].shape)}"
        for k, v in renamed.items()
        if k in full and full[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(
            "the checkpoint does not match the chosen config (wrong --preset?):\n  "
            + "\n  ".join(wrong[:8])
        )
    keep = set(model.trained_state_dict())
    extra = sorted(k for k in renamed if k not in keep and k not in full)
    if extra:
        raise CheckpointError(f"checkpoint keys with no place in the model: {extra[:6]}")
    load_weights(model, {k: v for k, v in renamed.items() if k in keep}, "checkpoint")
    return model.eval()


# -- the authors' released checkpoints ------------------------------------------------------
def build_original(
    entry: OriginalModel, workdir: Path, *, keep_clip: bool = False, quiet: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Download into ``workdir``, verify, convert (strict key check); returns (model, card)."""
    checkpoint, npy = fetch(entry, workdir, quiet=quiet)
    if _broken_zip(checkpoint):
        raise DownloadError(
            f"the downloaded {entry.title} checkpoint is an incomplete zip archive (the "
            "transfer was cut short); run the command again"
        )
    progress.report(f"Converting the {entry.title} checkpoint")
    try:
        state = read_checkpoint(checkpoint)
    except CheckpointError as e:
        reason = str(e).splitlines()[0].replace(str(checkpoint), "it")
        raise CheckpointError(f"the downloaded {entry.title} checkpoint: {reason}") from None
    config = entry.config
    if keep_clip:
        config = dataclasses.replace(config, clip_model=None, clip_pretrained=None)
    model = convert_checkpoint(state, config, npy)
    card = card_for(entry)
    if config.clip_model is not None:
        progress.report("Checking the checkpoint's image tower against open_clip's")
        card["image_tower_check"] = check_image_tower(state, config)
    return model, card


def _broken_zip(path: Path) -> bool:
    """A zip archive (PyTorch's format since 1.6) whose directory or CRCs do not check out."""
    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            return False  # not a zip: left to torch.load
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is not None
    except zipfile.BadZipFile:
        return True


TOWER_TOLERANCE = 1e-4


def check_image_tower(state: dict[str, torch.Tensor], config: OTSegConfig) -> dict[str, Any]:
    """Compare the checkpoint's frozen image tower with the open_clip tower the converted model
    will load instead; warns when they differ (then ``--keep-clip`` keeps the authors' tower)."""

    against = f"{config.clip_model} / {config.clip_pretrained}"
    try:
        clip, _ = load_clip(config.clip_model, config.clip_pretrained)
    except (WeightsNotFoundError, RuntimeError, ValueError) as e:
        return {"against": against, "result": f"not checked ({type(e).__name__})"}
    renamed, _ = map_keys(state)
    tower = PromptedViT(config.vision, clip.visual).state_dict()
    diffs = {
        k: (renamed[f"image_encoder.{k}"].float() - v.float()).abs().max().item()
        for k, v in tower.items()
        if "prompt" not in k
    }
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > TOWER_TOLERANCE:
        warnings.warn(
            f"the checkpoint's frozen image tower differs from {against} by up to "
            f"{diffs[worst]:.2g} (at {worst}); the converted model uses the open_clip tower, "
            "convert with --keep-clip to keep the authors' one",
            stacklevel=2,
        )
    return {"against": against, "max_abs_diff": diffs[worst], "at": worst}


def cached(name: str, *, quiet: bool = False) -> Path:
    """The converted directory of ``original:<setting>`` or ``zegclip:<setting>`` (a bare
    setting is OTSeg's): from the cache, else downloaded and converted once (built in a
    temporary folder, renamed into place only when complete)."""
    entry = get_released(name)
    root = cache_root() / entry.release.family
    final = root / entry.name
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{entry.name}.lock")):
        if (final / "config.json").is_file():  # another process finished it meanwhile
            return final
        work = root / f".{entry.name}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            (work / "download").mkdir(parents=True)
            model, card = build_original(entry, work / "download", quiet=quiet)
            progress.report("Saving the converted model to the cache")
            model.save_pretrained(work / "model", card=card)
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover, if any
            os.replace(work / "model", final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


# -- command line ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .original import available

    p = argparse.ArgumentParser(prog="otseg convert", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="original OTSeg checkpoint (.pth)")
    p.add_argument("--text-embeddings", help="its prompt embeddings (.npy, K×N×C)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="model preset of the checkpoint")
    src.add_argument("--config", help="an OTSegConfig as JSON (for non-standard sizes)")
    p.add_argument(
        "--original",
        metavar="SETTING",
        help="download and convert the authors' released OTSeg model instead: "
        + ", ".join(available()),
    )
    p.add_argument(
        "--zegclip",
        metavar="SETTING",
        help="download and convert ZegCLIP's released model instead: "
        + ", ".join(available(ZEGCLIP_PREFIX)),
    )
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument(
        "--keep-clip",
        action="store_true",
        help="store the checkpoint's frozen image tower too (no open_clip download needed; "
        "without a text tower only the stored class names can be used)",
    )
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    args = p.parse_args(argv)
    local = {
        "CHECKPOINT": args.checkpoint,
        "--text-embeddings": args.text_embeddings,
        "--preset/--config": args.preset or args.config,
    }
    if args.original and args.zegclip:
        fail("give --original or --zegclip, not both")
    released = "--original" if args.original else "--zegclip" if args.zegclip else None
    if released and any(local.values()):
        given = ", ".join(k for k, v in local.items() if v)
        fail(f"{released} brings its own checkpoint, embeddings and preset; drop {given}")
    missing = [k for k, v in local.items() if not v]
    if not released and missing:
        fail(f"give {', '.join(missing)}, or --original SETTING, or --zegclip SETTING")
    return args


def _convert_local(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    if args.preset:
        config = registry.get_preset(args.preset)
    else:
        try:
            config = OTSegConfig.from_dict(json.loads(Path(args.config).read_text()))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(
                f"--config {args.config} is not an OTSegConfig JSON file ({e})"
            ) from None
    if args.keep_clip:
        config = dataclasses.replace(config, clip_model=None, clip_pretrained=None)
    model = convert_checkpoint(args.checkpoint, config, args.text_embeddings)
    card = {
        "source": {
            "checkpoint": Path(args.checkpoint).name,
            "text_embeddings": Path(args.text_embeddings).name,
        }
    }
    return model, card


def _convert_original(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    import tempfile

    ref = f"{ZEGCLIP_PREFIX}{args.zegclip}" if args.zegclip else args.original
    entry = get_released(ref)
    parent = Path(args.output).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".otseg-download-", dir=parent) as work:
        return build_original(entry, Path(work), keep_clip=args.keep_clip)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        released = args.original or args.zegclip
        model, card = _convert_original(args) if released else _convert_local(args)
    except (UserError, WeightsNotFoundError) as e:  # CheckpointError is a UserError
        print(f"error: {e}", file=sys.stderr)  # a key mismatch report spans several lines
        return 2
    out = model.save_pretrained(args.output, card=card)
    n = sum(v.numel() for v in model.trained_state_dict().values())
    print(f"wrote {out} ({n:,} stored parameters, {len(model.text.bank)} stored class names)")
    if args.push_to_hub:
        print(model.push_to_hub(args.push_to_hub, card=card, private=args.private))
    return 0


if __name__ == "__main__":
    from otseg.errors import run

    run(main)
