"""Train/test pipelines: mmseg resize and crop rules, padding, nearest labels, determinism."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from otseg.config import IMAGENET_MEAN, IMAGENET_STD
from otseg.data.augment import (
    EvalTransform,
    TrainTransform,
    collate,
    hsv_to_rgb,
    normalize,
    photometric_distortion,
    random_crop,
    random_rescale,
    rescale_size,
    resize_label,
    rgb_to_hsv,
)


def test_rescale_size_follows_mmcv():
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)  # short side bound
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side bound
    assert rescale_size(375, 500, (520, 520)) == (390, 520)  # Context: the long side → 520


def test_resize_label_is_cv2_nearest_and_keeps_ids():
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([0, 3, 7, 255], np.uint8), size=(10, 12))
    up = resize_label(label, (20, 24))
    np.testing.assert_array_equal(up, label.repeat(2, 0).repeat(2, 1))
    np.testing.assert_array_equal(resize_label(label, (5, 6)), label[::2, ::2])
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    for seed in range(5):
        img, lab = random_rescale(image, label, (24, 13), (0.5, 2.0), np.random.default_rng(seed))
        assert img.shape[:2] == lab.shape and lab.dtype == np.uint8
        assert set(np.unique(lab).tolist()) <= {0, 3, 7, 255}


def _passes(crop: np.ndarray, ratio: float = 0.75) -> bool:
    counts = np.bincount(crop.ravel(), minlength=256)[:255]
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def _windows(seed: int, h: int, w: int, crop: int, n: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [
        (int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))) for _ in range(n)
    ]


def test_random_crop_keeps_first_window_passing_the_cat_max_ratio_rule():
    label = np.zeros((32, 200), np.uint8)
    label[:, 100:] = 1  # only windows straddling x = 100 hold two classes
    label[:, :20] = 255
    image = np.dstack([label] * 3)
    for seed in range(20):
        _, crop = random_crop(image, label, 32, np.random.default_rng(seed))
        windows = _windows(seed, 32, 200, 32, 11)
        checks = [_passes(label[y : y + 32, x : x + 32]) for y, x in windows[:10]]
        y, x = windows[checks.index(True)] if any(checks) else windows[10]
        np.testing.assert_array_equal(crop, label[y : y + 32, x : x + 32])


def test_random_crop_single_class_uses_the_eleventh_window_and_small_images_stay_whole():
    label = np.full((40, 90), 4, np.uint8)
    image = np.dstack([label] * 3)
    _, crop = random_crop(image, label, 16, np.random.default_rng(3))
    assert crop.shape == (16, 16)
    rng = np.random.default_rng(3)
    for _ in range(11):
        y, x = int(rng.integers(0, 25)), int(rng.integers(0, 75))
    img, _ = random_crop(
        np.arange(40 * 90 * 3).reshape(40, 90, 3), label, 16, np.random.default_rng(3)
    )
    assert img[0, 0, 0] == (y * 90 + x) * 3
    small, small_label = random_crop(image[:10, :12], label[:10, :12], 16, np.random.default_rng(0))
    assert small.shape == (10, 12, 3) and small_label.shape == (10, 12)


def test_train_transform_pads_image_with_zero_and_label_with_255():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    label = rng.integers(0, 3, (20, 30)).astype(np.uint8)
    t = TrainTransform(64, (30, 20), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False)
    out = t({"image": image, "label": label, "path": "p"}, np.random.default_rng(1))
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.float32
    assert out["label"].shape == (64, 64) and out["label"].dtype == torch.int64
    assert (out["label"][20:] == 255).all() and (out["label"][:, 30:] == 255).all()
    assert (out["image"][:, 20:] == 0).all() and (out["image"][:, :, 30:] == 0).all()
    torch.testing.assert_close(out["image"][:, :20, :30], normalize(image))
    assert torch.equal(out["label"][:20, :30], torch.from_numpy(label).long())


def test_train_transform_is_deterministic_given_the_generator():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (70, 90)).astype(np.uint8)
    sample = {"image": image, "label": label, "path": "p"}
    t = TrainTransform(48, (128, 64))
    a, b = t(sample, np.random.default_rng(5)), t(sample, np.random.default_rng(5))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    c = t(sample, np.random.default_rng(6))
    assert not torch.equal(a["image"], c["image"])
    assert set(a["label"].unique().tolist()) <= {0, 1, 2, 3, 255}
    state = np.random.get_state()[1].copy()
    t(sample, np.random.default_rng(7))
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # global RNG untouched


def test_flip_mirrors_image_and_label_together():
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :2] = 255
    label = np.zeros((8, 8), np.uint8)
    label[:, :2] = 1
    t = TrainTransform(8, (8, 8), ratio_range=(1, 1), flip_prob=1.0, photometric=False)
    out = t({"image": image, "label": label, "path": "p"}, np.random.default_rng(0))
    assert (out["label"][:, 6:] == 1).all() and (out["label"][:, :6] == 0).all()
    assert (out["image"][0, :, 6:] > 0).all() and (out["image"][0, :, :6] < 0).all()


def test_hsv_matches_colorsys_and_round_trips():
    colours = np.array(
        [[[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 100, 50], [90, 90, 90]]], np.uint8
    )
    hsv = rgb_to_hsv(colours)
    for (r, g, b), (h, s, v) in zip(colours[0], hsv[0], strict=True):
        eh, es, ev = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        assert (
            abs(int(h) - eh * 180) <= 0.5 and abs(int(s) - es * 255) <= 0.5 and v == round(ev * 255)
        )
    np.testing.assert_array_equal(hsv_to_rgb(hsv)[0, :3], colours[0, :3])
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.abs(hsv_to_rgb(rgb_to_hsv(rgb)).astype(int) - rgb).max() <= 4  # 8-bit HSV steps


def test_photometric_distortion_changes_colour_not_geometry():
    grey = np.full((6, 6, 3), 100, np.uint8)
    for seed in range(10):
        out = photometric_distortion(grey, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == grey.shape
        assert (out == out[0, 0, 0]).all()  # no saturation: hue/saturation leave grey grey
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    outs = [photometric_distortion(image, np.random.default_rng(s)) for s in range(8)]
    assert any(not np.array_equal(o, image) for o in outs)


def test_test_transform_resizes_short_side_and_keeps_label():
    image = np.full((375, 500, 3), 128, np.uint8)
    label = np.zeros((375, 500), np.uint8)
    out = EvalTransform(512)({"image": image, "label": label, "path": "p"})
    assert out["image"].shape == (3, 512, 683) and out["label"].shape == (375, 500)
    assert out["ori_size"] == (375, 500)
    expected = (128 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out["image"][:, 100, 100], expected)


def test_test_transform_caps_the_long_side_like_imrescale():
    transform = EvalTransform(512, max_long=2048)
    # mmcv imrescale((2048, 512)): factor min(2048 / long, 512 / short), int(x · factor + 0.5)
    assert transform.size(100, 600) == (341, 2048)
    assert transform.size(600, 100) == (2048, 341)
    assert transform.size(375, 500) == (512, 683)  # up to 4:1 the short side is 512
    assert transform.size(128, 512) == (512, 2048)
    assert EvalTransform(512).size(100, 600) == (512, 3072)
    out = transform(
        {
            "image": np.zeros((100, 600, 3), np.uint8),
            "label": np.zeros((100, 600), np.uint8),
            "path": "p",
        }
    )
    assert out["image"].shape == (3, 341, 2048) and out["label"].shape == (100, 600)


def test_collate_stacks_equal_shapes_and_lists_the_rest():
    batch = [
        {"image": torch.zeros(3, 4, 4), "label": torch.zeros(4, 4), "path": "a"},
        {"image": torch.ones(3, 4, 4), "label": torch.zeros(5, 4), "path": "b"},
    ]
    out = collate(batch)
    assert out["image"].shape == (2, 3, 4, 4)
    assert isinstance(out["label"], list) and out["path"] == ["a", "b"]


@pytest.mark.parametrize("scale", [(2048, 512), (520, 520)])
def test_rescale_then_crop_shapes(scale):
    image = np.zeros((300, 400, 3), np.uint8)
    label = np.zeros((300, 400), np.uint8)
    t = TrainTransform(480, scale)
    out = t({"image": image, "label": label, "path": "p"}, np.random.default_rng(0))
    assert out["image"].shape == (3, 480, 480)
