"""otseg.draw beyond what the demo's tests cover (tests/test_app_overlay.py tests the palette,
overlay, shares and palette PNG through app.overlay): label maps of more than 256 classes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from otseg.draw import label_png_bytes, palette


def test_more_than_256_classes_are_written_as_a_16_bit_png():
    labels = (np.arange(40 * 30).reshape(30, 40) % 300).astype(np.int32)
    labels[0, 0] = -1
    decoded = np.array(Image.open(io.BytesIO(label_png_bytes(labels, palette(300)))))
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, np.where(labels < 0, 65535, labels))
    small = label_png_bytes(labels % 200, palette(256))  # still fits: a palette PNG
    assert Image.open(io.BytesIO(small)).mode == "P"
    with pytest.raises(ValueError, match="out of range"):
        label_png_bytes(labels, palette(299))


def test_overlay_over_several_row_bands_is_the_blend_formula():
    """150 rows: two full look-up bands and a partial one; negative labels keep the pixel."""
    from otseg.draw import overlay

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 37, 3), dtype=np.uint8)
    labels = rng.integers(-1, 7, (150, 37))
    colors = palette(7)
    blend = (1 - 0.7) * image + 0.7 * colors[labels.clip(0)].astype(np.float64)
    want = np.rint(blend)
    want = np.where(labels[..., None] < 0, image, want).astype(np.uint8)
    np.testing.assert_array_equal(overlay(image, labels, colors, 0.7), want)
