"""The one progress helper for user-facing progress bars (tqdm), switchable off globally."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_ENABLED = os.environ.get("MEGACTOR_PROGRESS", "1") not in ("0", "false", "False")


def set_progress_enabled(enabled: bool) -> None:
    """Turn every progress bar of megactor-rt on or off (also env MEGACTOR_PROGRESS=0)."""
    global _ENABLED
    _ENABLED = enabled


def progress_enabled() -> bool:
    return _ENABLED


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", leave: bool = False) -> tqdm:
    """Wrap an iterable (or create a manual bar when ``iterable`` is None) in a progress bar."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=not _ENABLED,
                dynamic_ncols=True)
