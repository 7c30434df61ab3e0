"""Slide inference for serving on a GPU: a fixed vocabulary, every window of an image in one
batched forward with a fixed number of Sinkhorn iterations, and on CUDA that forward captured
once per window count as a CUDA graph and replayed.

:class:`otseg.OTSegPredictor` keeps the original's stopping rule (one window per head call, a
host read per iteration), so on a GPU it waits on kernel launches and host reads. Here nothing is
read back before the scores are complete. The maps differ from the original rule's by what the
fixed iteration count changes (``bench/bench_gpu.py`` prints it), so labels change only where
two classes are that close.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from ..errors import UserError
from ..nn.mpsa import fixed_sinkhorn
from ..vocabulary import check_vocabulary
from .allocator import keep_freed_memory
from .predictor import (
    Prediction,
    SegmentationModel,
    _channel_argmax,
    autocast_dtype,
    precision_context,
)
from .preprocess import ImageLike, load_image, to_model_input
from .slide import crops, slide_windows, window_probabilities


class SlideServer:
    """``server(image)`` → :class:`otseg.inference.predictor.Prediction` for a fixed vocabulary.

    iterations: Sinkhorn iterations, run to the end (no early stop).
    precision: ``"fp32"``, or autocast to ``"bf16"`` / ``"fp16"``.
    cuda_graph: capture the forward as one CUDA graph per window count (default: on CUDA).
        A graph keeps its input, output and activations allocated, and replays the weights it
        was captured with: build a new server after changing the model's weights.

    One call at a time: a graph's input and output buffers are shared by its replays, and the
    fixed iteration count is set on the model for the duration of an eager forward or a
    capture (so the model must not serve another thread meanwhile).
    """

    def __init__(
        self,
        model: SegmentationModel,
        names: Sequence[str],
        *,
        seen: Sequence[bool] | None = None,
        lam: float | None = None,
        iterations: int = 10,
        precision: str = "fp32",
        cuda_graph: bool | None = None,
    ) -> None:
        autocast_dtype(precision)  # a bad name fails here, before any work
        self.precision = precision
        if iterations < 1:
            raise UserError(f"iterations must be at least 1, got {iterations}")
        self.model = model.eval()
        device = model.device
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise UserError(f"cuda_graph=True needs the model on a CUDA device, not {device}")
        if device.type == "cpu":
            keep_freed_memory()
        self.names, self.seen = check_vocabulary(names, model.config, seen)
        self.lam = lam
        self.iterations = iterations
        self.cuda_graph = cuda_graph
        with torch.inference_mode():
            self._text = model.embed_text(self.names)
        self._seen = torch.tensor(self.seen, dtype=torch.bool, device=device)
        self._graphs: dict[int, tuple[Callable[[], None], torch.Tensor, torch.Tensor]] = {}

    def _scores(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, 3, c, c) crops → (B, K, c, c) window scores, B windows in one forward."""
        with fixed_sinkhorn(self.model, self.iterations):
            out = self.model(windows, self._text, seen=self._seen, lam=self.lam)
        return out.scores

    def _autocast(self):
        return precision_context(self.model.device, self.precision, cache_enabled=False)

    def _replay(self, windows: torch.Tensor) -> torch.Tensor:
        n = windows.shape[0]
        if n not in self._graphs:
            self._graphs[n] = capture_cuda_graph(self._scores, windows.clone(), self._autocast)
        replay, static_in, static_out = self._graphs[n]
        static_in.copy_(windows)
        replay()
        return static_out

    @torch.inference_mode()
    def __call__(self, image: ImageLike) -> Prediction:
        """Segment one image (PIL, HWC uint8 array, path or bytes) at its original size."""
        rgb = load_image(image)
        cfg = self.model.config
        x = to_model_input(rgb, cfg.resize_short, cfg.pixel_mean, cfg.pixel_std)
        x = x.to(self.model.device)
        boxes = slide_windows(x.shape[-2], x.shape[-1], cfg.test_crop, cfg.test_stride)
        windows = crops(x, boxes)
        if self.cuda_graph:
            scores = self._replay(windows)
        else:
            with self._autocast():
                scores = self._scores(windows)
        probs = window_probabilities(
            list(scores.float().split(1)), boxes, tuple(x.shape[-2:]), rgb.shape[:2]
        )[0]
        return Prediction(
            labels=_channel_argmax(probs).cpu().numpy(),
            probs=probs.cpu().numpy(),
            class_names=list(self.names),
            seen=list(self.seen),
            prompt_maps=None,
            templates=cfg.templates,
            attention="sinkhorn",
            lam=cfg.ensemble_lambda if self.lam is None else self.lam,
            use_mps=True,
        )


def capture_cuda_graph(
    fn: Callable[[torch.Tensor], torch.Tensor],
    static_input: torch.Tensor,
    context: Callable = nullcontext,
) -> tuple[Callable[[], None], torch.Tensor, torch.Tensor]:
    """``fn`` (tensor → tensor, no host reads) captured on ``static_input``'s CUDA device.

    Returns (replay, static input, static output): copy new data into the static input, call
    replay, read the static output (overwritten by the next replay). ``context`` (e.g. an
    autocast factory) is entered around the warm-up runs and the capture.
    """
    device = static_input.device
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), context():
        for _ in range(3):  # warm-up off the default stream, as capture requires
            fn(static_input)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), context():
        static_output = fn(static_input)
    return graph.replay, static_input, static_output
