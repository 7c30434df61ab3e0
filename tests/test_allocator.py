"""keep_freed_memory: freed activations stay in the process (glibc), and the opt-out works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from factories import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os
    from otseg.inference.allocator import keep_freed_memory

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    first = keep_freed_memory()
    os.environ["OTSEG_MALLOC"] = "default"  # read on the first call only
    assert keep_freed_memory() is first
    print(first)
    block = bytearray(256 << 20)  # 256 MiB, every page touched
    before = rss()
    del block
    print((before - rss()) >> 20)  # MiB given back to the system by free()
    """
)


def run(env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_memory_stays_in_the_process():
    if not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None:
        skip_or_fail("mallopt thresholds exist in glibc only")  # CI: Debian, glibc
    enabled, released = run({"OTSEG_MALLOC": ""})
    assert enabled == "True" and released < 16  # kept in the heap for the next activation
    enabled, released = run({"OTSEG_MALLOC": "default"})
    assert enabled == "False" and released >= 200  # glibc's default returns it at once
