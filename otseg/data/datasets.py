"""Readers for the prepared benchmark layouts (as mmsegmentation prepares them) and custom folders.

Every dataset yields, before augmentation, a dict::

    {"image": uint8 (H, W, 3) RGB, "label": uint8 (H, W) class ids 0..K-1 (255 = ignore),
     "path": str (the image file)}

``reduce_zero_label`` (VOC, Context, ADE20K) is applied on reading: 0 → 255, k → k − 1, 255
stays 255. A ``transform(sample, rng)`` hook receives that dict and a ``numpy.random.Generator``
seeded from ``(seed, epoch, index)``, so augmentation does not depend on worker count or order
and a resumed run repeats it exactly (call ``set_epoch`` per pass over the data).

Accepted layouts (``root`` may be the folder shown or one that contains it):

* ``voc``: ``VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png,
  SegmentationClassAug/*.png, ImageSets/Segmentation/*.txt}``. Splits ``train``/``val`` read
  ``SegmentationClass``. Split ``trainaug`` is, as the original, ``train.txt`` with
  ``SegmentationClass`` followed by ``trainaug.txt`` (the DeepLab name) or ``aug.txt``
  (mmseg's) with ``SegmentationClassAug``: the train images appear twice.
* ``context``: ``VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext,
  ImageSets/SegmentationContext/{train,val}.txt}`` (59 classes, 0 = background).
* ``coco``: ``coco_stuff164k/{images,annotations}/{train2017,val2017}/`` with labels
  ``<stem>_labelTrainIds.png`` (0..170, 255 ignore); every ``.jpg`` of the image folder is used.
* ``ade`` (cross-dataset evaluation only): ``ADEChallengeData2016/{images,annotations}/
  {training,validation}/`` (``.jpg`` / ``.png``, 150 classes, 0 = other → ignored).
* ``custom``: ``root/classes.txt`` (one name per line), ``root/images/<split>/`` and
  ``root/labels/<split>/<stem>.png``; see :class:`CustomDataset`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError
from .classes import CLASS_NAMES

Sample = dict[str, Any]
Transform = Callable[[Sample, np.random.Generator], Sample]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _require(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}\n  expected layout: {layout}")
    return path


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_label(path: str | Path) -> np.ndarray:
    """A label PNG (palette or grayscale) as uint8 (H, W) of stored indices."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise UserError(f"{path}: label images must be palette or grayscale, got {im.mode}")
        label = np.asarray(im)
    if label.max(initial=0) > 255:
        raise UserError(f"{path}: label values above 255 are not supported")
    return label.astype(np.uint8)


def reduce_zero(label: np.ndarray) -> np.ndarray:
    """mmseg ``reduce_zero_label``: 0 → 255, k → k − 1 (1 ≤ k ≤ 254), 255 → 255."""
    out = label.astype(np.int16) - 1
    out[(label == 0) | (label == 255)] = 255
    return out.astype(np.uint8)


def _read_split(path: Path, layout: str) -> list[str]:
    _require(path, "split file", layout)
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


CUSTOM_LABEL_HINT = "fix the label file or add the missing class names"
# What an out-of-range label value of a built-in dataset most likely means.
LABEL_HINTS = {
    "voc": (
        "VOC labels are class indices 0..20 (0 = background, 255 = object border) in palette "
        "or grayscale PNGs: SBD's .mat annotations must be converted first (mmseg's "
        "tools/convert_datasets/voc_aug.py writes SegmentationClassAug), and labels saved as "
        "colours converted back to indices"
    ),
    "context": (
        "PASCAL Context-59 labels (SegmentationClassContext) hold 0..59 (0 = background): "
        "convert the 459-class annotations (trainval_merged.json) with mmseg's "
        "tools/convert_datasets/pascal_context.py"
    ),
    "coco": (
        "COCO-Stuff labels must be the *_labelTrainIds.png that mmseg's "
        "tools/convert_datasets/coco_stuff164k.py writes (0..170, 255 = ignore); the "
        "stuffthingmaps_trainval2017 PNGs (ids up to 181) must be converted with it, not renamed"
    ),
    "ade": (
        "ADE20K-150 labels (ADEChallengeData2016/annotations) hold 0..150 (0 = other); labels "
        "of the full ADE20K index (thousands of classes) are another dataset"
    ),
}


class SegmentationDataset(Dataset):
    """Pairs of (image, label) files; the readers below only build the list of pairs.

    Args:
        pairs: ``(image_path, label_path)`` in dataset order.
        class_names: names of the K label ids, in id order.
        reduce_zero_label: apply :func:`reduce_zero` to labels.
        ignore_index: label value meaning "ignore" (after ``reduce_zero_label``); mapped to 255.
        transform: ``transform(sample, rng) -> sample``; None returns the raw sample.
        seed: seed of the per-sample generators given to ``transform``.
        label_hint: what :func:`check_label_values` adds to an out-of-range value (the
            conversion the labels probably missed).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        class_names: Sequence[str],
        *,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        transform: Transform | None = None,
        seed: int = 0,
        label_hint: str = CUSTOM_LABEL_HINT,
    ) -> None:
        self.pairs = [(Path(i), Path(label)) for i, label in pairs]
        self.label_hint = label_hint
        self.class_names = tuple(class_names)
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of pass ``epoch`` over the data."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def load_label(self, index: int) -> np.ndarray:
        """Label ``index`` as uint8 (H, W) dataset ids (``reduce_zero_label`` and
        ``ignore_index`` applied: 255 = ignore)."""
        return self.map_label(read_label(self.pairs[index][1]))

    def map_label(self, label: np.ndarray) -> np.ndarray:
        """Stored (H, W) values → dataset ids (``reduce_zero_label``, ``ignore_index`` → 255)."""
        if self.reduce_zero_label:
            label = reduce_zero(label)
        if self.ignore_index != 255:
            label = np.where(label == self.ignore_index, 255, label).astype(np.uint8)
        return label

    def load(self, index: int) -> Sample:
        """The raw sample ``index``: image, label (dataset ids, 255 ignore) and path."""
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path), self.load_label(index)
        if image.shape[:2] != label.shape:
            raise UserError(f"{label_path}: label {label.shape} vs image {image.shape[:2]}")
        return {"image": image, "label": label, "path": str(image_path)}

    def __getitem__(self, index: int) -> Sample:
        sample = self.load(index)
        if self.transform is None:
            return sample
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.transform(sample, rng)


def _pairs(
    image_dir: Path,
    label_dir: Path,
    stems: Sequence[str],
    img_suffix: str,
    label_suffix: str,
    layout: str,
) -> list[tuple[Path, Path]]:
    pairs = []
    for stem in stems:
        image = _require(image_dir / f"{stem}{img_suffix}", "image", layout)
        label = _require(label_dir / f"{stem}{label_suffix}", "label file", layout)
        pairs.append((image, label))
    return pairs


def _find(root: Path, *candidates: str) -> Path:
    """``root`` itself or the first ``root/candidate`` that exists."""
    return next((root / c for c in candidates if (root / c).is_dir()), root)


def _listed_pairs(
    base: Path, label_folder: str, split_file: str, layout: str
) -> list[tuple[Path, Path]]:
    """Pairs of a VOC-style tree: ``JPEGImages/<stem>.jpg`` and ``<label_folder>/<stem>.png``
    for the stems listed in ``base/split_file``."""
    images = _require(base / "JPEGImages", "image folder", layout)
    labels = _require(base / label_folder, "label folder", layout)
    stems = _read_split(base / split_file, layout)
    return _pairs(images, labels, stems, ".jpg", ".png", layout)


VOC_LAYOUT = (
    "VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, "
    "SegmentationClassAug/*.png, ImageSets/Segmentation/{train,val,aug|trainaug}.txt}"
)


def voc_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs of PASCAL VOC 2012 ``split`` in {train, val, trainaug}."""
    root = _require(Path(root), "VOC root", VOC_LAYOUT)
    base = _find(root, "VOCdevkit/VOC2012", "VOC2012")
    images = _require(base / "JPEGImages", "image folder", VOC_LAYOUT)
    sets = _require(base / "ImageSets/Segmentation", "split folder", VOC_LAYOUT)
    if split in ("train", "val"):
        split_file = f"ImageSets/Segmentation/{split}.txt"
        return _listed_pairs(base, "SegmentationClass", split_file, VOC_LAYOUT)
    if split not in ("trainaug", "aug"):
        raise UserError(f"VOC split must be train, val or trainaug, got {split!r}")
    aug_labels = _require(base / "SegmentationClassAug", "label folder", VOC_LAYOUT)
    aug_split = next((sets / n for n in ("trainaug.txt", "aug.txt") if (sets / n).exists()), None)
    if aug_split is None:
        raise FileNotFoundError(
            f"split file not found: neither {sets / 'trainaug.txt'} nor {sets / 'aug.txt'} "
            f"(mmseg)\n  expected layout: {VOC_LAYOUT}"
        )
    # the original concatenates train.txt (SegmentationClass) and trainaug.txt (Aug labels)
    aug = _pairs(images, aug_labels, _read_split(aug_split, VOC_LAYOUT), ".jpg", ".png", VOC_LAYOUT)
    return voc_pairs(root, "train") + aug


CONTEXT_LAYOUT = (
    "VOCdevkit/VOC2010/{JPEGImages/*.jpg, SegmentationClassContext/*.png, "
    "ImageSets/SegmentationContext/{train,val}.txt}"
)


def context_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs of PASCAL Context-59 ``split`` in {train, val}."""
    root = _require(Path(root), "Context root", CONTEXT_LAYOUT)
    base = _find(root, "VOCdevkit/VOC2010", "VOC2010")
    split_file = f"ImageSets/SegmentationContext/{split}.txt"
    return _listed_pairs(base, "SegmentationClassContext", split_file, CONTEXT_LAYOUT)


def _folder_pairs(
    base: Path, split: str, label_suffix: str, layout: str
) -> list[tuple[Path, Path]]:
    """Pairs of every ``images/<split>/<stem>.jpg`` with ``annotations/<split>/<stem><suffix>``
    (COCO-Stuff and ADE20K: no split file, the folder is the split)."""
    images = _require(base / "images" / split, "image folder", layout)
    labels = _require(base / "annotations" / split, "label folder", layout)
    stems = sorted(p.stem for p in images.glob("*.jpg"))
    return _pairs(images, labels, stems, ".jpg", label_suffix, layout)


COCO_LAYOUT = (
    "coco_stuff164k/{images/{train2017,val2017}/*.jpg, "
    "annotations/{train2017,val2017}/*_labelTrainIds.png}"
)


def coco_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs of COCO-Stuff 164K ``split`` in {train2017, val2017} (or train/val)."""
    split = {"train": "train2017", "val": "val2017"}.get(split, split)
    root = _require(Path(root), "COCO-Stuff root", COCO_LAYOUT)
    base = _find(root, "coco_stuff164k")
    return _folder_pairs(base, split, "_labelTrainIds.png", COCO_LAYOUT)


ADE_LAYOUT = "ADEChallengeData2016/{images,annotations}/{training,validation}/*.{jpg,png}"


def ade_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs of ADE20K-150 ``split`` in {training, validation} (or train/val)."""
    split = {"train": "training", "val": "validation"}.get(split, split)
    root = _require(Path(root), "ADE20K root", ADE_LAYOUT)
    base = _find(root, "ADEChallengeData2016")
    return _folder_pairs(base, split, ".png", ADE_LAYOUT)


CUSTOM_LAYOUT = "root/{classes.txt, images/<split>/<stem>.<jpg|png|...>, labels/<split>/<stem>.png}"


class CustomDataset(SegmentationDataset):
    """A folder of images and a folder of label PNGs with the same stems.

    Args:
        image_dir: images (``.jpg .jpeg .png .bmp .webp``), sorted by name.
        label_dir: ``<stem>.png`` per image, values = class ids (after ``reduce_zero_label``).
        class_names: the names, or a text file with one name per line.
        reduce_zero_label, ignore_index, transform, seed: as :class:`SegmentationDataset`.
    """

    def __init__(
        self,
        image_dir: str | Path,
        label_dir: str | Path,
        class_names: Sequence[str] | str | Path,
        *,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        transform: Transform | None = None,
        seed: int = 0,
    ) -> None:
        image_dir = _require(Path(image_dir), "image folder", CUSTOM_LAYOUT)
        label_dir = _require(Path(label_dir), "label folder", CUSTOM_LAYOUT)
        if isinstance(class_names, (str, Path)):
            path = _require(Path(class_names), "class-name file", CUSTOM_LAYOUT)
            class_names = [n.strip() for n in path.read_text().splitlines() if n.strip()]
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        pairs = [
            (p, _require(label_dir / f"{p.stem}.png", "label file", CUSTOM_LAYOUT)) for p in images
        ]
        super().__init__(
            pairs,
            class_names,
            reduce_zero_label=reduce_zero_label,
            ignore_index=ignore_index,
            transform=transform,
            seed=seed,
        )


_READERS = {
    "voc": (voc_pairs, True),
    "context": (context_pairs, True),
    "coco": (coco_pairs, False),
    "ade": (ade_pairs, True),
}
DATASETS = (*_READERS, "custom")
# The long-side cap of a dataset's test resize: the original's ADE20K config resizes with
# mmcv's imrescale((2048, 512)) (no ``min_size``, unlike VOC, Context and COCO, whose short
# side is always the test size).
TEST_MAX_LONG: dict[str, int] = {"ade": 2048}


def build_dataset(
    name: str,
    root: str | Path,
    split: str,
    transform: Transform | None = None,
    **kwargs: Any,
) -> SegmentationDataset:
    """A dataset by name: ``voc`` | ``context`` | ``coco`` | ``ade`` | ``custom``.

    ``kwargs`` go to the dataset (``seed``; for ``custom`` also ``reduce_zero_label``,
    ``ignore_index`` and ``class_names``, default ``root/classes.txt``).
    """
    if name == "custom":
        root = Path(root)
        kwargs.setdefault("class_names", root / "classes.txt")
        return CustomDataset(
            root / "images" / split, root / "labels" / split, transform=transform, **kwargs
        )
    if name not in _READERS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    reader, reduce = _READERS[name]
    return SegmentationDataset(
        reader(root, split),
        CLASS_NAMES[name],
        reduce_zero_label=reduce,
        transform=transform,
        label_hint=LABEL_HINTS[name],
        **kwargs,
    )


def check_label_values(dataset: SegmentationDataset, limit: int | None = None) -> int:
    """Stop with the file, the value stored in it and the dataset's hint (the conversion the
    labels probably missed) when a label value is neither a class id nor ignored (after
    ``reduce_zero_label`` / ``ignore_index``).

    limit: read this many label files, spread evenly over the dataset (both parts of VOC's
    trainaug, every folder of a sorted listing); None reads every file. Returns the number
    of files read.
    """
    k, n = len(dataset.class_names), len(dataset.pairs)
    if limit is None or limit >= n:
        indices = range(n)
    else:
        indices = sorted(set(np.linspace(0, n - 1, max(limit, 1)).round().astype(int).tolist()))
    valid = (
        f"stored 1..{k}, 0 and 255 = ignore"
        if dataset.reduce_zero_label
        else (f"ids 0..{k - 1}, 255 = ignore")
    )
    if dataset.ignore_index != 255:
        valid += f", {dataset.ignore_index} = ignore"
    for index in indices:
        label_path = dataset.pairs[index][1]
        try:
            stored = read_label(label_path)
        except UserError as e:
            raise UserError(f"{e}; {dataset.label_hint}") from None
        mapped = dataset.map_label(stored)
        bad = np.unique(stored[(mapped >= k) & (mapped != 255)])
        if bad.size:
            values = ", ".join(str(v) for v in bad[:5].tolist()) + (", ..." if bad.size > 5 else "")
            raise UserError(
                f"{label_path}: label value{'s' if bad.size > 1 else ''} {values} but only {k} "
                f"classes ({valid}); {dataset.label_hint}"
            )
    return len(indices)
