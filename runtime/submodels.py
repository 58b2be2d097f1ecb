"""The six submodel graphs as plain callables on torch tensors, one implementation per backend.

``Submodels`` is what the portrait preparation, the window predictor and the decoder call; the torch
implementation runs the nn.Modules, the onnxruntime/tensorrt ones run exported graphs through runners.
Every call is counted per method (``calls``), so tests can prove that cached work is not redone.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from functools import cache

import torch

from megactor_rt.config import AnimateConfig, ModelConfig
from megactor_rt.errors import InputError
from megactor_rt.runtime.pipeline import to_device_queued
from megactor_rt.weights import MegActorModels


class CallCounter(Counter[str]):
    """Calls per submodel. ``bump`` and ``snapshot`` hold a lock: runs on several threads share one counter, and
    ``calls[k] += 1`` is a read and a write (two threads could both read 5 and write 6)."""

    def __init__(self, *args: object, **kwargs: int) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-overload]
        self._lock = threading.Lock()

    def bump(self, key: str) -> None:
        with self._lock:
            self[key] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self)


class Submodels(ABC):
    """Backend-specific execution of: CLIP, VAE encode/decode, FiLM, PoseGuider, ReferenceNet, temporal UNet."""

    name = "abstract"
    max_window_batch: int | None = None  # context windows one ``unet`` call may hold (None: any number)

    def __init__(self, config: ModelConfig, weights_id: str, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.weights_id = weights_id
        self.device = device
        self.dtype = dtype
        self.calls = CallCounter()

    def window_batch_limit(self, frames: int) -> int | None:
        """Context windows of ``frames`` frames one ``unet`` call may hold (None: any number)."""
        return self.max_window_batch

    def check_run(self, cfg: AnimateConfig) -> None:
        """Refuse, before any work, a run of ``cfg`` this backend cannot make (InputError); the torch backend
        makes any."""
        return None

    def check_window(self, frames: int) -> None:
        """Refuse, before denoising, windows of ``frames`` frames the UNet cannot take (InputError)."""
        return None

    @property
    def state_id(self) -> str:
        """What computes a portrait state on this backend, for the portrait cache's key (graph backends add
        the runner and the graph of each per-portrait submodel)."""
        return self.name

    @property
    def latents_id(self) -> str:
        """What computes a run's latents on this backend, for the step checkpoints' key (graph backends add the
        runner and the graph of each submodel but the decoders)."""
        return self.name

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype)

    @abstractmethod
    def clip_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(1, 3, S, S)`` normalised CLIP pixels -> tokens ``(1, T, D)``."""

    @abstractmethod
    def vae_encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` in [-1, 1] -> posterior (mean, logvar) ``(B, 4, h, w)``, unscaled."""

    @abstractmethod
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ``(B, 4, h, w)`` -> decoder output ``(B, 3, H, W)`` (about [-1, 1], unclamped)."""

    @abstractmethod
    def film(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, 3, 512, 512)`` in [0, 1] -> FiLM (scale, shift), each ``(1, 128)``."""

    @abstractmethod
    def pose_features(self, frames: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Driving frames ``(N, 3, H, W)`` in [0, 1] -> PoseGuider output ``(N, 4, h, w)``."""

    @abstractmethod
    def reference_bank(self, latent: torch.Tensor, timestep: int, tokens: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 4, h, w)``, t, ``(B, T, D)`` -> the 10 bank tensors ``(B, L_i, C_i)``."""

    def token_kv(self, tokens: torch.Tensor) -> list[torch.Tensor] | None:
        """The UNet's cross-attention keys and values of ``tokens (1, T, D)`` (``TemporalUNet.token_kv``), for
        ``unet``'s ``token_kv``: projected once per portrait instead of in every call. None where the backend's
        UNet projects the tokens itself (none of this project's backends: a stand-in may)."""
        return None

    @abstractmethod
    def unet(self, latents: torch.Tensor, timestep: int, tokens: torch.Tensor, pose: torch.Tensor,
             bank: Sequence[torch.Tensor] | None, *, n_uncond: int = 0, shared_down: bool = False,
             upstream: bool = False, deep: torch.Tensor | None = None, keep_deep: bool = False,
             token_kv: Sequence[torch.Tensor] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Temporal UNet; argument conventions of ``TemporalUNet.forward`` (``deep``/``keep_deep``: feature
        reuse; ``token_kv``: this backend's :meth:`token_kv` of ``tokens``, or None). Calls are counted as
        ``unet``, and the feature-reusing ones also as ``unet_reuse``."""

    def pose_guider_full(self, frames: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Upstream's per-call PoseGuider (features + FiLM recomputed): ``(B,3,F,H,W)`` -> ``(B,4,F,h,w)``."""
        raise NotImplementedError(f"reference mode needs the torch backend, not {self.name}")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # where torch's list
# (``torch._inductor.list_mode_options``, private) cannot be read


def compile_modes() -> tuple[str, ...]:
    """The ``torch.compile`` modes this torch knows."""
    try:
        from torch._inductor import list_mode_options

        return tuple(list_mode_options())
    except Exception:  # noqa: BLE001 - another torch's internals
        return COMPILE_MODES


def check_compile_mode(compile: bool | str) -> None:
    """Refuse a ``torch.compile`` mode this torch does not know, before any weights are loaded (torch itself
    names it only at the first UNet call).

    Raises:
        InputError: naming the known modes.
    """
    if isinstance(compile, str) and compile not in (known := compile_modes()):
        raise InputError(f"unknown torch.compile mode '{compile}' (--compile MODE); this torch knows: "
                         f"{', '.join(known)}")


@cache  # asked in every UNet call that keeps its deep feature
def replays_cuda_graphs(compile: bool | str) -> bool:
    """Whether a ``torch.compile`` mode replays CUDA graphs (``reduce-overhead``, ``max-autotune``)."""
    if not isinstance(compile, str):
        return False
    try:
        from torch._inductor import list_mode_options

        return bool(list_mode_options(compile).get("triton.cudagraphs"))
    except Exception:  # noqa: BLE001 - an unknown mode (torch.compile names it) or another torch's internals
        return compile in ("reduce-overhead", "max-autotune")


class TorchSubmodels(Submodels):
    """The PyTorch reference/fallback: runs the nn.Modules under ``torch.inference_mode``.

    Args:
        compile: run the temporal UNet (about 98 % of the FLOPs) through ``torch.compile`` (Inductor: fuses
            the normalisations, activations, residual adds and layout copies that eager mode runs as
            separate memory-bound kernels). ``True`` = Inductor's default mode; a string is passed as
            ``mode`` (e.g. ``"reduce-overhead"``: CUDA graphs as well). The first call per input shape
            compiles; results equal eager mode within floating-point reordering. Can be switched per call
            site with the ``compile`` attribute.
    """

    name = "torch"

    def __init__(self, models: MegActorModels, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, compile: bool | str = False) -> None:
        check_compile_mode(compile)
        super().__init__(models.config, models.weights_id, torch.device(device), dtype)
        self.models = models.to(self.device, dtype)
        self.compile = compile
        self._compiled_unets: dict[str | None, torch.nn.Module] = {}
        self._timesteps: dict[int, torch.Tensor] = {}

    def _timestep(self, t: int) -> torch.Tensor:
        """The timestep as a device scalar, made once per value. A plain ``torch.tensor(t, device=cuda)`` is a
        blocking copy from pageable memory that makes the host wait for all queued device work (once per DDIM
        step); ``to_device_queued`` copies from pinned memory, queued like any kernel."""
        if t not in self._timesteps:
            self._timesteps[t] = to_device_queued(torch.tensor(t), self.device)
        return self._timesteps[t]

    def _unet_module(self) -> torch.nn.Module:
        if not self.compile:
            return self.models.unet
        mode = self.compile if isinstance(self.compile, str) else None
        if mode not in self._compiled_unets:
            kwargs = {"mode": mode} if mode else {}
            self._compiled_unets[mode] = torch.compile(self.models.unet, dynamic=False, **kwargs)  # type: ignore
        return self._compiled_unets[mode]

    @torch.inference_mode()
    def clip_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.bump("clip_tokens")
        return self.models.clip.tokens(self._in(pixels))

    @torch.inference_mode()
    def vae_encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from megactor_rt.models.vae import vae_moments

        self.calls.bump("vae_encode")
        return vae_moments(self.models.vae, self._in(images))

    @torch.inference_mode()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        from megactor_rt.models.vae import vae_decode

        self.calls.bump("vae_decode")
        return vae_decode(self.models.vae, self._in(latents))

    @torch.inference_mode()
    def film(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.bump("film")
        return self.models.unet.condition_input_layer.film(self._in(reference))

    @torch.inference_mode()
    def pose_features(self, frames: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        self.calls.bump("pose_features")
        pg = self.models.unet.condition_input_layer
        return pg.modulate(pg.features(self._in(frames)), self._in(scale), self._in(shift))

    @torch.inference_mode()
    def pose_guider_full(self, frames: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        self.calls.bump("pose_guider_full")
        return self.models.unet.condition_input_layer(self._in(frames), self._in(reference))

    @torch.inference_mode()
    def reference_bank(self, latent: torch.Tensor, timestep: int, tokens: torch.Tensor) -> list[torch.Tensor]:
        self.calls.bump("reference_bank")
        t = self._timestep(timestep)
        return self.models.reference_net(self._in(latent), t, self._in(tokens))

    @torch.inference_mode()
    def token_kv(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        self.calls.bump("token_kv")
        return self.models.unet.token_kv(self._in(tokens))

    @torch.inference_mode()
    def unet(self, latents: torch.Tensor, timestep: int, tokens: torch.Tensor, pose: torch.Tensor,
             bank: Sequence[torch.Tensor] | None, *, n_uncond: int = 0, shared_down: bool = False,
             upstream: bool = False, deep: torch.Tensor | None = None, keep_deep: bool = False,
             token_kv: Sequence[torch.Tensor] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self.calls.bump("unet")
        if deep is not None:
            self.calls.bump("unet_reuse")
            deep = self._in(deep)
        t = self._timestep(timestep)
        bank = [self._in(b) for b in bank] if bank is not None else None
        out = self._unet_module()(self._in(latents), t, self._in(tokens), self._in(pose), bank,
                                  n_uncond=n_uncond, shared_down=shared_down, upstream=upstream, deep=deep,
                                  keep_deep=keep_deep,
                                  token_kv=[self._in(kv) for kv in token_kv] if token_kv is not None else None)
        if keep_deep and replays_cuda_graphs(self.compile):
            # CUDA graphs: a replay's outputs live in the graph's memory, which the next replay overwrites (and
            # reading them after it raises), but a kept deep feature is read again at a later step
            eps, kept = out
            return eps, kept.clone()
        return out
