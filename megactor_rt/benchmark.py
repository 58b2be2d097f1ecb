"""Benchmark scenarios (not tests): reference vs optimized evaluation in the same run, per-stage time,
first-frame latency, peak memory, FLOPs and achieved FLOP/s, against the measured matmul rate.

FLOPs are counted with ``torch.utils.flop_counter`` on the real calls: each distinct submodel call signature
(method + input shapes + options) is counted once during the warm-up run, then every timed call adds its
signature's count, so timed runs carry no counting overhead. Modes on the graph backends (``+onnxruntime``,
``+tensorrt``) run the same networks as exported graphs; their calls are counted on the torch networks (same
math, same signatures). ``megactor-rt bench --suite NAME`` runs a suite and writes ``results.json`` and
``results.md``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

import torch

from megactor_rt.config import AnimateConfig, Mode, ModelConfig, full_config, tiny_config
from megactor_rt.errors import InputError
from megactor_rt.files import check_output_folder, folder_mode, remove_stale
from megactor_rt.runtime.backends import device_name

logger = logging.getLogger(__name__)

METHODS = ("clip_tokens", "token_kv", "vae_encode", "vae_decode", "film", "pose_features", "pose_guider_full",
           "reference_bank", "unet")
# The denoise stage's FLOPs: the optimized modes compute the PoseGuider (pose_features) as the windows first need
# their frames, inside the denoise stage's time; the reference path runs it in every window call (pose_guider_full).
DENOISE_METHODS = ("unet", "reference_bank", "pose_guider_full", "pose_features")


def _count_cpu_attention() -> None:
    """Give SDPA's CPU kernel the FLOP formula ``torch.utils.flop_counter`` gives its GPU kernels (q k^T and the
    weighted sum of v). Without it (torch 2.13) every attention product on the CPU counted 0: the CPU FLOP
    figures before 2026-11-27 lack them."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_count_cpu_attention()


@dataclass(frozen=True)
class Scenario:
    """One benchmark setting, run once per mode (same inputs, same process)."""

    name: str
    model: str  # "tiny" | "full" (random weights, seeded)
    image_size: int
    frames: int
    window: int
    overlap: int
    steps: int
    guidance: float = 4.5
    modes: tuple[str, ...] = ("reference", "optimized")  # a mode, optionally "+variant" (see VARIANTS)
    precision: str = "fp32"
    repeats: int = 1
    note: str = ""
    cfg_steps: int | None = None  # CFG truncation (AnimateConfig.cfg_steps)
    feature_reuse: int | None = None  # feature reuse across steps (AnimateConfig.feature_reuse)


# variants of a mode, e.g. "optimized+serial-decode": same math, one run setting ("config", AnimateConfig
# fields) or backend setting ("submodels", TorchSubmodels attributes, restored afterwards) changed
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "serial-decode": {"config": {"decode_streams": False}},  # CUDA side stream for VAE decode off
    "compile": {"submodels": {"compile": True}},  # temporal UNet through torch.compile (Inductor)
    "compile-graphs": {"submodels": {"compile": "reduce-overhead"}},  # ... and CUDA graphs
    # changes the output: TAESD's tiny decoder (random weights written by the bench) instead of the VAE's
    "tiny-decoder": {"config": {"tiny_decoder": "random"}},
    # changes the math: open context windows (no wrap-around); the optimized mode then streams its frames
    "no-wrap": {"config": {"closed_loop": False}},
    # same math: up to 2 or 3 context windows per UNet call (AnimateConfig.window_batch)
    "batch2": {"config": {"window_batch": 2}},
    "batch3": {"config": {"window_batch": 3}},
    # the same networks as exported graphs (from the same random weights, into the bench's work folder): under
    # onnxruntime, or as TensorRT plans built there first (minutes per graph at full size; needs TensorRT)
    "onnxruntime": {"backend": {"name": "onnxruntime"}},
    "tensorrt": {"backend": {"name": "tensorrt"}},
    "tensorrt-graphs": {"backend": {"name": "tensorrt", "cuda_graphs": True}},  # ... replayed as CUDA graphs
    # with a graph backend: fp16 graphs exported with their attention softmax in fp16 (export --fp16-softmax)
    "fp16-softmax": {"export": {"fp16_softmax": True}},
    # same math: PyTorch's own ops where this project has kernels of its own (environment switches set for the
    # mode's runs only): SDPA for the motion modules' short attention, torch's GroupNorm then SiLU. With
    # "reference" it is the upstream path with PyTorch's ops, a second baseline (upstream's code itself runs the
    # motion modules' attention as bmm + softmax and its spatial attention through xformers: not measured here);
    # the plain "reference" shares every kernel with "optimized", so their ratio is the savings' alone. Eager
    # CUDA only: on the CPU these kernels never run, and compiled graphs read the switches at import.
    "upstream-ops": {"env": {"MEGACTOR_SHORT_ATTENTION": "0", "MEGACTOR_TRITON_GROUP_NORM": "0"}},
}
# the variants whose output differs from the reference path's beyond floating-point reordering: their speed-up
# over the reference is a faster setting's, not an exact-preserving saving's (marked so in the ratio table)
CHANGES_MATH = frozenset({"tiny-decoder", "no-wrap", "fp16-softmax"})


UPSTREAM = "reference+upstream-ops"  # the upstream path with PyTorch's own ops: the ratio table's second baseline


def changes_math(mode: str) -> bool:
    """Whether ``mode`` ("base+variant+...") has a variant in :data:`CHANGES_MATH`."""
    return any(v in CHANGES_MATH for v in mode.split("+")[1:])


def replays_cuda_graphs(mode: str) -> bool:
    """Whether ``mode`` replays CUDA graphs (``--compile reduce-overhead``, TensorRT plans as graphs): they are
    recorded on a call after the first of each shape, so its warm-up runs twice (:func:`warm_up`)."""
    from megactor_rt.runtime.submodels import replays_cuda_graphs as compiled_with_graphs

    variants = mode.split("+")[1:]
    return any(compiled_with_graphs(VARIANTS.get(v, {}).get("submodels", {}).get("compile", False))
               or VARIANTS.get(v, {}).get("backend", {}).get("cuda_graphs") for v in variants)


def mode_priority(mode: str) -> int:
    """When a suite runs ``mode`` (see :func:`in_run_order`): 0 the eager reference and optimized paths (the
    headline ratio, and the faster settings at their cheapest), 1 the compiled and graph backends (the speed
    question; minutes of compilation or plan building each), 2 the other variants (same-math and math-changing
    alternatives)."""
    base, *variants = mode.split("+")
    if not variants or all(set(VARIANTS.get(v, {})) == {"env"} for v in variants):  # a baseline (upstream-ops)
        return 0
    if any(v in ("compile", "compile-graphs") or "backend" in VARIANTS.get(v, {}) for v in variants):
        return 1
    return 2


def in_run_order(suite: str, scenarios: Sequence[Scenario]) -> list[Scenario]:
    """The order a suite's scenarios run in. A ``gpu-*`` suite (run in a GPU session's time slice) is split by
    :func:`mode_priority` and run priority by priority (within one, in suite order), so a slice that ends early
    still holds the reference-vs-optimized ratio and every faster setting (eager: seconds each) before the
    compilations (2026-11-26/27: the whole slice went to scenario 1's modes and the faster settings were never
    reached). The report groups results by scenario name as before. Other suites keep their order: there a
    scenario's modes alternate round by round with ``repeats`` (a variant beside its base on a machine whose
    speed drifts), and each scenario's networks are built once."""
    if not suite.startswith("gpu-"):
        return list(scenarios)
    return [replace(sc, modes=modes) for rank in range(3) for sc in scenarios
            if (modes := tuple(m for m in sc.modes if mode_priority(m) == rank))]


def random_tiny_decoder(work_dir: Path) -> Path:
    """A random-weight TAESD decoder in the Hugging Face layout (seed 0), written once into ``work_dir``."""
    folder = work_dir / "taesd-random"
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        from diffusers import AutoencoderTiny

        torch.manual_seed(0)
        model: Any = AutoencoderTiny()  # diffusers' mixins are not visible to mypy
        remove_stale(work_dir, ".taesd-random.*", folders=True)  # of runs killed an hour ago or more
        staging = Path(tempfile.mkdtemp(prefix=".taesd-random.", dir=work_dir))  # renamed once complete: an
        try:  # interrupted write is never taken for the decoder by a later run in this work folder
            staging.chmod(folder_mode())  # as a plain mkdir makes it: a shared work folder's users read it
            model.save_pretrained(staging)
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder of an older version of this code
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder

SUITES: dict[str, list[Scenario]] = {
    "cpu-tiny": [Scenario("tiny 128px, 12 frames, w4/o2, 3 steps", "tiny", 128, 12, 4, 2, 3, repeats=2)],
    "cpu-smoke": [Scenario("tiny 128px, 4 frames, w4/o2, 1 step", "tiny", 128, 4, 4, 2, 1)],
    "cpu-full-256": [
        # 3 interleaved runs per mode: this 2-core machine's speed drifts (one window call took 15.1, 15.8 and
        # 20.2 s in a row); the ratio table takes each mode's median
        Scenario("full-size 256px, 8 frames, w4/o2, 2 steps", "full", 256, 8, 4, 2, 2, repeats=3,
                 modes=("reference", "optimized", "optimized+tiny-decoder")),
        Scenario("faster: CFG in the first of 2 steps", "full", 256, 8, 4, 2, 2, modes=("optimized",),
                 cfg_steps=1, note="changes the math: CFG truncation"),
        Scenario("faster: the second of 2 steps reuses the first's deep features", "full", 256, 8, 4, 2, 2,
                 modes=("optimized",), feature_reuse=2, note="changes the math: feature reuse"),
    ],
    # same math, bigger UNet calls (AnimateConfig.window_batch): the tiny model is overhead-bound, as a GPU is
    # for small calls; at full size the CPU's matrix multiplies are large already
    "cpu-window-batch": [
        Scenario("tiny 128px, 12 frames (6 windows), w4/o2, 3 steps", "tiny", 128, 12, 4, 2, 3, repeats=2,
                 modes=("optimized", "optimized+batch2", "optimized+batch3", "optimized+onnxruntime",
                        "optimized+onnxruntime+batch3"), note="same math (onnxruntime: the same graphs)"),
        Scenario("full-size 256px, 8 frames (4 windows), w4/o2, 2 steps", "full", 256, 8, 4, 2, 2,
                 modes=("optimized", "optimized+batch2"), note="same math"),
    ],
    "gpu-full": [
        Scenario("full 512px fp16, 48 frames, w16/o8, 25 steps (upstream)", "full", 512, 48, 16, 8, 25,
                 modes=("reference", "optimized", UPSTREAM, "optimized+compile", "optimized+compile-graphs",
                        "optimized+batch3", "optimized+no-wrap"), precision="fp16"),
        Scenario("faster: 10 steps, w16/o4", "full", 512, 48, 16, 4, 10, modes=("optimized", "optimized+compile"),
                 precision="fp16", note="changes the math: fewer DDIM steps, less overlap"),
        Scenario("faster: 6 steps, w16/o0", "full", 512, 48, 16, 0, 6, modes=("optimized", "optimized+compile"),
                 precision="fp16", note="changes the math: fewer DDIM steps, no overlap"),
        # eager only: a compiled conditional-only UNet would be a second graph to compile in the GPU time slice
        Scenario("faster: 10 steps, w16/o4, CFG in the first 5", "full", 512, 48, 16, 4, 10,
                 modes=("optimized", "optimized+tiny-decoder"),
                 precision="fp16", cfg_steps=5, note="changes the math: fewer steps, less overlap, CFG truncation"),
        # eager only, like the one above (two more graphs to compile)
        Scenario("faster: 10 steps, w16/o4, feature reuse every 2nd step", "full", 512, 48, 16, 4, 10,
                 modes=("optimized",), precision="fp16", feature_reuse=2,
                 note="changes the math: fewer steps, less overlap, feature reuse"),
    ],
    # the same networks on each backend, same run (onnxruntime here; add optimized+tensorrt where it is installed)
    "cpu-backends": [Scenario("tiny 128px, 8 frames, w4/o2, 2 steps", "tiny", 128, 8, 4, 2, 2,
                              modes=("optimized", "optimized+onnxruntime"), note="same math on each backend")],
    "gpu-backends": [Scenario("full 512px fp16, 48 frames, w16/o8, 25 steps (upstream)", "full", 512, 48, 16, 8, 25,
                              modes=("reference", "optimized", "optimized+compile", "optimized+tensorrt",
                                     "optimized+tensorrt-graphs", "optimized+tensorrt+batch3",
                                     "optimized+tensorrt+fp16-softmax"),
                              precision="fp16", note="TensorRT plans built from the same random weights first "
                                                     "(+batch3: UNet plans of 1..3 windows, built too)")],
    "cpu-stream": [Scenario("tiny 128px, 240 frames, w16/o8, 10 steps", "tiny", 128, 240, 16, 8, 10,
                            modes=("optimized", "optimized+no-wrap"),
                            note="first-frame latency of a long driver: wrapped windows vs open, streamed")],
    "long-tiny": [Scenario(f"tiny 128px, {n} frames, w16/o0, 1 step", "tiny", 128, n, 16, 0, 1,
                           modes=("optimized", "optimized+no-wrap"),
                           note="memory over a long driver: wrapping windows hold every frame's loop state, "
                                "open ones (streamed) the frames in flight")
                  for n in (100, 1000)],
}


def model_config(kind: str, image_size: int) -> ModelConfig:
    cfg = tiny_config() if kind == "tiny" else full_config()
    return replace(cfg, image_size=image_size)


def gpu_script_here(script: str, tiny: bool) -> None:
    """Stop a GPU profiling script (``bench/NAME.py``) run at full size where torch sees no CUDA device: the
    full-size networks on a CPU take minutes before their first line, and some need more memory than a
    workstation has (``attn_backends.py``'s attention matrices: about 24 GB). ``--tiny`` checks the script on the
    CPU instead.

    Raises:
        SystemExit: with the message (exit status 1).
    """
    if not tiny and not torch.cuda.is_available():
        raise SystemExit(f"{script}: this torch sees no CUDA device, and the script measures the full-size networks "
                         f"on a GPU (on a CPU: minutes of silence, and more memory than most machines have); "
                         f"python {script} --tiny ... checks it here with the tiny model")


def script_out(out: Path, script: str) -> Path:
    """Make a bench script's ``--out`` folder before it measures anything: a file in the way or a folder it cannot
    write was a traceback when the results were written, after the measurements (minutes at full size).

    Raises:
        SystemExit: ``out`` is a file or cannot be written (the message names it; exit status 1).
    """
    try:
        check_output_folder(out, "--out", "the results")
        _make_folder(out, "the results folder (--out)")
    except InputError as exc:
        raise SystemExit(f"{script}: {exc}") from None
    return out


def end_on_sigterm() -> None:
    """End a bench script on SIGTERM (``timeout``, a job scheduler, a GPU session's time limit) the way Ctrl-C ends
    it: with an exception in the main thread, so its ``finally`` blocks run (scratch folders in ``--out`` removed,
    a child server stopped, partial files deleted) instead of the process dying where it stands. Exit status 143."""
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def random_models(cfg: ModelConfig, device: torch.device, only: Collection[str] | None = None) -> Any:
    """The benchmark's random-weight networks (seed 0, see ``weights.build_models``), initialised on ``device``.

    On a GPU the networks are built there: the CPU's initialisation of the full-size networks took 40-50 s of
    every GPU benchmark process (53 s on the 2-core dev machine), a second of GPU time does the same. The values
    then differ from a CPU build's for the same seed; shapes, FLOPs and timings do not. Should building there
    fail, the networks are built on the CPU (with a warning) rather than losing the GPU session's run. Their
    ``weights_id`` says where they were built (``random-built-on-cuda``): exports of them are told apart."""
    from megactor_rt.weights import build_models

    models = None
    if device.type != "cpu":
        try:
            with torch.device(device):
                models = build_models(cfg, seed=0, only=only)
        except Exception as exc:  # noqa: BLE001 - any failure there: the CPU build still measures everything
            logger.warning("building the random networks on %s failed (%s: %s); building them on the CPU",
                           device, type(exc).__name__, exc)
    if models is None:
        models = build_models(cfg, seed=0, only=only)
    where = next((p.device.type for m in models.modules().values() for p in m.parameters()), "cpu")
    models.weights_id = f"random-built-on-{where}"
    return models


# -- FLOP accounting --------------------------------------------------------------------------------
def _signature(name: str, args: tuple, kwargs: dict) -> tuple:
    def sig(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return tuple(x.shape)
        if isinstance(x, (list, tuple)):
            return tuple(sig(i) for i in x)
        return x if isinstance(x, (bool, str)) or x is None else type(x).__name__
    return (name, sig(args), tuple(sorted((k, sig(v)) for k, v in kwargs.items())))


class FlopLedger:
    """Counts FLOPs per submodel method by call signature (see module docstring).

    Args:
        sub: the submodels whose methods are wrapped.
        table: a signature -> FLOPs table to share (another ledger's, for the same networks).
        twin: torch submodels of the same networks that count a new signature's call when ``sub`` runs
            graphs the FLOP counter cannot see (onnxruntime, TensorRT); None: count ``sub``'s own call.
    """

    def __init__(self, sub: Any, table: dict[tuple, int] | None = None, twin: Any = None) -> None:
        self.table: dict[tuple, int] = {} if table is None else table
        self.totals: Counter[str] = Counter()
        self.twin = twin
        self.sub = sub
        for name in METHODS:
            if hasattr(sub, name):
                setattr(sub, name, self._wrap(name, getattr(sub, name)))

    def _wrap(self, name: str, fn: Callable, count: Callable | None = None) -> Callable:
        """``fn`` counted under ``name``; ``count``: the torch call that counts a new signature where ``fn`` runs a
        graph (default: the twin's method ``name``, or ``fn`` itself without a twin)."""
        from torch.utils.flop_counter import FlopCounterMode

        twin, own = self.twin, count is None  # own: one of the submodels' methods
        counter_fn = count if count is not None else (
            fn if twin is None else getattr(type(twin), name).__get__(twin))  # not the twin's own ledger

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            key = _signature(name, args, kwargs)
            if key not in self.table:
                # A torch.compile'd UNet first called under the counter (a dispatch mode) is never compiled
                # afterwards: with --compile the counted call runs eager and the real one follows, compiled.
                compiled = own and twin is None and bool(getattr(self.sub, "compile", False))
                with FlopCounterMode(display=False) as counter:
                    if twin is not None:
                        out = counter_fn(*_moved(args, twin), **_moved(kwargs, twin))
                    elif compiled:
                        with _eager(self.sub):
                            out = fn(*args, **kwargs)
                    else:
                        out = fn(*args, **kwargs)
                if twin is not None or compiled:
                    out = fn(*args, **kwargs)  # the real call, outside the counter
                self.table[key] = counter.get_total_flops()
            else:
                out = fn(*args, **kwargs)
            self.totals[name] += self.table[key]
            return out
        return wrapped

    def reset(self) -> None:
        self.totals.clear()

    def count_tiny_decoder(self, anim: Any, path: str | Path) -> None:
        """Count the FLOPs of ``anim``'s TAESD decoder from ``path`` (method name ``tiny_decode``), loading it; on
        a graph backend they are counted on a torch copy of it on the twin's device."""
        from megactor_rt.models.tiny_decoder import load_tiny_decoder

        decoder = anim.tiny_decoder(path)
        if getattr(decoder, "_counted_by", None) is self:
            return
        count = None
        if self.twin is not None:
            count = load_tiny_decoder(path).to(self.twin.device, self.twin.dtype)
        wrapped = self._wrap("tiny_decode", decoder, count)
        wrapped._counted_by = self  # type: ignore[attr-defined]
        anim._tiny_decoders[str(Path(path).resolve())] = wrapped  # the Animator's loaded decoder, now counted


@contextlib.contextmanager
def _eager(sub: Any) -> Iterator[None]:
    """``sub`` without ``compile`` for one counted call, its call counters as they were afterwards (the real
    call that follows counts itself)."""
    mode, calls = sub.compile, Counter(sub.calls)
    sub.compile = False
    try:
        yield
    finally:
        sub.compile = mode
        sub.calls.clear()
        sub.calls.update(calls)


def _moved(x: Any, sub: Any) -> Any:
    """``x``'s tensors on ``sub``'s device, floating ones in its dtype (lists, tuples and dicts followed)."""
    if isinstance(x, torch.Tensor):
        return x.to(sub.device, sub.dtype) if x.is_floating_point() else x.to(sub.device)
    if isinstance(x, (list, tuple)):
        return type(x)(_moved(i, sub) for i in x)
    if isinstance(x, dict):
        return {k: _moved(v, sub) for k, v in x.items()}
    return x


class PeakRSS:
    """Samples this process's resident set size in a thread (CPU peak memory of one run): ``peak``, the process's
    (the weights and what earlier modes left included), and ``start``, its size when the run began (``peak -
    start``: the run's own, which does not depend on the modes run before it)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self.start, self._stop = interval, 0, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def __enter__(self) -> PeakRSS:
        self.peak = self.start = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 10,
                  rounds: int = 3) -> float:
    """Measured dense matmul rate (the ceiling the denoiser is compared with): the best of ``rounds`` timings of
    ``reps`` ``n`` x ``n`` products (one timing on a busy CPU can be several times too low)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12)
    return best


def provenance(package_dir: Path | None = None) -> dict[str, Any]:
    """What produced a benchmark's figures: the commit (``git`` in the package's checkout, else the
    ``MEGACTOR_COMMIT`` environment variable, e.g. set by whoever copies the tree to a GPU machine without its
    ``.git``; None if neither), whether the checkout had changes, the compiled kernels' status and the kernel
    switches set in the environment."""
    from megactor_rt.kernels._triton import HAVE_TRITON
    from megactor_rt.kernels.ops import kernels_status

    here = package_dir or Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    kernels = kernels_status()
    return {
        "commit": commit or os.environ.get("MEGACTOR_COMMIT") or None,
        "commit_from": "git" if commit else ("MEGACTOR_COMMIT" if os.environ.get("MEGACTOR_COMMIT") else None),
        "uncommitted_changes": None if status is None else bool(status),
        "cuda_kernels": kernels["reason"] if not kernels["available"] else f"ok ({kernels['build_info']})",
        "triton": HAVE_TRITON,
        "switches": {k: v for k, v in sorted(os.environ.items())
                     if k in ("MEGACTOR_SHORT_ATTENTION", "MEGACTOR_TRITON_GROUP_NORM", "MEGACTOR_KERNELS_LIB")},
    }


def commit_words(prov: dict[str, Any] | None) -> str:
    """A :func:`provenance`'s commit as the results name it: its first 12 characters ("unknown" without one), and
    "with uncommitted changes" where the checkout had them."""
    prov = prov or {}
    return (prov.get("commit") or "unknown")[:12] + (" with uncommitted changes" if prov.get("uncommitted_changes")
                                                     else "")


def run_record(device: torch.device | None = None) -> dict[str, Any]:
    """Where, when and by what code a bench script's figures were measured, as keys of its JSON report: ``date``
    (ISO), ``host`` (the CPU's model, its logical cores, torch's threads and, where ``device`` is a CUDA device,
    that GPU's name), the ``torch`` and ``python`` versions and the :func:`provenance` (the commit).
    :func:`record_line` says it in a sentence."""
    from megactor_rt.runtime.backends import cpu_model, device_name

    host: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device is not None and device.type == "cuda":
        host["gpu"] = device_name(device)
    return {"date": date.today().isoformat(), "host": host, "torch": torch.__version__,
            "python": platform.python_version(), "provenance": provenance()}


def record_line(record: dict[str, Any]) -> str:
    """A :func:`run_record` (or a report holding its keys) as one sentence, for the top of a markdown table:
    "Measured 2026-11-29 on AMD EPYC 7B13 (2 cores, 2 torch threads), torch 2.13.0+cpu, Python 3.11.2, commit
    1b7c812ab3cd with uncommitted changes." (on a GPU: "on NVIDIA H200 with AMD EPYC ... (...)")."""
    host = record["host"]
    cpu = f"{host['cpu']} ({host['cores']} cores, {host['torch_threads']} torch threads)"
    machine = f"{host['gpu']} with {cpu}" if host.get("gpu") else cpu
    return (f"Measured {record['date']} on {machine}, torch {record['torch']}, Python {record['python']}, "
            f"commit {commit_words(record.get('provenance'))}.")


# -- running ---------------------------------------------------------------------------------------
@dataclass
class Result:
    scenario: str
    mode: str
    frames: int
    total_s: float
    fps: float
    first_frame_s: float
    stage_s: dict[str, float]
    flops: dict[str, float]
    denoise_tflops_per_s: float
    peak_memory_gb: float
    calls: dict[str, int] = field(default_factory=dict)
    warmup_s: float = 0.0  # the untimed warm-up run (1 step, one window): includes compilation with +compile
    step_s: list[float] = field(default_factory=list)  # each denoising step
    # submodel methods whose FLOPs were first counted (under the slow FLOP counter) inside this timed run
    first_counted: list[str] = field(default_factory=list)
    # the run's own memory: its peak less what was held when it began (CPU: resident memory; CUDA: torch's
    # allocated memory); ``peak_memory_gb`` is the process's (CPU: it grows with the modes run before)
    run_memory_gb: float | None = None


def driver_of_length(n: int, work_dir: Path) -> Path:
    """The bundled driving clip, looped to at least ``n`` frames (written once, H.264, no audio)."""
    from megactor_rt.assets import ASSETS_DIR
    from megactor_rt.media import VideoWriter, iter_video_frames, probe_video

    src = ASSETS_DIR / "driver.mp4"
    info = probe_video(src)
    if info.num_frames and n <= info.num_frames:
        return src
    path = work_dir / f"driver_{n}.mp4"
    if not path.is_file():
        frames = list(iter_video_frames(src))
        with VideoWriter(path, info.fps, info.width, info.height) as w:
            for i in range(n):
                w.write(frames[i % len(frames)])
    return path


_MODELS: dict[tuple, Any] = {}


def _submodels(sc: Scenario, device: torch.device) -> tuple[Any, FlopLedger]:
    """Torch submodels (with their FLOP ledger) for a scenario; random-weight models are built once per
    (model, size, precision)."""
    from megactor_rt.runtime.submodels import TorchSubmodels

    key = (sc.model, sc.image_size, sc.precision, str(device))
    if key not in _MODELS:
        _MODELS.clear()  # one full-size model set at a time
        models = random_models(model_config(sc.model, sc.image_size), device)
        models.weights_id = f"bench-{sc.model}-" + models.weights_id.removeprefix("random-")
        dtype = torch.float16 if sc.precision == "fp16" else torch.float32
        sub = TorchSubmodels(models, device, dtype)
        _MODELS[key] = (sub, FlopLedger(sub))
    return _MODELS[key]


def run_scenario(sc: Scenario, device: torch.device, work_dir: Path,
                 errors: list[dict[str, str]] | None = None) -> Iterator[Result]:
    """Run every mode of ``sc``: each mode's untimed warm-up and first timed run, mode after mode; then, with
    ``repeats`` > 1, the further timed runs in rounds of one run per mode (reference, optimized, reference,
    optimized, ...), so that a slow spell of a shared machine lands on one run of each mode rather than on
    all runs of one. Yields each result as it is measured.

    With ``errors`` given, a mode that raises is recorded there (scenario, mode, error) and the next mode
    runs: one failing variant does not cost a whole GPU session's measurements."""
    from megactor_rt.assets import ASSETS_DIR

    torch_sub, torch_ledger = _submodels(sc, device)
    driver = driver_of_length(sc.frames, work_dir)
    portrait = ASSETS_DIR / "portrait.png"
    ready: dict[str, _ModeRun] = {}
    failed: set[str] = set()
    for _ in range(sc.repeats):
        for mode in sc.modes:  # with a variant: its settings for this mode only
            if mode in failed:
                continue
            run = ready.get(mode)
            saved: dict[str, Any] = {}
            target: Any = None  # the submodels whose settings this mode changed
            try:
                if run is None:
                    cfg, sub_options = mode_settings(sc, mode, work_dir)
                    sub, ledger = torch_sub, torch_ledger
                    if mode_backend(mode)["name"] != "torch":
                        sub, ledger = _graph_submodels(sc, cfg, mode, device, work_dir, torch_sub, torch_ledger)
                    run = _ModeRun(cfg, sub, ledger, sub_options)
                target, saved = run.sub, {k: getattr(run.sub, k) for k in run.sub_options}
                for k, v in run.sub_options.items():
                    setattr(run.sub, k, v)
                with switched_env(mode_env(mode)):  # the worker threads read the switches at each call
                    if mode not in ready:
                        logger.info("%s [%s]: warming up%s", sc.name, mode,
                                    " (compiling: minutes)" if "compile" in mode else "")
                        run.start(sc, portrait, driver, work_dir, 2 if replays_cuda_graphs(mode) else 1)
                        ready[mode] = run
                    logger.info("%s [%s]: timed run", sc.name, mode)
                    result = run.timed(sc, mode, device, driver, work_dir)
                yield result
            except Exception as exc:
                if errors is None:
                    raise
                logger.exception("%s [%s] failed", sc.name, mode)
                errors.append({"scenario": sc.name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"})
                failed.add(mode)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            finally:
                for k, v in saved.items():
                    setattr(target, k, v)


def mode_env(mode: str) -> dict[str, str]:
    """The environment switches ``mode``'s variants set for its runs (their ``"env"`` entries in VARIANTS)."""
    return {k: v for name in mode.split("+")[1:] for k, v in VARIANTS.get(name, {}).get("env", {}).items()}


@contextlib.contextmanager
def switched_env(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in ``os.environ`` for the block; afterwards every name has its old value again (or none)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def mode_backend(mode: str) -> dict[str, Any]:
    """The backend settings of a mode: ``{"name": "torch"}`` unless a variant names a graph backend (its
    ``VARIANTS`` entry, e.g. ``{"name": "tensorrt", "cuda_graphs": True}``)."""
    found = [VARIANTS[v]["backend"] for v in mode.split("+")[1:] if "backend" in VARIANTS.get(v, {})]
    return found[-1] if found else {"name": "torch"}


def mode_problem(mode: str) -> str | None:
    """Why ``mode`` ("base+variant+...", its variants known) cannot run, whatever the scenario: variants that do
    not go together (None: they do)."""
    base, *variants = mode.split("+")
    sub_options = {k: v for name in variants for k, v in VARIANTS[name].get("submodels", {}).items()}
    backends = [v for v in variants if "backend" in VARIANTS[v]]
    exports = [v for v in variants if "export" in VARIANTS[v]]
    switches = [v for v in variants if "env" in VARIANTS[v]]
    set_by: dict[tuple[str, str], tuple[str, Any]] = {}  # (kind, setting) -> the first variant setting it, its value
    for name in variants:
        for kind in ("config", "submodels", "export", "env"):
            for key, value in VARIANTS[name].get(kind, {}).items():
                first, was = set_by.setdefault((kind, key), (name, value))
                if was != value:  # (the last one won, under a name that promised both)
                    return f"mode '{mode}': {first} and {name} set {key} differently; keep one of them"
    if switches and (backends or sub_options.get("compile")):
        return (f"mode '{mode}': {', '.join(switches)} switches kernels of the eager torch networks; exported graphs "
                "and compiled ones do not read it (drop the graph backend or compile)")
    if exports and not backends:
        return (f"mode '{mode}': {', '.join(exports)} changes the exported graphs; add a graph backend "
                "(+onnxruntime, +tensorrt)")
    if backends and (base != "optimized" or sub_options or len(backends) > 1):
        return (f"mode '{mode}': a graph backend ({', '.join(backends)}) runs one backend, in the optimized mode only "
                "(the exported graphs hold the optimized calls), without torch settings such as compile")
    return None


def mode_settings(sc: Scenario, mode: str, work_dir: Path) -> tuple[AnimateConfig, dict[str, Any]]:
    """The run config of ``mode`` ("base" or "base+variant+...") in ``sc``, and the TorchSubmodels attributes
    its variants set. Files a variant needs (the random tiny decoder) are written into ``work_dir``."""
    base, *variants = mode.split("+")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"scenario '{sc.name}': unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    problem = mode_problem(mode)
    if problem:
        raise ValueError(problem)
    options = {k: v for name in variants for k, v in VARIANTS[name].get("config", {}).items()}
    sub_options = {k: v for name in variants for k, v in VARIANTS[name].get("submodels", {}).items()}
    cfg = AnimateConfig(steps=sc.steps, guidance=sc.guidance, window=sc.window, overlap=sc.overlap,
                        mode=Mode(base), max_frames=sc.frames, cfg_steps=sc.cfg_steps,
                        feature_reuse=sc.feature_reuse, **options)
    if cfg.tiny_decoder == "random":
        cfg = replace(cfg, tiny_decoder=str(random_tiny_decoder(work_dir)))
    return cfg, sub_options


def _graph_submodels(sc: Scenario, cfg: AnimateConfig, mode: str, device: torch.device, work_dir: Path,
                     twin: Any, twin_ledger: FlopLedger) -> tuple[Any, FlopLedger]:
    """The scenario's networks as exported graphs on ``mode``'s backend (onnxruntime, tensorrt): exported from
    the same seeded random weights as the torch submodels ``twin`` into ``work_dir`` (kept for the suite's
    other modes; TensorRT plans are built there too), with a FLOP ledger that counts on ``twin``."""
    from megactor_rt.config import Precision
    from megactor_rt.runtime.backends import require_backend
    from megactor_rt.runtime.onnx_backend import exported_submodels

    options = mode_backend(mode)
    backend = options["name"]
    export = {k: v for name in mode.split("+")[1:] for k, v in VARIANTS.get(name, {}).get("export", {}).items()}
    require_backend(backend)  # its reason, before building a second copy of the networks
    # the twin's weights (made where the twin's were), fp32 on the CPU for the export
    models = random_models(model_config(sc.model, sc.image_size), device).to(torch.device("cpu"), torch.float32)
    models.weights_id = twin.weights_id
    precision = Precision.FP16 if sc.precision == "fp16" else Precision.FP32
    folder = f"{sc.model}-{sc.image_size}-w{sc.window}" + "".join(f"-{k}" for k, v in sorted(export.items()) if v)
    sub = exported_submodels(models, backend, work_dir / folder, device, precision, cfg,
                             torch_fallback=lambda dtype: twin, cuda_graphs=options.get("cuda_graphs", False),
                             **export)
    return sub, FlopLedger(sub, table=twin_ledger.table, twin=twin)


def warmup_config(sc: Scenario, cfg: AnimateConfig) -> AnimateConfig:
    """The untimed warm-up run before a mode's timed runs: over one window of frames (with ``window_batch`` > 1
    over all of the run's frames, so it meets the run's calls of several windows, whose sizes depend on the
    window count, and no others: a compiled UNet compiles once per call size), the fewest leading steps that
    make every kind of UNet call the run makes (one step, unless CFG truncation or feature reuse add kinds;
    ``AnimateConfig.warmup_steps``)."""
    frames = sc.frames if cfg.window_batch > 1 else min(sc.frames, sc.window)
    return replace(cfg, steps=cfg.warmup_steps(), max_frames=frames)


def batch_sizes(n: int, batch: int) -> set[int]:
    """The call sizes of ``n`` items taken ``batch`` at a time (the last call takes the rest)."""
    return {min(n, batch)} | ({n % batch} if n > batch and n % batch else set())


def warm_up(sc: Scenario, cfg: AnimateConfig, anim: Any, inputs: Any, ledger: FlopLedger, driver: Path,
            work_dir: Path, runs: int = 1) -> float:
    """The untimed run before a mode's timed runs (:func:`warmup_config`: allocator, kernels, compilation; made
    ``runs`` times: 2 where CUDA graphs are recorded on the second call of a shape), then one untimed call of
    each PoseGuider and decoder batch size the timed run makes and the warm-up's single window did not (the
    FLOP ledger counts a new call signature under the FLOP counter, which is slow: in the timed run it would
    add to the stage it falls in). Returns the seconds taken."""
    from megactor_rt.runtime.animator import DECODE_BATCH, POSE_BATCH

    t0 = time.perf_counter()
    if cfg.tiny_decoder is not None:
        ledger.count_tiny_decoder(anim, cfg.tiny_decoder)
    for _ in range(runs):
        _consume(anim, inputs, driver, warmup_config(sc, cfg), work_dir)
    sub, state = anim.sub, anim.prepare(inputs)  # the warm-up's portrait (cached)
    device, size, h = sub.device, anim.image_size, anim.latent_size
    with torch.inference_mode():
        if cfg.mode is not Mode.REFERENCE:  # the optimized modes' PoseGuider batches (PoseFeed)
            for b in sorted(batch_sizes(sc.frames, POSE_BATCH)):
                sub.pose_features(torch.zeros(b, 3, size, size, device=device), state.film_scale, state.film_shift)
        tiny = anim.tiny_decoder(cfg.tiny_decoder) if cfg.tiny_decoder is not None else None
        for b in sorted(batch_sizes(sc.frames, DECODE_BATCH)):
            z = torch.zeros(b, 4, h, h, device=device, dtype=sub.dtype)
            sub.vae_decode(z) if tiny is None else tiny(z)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


@dataclass
class _ModeRun:
    """One mode of a scenario: its settings, submodels and FLOP ledger, then its Animator, portrait inputs and
    warm-up time (``start``)."""

    cfg: AnimateConfig
    sub: Any
    ledger: FlopLedger
    sub_options: dict[str, Any]
    anim: Any = None
    inputs: Any = None
    warmup_s: float = 0.0

    def start(self, sc: Scenario, portrait: Path, driver: Path, work_dir: Path, warmup_runs: int = 1) -> None:
        """Make the Animator, its portrait inputs and its warm-up (``warmup_runs`` untimed runs)."""
        from megactor_rt.runtime.animator import Animator

        self.anim = Animator(self.sub, self.cfg)
        if self.sub.device.type == "cuda":  # the memory earlier modes left cached goes back (TensorRT and
            torch.cuda.empty_cache()        # onnxruntime allocate outside torch); this mode's warm-up refills it
        self.inputs = self.anim.portrait_inputs(portrait)  # face crop + mask: not part of the timed work
        self.warmup_s = warm_up(sc, self.cfg, self.anim, self.inputs, self.ledger, driver, work_dir, warmup_runs)
        self.release()

    def release(self) -> None:
        """Drop the portrait state this mode's cache keeps (its device tensors: with the optimized modes a
        ReferenceNet bank per step), so that it does not count in the next mode's peak memory.

        The allocator keeps its cached blocks here (it is emptied before the next mode's warm-up instead): the
        peak is of allocated memory, which they are not part of, and emptying the cache after the warm-up made
        every timed run allocate its activations from the driver again in its first window calls, which a serving
        process with a warm allocator does not (on an H200 the first step took 2.1 s more than the median step on
        2026-11-27, 1.2-1.4 s more on 2026-11-26, before the emptying came in; how much of that difference it made
        is not measured)."""
        self.anim.cache = type(self.anim.cache)()
        gc.collect()

    def timed(self, sc: Scenario, mode: str, device: torch.device, driver: Path, work_dir: Path) -> Result:
        anim, ledger = self.anim, self.ledger
        anim.cache = type(anim.cache)()  # cold portrait every time: per-portrait work is timed too
        anim.plans = type(anim.plans)()  # and the driver's pass 1 (kept by an earlier round's run otherwise)
        ledger.reset()
        known = set(ledger.table)
        held = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        with PeakRSS() as mem:
            stats = _consume(anim, self.inputs, driver, self.cfg, work_dir)
        denoise_flops = sum(ledger.totals[k] for k in DENOISE_METHODS)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else mem.peak
        own = peak - (held if device.type == "cuda" else mem.start)
        self.release()
        logger.info("%s [%s]: %.2f fps", sc.name, mode, stats.fps)
        first_counted = sorted(k[0] for k in ledger.table if k not in known)
        if first_counted:
            logger.warning("%s [%s]: FLOPs of %s first counted in the timed run (slower there)", sc.name, mode,
                           ", ".join(first_counted))
        return Result(sc.name, mode, stats.frames, stats.total_s, stats.fps, stats.first_frame_s,
                      dict(stats.stage_seconds), {k: v / 1e12 for k, v in ledger.totals.items()},
                      denoise_flops / 1e12 / stats.stage_seconds["denoise"], peak / 2**30, dict(stats.calls),
                      self.warmup_s, list(stats.step_seconds), first_counted, own / 2**30)


def _consume(anim: Any, inputs: Any, driver: Path, cfg: AnimateConfig, work_dir: Path) -> Any:
    """One whole run as a user sees it: prepare the portrait, animate, encode H.264 (on a worker thread, as
    ``animate_to_file`` does); ``total_s`` ends when the file is closed."""
    from megactor_rt.media import VideoWriter, probe_video
    from megactor_rt.runtime.pipeline import prefetch

    size = anim.image_size
    fps = probe_video(driver).fps
    t0 = time.perf_counter()
    state = anim.prepare(inputs)
    prep = time.perf_counter() - t0
    with VideoWriter(work_dir / "bench_output.mp4", fps, size, size) as w:
        for frame in prefetch(anim.animate(state, driver, config=cfg), depth=8, name="decode"):
            w.write(frame)
    stats = anim.last_stats
    stats.stage_seconds["prepare_portrait"] = prep
    stats.total_s = time.perf_counter() - t0
    stats.first_frame_s += prep
    return stats


def shrink(sc: Scenario, device: torch.device) -> Scenario:
    """A scenario's dry-run form: tiny model, 128 px, at most 10 frames and 2 steps (window/overlap kept
    where they fit), fp32 off-GPU. Exercises the same code path in seconds."""
    frames = min(sc.frames, 10)
    window = min(sc.window, 4)
    steps, overlap = min(sc.steps, 2), min(sc.overlap, window - 1)
    label = f"tiny 128px, {frames} frames, w{window}/o{overlap}, {steps} step{'s' if steps > 1 else ''}"
    return replace(sc, name=f"{sc.name} [dry run: {label}]", model="tiny", image_size=128, frames=frames, window=window,
                   overlap=overlap, steps=steps, repeats=1,
                   cfg_steps=None if sc.cfg_steps is None else min(sc.cfg_steps, 1),
                   precision=sc.precision if device.type == "cuda" else "fp32")


def run_bench(suite: str, out: str | Path, device: str | None = None, dry_run: bool = False,
              modes: Collection[str] | None = None, work_dir: str | Path | None = None,
              only: Collection[int] | None = None) -> dict:
    """Run a suite; write ``results.json`` and ``results.md`` into ``out`` (after every result); return the
    report. ``dry_run`` shrinks every scenario (see ``shrink``); ``only`` keeps the scenarios at those
    1-based positions of the suite; ``modes`` keeps only those modes (scenarios left with none are skipped,
    see :func:`select_modes`); ``work_dir`` keeps looped drivers, exported graphs and TensorRT plans for later
    runs (default: a temporary folder).

    Raises:
        InputError: an unknown suite, scenario or mode; a device this machine lacks (a ``gpu-*`` suite without
            ``device`` or ``dry_run`` needs CUDA).
    """
    if suite not in SUITES:
        raise InputError(f"unknown benchmark suite '{suite}'; known: {', '.join(sorted(SUITES))}")
    chosen = SUITES[suite]
    if only:
        bad = sorted({i for i in only if not 1 <= i <= len(chosen)})
        if bad:
            raise InputError(f"suite '{suite}' has scenarios 1 to {len(chosen)}, not {', '.join(map(str, bad))}")
        picked = set(only)
        chosen = [sc for i, sc in enumerate(chosen, 1) if i in picked]
    from megactor_rt.runtime.animator import check_device, default_device

    if modes:  # settings first (a mode the suite lacks), then the machine
        chosen = select_modes(suite, chosen, modes, only)
    if device is None and suite.startswith("gpu-") and not dry_run:  # the help's default: cuda for gpu-* suites
        if not torch.cuda.is_available():
            raise InputError(f"suite '{suite}' is measured on a GPU and this torch sees no CUDA device; --dry-run "
                             "checks it here at small sizes"
                             + ("" if "tensorrt" in suite or "backends" in suite else
                                ", --device cpu runs it here in full (hours)"))
        device = "cuda"
    if device is None and suite.startswith("cpu-"):  # the suite's name says where it measures
        device = "cpu"
    dev = check_device(device) if device else default_device()  # a device this machine lacks: InputError
    scenarios = [shrink(s, dev) for s in chosen] if dry_run else chosen
    _warn_unavailable_backends(scenarios)
    out = Path(out)
    _make_folder(out, "the results folder (--out)")
    _hold_results_folder(out, suite + (" (dry run)" if dry_run else ""))
    dtype = torch.float16 if any(s.precision == "fp16" for s in scenarios) else torch.float32
    report: dict[str, Any] = {
        "suite": suite + (" (dry run)" if dry_run else ""), "date": date.today().isoformat(), "device": device_name(dev),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "matmul_tflops": matmul_tflops(dev, dtype), "matmul_dtype": str(dtype).replace("torch.", ""),
        "provenance": provenance(), "scenarios": [asdict(s) for s in scenarios], "results": [], "errors": [],
        "complete": False,  # (until the last mode and the second matmul sample: a run cut short says so)
        "memory": "cuda allocated" if dev.type == "cuda" else "resident",  # (what the memory columns measure)
    }
    report["matmul_samples_tflops"] = [report["matmul_tflops"]]
    # written before the first mode: a run stopped before its first result (a compile warm-up, Ctrl-C) left an
    # earlier run's complete results there, read as this one's; a results file that cannot be written is named
    # now, not after the first mode's minutes
    _save(report, out)
    with contextlib.ExitStack() as stack:  # looped drivers, encoded outputs, exported graphs, plans
        if work_dir is None:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="megactor-bench-"))
        else:
            work = str(work_dir)
            _make_folder(Path(work), "the work folder (--work-dir)")
        for sc in in_run_order(suite, scenarios):
            for result in run_scenario(sc, dev, Path(work), report["errors"]):
                report["results"].append(asdict(result))
                _save(report, out)  # after every result: a run cut short keeps what it measured
    # sampled again after the runs: "% of matmul" is against the better of the two (the ceiling, on a CPU whose
    # rate drifts with load and clocks; the runs' figures keep the rate they were saved with until here)
    report["matmul_samples_tflops"].append(matmul_tflops(dev, dtype))
    report["matmul_tflops"] = max(report["matmul_samples_tflops"])
    report["complete"] = True
    _save(report, out)  # errors recorded after the last result
    return report


def _make_folder(path: Path, what: str) -> None:
    """Make ``path`` (and the folders above it).

    Raises:
        InputError: it cannot be made (a place no folder can be made in, such as /proc, passes the access check
            that came before as a writable folder for root).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot make {what} ({exc.strerror or exc})") from exc


_HELD: dict[Path, Any] = {}  # results folders this process writes into, each with its open lock file


def _hold_results_folder(out: Path, suite: str) -> None:
    """Take ``out`` for this run's results (an exclusive ``flock`` on ``out/.bench.lock``, held until the process
    ends): a second ``megactor-rt bench`` into the same folder at once is refused (each rewrote results.json after
    every mode, one run's results replacing the other's); results of another suite there are named as replaced.

    Raises:
        InputError: another process is writing results into ``out``.
    """
    import fcntl

    lock = _HELD.get(out.resolve())
    if lock is None:
        lock = open(out / ".bench.lock", "a")  # noqa: SIM115 - held until the process ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise InputError(f"{out}: another megactor-rt bench is writing its results there now; give this one "
                             "another --out") from None
        _HELD[out.resolve()] = lock
    try:
        before = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(before, dict) and before.get("suite") != suite:
        logger.warning("%s: the results of suite %r from %s there are replaced by this run's (--out names another "
                       "folder to keep them)", out, before.get("suite"), before.get("date"))


def _warn_unavailable_backends(scenarios: list[Scenario]) -> None:
    """Say at the start which modes will fail for a graph backend this machine lacks (each is recorded as an
    error when its turn comes, after the modes before it have run)."""
    from megactor_rt.runtime.backends import backend_status

    status = backend_status()
    needs: dict[str, list[str]] = {}
    for sc in scenarios:
        for mode in sc.modes:
            name = mode_backend(mode)["name"]
            if not status.get(name, (True, ""))[0] and mode not in needs.setdefault(name, []):
                needs[name].append(mode)
    for name, modes in needs.items():
        logger.warning("backend '%s' is unavailable here (%s): mode(s) %s will be recorded as errors, the other "
                    "modes run", name, status[name][1], ", ".join(modes))


def select_modes(suite: str, scenarios: list[Scenario], modes: Collection[str],
                 positions: Collection[int] | None = None) -> list[Scenario]:
    """The scenarios with only ``modes`` (those left with none dropped). A mode the suite lacks that is one of
    its base modes with known variants (``optimized+tensorrt``) runs in every scenario that has the base mode.
    ``positions``: the suite's scenarios ``scenarios`` are (--scenarios), named in the error.

    Raises:
        InputError: a mode that is neither.
    """
    modes = list(dict.fromkeys(modes))  # (a mode named twice was timed twice when not one of the suite's own)
    known = {m for s in scenarios for m in s.modes}
    bases = {m.split("+")[0] for m in known}
    extra = [m for m in modes if m not in known]
    bad = [m for m in extra if m.split("+")[0] not in bases or not set(m.split("+")[1:]) <= set(VARIANTS)]
    if bad:
        where = f", scenario(s) {', '.join(map(str, sorted(set(positions))))}," if positions else ""
        raise InputError(f"suite '{suite}'{where} has no mode(s) {', '.join(sorted(bad))}; known"
                         f"{' there' if positions else ''}: {', '.join(sorted(known))}"
                         f", each optionally with variants {', '.join('+' + v for v in VARIANTS)}")
    problems = [p for p in map(mode_problem, extra) if p]
    if problems:  # (was recorded as an error when its turn came, after the modes before it had run)
        raise InputError("; ".join(problems))
    chosen = [replace(s, modes=tuple(m for m in s.modes if m in modes)
                      + tuple(m for m in extra if m.split("+")[0] in s.modes)) for s in scenarios]
    return [s for s in chosen if s.modes]


def _save(report: dict, out: Path) -> None:
    """Write ``report`` as results.json and results.md into ``out``.

    Raises:
        InputError: they cannot be written there (e.g. a folder named results.json, a full disk).
    """
    try:
        save_tables(out, "results", report, markdown(report))
    except OSError as exc:
        raise InputError(f"{out}: cannot write the benchmark's results there ({exc.strerror or exc}: "
                         f"{exc.filename2 or exc.filename or out})") from exc


def script_facts() -> dict[str, str]:
    """Where and when a CPU bench script ran: today's date and the machine (its reports begin with these)."""
    from megactor_rt.runtime.backends import device_name

    return {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {device_name(torch.device('cpu'))}"}


def save_tables(out: Path, stem: str, report: dict, text: str) -> None:
    """A benchmark's results in ``out``: ``stem``.json (``report``) and ``stem``.md (``text``), each written
    atomically."""
    from megactor_rt.engine.cache import write_atomic

    write_atomic(out / f"{stem}.json", json.dumps(report, indent=1).encode())
    write_atomic(out / f"{stem}.md", text.encode())


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _fmt2(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _denoise_flops(r: dict) -> float:
    return sum(r["flops"].get(k, 0.0) for k in DENOISE_METHODS)


def _median_result(results: list[dict]) -> dict:
    """One mode's repeats as one result: the median total and stage times, first-frame latency."""
    out = dict(results[-1])
    out["total_s"] = statistics.median(r["total_s"] for r in results)
    out["first_frame_s"] = statistics.median(r["first_frame_s"] for r in results)
    stages = {k for r in results for k in r["stage_s"]}
    out["stage_s"] = {k: statistics.median(r["stage_s"].get(k, 0.0) for r in results) for k in stages}
    return out


def _missing_runs(report: dict) -> list[str]:
    """The planned timed runs a report lacks, as "scenario [mode] (n of its m runs)": every scenario's modes times
    its repeats less the results there, modes recorded as failed left out (their errors say so)."""
    done = Counter((r["scenario"], r["mode"]) for r in report.get("results", []))
    failed = {(e.get("scenario"), e.get("mode")) for e in report.get("errors", [])}
    missing = []
    for sc in report.get("scenarios", []):
        planned = int(sc.get("repeats", 1))
        for mode in sc.get("modes", ()):
            left = planned - done[(sc.get("name"), mode)]
            if left > 0 and (sc.get("name"), mode) not in failed:
                missing.append(f"{sc.get('name')} [{mode}]" + (f" ({left} of its {planned} runs)" if planned > 1
                                                                else ""))
    return missing


def markdown(report: dict) -> str:
    samples = report.get("matmul_samples_tflops", [report["matmul_tflops"]])
    commit = commit_words(report.get("provenance"))
    measured = (f"the best of {' and '.join(f'{x:.3f}' for x in samples)}, measured before and after the runs"
                if len(samples) > 1 else "measured before the runs only")
    lines = [f"Suite `{report['suite']}` on {report['device']}, {report['date']}, torch {report['torch']}, "
             f"{report['threads']} threads, commit {commit}; measured matmul rate {report['matmul_tflops']:.3f} "
             f"TFLOP/s ({report['matmul_dtype']}; {measured}).", ""]
    if report.get("complete") is False:  # (a run stopped, or still under way: the file is saved after each mode)
        planned = sum(len(sc.get("modes", ())) * int(sc.get("repeats", 1)) for sc in report.get("scenarios", []))
        lines += [f"**Incomplete**: {len(report['results'])} of the suite's timed runs are here "
                  + (f"({planned} planned: {len(report['scenarios'])} scenario(s), their modes and repeats; "
                     if planned else "(")
                  + "the run was stopped, or is still under way).", ""]
        missing = _missing_runs(report)
        if missing:
            lines += ["Not measured (yet): " + "; ".join(missing) + ".", ""]
    memory = {"cuda allocated": "torch's peak allocated GPU memory (TensorRT's and onnxruntime's own allocations are "
                                "not in it); \"run's own\": less what was allocated when the run began.",
              "resident": "the process's peak resident memory (the weights, and what the modes run before left, "
                          "included); \"run's own\": its growth over the run, which does not depend on them."}
    if report.get("memory") in memory:
        lines += [f"Memory: {memory[report['memory']]}", ""]
    lines += ["| scenario | mode | frames | total s | fps | first frame s | denoise s | decode s | denoise TFLOP "
              "| denoise TFLOP/s | % of matmul | peak mem GiB | run's own GiB | warm-up s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    repeats: dict[str, dict[str, list[dict]]] = {}
    for r in report["results"]:
        repeats.setdefault(r["scenario"], {}).setdefault(r["mode"], []).append(r)
        dn = _denoise_flops(r)
        lines.append(f"| {r['scenario']} | {r['mode']} | {r['frames']} | {r['total_s']:.2f} | {r['fps']:.3f} | "
                     f"{r['first_frame_s']:.2f} | {r['stage_s'].get('denoise', 0):.2f} | "
                     f"{r['stage_s'].get('vae_decode', 0):.2f} | {dn:.3f} | {r['denoise_tflops_per_s']:.3f} | "
                     f"{100 * r['denoise_tflops_per_s'] / report['matmul_tflops']:.0f} % | {r['peak_memory_gb']:.2f} | "
                     f"{_fmt2(r.get('run_memory_gb'))} | {_fmt(r.get('warmup_s'))} |")
    # ratios from each mode's median over its repeats (times) and its FLOPs (the same in every repeat)
    by_scenario = {name: {mode: _median_result(rs) for mode, rs in modes.items()} for name, modes in repeats.items()}
    ratios, variants = [], []
    upstream = any(UPSTREAM in modes for modes in by_scenario.values())  # a second baseline: its own column
    for name, modes in by_scenario.items():
        ref = modes.get("reference")
        for mode, opt in modes.items():
            if ref is None or mode == "reference":
                continue
            fr = sum(ref["flops"].values()) / max(sum(opt["flops"].values()), 1e-12)
            fd = _denoise_flops(ref) / max(_denoise_flops(opt), 1e-12)
            dr = ref["stage_s"]["denoise"] / opt["stage_s"]["denoise"]
            over = ""
            if upstream:
                up = modes.get(UPSTREAM)
                over = f" {up['total_s'] / opt['total_s']:.2f}x |" if up is not None and mode != UPSTREAM else " - |"
            ratios.append(f"| {name} | {mode} | {'no' if changes_math(mode) else 'yes'} | "
                          f"{ref['total_s'] / opt['total_s']:.2f}x | {dr:.2f}x | {fd:.2f}x | {fr:.2f}x |{over}")
        for mode, r in modes.items():
            base = modes.get(mode.split("+")[0])
            if "+" in mode and base is not None:
                variants.append(f"| {name} | {mode} | {r['total_s'] / base['total_s']:.3f} | "
                                f"{r['first_frame_s'] / base['first_frame_s']:.3f} |")
    if ratios:
        lines += ["", "Ratios of each mode's median over its repeats (\"same math\": no: the mode changes the "
                  "output, e.g. another decoder or open windows, so its speed-up is a faster setting's, not an "
                  "exact-preserving saving's):", "",
                  "| scenario | mode | same math | speed-up over reference, whole run | speed-up, denoise stage | "
                  "FLOP ratio, denoise (reference/mode) | FLOP ratio, whole run |"
                  + (f" speed-up over {UPSTREAM} (upstream's own ops), whole run |" if upstream else ""),
                  "|---|---|---|---|---|---|---|" + ("---|" if upstream else ""), *ratios]
    steps = [f"| {r['scenario']} | {r['mode']} | {r['step_s'][0]:.3f} | {statistics.median(r['step_s']):.3f} | "
             f"{r['step_s'][-1]:.3f} |" for r in report["results"] if r.get("step_s")]
    if steps:
        lines += ["", "| scenario | mode | first step s | median step s | last step s |", "|---|---|---|---|---|",
                  *steps]
    stepless = list(dict.fromkeys(
        f"{r['scenario']} [{r['mode']}]" + ("" if "no-wrap" in r["mode"].split("+") else " (none recorded)")
        for r in report["results"] if not r.get("step_s")))
    if stepless:  # (left out of the step table, which said nothing of them)
        lines += ["", "No per-step times for " + "; ".join(stepless) + ": open windows (+no-wrap) are denoised "
                  "window by window, each through all its steps, so no step spans the clip."]
    late = [f"{r['scenario']} [{r['mode']}]: {', '.join(r['first_counted'])}" for r in report["results"]
            if r.get("first_counted")]
    if late:
        lines += ["", "FLOPs first counted inside a timed run (under the slow FLOP counter, so that run's time is "
                  "too long): " + "; ".join(late)]
    for e in report.get("errors", []):
        lines += ["", f"**{e['scenario']} [{e['mode']}] failed:** {e['error']}"]
    if variants:
        lines += ["", "| scenario | variant | whole-run time / base mode's | first-frame time / base mode's |",
                  "|---|---|---|---|", *variants]
    return "\n".join(lines) + "\n"
