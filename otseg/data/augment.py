"""Train and test pipelines of the original configs (mmseg 0.24) in numpy and torch.

Train: Resize(img_scale, ratio 0.5–2.0, keep ratio) → RandomCrop(S, cat_max_ratio 0.75) →
RandomFlip(0.5) → PhotoMetricDistortion → Normalize (ImageNet) → Pad to S (image 0, label 255).
Test: resize the short side to ``resize_short`` (ADE20K: long side at most 2048) → Normalize;
the label keeps its original size.
All randomness comes from an explicit ``numpy.random.Generator``; no global RNG is touched.
Images are RGB here (mmseg works in BGR; every step below is channel-order independent).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import IMAGENET_MEAN, IMAGENET_STD, OTSegConfig

IGNORE = 255


def rescale_size(h: int, w: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv ``imrescale`` size: the largest (h', w') with the aspect ratio kept that fits
    ``scale`` = (long edge, short edge) limits; rounding ``int(x * factor + 0.5)``."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (half-pixel centres, no antialias, like cv2) of uint8 (H, W, 3) → uint8."""
    if image.shape[:2] == tuple(size):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize (source index ⌊i·in/out⌋, like cv2) of a (H, W) label map; dtype kept."""
    if label.shape == tuple(size):
        return label
    x = torch.from_numpy(np.ascontiguousarray(label)).to(torch.uint8)[None, None]
    return F.interpolate(x, size=size, mode="nearest")[0, 0].numpy().astype(label.dtype)


def random_rescale(
    image: np.ndarray,
    label: np.ndarray,
    img_scale: Sequence[int],
    ratio_range: Sequence[float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``Resize(img_scale, ratio_range, keep_ratio=True)``: the scale is
    ``int(img_scale · r)`` with r ~ U(ratio_range); the image is fitted inside it."""
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    scale = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
    size = rescale_size(*image.shape[:2], scale)
    return resize_image(image, size), resize_label(label, size)


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    crop: int,
    rng: np.random.Generator,
    cat_max_ratio: float = 0.75,
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``RandomCrop``: a crop×crop window (smaller images are not padded here). Up to 10
    windows are tested; one is kept when it holds >1 non-ignore class and the most frequent
    covers < ``cat_max_ratio`` of the non-ignore pixels; else the 11th window drawn is used."""
    h, w = label.shape

    def window() -> tuple[int, int]:
        y = int(rng.integers(0, max(h - crop, 0) + 1))
        return y, int(rng.integers(0, max(w - crop, 0) + 1))

    y, x = window()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            counts = np.bincount(label[y : y + crop, x : x + crop].ravel(), minlength=256)[:IGNORE]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = window()
    return image[y : y + crop, x : x + crop], label[y : y + crop, x : x + crop]


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB → uint8 HSV with OpenCV's 8-bit ranges (H 0..179 = degrees / 2, S, V 0..255)."""
    rgb = image.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v, diff = rgb.max(-1), rgb.max(-1) - rgb.min(-1)
    s = np.floor(diff * 255.0 / np.maximum(v, 1) + 0.5)
    hue = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = np.floor(hue * 30.0 / np.maximum(diff, 1) + 0.5)
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], -1).astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv` (OpenCV's ``HSV2RGB`` for 8-bit images)."""
    h = hsv[..., 0].astype(np.float32) / 30.0
    s, v = hsv[..., 1].astype(np.float32) / 255.0, hsv[..., 2].astype(np.float32) / 255.0
    sector = np.floor(h)
    f = h - sector
    sector = sector.astype(np.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([v, p, q, t], -1)  # (H, W, 4)
    # for each sector: indices into (v, p, q, t) of r, g, b
    order = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
    rgb = np.take_along_axis(table, order[sector], axis=-1)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: int = 32,
    contrast: tuple[float, float] = (0.5, 1.5),
    saturation: tuple[float, float] = (0.5, 1.5),
    hue: int = 18,
) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on uint8 (H, W, 3): brightness, contrast (first or last,
    50/50), saturation, hue; each applied with probability 0.5."""
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness, brightness))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast))
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation))
        image = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue, hue)) % 180
        image = hsv_to_rgb(hsv)
    if mode == 0 and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast))
    return image


def normalize(
    image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 (H, W, 3) RGB → float32 (3, H, W), (x − mean) / std with 0..255-scale stats."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    return (x - mean_t) / torch.tensor(std, dtype=torch.float32)[:, None, None]


def pad_to(
    image: torch.Tensor, label: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (3, h, w) image with 0 and (h, w) label with 255 at the bottom/right to (size, size)."""
    ph, pw = max(size - image.shape[1], 0), max(size - image.shape[2], 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE)
    return image, label


class TrainTransform:
    """The training pipeline; ``__call__(sample, rng)`` returns ``{"image": float32 (3, S, S),
    "label": int64 (S, S) (255 = ignore), "path": str}``."""

    def __init__(
        self,
        crop_size: int,
        img_scale: Sequence[int] = (2048, 512),
        *,
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.crop_size, self.img_scale = crop_size, tuple(img_scale)
        self.ratio_range, self.cat_max_ratio = tuple(ratio_range), cat_max_ratio
        self.flip_prob, self.photometric = flip_prob, photometric
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def for_config(
        cls,
        config: OTSegConfig,
        img_scale: Sequence[int],
        **kwargs: Any,
    ) -> TrainTransform:
        """Crop S = ``config.vision.image_size`` and the config's normalisation stats."""
        return cls(
            config.vision.image_size,
            img_scale,
            mean=config.pixel_mean,
            std=config.pixel_std,
            **kwargs,
        )

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image, label = sample["image"], sample["label"]
        image, label = random_rescale(image, label, self.img_scale, self.ratio_range, rng)
        image, label = random_crop(image, label, self.crop_size, rng, self.cat_max_ratio)
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image, rng)
        label_t = torch.from_numpy(np.ascontiguousarray(label)).long()
        image_t, label_t = pad_to(normalize(image, self.mean, self.std), label_t, self.crop_size)
        return {"image": image_t, "label": label_t, "path": sample["path"]}


class EvalTransform:
    """Short side → ``resize_short`` (bilinear), normalise. Returns ``{"image": float32
    (3, h', w'), "label": int64 (H, W) at the original size, "path", "ori_size": (H, W)}``.

    ``max_long``: also cap the long side, mmcv's ``imrescale((max_long, resize_short))`` (the
    original's ADE20K test Resize: images wider than ``max_long / resize_short`` get a shorter
    short side). None: the short side is always ``resize_short`` (the VOC, Context and COCO
    test Resize with ``min_size``).
    """

    def __init__(
        self,
        resize_short: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        max_long: int | None = None,
    ) -> None:
        self.resize_short, self.mean, self.std = resize_short, tuple(mean), tuple(std)
        self.max_long = max_long

    @classmethod
    def for_config(cls, config: OTSegConfig, *, max_long: int | None = None) -> EvalTransform:
        return cls(config.resize_short, config.pixel_mean, config.pixel_std, max_long=max_long)

    def size(self, h: int, w: int) -> tuple[int, int]:
        """The test size (h', w') of an H×W image."""
        if self.max_long is not None:
            return rescale_size(h, w, (self.max_long, self.resize_short))
        factor = self.resize_short / min(h, w)
        return int(h * factor + 0.5), int(w * factor + 0.5)

    def __call__(
        self,
        sample: dict[str, Any],
        rng: np.random.Generator | None = None,
    ) -> dict[str, Any]:
        image = sample["image"]
        h, w = image.shape[:2]
        image = resize_image(image, self.size(h, w))
        return {
            "image": normalize(image, self.mean, self.std),
            "label": torch.from_numpy(np.ascontiguousarray(sample["label"])).long(),
            "path": sample["path"],
            "ori_size": (h, w),
        }


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors of equal shape along a new batch dim; anything else becomes a list."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [sample[key] for sample in batch]
        same = all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values)
        out[key] = torch.stack(values) if same else values
    return out
