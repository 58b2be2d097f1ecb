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
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from megactor_rt.errors import InputError, ResourceError

logger = logging.getLogger(__name__)

# argparse's Path folds "https://host/x" into "https:/host/x": both are taken
_URL = re.compile(r"^(https?):/+([^/].*)$", re.IGNORECASE)
TIMEOUT_S = 60  # without a byte for this long, a download is given up
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
    separators or control characters, no leading dots, at most 200 characters; ``default`` where nothing is left."""
    return re.sub(r"[\x00-\x1f/\\]", "_", name).strip(". ")[:200] or default


def download(url: str, folder: Path) -> Path:
    """Download ``url`` into ``folder`` (:func:`file_name`), with a progress bar.

    Raises:
        InputError: the server refuses it (an HTTP error) or cannot be reached, or the download breaks off.
        ResourceError: the folder cannot take it (a full disk).
    """
    # (here, not at the top: the CLI imports this module at start-up, where these added 33 ms to every command)
    import http.client
    import urllib.error
    import urllib.request

    from megactor_rt.progress import progress

    path = folder / file_name(url)
    request = urllib.request.Request(url, headers={"User-Agent": "megactor-rt"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 - http(s) only (as_url)
            size = response.headers.get("Content-Length")
            total = int(size) if size and size.isdigit() else None
            with open(path, "wb") as out, progress(total=total, desc=f"download {path.name}", unit="B") as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise InputError(f"{url}: the server answered {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise InputError(f"{url}: cannot download it ({exc.reason})") from exc
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise InputError(f"{url}: the download broke off ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        raise ResourceError(f"{url}: cannot keep it in {folder} ({exc}); set TMPDIR to a folder with room") from exc
    if total is not None and path.stat().st_size != total:
        raise InputError(f"{url}: the download broke off ({path.stat().st_size} of {total} bytes)")
    logger.info("downloaded %s (%d bytes)", url, path.stat().st_size)
    return path


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
