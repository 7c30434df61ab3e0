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
from ..nn.variants import describe, resolve_for
from ..vocabulary import check_vocabulary
from .allocator import keep_freed_memory
from .predictor import (
    Prediction,
    SegmentationModel,
    _channel_argmax,
    autocast_dtype,
    precision_context,
)
from .preprocess import ImageLike, ModelInput, prepare
from .slide import Box, crops, slide_windows, window_probabilities


class SlideServer:
    """``server(image)`` → :class:`otseg.inference.predictor.Prediction` for a fixed vocabulary.

    iterations: Sinkhorn iterations, run to the end (no early stop).
    attention, lam, use_mps: as :meth:`otseg.OTSegPredictor.predict` (the model's variant
        by default; λ and the MPS switch settled by :func:`otseg.nn.variants.resolve`).
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
        attention: str | None = None,
        use_mps: bool | None = None,
        iterations: int = 10,
        precision: str = "fp32",
        cuda_graph: bool | None = None,
    ) -> None:
        autocast_dtype(precision)  # a bad name fails here, before any work
        knobs = resolve_for(model, attention, lam, use_mps)
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
        self.lam, self.attention, self.use_mps = knobs.lam, knobs.attention, knobs.use_mps
        self.iterations = iterations
        self.cuda_graph = cuda_graph
        with torch.inference_mode():
            self._text = model.embed_text(self.names)
        self._seen = torch.tensor(self.seen, dtype=torch.bool, device=device)
        self._graphs: dict[int, tuple[Callable[[], None], torch.Tensor, torch.Tensor]] = {}

    def _scores(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, 3, c, c) crops → (B, K, c, c) window scores, B windows in one forward (the
        model's forward, through the :class:`SegmentationModel` methods that every model has)."""
        model = self.model
        with fixed_sinkhorn(model, self.iterations):
            maps = model.decode(
                model.encode_image(windows), self._text, attention=self.attention,
                use_mps=self.use_mps,
            )  # fmt: skip
            post = model.postprocess(maps, lam=self.lam, seen=self._seen, size=windows.shape[-2:])
        return post.scores

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
    def window_scores(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, 3, c, c) normalised crops, of one image or several, on the model's device →
        (B, K, c, c) scores. With CUDA graphs the result is the graph's output buffer,
        overwritten by the next call with the same B: copy what you keep."""
        if self.cuda_graph:
            return self._replay(windows)
        with self._autocast():
            return self._scores(windows)

    def windows(self, image: ImageLike | ModelInput) -> tuple[torch.Tensor, list[Box], ModelInput]:
        """An image's slide windows (n, 3, c, c) on the model's device, their boxes at the test
        scale, and the prepared image (see :func:`otseg.inference.preprocess.prepare`)."""
        prepared = prepare(image, self.model.config)
        x = prepared.x.to(self.model.device)
        cfg = self.model.config
        boxes = slide_windows(x.shape[-2], x.shape[-1], cfg.test_crop, cfg.test_stride)
        return crops(x, boxes), boxes, prepared

    @torch.inference_mode()
    def prediction(
        self, scores: torch.Tensor, boxes: Sequence[Box], prepared: ModelInput
    ) -> Prediction:
        """The :class:`Prediction` of one image from its n windows' (n, K, c, c) scores."""
        probs = window_probabilities(
            list(scores.float().split(1)), boxes, tuple(prepared.x.shape[-2:]),
            prepared.rgb.shape[:2],
        )[0]  # fmt: skip
        return Prediction(
            labels=_channel_argmax(probs).cpu().numpy(),
            probs=probs.cpu().numpy(),
            class_names=list(self.names),
            seen=list(self.seen),
            prompt_maps=None,
            templates=self.model.config.templates,
            attention=self.attention,
            lam=self.lam,
            use_mps=self.use_mps,
            description=describe(self.model, self.attention),
        )

    def __call__(self, image: ImageLike | ModelInput) -> Prediction:
        """Segment one image (PIL, HWC uint8 array, path, bytes or prepared) at its original
        size, all its windows in one forward."""
        windows, boxes, prepared = self.windows(image)
        return self.prediction(self.window_scores(windows), boxes, prepared)


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
