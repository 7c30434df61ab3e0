"""Dataset readers on generated folders: layouts, label mapping, clear errors, transform hook."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from otseg.data.classes import CLASS_NAMES
from otseg.data.datasets import (
    CustomDataset,
    build_dataset,
    check_label_values,
    read_label,
    reduce_zero,
)
from otseg.data.synthetic import SYNTHETIC_CLASSES, write_synthetic

SPLITS = {
    "voc": ("train", "val", "trainaug"),
    "context": ("train", "val"),
    "coco": ("train2017", "val2017"),
    "ade": ("training", "validation"),
    "custom": ("train", "val"),
}


def test_reduce_zero_label_mapping():
    label = np.array([[0, 1, 2], [20, 254, 255]], np.uint8)
    np.testing.assert_array_equal(reduce_zero(label), [[255, 0, 1], [19, 253, 255]])
    assert reduce_zero(label).dtype == np.uint8


@pytest.mark.parametrize("layout", sorted(SPLITS))
def test_reader_yields_raw_samples(tmp_path: Path, layout: str):
    root = write_synthetic(tmp_path, layout, num_train=5, num_val=3, num_classes=5)
    for split in SPLITS[layout]:
        ds = build_dataset(layout, root, split)
        expected = 3 if split.startswith("val") else 10 if split == "trainaug" else 5
        assert len(ds) == expected  # trainaug: train.txt + trainaug.txt, as the original
        for i in range(len(ds)):
            s = ds[i]
            assert s["image"].dtype == np.uint8 and s["image"].ndim == 3
            assert s["image"].shape[2] == 3 and s["image"].shape[:2] == s["label"].shape
            values = set(np.unique(s["label"]).tolist())
            assert values <= set(range(5)) | {255}
            assert values - {255}, "every synthetic image holds at least one object"
            assert Path(s["path"]).is_file()
    names = SYNTHETIC_CLASSES[:5] if layout == "custom" else CLASS_NAMES[layout]
    assert ds.class_names == tuple(names)


def test_all_layouts_give_the_same_labels(tmp_path: Path):
    """VOC/Context store background 0 and reduce it; COCO/custom store 255: same labels out."""
    labels = {}
    for layout in ("context", "coco", "ade", "custom"):
        root = write_synthetic(tmp_path / layout, layout, num_train=3, num_val=1, seed=7)
        labels[layout] = build_dataset(layout, root, "val")[0]["label"]
    root = write_synthetic(tmp_path / "voc", "voc", num_train=3, num_val=1, seed=7)
    labels["voc-aug"] = build_dataset("voc", root, "trainaug")[3]["label"]  # after train.txt
    labels["custom-train"] = build_dataset("custom", tmp_path / "custom", "train")[0]["label"]
    np.testing.assert_array_equal(labels["context"], labels["coco"])
    np.testing.assert_array_equal(labels["context"], labels["custom"])
    np.testing.assert_array_equal(labels["context"], labels["ade"])
    np.testing.assert_array_equal(labels["voc-aug"], labels["custom-train"])


def test_voc_palette_and_boundary(tmp_path: Path):
    root = write_synthetic(tmp_path, "voc", num_train=2, num_val=1)
    path = root / "VOCdevkit/VOC2012/SegmentationClass/train_00000.png"
    assert Image.open(path).mode == "P"
    stored = read_label(path)
    assert set(np.unique(stored).tolist()) <= set(range(6)) | {255}
    assert (stored == 255).any(), "VOC labels carry a 255 boundary band"
    label = build_dataset("voc", root, "train")[0]["label"]
    np.testing.assert_array_equal(label, reduce_zero(stored))


def test_voc_trainaug_variants(tmp_path: Path):
    mmseg = write_synthetic(tmp_path / "a", "voc", num_train=4, num_val=1, mmseg_aug=True)
    ds = build_dataset("voc", mmseg, "trainaug")
    assert len(ds) == 8  # mmseg concat: train.txt + aug.txt
    assert "SegmentationClass" in str(ds.pairs[0][1]) and "Aug" in str(ds.pairs[-1][1])
    deeplab = write_synthetic(tmp_path / "b", "voc", num_train=4, num_val=1)
    ds = build_dataset("voc", deeplab / "VOCdevkit", "trainaug")  # a parent folder also works
    assert len(ds) == 8  # the original: train.txt + trainaug.txt, train images twice
    assert all("SegmentationClass/" in str(p[1]) for p in ds.pairs[:4])
    assert all("SegmentationClassAug/" in str(p[1]) for p in ds.pairs[4:])
    assert [p[0] for p in ds.pairs[:4]] == [p[0] for p in ds.pairs[4:]]


def test_missing_paths_raise_clear_errors(tmp_path: Path):
    root = write_synthetic(tmp_path, "voc", num_train=2, num_val=1)
    base = root / "VOCdevkit/VOC2012"
    with pytest.raises(FileNotFoundError, match="(?s)VOC root.*nowhere.*expected layout"):
        build_dataset("voc", tmp_path / "nowhere", "train")
    (base / "ImageSets/Segmentation/trainaug.txt").unlink()
    with pytest.raises(FileNotFoundError, match="trainaug.txt.*aug.txt"):
        build_dataset("voc", root, "trainaug")
    (base / "SegmentationClass/val_00000.png").unlink()
    with pytest.raises(FileNotFoundError, match="label file.*val_00000.png"):
        build_dataset("voc", root, "val")
    with pytest.raises(FileNotFoundError, match=r"split file.*ImageSets.*test\.txt"):
        build_dataset(
            "context", write_synthetic(tmp_path / "c", "context", num_train=1, num_val=1), "test"
        )
    coco = write_synthetic(tmp_path / "coco", "coco", num_train=1, num_val=1)
    with pytest.raises(FileNotFoundError, match=r"label folder.*annotations.val2017"):
        (coco / "annotations/val2017/val_00000_labelTrainIds.png").unlink()
        (coco / "annotations/val2017").rmdir()
        build_dataset("coco", coco, "val")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("cityscapes", root, "val")


def test_custom_dataset_options(tmp_path: Path):
    root = write_synthetic(tmp_path, "custom", num_train=2, num_val=1)
    with pytest.raises(FileNotFoundError, match="class-name file"):
        CustomDataset(root / "images/train", root / "labels/train", root / "names.txt")
    raw = build_dataset("custom", root, "train")[0]["label"]
    ds = CustomDataset(
        root / "images/train", root / "labels/train", ["a", "b", "c", "d", "e"], ignore_index=0
    )
    label = ds[0]["label"]
    np.testing.assert_array_equal(label, np.where(raw == 0, 255, raw))
    reduced = CustomDataset(
        root / "images/train", root / "labels/train", list("abcde"), reduce_zero_label=True
    )[0]["label"]
    np.testing.assert_array_equal(reduced, reduce_zero(raw))
    (root / "labels/train/train_00001.png").unlink()
    with pytest.raises(FileNotFoundError, match="train_00001.png"):
        build_dataset("custom", root, "train")


def test_label_values_beyond_the_classes_are_named(tmp_path: Path):
    root = write_synthetic(tmp_path, "custom", num_train=3, num_val=1, num_classes=4)
    check_label_values(build_dataset("custom", root, "train"))  # 0..3 and 255: fine
    path = root / "labels/train/train_00001.png"
    label = read_label(path)
    label[0, 0] = 7
    Image.fromarray(label).save(path)
    with pytest.raises(ValueError, match=r"train_00001.png: label value 7 but only 4 classes"):
        check_label_values(build_dataset("custom", root, "train"))
    check_label_values(build_dataset("custom", root, "train", ignore_index=7))  # 7 is ignored
    # with reduce_zero_label the stored 7 is class 6: still out of range; stored 4 → 3 is fine
    label[0, 0] = 4
    Image.fromarray(label).save(path)
    with pytest.raises(ValueError, match="label value 4"):
        check_label_values(build_dataset("custom", root, "train"))
    check_label_values(build_dataset("custom", root, "train", reduce_zero_label=True))


def _store(path: Path, row: int, value: int) -> None:
    """Write ``value`` into row ``row`` of the label PNG at ``path`` (kept a palette PNG)."""
    with Image.open(path) as im:
        palette = im.getpalette() if im.mode == "P" else None
        label = np.array(im)
    label[row, :3] = value
    out = Image.fromarray(label)
    if palette is not None:
        out.putpalette(palette)
    out.save(path)


# layout → (label file to corrupt (under the synthetic root), a stored value out of range, words of the hint)
BAD_LABELS = {
    "voc": ("VOCdevkit/VOC2012/SegmentationClassAug/train_00001.png", 30, "voc_aug.py"),
    "context": (
        "VOCdevkit/VOC2010/SegmentationClassContext/val_00000.png",
        75,
        "pascal_context.py",
    ),
    "coco": ("annotations/train2017/train_00001_labelTrainIds.png", 181, "coco_stuff164k.py"),
    "ade": ("annotations/validation/val_00000.png", 200, "ADE20K-150"),
}
BAD_SPLITS = {"voc": "trainaug", "context": "val", "coco": "train2017", "ade": "validation"}


@pytest.mark.parametrize("layout", sorted(BAD_LABELS))
def test_built_in_labels_name_the_file_the_value_and_the_missed_conversion(tmp_path, layout):
    root = write_synthetic(tmp_path, layout, num_train=3, num_val=1)
    split = BAD_SPLITS[layout]
    assert check_label_values(build_dataset(layout, root, split)) == len(
        build_dataset(layout, root, split)
    )
    relative, value, hint = BAD_LABELS[layout]
    path = root / relative
    _store(path, 2, value)
    with pytest.raises(
        ValueError, match=rf"{Path(relative).name}: label value {value} but.*{hint}"
    ):
        check_label_values(build_dataset(layout, root, split))
    # values a conversion would have produced pass: the top class id and ignore
    top = {"voc": 20, "context": 59, "coco": 170, "ade": 150}[layout]
    _store(path, 2, top)
    _store(path, 3, 255)
    check_label_values(build_dataset(layout, root, split))


def test_colour_labels_get_the_hint_too(tmp_path):
    root = write_synthetic(tmp_path, "voc", num_train=2, num_val=1)
    path = root / "VOCdevkit/VOC2012/SegmentationClass/val_00000.png"
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(ValueError, match="palette or grayscale, got RGB; VOC labels are class"):
        check_label_values(build_dataset("voc", root, "val"))


def test_a_sample_of_labels_is_spread_over_the_dataset(tmp_path):
    root = write_synthetic(tmp_path, "voc", num_train=4, num_val=1)
    dataset = build_dataset("voc", root, "trainaug")  # train.txt (4 files) + trainaug.txt (4)
    read = []
    original = dataset.map_label
    dataset.map_label = lambda label: read.append(1) or original(label)
    assert check_label_values(dataset, limit=3) == 3 == len(read)
    # the sample: first, middle and last file (index 7: SegmentationClassAug)
    _store(root / "VOCdevkit/VOC2012/SegmentationClassAug/train_00003.png", 1, 99)  # index 7
    with pytest.raises(ValueError, match="train_00003.png: label value 99"):
        check_label_values(build_dataset("voc", root, "trainaug"), limit=2)
    _store(root / "VOCdevkit/VOC2012/SegmentationClassAug/train_00003.png", 1, 1)
    _store(root / "VOCdevkit/VOC2012/SegmentationClassAug/train_00001.png", 1, 99)  # index 5
    assert check_label_values(build_dataset("voc", root, "trainaug"), limit=2) == 2  # not read
    with pytest.raises(ValueError, match="SegmentationClassAug/train_00001.png: label value 99"):
        check_label_values(build_dataset("voc", root, "trainaug"))  # every file


def test_transform_hook_gets_per_sample_generator(tmp_path: Path):
    root = write_synthetic(tmp_path, "voc", num_train=3, num_val=1)

    def draw(sample, rng):
        return {**sample, "draw": rng.random()}

    ds = build_dataset("voc", root, "train", transform=draw, seed=3)
    first = [ds[i]["draw"] for i in range(3)]
    assert first == [ds[i]["draw"] for i in range(3)]  # independent of access order/history
    assert len(set(first)) == 3
    ds.set_epoch(1)
    assert [ds[i]["draw"] for i in range(3)] != first
    other_seed = build_dataset("voc", root, "train", transform=draw, seed=4)
    assert other_seed[0]["draw"] != first[0]


def test_synthetic_command_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    from otseg.data.synthetic import main

    main([str(tmp_path / "s"), "--layout", "custom", "--num-train", "2", "--num-val", "1"])
    assert "wrote 2 + 1 custom images" in capsys.readouterr().out
    assert len(build_dataset("custom", tmp_path / "s", "train")) == 2


def test_synthetic_is_deterministic(tmp_path: Path):
    a = write_synthetic(tmp_path / "a", "custom", num_train=3, num_val=1, seed=11)
    b = write_synthetic(tmp_path / "b", "custom", num_train=3, num_val=1, seed=11)
    c = write_synthetic(tmp_path / "c", "custom", num_train=3, num_val=1, seed=12)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 9
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    assert not all(filecmp.cmp(a / f, c / f, shallow=False) for f in files if f.suffix == ".png")
