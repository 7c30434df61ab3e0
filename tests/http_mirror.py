"""A local HTTP server standing in for Google Drive and GitHub (``OTSEG_ORIGINAL_MIRROR``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HTML_PAGE = b"<!DOCTYPE html><html><head><title>Quota exceeded</title></head><body></body></html>"


@dataclass
class Mirror:
    """Files by name; ``modes[name]``: "truncate" (half the bytes, full Content-Length),
    "truncate-unannounced" (half the bytes, no Content-Length), "html" (a web page) or "hold"
    (three quarters of the bytes, then the rest once ``release`` is set: a slow download)."""

    url: str
    files: dict[str, bytes]
    modes: dict[str, str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


@contextmanager
def serve(files: dict[str, bytes]) -> Iterator[Mirror]:
    mirror = Mirror("", dict(files))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            name = self.path.lstrip("/")
            mirror.requests.append(name)
            mode = mirror.modes.get(name, "")
            body = HTML_PAGE if mode == "html" else mirror.files.get(name)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header(
                "Content-Type", "text/html" if mode == "html" else "application/octet-stream"
            )
            if mode != "truncate-unannounced":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if mode == "hold":
                self.wfile.write(body[: 3 * len(body) // 4])
                self.wfile.flush()
                mirror.release.wait(120)
                body = body[3 * len(body) // 4 :]
            self.wfile.write(body[: len(body) // 2] if mode.startswith("truncate") else body)
            self.close_connection = True

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield mirror
    finally:
        server.shutdown()
        server.server_close()
