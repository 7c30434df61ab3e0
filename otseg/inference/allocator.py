"""Keep freed memory inside the process for CPU inference (glibc only).

A ViT-B/16 window allocates and frees tens of activations of 3–13 MB. glibc serves blocks of
that size with fresh ``mmap`` pages and returns them to the system on ``free``, so every
activation is page-faulted in again: about a fifth of a CPU forward here
(``bench/bench_speed.py``). Raising glibc's mmap and trim thresholds keeps those pages in the
heap for reuse, as jemalloc or tcmalloc would. The price: the process keeps its peak memory
after a forward instead of shrinking back.

:class:`otseg.OTSegPredictor` and :class:`otseg.SlideServer` call :func:`keep_freed_memory`
when they run on the CPU (it acts once per process).
Set ``OTSEG_MALLOC=default`` to leave the allocator alone (for instance under
``LD_PRELOAD=libjemalloc.so``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: larger than any activation of a ViT-B/16 window


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process, once.

    Returns True when they are set (now or before); False on other C libraries, when
    ``OTSEG_MALLOC=default`` or when ``mallopt`` refuses.
    """
    if os.environ.get("OTSEG_MALLOC", "").strip().lower() == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)
    )
