"""Leftovers of interrupted writes.

Every output (result video, portrait store file, engine plan) is written to a temporary file beside its final
name and renamed on success. A process killed mid-write (SIGKILL, power loss) cannot delete its temporary
file; the next successful write to the same place removes such files once they are old enough to belong to
no running writer.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

logger = logging.getLogger(__name__)

STALE_S = 3600.0  # older than any write takes (seconds for a video, a state file or a plan)


def remove_stale(folder: Path, pattern: str, max_age_s: float = STALE_S) -> list[Path]:
    """Delete the files in ``folder`` matching the glob ``pattern`` last modified more than ``max_age_s``
    ago; returns them. A file that vanishes meanwhile or cannot be deleted is skipped."""
    removed: list[Path] = []
    now = time.time()
    for path in folder.glob(pattern):
        try:
            if now - path.stat().st_mtime > max_age_s:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    for path in removed:
        logger.info("removed %s, left by an interrupted write", path)
    return removed


def remove_stale_dirs(folder: Path, pattern: str, max_age_s: float = STALE_S) -> list[Path]:
    """Delete the folders in ``folder`` matching the glob ``pattern`` (staging folders of interrupted exports)
    in which nothing was created, changed or removed for ``max_age_s``: neither the folder nor a file in it
    was modified since; returns them. One that vanishes meanwhile or cannot be deleted is skipped."""
    removed: list[Path] = []
    now = time.time()
    for path in folder.glob(pattern):
        try:
            if not path.is_dir() or path.is_symlink():
                continue
            newest = max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*"))])
            if now - newest > max_age_s:
                shutil.rmtree(path)
                removed.append(path)
        except OSError:
            continue
    for path in removed:
        logger.info("removed %s, left by an interrupted export", path)
    return removed


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same file where both exist (links followed), else the same
    resolved path."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def nearest_folder(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists: where writing ``path`` (creating folders) starts."""
    return next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
