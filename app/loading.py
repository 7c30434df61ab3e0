"""The demo's model, loaded in a background thread while the page is already served.

``app.main`` starts a :class:`ModelLoader` and launches the page at once. Until the model is
ready the page shows the loading stage (what is being downloaded, with its percentage;
converting; loading CLIP), and a request that needs the model waits for it, showing the same
stage as its progress, instead of failing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from otseg.progress import Stage, reporting

LOAD_WAIT_S = 900.0  # a request waits this long for the model, then says it is still loading
POLL_S = 0.5  # how often a waiting request refreshes its progress text

log = logging.getLogger(__name__)


class ModelLoader:
    """Runs ``load`` once in a daemon thread and hands its result to whoever waits.

    ``load`` returns the demo's loaded model (``app.inference.LoadedModel``); it reports its
    stages through :func:`otseg.progress.report`. It should not raise for a model that cannot
    be had (``app.inference.load_model`` explains that in the result); anything it raises is
    logged with its traceback and turned into a "no model" result by ``on_error``.
    """

    def __init__(self, load: Callable[[], object], on_error: Callable[[BaseException], object]):
        self._load = load
        self._on_error = on_error
        self._done = threading.Event()
        self._result = None
        self._stage = Stage("Starting")
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None

    @classmethod
    def finished(cls, result) -> ModelLoader:
        """A loader that already holds ``result`` (tests, and callers that loaded it first)."""
        loader = cls(lambda: result, lambda e: result)
        loader._result = result
        loader._done.set()
        return loader

    def start(self) -> ModelLoader:
        if self._thread is None and not self.done:
            self._thread = threading.Thread(target=self._run, name="otseg-model", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with reporting(self._on_stage):
                result = self._load()
        except BaseException as e:  # a bug: logged, the page says that no model is loaded
            log.exception("loading the model failed")
            result = self._on_error(e)
        self._result = result
        self._done.set()

    def _on_stage(self, stage: Stage) -> None:
        self._stage = stage

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def stage(self) -> Stage:
        """What the loading is doing now."""
        return self._stage

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    @property
    def result(self):
        """The loaded model, or None while loading."""
        return self._result if self.done else None

    def wait(self, on_stage: Callable[[Stage], None] | None = None, timeout: float = LOAD_WAIT_S):
        """The loaded model, after waiting for it; ``on_stage`` is told the stage every
        ``POLL_S`` meanwhile. Raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._done.wait(POLL_S if on_stage else max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(str(self._stage))
            if on_stage is not None:
                on_stage(self._stage)
        return self._result
