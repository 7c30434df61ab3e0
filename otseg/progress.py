"""Progress of long steps (downloads, conversion, loading) for whoever is listening.

Library code calls :func:`report` at each stage; it does nothing unless the calling thread
installed a listener with :func:`reporting` (the demo does, to show the loading on its page).
Each thread has its own listener, so a model loading in the background reports to its page
only. Nothing here imports the rest of the package.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One step of a long operation as a person reads it."""

    text: str  # "Downloading the COCO-Stuff transductive checkpoint"
    done: float | None = None  # units finished (bytes for downloads); None: not counted
    total: float | None = None  # units in all, where known

    @property
    def fraction(self) -> float | None:
        """``done / total`` in [0, 1], or None when either is unknown."""
        if self.done is None or not self.total:
            return None
        return min(1.0, max(0.0, self.done / self.total))

    def __str__(self) -> str:
        fraction = self.fraction
        if fraction is not None:
            size = f" of {self.total / 1e6:.0f} MB" if self.total >= 1e6 else ""
            return f"{self.text}: {100 * fraction:.0f} %{size}"
        if self.done:
            return f"{self.text}: {self.done / 1e6:.0f} MB"
        return self.text


Listener = Callable[[Stage], None]
_listener: ContextVar[Listener | None] = ContextVar("otseg_progress_listener", default=None)


@contextlib.contextmanager
def reporting(listener: Listener) -> Iterator[None]:
    """Send every :func:`report` of this thread (and its context) to ``listener``."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def report(text: str, done: float | None = None, total: float | None = None) -> None:
    """Tell the listener, if any, that ``text`` is under way (``done`` of ``total``)."""
    listener = _listener.get()
    if listener is not None:
        listener(Stage(text, done, total))


def listening() -> bool:
    """Whether anyone listens (downloads then pass their byte counts on)."""
    return _listener.get() is not None


def tqdm_class(text: str):
    """A ``tqdm`` class whose progress goes to :func:`report` as ``text`` (for
    ``huggingface_hub.hf_hub_download(tqdm_class=...)``); None when nobody listens."""
    listener = _listener.get()
    if listener is None:
        return None
    from tqdm.auto import tqdm

    class Reporting(tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            listener(Stage(text, self.n, self.total))
            return shown

    return Reporting
