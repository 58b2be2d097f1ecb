"""TensorRT runner: a deserialized plan behind the runtime's ``Runner`` interface (torch tensors in and out).

One execution context per CUDA stream that calls it (created lazily, up to ``max_contexts``), so several
streams can run the same engine concurrently. Each call sets the input shapes (``set_input_shape``), binds
torch tensors by address (``set_tensor_address``), allocates outputs from ``get_tensor_shape`` and runs
``execute_async_v3`` on the caller's current torch CUDA stream, except where that is the legacy default
stream (torch's unless the caller chose one), on which TensorRT adds device-wide synchronizations: then on a
stream of the calling thread's own, entered after the caller's queued work and waited for by the caller's
next (stream waits only; nothing synchronizes the host). With
``cuda_graph=True`` the first call at a given input shape is captured into a CUDA graph and replayed for
later calls at that shape (inputs are copied into static buffers; outputs are returned as fresh tensors).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
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
    check_plan_file,
    check_record,
    import_tensorrt,
    read_sidecar,
)

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int8": torch.int8, "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
                "uint8": torch.uint8}


@dataclass
class _ContextState:
    """One execution context and what it last had bound (per stream)."""

    context: Any
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    graph: torch.cuda.CUDAGraph | None = None
    graph_shapes: dict[str, tuple[int, ...]] | None = None
    static_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    static_outputs: dict[str, torch.Tensor] = field(default_factory=dict)


class TensorRTRunner(Runner):
    """Runs one TensorRT plan from the engine cache.

    Args:
        plan_dir: a cache directory holding ``engine.plan`` + ``engine.json`` (or the plan path itself).
        device: the machine to check the plan against (default: this process's GPU and TensorRT).
        max_contexts: most execution contexts (= concurrent streams) this runner creates.
        cuda_graph: capture and replay a CUDA graph per fixed input shape.
        verify_hash: check the plan bytes against the sidecar's sha256 before deserializing.
        name: runner name (default: the graph name).
    """

    def __init__(self, plan_dir: str | Path, *, device: DeviceInfo | None = None, max_contexts: int = 4,
                 cuda_graph: bool = False, verify_hash: bool = True, name: str | None = None) -> None:
        self.plan_dir = Path(plan_dir).parent if Path(plan_dir).suffix == ".plan" else Path(plan_dir)
        self.record: EngineRecord = read_sidecar(self.plan_dir)
        super().__init__(name or self.record.graph, list(self.record.inputs), list(self.record.outputs))
        if max_contexts < 1:
            raise InputError(f"max_contexts must be >= 1, got {max_contexts}")
        self.device_info = device
        self.max_contexts = max_contexts
        self.cuda_graph = cuda_graph
        self.verify_hash = verify_hash
        self._engine: Any = None
        self._runtime: Any = None
        self._contexts: dict[int, _ContextState] = {}
        self._lock = threading.Lock()
        self._own = threading.local()  # per thread: the stream used instead of the legacy default stream
        self._device = torch.device("cuda")

    # -- lifecycle -------------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        device = self.device_info or DeviceInfo.current()
        check_record(self.record, device, self.plan_dir)  # foreign plan -> EngineMismatch, before TensorRT
        plan = check_plan_file(self.plan_dir, self.record, verify_hash=self.verify_hash).read_bytes()
        trt = import_tensorrt()
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineMismatch(f"TensorRT {trt.__version__} could not deserialize {self.plan_dir} although its "
                                 f"sidecar matches this machine; {REBUILD_HINT}")
        self._engine = engine
        self._check_io(trt)

    def deactivate_impl(self) -> None:
        self._contexts.clear()
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

    # -- inference -------------------------------------------------------------------------------------
    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        caller = torch.cuda.current_stream(self._device)
        inputs = {n: self._prepare_input(n, feed[n]) for n in self.input_names}
        shapes = {n: tuple(t.shape) for n, t in inputs.items()}
        if self.cuda_graph:
            out = self._infer_graph(self._context_for(caller), inputs, shapes, caller)
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

    def _context_for(self, stream: torch.cuda.Stream) -> _ContextState:
        key = stream.cuda_stream
        with self._lock:
            state = self._contexts.get(key)
            if state is None:
                if len(self._contexts) >= self.max_contexts:
                    raise InputError(f"runner '{self.name}': more than {self.max_contexts} CUDA streams used it; "
                                     "raise max_contexts")
                context = self._engine.create_execution_context()
                if context is None:
                    raise ResourceError(f"runner '{self.name}': TensorRT could not create an execution context "
                                        f"(out of GPU memory?); {MEMORY_HINT}")
                state = self._contexts[key] = _ContextState(context)
            return state

    def _prepare_input(self, name: str, t: torch.Tensor) -> torch.Tensor:
        spec = self.record.inputs[name]
        dtype = TORCH_DTYPES[spec["dtype"]]
        if not isinstance(t, torch.Tensor):
            raise InputError(f"runner '{self.name}': input '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype and t.dtype.is_floating_point != dtype.is_floating_point:
            raise InputError(f"runner '{self.name}': input '{name}' is {t.dtype}, the engine takes {dtype}")
        self._check_shape(name, tuple(t.shape))
        return t.to(device=self._device, dtype=dtype).contiguous()

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        spec_shape = self.record.inputs[name]["shape"]
        limits = self.record.profile_shapes.get(name)
        lo, hi = (limits[0], limits[2]) if limits else (spec_shape, spec_shape)
        ok = len(shape) == len(spec_shape) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))
        if not ok:
            raise InputError(f"runner '{self.name}': input '{name}' has shape {list(shape)}; profile "
                             f"'{self.record.profile_name}' allows {list(lo)} .. {list(hi)}")

    def max_size(self, name: str, axis: int) -> int | None:
        """The plan's profile maximum (a static input: its size)."""
        limits = self.record.profile_shapes.get(name)
        return int((limits[2] if limits else self.record.inputs[name]["shape"])[axis])

    def _bind(self, state: _ContextState, inputs: Mapping[str, torch.Tensor],
              shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        ctx = state.context
        for name, t in inputs.items():
            if state.shapes.get(name) != shapes[name]:
                if not ctx.set_input_shape(name, shapes[name]):
                    raise InputError(f"runner '{self.name}': TensorRT rejected shape {list(shapes[name])} of '{name}'")
                state.shapes[name] = shapes[name]
            ctx.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise InputError(f"runner '{self.name}': output '{name}' has data-dependent shape {list(shape)}, "
                                 "which this runner does not support")
            out = torch.empty(shape, dtype=TORCH_DTYPES[self.record.outputs[name]["dtype"]], device=self._device)
            ctx.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        return outputs

    def _execute(self, state: _ContextState, stream: torch.cuda.Stream) -> None:
        if not state.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"runner '{self.name}': TensorRT execute_async_v3 failed (see the TensorRT log)")

    def _infer_eager(self, state: _ContextState, inputs: Mapping[str, torch.Tensor],
                     shapes: Mapping[str, tuple[int, ...]], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        outputs = self._bind(state, inputs, shapes)
        self._execute(state, stream)
        return outputs

    def _infer_graph(self, state: _ContextState, inputs: Mapping[str, torch.Tensor],
                     shapes: dict[str, tuple[int, ...]], stream: torch.cuda.Stream) -> dict[str, torch.Tensor] | None:
        """Replay (capturing first if the shapes changed); None when capture is impossible (eager fallback)."""
        stale = state.graph is None or state.graph_shapes != shapes
        if stale and not self._capture(state, inputs, shapes, stream):
            return None
        for name, t in inputs.items():
            state.static_inputs[name].copy_(t)
        assert state.graph is not None  # captured above
        state.graph.replay()
        return {n: t.clone() for n, t in state.static_outputs.items()}

    def _capture(self, state: _ContextState, inputs: Mapping[str, torch.Tensor],
                 shapes: dict[str, tuple[int, ...]], stream: torch.cuda.Stream) -> bool:
        if state.graph is not None:
            logger.info("runner '%s': input shapes changed, recapturing the CUDA graph", self.name)
        state.graph = state.graph_shapes = None
        state.static_inputs = {n: torch.empty_like(t) for n, t in inputs.items()}
        state.static_outputs = self._bind(state, state.static_inputs, shapes)
        for name, t in inputs.items():
            state.static_inputs[name].copy_(t)
        self._execute(state, stream)  # warm-up: TensorRT does its shape-dependent setup outside the capture
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(self._device)
        side.wait_stream(stream)
        try:
            with torch.cuda.graph(graph, stream=side):
                self._execute(state, side)
        except Exception as exc:  # e.g. engines with data-dependent control flow
            logger.warning("runner '%s': CUDA graph capture failed (%s); running without graphs", self.name, exc)
            self.cuda_graph = False
            return False
        stream.wait_stream(side)
        state.graph, state.graph_shapes = graph, dict(shapes)
        return True
