"""SlideServer: batched windows with fixed Sinkhorn iterations equal the per-window predictor
under the same iterations, for OTSeg and ZegOT; its CUDA-graph bookkeeping on a CPU stand-in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import otseg.inference.serving as serving
from factories import tiny_model
from otseg.errors import UserError
from otseg.inference.predictor import OTSegPredictor
from otseg.inference.serving import SlideServer
from otseg.inference.slide import slide_windows
from otseg.nn.mpsa import fixed_sinkhorn


def zegot_model():
    from otseg.models.zegot import build_zegot, zegot_tiny_config

    torch.manual_seed(0)
    return build_zegot(zegot_tiny_config()).eval()


MODELS = {"otseg": tiny_model, "zegot": zegot_model}
PHOTO = np.random.default_rng(0).integers(0, 256, size=(90, 150, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def windows_of(model, photo) -> int:
    cfg = model.config
    h, w = photo.shape[:2]
    scale = cfg.resize_short / min(h, w)
    size = (round(h * scale), round(w * scale))
    return len(slide_windows(*size, cfg.test_crop, cfg.test_stride))


def test_batched_windows_equal_the_per_window_predictor(model):
    assert windows_of(model, PHOTO) >= 2  # the windows really share one forward
    names = list(model.config.class_names)
    got = SlideServer(model, names, iterations=5)(PHOTO)
    p = OTSegPredictor(model)
    p.set_vocabulary(names)
    p.set_image(PHOTO)
    with fixed_sinkhorn(model, 5):
        want = p.predict()
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-5, rtol=0)
    assert (got.labels == want.labels).mean() > 0.999
    assert got.class_names == names and got.seen == want.seen


def test_lambda_reaches_the_server(model):
    """SlideServer(lam=0.2) equals the per-window predictor's predict(lam=0.2), and λ matters."""
    names = list(model.config.class_names)
    got = SlideServer(model, names, iterations=5, lam=0.2)(PHOTO)
    assert got.lam == 0.2
    p = OTSegPredictor(model)
    p.set_vocabulary(names)
    p.set_image(PHOTO)
    with fixed_sinkhorn(model, 5):
        want, default = p.predict(lam=0.2), p.predict()
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-5, rtol=0)
    assert np.abs(want.probs - default.probs).max() > 1e-3


def test_the_iteration_count_reaches_the_transport(model):
    names = list(model.config.class_names)
    few = SlideServer(model, names, iterations=1)(PHOTO).probs
    many = SlideServer(model, names, iterations=30)(PHOTO).probs
    assert np.abs(few - many).max() > 1e-4


def test_bf16_is_close_to_fp32(model):
    names = list(model.config.class_names)
    fp32 = SlideServer(model, names)(PHOTO)
    bf16 = SlideServer(model, names, precision="bf16")(PHOTO)
    assert (fp32.labels == bf16.labels).mean() > 0.9
    assert 0 < np.abs(fp32.probs - bf16.probs).max() < 0.01  # bf16 really ran, and stayed close


def test_bad_arguments_are_one_line_errors():
    model = tiny_model()
    names = list(model.config.class_names)
    with pytest.raises(UserError, match="needs the model on a CUDA device"):
        SlideServer(model, names, cuda_graph=True)
    with pytest.raises(UserError, match="vocabulary is empty"):
        SlideServer(model, [])
    with pytest.raises(UserError, match="at least 1"):
        SlideServer(model, names, iterations=0)
    with pytest.raises(UserError, match="precision"):
        SlideServer(model, names, precision="int8")
    with pytest.raises(UserError, match="seen has 1 entries"):
        SlideServer(model, names, seen=[True])


def test_graph_bookkeeping_one_capture_per_window_count(monkeypatch):
    """With a CPU stand-in for the capture: one capture per window count, new images copied into
    the static input, and the replayed scores equal the eager server's."""
    captures = []

    def fake_capture(fn, static_input, context):
        captures.append(static_input.shape[0])
        static_output = fn(static_input).clone()

        def replay():
            with context():
                static_output.copy_(fn(static_input))

        return replay, static_input, static_output

    monkeypatch.setattr(serving, "capture_cuda_graph", fake_capture)
    model = tiny_model()
    names = list(model.config.class_names)
    eager = SlideServer(model, names)
    graphed = SlideServer(model, names)
    graphed.cuda_graph = True  # the capture is faked, so no CUDA device is needed
    other = np.random.default_rng(1).integers(0, 256, size=(80, 160, 3), dtype=np.uint8)
    square = np.random.default_rng(2).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    for photo in (PHOTO, other, square, PHOTO[::-1].copy(), PHOTO):
        np.testing.assert_allclose(graphed(photo).probs, eager(photo).probs, atol=1e-6, rtol=0)
    counts = [windows_of(model, p) for p in (PHOTO, other, square)]
    assert len(set(counts)) == 3 and captures == counts  # the last two replay the first graph
