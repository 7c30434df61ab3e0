"""The original's cross-dataset evaluations: the exact geometry of each, the target's reader and
normalisation (ADE-150 with CLIP statistics), and ``train.evaluate --protocol`` end to end."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import reset_accelerate, tiny_args

from otseg.config import IMAGENET_MEAN
from otseg.data.augment import normalize, resize_image
from otseg.data.datasets import build_dataset
from otseg.data.synthetic import write_synthetic
from otseg.models.training_free import CLIP_MEAN, CLIP_STD
from otseg.registry import get_preset
from train.build import build_eval_loader
from train.protocols import PROTOCOLS, get_protocol


def test_the_five_protocols_have_the_original_geometry():
    # (target, split, window, stride, short side, normalisation) as the original configs
    expected = {
        "coco-to-voc": ("voc", "val", 512, 380, 512, IMAGENET_MEAN),
        "coco-to-context": ("context", "val", 512, 426, 520, IMAGENET_MEAN),
        "coco-to-ade": ("ade", "validation", 512, 426, 512, CLIP_MEAN),
        "context-to-voc": ("voc", "val", 480, 80, 512, IMAGENET_MEAN),
        "context-to-coco": ("coco", "val2017", 480, 80, 512, IMAGENET_MEAN),
    }
    assert set(PROTOCOLS) == set(expected)
    for name, (target, split, crop, stride, short, mean) in expected.items():
        p = get_protocol(name)
        assert (p.target, p.split, p.crop, p.stride, p.resize_short, p.pixel_mean) == (
            target, split, crop, stride, short, mean,
        )  # fmt: skip
        assert p.source == name.split("-to-")[0]
    # the Context transductive model is tested in-domain with 420 windows, cross-dataset 480
    config = get_protocol("context-to-voc").apply(get_preset("context-transductive"))
    assert (config.test_crop, config.test_stride, config.resize_short) == (480, 80, 512)
    with pytest.raises(ValueError, match="coco-to-voc"):
        get_protocol("voc-to-coco")


def test_ade_is_read_with_reduce_zero_label_and_clip_normalisation(tmp_path: Path):
    root = write_synthetic(tmp_path, "ade", num_train=1, num_val=2)
    config = get_protocol("coco-to-ade").apply(get_preset("coco-inductive"))
    sample = next(iter(build_eval_loader("ade", root, "validation", config)))
    raw = build_dataset("ade", root, "validation")[0]
    h, w = raw["label"].shape
    factor = 512 / min(h, w)
    resized = resize_image(raw["image"], (int(h * factor + 0.5), int(w * factor + 0.5)))
    torch.testing.assert_close(sample["image"][0], normalize(resized, CLIP_MEAN, CLIP_STD))
    assert torch.equal(sample["label"][0], torch.from_numpy(raw["label"]).long())
    stored = np.asarray(Image.open(root / "annotations/validation/val_00000.png"))
    assert (raw["label"][stored == 0] == 255).all()  # 0 = "other" → ignored
    assert (raw["label"][stored > 0] == stored[stored > 0] - 1).all()


def _widen(image_path: Path, label_path: Path, width: int) -> tuple[int, int]:
    """Replace an image and its label by ``width``-wide copies (100 rows): 6:1 for 600."""
    image = np.asarray(Image.open(image_path).convert("RGB").resize((width, 100)))
    Image.fromarray(image).save(image_path)
    Image.open(label_path).resize((width, 100), Image.NEAREST).save(label_path)
    return 100, width


def test_ade_caps_the_long_side_at_2048_and_voc_does_not(tmp_path: Path):
    """The original's ADE20K test Resize is imrescale((2048, 512)): a 600×100 image becomes
    2048×341 (2048/600 < 512/100); VOC's (min_size 512) makes it 3072×512."""
    config = get_protocol("coco-to-ade").apply(get_preset("coco-inductive"))
    ade = write_synthetic(tmp_path / "ade", "ade", num_train=1, num_val=1)
    _widen(
        ade / "images/validation/val_00000.jpg", ade / "annotations/validation/val_00000.png", 600
    )
    sample = next(iter(build_eval_loader("ade", ade, "validation", config)))
    assert sample["image"][0].shape == (3, 341, 2048)  # int(100 · 2048/600 + 0.5)
    assert sample["label"][0].shape == (100, 600)
    raw = build_dataset("ade", ade, "validation")[0]
    torch.testing.assert_close(
        sample["image"][0], normalize(resize_image(raw["image"], (341, 2048)), CLIP_MEAN, CLIP_STD)
    )
    voc = write_synthetic(tmp_path / "voc", "voc", num_train=1, num_val=1)
    base = voc / "VOCdevkit/VOC2012"
    _widen(base / "JPEGImages/val_00000.jpg", base / "SegmentationClass/val_00000.png", 600)
    voc_config = get_protocol("coco-to-voc").apply(get_preset("coco-inductive"))
    sample = next(iter(build_eval_loader("voc", voc, "val", voc_config)))
    assert sample["image"][0].shape == (3, 512, 3072)


def test_evaluate_with_a_protocol(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from train.evaluate import main as evaluate_main
    from train.train import main as train_main

    data = write_synthetic(tmp_path / "voc", "voc", num_train=4, num_val=1)
    ade = write_synthetic(tmp_path / "ade", "ade", num_train=1, num_val=1)
    train_main(tiny_args(data, tmp_path / "run", "--max-iters", "1", "--no-eval"))
    reset_accelerate()
    names = "class0,class1,class2,class3,class4"  # the tiny model has no text tower
    with caplog.at_level(logging.INFO):
        metrics = evaluate_main(["--model", str(tmp_path / "run" / "model"), "--protocol",
                                 "coco-to-ade", "--data-root", str(ade), "--class-names", names,
                                 "--cpu", "--num-workers", "0"])  # fmt: skip
    reset_accelerate()
    assert metrics.class_names == tuple(names.split(","))
    assert "ade/validation: 5 classes, resize 512, crop 512/426" in caplog.text
    assert "evaluates a coco model; this one was trained on tiny" in caplog.text
    with pytest.raises(SystemExit, match="evaluates on ade"):
        evaluate_main(["--model", str(tmp_path / "run" / "model"), "--protocol", "coco-to-ade",
                       "--dataset", "voc", "--data-root", str(ade), "--cpu"])  # fmt: skip
    label = ade / "annotations/validation/val_00000.png"
    Image.fromarray(np.full((8, 8), 151, np.uint8)).resize(Image.open(label).size).save(label)
    reset_accelerate()
    with pytest.raises(
        ValueError, match=r"val_00000.png: label value 151 but only 150.*ADE20K-150"
    ):
        evaluate_main(["--model", str(tmp_path / "run" / "model"), "--protocol", "coco-to-ade",
                       "--data-root", str(ade), "--class-names", names, "--cpu"])  # fmt: skip


def test_names_a_model_without_text_tower_cannot_embed_are_refused_with_its_own():
    from factories import tiny_model
    from train.evaluate import check_vocabulary

    model = tiny_model()  # stored embeddings for class0..class4, no CLIP text tower
    check_vocabulary(model, ["class0", "class3"])
    with pytest.raises(SystemExit, match=r"cannot embed \['cat'\].*knows: class0, class1"):
        check_vocabulary(model, ["class0", "cat"])
