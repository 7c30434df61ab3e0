"""A tiny synthetic segmentation dataset written to disk in the benchmark layouts, for tests.

Each class is a distinct shape in a distinct saturated colour ("red disc", "green square", ...);
images hold 1–3 objects of different classes at random positions and sizes on a noisy grey
background. Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed writes
byte-identical files. The background is not a class (VOC/Context store it as 0 and drop it with
``reduce_zero_label``; COCO/custom layouts store 255), so after reading, every layout yields the
same labels: 0..K-1 for objects, 255 elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

SYNTHETIC_CLASSES = (
    "red disc", "green square", "blue triangle", "yellow cross", "magenta ring",
    "cyan diamond", "orange bar", "white ellipse",
)  # fmt: skip
_COLOURS = np.array([
    (220, 30, 30), (30, 200, 40), (40, 60, 230), (235, 220, 30), (220, 40, 220),
    (30, 220, 220), (245, 140, 20), (250, 250, 250),
])  # fmt: skip
LAYOUTS = ("voc", "context", "coco", "ade", "custom")


def _shape_mask(
    kind: int,
    yy: np.ndarray,
    xx: np.ndarray,
    cy: float,
    cx: float,
    r: float,
) -> np.ndarray:
    """Boolean mask of shape ``kind`` centred at (cy, cx) with size ``r`` (pixels)."""
    dy, dx = yy - cy, xx - cx
    if kind == 0:  # disc
        return dy**2 + dx**2 <= r**2
    if kind == 1:  # square
        return (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
    if kind == 2:  # upward triangle
        return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))
    if kind == 3:  # plus-shaped cross
        arm = 0.3 * r
        return ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    if kind == 4:  # ring
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == 5:  # diamond
        return np.abs(dy) + np.abs(dx) <= r
    if kind == 6:  # horizontal bar
        return (np.abs(dy) <= 0.35 * r) & (np.abs(dx) <= 1.2 * r)
    return (dy / (0.6 * r)) ** 2 + (dx / r) ** 2 <= 1  # ellipse


def render_sample(
    rng: np.random.Generator,
    size: tuple[int, int],
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One image uint8 (H, W, 3) and its label uint8 (H, W): class id 0..K-1 or 255 (background)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grey = rng.uniform(70, 180)
    ramp = rng.uniform(-30, 30) * (xx / w - 0.5) + rng.uniform(-30, 30) * (yy / h - 0.5)
    image = grey + ramp[..., None] + rng.normal(0, 10, (h, w, 3))
    label = np.full((h, w), 255, np.uint8)
    count = int(rng.integers(1, min(3, num_classes) + 1))
    for cls in rng.choice(num_classes, size=count, replace=False):
        r = rng.uniform(0.16, 0.3) * min(h, w)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        mask = _shape_mask(int(cls) % len(_COLOURS), yy, xx, cy, cx, r)
        image[mask] = _COLOURS[cls % len(_COLOURS)] + rng.normal(0, 8, (int(mask.sum()), 3))
        label[mask] = cls
    return np.clip(image, 0, 255).astype(np.uint8), label


def _boundary(label: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another label (VOC marks those 255)."""
    edge = np.zeros(label.shape, bool)
    edge[1:] |= label[1:] != label[:-1]
    edge[:-1] |= label[1:] != label[:-1]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, 1:] != label[:, :-1]
    return edge


def _save_label(path: Path, label: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    label = np.ascontiguousarray(label, dtype=np.uint8)
    im = Image.frombytes("P" if palette else "L", label.shape[::-1], label.tobytes())
    if palette:  # VOC ships palette PNGs; the reader must use the indices, not the colours
        im.putpalette(np.random.default_rng(0).integers(0, 256, 768).astype(np.uint8).tobytes())
    im.save(path)


def _save_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def write_synthetic(
    root: str | Path,
    layout: str = "voc",
    *,
    num_train: int = 16,
    num_val: int = 4,
    size: tuple[int, int] = (64, 80),
    num_classes: int = 5,
    seed: int = 0,
    mmseg_aug: bool = False,
) -> Path:
    """Write a synthetic dataset under ``root`` in ``layout`` and return ``root``.

    Args:
        layout: ``voc`` (splits train, val, trainaug), ``context`` (train, val), ``coco``
            (train2017, val2017), ``ade`` (training, validation) or ``custom`` (train, val;
            with ``classes.txt``).
        size: smallest image (H, W); each image adds 0..16 pixels to both.
        num_classes: K ≤ 8 (see ``SYNTHETIC_CLASSES``).
        mmseg_aug: VOC only: write ``aug.txt`` (mmseg) instead of ``trainaug.txt``.
    Returns:
        The path to pass to ``build_dataset(layout, root, split)``.
    """
    if layout not in LAYOUTS:
        raise UserError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise UserError(f"num_classes must be in 1..{len(SYNTHETIC_CLASSES)}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {"train": num_train, "val": num_val}
    stems: dict[str, list[str]] = {}
    for split, n in splits.items():
        stems[split] = [f"{split}_{i:05d}" for i in range(n)]
        for stem in stems[split]:
            shape = (size[0] + int(rng.integers(0, 17)), size[1] + int(rng.integers(0, 17)))
            image, label = render_sample(rng, shape, num_classes)
            _write_pair(root, layout, split, stem, image, label)
    if layout in ("voc", "context"):
        base, sets = (
            ("VOC2012", "Segmentation") if layout == "voc" else ("VOC2010", "SegmentationContext")
        )
        set_dir = root / "VOCdevkit" / base / "ImageSets" / sets
        set_dir.mkdir(parents=True, exist_ok=True)
        for split, names in stems.items():
            (set_dir / f"{split}.txt").write_text("".join(f"{s}\n" for s in names))
        if layout == "voc":
            aug_name = "aug.txt" if mmseg_aug else "trainaug.txt"
            (set_dir / aug_name).write_text("".join(f"{s}\n" for s in stems["train"]))
    if layout == "custom":
        (root / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES[:num_classes]) + "\n")
    return root


def _write_pair(
    root: Path, layout: str, split: str, stem: str, image: np.ndarray, label: np.ndarray
) -> None:
    if layout in ("voc", "context"):
        base = root / "VOCdevkit" / ("VOC2012" if layout == "voc" else "VOC2010")
        stored = np.where(label == 255, 0, label + 1).astype(np.uint8)  # 0 = background
        _save_image(base / "JPEGImages" / f"{stem}.jpg", image)
        if layout == "voc":
            voc = stored.copy()
            voc[_boundary(stored)] = 255  # VOC's "difficult/boundary" band
            _save_label(base / "SegmentationClass" / f"{stem}.png", voc, palette=True)
            _save_label(base / "SegmentationClassAug" / f"{stem}.png", stored, palette=False)
        else:
            _save_label(base / "SegmentationClassContext" / f"{stem}.png", stored, palette=False)
    elif layout == "coco":
        folder = "train2017" if split == "train" else "val2017"
        _save_image(root / "images" / folder / f"{stem}.jpg", image)
        _save_label(root / "annotations" / folder / f"{stem}_labelTrainIds.png", label, False)
    elif layout == "ade":
        folder = "training" if split == "train" else "validation"
        stored = np.where(label == 255, 0, label + 1).astype(np.uint8)  # 0 = "other"
        _save_image(root / "images" / folder / f"{stem}.jpg", image)
        _save_label(root / "annotations" / folder / f"{stem}.png", stored, palette=False)
    else:
        _save_image(root / "images" / split / f"{stem}.jpg", image)
        _save_label(root / "labels" / split / f"{stem}.png", label, palette=False)


def main(argv: list[str] | None = None) -> None:
    """``python -m otseg.data.synthetic ROOT [--layout voc] [--num-train 16] [--num-val 4]``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m otseg.data.synthetic",
        description="Write the synthetic shapes dataset for the tiny presets",
    )
    p.add_argument("root", help="output folder (pass it as --data-root)")
    p.add_argument("--layout", default="voc", choices=LAYOUTS)
    p.add_argument("--num-train", type=int, default=16)
    p.add_argument("--num-val", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = write_synthetic(
        args.root, args.layout, num_train=args.num_train, num_val=args.num_val,
        num_classes=args.num_classes, seed=args.seed,
    )  # fmt: skip
    print(f"wrote {args.num_train} + {args.num_val} {args.layout} images to {root}")


if __name__ == "__main__":
    main()
