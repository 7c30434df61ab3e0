"""Many images through one model and one vocabulary: the text is encoded once, images are
decoded and prepared in worker threads while the model runs, and results come back in input
order; an image that cannot be read comes back with its error and the others go on.

Two paths:

- the predictor (:class:`OTSegPredictor`): one image at a time, with the original's Sinkhorn
  stopping rule (``iterations=None``), any backend, slide or whole mode. The default on a CPU.
- batched windows (:class:`SlideServer`'s fixed-iteration forward, ``iterations=N``): the slide
  windows of consecutive images go through the model ``window_batch`` at a time, so one forward
  holds windows of several images; on CUDA the batch is padded to ``window_batch`` so that one
  captured graph serves every batch. The default on a GPU.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..nn.mpsa import fixed_sinkhorn
from ..nn.variants import resolve_for
from .predictor import OTSegPredictor, Prediction, SegmentationModel
from .preprocess import ImageLike, ModelInput, load_image, prepare
from .serving import SlideServer
from .slide import Box

T = TypeVar("T")
R = TypeVar("R")

#: What a loader may raise for one bad image (ImageError is a UserError; OSError: the file).
READ_ERRORS: tuple[type[Exception], ...] = (UserError, OSError)


@dataclass
class Loaded:
    """One image as a loader thread leaves it for the model."""

    image: np.ndarray  # (H, W, 3) uint8 as decoded, full size: what outputs are drawn on
    input: ModelInput  # what the model segments: the image, or a copy downscaled to max_side


@dataclass
class Segmented:
    """The result for one source, in input order."""

    source: Any
    image: np.ndarray | None  # (H, W, 3) uint8 as decoded; None when it could not be read
    prediction: Prediction | None  # at the size the model segmented (``Loaded.input``)
    error: Exception | None = None  # why the image was skipped

    @property
    def labels(self) -> np.ndarray:
        """(H, W) int32 class ids at the image's decoded size (nearest-neighbour upsampling
        when the model segmented a downscaled copy)."""
        return labels_at(self.prediction.labels, self.image.shape[:2])


def labels_at(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) label map → (H, W) by nearest neighbour (pixel centres), the same map if equal."""
    h, w = labels.shape
    if (h, w) == tuple(size):
        return labels
    rows = ((np.arange(size[0]) + 0.5) * (h / size[0])).astype(np.intp).clip(0, h - 1)
    cols = ((np.arange(size[1]) + 0.5) * (w / size[1])).astype(np.intp).clip(0, w - 1)
    return labels[rows[:, None], cols[None, :]]


def image_loader(config: Any, max_side: int | None = None) -> Callable[[ImageLike], Loaded]:
    """A loader for :class:`BatchSegmenter`: decode (:func:`load_image`), downscale to at most
    ``max_side`` pixels on the long side (None: never), prepare for ``config``'s test scale."""

    def load(source: ImageLike) -> Loaded:
        rgb = load_image(source)
        small = rgb
        h, w = rgb.shape[:2]
        if max_side and max(h, w) > max_side:
            scale = max_side / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            resized = Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
            small = np.asarray(resized)
        return Loaded(rgb, prepare(small, config))

    return load


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int, ahead: int
) -> Iterator[tuple[T, R | Exception]]:
    """``(item, fn(item))`` in input order, computed by ``workers`` threads at most ``ahead``
    items in advance (0 workers: in the calling thread). A :data:`READ_ERRORS` exception is
    returned in place of the result; any other propagates. Closing the iterator cancels what
    has not started and waits for what has."""

    def call(item: T) -> R | Exception:
        try:
            return fn(item)
        except READ_ERRORS as e:
            return e

    if workers <= 0:
        for item in items:
            yield item, call(item)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="otseg-load")
    try:
        source = iter(items)
        pending = deque((item, pool.submit(call, item)) for item in itertools.islice(source, ahead))
        while pending:
            item, future = pending.popleft()
            for nxt in itertools.islice(source, 1):
                pending.append((nxt, pool.submit(call, nxt)))
            yield item, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Job:
    """An image whose windows are on their way through batched forwards."""

    source: Any
    loaded: Loaded
    boxes: list[Box]
    scores: list[torch.Tensor | None] = field(default_factory=list)  # (K, c, c) per window
    left: int = 0  # windows without scores yet


class BatchSegmenter:
    """``segmenter(sources)`` → one :class:`Segmented` per source, in order.

    Args:
        model: any :class:`SegmentationModel`, already on its device.
        names, seen: the vocabulary (encoded once here) and its seen flags (default: the
            model's rule, :func:`otseg.vocabulary.mark_seen`).
        attention, lam, use_mps, calibrate_seen: as :meth:`OTSegPredictor.predict`.
        mode, precision, backend: as :class:`OTSegPredictor`.
        iterations: None for the original stopping rule (the predictor, one window per head
            call); N for exactly N Sinkhorn iterations, with the windows of consecutive images
            batched ``window_batch`` at a time on PyTorch (slide mode, backend ``"auto"`` or
            ``"torch"``; otherwise the predictor runs with N fixed iterations).
        workers: loader threads (0: load in the calling thread).
    """

    def __init__(
        self,
        model: SegmentationModel,
        names: Sequence[str],
        *,
        seen: Sequence[bool] | None = None,
        attention: str | None = None,
        lam: float | None = None,
        use_mps: bool | None = None,
        calibrate_seen: bool = True,
        mode: str = "slide",
        precision: str = "fp32",
        backend: str = "auto",
        iterations: int | None = None,
        window_batch: int = 8,
        workers: int = 2,
    ) -> None:
        if window_batch < 1:
            raise UserError(f"window_batch must be at least 1, got {window_batch}")
        if iterations is not None and iterations < 1:
            raise UserError(f"iterations must be at least 1, got {iterations}")
        self.model = model
        self.iterations = iterations
        self.window_batch = window_batch
        self.workers = workers
        # settled before any work: the model's default variant, λ and MPS switch
        self.knobs = resolve_for(model, attention, lam, use_mps).as_dict()
        self.server: SlideServer | None = None
        self.predictor: OTSegPredictor | None = None
        if iterations is not None and mode == "slide" and backend in ("auto", "torch"):
            if not calibrate_seen:
                seen = [False] * len(names)
            self.server = SlideServer(
                model, names, seen=seen, iterations=iterations, precision=precision, **self.knobs
            )
        else:
            self.predictor = OTSegPredictor(model, precision=precision, mode=mode, backend=backend)
            self.predictor.set_vocabulary(names, seen)
            self.knobs["calibrate_seen"] = calibrate_seen

    def __call__(
        self, sources: Iterable[Any], load: Callable[[Any], Loaded] | None = None
    ) -> Iterator[Segmented]:
        """Segment ``sources`` (anything ``load`` takes; default :func:`image_loader` of the
        model's config: paths, bytes, PIL images, arrays) in order."""
        load = load or image_loader(self.model.config)
        stream = ordered_map(load, sources, workers=self.workers, ahead=2 * self.workers + 2)
        with contextlib.closing(stream):
            if self.server is not None:
                yield from self._batched(stream)
            else:
                yield from self._one_by_one(stream)

    def _one_by_one(self, stream: Iterator[tuple[Any, Loaded | Exception]]) -> Iterator[Segmented]:
        for source, loaded in stream:
            if isinstance(loaded, Exception):
                yield Segmented(source, None, None, loaded)
                continue
            self.predictor.set_image(loaded.input)
            with fixed_sinkhorn(self.model, self.iterations):  # None: the original rule
                prediction = self.predictor.predict(**self.knobs)
            yield Segmented(source, loaded.image, prediction)

    def _batched(self, stream: Iterator[tuple[Any, Loaded | Exception]]) -> Iterator[Segmented]:
        jobs: deque[_Job | Segmented] = deque()  # in input order, finished or not
        queue: list[tuple[_Job, int, torch.Tensor]] = []  # windows waiting for a forward
        for source, loaded in stream:
            if isinstance(loaded, Exception):
                jobs.append(Segmented(source, None, None, loaded))
            else:
                windows, boxes, _ = self.server.windows(loaded.input)
                job = _Job(source, loaded, boxes, [None] * len(boxes), len(boxes))
                jobs.append(job)
                queue.extend((job, i, window) for i, window in enumerate(windows))
            while len(queue) >= self.window_batch:
                self._forward(queue[: self.window_batch])
                del queue[: self.window_batch]
            yield from self._finished(jobs)
        while queue:
            self._forward(queue[: self.window_batch])
            del queue[: self.window_batch]
        yield from self._finished(jobs)

    def _forward(self, chunk: list[tuple[_Job, int, torch.Tensor]]) -> None:
        """One batched forward of the windows in ``chunk`` (≤ window_batch)."""
        batch = torch.stack([window for _, _, window in chunk])
        if self.server.cuda_graph and len(chunk) < self.window_batch:  # one graph shape
            pad = batch.new_zeros(self.window_batch - len(chunk), *batch.shape[1:])
            batch = torch.cat([batch, pad])
        scores = self.server.window_scores(batch)[: len(chunk)].clone()  # graph output is reused
        for (job, i, _), window_scores in zip(chunk, scores, strict=True):
            job.scores[i] = window_scores
            job.left -= 1

    def _finished(self, jobs: deque[_Job | Segmented]) -> Iterator[Segmented]:
        while jobs and (isinstance(jobs[0], Segmented) or jobs[0].left == 0):
            job = jobs.popleft()
            if isinstance(job, Segmented):
                yield job
                continue
            prediction = self.server.prediction(
                torch.stack(job.scores), job.boxes, job.loaded.input
            )
            yield Segmented(job.source, job.loaded.image, prediction)
