"""Image loading edge cases, test-scale resize and slide windows."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from otseg.inference.preprocess import ImageError, load_image, resized_size, to_model_input
from otseg.inference.slide import merge_windows, slide_windows, window_probabilities


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_modes_become_rgb_uint8():
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200
    assert load_image(rgb).shape == (20, 30, 3)
    gray = load_image(Image.new("L", (30, 20), 77))
    assert gray.shape == (20, 30, 3) and (gray == 77).all()
    rgba = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    assert (load_image(rgba) == 255).all()  # transparent → white
    sixteen = Image.fromarray(np.full((20, 30), 65535, np.uint16))
    assert (load_image(png_bytes(sixteen)) == 255).all()
    cmyk = Image.new("CMYK", (30, 20), (0, 255, 255, 0))  # red
    out = load_image(png_bytes(cmyk, "JPEG"))
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60
    assert load_image(np.ones((20, 30), np.float32)).max() == 255


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    out = load_image(png_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"not an image at all", "not a readable image"),
        (png_bytes(Image.new("RGB", (1, 1))), "at least 16 px"),
        (png_bytes(Image.new("RGB", (400, 20))), "aspect ratio"),
    ],
)
def test_bad_images_give_clear_errors(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


def test_missing_file_and_directory_are_named(tmp_path):
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="not an image file but a directory"):
        load_image(tmp_path)


def test_truncated_file(tmp_path):
    data = png_bytes(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    )
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt|truncated|readable"):
        load_image(path)


def test_huge_images_are_refused_or_decoded_small(tmp_path):
    big = Image.new("L", (9000, 9000), 128)  # 81 MP
    with pytest.raises(ImageError, match="limit"):
        load_image(png_bytes(big))
    jpeg = load_image(png_bytes(big, "JPEG", quality=50))  # JPEG: decoded at a reduced scale
    assert jpeg.shape[0] * jpeg.shape[1] <= 50_000_000


def test_resize_short_side_and_normalise():
    assert resized_size(375, 500, 512) == (512, 683)
    assert resized_size(500, 375, 512) == (683, 512)
    x = to_model_input(np.full((10, 20, 3), 124, np.uint8), 32, (124.0,) * 3, (2.0,) * 3)
    assert x.shape == (1, 3, 32, 64) and torch.all(x == 0)


def test_slide_windows_cover_the_image_as_mmseg():
    assert slide_windows(80, 112, 64, 48) == [
        (0, 0, 64, 64),
        (0, 48, 64, 112),
        (16, 0, 80, 64),
        (16, 48, 80, 112),
    ]
    assert slide_windows(512, 683, 512, 426) == [(0, 0, 512, 512), (0, 171, 512, 683)]
    assert slide_windows(50, 50, 64, 48) == [(0, 0, 50, 50)]
    boxes = slide_windows(80, 112, 64, 48)
    merged = merge_windows([torch.ones(1, 2, 64, 64) * i for i in range(4)], boxes, (80, 112))
    assert merged[0, 0, 0, 0] == 0 and merged[0, 0, 79, 111] == 3
    assert merged[0, 0, 20, 50] == pytest.approx(1.5)  # covered by all four windows


def test_window_probabilities_average_resize_then_softmax():
    """Two windows over a 4×6 image: scores averaged where they overlap, the average resized
    to the original size (bilinear, no corner alignment), then a softmax over classes."""
    boxes = slide_windows(4, 6, 4, 2)
    assert boxes == [(0, 0, 4, 4), (0, 2, 4, 6)]
    left = torch.tensor([3.0, 0.0]).reshape(1, 2, 1, 1).expand(1, 2, 4, 4)
    right = torch.tensor([0.0, 5.0]).reshape(1, 2, 1, 1).expand(1, 2, 4, 4)
    merged = torch.tensor([[3.0] * 2 + [1.5] * 2 + [0.0] * 2, [0.0] * 2 + [2.5] * 2 + [5.0] * 2])
    merged = merged[None, :, None, :].expand(1, 2, 4, 6)  # (1, K, H, W), written out
    want = torch.nn.functional.interpolate(
        merged, size=(6, 9), mode="bilinear", align_corners=False
    ).softmax(dim=1)
    got = window_probabilities([left, right], boxes, (4, 6), (6, 9))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_unreadable_bytes_name_no_python_object():
    from otseg.inference.preprocess import ImageError, load_image

    with pytest.raises(ImageError, match="not a readable image") as error:
        load_image(b"this is not an image")
    assert " at 0x" not in str(error.value)
