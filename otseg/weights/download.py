"""Download one file (a Google-Drive id or a plain URL) to a temporary name, verify, then rename.

gdown does the transfer (Drive's confirmation pages, a ``.part`` file, a progress bar, a check
against the announced length); this module turns its failures into one actionable message and
checks what arrived: not an HTML page, the expected size and sha256 where known.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

from .. import progress
from ..errors import WeightsNotFoundError

TIMEOUT = (10.0, 60.0)  # seconds: connect, then between bytes
HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<?xml")


class DownloadError(WeightsNotFoundError):
    """A file could not be downloaded or is not what was expected; the message says what to do."""


def offline() -> bool:
    """``HF_HUB_OFFLINE`` set: no downloads at all (read at call time, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def download(
    dest: Path,
    *,
    url: str | None = None,
    drive_id: str | None = None,
    what: str,
    size: int | None = None,
    sha256: str | None = None,
    quiet: bool = False,
) -> Path:
    """Fetch ``url`` (plain HTTP(S)) or the Google-Drive file ``drive_id`` into ``dest``.

    The bytes go to ``dest.part-download`` first and are renamed only after the checks pass;
    on any failure nothing is left at ``dest``. ``what`` names the file in messages.
    """
    import gdown
    import requests
    from gdown.exceptions import DownloadError as GdownError
    from gdown.exceptions import FileURLRetrievalError

    source = url or f"https://drive.google.com/file/d/{drive_id}/view"
    tmp = dest.with_name(dest.name + ".part-download")
    hasher = hashlib.sha256()
    try:
        gdown.download(
            url=url,
            id=None if url else drive_id,
            output=str(tmp),
            quiet=quiet,
            use_cookies=url is None,
            hasher=hasher,
            timeout=TIMEOUT,
            progress=_reporter(what),
        )
    except FileURLRetrievalError as e:
        raise DownloadError(
            f"Google Drive did not hand out {what} ({_summary(e)}). This is usually the "
            f"daily download quota of a popular file: try again in a few hours, or download it "
            f"in a browser from {source} and convert it by hand (otseg convert FILE "
            "--text-embeddings ... --preset ...)"
        ) from None
    except GdownError as e:
        raise DownloadError(
            f"the download of {what} from {source} broke off ({_summary(e)}); run the command again"
        ) from None
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise DownloadError(f"{source} answered HTTP {status} for {what}; check the URL") from None
    except (requests.ConnectionError, requests.Timeout) as e:
        host = urlparse(url or "https://drive.google.com").netloc
        raise DownloadError(
            f"cannot download {what}: {host} is unreachable ({type(e).__name__}). Check the "
            "internet connection, or set OTSEG_ORIGINAL_MIRROR to a server that holds the files"
        ) from None
    finally:
        _remove_partials(tmp)
    try:
        _verify(tmp, what, source, size, sha256, hasher.hexdigest())
    except DownloadError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return dest


def _reporter(what: str):
    """gdown's progress callback, passed on to :mod:`otseg.progress` (None: nobody listens)."""
    if not progress.listening():
        return None
    text = f"Downloading {what}"
    progress.report(text, 0, None)
    return lambda done, total: progress.report(text, done, total)


def _verify(
    path: Path, what: str, source: str, size: int | None, sha256: str | None, got_sha: str
) -> None:
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith(HTML_STARTS):
        raise DownloadError(
            f"{source} answered with a web page instead of {what} (a quota, login or error "
            "page); open the address in a browser to see why, or use another mirror"
        )
    got = path.stat().st_size
    if size is not None and got != size:
        raise DownloadError(
            f"{what} from {source} has {got:,} bytes, expected {size:,}: the download is "
            "incomplete or the file changed; run the command again"
        )
    if sha256 is not None and got_sha != sha256:
        raise DownloadError(
            f"{what} from {source} has sha256 {got_sha[:16]}…, expected {sha256[:16]}…: the "
            "file is corrupt or not the published one"
        )


def _remove_partials(tmp: Path) -> None:
    """gdown keeps ``<name>*.part`` for resuming; this downloader never resumes."""
    for part in tmp.parent.glob(tmp.name + "*.part"):
        part.unlink(missing_ok=True)


def _summary(error: BaseException) -> str:
    """The error's text on one line (gdown's messages span several)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text[:300] or type(error).__name__
