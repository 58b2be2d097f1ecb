"""Graph backends: the submodels run as exported graphs (onnxruntime sessions or TensorRT plans).

``GraphSubmodels`` maps each ``Submodels`` method onto its graph's runner (see ``export/specs.py`` for the
graph I/O) and sends any method whose graph has no runner to a fallback (the torch submodels), so the
TensorRT backend can fall back per submodel.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megactor_rt.config import AnimateConfig, Mode, ModelConfig, Precision
from megactor_rt.engine.manifest import GraphEntry, Manifest, load_manifest
from megactor_rt.errors import MEMORY_HINT, BackendUnavailable, EngineMismatch, InputError, ResourceError
from megactor_rt.export.specs import BANK_NAMES, token_kv_names, token_kv_shapes
from megactor_rt.models.unet import REUSE_BANKS
from megactor_rt.runner import Runner
from megactor_rt.runtime.submodels import Submodels
from megactor_rt.weights import MegActorModels, converted_config, current_weights_id, resized

logger = logging.getLogger(__name__)

# the manifest's dtypes that numpy holds (bfloat16: none; the exports make no bfloat16 graphs)
_NP: dict[str, type[np.generic]] = {"float32": np.float32, "float16": np.float16, "float64": np.float64,
                                    "int64": np.int64, "int32": np.int32, "int8": np.int8, "uint8": np.uint8,
                                    "bool": np.bool_}


def _same_shape(declared: tuple[Any, ...], found: list[Any] | None) -> bool:
    """Whether a session's input shape (``found``: ints, and names or None for dynamic axes) is the manifest's
    (``declared``): as many axes, and the same size on every axis fixed in both."""
    return found is not None and len(found) == len(declared) and all(
        not isinstance(d, int) or not isinstance(f, int) or d == f for d, f in zip(declared, found, strict=True))


def _ort_type(dtype: str) -> str:
    """onnxruntime's name of an input's type (``tensor(float)`` for float32) from the manifest's dtype name."""
    return f"tensor({ {'float32': 'float', 'float64': 'double'}.get(dtype, dtype)})"


# onnxruntime's allocation failures (CPU arena, CUDA provider), as its status messages word them
_ORT_OOM = re.compile(r"Failed to allocate memory|out of memory|bad.alloc|cudaErrorMemoryAllocation", re.IGNORECASE)


NO_TOKEN_KV = "exports made before 2026-11-27 have no token_kv graph"  # (the UNet graphs took the tokens)

# the graphs whose outputs a portrait state holds (runtime.portrait.prepare_portrait, PortraitState.bank)
PORTRAIT_GRAPHS = ("clip_image_encoder", "vae_encoder", "pose_guider_film", "reference_net", "token_kv")


def ort_providers(device: torch.device) -> list[str | tuple[str, dict[str, Any]]] | None:
    """onnxruntime's execution providers for ``device``: None (the CPU) for a CPU device; on CUDA, the CUDA
    provider on that GPU (``device_id``), with the CPU for what it lacks.

    Raises:
        InputError: a CUDA device, and an onnxruntime without the CUDA provider (the CPU build: the graphs
            would run on the CPU, about a hundred times slower, with only a warning from onnxruntime).
    """
    if device.type != "cuda":
        return None
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise InputError(f"device {device}: this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider "
                         f"(providers: {', '.join(available)}); install onnxruntime-gpu in place of onnxruntime, "
                         "or run onnxruntime on --device cpu")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


# the graphs that only decode a run's latents into frames (a step checkpoint holds latents)
DECODER_GRAPHS = frozenset({"vae_decoder", "tiny_decoder"})
# the graphs every run calls whatever its settings (which UNet graphs it calls depends on them: see
# graphs_needed; the tiny decoder's on --tiny-decoder)
RUN_GRAPHS = frozenset({"clip_image_encoder", "vae_encoder", "vae_decoder", "reference_net", "pose_guider",
                        "pose_guider_film", "token_kv"})


class OrtRunner(Runner):
    """One onnxruntime session for one exported graph (CPU, or CUDA/TensorRT providers where installed)."""

    def __init__(self, graph: GraphEntry, providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
                 threads: int = 0) -> None:
        super().__init__(graph.name, list(graph.inputs), list(graph.outputs))
        self.graph = graph
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.threads = threads
        self.session = None

    def identity(self) -> str:
        """onnxruntime, and the ONNX graph it runs."""
        return f"onnxruntime:{self.graph.sha256[:16]}"

    def activate_impl(self) -> None:
        import onnxruntime as ort

        unknown = {n: self.graph.inputs[n].dtype for n in self.input_names if self.graph.inputs[n].dtype not in _NP}
        if unknown:  # once per session, not per call: the graph's input dtypes are fixed
            raise InputError(f"{self.graph.path}: inputs of a dtype onnxruntime's numpy feed cannot hold: {unknown}")
        opts = ort.SessionOptions()
        # (onnxruntime's own warnings, e.g. a line per fp16 node its CPU provider cannot fold, ~90 at a load: with -v)
        opts.log_severity_level = 2 if logger.isEnabledFor(logging.DEBUG) else 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if not self.graph.path.is_file():
            raise InputError(f"graph '{self.graph.name}': ONNX file {self.graph.path} is missing (re-run the export)")
        try:
            session = ort.InferenceSession(str(self.graph.path), opts, providers=self.providers)
        except Exception as exc:  # onnxruntime's own exception types (pybind11): a damaged or incomplete file
            if _ORT_OOM.search(str(exc)):  # loading a big graph's initializers: not the file's fault
                where = ", ".join(p if isinstance(p, str) else p[0] for p in self.providers)
                raise ResourceError(f"out of memory loading onnxruntime graph {self.graph.name} on {where}; "
                                    f"{MEMORY_HINT}") from exc
            raise EngineMismatch(f"graph '{self.graph.name}': onnxruntime cannot load {self.graph.path} "
                                 f"({type(exc).__name__}: {str(exc).strip()[:300]}); the export is damaged or "
                                 "incomplete: re-run it (`megactor-rt check-export` checks a folder)") from exc
        found = {i.name: i.type for i in session.get_inputs()}
        wrong = {n: found.get(n) for n in self.input_names if found.get(n) != _ort_type(self.graph.inputs[n].dtype)}
        if wrong:  # (another export's file under this name, say fp16 for fp32: failed at its first call, after the
            # whole denoising for the decoder, naming no file)
            want = {n: self.graph.inputs[n].dtype for n in wrong}
            raise EngineMismatch(f"graph '{self.graph.name}': {self.graph.path} is not the graph the manifest "
                                 f"describes (inputs {wrong}, the manifest says {want}); the export is inconsistent: "
                                 "re-run it (`megactor-rt check-export` checks a folder)")
        shapes = {i.name: list(i.shape) for i in session.get_inputs()}
        other = {n: shapes.get(n) for n in self.input_names
                 if not _same_shape(self.graph.inputs[n].shape, shapes.get(n))}
        if other:  # (another size's export under this name: failed at its first call, "unexpected error", after the
            # whole denoising for the decoder)
            want = {n: list(self.graph.inputs[n].shape) for n in other}
            raise EngineMismatch(f"graph '{self.graph.name}': {self.graph.path} is not the graph the manifest "
                                 f"describes (input shapes {other}, the manifest says {want}); the export is "
                                 "inconsistent: re-run it (`megactor-rt check-export` checks a folder)")
        logger.debug("onnxruntime %s: providers %s", self.graph.name, session.get_providers())
        self.session = session

    def deactivate_impl(self) -> None:
        self.session = None

    def max_size(self, name: str, axis: int, where: Mapping[int, int] | None = None) -> int | None:
        """None for a dynamic axis (onnxruntime takes any size), else the exported size (0 where ``where``
        names another size of an exported axis)."""
        shape = self.graph.inputs[name].shape
        if any(not isinstance(shape[a], str) and int(shape[a]) != s for a, s in (where or {}).items()):
            return 0
        dim = shape[axis]
        return None if isinstance(dim, str) else int(dim)

    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {n: feed[n].detach().cpu().numpy().astype(_NP[self.graph.inputs[n].dtype], copy=False)
                  for n in self.input_names}
        if self.session is None:
            raise BackendUnavailable(f"onnxruntime session for {self.graph.name} is not active (call activate())")
        try:
            outs = self.session.run(list(self.output_names), arrays)
        except Exception as exc:  # onnxruntime's own exception types (pybind11), one for every failure
            if not _ORT_OOM.search(str(exc)):
                raise
            status = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = ", ".join(p if isinstance(p, str) else p[0] for p in self.providers)
            raise ResourceError(f"out of memory in onnxruntime graph {self.graph.name} on {where} "
                                f"({status}); {MEMORY_HINT}") from exc
        return {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in zip(self.output_names, outs)}


class GraphSubmodels(Submodels):
    """Submodels backed by graph runners keyed by graph name, with an optional per-graph fallback."""

    def __init__(self, name: str, config: ModelConfig, weights_id: str, runners: Mapping[str, Runner],
                 device: torch.device, dtype: torch.dtype, fallback: Submodels | None = None,
                 graph_weights: Mapping[str, str | None] | None = None,
                 other_precisions: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__(config, weights_id, device, dtype)
        self.name = name
        self.runners = dict(runners)
        self.fallback = fallback
        self.graph_weights = dict(graph_weights or {})  # graph -> weights id it was exported from
        self.other_precisions = dict(other_precisions or {})  # graph -> the export's precisions of it not run here
        self.kv_names = token_kv_names(len(token_kv_shapes(config)) // 2)  # the token_kv graph's outputs, in order
        # context windows per UNet call: what every UNet graph takes (a TensorRT plan: its profile's maximum;
        # graphs exported before the windows dim: 1; a graph on the torch fallback: any)
        known = [n for n in self._unet_limits().values() if n is not None]
        self.max_window_batch = min(known) if known else None

    def _unet_limits(self, frames: int | None = None) -> dict[str, int | None]:
        """Each UNet graph's runner: the most windows it takes in a call (of ``frames`` frames where given: 0 if
        no plan takes windows that long; None: any number)."""
        where = {2: frames} if frames is not None else None
        return {g: r.max_size("latents", 0, where) for g, r in self.runners.items() if g.startswith("temporal_unet")}

    def window_batch_limit(self, frames: int) -> int | None:
        """Context windows of ``frames`` frames every UNet graph takes in one call: a set of TensorRT plans
        answers for the plans whose profile takes windows that long (the ``long`` plans: one window). At least
        1: a window length no plan takes fails at the call, with a message naming the profiles."""
        known = [n for n in self._unet_limits(frames).values() if n is not None]
        return max(1, min(known)) if known else None

    def check_run(self, cfg: AnimateConfig) -> None:
        """What a run of ``cfg`` needs from the exported graphs, checked before any work.

        Raises:
            InputError: reference mode (torch only), or a graph the run calls that the export lacks (with no
                fallback to run it).
        """
        if cfg.mode is Mode.REFERENCE:
            raise InputError(f"reference mode (upstream's evaluation, for benchmarks) runs on the torch backend "
                             f"only, not {self.name}; use mode optimized (the same math)")
        for g in graphs_needed(cfg):
            self._check_unet_inputs(g)
        missing = [g for g in graphs_needed(cfg) if g not in self.runners] if self.fallback is None else []
        if missing:
            older_hint = f" ({NO_TOKEN_KV})" if "token_kv" in missing else ""
            precision = "fp16" if self.dtype == torch.float16 else "fp32"
            other = sorted({p for g in missing for p in self.other_precisions.get(g, ())})
            if other:  # (an fp16 export stopped part way beside a whole fp32 one: said the graphs were not there)
                older_hint = (f" at {precision} (it holds them as {'/'.join(other)} graphs: export with --precision "
                              f"{precision}, or run with --precision {other[0]})")
            raise InputError(f"{self.name}: the export has no {', '.join(missing)} graph, which this run needs"
                             f"{older_hint}; export again (megactor-rt export) without --graphs, or with the "
                             "settings of this run")
        gone = [str(r.graph.path) for g in graphs_needed(cfg) if isinstance(r := self.runners.get(g), OrtRunner)
                and r.session is None and not r.graph.path.is_file()]
        if gone:  # before any work, not at the graph's first call (the UNet's: after the portrait's preparation)
            raise InputError(f"ONNX files this run needs are missing: {', '.join(gone)} (re-run the export)")

    def check_window(self, frames: int) -> None:
        """A window of ``frames`` frames fits some plan of every UNet graph (TensorRT: its profiles' frame
        range; onnxruntime and torch take any).

        Raises:
            InputError: no plan takes windows that long, naming what would.
        """
        short = [g for g, n in self._unet_limits(frames).items() if n == 0]
        if short:
            raise InputError(f"{self.name}: no plan of {', '.join(sorted(short))} takes windows of {frames} frames; "
                             "build the `long` plans too (build-engines without --profile), export with --window "
                             f"{frames}, or run with a shorter --window (Python: window=)")

    def tiny_decoder_graph(self, weights_id: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Decoding with the exported ``tiny_decoder`` graph where this backend runs one exported from the TAESD
        weights ``weights_id`` (:func:`~megactor_rt.models.tiny_decoder.tiny_decoder_id`); None otherwise,
        and the caller runs TAESD in torch."""
        if "tiny_decoder" not in self.runners:
            return None
        if self.graph_weights.get("tiny_decoder") != weights_id:
            logger.info("%s: the exported tiny_decoder graph comes from other TAESD weights (%s, not %s); "
                        "decoding with TAESD in torch", self.name, self.graph_weights.get("tiny_decoder"), weights_id)
            return None
        return lambda latents: self._run("tiny_decoder", latents=latents)["images"]

    @property
    def state_id(self) -> str:
        """This backend's name, and for each graph that computes a portrait state what runs it (a plan, a
        session, a fallback) and from which ONNX graph (``--fp16-softmax`` exports other graphs)."""
        parts = []
        for graph in PORTRAIT_GRAPHS:
            runner = self.runners.get(graph)
            parts.append(f"{graph}={runner.identity() if runner is not None else getattr(self.fallback, 'name', None)}")
        return f"{self.name}({','.join(parts)})"

    @property
    def latents_id(self) -> str:
        """This backend's name, what runs each graph but the decoders, and from which ONNX graph: a checkpoint's
        latents from UNet graphs of another export (re-exported under the same weights) are not resumed from."""
        parts = [f"{graph}={runner.identity()}" for graph, runner in sorted(self.runners.items())
                 if graph not in DECODER_GRAPHS]
        return f"{self.name}({','.join(parts)};fallback={getattr(self.fallback, 'name', None)})"

    def _run(self, graph: str, **feed: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls.bump(graph)
        out = self.runners[graph].infer(feed)
        return {k: v.to(self.device, self.dtype) for k, v in out.items()}

    def _fallback(self, graph: str) -> Submodels | None:
        """None when ``graph`` has a runner; otherwise the submodels that run it instead.

        Raises:
            BackendUnavailable: no runner for ``graph`` and no fallback.
        """
        if graph in self.runners:
            return None
        if self.fallback is None:
            raise BackendUnavailable(f"{self.name}: no graph '{graph}' and no fallback")
        return self.fallback

    def clip_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        if (fb := self._fallback("clip_image_encoder")) is not None:
            return fb.clip_tokens(pixels)
        return self._run("clip_image_encoder", pixels=pixels)["tokens"]

    def vae_encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (fb := self._fallback("vae_encoder")) is not None:
            return fb.vae_encode(images)
        out = self._run("vae_encoder", images=images)
        return out["mean"], out["logvar"]

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        if (fb := self._fallback("vae_decoder")) is not None:
            return fb.vae_decode(latents)
        return self._run("vae_decoder", latents=latents)["images"]

    def film(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (fb := self._fallback("pose_guider_film")) is not None:
            return fb.film(reference)
        out = self._run("pose_guider_film", reference=reference)
        return out["film_scale"], out["film_shift"]

    def pose_features(self, frames: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        if (fb := self._fallback("pose_guider")) is not None:
            return fb.pose_features(frames, scale, shift)
        return self._run("pose_guider", frames=frames, film_scale=scale, film_shift=shift)["pose"]

    def reference_bank(self, latent: torch.Tensor, timestep: int, tokens: torch.Tensor) -> list[torch.Tensor]:
        if (fb := self._fallback("reference_net")) is not None:
            return fb.reference_bank(latent, timestep, tokens)
        if latent.shape[0] != 1:
            raise InputError("the reference_net graph runs at batch 1 (use mode='optimized')")
        out = self._run("reference_net", latent=latent, timestep=torch.tensor([float(timestep)]), tokens=tokens)
        return [out[n] for n in BANK_NAMES]

    def _check_unet_inputs(self, graph: str) -> None:
        """Refuse a UNet graph that projects the CLIP tokens itself, as the UNet graphs did until 2026-11-27."""
        runner = self.runners.get(graph)
        if graph.startswith("temporal_unet") and runner is not None and "tokens" in runner.input_names:
            raise InputError(f"{self.name}: graph '{graph}' takes the CLIP tokens, not their keys/values: it was "
                             "exported by an older version; re-run `megactor-rt export` (and `build-engines`)")

    def token_kv(self, tokens: torch.Tensor) -> list[torch.Tensor] | None:
        if "token_kv" not in self.runners and self.fallback is None:
            raise InputError(f"{self.name}: the export has no token_kv graph ({NO_TOKEN_KV}); re-run "
                             "`megactor-rt export` (and `build-engines`)")
        if (fb := self._fallback("token_kv")) is not None:
            return fb.token_kv(tokens)
        out = self._run("token_kv", tokens=tokens)
        return [out[n] for n in self.kv_names]

    def unet(self, latents: torch.Tensor, timestep: int, tokens: torch.Tensor, pose: torch.Tensor,
             bank: Sequence[torch.Tensor] | None, *, n_uncond: int = 0, shared_down: bool = False,
             upstream: bool = False, deep: torch.Tensor | None = None, keep_deep: bool = False,
             token_kv: Sequence[torch.Tensor] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if upstream or bank is None or (shared_down, n_uncond) not in ((True, 1), (False, 0)):
            raise InputError(f"{self.name}: the exported UNet graphs cover the optimized CFG pair and the "
                             "conditional-only call; use mode='optimized' (the reference mode needs torch)")
        graph = ("temporal_unet" if shared_down else "temporal_unet_cond") + ("_reuse" if deep is not None else "")
        if (fb := self._fallback(graph)) is not None:
            return fb.unet(latents, timestep, tokens, pose, bank, n_uncond=n_uncond, shared_down=shared_down,
                           deep=deep, keep_deep=keep_deep, token_kv=token_kv)
        self._check_unet_inputs(graph)  # also here: the Python API's runs need not pass check_run
        takes = set(self.runners[graph].input_names)
        kv = token_kv if token_kv is not None else self.token_kv(tokens)  # (callers without a portrait state)
        assert kv is not None
        feed = dict(latents=latents, timestep=torch.tensor([float(timestep)]), pose=pose)
        feed.update((n, t) for n, t in zip(self.kv_names, kv) if n in takes)  # a reusing graph: its blocks' only
        if deep is not None:
            self.calls.bump("unet_reuse")
            feed.update(zip(BANK_NAMES[-REUSE_BANKS:], bank[-REUSE_BANKS:]), deep=deep)
        else:
            feed.update(zip(BANK_NAMES, bank))
        out = self._run(graph, **feed)
        if not keep_deep:
            return out["eps"]
        if "deep" not in out:
            raise InputError(f"{self.name}: graph '{graph}' has no 'deep' output (exported before feature reuse "
                             "existed): re-run `megactor-rt export` (and `build-engines`)")
        return out["eps"], out["deep"]


def make_graph_submodels(backend: str, weights_dir: str | Path, onnx_dir: str | Path | None,
                         device: torch.device, precision: Precision, *, engine_dir: str | Path | None = None,
                         force_fallback: str | Sequence[str] | None = None, fallback: str = "torch",
                         cuda_graphs: bool = False, image_size: int | None = None) -> GraphSubmodels:
    """Graph-backed submodels: ``onnxruntime`` from an export folder, or ``tensorrt`` from an engine cache
    with per-graph fallback (to ``fallback``: torch or onnxruntime) where no valid plan exists or the user
    forces it; ``cuda_graphs``: the TensorRT runners capture and replay a CUDA graph per input shape. They run
    at the size the graphs were exported at (``image_size``, if given, must be that size)."""
    if backend not in ("onnxruntime", "tensorrt"):
        raise BackendUnavailable(f"unknown graph backend '{backend}'")
    if onnx_dir is None:
        raise InputError(f"the {backend} backend needs the exported graphs: --onnx DIR (Python: onnx_dir=DIR), "
                         "the output of `megactor-rt export`")
    cfg = converted_config(weights_dir)[0]
    weights_id = current_weights_id(weights_dir)  # (a module file replaced by hand: its graphs are other weights')
    manifest = load_manifest(onnx_dir)
    size = manifest.export_size(cfg.image_size, image_size)  # before the weights load
    cfg = replace(cfg, image_size=size)
    foreign = sorted(n for n, g in manifest.graphs.items()  # (the tiny decoder has weights of its own)
                     if g.weights_id not in (None, weights_id) and g.submodel != "tiny_decoder")
    if foreign:
        raise InputError(f"{onnx_dir}: graphs {foreign} were exported from other weights than {weights_dir} "
                         f"(weights id {weights_id}); re-run `megactor-rt export --weights {weights_dir}`")

    def torch_fallback(dtype: torch.dtype) -> Submodels:
        from megactor_rt.runtime.submodels import TorchSubmodels
        from megactor_rt.weights import load_converted

        return TorchSubmodels(resized(load_converted(weights_dir), size), device, dtype)

    return graph_submodels(backend, cfg, weights_id, manifest, device, precision, engine_dir=engine_dir,
                           force_fallback=force_fallback, fallback=fallback, torch_fallback=torch_fallback,
                           onnx_dir=onnx_dir, cuda_graphs=cuda_graphs)


def graph_submodels(backend: str, cfg: ModelConfig, weights_id: str, manifest: Manifest, device: torch.device,
                    precision: Precision, *, torch_fallback: Callable[[torch.dtype], Submodels],
                    engine_dir: str | Path | None = None, force_fallback: str | Sequence[str] | None = None,
                    fallback: str = "torch", onnx_dir: str | Path = "the export folder",
                    cuda_graphs: bool = False) -> GraphSubmodels:
    """:func:`make_graph_submodels` for a loaded manifest of graphs exported from ``weights_id``'s networks at
    ``cfg.image_size``; ``torch_fallback(dtype)`` makes the torch submodels that run the graphs without a plan
    (tensorrt only, at that size too)."""
    want = graph_precision(backend, precision)
    manifest.export_size(cfg.image_size, cfg.image_size)  # graphs of another size: named, not a shape error
    # the onnxruntime sessions run every graph (backend onnxruntime) or the graphs without a plan (tensorrt with
    # fallback onnxruntime); with the torch fallback they are never run
    providers = ort_providers(device) if backend == "onnxruntime" or fallback == "onnxruntime" else None
    ort_runners: dict[str, Runner] = {e.submodel: OrtRunner(e, providers) for e in manifest.graphs.values()
                                      if e.precision == want}
    if not ort_runners:
        raise InputError(f"{onnx_dir}: the manifest has no {want} graphs (export with --precision {want})")
    missing = sorted(str(e.path) for e in manifest.graphs.values() if e.precision == want and not e.path.is_file()
                     and e.submodel in RUN_GRAPHS)
    if missing and backend == "onnxruntime":  # named now, not at the graph's first call (the decoder's: after the
        # whole denoising); TensorRT plans run without their ONNX files; a missing UNet or tiny decoder graph is
        # named when a run first calls it (which of them a run calls depends on its settings)
        raise InputError(f"{onnx_dir}: ONNX files the manifest names are missing: {', '.join(missing)} (re-run the "
                         "export)")
    dtype = torch.float16 if want == "fp16" else torch.float32
    graph_weights = {e.submodel: e.weights_id for e in manifest.graphs.values() if e.precision == want}
    if backend == "onnxruntime":
        logger.info("onnxruntime graphs: %s", sorted(ort_runners))
        other: dict[str, list[str]] = {}
        for e in manifest.graphs.values():
            if e.precision != want:
                other.setdefault(e.submodel, []).append(e.precision)
        return GraphSubmodels("onnxruntime", cfg, weights_id, ort_runners, torch.device("cpu"), dtype,
                              graph_weights=graph_weights, other_precisions=other)
    return _tensorrt_submodels(cfg, weights_id, torch_fallback, engine_dir, manifest, ort_runners, device, dtype,
                               want, force_fallback, fallback, cuda_graphs, graph_weights=graph_weights)


def _tensorrt_submodels(cfg: ModelConfig, weights_id: str, torch_fallback: Callable[[torch.dtype], Submodels],
                        engine_dir: str | Path | None, manifest: Manifest, ort_runners: dict[str, Runner],
                        device: torch.device, dtype: torch.dtype, precision: str,
                        force_fallback: str | Sequence[str] | None, fallback: str, cuda_graphs: bool = False,
                        *, graph_weights: Mapping[str, str | None] | None = None) -> GraphSubmodels:
    from megactor_rt.engine.runner import ProfileSetRunner, TensorRTRunner
    from megactor_rt.engine.select import select_backends

    if fallback not in ("torch", "onnxruntime"):
        raise InputError(f"fallback backend must be torch or onnxruntime, got '{fallback}'")
    if engine_dir is not None and not Path(engine_dir).is_dir():  # (a misspelt --engines ran every graph on the
        # fallback, said only with -v)
        raise InputError(f"{engine_dir}: no such engine folder (--engines names the folder `megactor-rt "
                         "build-engines --out` wrote)")
    index = device.index if device.type == "cuda" else None  # plans checked against, and run on, this GPU
    choices = select_backends(sorted(ort_runners), engine_dir, force_fallback, fallback=fallback,
                              precision=precision, manifest=manifest, cuda_device=index)
    unplanned = [c for c in choices.values() if c.backend != "tensorrt" and not c.reason.startswith("forced")]
    if unplanned and not any(c.backend == "tensorrt" for c in choices.values()):  # (each graph's reason: -v)
        logger.warning("the tensorrt backend has no usable plan for any graph here: every graph runs on %s, slower "
                       "(%s: %s)", fallback, unplanned[0].submodel, unplanned[0].reason)
    runners: dict[str, Runner] = {}
    for graph, choice in choices.items():
        if choice.backend == "tensorrt":
            options = {"cuda_graph": cuda_graphs, "cuda_device": index}
            runners[graph] = (ProfileSetRunner(choice.plan_dirs, **options) if len(choice.plan_dirs) > 1
                              else TensorRTRunner(choice.plan_dir, **options))
        elif choice.backend == "onnxruntime":
            runners[graph] = ort_runners[graph]
    torch_fb = torch_fallback(dtype) if len(runners) < len(choices) else None
    return GraphSubmodels("tensorrt", cfg, weights_id, runners, device, dtype, fallback=torch_fb,
                          graph_weights=graph_weights)


def graph_precision(backend: str, precision: Precision) -> str:
    """The exported graphs' precision a run at ``precision`` uses.

    Raises:
        InputError: bf16, which exported graphs do not come in.
    """
    if precision is Precision.BF16:
        raise InputError(f"the {backend} backend runs fp16 or fp32 graphs; bf16 runs on the torch backend only")
    return "fp16" if precision is Precision.FP16 else "fp32"


def graphs_needed(cfg: AnimateConfig) -> list[str]:
    """The exported graphs a run with ``cfg`` calls (the UNet graphs of its kinds of step)."""
    unets = [("temporal_unet" if kind.cfg else "temporal_unet_cond") + ("_reuse" if kind.reuse else "")
             for kind in cfg.step_kinds()]
    return ["clip_image_encoder", "vae_encoder", "vae_decoder", "reference_net", "pose_guider", "pose_guider_film",
            "token_kv", *unets]


def exported_submodels(models: MegActorModels, backend: str, work_dir: str | Path, device: torch.device,
                       precision: Precision, config: AnimateConfig, *,
                       torch_fallback: Callable[[torch.dtype], Submodels], cuda_graphs: bool = False,
                       fp16_softmax: bool = False) -> GraphSubmodels:
    """In-memory networks on a graph backend, as a self-contained check of that backend (``demo --backend``,
    the bench's ``+onnxruntime``/``+tensorrt`` modes): the graphs a run with ``config`` needs (and its tiny
    decoder's) exported from ``models`` (fp32, CPU) into ``work_dir/onnx-<weights id>``, for ``tensorrt`` built
    into ``work_dir/engines`` too. Exports and plans are content-keyed, so a later call with the same networks
    reuses them. ``fp16_softmax``: see ``export --fp16-softmax``.

    Raises:
        BackendUnavailable: ``backend`` is missing here (before any export).
    """
    from megactor_rt.engine.builder import build_engines
    from megactor_rt.export.onnx_export import export_models, export_tiny_decoder
    from megactor_rt.runtime.backends import require_backend

    require_backend(backend)
    want = graph_precision(backend, precision)  # before any export
    work = Path(work_dir)
    onnx_dir = work / f"onnx-{models.weights_id}-{models.config.image_size}px"  # one size per export folder
    export_models(models, onnx_dir, precisions=(want,), frames=config.window, graphs=graphs_needed(config),
                  window_batch=config.window_batch, fp16_softmax=fp16_softmax)
    if config.tiny_decoder is not None:  # its graph too, so the backend decodes with it
        export_tiny_decoder(config.tiny_decoder, models.config, onnx_dir, precisions=(want,))
    engine_dir = None
    if backend == "tensorrt":
        engine_dir = work / "engines"
        build_engines(onnx_dir, engine_dir, want)
    return graph_submodels(backend, models.config, models.weights_id, load_manifest(onnx_dir), device, precision,
                           engine_dir=engine_dir, torch_fallback=torch_fallback, onnx_dir=onnx_dir,
                           cuda_graphs=cuda_graphs)
