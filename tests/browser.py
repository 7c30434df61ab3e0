"""Drive a Gradio app in a real headless Chromium (Debian's, through Playwright).

Usage in a test marked ``@pytest.mark.browser``::

    with browser_session(demo, "smoke") as session:
        session.page.locator("#run").click()
        session.screenshot("after-click")

The app is launched on a free localhost port, the browser gets a fresh profile, screenshots go
to ``tests/artifacts/`` (gitignored; one is always taken at exit, ``-failed`` if the block
raised), and everything is closed afterwards. The browser is ``$OTSEG_CHROMIUM`` if set, else
Debian's ``/usr/bin/chromium`` if installed, else Playwright's own build (``python -m
playwright install chromium``). A missing browser fails the test: CI installs one, so a skip
would hide a broken setup.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import gradio as gr
    from playwright.sync_api import BrowserContext, Page

DEBIAN_CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = (
    "Install one with `sudo apt-get install -y chromium` (Debian/Ubuntu; .ci/run does) or "
    "`python -m playwright install chromium`, or point OTSEG_CHROMIUM at a Chromium/Chrome binary."
)
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",  # runs as root in containers
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
)
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@dataclass
class BrowserSession:
    page: Page  # Playwright page already showing the app
    url: str  # "http://127.0.0.1:PORT/"
    name: str  # prefix of screenshot files
    page_errors: list[str] = field(default_factory=list)  # uncaught JavaScript errors

    def screenshot(self, label: str) -> Path:
        """Save a full-page PNG as ``tests/artifacts/<name>-<label>.png`` and return its path."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{label}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def require_chromium() -> Path | None:
    """The Chromium binary to use (None: Playwright's own); fails the calling test with install
    instructions if ``OTSEG_CHROMIUM`` names a missing file."""
    if os.environ.get("OTSEG_CHROMIUM"):
        path = Path(os.environ["OTSEG_CHROMIUM"])
        if not path.is_file():
            pytest.fail(f"OTSEG_CHROMIUM={path} does not exist. {INSTALL_HINT}", pytrace=False)
        return path
    return DEBIAN_CHROMIUM if DEBIAN_CHROMIUM.is_file() else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def launched(demo: gr.Blocks, **options) -> Iterator[str]:
    """Serve ``demo`` on a free localhost port in this process; yields its URL. ``options``:
    more ``launch()`` settings (the demo's CSS, say)."""
    demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=free_port(),
        quiet=True,
        share=False,
        **options,
    )
    try:
        yield demo.local_url
    finally:
        demo.close()


@contextmanager
def chromium(timeout_ms: float = 30_000) -> Iterator[BrowserContext]:
    """Headless Chromium with a fresh profile (one per test module is enough: each
    :func:`open_page` is a new tab)."""
    executable = require_chromium()
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    with (
        sync_playwright() as playwright,
        tempfile.TemporaryDirectory(prefix="otseg-chromium-") as profile,
    ):
        try:
            context = playwright.chromium.launch_persistent_context(
                profile,  # a fresh --user-data-dir; Playwright refuses it inside args
                executable_path=str(executable) if executable else None,
                headless=True,
                args=list(CHROMIUM_ARGS),
                viewport={"width": 1280, "height": 900},
            )
        except PlaywrightError as e:
            if executable is None and "Executable doesn't exist" in str(e):
                pytest.fail(f"No Chromium found. {INSTALL_HINT}", pytrace=False)
            raise
        try:
            context.set_default_timeout(timeout_ms)
            yield context
        finally:
            context.close()


@contextmanager
def open_page(
    context: BrowserContext, url: str, name: str, viewport: dict | None = None
) -> Iterator[BrowserSession]:
    """A new tab showing ``url`` (the Gradio frontend loaded); screenshots at the end."""
    page = context.new_page()
    if viewport:
        page.set_viewport_size(viewport)
    session = BrowserSession(page=page, url=url, name=name)
    page.on("pageerror", lambda error: session.page_errors.append(str(error)))
    try:
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("gradio-app .gradio-container", state="attached")
        try:
            yield session
        except BaseException:
            session.screenshot("failed")
            raise
        session.screenshot("final")
    finally:
        page.close()


@contextmanager
def browser_session(
    demo: gr.Blocks, name: str, timeout_ms: float = 30_000
) -> Iterator[BrowserSession]:
    """Launch ``demo``, open it in headless Chromium and yield a ``BrowserSession``.

    The page has loaded the Gradio frontend (``gradio-app`` is in the DOM) when it is yielded.
    """
    with launched(demo) as url, chromium(timeout_ms) as context, open_page(context, url, name) as s:
        yield s
