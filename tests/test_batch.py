"""BatchSegmenter: windows of several images in one forward equal each image served alone,
results stay in input order with a bad image among them, the predictor path equals the
predictor, the text is encoded once, one CUDA graph serves every padded batch (CPU stand-in),
and a downscaled copy's labels come back at full size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import otseg.inference.serving as serving
from factories import random_photo, tiny_model
from otseg.errors import UserError
from otseg.inference.batch import BatchSegmenter, image_loader, labels_at, ordered_map
from otseg.inference.predictor import OTSegPredictor
from otseg.inference.preprocess import ImageError, prepare
from otseg.inference.serving import SlideServer

PHOTOS = [random_photo(80 + 8 * i, 112 + 16 * i, seed=i) for i in range(4)]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def names_of(model) -> list[str]:
    return list(model.config.class_names)


def windows(model, photo) -> int:
    return len(SlideServer(model, names_of(model)).windows(photo)[1])


def test_windows_of_several_images_in_one_forward_equal_each_image_alone(model):
    counts = [windows(model, p) for p in PHOTOS]
    assert min(counts) >= 2 and sum(counts) % 3 != 0  # batches of 3 straddle images
    segmenter = BatchSegmenter(model, names_of(model), iterations=5, window_batch=3)
    alone = SlideServer(model, names_of(model), iterations=5)
    results = list(segmenter(PHOTOS))
    assert [r.source is p for r, p in zip(results, PHOTOS, strict=True)] == [True] * len(PHOTOS)
    for photo, result in zip(PHOTOS, results, strict=True):
        want = alone(photo)
        np.testing.assert_allclose(result.prediction.probs, want.probs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(result.labels, want.labels)


def test_a_bad_image_keeps_its_place_and_the_rest_go_on(model):
    sources = [PHOTOS[0], b"not an image", PHOTOS[1], np.zeros((4, 4, 3), np.uint8), PHOTOS[2]]
    for iterations in (None, 5):
        results = list(BatchSegmenter(model, names_of(model), iterations=iterations)(sources))
        assert [r.error is None for r in results] == [True, False, True, False, True]
        assert isinstance(results[1].error, ImageError) and "not a readable image" in str(
            results[1].error
        )
        assert "at least 16 px" in str(results[3].error)
        assert all(r.source is s for r, s in zip(results, sources, strict=True))
        assert results[4].labels.shape == PHOTOS[2].shape[:2]


def test_the_predictor_path_equals_the_predictor(model):
    predictor = OTSegPredictor(model)
    predictor.set_vocabulary(names_of(model))
    knobs = {"attention": "softmax", "lam": 0.3, "use_mps": True}
    segmenter = BatchSegmenter(model, names_of(model), workers=2, **knobs)
    for photo, result in zip(PHOTOS, segmenter(PHOTOS), strict=True):
        predictor.set_image(photo)
        want = predictor.predict(**knobs)
        np.testing.assert_array_equal(result.prediction.probs, want.probs)
        assert result.prediction.attention == "softmax" and result.prediction.lam == 0.3


def test_the_text_is_encoded_once(monkeypatch):
    model = tiny_model()
    calls = []
    embed = model.embed_text
    monkeypatch.setattr(
        model, "embed_text", lambda names: calls.append(list(names)) or embed(names)
    )
    for iterations in (None, 5):
        calls.clear()
        segmenter = BatchSegmenter(model, names_of(model), iterations=iterations)
        list(segmenter(PHOTOS))
        list(segmenter(PHOTOS[:2]))
        assert calls == [names_of(model)]


def test_one_graph_serves_every_padded_batch(model, monkeypatch):
    """With a CPU stand-in for the capture: batches are padded to window_batch, so one capture
    serves all of them, and the replayed results equal the eager server's."""
    captures = []

    def fake_capture(fn, static_input, context):
        captures.append(static_input.shape[0])
        static_output = fn(static_input).clone()

        def replay():
            with context():
                static_output.copy_(fn(static_input))

        return replay, static_input, static_output

    monkeypatch.setattr(serving, "capture_cuda_graph", fake_capture)
    segmenter = BatchSegmenter(model, names_of(model), iterations=5, window_batch=3)
    segmenter.server.cuda_graph = True  # the capture is faked, so no CUDA device is needed
    eager = SlideServer(model, names_of(model), iterations=5)
    for photo, result in zip(PHOTOS, segmenter(PHOTOS), strict=True):
        np.testing.assert_allclose(result.prediction.probs, eager(photo).probs, atol=1e-6, rtol=0)
    assert captures == [3]  # batches of 3 straddle images (see the first test)


def test_a_downscaled_copy_is_segmented_and_its_labels_come_back_at_full_size(model):
    photo = random_photo(120, 200, seed=5)
    load = image_loader(model.config, max_side=100)
    [result] = BatchSegmenter(model, names_of(model))([photo], load)
    assert result.prediction.labels.shape == (60, 100) and result.image.shape == photo.shape
    assert result.labels.shape == (120, 200)
    small = np.array(Image.fromarray(photo).resize((100, 60), Image.Resampling.BILINEAR))
    predictor = OTSegPredictor(model)
    predictor.set_vocabulary(names_of(model))
    predictor.set_image(small)
    np.testing.assert_array_equal(result.prediction.labels, predictor.predict().labels)


def test_labels_at_is_nearest_neighbour_at_pixel_centres():
    labels = np.arange(15, dtype=np.int32).reshape(3, 5)  # odd sizes: no centre on a border
    want = np.array(Image.fromarray(labels).resize((9, 7), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(labels_at(labels, (7, 9)), want)
    assert labels_at(labels, (3, 5)) is labels


def test_ordered_map_keeps_order_returns_read_errors_and_raises_bugs():
    def fn(x):
        if x == 3:
            raise ImageError("bad")
        if x == 5:
            raise ZeroDivisionError
        return x * 10

    got = list(ordered_map(fn, range(5), workers=2, ahead=3))
    assert [i for i, _ in got] == list(range(5))
    assert [r for _, r in got if not isinstance(r, Exception)] == [0, 10, 20, 40]
    assert isinstance(got[3][1], ImageError)
    with pytest.raises(ZeroDivisionError):
        list(ordered_map(fn, range(8), workers=2, ahead=3))
    started = []
    stream = ordered_map(started.append, range(100), workers=1, ahead=2)
    next(stream)
    stream.close()  # what had not started is cancelled
    assert len(started) < 10


def test_bad_settings_fail_before_any_image(model):
    with pytest.raises(UserError, match="attention must be one of"):
        BatchSegmenter(model, names_of(model), attention="magic")
    with pytest.raises(UserError, match="attention must be one of"):
        BatchSegmenter(model, names_of(model), attention="magic", iterations=3)
    with pytest.raises(UserError, match="at least 1"):
        BatchSegmenter(model, names_of(model), window_batch=0)


def test_a_prepared_image_is_what_the_predictor_would_prepare(model):
    photo = PHOTOS[1]
    prepared = prepare(photo, model.config)
    predictor = OTSegPredictor(model)
    predictor.set_vocabulary(names_of(model))
    predictor.set_image(prepared)
    a = predictor.predict().probs
    predictor.set_image(photo)
    np.testing.assert_array_equal(a, predictor.predict().probs)
    assert prepare(prepared, model.config) is prepared and torch.is_tensor(prepared.x)
