"""Leftovers of interrupted writes.

Every output (result video, portrait store file, engine plan) is written to a temporary file beside its final
name and renamed on success. A process killed mid-write (SIGKILL, power loss) cannot delete its temporary
file; the next successful write to the same place removes such files once they are old enough to belong to
no running writer, or, for results (whose writers :func:`hold` their temporary files), as soon as no live process
holds them (a run killed with SIGKILL and started again at once, from its checkpoint, cleans up after the first).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from megactor_rt.errors import InputError

try:
    import fcntl
except ImportError:  # (Windows: no flock; a leftover is then told by its age alone)
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# safetensors' save_file (its Rust writer, in recent versions: 0.8 here) writes into a temporary file of this name
# beside its target, then renames it: a writer killed meanwhile (the OOM killer, a power loss) leaves it behind, as
# large as what was being written (a network's weights, a portrait's state)
SAFETENSORS_TEMPORARY = ".tmp" + "[0-9A-Za-z]" * 6
STALE_S = 3600.0  # older than any write takes (seconds for a video, a state file or a plan)
UNHELD_S = 10.0  # a temporary file no process holds (hold) is left over once untouched this long (the moment
# between its making and its writer's hold aside)


def hold(path: Path, create: bool = False) -> int | None:
    """Take an advisory lock (``flock``) on the temporary file or folder at ``path`` that this process writes
    (``create``: a new empty file made there first, for a writer that opens it later, truncating): the lock goes
    when :func:`let_go` closes the descriptor returned, or with the process however it ends (SIGKILL too), so
    that :func:`remove_stale` (``unheld_s``) knows a leftover of a dead writer at once. None where no lock can be
    taken (a file system without them): then age alone tells.

    Raises:
        OSError: with ``create``, the file cannot be made."""
    if create:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o666)
    else:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
    locked = _lock(fd)
    for _ in range(_PROBE_RETRIES):  # held: by another process's remove_stale asking whether it is held (the lock
        if locked is not False:  # it takes for that lasts microseconds), as this writer's own file is ours alone
            break
        time.sleep(0.005)
        locked = _lock(fd)
    if locked is not True:
        os.close(fd)
        return None
    return fd


def let_go(fd: int | None) -> None:
    """Release a :func:`hold`."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


_PROBE_RETRIES = 20  # 5 ms apart: :func:`hold` outwaits a :func:`_held` probe (a file left unheld is fair game)


def _held(path: Path) -> bool | None:
    """Whether a process holds ``path`` (:func:`hold`); None where that cannot be told (no locks there)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        locked = _lock(fd)  # (another descriptor's lock, ours included, refuses it)
    finally:
        os.close(fd)
    return None if locked is None else not locked


def _lock(fd: int) -> bool | None:
    """Take an exclusive ``flock`` on ``fd`` without waiting: True, False where another descriptor holds one, None
    where the file system (or the OS) takes no locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def remove_stale(folder: Path, pattern: str, max_age_s: float = STALE_S, *, folders: bool = False,
                 unheld_s: float | None = None) -> list[Path]:
    """Delete the files in ``folder`` matching the glob ``pattern`` last modified more than ``max_age_s``
    ago; returns them. With ``folders``: the matching folders (staging folders of interrupted exports) in which
    nothing was created, changed or removed for that long (neither the folder nor anything in it modified).
    With ``unheld_s``: also those untouched that long that no process holds (their writers :func:`hold` them), and
    never one a process holds, however old (a run of hours writes nothing into its result until its last step).
    One that vanishes meanwhile or cannot be deleted is skipped."""
    removed: list[Path] = []
    now = time.time()
    for path in folder.glob(pattern):
        try:
            if folders and (not path.is_dir() or path.is_symlink()):
                continue
            inside = path.rglob("*") if folders else ()
            age = now - max([path.stat().st_mtime, *(p.stat().st_mtime for p in inside)])
            held = _held(path) if unheld_s is not None else None
            if (age > max_age_s and held is not True) or (held is False and age > (unheld_s or 0.0)):
                shutil.rmtree(path) if folders else path.unlink()
                removed.append(path)
        except OSError:
            continue
    for path in removed:
        logger.info("removed %s, left by an interrupted %s", path, "export" if folders else "write")
    return removed


@contextlib.contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` (``.NAME.XXXXXXXX.part``) for the block to write, synced to disk and
    renamed to ``path`` when the block ends normally and removed where it raises (or the rename fails: that
    ``OSError`` comes out), so that no partial file ever carries the final name, a power loss included. For files
    written in pieces; bytes in hand: :func:`~megactor_rt.engine.cache.write_atomic`."""
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield partial
        replace_synced(partial, path)
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()


def sync_file(path: Path) -> None:
    """Flush a written file's data to disk, before it is renamed to its final name: without it a power loss soon
    after the rename can leave that name on an empty or partly written file (the rename reaches the disk first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_synced(written: Path, final: Path) -> None:
    """Rename the file ``written`` (whole) to ``final``, durably: its data synced to disk before the rename, the
    folder after it (a power loss leaves the old file or the whole new one under ``final``, never an empty one)."""
    sync_file(written)
    os.replace(written, final)
    sync_folder(final.parent)


def sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform can open a folder and sync it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# the process's umask, read once at import (reading it means setting it: not done later, beside other threads)
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created, with its folder, where missing) for the block:
    writers in other processes and threads (each opening it itself) take turns at a read-change-write (where the
    OS has no ``flock``, Windows: none do)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def umask_mode() -> int:
    """The permission bits a plain ``open()`` gives a new file under this process's umask (``0o666 & ~umask``):
    for files first written under a private temporary name (``mkstemp`` and safetensors make them 0600)."""
    return 0o666 & ~_UMASK


def folder_mode() -> int:
    """The permission bits a plain ``mkdir()`` gives a new folder under this process's umask (``mkdtemp``: 0700)."""
    return 0o777 & ~_UMASK


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
    """``path`` or its nearest ancestor that exists: where writing ``path`` (creating folders) starts (one this user
    may not look into, Path.exists raising EACCES under a folder it may not search, is passed by)."""
    return next(p for p in (path.absolute(), *path.absolute().parents) if _exists(p))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def not_writable(blocked: Path) -> str:
    """What :func:`unwritable` found, in words: ``X is a file, not a folder`` or ``X is not a writable folder``."""
    return f"{blocked} is a file, not a folder" if blocked.exists() and not blocked.is_dir() else \
        f"{blocked} is not a writable folder"


def check_output_folder(path: Path, flag: str, what: str = "the outputs") -> Path:
    """Check, before any work, that ``path`` can be a folder for a command's outputs (``what``): a folder already,
    or creatable (the command creates it once it has something to write).

    Raises:
        InputError: ``path`` is a file, or its nearest existing folder is not writable.
    """
    try:
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: {flag} names a folder for {what}, and this is a file")
    except OSError as exc:  # a folder above it this user may not search (Path.exists raises EACCES)
        raise InputError(f"{path}: {flag} cannot be looked at ({exc.strerror or exc}: {exc.filename or path})") from exc
    blocked = unwritable(path)
    if blocked is not None:
        raise InputError(f"{path}: {flag} cannot be written ({not_writable(blocked)})")
    return path


def unwritable(folder: Path) -> Path | None:
    """Where writing into ``folder`` (creating it and the folders above it that are missing) would fail: its
    nearest existing ancestor (or itself) when that is no writable folder; None when it can be written."""
    existing = nearest_folder(folder)
    return None if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK) else existing
