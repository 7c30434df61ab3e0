"""Shared pieces of the demo tests: tiny model directories, a served app, awkward image files."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from tests.factories import random_photo, save_tiny_clip, tiny_model


def tiny_dirs(root: Path) -> tuple[Path, Path]:
    """A random tiny open_clip directory and a tiny trained-format OTSeg (with a text tower
    built on it, so any class name works) saved next to it. Returns (clip_dir, model_dir)."""
    clip = save_tiny_clip(root / "clip")
    tiny_model(clip=f"local-dir:{clip}").save_pretrained(root / "model")
    return clip, root / "model"


@contextmanager
def served(loaded) -> Iterator[str]:
    """Serve the demo around ``loaded`` on a free localhost port; yields its URL."""
    from app.main import LAUNCH, build_demo
    from tests.browser import launched

    with launched(build_demo(loaded), **LAUNCH) as url:
        yield url


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def write_photo(path: Path, h: int = 96, w: int = 128, seed: int = 0, **save) -> Path:
    Image.fromarray(random_photo(h, w, seed)).save(path, **save)
    return path


def forged_size_jpeg(path: Path, width: int, height: int) -> Path:
    """A tiny JPEG whose header claims ``width``×``height`` (no pixel data is that big):
    what a reader must refuse before decoding."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")  # baseline frame header: FFC0 len(2) precision(1) H(2) W(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def forged_size_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR claims ``width``×``height`` (with a valid CRC)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (30, 200, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.find(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def big_jpeg(path: Path, side: int = 12000) -> Path:
    """A real ``side``² solid grayscale JPEG (small on disk, > the 50 MP decode limit)."""
    Image.new("L", (side, side), 90).save(path, "JPEG", quality=30)
    return path


def exif_rotated_jpeg(path: Path, h: int = 48, w: int = 96) -> Path:
    """A w×h JPEG with EXIF orientation 6 (display rotated 90° clockwise → h×w)."""
    img = Image.fromarray(random_photo(h, w, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, "JPEG", exif=exif.tobytes())
    return path


def sixteen_bit_png(path: Path) -> Path:
    ramp = np.linspace(0, 65535, 64 * 80, dtype=np.uint16).reshape(64, 80)
    Image.fromarray(ramp).save(path)  # mode I;16
    return path


def awkward_images(root: Path) -> dict[str, Path]:
    """Readable but unusual images, each of which the demo must segment."""
    root.mkdir(parents=True, exist_ok=True)
    rgb = random_photo(64, 80, 5)
    gray = root / "gray.png"
    Image.fromarray(rgb[..., 0]).save(gray)
    rgba = root / "rgba.png"
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(rgba)
    cmyk = root / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    return {
        "grayscale": gray,
        "rgba": rgba,
        "cmyk": cmyk,
        "16-bit": sixteen_bit_png(root / "16bit.png"),
        "exif-rotated": exif_rotated_jpeg(root / "exif.jpg"),
    }


# -- a stand-in for the ZeroGPU worker boundary ------------------------------------------------
def check_plain(value, where: str) -> None:
    """Fail unless ``value`` is made only of CPU tensors, arrays, strings, numbers and None
    (in tuples, lists or dicts): what may cross ZeroGPU's process boundary."""
    import torch

    if isinstance(value, list | tuple):
        for item in value:
            check_plain(item, where)
    elif isinstance(value, dict):
        for k, item in value.items():
            check_plain(k, where)
            check_plain(item, where)
    elif isinstance(value, torch.Tensor):
        assert value.device.type == "cpu", f"{where}: a {value.device} tensor"
    elif not isinstance(value, np.ndarray | str | int | float | bool | type(None)):
        raise AssertionError(f"{where}: a {type(value).__name__} crosses the GPU boundary")


def pickling_gpu(fn, calls: list[str]):
    """What ``spaces.GPU`` does to ``fn`` on ZeroGPU, minus the GPU: arguments and result are
    pickled and unpickled (the worker is another process) and must be plain data, and an
    exception in the worker arrives as its class name only."""
    import functools
    import pickle

    @functools.wraps(fn)
    def worker_call(*args, **kwargs):
        check_plain((args, kwargs), f"arguments of {fn.__name__}")
        args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # spaces re-raises only the class name of a worker's error
            raise RuntimeError(f"ZeroGPU worker error: {type(e).__name__}") from None
        check_plain(result, f"result of {fn.__name__}")
        calls.append(fn.__name__)
        return pickle.loads(pickle.dumps(result))

    return worker_call


def tiny_zegclip_dir(root: Path, clip: Path, seed: int = 7) -> Path:
    """A tiny ZegCLIP in the otseg format, with a text tower on the tiny CLIP at ``clip``."""
    import torch

    from otseg.config import tiny_config
    from otseg.data.prompts import ZEGCLIP_15
    from otseg.models.zegclip import build_zegclip, zegclip_config
    from otseg.weights.clip import load_clip

    torch.manual_seed(seed)
    config = zegclip_config(tiny_config(), ZEGCLIP_15[:2]).replace(
        clip_model=f"local-dir:{clip}", clip_pretrained=None
    )
    model, tokenizer = load_clip(config.clip_model)
    build_zegclip(config, clip=model, tokenizer=tokenizer).save_pretrained(root / "zegclip")
    return root / "zegclip"
