"""Portraits and drivers given as web addresses (``--driver https://example.com/meme.mp4``).

Each is downloaded into a temporary folder before any work, under the last part of its address's path
(``meme.mp4``: the name a result and its settings take), and stands in for the address until the command ends; the
folder goes then. A driver is read two or three times, so it is kept whole rather than streamed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from megactor_rt.errors import InputError, ResourceError

logger = logging.getLogger(__name__)

# argparse's Path folds "https://host/x" into "https:/host/x": both are taken
_URL = re.compile(r"^(https?):/+([^/].*)$", re.IGNORECASE)
TIMEOUT_S = 60  # without a byte for this long, a try is given up
TRIES = 3  # tries in all for a download that breaks off or is refused for the moment
RETRY_WAIT_S = 1.0  # before the second try; doubled before each next
MAX_WAIT_S = 30.0  # the longest Retry-After waited for
_PASSING = frozenset({408, 429, 500, 502, 503, 504})  # HTTP refusals that another try may not get
_CHUNK = 1 << 20


def as_url(path: object) -> str | None:
    """The http(s) address a path argument names, or None."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    match = _URL.match(os.fspath(path))
    return f"{match.group(1).lower()}://{match.group(2)}" if match else None


def file_name(url: str) -> str:
    """The name a download is kept under: the last part of the address's path (``meme.mp4``), else ``download``."""
    return safe_name(urllib.parse.unquote(urllib.parse.urlparse(url).path.rstrip("/").rsplit("/", 1)[-1]),
                     "download")


def safe_name(name: str, default: str) -> str:
    """``name`` (from another machine: an address, an upload) as a file name in a folder of this one: no path
    separators or control characters, no leading dots, at most 200 bytes of UTF-8 (its suffix kept); ``default``
    where nothing is left."""
    name = re.sub(r"[\x00-\x1f/\\]", "_", name).strip(". ")
    stem, suffix = os.path.splitext(name)
    if len(suffix.encode()) > 16:  # (no suffix of a media file)
        stem, suffix = name, ""
    return (cut_utf8(stem, 200 - len(suffix.encode())) + suffix).strip(". ") or default


def cut_utf8(text: str, most: int) -> str:
    """The longest start of ``text`` that takes at most ``most`` bytes of UTF-8 (whole characters): file names are
    limited in bytes."""
    return text.encode()[:max(most, 0)].decode("utf-8", errors="ignore")


class _Again(Exception):
    """A download that failed in a way another try may not: ``wait`` seconds the server asked for (or None)."""

    def __init__(self, message: str, wait: float | None = None) -> None:
        super().__init__(message)
        self.wait = wait


def download(url: str, folder: Path, max_bytes: int | None = None) -> Path:
    """Download ``url`` into ``folder`` (:func:`file_name`), with a progress bar. A download that breaks off, times
    out or gets a server's passing refusal (408, 429, 500, 502, 503, 504) is tried again, :data:`TRIES` times in
    all, after 1 s, then 2 s (or the server's ``Retry-After`` up to :data:`MAX_WAIT_S`), and goes on from where it
    broke off where the server takes a byte range. ``max_bytes``: a file larger than this is refused (by its announced
    length, before it is read, else as it arrives), and what came of it removed.

    Raises:
        InputError: the server refuses it (an HTTP error) or cannot be reached, the download still breaks off
            after :data:`TRIES` tries, or the file is larger than ``max_bytes``.
        ResourceError: the folder cannot take it (a full disk).
    """
    address = request_address(url)
    path = folder / file_name(url)
    for attempt in range(1, TRIES + 1):
        try:
            _fetch(url, path, max_bytes, address)
            break
        except _TooLarge as exc:
            path.unlink(missing_ok=True)
            raise InputError(f"{url}: {exc}") from None
        except _Again as exc:
            if attempt == TRIES:
                raise InputError(f"{url}: {exc} ({TRIES} tries)") from exc
            wait = RETRY_WAIT_S * 2 ** (attempt - 1) if exc.wait is None else min(exc.wait, MAX_WAIT_S)
            logger.warning("%s: %s; trying again in %g s", url, exc, wait)
            time.sleep(wait)
    logger.info("downloaded %s (%d bytes)", url, path.stat().st_size)
    return path


def request_address(url: str) -> str:
    """``url`` as an HTTP request carries it: the characters a request cannot hold in its path and query (spaces,
    letters beyond ASCII: an address copied as a browser shows it, ``.../Café 1.mp4``) percent-encoded as a browser
    sends them, its ``%XX`` escapes kept, its ``#fragment`` (never sent) dropped.

    Raises:
        InputError: it is no address a request can be made to (``http://[::1/x.mp4``, a port over 65535, a host
            with spaces), naming it.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - (its check: a port that is no number from 0 to 65535 raises)
    except ValueError as exc:
        raise InputError(f"{url}: not a web address that can be downloaded ({exc})") from None
    if not parts.hostname or re.search(r"[\x00-\x20\x7f]", parts.netloc):
        raise InputError(f"{url}: not a web address that can be downloaded (no host, or one with spaces)")
    path = urllib.parse.quote(parts.path, safe="/%:@!$&'()*+,;=~")
    query = urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=?~")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, ""))


class _TooLarge(Exception):
    """A download over its size limit."""


def _fetch(url: str, path: Path, max_bytes: int | None = None, address: str | None = None) -> None:
    """One try at downloading ``url`` (asked for as ``address``, :func:`request_address`) to ``path``, continuing
    what ``path`` holds already where the server takes a byte range (and starting again where it does not)."""
    # (here, not at the top: the CLI imports this module at start-up, where these added 33 ms to every command)
    import http.client
    import urllib.error
    import urllib.request

    from megactor_rt.progress import progress

    have = path.stat().st_size if path.exists() else 0
    headers = {"User-Agent": "megactor-rt", **({"Range": f"bytes={have}-"} if have else {})}
    request = urllib.request.Request(address or request_address(url), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 - http(s) only (as_url)
            size = response.headers.get("Content-Length")
            part = int(size) if size and size.isdigit() else None
            if have and not (response.status == 206 and (response.headers.get("Content-Range") or "").startswith(
                    f"bytes {have}-")):
                if response.status == 206:  # (a part from another byte: was written as the whole file)
                    path.unlink()
                    raise _Again("the server sent another part of the file than the one asked for")
                have = 0  # (the whole file again: the server sends no part of it)
            total = None if part is None else have + part
            too_large = f"larger than the limit of {max_bytes} bytes"
            if max_bytes is not None and total is not None and total > max_bytes:
                raise _TooLarge(f"{total} bytes, {too_large}")
            with open(path, "ab" if have else "wb") as out, \
                    progress(total=total, desc=f"download {path.name}", unit="B") as bar:
                bar.update(have)
                written = have
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
                    written += len(chunk)
                    if max_bytes is not None and written > max_bytes:
                        raise _TooLarge(too_large)
    except urllib.error.HTTPError as exc:
        message = f"the server answered {exc.code} {exc.reason}"
        if exc.code in _PASSING:
            after = (exc.headers.get("Retry-After") or "").strip()
            raise _Again(message, float(after) if after.isdigit() else None) from exc
        raise InputError(f"{url}: {message}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise _Again(f"no answer within {TIMEOUT_S} s") from exc
        raise InputError(f"{url}: cannot download it ({exc.reason})") from exc
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise _Again(f"the download broke off ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        raise ResourceError(f"{url}: cannot keep it in {path.parent} ({exc}); set TMPDIR to a folder with room") \
            from exc
    if total is not None and path.stat().st_size != total:
        raise _Again(f"the download broke off ({path.stat().st_size} of {total} bytes)")


@contextlib.contextmanager
def local_copies(paths: list[Path]) -> Iterator[list[Path]]:
    """``paths`` with each web address replaced by its download (each in a folder of its own within one temporary
    folder, so two addresses ending in the same name keep both), removed when the block ends; the others as given.

    Raises:
        InputError, ResourceError: see :func:`download`.
    """
    if not any(as_url(p) for p in paths):
        yield paths
        return
    root = Path(tempfile.mkdtemp(prefix="megactor-rt-"))
    try:
        local = []
        for i, p in enumerate(paths):
            url = as_url(p)
            if url is None:
                local.append(p)
                continue
            folder = root / str(i)
            folder.mkdir()
            local.append(download(url, folder))
        yield local
    finally:
        shutil.rmtree(root, ignore_errors=True)
