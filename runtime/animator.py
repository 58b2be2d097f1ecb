"""The public API: ``Animator`` (prepare a portrait once, animate it with any number of driving videos).

    >>> anim = Animator.from_weights("weights/megactor-rt")          # or Animator.demo() (tiny, random)
    >>> state = anim.prepare("me.png")                               # cached per portrait
    >>> for frame in anim.animate(state, "meme.mp4"): ...            # (H, W, 3) uint8 frames, streamed
    >>> anim.animate_to_file("me.png", "meme.mp4", "out.mp4")        # H.264 at the driver's fps + audio
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import sys
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
import torch
from PIL import Image

from megactor_rt.config import (
    DEMO_WEIGHTS_SEED,
    AnimateConfig,
    ConfigChanges,
    Mode,
    ModelConfig,
    Precision,
    tiny_config,
    tiny_weights_id,
    whole_number,
)
from megactor_rt.contour import ContourPlan, Landmarker, check_affine_frame, check_landmark_area
from megactor_rt.errors import MEMORY_HINT, InputError, ResourceError
from megactor_rt.kernels.ops import latents_to_uint8
from megactor_rt.media import (
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    RESULT_TAG,
    check_bit_depth,
    check_first_number,
    check_not_an_input,
    check_output_path,
    check_quality,
    check_result_rate,
    check_sound,
    file_name,
    image_to_rgb,
    read_portrait,
    recorded_options,
    result_writer,
)
from megactor_rt.models.scheduler import DDIM, DDIMStep, context_windows
from megactor_rt.models.tiny_decoder import load_tiny_decoder, tiny_decoder_id
from megactor_rt.pipe import check_sound_out
from megactor_rt.preprocess import (
    Box,
    Crop,
    PasteBack,
    background_inputs,
    check_face_choice,
    check_face_detector,
    crop_resize,
    first_face,
    load_user_mask,
    person_mask,
    portrait_crop,
    widen,
)
from megactor_rt.progress import Progress, Reporter, progress, reporting
from megactor_rt.runtime.backends import device_name
from megactor_rt.runtime.cache import PortraitCache
from megactor_rt.runtime.checkpoint import StepCheckpoint, check_checkpoint_dir, inputs_key, run_key
from megactor_rt.runtime.denoise import EpsModel, NoiseSource, denoise, denoise_stream, windows_in_flight
from megactor_rt.runtime.driver import (
    Driver,
    DriverFrames,
    DriverPlan,
    FrameSelection,
    PlanCache,
    check_local,
    cropped_frames,
    driver_file,
    driver_identity,
    driver_info,
    driver_name,
    driver_sound,
    driver_source,
    iter_driver_inputs,
    plan_driver_contour,
)
from megactor_rt.runtime.noise import FrameNoise, initial_noise
from megactor_rt.runtime.pipeline import (
    InFlight,
    RunStats,
    StageTimer,
    cancellable,
    in_thread,
    prefetch,
    to_device_queued,
)
from megactor_rt.runtime.portrait import PortraitInputs, PortraitState, prepare_portrait
from megactor_rt.runtime.predictor import (
    OptimizedPredictor,
    PoseFeed,
    ReferencePredictor,
    cfg_pair,
    feature_offload,
    kept_feature_bytes,
    reusable,
)
from megactor_rt.runtime.submodels import Submodels, TorchSubmodels, check_compile_mode
from megactor_rt.sequence import FrameSequence, check_room, is_sequence
from megactor_rt.weights import build_models, check_image_size, converted_config, load_converted, resized

if sys.version_info >= (3, 11):  # (at run time too: typing.get_type_hints evaluates the annotations)
    from typing import Unpack
else:  # (Python 3.10: typing_extensions', which torch requires)
    from typing_extensions import Unpack

logger = logging.getLogger(__name__)

POSE_BATCH = 16  # driving frames per PoseGuider call
# the portrait cache's key names this: raise it when a change to the code gives other numbers for a portrait
# state (its VAE latents, CLIP tokens, FiLM code or ReferenceNet banks), so an on-disk store is not read back
STATE_FORMAT = 2  # 2: fp32 FiLM reference, VAE input normalised in fp16 as upstream
DECODE_BATCH = 4  # frames per VAE decode call
Decoder = Callable[[torch.Tensor], torch.Tensor]  # scaled latents (b, 4, h, w) -> images (b, 3, S, S) in [-1, 1]
DECODE_DEPTH = 3  # decode batches in flight (CUDA streams)
ADA_SIZE = 512  # the PoseGuider FiLM branch needs a 512x512 reference
# what a portrait may be: an image or video file, an (H, W, 3) uint8 RGB array, a PIL image (made upright RGB)
Portrait = str | Path | np.ndarray | Image.Image


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_and_precision(device: str | torch.device | None, precision: Precision | str | None
                         ) -> tuple[torch.device, Precision]:
    """The device and precision a run of :meth:`Animator.from_weights` takes: those given (checked), else cuda and
    fp16 where a GPU is there, cpu and fp32 where not (the precision follows the device)."""
    dev = check_device(device) if device else default_device()
    return dev, Precision.parse(precision) if precision else (Precision.FP16 if dev.type == "cuda" else
                                                               Precision.FP32)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that this machine has.

    Raises:
        InputError: not a device name, or a CUDA device where torch sees no GPU (or not that many).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"device {device!r} is not a torch device name (cpu, cuda, cuda:1, ...)") from exc
    if dev.type not in ("cpu", "cuda"):  # (--device mps ended in torch's NotImplementedError, "unexpected error")
        raise InputError(f"device {device}: megactor-rt runs on cpu or cuda (cuda:1, ...)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu "
                             "(Python: device='cpu') or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device}: there are {torch.cuda.device_count()} CUDA GPUs")
    return dev


@contextmanager
def memory_errors(what: str, device: torch.device) -> Iterator[None]:
    """Turn running out of GPU or host memory during ``what`` into a :class:`ResourceError` that says so and
    names what lowers the need (instead of a raw allocator traceback)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "allocation failed"
        raise ResourceError(f"out of GPU memory while {what} on {device} ({first}); {MEMORY_HINT}") from exc
    except MemoryError as exc:
        raise ResourceError(f"out of host memory while {what} ({str(exc).strip() or 'allocation failed'}); {MEMORY_HINT}") from exc


class AnimateOptions(TypedDict, total=False):
    """:meth:`Animator.animate`'s keyword options, as :meth:`Animator.animate_async` takes them (typed for users'
    type checkers; see :meth:`Animator.animate` for each)."""

    face_crop: bool
    contour: bool
    landmarks_model: str | Path | None
    contour_affine_frame: str
    config: AnimateConfig | None
    driver_face: int | None
    checkpoint_dir: str | Path | None
    on_progress: Reporter | None


class Animator:
    """Portrait animation with one set of submodels (one backend) and one run configuration.

    Threads: ``last_stats`` and ``last_plan`` are the facts of the run started last, and its driver's crop and
    frame selection (set before its first frame). Runs of one Animator may overlap (threads, ``animate_async``
    requests): each keeps its own plan, checkpoint and stats (those :meth:`animate_to_file` returns), but
    ``last_stats`` and ``last_plan`` are then the later run's. For concurrent
    requests give each worker thread its own :meth:`with_config` copy: the copies share the networks (read
    only at inference) and the portrait cache (locked), and their runs may overlap (driver decoding and face
    detection of one while another denoises; on one GPU the device work queues up). That holds for the
    eager torch, onnxruntime and TensorRT backends (a TensorRT runner keeps one execution context per
    stream); a ``torch.compile``d UNet should be driven by one thread at a time. ``last_stats.calls`` counts
    the shared submodels' calls made while the run went on: with overlapping runs of copies it includes theirs
    (the other figures are the run's own).

    Args:
        submodels: the backend's networks (``TorchSubmodels``, ``OrtSubmodels``, ...).
        config: run settings (upstream defaults).
        cache: portrait cache (a fresh in-memory one by default).
    """

    def __init__(self, submodels: Submodels, config: AnimateConfig | None = None,
                 cache: PortraitCache | None = None, plans: PlanCache | None = None) -> None:
        _check_run_options(config, None)  # (a dict: refused here, not at the first prepare or run)
        self.sub = submodels
        self.config = config or AnimateConfig()
        self.cache = cache if cache is not None else PortraitCache()
        self.plans = plans if plans is not None else PlanCache()  # drivers' pass 1, for the next run
        self.last_stats = RunStats()
        self.last_plan: DriverPlan | None = None
        self._tiny_decoders: dict[str, Decoder] = {}

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_weights(cls, weights_dir: str | Path, *, backend: str = "torch", device: str | None = None,
                     precision: Precision | str | None = None, onnx_dir: str | Path | None = None,
                     engine_dir: str | Path | None = None, force_fallback: str | Sequence[str] | None = None,
                     fallback: str = "torch", config: AnimateConfig | None = None,
                     cache: PortraitCache | None = None, compile: bool | str = False,
                     cuda_graphs: bool = False, image_size: int | None = None) -> Animator:
        """Load converted weights (``megactor-rt convert-weights``) for ``backend``.

        Args:
            weights_dir: converted weights folder.
            backend: ``torch``, ``onnxruntime`` (needs ``onnx_dir``) or ``tensorrt`` (needs ``onnx_dir`` and
                ``engine_dir``; graphs without a valid plan, or listed in ``force_fallback``, run on
                ``fallback``).
            device / precision: default cuda+fp16 where available, else cpu+fp32.
            compile: torch backend only: the temporal UNet through ``torch.compile``, optionally with a
                compile mode (see ``TorchSubmodels``).
            cuda_graphs: tensorrt backend only: each engine's first call at an input shape is captured into a
                CUDA graph that later calls of that shape replay (fewer host launches; the inputs and outputs
                are copied through static buffers). Not yet run on a GPU in this project.
            onnx_dir / engine_dir: the ``megactor-rt export`` folder and the ``build-engines`` folder.
            force_fallback: graph names (or one) that run on ``fallback`` even where a plan exists.
            fallback: what runs the graphs without a valid plan (tensorrt backend): ``torch`` or
                ``onnxruntime``.
            config: run settings (:class:`~megactor_rt.config.AnimateConfig`; default: upstream's).
            cache: the portrait cache (default: in memory only; ``PortraitCache(disk_dir=...)`` keeps prepared
                portraits on disk for later processes).
            image_size: crop and animate at this size instead of the weights' (512 for the released model,
                which was trained at that size: other sizes change the result, and smaller ones run faster); a
                multiple of 64 from 128 to 1024. The graph backends run at the size their graphs were exported
                at (``megactor-rt export --size``): there it may be left out, and must be that size if given.

        Raises:
            InputError: ``compile`` with a backend other than torch, ``cuda_graphs`` with one other than
                tensorrt, a device this machine lacks, an ``image_size`` the networks cannot take (or, on a graph
                backend, not the size of the exported graphs).
            BackendUnavailable: the backend's package is missing here.
            WeightsError: ``weights_dir`` is not a complete converted weights folder.
        """
        from megactor_rt.runtime.backends import require_backend

        require_backend(backend)
        _check_run_options(config, None)  # (before the weights load)
        image_size = _whole_argument("image_size", image_size)  # (a numpy integer: as an int)
        if compile and backend != "torch":
            raise InputError(f"compile (--compile) applies to the torch backend only, not '{backend}'")
        check_compile_mode(compile)  # before the weights load
        _check_cuda_graphs(backend, cuda_graphs)
        dev, prec = device_and_precision(device, precision)
        _warn_half_on_cpu(dev, prec)
        if backend == "torch":
            if image_size is not None:  # a size the networks cannot take: before the weights load
                check_image_size(converted_config(weights_dir)[0], image_size)
            models = load_converted(weights_dir)
            sub: Submodels = TorchSubmodels(resized(models, image_size), dev, prec.torch_dtype, compile=compile)
        else:
            from megactor_rt.runtime.onnx_backend import make_graph_submodels

            sub = make_graph_submodels(backend, weights_dir, onnx_dir, dev, prec, engine_dir=engine_dir,
                                       force_fallback=force_fallback, fallback=fallback, cuda_graphs=cuda_graphs,
                                       image_size=image_size)
        return cls(sub, config, cache)

    @classmethod
    def demo(cls, seed: int = DEMO_WEIGHTS_SEED, device: str | None = None, config: AnimateConfig | None = None, *,
             backend: str = "torch", work_dir: str | Path | None = None, precision: Precision | str | None = None,
             cuda_graphs: bool = False, image_size: int | None = None) -> Animator:
        """A tiny random-weight model (golden-pack architecture, 128 px; ``image_size``: another, as for
        :meth:`from_weights`): exercises the whole pipeline
        (crop, I/O, audio, fps) without real weights. Its output is NOT a real animation.

        With ``backend`` ``onnxruntime`` or ``tensorrt`` the tiny networks are first exported to ONNX (and built
        into TensorRT plans) in ``work_dir`` (default ``demo_work_dir()``; reused by later calls) and run there:
        a check of that backend's install in a minute, without real weights. Precision: fp32 (torch,
        onnxruntime), fp16 (tensorrt) unless given; device: cpu (torch, onnxruntime), cuda (tensorrt).

        Args:
            seed: seed of the random weights (not of the runs: that is ``config.seed``); the default is the
                model of ``megactor-rt demo`` and ``animate --demo`` (whose ``--seed`` is the runs' seed).
            config: run settings (:class:`~megactor_rt.config.AnimateConfig`; default: upstream's).
            cuda_graphs: tensorrt backend only, as for :meth:`from_weights`.

        The portrait cache is in memory; for the on-disk store, set ``anim.cache =
        PortraitCache(disk_dir=...)`` on the result (as ``megactor-rt demo --cache-dir`` does).
        """
        _check_cuda_graphs(backend, cuda_graphs)
        _check_run_options(config, None)
        seed, image_size = _whole_argument("seed", seed), _whole_argument("image_size", image_size)
        models = resized(build_models(tiny_config(), seed=seed), image_size)
        models.weights_id = tiny_weights_id(seed)
        if backend == "torch":
            prec = Precision.parse(precision) if precision else Precision.FP32
            dev = check_device(device or "cpu")
            _warn_half_on_cpu(dev, prec)
            return cls(TorchSubmodels(models, dev, prec.torch_dtype), config)
        from megactor_rt.runtime.backends import require_backend
        from megactor_rt.runtime.onnx_backend import exported_submodels

        require_backend(backend)  # a missing backend is named before the device
        dev = check_device(device or ("cuda" if backend == "tensorrt" else "cpu"))
        prec = Precision.parse(precision) if precision else (Precision.FP16 if backend == "tensorrt" else Precision.FP32)
        _warn_half_on_cpu(dev, prec)
        cfg = config or AnimateConfig()
        sub = exported_submodels(models, backend, work_dir or demo_work_dir(), dev, prec, cfg,
                                 torch_fallback=lambda dtype: TorchSubmodels(models, dev, dtype),
                                 cuda_graphs=cuda_graphs)
        return cls(sub, cfg)

    @property
    def image_size(self) -> int:
        return self.sub.config.image_size

    @property
    def latent_size(self) -> int:
        """Side of the VAE latent grid (image size / the VAE's downsampling)."""
        return self.sub.config.latent_size

    # -- portrait --------------------------------------------------------------------------------------
    def portrait_inputs(self, portrait: Portrait, *, face_crop: bool = True,
                        mask: str | Path | None = None, face: int | None = None) -> PortraitInputs:
        """Crop the portrait around its face (``face``: see :meth:`prepare`), derive the background mask and the
        CLIP background image."""
        _check_mask(mask)  # (as prepare's: before the face search)
        return self._cropped_inputs(*self._portrait_crop(portrait, face_crop, face, self.config.face_detector), mask)

    def paste_back(self, portrait: Portrait, *, face_crop: bool = True, face: int | None = None
                   ) -> PasteBack:
        """What puts this portrait's result frames back into the whole portrait, as ``animate_to_file(...,
        paste_back=True)`` does: ``paste(frame)`` for each frame :meth:`animate` yields (``face_crop``, ``face``:
        as given to :meth:`prepare`; the face is detected again)."""
        img, _, crop, _ = self._portrait_crop(portrait, face_crop, face, self.config.face_detector)
        return PasteBack.of(img, crop, self.image_size)

    def _portrait_crop(self, portrait: Portrait, face_crop: bool, face: int | None, detector: str
                       ) -> tuple[np.ndarray, str, Crop, Box | None]:
        # (paste_back and portrait_inputs too: a face number of the wrong type is named, not a TypeError from the
        # face search)
        return crop_portrait(portrait, self.image_size, face_crop, _whole_argument("face", face), detector)

    def _cropped_inputs(self, img: np.ndarray, name: str, crop: Crop, found: Box | None,
                        mask: str | Path | None) -> PortraitInputs:
        size = self.image_size
        # upstream resizes in fp32 (crop_and_resize_tensor casts to float first): those values / 255 feed the
        # FiLM branch, and the VAE the same values truncated to uint8 (spec 2.1 (a), (b))
        resized = crop_resize(img, crop, size)
        image = resized.to(torch.uint8)  # (3, S, S), truncated like upstream
        hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
        if mask is not None:
            person = load_user_mask(mask, size, crop=crop, image_shape=img.shape[:2])
        else:
            # without a face crop (centre square), the face is looked for in the crop to seed the person mask
            face_in_crop = found.to_crop_coords(crop, size) if found is not None else first_face(hwc)
            if face_in_crop is None:
                logger.warning("%s: no face in the centre crop, so no person mask: the CLIP image keeps the whole "
                               "crop and every pixel counts as background (pass --mask to give one)", name)
            person = person_mask(hwc, face_in_crop) if face_in_crop is not None else np.zeros((size, size), np.uint8)
        background, clip_bg = background_inputs(hwc, person)
        ada = resized if size == ADA_SIZE else crop_resize(img, crop, ADA_SIZE)  # fp32, not truncated
        return PortraitInputs(image=image, background_mask=torch.from_numpy(background),
                              clip_image=torch.from_numpy(clip_bg).permute(2, 0, 1).contiguous(), ada_reference=ada)

    def prepare(self, portrait: Portrait | PortraitInputs, *, face_crop: bool = True,
                mask: str | Path | None = None, seed: int | None = None, face: int | None = None) -> PortraitState:
        """Everything per-portrait, from the cache when this portrait was prepared before.

        Args:
            portrait: an image file, a video file (its first frame, as upstream), an ``(H, W, 3)`` uint8 RGB
                array, a PIL image, or :class:`PortraitInputs` already cropped.
            face_crop: crop around the largest face (False: the centre square; a face found there still seeds
                the person mask).
            face: a portrait of several people: crop around the ``face``-th face from the left (1 = the
                leftmost, by the faces' centres) instead of the largest; it also seeds the person mask.
            mask: a person mask image (white = person) instead of the GrabCut mask.
            seed: draws the VAE posterior sample of the concatenated reference (default: this Animator's
                ``config.seed``), as the run's seed does upstream: animate with a state prepared with the
                run's seed (another seed is allowed, with a warning: the frames then differ from that seed's).

        Raises:
            InputError: an unreadable portrait or mask, no face (with ``face_crop``), fewer faces than ``face``
                (or ``face`` without ``face_crop``), a size outside 64..8192 px, a ``seed`` or ``face`` that is no
                whole number.
        """
        return self._prepare(portrait, face_crop, mask, seed, face)[0]

    def _prepare(self, portrait: Portrait | PortraitInputs, face_crop: bool,
                 mask: str | Path | None, seed: int | None, face: int | None = None,
                 detector: str | None = None) -> tuple[PortraitState, bool]:
        """:meth:`prepare`, and whether the state came from the cache (``detector``: the face detector, default
        this Animator's ``config.face_detector``)."""
        _check_mask(mask)
        seed = self.config.seed if seed is None else _whole_argument("seed", seed)
        if not -(2 ** 63) <= seed < 2 ** 63:
            raise InputError(f"seed must fit in 64 bits (-2**63 .. 2**63-1), got {seed}")
        face = _whole_argument("face", face)
        inputs = portrait if isinstance(portrait, PortraitInputs) else self._cropped_inputs(
            *self._portrait_crop(portrait, face_crop, face, detector or self.config.face_detector), mask)
        key = f"{inputs.digest()}|{self._state_owner()}|seed={seed}|format={STATE_FORMAT}"
        state = self.cache.get(key, self.sub.device)
        if state is not None:
            return state, True
        with memory_errors("preparing the portrait", self.sub.device):
            state = prepare_portrait(self.sub, inputs, seed, key=key)
        self.cache.put(state)
        return state, False

    def _state_owner(self) -> str:
        """The part of a portrait state's key that says which model computed it, and how."""
        return f"{self.sub.weights_id}|{self.sub.state_id}|{self.sub.dtype}|{self.sub.device}"

    def _check_state(self, state: PortraitState) -> None:
        """``state`` came from :meth:`prepare` of a model like this one (weights, backend, dtype, device, image
        size)."""
        if not isinstance(state, PortraitState):
            raise InputError(f"animate takes the PortraitState that prepare() returns, got {type(state).__name__} "
                             "(animate_to_file takes a portrait file)")
        if state.key and f"|{self._state_owner()}|" not in state.key:  # key "": made by hand (tests, tools)
            raise InputError("this portrait state was prepared by another model (other weights, backend, precision "
                             "or device); prepare the portrait with this Animator")
        # (the key names no image size: its digest of the crop differs, but a state is checked by its owner only)
        size = state.inputs.image.shape[-1]
        if size != self.image_size:
            raise InputError(f"this portrait state was prepared by another model, at {size} px (this Animator's "
                             f"image size is {self.image_size} px); prepare the portrait with this Animator")

    @staticmethod
    def _note_seed(state: PortraitState, cfg: AnimateConfig) -> None:
        """A state prepared with another seed than the run's gives other frames than one prepared with the run's
        (its VAE sample follows the state's seed, the noise the run's): allowed, but said (once per run)."""
        found = re.search(r"\|seed=(-?\d+)\|", state.key)
        if found is not None and int(found.group(1)) != cfg.seed:
            logger.warning("this portrait state was prepared with seed %s and the run's seed is %d: its reference "
                           "latent sample follows seed %s, the noise seed %d (the frames differ from a run that "
                           "prepares the portrait with seed %d; prepare(..., seed=%d) for that)", found.group(1),
                           cfg.seed, found.group(1), cfg.seed, cfg.seed, cfg.seed)

    def warmup(self, config: AnimateConfig | None = None) -> float:
        """Run every network once on dummy inputs of a request's shapes (one context window, one decode batch),
        so that one-time costs - ``torch.compile`` compilation, cuDNN algorithm selection, allocator growth,
        TensorRT context setup - are paid now, not by the first request. Touches no cache.

        Args:
            config: the settings whose shapes to warm up (default: this Animator's; window, window batch, CFG
                and feature reuse change the UNet calls' shapes).

        Returns:
            Seconds taken.
        """
        _check_run_options(config, None)
        with memory_errors("warming up", self.sub.device):
            return self._warmup(config or self.config)

    def run_settings(self, config: AnimateConfig | None = None) -> dict[str, Any]:
        """What a run of ``config`` (default: this Animator's) runs on and with, as plain JSON values: backend,
        device, dtype, ``compile``, weights id, every ``AnimateConfig`` field and the windows per UNet call it
        gets here (for records of measured runs, e.g. ``animate --stats``)."""
        _check_run_options(config, None)
        cfg = config or self.config
        dev = self.sub.device
        fields = cfg.plain()
        return {"backend": self.sub.name, "device": str(dev), "device_name": device_name(dev),
                "dtype": str(self.sub.dtype).removeprefix("torch."), "compile": getattr(self.sub, "compile", False),
                "weights_id": self.sub.weights_id, "image_size": self.image_size, "config": fields,
                "window_batch_used": self.window_batch(cfg)}

    def window_batch(self, cfg: AnimateConfig) -> int:
        """Context windows per UNet call for a run of ``cfg`` (``AnimateConfig.window_batch`` where it
        applies: the optimized mode's step-by-step loop, on a backend whose UNet takes several; else 1)."""
        if cfg.window_batch == 1:
            return 1
        if not cfg.batches_windows:
            logger.info("window_batch %d: not used by %s (one window per UNet call)", cfg.window_batch,
                        "the reference mode" if cfg.mode is not Mode.OPTIMIZED else "open windows (streamed)")
            return 1
        most = self.sub.window_batch_limit(cfg.window)
        if most is not None and most < cfg.window_batch:
            logger.info("window_batch %d: the %s backend's UNet takes %d window(s) of %d frames per call",
                        cfg.window_batch, self.sub.name, most, cfg.window)
            return most
        return cfg.window_batch

    def _warmup(self, cfg: AnimateConfig) -> float:
        t0 = time.perf_counter()
        mcfg, size, h = self.sub.config, self.image_size, self.latent_size
        image = torch.zeros(1, 3, size, size)
        mean, _ = self.sub.vae_encode(image)
        tokens = self.sub.clip_tokens(torch.zeros(1, 3, mcfg.clip.image_size, mcfg.clip.image_size))
        scale, shift = self.sub.film(torch.zeros(1, 3, ADA_SIZE, ADA_SIZE))
        # in PoseFeed's batches (the PoseGuider plans take at most POSE_BATCH frames; a window may be longer)
        pose = torch.cat([self.sub.pose_features(torch.zeros(min(POSE_BATCH, cfg.window - i), 3, size, size),
                                                 scale, shift) for i in range(0, cfg.window, POSE_BATCH)])
        t = mcfg.scheduler.num_train_timesteps - 1
        bank = self.sub.reference_bank(mean, t, tokens)
        token_kv = self.sub.token_kv(tokens) if cfg.mode is Mode.OPTIMIZED else None  # as the run's calls take it
        pose = pose.permute(1, 0, 2, 3)[None]
        per_call = self.window_batch(cfg)
        for k in sorted({1, per_call}):  # calls of one window (short drivers) and of window_batch windows
            lat = torch.zeros(k, 9, cfg.window, h, h, device=mean.device, dtype=mean.dtype)
            kept: torch.Tensor | None = None
            for kind in cfg.step_kinds():  # every kind of UNet call the run makes, in the order it first makes them
                deep = reusable(kept, kind.cfg, k) if kind.reuse else None
                out = self.sub.unet(lat, t, tokens, pose.expand(k, -1, -1, -1, -1), bank, deep=deep,
                                    keep_deep=cfg.reuses_features and deep is None, token_kv=token_kv,
                                    **cfg_pair(kind.cfg))
                eps, kept = out if isinstance(out, tuple) else (out, kept)
        tiny = self.tiny_decoder(cfg.tiny_decoder) if cfg.tiny_decoder is not None else None
        self._decode_batch(eps[0, :, :DECODE_BATCH].permute(1, 0, 2, 3), tiny, cfg.bit_depth)
        if self.sub.device.type == "cuda":
            torch.cuda.synchronize(self.sub.device)
        return time.perf_counter() - t0

    # -- animation -------------------------------------------------------------------------------------
    def animate(self, state: PortraitState, driver: Driver, *, face_crop: bool = True,
                contour: bool = False, landmarks_model: str | Path | None = None,
                contour_affine_frame: str = "last", config: AnimateConfig | None = None,
                driver_face: int | None = None, checkpoint_dir: str | Path | None = None,
                on_progress: Reporter | None = None) -> Generator[np.ndarray, None, None]:
        """Animate ``state`` with a driving video; yields ``(S, S, 3)`` uint8 frames (``bit_depth=16`` in the config:
        uint16) as they are final.

        Every driver frame gives one output frame (no cap unless ``config.max_frames``). Per-run facts
        (stage times, first-frame latency, submodel calls) are in ``self.last_stats``. In the optimized mode
        the driver's second pass (decode, crop, face isolation) and the PoseGuider run while denoising, as the
        windows first need their frames (:class:`PoseFeed`): stage ``driver+pose_guider`` is then the time the
        loop spent on them, a part of stage ``denoise``.

        Args:
            state: what :meth:`prepare` returned (by this Animator or one sharing its model).
            driver: the driving video file, or its frames in memory
                (:class:`~megactor_rt.runtime.driver.DriverFrames`: ``(H, W, 3)`` uint8 RGB and their fps).
            face_crop: crop the driver around its faces (False: the centre square).
            driver_face: a driver of several people: follow the ``driver_face``-th face from the left (counted in
                the first frame that shows that many faces) instead of the face chosen automatically (the
                largest until two frames show several faces, then the one overlapping the last choice).
            config: this run's settings (default: this Animator's).
            contour: upstream's contour-preserving mode: only the driver's eyes, mouth and brows are kept and
                moved onto the portrait's face, so the portrait keeps its face shape (see
                :mod:`megactor_rt.contour`; needs the 68-point landmark model).
            landmarks_model: the landmark model file for ``contour`` (default: found automatically).
            contour_affine_frame: whose landmarks place the driver's face box for ``contour``'s affine: "last"
                (upstream's quirk, the default) or "first" (the frame upstream's code meant).
            checkpoint_dir: save the denoising state there after each step, and continue from it when the same
                run is started again (:mod:`~megactor_rt.runtime.checkpoint`; wrapping windows only); the
                checkpoint goes once the last frame is out. ``last_stats.resumed_from_step`` says where it began.
            on_progress: called with a :class:`~megactor_rt.progress.Progress` (stage, done, total, unit) after each
                unit of the run's work (a driver frame scanned, a window call, a decoder batch), as the progress
                bars count them (also with the bars off), in the thread running the stage (a driver planned by an
                earlier run, ``last_stats.driver_plan_hit``, has no ``"driver"`` stage); for a service's progress
                display (with wrapping windows the first frame comes only after the last step). It should return
                quickly; an exception it raises stops the run and comes out of this generator. A plain function: an
                ``async def`` one is refused (from asyncio, hand reports on with ``loop.call_soon_threadsafe``).

        Raises (when the first frame is asked for: this is a generator):
            InputError: a missing or unreadable driver, one that is neither a path nor ``DriverFrames``, no face
                in it (with ``face_crop``), a ``start`` past its end, a state prepared by another model,
                settings this model cannot run, a ``config`` that is no ``AnimateConfig`` or an ``on_progress`` that
                is no function.
            ValueError: ``contour_affine_frame`` is neither "last" nor "first".
            ResourceError: out of GPU or host memory (the message names the settings that lower the need).
        """
        run = _Run()
        self.last_stats, self.last_plan = run.stats, None  # this run's, also where its arguments are refused
        check_affine_frame(contour_affine_frame)
        _check_run_options(config, on_progress)
        if checkpoint_dir is not None:  # (a file, or no way to write it: was found after the portrait's crop and
            check_checkpoint_dir(checkpoint_dir)  # the driver's face search)
        try:
            yield from reporting(self._frames(state, driver, face_crop, contour, landmarks_model,
                                              contour_affine_frame, config or self.config, driver_face,
                                              checkpoint_dir, run), on_progress)
        except GeneratorExit:
            # closed right after its last frame (a caller that takes the frames it knows of and never asks past
            # them: islice, zip): every frame is out all the same. Closed earlier, the checkpoint stays: its run
            # started again continues from it (a finished one: decodes its saved latents, no step again)
            if run.plan is not None and run.stats.frames == run.plan.num_frames:
                run.drop_checkpoint()
            raise
        run.drop_checkpoint()  # every frame is out: the run is done

    async def animate_async(self, state: PortraitState, driver: Driver, **options: Unpack[AnimateOptions]
                            ) -> AsyncGenerator[np.ndarray, None]:
        """:meth:`animate` for asyncio (a web service): the same frames, each computed off the event loop (the run
        on a thread of its own), so the loop serves other requests meanwhile; ``options``: :meth:`animate`'s.
        Leaving early (a client gone, a cancelled task) stops the run once the window call in progress is done, as
        closing :meth:`animate` does: at once within :func:`contextlib.aclosing` (else when the iterator is
        collected: at once in CPython, after a ``break``).

        Example:
            >>> async with contextlib.aclosing(anim.animate_async(state, "meme.mp4")) as frames:
            ...     async for frame in frames:
            ...         await websocket.send_bytes(encode(frame))
        """
        async with contextlib.aclosing(in_thread(self.animate(state, driver, **options), name="animate")) as frames:
            async for frame in frames:
                yield frame

    def _frames(self, state: PortraitState, driver: Driver, face_crop: bool, contour: bool,
                landmarks_model: str | Path | None, contour_affine_frame: str, cfg: AnimateConfig,
                driver_face: int | None, checkpoint_dir: str | Path | None, run: _Run) -> Iterator[np.ndarray]:
        """:meth:`animate`'s frames, its checkpoint (if any, ``run.checkpoint``) left for the caller to drop once
        they are kept; ``run`` gets the run's plan and stats."""
        with memory_errors("animating", self.sub.device):
            yield from self._animate(state, driver, face_crop, contour, landmarks_model, contour_affine_frame, cfg,
                                     driver_face, checkpoint_dir, run)

    def check_run(self, config: AnimateConfig | None = None) -> None:
        """Check ``config``'s settings against this model's scheduler and backend (before any work).

        Raises:
            InputError: more steps than the scheduler's training timesteps, a reference timestep past them, or
                a run the backend cannot make (graph backends: reference mode, a graph the export lacks), the
                CNN face detector without its model.
        """
        cfg = config or self.config
        check_schedule(self.sub.config, cfg)
        self.sub.check_run(cfg)

    @staticmethod
    def _note_settings(cfg: AnimateConfig) -> None:
        """Log settings that change nothing (once per run)."""
        if cfg.cfg_steps is not None and cfg.guidance == 1.0:
            logger.warning("cfg_steps %d has no effect: guidance 1 runs no classifier-free guidance at all",
                           cfg.cfg_steps)
        elif cfg.cfg_steps is not None and cfg.cfg_steps >= cfg.steps:
            logger.info("cfg_steps %d >= steps %d: guidance in every step, as without cfg_steps", cfg.cfg_steps,
                        cfg.steps)

    def _animate(self, state: PortraitState, driver: Driver, face_crop: bool, contour: bool,
                 landmarks_model: str | Path | None, contour_affine_frame: str,
                 cfg: AnimateConfig, driver_face: int | None, checkpoint_dir: str | Path | None,
                 run: _Run) -> Iterator[np.ndarray]:
        stats = self.last_stats = run.stats  # (before the checks: a refused run's stats are its own, empty)
        self.last_plan = None
        self.check_run(cfg)
        self._check_state(state)
        driver_face = _whole_argument("driver_face", driver_face)
        self._note_seed(state, cfg)
        self._note_settings(cfg)
        dev = self.sub.device  # synchronised by name: it need not be the current device of this thread
        timer = StageTimer(stats, (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None)
        calls0 = self.sub.calls.snapshot()
        landmarker = Landmarker(landmarks_model) if contour else None  # both fail here, before any work
        tiny = self.tiny_decoder(cfg.tiny_decoder) if cfg.tiny_decoder is not None else None
        portrait_lm = None if landmarker is None else self.portrait_landmarks(state, landmarker, cnn=cfg.cnn_fallback)
        with timer.stage("driver_plan"):  # pass 1: frame count, faces, the clip's crop
            plan, stats.driver_plan_hit = self.plans.plan(driver, cfg, face_crop, driver_face)
            run.plan = self.last_plan = plan
        self.sub.check_window(min(cfg.window, plan.num_frames))  # a window no plan takes: before denoising
        contour_plan = None
        if landmarker is not None and portrait_lm is not None:
            with timer.stage("driver_contour"):  # contour mode: landmarks of every cropped frame
                contour_plan = plan_driver_contour(plan, self.image_size, portrait_lm, landmarker,
                                                   contour_affine_frame, cnn=cfg.cnn_fallback)
        noise, model, steps, windows = self._loop(state, plan, cfg, timer, contour_plan)
        feed = model.pose if isinstance(model, OptimizedPredictor) and isinstance(model.pose, PoseFeed) else None
        saved = run.checkpoint = None if checkpoint_dir is None else self._step_checkpoint(
            checkpoint_dir, state, plan, cfg, len(steps), contour and (landmarks_model, contour_affine_frame))
        try:
            if not isinstance(noise, torch.Tensor):  # a NoiseSource: frames stream (cfg.streams_frames)
                frames = self._stream(noise, model, steps, windows, cfg, timer, tiny)
            else:
                stats.resumed_from_step = saved.load(noise) if saved is not None else 0
                with timer.stage("denoise"):
                    latents = denoise(noise, model, steps, windows, cfg.guidance, on_step=timer.step_clock(),
                                      cfg_steps=cfg.cfg_steps, feature_reuse=cfg.feature_reuse,
                                      start_step=stats.resumed_from_step,
                                      after_step=saved.save if saved is not None else None)
                del model  # what only the loop needed (the reference path's driving frames: 1.5 MB per frame at
                # 512 px in fp16) goes before the decode; denoise has already let each window's state go
                frames = self._decode(latents, timer, cfg.decode_streams, tiny, cfg.bit_depth)
            for frame in frames:
                timer.frame_out()
                yield frame
        finally:  # also on an error or an early stop: the driver's decode thread stops now, not at a collection
            if feed is not None:
                feed.close()
                timer.add("driver+pose_guider", feed.seconds)  # spent inside the denoise stage
            # the calls made so far: a run stopped early or failed made them too
            stats.calls = {k: v - calls0.get(k, 0) for k, v in self.sub.calls.snapshot().items()
                           if v - calls0.get(k, 0)}
            if stats.frames == plan.num_frames:  # every frame is out: the run is complete (also where it is closed
                # right after its last frame, by a caller taking the frames it knows of: islice, zip)
                self.cache.trim()
                self.cache.persist(state)  # with an on-disk store: the state and the banks this run added

    def _step_checkpoint(self, folder: str | Path, state: PortraitState, plan: DriverPlan, cfg: AnimateConfig,
                         steps: int, contour: object) -> StepCheckpoint | None:
        """This run's checkpoint in ``folder`` (:mod:`~megactor_rt.runtime.checkpoint`), or None where runs of
        its kind are not saved (open windows, a driver in memory: a warning says so)."""
        if cfg.streams_frames:
            logger.warning("checkpoint_dir (--checkpoint-dir): open windows (closed_loop=False, --no-wrap) finish "
                           "frames at different steps, so this run saves no checkpoint")
            return None
        # (its bytes, not its path: a web address or `--driver -` given again is a new temporary file of the same bytes)
        identity = driver_identity(plan.source, content=True)
        if identity is None:
            logger.warning("checkpoint_dir (--checkpoint-dir): a driver in memory is not saved (no file to know it "
                           "by when the run starts again)")
            return None
        facts = {"portrait": state.key, "driver": identity,
                 "frames": plan.num_frames, "crop": plan.crop, "face_crop": plan.face_crop, "follow": plan.follow,
                 "selection": [plan.selection.skip, str(plan.selection.ratio)], "detector": plan.detector,
                 "contour": contour, "backend": self.sub.latents_id, "dtype": str(self.sub.dtype),
                 "weights": self.sub.weights_id, "image_size": self.image_size}
        return StepCheckpoint(folder, run_key(facts, cfg), steps, lambda i: not cfg.step_kind(i).reuse,
                              inputs_key(facts))

    def portrait_landmarks(self, state: PortraitState, landmarker: Landmarker, source: str = "the portrait",
                           cnn: bool = True) -> np.ndarray:
        """The 68 face landmarks of the portrait crop (computed once per portrait state and landmark model).

        Args:
            source: the portrait's name, for the error.
            cnn: where HOG finds no face in the crop, place them in dlib's CNN detector's box
                (``AnimateConfig.cnn_fallback``).

        Raises:
            InputError: no face in the portrait crop, or landmarks that span no area.
        """
        found, model = state.face_landmarks, state.landmarks_model  # returned as read or computed here, never re-read
        if found is None or model != landmarker.identity:
            found = crop_landmarks(np.ascontiguousarray(state.inputs.image.permute(1, 2, 0).numpy()), landmarker,
                                   source, cnn)
            state.face_landmarks, state.landmarks_model = found, landmarker.identity
        return found

    def _loop(self, state: PortraitState, plan: DriverPlan, cfg: AnimateConfig, timer: StageTimer,
              contour: ContourPlan | None = None
              ) -> tuple[torch.Tensor | NoiseSource, OptimizedPredictor | ReferencePredictor, list[DDIMStep],
                         list[list[int]]]:
        """What the denoising loop needs: the initial noise (a ``NoiseSource`` where frames stream), the window
        predictor, the DDIM steps and the context windows. The optimized predictor gets a ``PoseFeed`` (the
        driver's second pass and the PoseGuider run as the windows need their frames); the reference predictor
        gets every preprocessed driving frame, here."""
        sub, n, size = self.sub, plan.num_frames, self.image_size
        windows = context_windows(n, cfg.window, cfg.overlap, cfg.closed_loop)
        frames = prefetch(iter_driver_inputs(plan, size, contour=contour), depth=2 * POSE_BATCH, name="driver-decode")
        model: OptimizedPredictor | ReferencePredictor
        if cfg.mode is Mode.REFERENCE:  # upstream: every driving frame preprocessed before denoising starts
            # (a check before each frame: a run stopped meanwhile, a cancelled animate_async, ends here, not after
            # the whole driver; the driver's thread stops at once)
            with timer.stage("driver+pose_guider"), contextlib.closing(frames):
                driving = torch.stack(list(cancellable(frames)), dim=1)[None]  # (1, 3, N, S, S)
            model = ReferencePredictor(sub, state, driving, cfg.guidance, cfg.reference_timestep,
                                       cfg.reuses_features)
        else:  # the driver's second pass and PoseGuider run as the windows first need their frames
            feed = PoseFeed(sub, frames, n, state.film_scale, state.film_shift, windows, POSE_BATCH)
            model = OptimizedPredictor(sub, state, feed, cfg.guidance, cfg.reference_timestep, cfg.reuses_features)
            model.window_batch = self.window_batch(cfg)
        h = self.latent_size
        noise: torch.Tensor | NoiseSource
        if cfg.streams_frames:  # the frames in flight only (see denoise_stream): same values, drawn in order
            frame_noise = FrameNoise(cfg.seed, n, 4, h, h)

            def noise(a: int, b: int) -> torch.Tensor:
                return to_device_queued(frame_noise.take(a, b), sub.device)
        else:
            noise = initial_noise(cfg.seed, (1, 4, n, h, h)).to(sub.device)
        steps = DDIM(sub.config.scheduler).plan(cfg.steps)
        if cfg.reuses_features:  # one kept feature per window (streaming: per window in flight)
            held = windows_in_flight(windows, n, cfg.steps) if cfg.streams_frames else len(windows)
            kept = kept_feature_bytes(held, len(windows[0]), cfg.cfg, sub.config.unet.block_out_channels[0],
                                      h, sub.dtype.itemsize)
            model.offload = feature_offload(sub.device, kept)
            if model.offload:
                logger.info("feature reuse: %.1f GB of kept features for %d frames go to host memory", kept / 1e9, n)
        return noise, model, steps, windows

    def _stream(self, noise: NoiseSource, model: EpsModel, steps: list[DDIMStep], windows: list[list[int]],
                cfg: AnimateConfig, timer: StageTimer, tiny: Decoder | None) -> Iterator[np.ndarray]:
        """Open windows: denoise in wavefront order (:func:`denoise_stream`) and decode each batch of frames as
        soon as it is final, while the later windows are still denoising (on CUDA the decode runs on a side
        stream). Only the frames in flight are held, so memory does not grow with the driver's length. Stage
        times: ``denoise`` is the device time from the first window call to the last update less the decodes
        queued on the same stream (on CPU: the time spent in the loop), ``vae_decode`` the decodes' device time.
        No per-step times: the steps interleave."""
        loop = denoise_stream(noise, model, steps, windows, cfg.guidance, cfg.cfg_steps, cfg.feature_reuse)
        n = windows[-1][-1] + 1
        flight = InFlight(self.sub.device, DECODE_DEPTH, streams=cfg.decode_streams)
        clock = _LoopClock(self.sub.device)
        pending: list[torch.Tensor] = []  # final latents (1, 4, f, h, w) not yet decoded, in order
        try:
            while True:
                with clock:
                    out = next(loop, None)
                if out is None:
                    break
                final, latents = out
                if latents is not None:
                    pending.append(latents)
                held = sum(p.shape[2] for p in pending)
                if held >= DECODE_BATCH or (final == n and held):
                    ready = torch.cat(pending, dim=2)[0].permute(1, 0, 2, 3)  # (f, 4, h, w)
                    cut = held if final == n else held - held % DECODE_BATCH
                    for a in range(0, cut, DECODE_BATCH):
                        flight.launch(lambda z: self._decode_batch(z, tiny, cfg.bit_depth),
                                      ready[a:min(a + DECODE_BATCH, cut)])
                    pending = [ready[cut:].permute(1, 0, 2, 3)[None]] if cut < held else []
                for frames in flight.ready():
                    yield from host_frames(frames)
            for frames in flight.drain():
                yield from host_frames(frames)
        finally:
            timer.add("vae_decode", flight.device_seconds)
            timer.add("denoise", clock.seconds(minus=flight.device_seconds if flight.stream is None else 0.0))

    def tiny_decoder(self, path: str | Path) -> Decoder:
        """The TAESD decoder from ``path`` on the submodels' device and dtype (loaded once per path): the
        backend's exported ``tiny_decoder`` graph where it has one from the same weights file, else torch.

        Raises:
            WeightsError: missing or wrong weights (see :func:`megactor_rt.models.tiny_decoder.load_tiny_decoder`).
        """
        key = str(Path(path).resolve())
        if key not in self._tiny_decoders:
            graph = getattr(self.sub, "tiny_decoder_graph", None)  # graph backends: an exported tiny_decoder
            decoder = graph(tiny_decoder_id(path)) if graph is not None else None
            if decoder is None:
                decoder = load_tiny_decoder(path).to(self.sub.device, self.sub.dtype)
            self._tiny_decoders[key] = decoder
        return self._tiny_decoders[key]

    def _decode_batch(self, z: torch.Tensor, tiny: Decoder | None, bit_depth: int = 8) -> torch.Tensor:
        """Scaled latents ``(b, 4, h, w)`` -> ``(b, S, S, 3)`` frames (``bit_depth`` 8: uint8; 16: int32 holding
        0-65535, made uint16 by :func:`host_frames`): the VAE decoder (after unscaling), or ``tiny``, the TAESD
        decoder, which takes the scaled latents as they are."""
        to_frames = latents_to_uint8 if bit_depth == 8 else latents_to_16bit
        if tiny is None:
            return to_frames(self.sub.vae_decode(z / self.sub.config.vae.scaling_factor))
        self.sub.calls.bump("tiny_decode")
        with torch.inference_mode():
            return to_frames(tiny(z.to(self.sub.device, self.sub.dtype)))

    def _decode(self, latents: torch.Tensor, timer: StageTimer, streams: bool,
                tiny: Decoder | None = None, bit_depth: int = 8) -> Iterator[np.ndarray]:
        """Decode ``DECODE_BATCH`` frames per call (:meth:`_decode_batch`); the stage time is device time (CUDA
        events) on GPU."""
        n = latents.shape[2]

        def decode(i: int) -> torch.Tensor:
            return self._decode_batch(latents[0, :, i:i + DECODE_BATCH].permute(1, 0, 2, 3), tiny, bit_depth)

        flight = InFlight(self.sub.device, DECODE_DEPTH, streams=streams)
        try:
            batches = progress(cancellable(range(0, n, DECODE_BATCH)), total=-(-n // DECODE_BATCH), desc="decode",
                               unit="batch")
            for frames in flight.map(decode, batches):
                yield from host_frames(frames)
        finally:
            timer.add("vae_decode", flight.device_seconds)

    def animate_to_file(self, portrait: Portrait, driver: Driver, output: str | Path, *,
                        face_crop: bool = True, mask: str | Path | None = None, audio: bool | str | Path = True,
                        contour: bool = False, landmarks_model: str | Path | None = None,
                        contour_affine_frame: str = "last", config: AnimateConfig | None = None,
                        side_by_side: bool = False, face: int | None = None,
                        driver_face: int | None = None, paste_back: bool = False, crf: int | None = None,
                        audio_start: float | str | None = None, metadata: bool = True,
                        checkpoint_dir: str | Path | None = None, on_progress: Reporter | None = None,
                        first_number: int | None = None, audio_out: str | Path | None = None) -> RunStats:
        """Prepare + animate + write the result video at the driver's frame rate with its audio: H.264 in .mp4, .mkv,
        .mov, .m4v; VP9 in .webm (audio in Opus, or Vorbis copied as it is); an animated WebP (.webp: no sound); an
        animated GIF (.gif: no sound; refused above 50 fps, before any work: pass ``config`` with ``fps=25``); or
        PNG frames named by a number pattern (``take1/%05d.png``: :class:`~megactor_rt.sequence.SequenceWriter`,
        the sound in ``take1/audio.wav``); or ``"-"``: a YUV4MPEG2 stream on standard output (:mod:`megactor_rt.pipe`).

        The file is written to a temporary name and renamed on success; on any error nothing remains
        under ``output``. ``portrait``, ``face_crop``, ``mask``, ``face``: see :meth:`prepare` (a PIL image is
        taken too);
        ``driver``, ``contour``, ``landmarks_model``, ``contour_affine_frame``, ``config``, ``driver_face``: see
        :meth:`animate`
        (its errors are raised here before any work where they can be). ``audio``: copy the driver's audio
        (the part under the frames used; an image sequence's: its folder's ``audio.wav``); False: no sound; a file:
        its sound instead, from its start (or from
        ``audio_start``: seconds or ``"[HH:]MM:SS[.ms]"``), cut to the video's length. ``side_by_side``: each
        frame shows the driver's crop (as the model saw it, before its face isolation), the portrait's crop and the
        result side by side, three times as wide; the driver is read once more for it, while the result is
        written. ``paste_back``: each result frame is put
        back into the whole portrait where its crop came from, fading into it at the crop's inner edges (the
        portrait scaled so its crop is the result's size where it is larger: :class:`~megactor_rt.preprocess.
        PasteBack`); not with ``side_by_side``. ``crf``: the result's constant quality, lower is better and larger
        (H.264: 0-51, default 18; VP9: 0-63, default 24; a GIF or WebP takes none). ``metadata``: write the run's
        settings into the result (JSON in the container's comment tag: the megactor-rt version, the portrait's
        and driver's file names, :meth:`run_settings` and these options; read back by
        :func:`~megactor_rt.media.result_settings`; a GIF or WebP holds none); False: none. ``checkpoint_dir``: see
        :meth:`animate` (a run started again with it continues where it stopped). ``on_progress``: see
        :meth:`animate`; here also stage ``"write"``, once per frame written (in the calling thread; the other stages
        report from the run's worker thread). ``first_number``: a PNG sequence result's first frame number (None:
        1, or, driven by an image sequence at its own rate, the number of the driver frame it animates); refused for
        other results. ``audio_out``: with ``"-"``, a WAV file for the result's sound (silence where it has none),
        written whole before the stream's first frame (:mod:`megactor_rt.pipe`); refused for other results.

        Returns:
            The run's :class:`~megactor_rt.runtime.pipeline.RunStats` (also ``self.last_stats`` unless another
            run of this Animator began meanwhile).
        """
        face, driver_face, crf, first_number = (_whole_argument(name, value) for name, value in (
            ("face", face), ("driver_face", driver_face), ("crf", crf), ("first_number", first_number)))
        _check_mask(mask)
        _check_run_options(config, on_progress)
        if checkpoint_dir is not None:
            check_checkpoint_dir(checkpoint_dir)
        out = check_output_path(output)
        sound_out = None if audio_out is None else check_sound_out(audio_out, output, audio)
        check_quality(out, crf)
        check_first_number(out, first_number)
        cfg = config or self.config
        check_bit_depth(out, cfg.bit_depth)
        self.check_run(cfg)
        source = driver_source(driver)
        if not isinstance(audio, bool):
            check_local(audio, "audio")
        sound, from_s = check_sound(audio, audio_start)
        for result in (out, sound_out):
            if result is not None:
                check_not_an_input(result, portrait=portrait, driver=driver_file(source), mask=mask, audio=sound)
        check_affine_frame(contour_affine_frame)
        check_face_choice(driver_face, face_crop, "driver")
        if paste_back and side_by_side:
            raise InputError("paste_back (--paste-back) and side_by_side (--side-by-side) do not go together: the "
                             "result is either the whole portrait or the three crops side by side")
        # a missing or foreign landmark model fails here, before any work (loaded once; animate() finds it)
        landmarker = Landmarker(landmarks_model) if contour else None
        if cfg.tiny_decoder is not None:
            self.tiny_decoder(cfg.tiny_decoder)  # likewise (loaded once; animate() finds it loaded)
        info = driver_info(source)
        sel = FrameSelection.of(info.fps, cfg.fps, cfg.start)  # the frames and rate animate() will use
        check_result_rate(out, sel.fps)  # a 60 fps GIF, before the portrait is prepared
        size = self.image_size
        paste: PasteBack | None = None
        if paste_back:
            img, name, crop, found = self._portrait_crop(portrait, face_crop, face, cfg.face_detector)
            paste = PasteBack.of(img, crop, size)
            state, hit = self._prepare(self._cropped_inputs(img, name, crop, found, mask), face_crop, mask, cfg.seed)
        else:
            state, hit = self._prepare(portrait, face_crop, mask, cfg.seed, face, cfg.face_detector)
        if landmarker is not None:  # a portrait crop without landmarks fails before the driver is read
            self.portrait_landmarks(state, landmarker, Path(portrait).name if isinstance(portrait, (str, Path))
                                    else "the portrait", cfg.cnn_fallback)  # (an array or a PIL image: no name)
            landmarks_model = landmarker.path
        if sound is not None:  # another file's sound: from its start, or from audio_start
            sound_args: dict[str, Any] = {"audio_source": sound, "audio_offset": Fraction(from_s)}
        else:
            sound_args = {"audio_source": driver_sound(source, info) if audio else None,
                          "audio_offset": sel.start_s, "video_start": info.start_s}
        width, height = (paste.width, paste.height) if paste else (size * (3 if side_by_side else 1), size)
        if is_sequence(out) and (expected := sel.expected_frames(info, cfg.duration, cfg.max_frames)):
            # a long sequence onto a nearly full disk: said before the work
            check_room(out, expected, width, height, cfg.bit_depth)
        tags = {RESULT_TAG: self._settings_tag(portrait, driver, cfg, recorded_options(
            face_crop=face_crop, face=face, driver_face=driver_face, mask=mask, audio=audio, audio_start=from_s,
            contour=contour, contour_affine_frame=contour_affine_frame, side_by_side=side_by_side,
            paste_back=paste_back, crf=crf, first_number=first_number))} if metadata else None
        if cfg.bit_depth != 8:  # (a PNG sequence: check_bit_depth above)
            sound_args["bit_depth"] = cfg.bit_depth
        run = _Run()  # this run's plan, stats and checkpoint (another run of this Animator may overlap it)
        if sound_out is not None:  # (the stream's sound, for as many frames as the run's plan makes)
            sound_args.update(sound_out=sound_out,
                              frame_count=lambda: run.plan.num_frames if run.plan is not None else None)
        if first_number is not None:
            sound_args["first_number"] = first_number
        elif is_sequence(out) and isinstance(source, DriverFrames) and isinstance(source.frames, FrameSequence) and \
                sel.ratio == 1:  # a plate's frames: the result's frames take their numbers
            sound_args["first_number"] = source.frames.first_number + sel.skip
        with result_writer(out, sel.fps, width, height, crf=crf, metadata=tags, **sound_args) as w:
            # (the driver as read above: an image sequence is not listed again)
            frames = reporting(self._frames(state, source, face_crop, contour, landmarks_model, contour_affine_frame,
                                            cfg, driver_face, checkpoint_dir, run), on_progress)
            # stopped (an error, Ctrl-C, SIGTERM): the temporary file goes at once, before the wait for the
            # worker thread to reach a cancellation point (up to a window call: 15-20 s at full size on a CPU)
            # closed here also when the error comes from this loop (the writer, on_progress, the side-by-side pass):
            # else the worker and the run's state lived on, blocked, as long as the caller held the error (its
            # traceback keeps this frame), and an interpreter exiting meanwhile aborted
            with contextlib.closing(prefetch(frames, depth=8, name="decode", on_stop=w.abort)) as produced, \
                    contextlib.closing(self._beside_inputs(produced, state, size, run) if side_by_side
                                       else produced) as results:
                for frame in results:
                    w.write(paste(frame) if paste else frame)
                    if on_progress is not None:
                        plan = run.plan  # (made before the first frame)
                        on_progress(Progress("write", w.frames_written, plan.num_frames if plan else None, "frame"))
        run.drop_checkpoint()  # the result is in place: its checkpoint can go
        run.stats.portrait_cache_hit = hit
        return run.stats

    def _settings_tag(self, portrait: object, driver: object, cfg: AnimateConfig, options: dict[str, Any]) -> str:
        """The JSON that ``animate_to_file(metadata=True)`` writes into a result (file names only: no folders)."""
        import json

        from megactor_rt import __version__

        settings = self.run_settings(cfg)
        del settings["device_name"]  # (the device stays: cpu, cuda)
        doc = {"megactor_rt": __version__, "portrait": file_name(portrait) or "in memory",
               "driver": file_name(driver) or driver_name(driver_source(driver)), **settings, "options": options}
        return json.dumps(doc, separators=(",", ":"), default=str)

    def _beside_inputs(self, results: Iterator[np.ndarray], state: PortraitState, size: int, run: _Run
                       ) -> Generator[np.ndarray, None, None]:
        """``results`` with the driver's crop (another pass over the run's planned frames, begun at the first
        result, when the plan is made) and the portrait's crop on their left."""
        portrait = np.ascontiguousarray(state.inputs.image.to(torch.uint8).permute(1, 2, 0).cpu().numpy())
        drivers: Iterator[np.ndarray] | None = None
        plan: DriverPlan | None = None
        try:
            for frame in results:
                if plan is None or drivers is None:
                    plan = run.plan
                    assert plan is not None  # made before the first frame
                    drivers = cropped_frames(plan, size)
                driven = next(drivers, None)
                if driven is None:  # the plan's frames are the run's: cannot happen unless the file changed
                    raise InputError(f"{plan.name}: the driver gave fewer frames on its side-by-side pass than "
                                     "before (was it changed during the run?)")
                yield np.concatenate([widen(driven, frame.dtype), widen(portrait, frame.dtype), frame], axis=1)
        finally:
            close = getattr(drivers, "close", None)
            if close is not None:
                close()

    def with_config(self, **changes: Unpack[ConfigChanges]) -> Animator:
        """A new Animator sharing submodels, portrait cache and driver plans with some settings changed: ``changes``
        are :class:`~megactor_rt.config.AnimateConfig` fields (``steps=10``, ``overlap=4``, ``start="1:05"``, ...).
        Also the way to run requests in several threads (see the class)."""
        return Animator(self.sub, replace(self.config, **cast(dict[str, Any], changes)), self.cache, self.plans)


class _Run:
    """One run's own record, apart from the Animator's (runs of one Animator may overlap): its driver's plan (set
    before its first frame), its stats and its step checkpoint (``checkpoint_dir``)."""

    def __init__(self) -> None:
        self.plan: DriverPlan | None = None
        self.stats = RunStats()
        self.checkpoint: StepCheckpoint | None = None

    def drop_checkpoint(self) -> None:
        """Remove the run's checkpoint: its frames are kept (yielded, or written into a result)."""
        if self.checkpoint is not None:
            self.checkpoint.remove()
            self.checkpoint = None


def latents_to_16bit(images: torch.Tensor) -> torch.Tensor:
    """Decoded VAE images in [-1, 1] ``(N, 3, H, W)`` -> ``(N, H, W, 3)`` int32 frames of 16 bits:
    ``round(clamp(x / 2 + 0.5, 0, 1) * 65535)`` in float32 (NaN gives 0), the decoder's output without the 8-bit
    frames' truncation. int32, not uint16, on the device (PyTorch's uint16 has few operations, on CUDA barely
    any): :func:`host_frames` makes them uint16 on the host."""
    v = (images.float() / 2 + 0.5).clamp(0, 1).nan_to_num(0.0)
    return (v * 65535).round().to(torch.int32).permute(0, 2, 3, 1).contiguous()


def host_frames(frames: torch.Tensor) -> np.ndarray:
    """A decoded batch on the host as the frames :meth:`Animator.animate` yields: uint8 as it is, the int32 of
    :func:`latents_to_16bit` as uint16."""
    out = frames.numpy()
    return out.astype(np.uint16) if out.dtype == np.int32 else out


def crop_landmarks(image: np.ndarray, landmarker: Landmarker, source: str, cnn: bool = True) -> np.ndarray:
    """The 68 face landmarks of a portrait's crop ``image`` (``(S, S, 3)`` uint8, as the networks take it) for
    contour mode; ``source``: the portrait's name; ``cnn``: see :meth:`Animator.portrait_landmarks`.

    Raises:
        InputError: no face in the crop, or landmarks that span no area.
    """
    found = landmarker(image, cnn)
    if found is None:
        raise InputError(f"contour mode: no face found in the portrait crop of {source}; it needs the portrait's face "
                         "landmarks (use a frontal, well-lit face, or run without --contour-preserve)")
    check_landmark_area(found, f"portrait {source}")
    return found


def _whole_argument(name: str, value: Any) -> Any:
    """An optional whole-number argument (a face number, a seed, a crf; a numpy integer too) as an ``int``, None as
    None: a float or a string would fail far from here, or pass as another number.

    Raises:
        InputError: naming ``name``.
    """
    if value is None:
        return None
    try:
        return whole_number(name, value)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _check_mask(mask: object) -> None:
    """A person mask is an image file (read with its alpha, EXIF rotation and bit depth by
    :func:`~megactor_rt.preprocess.load_user_mask`); an array or a PIL image is refused before any work, saying so
    (was: a TypeError from pathlib after the portrait's face search).

    Raises:
        InputError: ``mask`` is neither None nor a path.
    """
    if mask is not None and not isinstance(mask, (str, os.PathLike)):
        raise InputError(f"mask must be an image file's path (white = person, or a cut-out's alpha), got "
                         f"{type(mask).__name__}; save a mask in memory as a PNG and pass its path")
    check_local(mask, "mask")


def _check_run_options(config: object, on_progress: object) -> None:
    """A run's ``config`` is an :class:`~megactor_rt.config.AnimateConfig` and its ``on_progress`` a function, refused
    naming the argument before any work (was: ``'dict' object has no attribute ...``, or ``'str' object is not
    callable`` from the run's first progress report, after its driver's face search).

    Raises:
        InputError: either is something else (None is neither's default), or ``on_progress`` is an async function.
    """
    if config is not None and not isinstance(config, AnimateConfig):
        raise InputError(f"config must be an AnimateConfig (megactor_rt.config.AnimateConfig(steps=10, ...), or "
                         f"anim.with_config(steps=10, ...) for an Animator with it), got {type(config).__name__}")
    if on_progress is not None and not callable(on_progress):
        raise InputError(f"on_progress must be a function (called with each Progress report), got "
                         f"{type(on_progress).__name__}")
    if inspect.iscoroutinefunction(on_progress):
        # (called, it would only make a coroutine that nobody awaits: every report lost, with a RuntimeWarning)
        raise InputError(f"on_progress must be a plain function, not an async one ({on_progress!r}): it is called in "
                         "the thread doing the run's work; from asyncio, hand each report to the event loop with "
                         "loop.call_soon_threadsafe (e.g. a queue's put_nowait)")


def _pil_pixels(image: Image.Image) -> np.ndarray:
    """A PIL image portrait as :func:`~megactor_rt.media.image_to_rgb` gives it, its pixels read now where Pillow
    reads them lazily (``Image.open``).

    Raises:
        InputError: they cannot be read, naming the image's file where it has one: its file was closed before
            they were read (a ``with Image.open(...)`` block left: Pillow's bare AssertionError), cut short or
            damaged (OSError), its EXIF block cut short (ValueError).
    """
    try:
        return image_to_rgb(image)
    except (OSError, ValueError, SyntaxError, AssertionError) as exc:
        name = getattr(image, "filename", "") or "in memory"
        why = str(exc) or f"{type(exc).__name__}: was its file closed before its pixels were read? Call .load() " \
                            "inside the `with Image.open(...)` block, or pass the file's path"
        raise InputError(f"portrait (a PIL image, {name}): its pixels cannot be read ({why})") from exc


def crop_portrait(portrait: Portrait, size: int, face_crop: bool = True, face: int | None = None,
                  detector: str = "auto") -> tuple[np.ndarray, str, Crop, Box | None]:
    """The portrait's pixels, its name for messages, its crop for ``size``-px networks and the face the crop is
    centred on (found by ``detector``, ``AnimateConfig.face_detector``; a PIL image is taken too)."""
    check_face_detector(detector)
    if isinstance(portrait, Image.Image):  # upright and RGB, as a file is read
        portrait = _pil_pixels(portrait)
    if not isinstance(portrait, (str, Path, np.ndarray)):
        raise InputError(f"portrait must be an image or video file path, a PIL image or an (H, W, 3) uint8 RGB "
                         f"array, got {type(portrait).__name__}")
    check_local(portrait, "portrait")
    name = Path(portrait).name if isinstance(portrait, (str, Path)) else "portrait array"
    img = read_portrait(portrait) if isinstance(portrait, (str, Path)) else portrait
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InputError(f"portrait array must be (H, W, 3) uint8 RGB, got {img.shape} {img.dtype}")
    height, width = img.shape[:2]  # a file's sides are checked as it is read; in memory, here (as DriverFrames')
    if not MIN_IMAGE_SIDE <= min(height, width) <= max(height, width) <= MAX_IMAGE_SIDE:
        raise InputError(f"{name}: the portrait is {width}x{height} px; each side must be {MIN_IMAGE_SIDE} to "
                         f"{MAX_IMAGE_SIDE} px")
    crop, found = portrait_crop(img, face_crop=face_crop, size=size, source_name=name, face=face, detector=detector)
    return img, name, crop, found


def check_schedule(model: ModelConfig, cfg: AnimateConfig) -> None:
    """The part of :meth:`Animator.check_run` that needs only the weights' config (``--dry-run`` checks it too).

    Raises:
        InputError: more steps than the scheduler's training timesteps, a reference timestep past them, the CNN
            face detector without its model.
    """
    check_face_detector(cfg.face_detector)
    total = model.scheduler.num_train_timesteps
    most = DDIM(model.scheduler).max_steps()
    if cfg.steps > most:
        raise InputError(f"steps must be at most {most} (the scheduler's {total} training timesteps with "
                         f"offset {model.scheduler.steps_offset}), got {cfg.steps}")
    if cfg.reference_timestep is not None and cfg.reference_timestep >= total:
        raise InputError(f"reference_timestep must be below {total} (the scheduler's training timesteps), "
                         f"got {cfg.reference_timestep}")


def run_image_size(weights_dir: str | Path, backend: str = "torch", image_size: int | None = None,
                   onnx_dir: str | Path | None = None) -> int:
    """The crop side a run of these converted weights takes, found without loading them: ``image_size``
    (checked as :meth:`Animator.from_weights` checks it), else the weights' own, or on a graph backend with
    ``onnx_dir`` the size its graphs were exported at."""
    image_size = _whole_argument("image_size", image_size)
    cfg = converted_config(weights_dir)[0]
    if backend != "torch" and onnx_dir is not None:
        from megactor_rt.engine.manifest import load_manifest

        return load_manifest(onnx_dir, validate_profiles=False).export_size(cfg.image_size, image_size)
    if image_size is None:
        return cfg.image_size
    check_image_size(cfg, image_size)
    return image_size


def _check_cuda_graphs(backend: str, cuda_graphs: bool) -> None:
    if cuda_graphs and backend != "tensorrt":
        raise InputError(f"cuda_graphs (--cuda-graphs) applies to the tensorrt backend only, not '{backend}' (the "
                         "torch backend captures CUDA graphs with `megactor-rt animate --compile reduce-overhead`, "
                         "compile='reduce-overhead' in Python)")


def _warn_half_on_cpu(device: torch.device, precision: Precision) -> None:
    """Half precision on the CPU runs, but several times slower than fp32 (about 4x for the demo model on 2
    cores, 2026-11-27): the CPU kernels mostly convert to fp32 and back. Said once per model load."""
    if device.type == "cpu" and precision is not Precision.FP32:
        logger.warning("%s on the CPU is several times slower than fp32 (few half-precision CPU kernels); "
                       "--precision fp32 is the CPU's fast setting", precision.value)


def demo_work_dir() -> Path:
    """Where ``Animator.demo`` keeps the tiny model's graphs and plans: ``$XDG_CACHE_HOME/megactor-rt/demo``
    (default ``~/.cache/megactor-rt/demo``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megactor-rt" / "demo"


class _LoopClock:
    """Time spent in a loop entered many times (``with clock:`` around each resumption): on CUDA the device
    time from the first entry to the last exit (events on the device's current stream), elsewhere the summed wall
    time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.wall = 0.0
        self.first: torch.cuda.Event | None = None
        self.last: torch.cuda.Event | None = None

    def __enter__(self) -> None:
        if self.cuda and self.first is None:
            self.first = torch.cuda.Event(enable_timing=True)
            self.first.record(torch.cuda.current_stream(self.device))
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._t0
        if self.cuda:
            self.last = torch.cuda.Event(enable_timing=True)
            self.last.record(torch.cuda.current_stream(self.device))

    def seconds(self, minus: float = 0.0) -> float:
        """The loop's time, less ``minus`` (device work of other stages queued in between on the same stream)."""
        if self.first is None or self.last is None:
            return self.wall
        self.last.synchronize()
        return max(self.first.elapsed_time(self.last) / 1e3 - minus, 0.0)
