"""Image in → normalised tensor at the test scale; checks that turn bad input into clear errors."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

MIN_SIDE = 16  # one ViT patch
MAX_PIXELS = 50_000_000  # decoded size limit; larger JPEGs are decoded at a reduced scale
MAX_ASPECT = 10.0

ImageLike = str | Path | bytes | Image.Image | np.ndarray


class ImageError(UserError):
    """The input cannot be used as an image; the message says why and what to do."""


def load_image(image: ImageLike, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a path, bytes, PIL image or array into (H, W, 3) uint8 RGB.

    Handles EXIF rotation, grayscale, palette, CMYK, 16-bit and float images, and alpha
    (composited on white). Refuses images that are too small, too elongated or too large to
    decode (JPEGs are first decoded at a reduced scale when that brings them under the limit).
    """
    if isinstance(image, np.ndarray):
        return _check(_array_to_rgb(image))
    if isinstance(image, Image.Image):
        return _check(_pil_to_rgb(ImageOps.exif_transpose(image)))
    if isinstance(image, bytes | bytearray):
        if not image:
            raise ImageError("the file is empty (0 bytes)")
        src = io.BytesIO(image)
    elif not isinstance(image, str | Path):
        raise ImageError(
            "an image must be a file path, bytes, a PIL image or an (H, W[, 3|4]) array, "
            f"got {type(image).__name__}"
        )
    else:
        path = Path(image)
        if path.is_dir():
            raise ImageError(f"not an image file but a directory: {path}")
        if not path.is_file():
            raise ImageError(f"no such image file: {path}")
        if path.stat().st_size == 0:
            raise ImageError(f"the file is empty (0 bytes): {path.name}")
        src = path
    try:
        with Image.open(src) as img:
            w, h = img.size
            if w * h > max_pixels:
                if img.format == "JPEG":  # DCT-domain downscale by 2, 4 or 8 while decoding
                    f = next((f for f in (2, 4, 8) if (w // f) * (h // f) <= max_pixels), 8)
                    img.draft("RGB", (w // f, h // f))
                if img.size[0] * img.size[1] > max_pixels:
                    raise ImageError(
                        f"the image is {w}×{h} px ({w * h / 1e6:.0f} MP); the limit is "
                        f"{max_pixels / 1e6:.0f} MP — downscale it first"
                    )
            img.load()
            return _check(_pil_to_rgb(ImageOps.exif_transpose(img)))
    except Image.DecompressionBombError as e:  # Pillow refuses > ~179 MP before we can look
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)) / 1e6:.0f} MP" if found else "too many pixels"
        raise ImageError(
            f"the image has {size}; the limit is {max_pixels / 1e6:.0f} MP — downscale it first"
        ) from None
    except UnidentifiedImageError as e:
        raise ImageError(f"not a readable image ({_without_reprs(e)})") from None
    except OSError as e:
        raise ImageError(f"the image file is corrupt or truncated ({_without_reprs(e)})") from None


def _without_reprs(error: Exception) -> str:
    """Pillow's message without Python object reprs (``<_io.BytesIO object at 0x…>``)."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(error)).strip()


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _array_to_rgb(np.array(img))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(img.convert("RGB"))


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16 or (a.dtype.kind in "iu" and a.max(initial=0) > 255):
        a = (a.astype(np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ImageError("the image array contains NaN or infinite values")
        a = a * 255.0 if a.max(initial=0.0) <= 1.0 else a
        a = a.round().clip(0, 255).astype(np.uint8)
    else:
        a = a.astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        a = (a[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(a)


def _check(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageError(f"the image is {w}×{h} px; each side needs at least {MIN_SIDE} px")
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise ImageError(
            f"the image is {w}×{h} px; aspect ratios above {MAX_ASPECT:.0f}:1 are not supported "
            "— crop it first"
        )
    return rgb


def resized_size(h: int, w: int, short_side: int) -> tuple[int, int]:
    """Size with the short side scaled to ``short_side`` (mmcv ``imrescale`` rounding)."""
    scale = short_side / min(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def to_model_input(
    rgb: np.ndarray,
    short_side: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, H', W') float32 normalised, short side ``short_side``.

    Bilinear without antialiasing and rounded to 8 bits, like the original cv2 pipeline.
    """
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    size = resized_size(*rgb.shape[:2], short_side)
    if size != tuple(rgb.shape[:2]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = x.round().clamp(0, 255)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class ModelInput:
    """An image decoded and normalised for a model, e.g. in a loader thread ahead of the model
    (:func:`prepare`); the predictor and the server take it in place of an image."""

    rgb: np.ndarray  # (H, W, 3) uint8 as decoded: the size of the label map
    x: torch.Tensor  # (1, 3, H', W') float32 normalised, short side ``config.resize_short``


def prepare(image: ImageLike | ModelInput, config: Any) -> ModelInput:
    """Decode ``image`` (see :func:`load_image`) and scale and normalise it as ``config`` says
    (``resize_short``, ``pixel_mean``, ``pixel_std``); a :class:`ModelInput` is returned as is."""
    if isinstance(image, ModelInput):
        return image
    rgb = load_image(image)
    return ModelInput(
        rgb, to_model_input(rgb, config.resize_short, config.pixel_mean, config.pixel_std)
    )
