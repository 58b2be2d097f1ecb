"""A cheaper latent decoder: TAESD (madebyollin's Tiny AutoEncoder for Stable Diffusion), decoder half.

A speed knob that changes the output (``--tiny-decoder FILE``): TAESD's decoder is a stack of 64-channel
3x3 convolutions, far cheaper than the SD VAE decoder (no attention, no 512-channel convolutions at full
resolution), and blurrier. It decodes the SD 1.x latent space that MegActor's VAE (sd-vae-ft-mse) shares,
and it takes the latents as the diffusion model sees them (already multiplied by the VAE's 0.18215).

Weights are not bundled; use the SD 1.x model (``taesd``, not ``taesdxl``/``taesd3``/``taef1``):

* a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) from
  https://huggingface.co/madebyollin/taesd, keys ``decoder.layers.<i>...`` (the encoder keys are ignored);
* or the decoder file of https://github.com/madebyollin/taesd (``taesd_decoder.safetensors`` or
  ``taesd_decoder.pth``), keys ``<i+1>...`` (its ``nn.Sequential`` starts with a parameter-free clamp).

``.pth`` files are read with ``torch.load(weights_only=True)``, never unpickled as code. The network is
diffusers' ``DecoderTiny`` with TAESD's configuration.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DecoderTiny

from megactor_rt.errors import WeightsError

logger = logging.getLogger(__name__)

TAESD_URL = "https://huggingface.co/madebyollin/taesd"
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def build_tiny_decoder(latent_channels: int = 4) -> DecoderTiny:
    """TAESD's decoder architecture (random weights): ``(B, 4, h, w)`` latents -> ``(B, 3, 8h, 8w)`` in about
    [-1, 1] (diffusers' convention, like the VAE decoder's output)."""
    return DecoderTiny(in_channels=latent_channels, out_channels=3, num_blocks=(3, 3, 3, 1),
                       block_out_channels=(64, 64, 64, 64), upsampling_scaling_factor=2, act_fn="relu",
                       upsample_fn="nearest")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the --tiny-decoder file is empty (TAESD for SD 1.x: {TAESD_URL})")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unsafe pickle, or not a checkpoint at all
        lines = str(exc).splitlines()
        unsafe = next((ln.strip() for ln in lines if "WeightsUnpickler error" in ln), None)
        if unsafe is not None and unsafe.split("WeightsUnpickler error:", 1)[-1].strip():  # garbage: no reason
            raise WeightsError(f"{path}: the --tiny-decoder file holds more than tensors; refused without unpickling "
                               f"code ({unsafe})") from exc
        raise WeightsError(f"{path}: the --tiny-decoder file is not a PyTorch checkpoint or safetensors file "
                           f"({type(exc).__name__})") from exc  # (torch's text advises weights_only=False: not here)
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise WeightsError(f"{path}: the --tiny-decoder file holds a {type(sd).__name__}, not a state dict of named "
                           "tensors")
    return sd


def _to_diffusers_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either layout -> ``DecoderTiny`` keys (``layers.<i>...``)."""
    if any(k.startswith("decoder.") for k in sd):  # diffusers AutoencoderTiny
        return {k.removeprefix("decoder."): v for k, v in sd.items() if k.startswith("decoder.")}
    out = {}
    for key, value in sd.items():  # madebyollin's nn.Sequential: index 0 is the clamp (no parameters)
        m = re.fullmatch(r"(\d+)\.(.+)", key)
        out[f"layers.{int(m.group(1)) - 1}.{m.group(2)}" if m else key] = value
    return out


def tiny_decoder_file(path: str | Path) -> Path:
    """The weights file of a ``--tiny-decoder`` path (a diffusers folder's safetensors, or the file itself).

    Raises:
        WeightsError: the file is missing.
    """
    path = Path(path)
    file = path / _DIFFUSERS_WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise WeightsError(f"{file}: tiny decoder weights not found (TAESD for SD 1.x: {TAESD_URL})")
    return file


def tiny_decoder_id(path: str | Path) -> str:
    """An id of the weights at ``path`` (sha256 of the file): what an exported ``tiny_decoder`` graph records.

    Raises:
        WeightsError: the file is missing.
    """
    import hashlib

    file = tiny_decoder_file(path)
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"taesd-{h.hexdigest()[:16]}"


def load_tiny_decoder(path: str | Path) -> DecoderTiny:
    """Load TAESD decoder weights (see the module docstring for the accepted layouts).

    Raises:
        WeightsError: missing file, unreadable or unsafe checkpoint, missing/unexpected keys or wrong shapes
            (for example a 16-channel ``taesd3``/``taef1`` model), each naming the file.
    """
    file = tiny_decoder_file(path)
    sd = _to_diffusers_keys(_read_state_dict(file))
    model = build_tiny_decoder()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{file}: not a TAESD decoder: {len(missing)} missing keys {missing[:3]}, "
                           f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise WeightsError(f"{file}: tensor shapes do not match TAESD for SD 1.x latents (4 channels): "
                           f"{wrong[:2]}")
    model.load_state_dict(sd)
    logger.info("loaded tiny decoder %s", file)
    return model.eval().requires_grad_(False)
