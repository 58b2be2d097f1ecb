"""Stage overlap: worker threads with bounded queues (CPU and GPU) and CUDA streams with events (GPU).

``prefetch`` runs a producer iterator on a worker thread, at most ``depth`` items ahead of the consumer,
and re-raises the producer's exception in the consumer. ``ordered_map`` applies a function on a shared pool
of threads (for work that releases the GIL, e.g. face detection), in order, a bounded number in flight.
``InFlight`` launches device work ahead of its consumer: on CUDA each item runs on a side stream and lands
in pinned host memory, an event marks it done, so the GPU computes item i+1.. while the host consumes item
i. ``StageTimer`` accumulates wall time per stage and the first-frame latency into a ``RunStats``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TypeVar, cast

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")
_DONE = object()


@dataclass
class RunStats:
    """Observable facts of one ``animate`` run.

    Attributes:
        frames: output frames produced so far.
        stage_seconds: wall time per stage (stages may overlap, so they need not add up to the total).
        first_frame_s: seconds from the start of ``animate`` to the first yielded frame.
        total_s: seconds from start to the last frame.
        calls: submodel calls made during the run (``unet`` counts every UNet call, ``unet_reuse`` those of
            them that reused the kept deep features of ``feature_reuse``), up to where it stopped for a run closed
            early or failed.
        portrait_cache_hit: whether the portrait state came from the cache (set by ``animate_to_file``, which
            prepares the portrait; ``animate`` takes a state prepared before and leaves it False).
        driver_plan_hit: whether the driver's plan (pass 1: its faces and crop) was kept from an earlier run of
            this Animator (or one made by its ``with_config``) on the same driver file with the same settings.
        step_seconds: wall time of each denoising step (device work finished, on GPU); empty for open windows
            (``closed_loop=False``), whose steps interleave.
        resumed_from_step: the step a run with a checkpoint began with (0: the first; see
            :mod:`~megactor_rt.runtime.checkpoint`).
    """

    frames: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    first_frame_s: float | None = None
    total_s: float | None = None
    calls: dict[str, int] = field(default_factory=dict)
    portrait_cache_hit: bool = False
    driver_plan_hit: bool = False
    step_seconds: list[float] = field(default_factory=list)
    resumed_from_step: int = 0

    @property
    def fps(self) -> float | None:
        return self.frames / self.total_s if self.total_s else None

    def as_dict(self) -> dict[str, Any]:
        """The facts as plain JSON values (``fps`` included)."""
        return {"frames": self.frames, "fps": self.fps, "total_s": self.total_s,
                "first_frame_s": self.first_frame_s, "stage_seconds": dict(self.stage_seconds),
                "step_seconds": list(self.step_seconds), "calls": dict(self.calls),
                "portrait_cache_hit": self.portrait_cache_hit, "driver_plan_hit": self.driver_plan_hit,
                "resumed_from_step": self.resumed_from_step}


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

    def step_clock(self) -> Callable[[int], None]:
        """A ``denoise(on_step=...)`` hook that appends each step's time to ``stats.step_seconds``."""
        last: list[float] = []

        def tick(i: int) -> None:
            if self.sync is not None:
                self.sync()
            now = time.perf_counter()
            if last:
                self.stats.step_seconds.append(now - last[0])
            last[:] = [now]
        return tick

    def add(self, name: str, seconds: float) -> None:
        """Add time measured elsewhere (e.g. device time from CUDA events) to a stage."""
        with self._lock:
            self.stats.stage_seconds[name] = self.stats.stage_seconds.get(name, 0.0) + seconds

    def frame_out(self) -> None:
        now = time.perf_counter() - self.start
        self.stats.frames += 1
        if self.stats.first_frame_s is None:
            self.stats.first_frame_s = now
        self.stats.total_s = now


class Cancelled(Exception):  # noqa: N818 - a state, not a failure
    """Raised by :func:`check_cancelled` in a :func:`prefetch` producer (or :func:`in_thread` worker) whose consumer
    has stopped."""


_producer = threading.local()  # .stop: the stop event of the prefetch this thread produces for
# how long a stopping consumer waits for its producer to reach a cancellation point (one UNet window call
# or decode batch; an interpreter exiting while a worker is inside torch aborts the process)
JOIN_S = 120.0
# producers whose consumer stopped, with the event each sets when its work has ended (see abandoned_workers);
# not Thread.is_alive(): a join broken off by Ctrl-C marks a running thread as stopped (CPython bpo-45274)
_abandoned: list[tuple[threading.Thread, threading.Event]] = []
_abandoned_lock = threading.Lock()


def abandoned_workers() -> list[threading.Thread]:
    """The :func:`prefetch` producer threads still running after their consumer stopped and waited
    ``JOIN_S`` for them (e.g. inside a ``torch.compile`` compilation, which cannot be cancelled). An interpreter
    shutting down meanwhile can wait for them indefinitely: the CLI ends the process without waiting."""
    with _abandoned_lock:
        _abandoned[:] = [(t, ended) for t, ended in _abandoned if not ended.is_set()]
        return [t for t, _ in _abandoned]


def note_abandoned(thread: threading.Thread, ended: threading.Event) -> None:
    """Count ``thread`` among :func:`abandoned_workers` until ``ended`` is set (a worker of another kind than
    :func:`prefetch`'s that could not be stopped in time, e.g. :mod:`megactor_rt.server`'s)."""
    with _abandoned_lock:
        _abandoned.append((thread, ended))


def check_cancelled() -> None:
    """Raise :class:`Cancelled` where this thread produces items for a :func:`prefetch` whose consumer has
    stopped (closed it, or raised, e.g. on Ctrl-C), or computes them for an :func:`in_thread` left early: long
    loops (denoising windows, decode batches, driver frames) call it so abandoned work stops at the next window
    instead of running to the end. Elsewhere (the caller's own thread) a no-op."""
    stop = getattr(_producer, "stop", None)
    if stop is not None and stop.is_set():
        raise Cancelled("the consumer of this work has stopped")


async def in_thread(items: Iterator[T], name: str = "async") -> AsyncIterator[T]:
    """``items`` for asyncio: each one computed on a thread of its own (one for the whole iteration, as a generator
    holding thread-local state - PyTorch's grad mode, CUDA streams - needs), so the event loop goes on serving
    meanwhile. Leaving early (``break``, a cancelled task, ``aclose()``) closes ``items`` on that thread, as
    :func:`contextlib.closing` stops a run; an item still in progress (a task cancelled while it waits) is
    cancelled at its next :func:`check_cancelled` (a window call, a decode batch), as a stopped :func:`prefetch`
    cancels its producer, instead of being computed to its end (with wrapping windows the first frame is the
    whole denoising)."""
    stop = threading.Event()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_produce_for, initargs=(stop,))
    loop = asyncio.get_running_loop()
    end = object()
    try:
        while True:
            item = await loop.run_in_executor(worker, next, items, end)
            if item is end:
                return
            yield cast(T, item)
    finally:
        stop.set()  # an item in progress raises Cancelled at its next check (nobody waits for it: dropped)
        close = getattr(items, "close", None)
        if close is not None:
            worker.submit(close).add_done_callback(_closed)  # (after the item in progress: the same thread; not
            # awaited: a cancelled task)
        worker.shutdown(wait=False)


def _closed(done: Future[object]) -> None:
    """Log an error of :func:`in_thread`'s close of its items (was: dropped with its future, unseen)."""
    error = done.exception()
    if error is not None and not isinstance(error, Cancelled):
        logger.warning("closing the run left early failed: %s: %s", type(error).__name__, error)


def _produce_for(stop: threading.Event) -> None:
    """Make :func:`check_cancelled` on this (worker) thread raise once ``stop`` is set."""
    _producer.stop = stop


def cancellable(items: Iterable[T]) -> Iterator[T]:
    """``items``, with :func:`check_cancelled` before each."""
    for item in items:
        check_cancelled()
        yield item


def prefetch(items: Iterable[T], depth: int = 4, name: str = "prefetch",
             on_stop: Callable[[], None] | None = None) -> Generator[T, None, None]:
    """Iterate ``items`` on a daemon thread, keeping at most ``depth`` results buffered. When the consumer
    stops early (closes the iterator or raises), the producer is cancelled at its next
    :func:`check_cancelled` or item, ``items`` is closed on its thread, and the consumer waits for that.

    ``on_stop`` is called first when the iteration ends other than by exhausting ``items`` (an error, Ctrl-C,
    SIGTERM, an early close), before that wait: e.g. discarding a half-written output at once rather than after
    up to ``JOIN_S`` (a ``docker stop`` kills the process 10 s after its SIGTERM)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, ended = threading.Event(), threading.Event()
    # a new thread starts on the default CUDA stream: the producer's device work goes on the caller's stream
    # instead, ordered after what the caller queued there (a portrait state prepared under `with
    # torch.cuda.stream(s)`, say)
    stream = torch.cuda.current_stream() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        _producer.stop = stop
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                for item in items:
                    if not put(item):
                        return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer (a Cancelled one is dropped: nobody waits)
            put(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # a generator left at a yield: run its cleanup here, not at garbage collection
                try:
                    close()
                except BaseException as exc:  # noqa: BLE001 - nobody is left to hand it to
                    logger.warning("%s: error while closing the abandoned producer: %s", name, exc)
            ended.set()

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    exhausted = False
    try:
        while True:
            item = q.get()
            if item is _DONE:
                exhausted = True
                return
            if isinstance(item, BaseException):
                try:
                    raise item
                finally:  # else this frame (via `item`) and the exception's traceback (via this frame) keep each
                    item = None  # other, and every producer frame, alive until a garbage collection
            yield item
    finally:
        stop.set()
        # listed before on_stop and the wait, so that a second Ctrl-C / SIGTERM breaking either off leaves it
        # listed; abandoned_workers() leaves out the threads that have ended
        with _abandoned_lock:
            _abandoned[:] = [*((t, e) for t, e in _abandoned if not e.is_set()), (thread, ended)]
        if on_stop is not None and not exhausted:
            try:
                on_stop()
            except Exception as exc:  # noqa: BLE001 - the error that stopped the iteration is the one to report
                logger.warning("%s: error while stopping: %s", name, exc)
        if ended.wait(timeout=JOIN_S):
            thread.join(timeout=5.0)  # past its last statement: only returning is left (a moment, but under load
            # the thread was still listed by threading.enumerate() when the caller looked)
        else:
            logger.warning("%s: the worker thread did not stop within %.0f s", name, JOIN_S)


def default_workers() -> int:
    """Threads for CPU-side per-frame work: the machine's cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads, kept for reuse: per-thread state (e.g. a face detector,
    about half a second to build) survives from one driver video to the next."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix=f"megactor-pool{workers}")
        return _POOLS[workers]


def ordered_map(fn: Callable[[T], U], items: Iterable[T], workers: int | None = None
                ) -> Generator[U, None, None]:
    """``map(fn, items)`` on ``workers`` threads of a shared pool (default ``default_workers()``): results in
    input order, at most ``2 * workers`` items in flight (so an endless ``items`` is fine), the first
    exception re-raised. The consumer's pace bounds the work done ahead. Stopped early (an error, a close),
    ``items`` is closed (a driver pass's video file: at once, not when the error, whose traceback holds this
    frame, is dropped)."""
    workers = workers or default_workers()
    pending: deque[Future[U]] = deque()
    try:
        if workers == 1:
            yield from map(fn, items)
            return
        pool = shared_pool(workers)
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        _close(items)


def _close(items: Iterable[object]) -> None:
    """Close ``items`` where it can be (a generator: a driver pass's video file goes at once)."""
    close = getattr(items, "close", None)
    if close is not None:
        close()


def map_repeats(fn: Callable[[T], U], items: Iterable[T], workers: int | None = None) -> Generator[U, None, None]:
    """:func:`ordered_map`, with ``fn`` computed once for an item repeated in a row (the same object: a driver's
    constant-rate grid repeats a frame over a gap in its timestamps, an hour of them for a clip with an hour's
    gap) and its result given for each repeat."""
    def runs() -> Generator[tuple[T, int], None, None]:
        count, last = 0, list[T]()  # (the item of the run counted: none before the first)
        try:
            for item in items:
                if last and item is last[0]:
                    count += 1
                    continue
                if last:
                    yield last[0], count
                count, last = 1, [item]
            if last:
                yield last[0], count
        finally:
            _close(items)

    with closing(ordered_map(lambda run: (fn(run[0]), run[1]), runs(), workers)) as done:
        for result, count in done:
            for _ in range(count):
                yield result


def to_device_queued(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device``; to a GPU from pinned memory without blocking, so the copy is queued like a kernel
    instead of making the host wait for the device work queued before it (a copy from pageable memory does)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class InFlight:
    """Runs ``fn(item) -> tensor`` for a stream of items with up to ``depth`` of them in flight.

    On a CUDA device each call is issued on a dedicated side stream (which first waits for the work already
    queued on the caller's stream), its result is copied into pinned host memory without blocking, and a
    pair of timing events brackets it; ``map`` hands out result i only once its end event has completed and
    issues item i+depth before doing so, so the device keeps working while the host consumes. The caller
    must not modify the tensors ``fn`` reads until ``map`` is exhausted; an item (e.g. a tensor ``fn`` reads)
    stays referenced until its call is done, so the memory of an input made for one call is not reused early. ``device_seconds`` sums the device
    time of the calls (CUDA events). ``launch`` / ``ready`` / ``drain`` do the same for items that appear while
    the caller's stream keeps working (each launch first waits for the work queued there so far).

    Elsewhere (or with ``streams=False``) each call runs when its result is asked for, and ``device_seconds``
    is its wall time (after a device synchronize).
    """

    def __init__(self, device: torch.device, depth: int = 3, streams: bool = True) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.device, self.depth = device, depth
        self.stream = torch.cuda.Stream(device) if streams and device.type == "cuda" else None
        self.device_seconds = 0.0
        self.launched = 0
        self._pending: deque[tuple] = deque()  # launched on the side stream (launch / ready / drain)
        self._done: deque[torch.Tensor] = deque()  # computed without a side stream, not yet handed out

    def _run_now(self, fn: Callable[[T], torch.Tensor], item: T) -> torch.Tensor:
        self.launched += 1
        t0 = time.perf_counter()
        out = fn(item)
        if out.device.type == "cuda":  # streams disabled on a CUDA device: time the device work
            torch.cuda.synchronize(out.device)
        self.device_seconds += time.perf_counter() - t0
        return out.cpu()

    def _launch(self, fn: Callable[[T], torch.Tensor], item: T) -> tuple:
        assert self.stream is not None
        self.launched += 1
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            out = fn(item)
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            end.record(self.stream)
        return host, out, start, end, item  # ``out`` and ``item`` (its input) stay referenced until it is done

    def _finish(self, launched: tuple) -> torch.Tensor:
        host, _, start, end, _ = launched
        end.synchronize()
        self.device_seconds += start.elapsed_time(end) / 1e3
        return host

    def map(self, fn: Callable[[T], torch.Tensor], items: Iterable[T]) -> Iterator[torch.Tensor]:
        """Yield ``fn(item)`` as host tensors, in order."""
        if self.stream is None:  # nothing runs concurrently: compute each item only when it is asked for
            for item in items:
                yield self._run_now(fn, item)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        source = iter(items)
        pending = deque(self._launch(fn, item) for item in islice(source, self.depth))
        while pending:
            host = self._finish(pending.popleft())
            pending.extend(self._launch(fn, item) for item in islice(source, 1))  # next one before handing out
            yield host

    # -- incremental use: items that become available while other device work runs (streamed denoising) --
    def launch(self, fn: Callable[[T], torch.Tensor], item: T) -> None:
        """Start ``fn(item)`` now, after the work already queued on the caller's stream (which may have produced
        its inputs since the last launch); its result comes out of :meth:`ready` or :meth:`drain`. Without a
        side stream it runs here, to completion."""
        if self.stream is None:
            self._done.append(self._run_now(fn, item))
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._pending.append(self._launch(fn, item))

    def ready(self) -> Iterator[torch.Tensor]:
        """The launched results that are done, in launch order, without waiting; waits only while more than
        ``depth`` are pending (bounded host memory)."""
        while self._done:
            yield self._done.popleft()
        while self._pending and (len(self._pending) > self.depth or self._pending[0][3].query()):
            yield self._finish(self._pending.popleft())

    def drain(self) -> Iterator[torch.Tensor]:
        """Every launched result not yet handed out, in launch order (waits for them)."""
        yield from self.ready()
        while self._pending:
            yield self._finish(self._pending.popleft())
