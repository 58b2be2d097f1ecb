"""TensorRT runner: a deserialized plan behind the runtime's ``Runner`` interface (torch tensors in and out).

One execution context per CUDA stream that calls it (created lazily, up to ``max_contexts``; a new stream first
takes an idle one), so several streams can run the same engine concurrently where its inputs are static; a plan
with dynamic inputs holds one optimization profile, which TensorRT's contexts must not use concurrently
(NvInferRuntime.h, ``IExecutionContext``), so its calls take turns, each enqueued after and running on the
device after the previous one, whichever context (or CUDA graph) that was on. A stream beyond ``max_contexts``
takes over the least recently used stream's context,
and its first call waits on the device (a CUDA event) for that context's last one (every run's decode side
stream is a new one: before 2026-11-27 the fifth run on one runner was refused). Each call sets the input shapes
(``set_input_shape``), binds torch tensors by address (``set_tensor_address``), allocates outputs from
``get_tensor_shape`` and runs ``execute_async_v3`` on the caller's current torch CUDA stream, except where that
is the legacy default stream (torch's unless the caller chose one), on which TensorRT adds device-wide
synchronizations: then on a stream of the calling thread's own, entered after the caller's queued work and
waited for by the caller's next (stream waits only; nothing synchronizes the host). Calls that share a context
(threads on one stream) bind and enqueue one at a time. With ``cuda_graph=True`` the first call at a given set
of input shapes is captured into a CUDA graph on an execution context of its own and replayed for later calls at
those shapes, on the caller's stream (inputs are copied into static buffers, outputs returned as fresh tensors;
a call from another stream first waits on the device for the graph's previous replay). Up to ``max_graphs``
graphs are kept, least recently used dropped first, so calls that alternate between shapes (a step's K-window
calls and its single leftover window) replay instead of recapturing; each kept graph holds its context's
activation memory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megactor_rt.errors import MEMORY_HINT, EngineMismatch, InputError, ResourceError
from megactor_rt.runner import Runner

from .cache import (
    REBUILD_HINT,
    DeviceInfo,
    EngineRecord,
    check_record,
    import_tensorrt,
    read_plan,
    read_sidecar,
    trt_logger,
)

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int8": torch.int8, "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
                "uint8": torch.uint8}


# TensorRT takes tensor addresses aligned to 256 bytes (NvInferRuntime.h, setTensorAddress)
ADDRESS_ALIGNMENT = 256


@dataclass
class _ContextState:
    """One execution context and what it last had bound (per stream), or one captured CUDA graph with the
    context and static buffers it was captured on."""

    context: Any
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # bind + enqueue (or copy + replay) of one call
    graph: torch.cuda.CUDAGraph | None = None
    static_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    static_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    done: Any = None  # a CUDA event recorded after the last call enqueued on this context (or graph)
    done_stream: int | None = None  # the stream that call went on

    def follow(self, stream: torch.cuda.Stream) -> None:
        """Make ``stream`` wait (on the device) for this context's last call where that went on another
        stream: its activation memory (or static buffers) is reused now. Under ``lock``."""
        if self.done is not None and self.done_stream != stream.cuda_stream:
            stream.wait_event(self.done)

    def idle(self) -> bool:
        """No call holds it and the device has finished its last one (a context another stream may take)."""
        return not self.lock.locked() and (self.done is None or bool(self.done.query()))

    def mark(self, stream: torch.cuda.Stream) -> None:
        """Record that a call has just been enqueued on ``stream``. Under ``lock``."""
        self.done = torch.cuda.Event()
        self.done.record(stream)
        self.done_stream = stream.cuda_stream


def aligned_for_tensorrt(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous at an address TensorRT accepts: a copy where it is not contiguous or is a view that
    starts inside its storage at an offset breaking the alignment (torch's CUDA allocator hands out blocks
    aligned to 512 bytes)."""
    t = t.contiguous()
    return t.clone() if t.data_ptr() % ADDRESS_ALIGNMENT else t


class TensorRTRunner(Runner):
    """Runs one TensorRT plan from the engine cache.

    Args:
        plan_dir: a cache directory holding ``engine.plan`` + ``engine.json`` (or the plan path itself).
        device: the machine to check the plan against (default: this process's GPU and TensorRT).
        max_contexts: most execution contexts (= streams running it concurrently) this runner creates for eager
            calls; further streams take over the least recently used stream's context.
        cuda_graph: capture and replay a CUDA graph per fixed input shape.
        max_graphs: most CUDA graphs (each on a context of its own) kept at once with ``cuda_graph``.
        verify_hash: check the plan bytes against the sidecar's sha256 before deserializing.
        name: runner name (default: the graph name).
        cuda_device: the GPU that runs the plan (a ``torch.device('cuda', i)`` or its index; default: the
            current device when it is loaded); it is made current around every TensorRT call.
    """

    def __init__(self, plan_dir: str | Path, *, device: DeviceInfo | None = None, max_contexts: int = 4,
                 cuda_graph: bool = False, max_graphs: int = 3, verify_hash: bool = True,
                 name: str | None = None, cuda_device: torch.device | int | None = None) -> None:
        self.plan_dir = Path(plan_dir).parent if Path(plan_dir).suffix == ".plan" else Path(plan_dir)
        if not self.plan_dir.is_dir():
            raise InputError(f"plan folder {self.plan_dir} {'is a file' if self.plan_dir.exists() else 'does not exist'}"
                             " (give a plan's folder under the engine dir, or its engine.plan)")
        self.record: EngineRecord = read_sidecar(self.plan_dir)
        super().__init__(name or self.record.graph, list(self.record.inputs), list(self.record.outputs))
        if max_contexts < 1 or max_graphs < 1:
            raise InputError(f"max_contexts and max_graphs must be >= 1, got {max_contexts} and {max_graphs}")
        self.device_info = device
        self.max_contexts = max_contexts
        self.cuda_graph = cuda_graph
        self.verify_hash = verify_hash
        self._engine: Any = None
        self._runtime: Any = None
        self.max_graphs = max_graphs
        self.captures = 0  # CUDA graphs captured so far
        self._contexts: OrderedDict[int, _ContextState] = OrderedDict()  # stream -> context, least recent first
        self._graphs: OrderedDict[tuple, _ContextState] = OrderedDict()  # input shapes -> graph
        self._lock = threading.Lock()
        self._own = threading.local()  # per thread: the stream used instead of the legacy default stream
        # "If the engine supports dynamic shapes, each execution context in concurrent use must use a separate
        # optimization profile" (NvInferRuntime.h, class IExecutionContext, TensorRT 10/11). A plan holds one
        # profile, so the contexts (eager and graph) of a plan with dynamic inputs take turns: each call is
        # enqueued after the plan's previous one, on any context, and runs after it on the device
        self.serial = any(d < 0 for spec in self.record.inputs.values() for d in spec["shape"])
        self._turn = _ContextState(context=None)  # with serial: the plan's last call, on whichever context
        self._device = torch.device("cuda")
        self._cuda_index = (cuda_device.index if isinstance(cuda_device, torch.device) else cuda_device)

    def identity(self) -> str:
        """TensorRT, and the ONNX graph the plan was built from."""
        return f"tensorrt:{self.record.onnx_sha256[:16]}"

    # -- lifecycle -------------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        device = self.device_info or DeviceInfo.current(self._cuda_index)
        check_record(self.record, device, self.plan_dir)  # foreign plan -> EngineMismatch, before TensorRT
        plan = read_plan(self.plan_dir, self.record, verify_hash=self.verify_hash)
        trt = import_tensorrt()
        index = torch.cuda.current_device() if self._cuda_index is None else self._cuda_index
        self._device = torch.device("cuda", index)
        self._runtime = trt.Runtime(trt_logger(trt))
        with torch.cuda.device(self._device):  # the engine lives on the GPU current at deserialization
            engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineMismatch(f"TensorRT {trt.__version__} could not deserialize {self.plan_dir} although its "
                                 f"sidecar matches this machine; {REBUILD_HINT}")
        self._engine = engine
        self._check_io(trt)

    def deactivate_impl(self) -> None:
        if self._contexts or self._graphs:  # calls still queued on them must finish before they are destroyed
            torch.cuda.synchronize(self._device)
        self._contexts.clear()
        self._graphs.clear()
        self._turn = _ContextState(context=None)
        self._engine = None
        self._runtime = None

    def _check_io(self, trt: Any) -> None:
        from .builder import TRT_DTYPE_NAMES

        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        io = {n: (self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT,
                  TRT_DTYPE_NAMES.get(self._engine.get_tensor_dtype(n).name)) for n in names}
        expected = {n: (True, s["dtype"]) for n, s in self.record.inputs.items()}
        expected |= {n: (False, s["dtype"]) for n, s in self.record.outputs.items()}
        if io != expected:
            raise EngineMismatch(f"{self.plan_dir}: engine I/O {io} differs from its sidecar {expected}; "
                                 f"{REBUILD_HINT}")
        host = [n for n in names if self._engine.get_tensor_location(n) == trt.TensorLocation.HOST]
        if host:  # shape tensors: this runner binds GPU memory only (the export's graphs have none)
            raise EngineMismatch(f"{self.plan_dir}: the engine takes {host} in host memory (shape tensors), which "
                                 f"this runner does not bind; the plan was not built from this project's export; "
                                 f"{REBUILD_HINT}")

    # -- inference -------------------------------------------------------------------------------------
    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.cuda.device(self._device):  # contexts, enqueues and graphs on the plan's GPU (--device cuda:1)
            return self._infer_on_device(feed)

    def _infer_on_device(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        caller = torch.cuda.current_stream(self._device)
        inputs = {n: self._prepare_input(n, feed[n]) for n in self.input_names}
        shapes = {n: tuple(t.shape) for n, t in inputs.items()}
        if self.cuda_graph:
            out = self._infer_graph(inputs, shapes, caller)
            if out is not None:
                return out
        stream = self._enqueue_stream(caller)
        if stream is caller:
            return self._infer_eager(self._context_for(stream), inputs, shapes, stream)
        # Inputs and outputs are allocated on the caller's stream, which waits for this work before reusing
        # their memory: no record_stream needed.
        stream.wait_stream(caller)
        out = self._infer_eager(self._context_for(stream), inputs, shapes, stream)
        caller.wait_stream(stream)
        return out

    def _enqueue_stream(self, caller: torch.cuda.Stream) -> torch.cuda.Stream:
        """``caller``, or this thread's own stream where ``caller`` is the legacy default stream (handle 0):
        TensorRT's enqueue on it adds device synchronizations (NvInferRuntime.h, ``enqueueV3``)."""
        if caller.cuda_stream != 0:
            return caller
        own = getattr(self._own, "stream", None)
        if own is None:
            own = self._own.stream = torch.cuda.Stream(self._device)
        return own

    def _new_context(self) -> Any:
        context = self._engine.create_execution_context()
        if context is None:
            raise ResourceError(f"runner '{self.name}': TensorRT could not create an execution context "
                                f"(out of GPU memory?); {MEMORY_HINT}")
        return context

    def _context_for(self, stream: torch.cuda.Stream) -> _ContextState:
        """The execution context of ``stream``: its own; else an idle one (its last call done on the device),
        as each context holds activation memory for the plan's whole profile and every run's decode side stream
        is a new stream; else a new one while fewer than ``max_contexts`` exist; else the least recently used
        stream's (the call waits for that one's last on the device: :meth:`_ContextState.follow`)."""
        key = stream.cuda_stream
        with self._lock:
            state = self._contexts.pop(key, None)
            if state is None:
                idle = next((k for k, s in self._contexts.items() if s.idle()), None)
                if idle is not None:
                    state = self._contexts.pop(idle)
                elif len(self._contexts) >= self.max_contexts:
                    _, state = self._contexts.popitem(last=False)
                else:
                    state = _ContextState(self._new_context())
            self._contexts[key] = state  # the most recently used, last
            return state

    def _prepare_input(self, name: str, t: torch.Tensor) -> torch.Tensor:
        spec = self.record.inputs[name]
        dtype = TORCH_DTYPES[spec["dtype"]]
        if not isinstance(t, torch.Tensor):
            raise InputError(f"runner '{self.name}': input '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype and t.dtype.is_floating_point != dtype.is_floating_point:
            raise InputError(f"runner '{self.name}': input '{name}' is {t.dtype}, the engine takes {dtype}")
        self._check_shape(name, tuple(t.shape))
        if t.device.type == "cpu" and self._device.type == "cuda":  # (the timestep, made on the host every call)
            # a copy from pageable memory makes the host wait for the work queued on the stream before it (torch
            # synchronizes the stream); from pinned memory it is queued like a kernel
            t = t.pin_memory().to(self._device, non_blocking=True)
        return aligned_for_tensorrt(t.to(device=self._device, dtype=dtype))

    def shape_range(self, name: str) -> tuple[list[int], list[int], list[int]]:
        """Input ``name``'s (min, opt, max) shapes in this plan's profile (a static input: its shape thrice)."""
        limits = self.record.profile_shapes.get(name)
        spec_shape = list(self.record.inputs[name]["shape"])
        return (list(limits[0]), list(limits[1]), list(limits[2])) if limits else (spec_shape, spec_shape, spec_shape)

    def covers(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether this plan's profile takes inputs of these shapes."""
        for name, shape in shapes.items():
            lo, _, hi = self.shape_range(name)
            if not (len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))):
                return False
        return True

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.covers({name: shape}):
            lo, _, hi = self.shape_range(name)
            raise InputError(f"runner '{self.name}': input '{name}' has shape {list(shape)}; profile "
                             f"'{self.record.profile_name}' allows {list(lo)} .. {list(hi)}")

    def max_size(self, name: str, axis: int, where: Mapping[int, int] | None = None) -> int | None:
        """The plan's profile maximum (a static input: its size); 0 where the profile does not take the sizes
        ``where`` (axis -> size) of that input."""
        lo, _, hi = self.shape_range(name)
        if any(not lo[a] <= s <= hi[a] for a, s in (where or {}).items()):
            return 0
        return int(hi[axis])

    def _bind(self, state: _ContextState, inputs: Mapping[str, torch.Tensor],
              shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        ctx = state.context
        for name, t in inputs.items():
            if state.shapes.get(name) != shapes[name]:
                if not ctx.set_input_shape(name, shapes[name]):
                    raise InputError(f"runner '{self.name}': TensorRT rejected shape {list(shapes[name])} of '{name}'")
                state.shapes[name] = shapes[name]
            self._set_address(ctx, name, t)
        outputs = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise InputError(f"runner '{self.name}': output '{name}' has data-dependent shape {list(shape)}, "
                                 "which this runner does not support")
            out = torch.empty(shape, dtype=TORCH_DTYPES[self.record.outputs[name]["dtype"]], device=self._device)
            self._set_address(ctx, name, out)
            outputs[name] = out
        return outputs

    def _set_address(self, ctx: Any, name: str, t: torch.Tensor) -> None:
        """Bind ``t``; TensorRT answers False (and keeps the previous address) for one it does not take."""
        if not ctx.set_tensor_address(name, t.data_ptr()):
            raise RuntimeError(f"runner '{self.name}': TensorRT refused the address of '{name}' "
                               f"({t.data_ptr():#x}, {tuple(t.shape)}); see the TensorRT log")

    @contextlib.contextmanager
    def _in_turn(self, stream: torch.cuda.Stream) -> Iterator[None]:
        """Around one call's enqueue (or graph replay, or capture) on ``stream``: on a plan with dynamic inputs
        (``serial``), with no other call of the plan enqueuing meanwhile and after the plan's previous call on
        the device (a stream wait, no host sync) whichever context it ran on: TensorRT does not allow contexts
        sharing an optimization profile to run concurrently. A static plan's contexts run concurrently."""
        if not self.serial:
            yield
            return
        with self._turn.lock:
            self._turn.follow(stream)
            yield
            self._turn.mark(stream)

    def _execute(self, state: _ContextState, stream: torch.cuda.Stream) -> None:
        if not state.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"runner '{self.name}': TensorRT execute_async_v3 failed (see the TensorRT log)")

    def _infer_eager(self, state: _ContextState, inputs: Mapping[str, torch.Tensor],
                     shapes: Mapping[str, tuple[int, ...]], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        with state.lock, self._in_turn(stream):
            state.follow(stream)
            outputs = self._bind(state, inputs, shapes)
            self._execute(state, stream)
            state.mark(stream)
        return outputs

    def _infer_graph(self, inputs: Mapping[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                     caller: torch.cuda.Stream) -> dict[str, torch.Tensor] | None:
        """Replay the graph of these shapes on the caller's stream (capturing it first); None when capture is
        impossible (eager from then on)."""
        key = tuple(sorted(shapes.items()))
        with self._lock:
            state = self._graphs.get(key)
            if state is not None:
                self._graphs.move_to_end(key)
        if state is None:
            state = self._capture(inputs, shapes, caller)
            if state is None:
                return None
            with self._lock:
                kept = self._graphs.get(key)  # another stream captured these shapes meanwhile: keep that one
                if kept is not None:
                    evicted, state = [state], kept
                else:
                    self._graphs[key] = state
                    evicted = [self._graphs.popitem(last=False)[1]
                               for _ in range(len(self._graphs) - self.max_graphs)]
            for old in evicted:  # its replays may still be queued: let them finish before its memory goes
                with old.lock:
                    torch.cuda.synchronize(self._device)
        with state.lock, self._in_turn(caller):  # on the caller's (current) stream: copies, replay, clones
            with self._lock:
                if self._graphs.get(key) is not state:  # evicted meanwhile (its memory may go): run eagerly
                    return None
            state.follow(caller)
            for name, t in inputs.items():
                state.static_inputs[name].copy_(t)
            assert state.graph is not None  # captured
            state.graph.replay()
            out = {n: t.clone() for n, t in state.static_outputs.items()}
            state.mark(caller)
            return out

    def _capture(self, inputs: Mapping[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                 caller: torch.cuda.Stream) -> _ContextState | None:
        """A CUDA graph of one call at these shapes, on a new execution context (a graph fixes its context's
        shapes and addresses); None, and eager calls from then on, where TensorRT cannot be captured."""
        logger.info("runner '%s': capturing a CUDA graph for input shapes %s", self.name,
                    {n: list(s) for n, s in shapes.items()})
        state = _ContextState(self._new_context())
        state.static_inputs = {n: torch.empty_like(t) for n, t in inputs.items()}
        for name, t in inputs.items():
            state.static_inputs[name].copy_(t)
        # warm-up: TensorRT does its shape-dependent setup outside the capture (on a stream of this thread's
        # own where the caller's is the legacy default stream)
        stream = self._enqueue_stream(caller)
        stream.wait_stream(caller)
        with self._in_turn(stream):  # (binding too: the new context's shapes are set while no other call enqueues)
            state.static_outputs = self._bind(state, state.static_inputs, shapes)
            self._execute(state, stream)
            graph = torch.cuda.CUDAGraph()
            # torch hands out streams from a pool of 32 per device and priority, so a new one may be a stream
            # another thread is using now (its work would fall into the capture); this project makes every other
            # stream at the default priority, so a high-priority one is not shared
            side = torch.cuda.Stream(self._device, priority=-1)
            side.wait_stream(stream)
            try:
                # thread_local: other threads' CUDA work meanwhile (the driver feed, decode) does not void the capture
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    self._execute(state, side)
            except Exception as exc:  # e.g. engines with data-dependent control flow
                logger.warning("runner '%s': CUDA graph capture failed (%s); running without graphs", self.name,
                               exc)
                self.cuda_graph = False
                return None
        caller.wait_stream(side)
        state.graph = graph
        self.captures += 1
        return state

class ProfileSetRunner(Runner):
    """One graph's plans for several shape profiles (``build-engines`` builds every profile of the export:
    for the UNet ``default``, tuned for the export's window and windows per call, and ``long``, windows up to
    the positional encoding's length): each call runs on a plan whose profile takes its input shapes: of the
    plans already loaded, one tuned (opt) for exactly them, else the first; where none is loaded, the first
    in the given order. Plans are deserialized on first use, so a run that only needs one loads one (was,
    before 2026-11-27: a plan tuned for the shapes was preferred even unloaded, so an export at K windows per
    call loaded ``long`` as well, for the single windows ``default`` also takes: a second full-size UNet).

    Args:
        plan_dirs: the plans' cache directories, in order of preference.
        **options: :class:`TensorRTRunner`'s keyword arguments, for each plan.
    """

    def identity(self) -> str:
        """The plans' graph (every profile is a plan of one ONNX file)."""
        return self.runners[0].identity()

    def __init__(self, plan_dirs: Sequence[str | Path], **options: Any) -> None:
        if not plan_dirs:
            raise InputError("ProfileSetRunner needs at least one plan")
        self.runners = [TensorRTRunner(d, **options) for d in plan_dirs]
        first = self.runners[0]
        for r in self.runners[1:]:
            if (r.record.graph, r.input_names, r.output_names) != (first.record.graph, first.input_names,
                                                                    first.output_names):
                raise InputError(f"plans {first.plan_dir} and {r.plan_dir} are not of one graph "
                                 f"('{first.record.graph}' vs '{r.record.graph}')")
        super().__init__(options.get("name") or first.record.graph, first.input_names, first.output_names)

    def runner_for(self, shapes: Mapping[str, tuple[int, ...]]) -> TensorRTRunner:
        """The plan that runs inputs of these shapes.

        Raises:
            InputError: no plan's profile takes them (the message lists each profile's ranges).
        """
        fits = [r for r in self.runners if r.covers(shapes)]
        loaded = [r for r in fits if r.is_active]
        tuned = [r for r in loaded if all(r.shape_range(n)[1] == list(s) for n, s in shapes.items())]
        if fits:
            return (tuned or loaded or fits)[0]
        ranges = "; ".join(f"'{r.record.profile_name}': " + ", ".join(
            f"{n} {r.shape_range(n)[0]}..{r.shape_range(n)[2]}" for n in shapes) for r in self.runners)
        raise InputError(f"runner '{self.name}': no plan takes input shapes "
                         f"{ {n: list(s) for n, s in shapes.items()} } (profiles {ranges}); export and build "
                         "engines for this window (`megactor-rt export --window`, `--window-batch`)")

    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.runner_for({n: tuple(feed[n].shape) for n in self.input_names}).infer(feed)

    def deactivate_impl(self) -> None:
        for r in self.runners:
            r.deactivate()

    def max_size(self, name: str, axis: int, where: Mapping[int, int] | None = None) -> int | None:
        """The largest size any of the plans takes (of those whose profile takes the sizes ``where``; 0 if
        none does). E.g. the UNet's ``default`` plan takes 3 windows of the export's 16 frames and its ``long``
        plan one window of up to 32: 3 windows of 16 frames, one of 24."""
        return max(r.max_size(name, axis, where) or 0 for r in self.runners)
