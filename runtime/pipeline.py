"""Stage overlap with worker threads and bounded queues (works on CPU and GPU alike).

``prefetch`` runs a producer iterator on a worker thread, at most ``depth`` items ahead of the consumer,
and re-raises the producer's exception in the consumer. ``StageTimer`` accumulates wall time per stage and
the first-frame latency into a ``RunStats``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


@dataclass
class RunStats:
    """Observable facts of one ``animate`` run.

    Attributes:
        frames: output frames produced so far.
        stage_seconds: wall time per stage (stages may overlap, so they need not add up to the total).
        first_frame_s: seconds from the start of ``animate`` to the first yielded frame.
        total_s: seconds from start to the last frame.
        calls: submodel calls made during the run.
        portrait_cache_hit: whether the portrait state came from the cache.
    """

    frames: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    first_frame_s: float | None = None
    total_s: float | None = None
    calls: dict[str, int] = field(default_factory=dict)
    portrait_cache_hit: bool = False

    @property
    def fps(self) -> float | None:
        return self.frames / self.total_s if self.total_s else None


class StageTimer:
    """Wall time per stage; with ``sync`` (e.g. ``torch.cuda.synchronize``) a stage ends when its device work
    has finished, not when its last launch returned."""

    def __init__(self, stats: RunStats, sync: Callable[[], None] | None = None) -> None:
        self.stats = stats
        self.sync = sync
        self.start = time.perf_counter()
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            with self._lock:
                self.stats.stage_seconds[name] = self.stats.stage_seconds.get(name, 0.0) + time.perf_counter() - t0

    def frame_out(self) -> None:
        now = time.perf_counter() - self.start
        self.stats.frames += 1
        if self.stats.first_frame_s is None:
            self.stats.first_frame_s = now
        self.stats.total_s = now


def prefetch(items: Iterable[T], depth: int = 4, name: str = "prefetch") -> Iterator[T]:
    """Iterate ``items`` on a daemon thread, keeping at most ``depth`` results buffered."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
