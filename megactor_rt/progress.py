"""The one progress helper for user-facing progress bars (tqdm), switchable off globally, and the Python API's
progress reports (``Animator.animate(..., on_progress=fn)``).

Every bar a run makes also reports to the function its run was given, if any: ``fn(Progress(stage, done, total,
unit))`` after each unit of work, in the thread doing that work. The hook is bound to the run's own generator
(:func:`reporting`), not to a thread or a process, so runs in other threads, or other runs interleaved in one
thread, each report to their own function only.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_ENABLED = os.environ.get("MEGACTOR_PROGRESS", "1") not in ("0", "false", "False")


@dataclass(frozen=True)
class Progress:
    """One progress report of a run.

    Attributes:
        stage: ``"driver"`` (pass 1: finding the driver's faces; again with dlib's CNN detector where HOG found
            none), ``"contour"`` (contour mode's landmark pass), ``"denoise"`` (window calls over all steps),
            ``"decode"`` (VAE decoder batches; with open windows, ``closed_loop=False``, frames are decoded as they
            finish, inside ``"denoise"``), ``"write"`` (frames written into the result: ``animate_to_file``).
        done: units of the stage done so far (1, 2, ... up to ``total``).
        total: the stage's units, None where not known in advance.
        unit: ``"frame"``, ``"window"`` or ``"batch"``.
    """

    stage: str
    done: int
    total: int | None
    unit: str


Reporter = Callable[[Progress], object]  # (what it returns is ignored: print, a file's write, ...)
_REPORTER: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("megactor_rt_reporter", default=None)


def set_progress_enabled(enabled: bool) -> None:
    """Turn every progress bar of megactor-rt on or off (also env MEGACTOR_PROGRESS=0); reports to ``on_progress``
    functions go on either way."""
    global _ENABLED
    _ENABLED = enabled


def progress_enabled() -> bool:
    return _ENABLED


class _Bar(tqdm):  # type: ignore[misc]  # (tqdm is untyped)
    """A tqdm bar that also reports each update to a run's :class:`Progress` function (counted here: a disabled
    tqdm counts nothing)."""

    def __init__(self, *, total: int | None, unit: str, stage: str, report: Reporter, **kwargs: Any) -> None:
        # (kept here: a disabled tqdm keeps neither its count nor its unit)
        self._stage, self._report, self._done, self._total, self._unit = stage, report, 0, total, unit
        super().__init__(total=total, unit=unit, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self._done += int(n or 0)
        self._report(Progress(self._stage, self._done, self._total, self._unit))
        return shown


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", leave: bool = False, stage: str | None = None) -> tqdm:
    """Wrap an iterable (or create a manual bar when ``iterable`` is None) in a progress bar; within a run given an
    ``on_progress`` function (:func:`reporting`), each item (or ``update``) is also reported to it as ``stage``
    (default: ``desc``)."""
    report = _REPORTER.get()
    if report is not None and iterable is not None and total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar: dict[str, Any] = {"total": total, "desc": desc, "unit": unit, "leave": leave, "disable": not _ENABLED,
                           "dynamic_ncols": True}
    if report is None:
        return tqdm(iterable, **bar)
    name = stage or desc
    if iterable is None:
        return _Bar(stage=name, report=report, **bar)

    def counted(items: Iterable[T]) -> Iterator[T]:
        for done, item in enumerate(items, 1):
            yield item  # (reported once the consumer has done its part with it)
            report(Progress(name, done, total, unit))

    return tqdm(counted(iterable), **bar)


def reporting(items: Iterator[T], report: Reporter | None) -> Iterator[T]:
    """``items`` (a run's generator) with ``report`` receiving the progress of every bar it makes while it runs:
    the function is set only while ``items`` computes its next item, so nothing outside the run reports to it."""
    if report is None:
        yield from items
        return
    try:
        while True:
            token = _REPORTER.set(report)
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                _REPORTER.reset(token)
            yield item
    finally:  # stopped early (closed, an error): the run's generator cleans up now, as with ``yield from``
        close = getattr(items, "close", None)
        if close is not None:
            close()
