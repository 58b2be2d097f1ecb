"""Weight loading: the released MegActor v1 layout, and megactor-rt's converted format.

Released layout (``HVSiniX/RawVideoDriven``'s ``weights/`` folder, spec section 3):

* ``checkpoint-steps*.ckpt`` - torch pickle ``{"epoch", "global_step", "state_dict"}`` from the DDP-wrapped
  training model: ``module.unet.*`` (denoiser incl. 13-channel conv_in, PoseGuider, motion modules) and
  ``module.appearance_encoder.*`` (ReferenceNet); ``module.vae.*`` / ``module.text_encoder.*`` are ignored.
  Loaded with ``torch.load(weights_only=True)``: pickled code is never executed.
* ``sd-vae-ft-mse/`` - diffusers AutoencoderKL folder.
* ``StableDiffusion/image_encoder/`` - transformers CLIPVisionModelWithProjection folder
  (``StableDiffusion/feature_extractor/`` only holds the processor settings, which are fixed here; a
  conversion warns where they differ).
* ``StableDiffusion/unet/config.json`` - optional: the SD1.5 UNet config (architecture only).

The SD1.5 UNet's weights and the ``appearance_encoder/`` folder are not read. Upstream loads them first and
then overlays the checkpoint (non-strict, asserting only that no key is unexpected), so a key missing from the
checkpoint would keep their tensor, or a random/zero initial value for the layers SD1.5 lacks. The released
checkpoint holds every key (1300 denoiser and 662 ReferenceNet tensors, the counts upstream's ``animate.py``
notes), so every tensor comes from it, as here; a checkpoint missing keys is refused with their names, not
filled in. The ReferenceNet's architecture is taken from the SD1.5 UNet config (upstream: the
``appearance_encoder`` folder's, MagicAnimate's copy of it); where that folder's config is present and differs,
the conversion warns. The VAE's latent scale is upstream's hard-coded 0.18215 (a conversion warns where the
VAE config says otherwise).

Converted layout (written by ``megactor-rt convert-weights``, read by everything else): one safetensors file
per module (``temporal_unet``, ``reference_net``, ``vae``, ``clip_image_encoder``) plus ``config.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from megactor_rt.config import CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from megactor_rt.errors import InputError, WeightsError
from megactor_rt.files import SAFETENSORS_TEMPORARY, remove_stale, sync_file, sync_folder, umask_mode
from megactor_rt.progress import progress
from megactor_rt.weights_layout import (
    CONFIG_NAME,
    check_converted_folder,
    check_destination,
    check_release_folder,
)

if TYPE_CHECKING:
    from megactor_rt.models.clip import ClipImageEncoder
    from megactor_rt.models.unet import ReferenceNet, TemporalUNet

try:
    import fcntl
except ImportError:  # Windows: no flock (a second conversion at once is not refused there)
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

MODULE_FILES = ("temporal_unet", "reference_net", "vae", "clip_image_encoder")
FORMAT_VERSION = 1


@dataclass
class MegActorModels:
    """The four networks of one model (the PoseGuider lives inside ``unet.condition_input_layer``).

    A network left out of ``build_models(only=...)`` is an ``nn.Identity`` placeholder despite its type.
    """

    config: ModelConfig
    unet: TemporalUNet
    reference_net: ReferenceNet
    vae: nn.Module
    clip: ClipImageEncoder
    weights_id: str = "random"

    def modules(self) -> dict[str, nn.Module]:
        return {"temporal_unet": self.unet, "reference_net": self.reference_net, "vae": self.vae,
                "clip_image_encoder": self.clip}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MegActorModels:
        for m in self.modules().values():
            nn.Module.to(m, device=device, dtype=dtype)  # base method: diffusers' override only adds a warning
        return self


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 128, 1024  # the sizes image_size (--size) takes


def check_image_size(cfg: ModelConfig, image_size: int) -> None:
    """Every network takes any size that their downsampling divides: the VAE's and then the UNet's.

    Raises:
        InputError: a size outside :data:`MIN_IMAGE_SIZE`..:data:`MAX_IMAGE_SIZE` or not a multiple of that
            downsampling.
    """
    step = cfg.vae_scale * 2 ** (len(cfg.unet.block_out_channels) - 1)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not (
            MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE and image_size % step == 0):
        raise InputError(f"image_size (--size) {image_size}: must be a multiple of {step} from {MIN_IMAGE_SIZE} to "
                         f"{MAX_IMAGE_SIZE} (the weights' own size is {cfg.image_size})")


def resized(models: MegActorModels, image_size: int | None) -> MegActorModels:
    """``models`` set to crop and animate at ``image_size`` (None: the weights' own; see :func:`check_image_size`;
    the released model was trained at 512 px: another size changes the result)."""
    if image_size is None or image_size == models.config.image_size:
        return models
    check_image_size(models.config, image_size)
    logger.info("networks at %d px instead of the weights' %d px (this changes the result)", image_size,
                models.config.image_size)
    models.config = replace(models.config, image_size=image_size)
    return models


def build_models(cfg: ModelConfig, seed: int | None = None, only: Collection[str] | None = None) -> MegActorModels:
    """Build the networks on the current default device with random (seeded) weights, eval mode.

    Args:
        cfg: architecture.
        seed: torch seed for the random initialisation.
        only: build just these of ``MODULE_FILES`` (the others are ``nn.Identity`` placeholders); saves
            memory when exporting one full-size network.
    """
    from megactor_rt.models.clip import ClipImageEncoder
    from megactor_rt.models.unet import ReferenceNet, TemporalUNet
    from megactor_rt.models.vae import build_vae

    makers: dict[str, Callable[[], nn.Module]] = {
        "temporal_unet": lambda: TemporalUNet(cfg.unet),
        "reference_net": lambda: ReferenceNet(cfg.reference_net),
        "vae": lambda: build_vae(cfg.vae),  # type: ignore[dict-item,return-value]
        "clip_image_encoder": lambda: ClipImageEncoder.from_config(cfg.clip),
    }
    built: dict[str, nn.Module] = {}
    for i, (name, make) in enumerate(makers.items()):
        if seed is not None:
            torch.manual_seed(seed + i)  # per network, so ``only`` does not change the others' weights
        built[name] = make() if only is None or name in only else nn.Identity()
    models = MegActorModels(cfg, cast("TemporalUNet", built["temporal_unet"]),
                            cast("ReferenceNet", built["reference_net"]), built["vae"],
                            cast("ClipImageEncoder", built["clip_image_encoder"]))
    for m in models.modules().values():
        m.eval().requires_grad_(False)
    return models


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, source: str | Path,
                      assign: bool = False) -> None:
    """Load a state dict, raising ``WeightsError`` that lists every missing/unexpected/mis-shaped key.
    ``assign``: the state's tensors become the module's (a meta-device module gets them without a copy)."""
    check_state(module, state, what, source)
    module.load_state_dict(dict(state), strict=True, assign=assign)


def check_state(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, source: str | Path) -> None:
    """Compare a state dict with a module's (works on meta-device modules); raise ``WeightsError`` on mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    kinds = sorted(f"{k}: {str(state[k].dtype).removeprefix('torch.')}" for k in set(own) & set(state)
                   if own[k].is_floating_point() and not state[k].is_floating_point())
    if kinds:  # (integers, bools, complex numbers: not weights of these networks)
        raise WeightsError(f"{what} weights in {source} are not floating point: {', '.join(kinds[:5])}"
                           + (f", ... (+{len(kinds) - 5} more)" if len(kinds) > 5 else ""))
    if missing or unexpected or shapes:
        if own and state and not set(own) & set(state):  # e.g. two networks' files swapped
            raise WeightsError(f"{what} weights in {source} do not match the model: the file holds none of its "
                               f"{len(own)} keys (its {len(state)} keys begin {', '.join(sorted(state)[:3])}, ...): "
                               "another network's file?")

        def show(xs: list[str]) -> str:
            return ", ".join(xs[:5]) + (f", ... (+{len(xs) - 5} more)" if len(xs) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {show(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes ({len(shapes)}): {show(shapes)}")
        raise WeightsError(f"{what} weights in {source} do not match the model: {'; '.join(parts)}")


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# -- reading files ---------------------------------------------------------------------------------
LFS_POINTER = b"version https://git-lfs"


def check_not_lfs_pointer(path: Path) -> None:
    """Raise ``WeightsError`` if ``path`` is a Git LFS pointer (a clone without ``git lfs pull``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER))
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc}") from exc
    if head == LFS_POINTER:
        raise WeightsError(f"{path} is a Git LFS pointer, not the weights: fetch the files (`git lfs pull` in the "
                           "cloned repository) and try again")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; ``WeightsError`` naming the file if it is damaged or an LFS pointer."""
    check_not_lfs_pointer(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' own error type (truncated, bad header), OSError
        raise WeightsError(f"cannot read {path} ({type(exc).__name__}: {exc}): the file is damaged or incomplete; "
                           "download or convert it again") from exc


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` is (or is named) a safetensors file: its name, or its start (the header's length, 8 bytes
    little-endian, then the header's JSON object), whatever its name (a training checkpoint saved as safetensors and
    named ``.ckpt``). A file that cannot be read is left to the reader, which names the problem."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size


def read_torch_file(path: Path, what: str = "") -> Any:
    """A torch-saved file with ``weights_only=True`` (nothing is unpickled as code), memory-mapped where its
    format allows (the zip format of torch >= 1.6; older files are read whole)."""
    check_not_lfs_pointer(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc}") from exc
    if head and not head.startswith((b"PK", b"\x80")):  # (a zip's, or a pickle's protocol 2+ as torch.save writes)
        # (an HTML page saved under the name, a preallocated download never filled: read as a pickle, torch said it
        # held code, or advised weights_only=False for "the legacy .tar format")
        raise WeightsError(f"cannot read {what or 'weights file'} {path}: it is no file torch saved (it begins "
                           f"{head!r}: an error page saved under its name, a download never filled?); download it "
                           "again")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except Exception as exc:  # UnpicklingError for code objects, RuntimeError for corrupt zips
        text = str(exc)
        if _DAMAGED_ZIP.search(text):  # (was "cannot read ... safely (weights_only=True)": read as a safety refusal)
            detail = text.strip().splitlines()[0].split(". This is an internal miniz error")[0]
            raise WeightsError(f"cannot read {what or 'weights file'} {path}: the file is damaged or incomplete (a "
                               f"download or copy cut short?); download it again ({detail})") from exc
        raise WeightsError(f"cannot read {what or 'weights file'} {path} safely (weights_only=True): "
                           f"{_first_line(exc)}") from exc


# torch's reader on a zip-format file that is cut short or damaged (its central directory or a record unreadable),
# and on a legacy-format (pre-zip) one cut short ("unexpected EOF, expected N more bytes")
_DAMAGED_ZIP = re.compile(r"PytorchStreamReader failed|failed finding central directory|invalid header or archive "
                          r"is corrupted|unexpected EOF, expected \d+ more bytes")


def _first_line(exc: BaseException) -> str:
    """What a reader's error says, in one line: torch's refusal of a pickle explains for lines (and suggests
    ``weights_only=False``, which would run the pickle's code: never here); an empty file's error says nothing."""
    text = str(exc).strip()
    if isinstance(exc, EOFError) or not text:
        return f"{type(exc).__name__}: the file is empty or cut off"
    if "Weights only load failed" in text:
        reason = next((line.strip() for line in text.splitlines() if "Unsupported" in line or "GLOBAL" in line),
                      "it holds code or objects other than tensors")
        return f"it holds code or objects other than tensors, which are not loaded ({reason})"
    return text.splitlines()[0]


def _tensors(state: object, what: str) -> dict[str, torch.Tensor]:
    """``state`` if it is a state_dict of tensors, else a ``WeightsError`` saying ``what`` does not hold one."""
    if not isinstance(state, dict):
        raise WeightsError(f"{what} does not hold a state_dict of tensors (it holds a {type(state).__name__})")
    others = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise WeightsError(f"{what} does not hold a state_dict of tensors: {', '.join(map(str, others[:5]))}"
                           + (f", ... (+{len(others) - 5} more)" if len(others) > 5 else "")
                           + (" is no tensor" if len(others) == 1 else " are no tensors"))
    return state


# where a training script's checkpoint keeps the model's state_dict: torch.save({"state_dict": ...}) (the release,
# PyTorch Lightning), DeepSpeed's {"module": ...}, {"model": ...}
_STATE_DICT_KEYS = ("state_dict", "module", "model")


def _unwrapped(obj: object) -> object:
    """The state_dict a checkpoint's dict holds under one of :data:`_STATE_DICT_KEYS` (beside other entries: the
    epoch, an optimizer's state), else ``obj`` itself (a bare state_dict)."""
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        inner = obj.get("state_dict")
        if inner is not None:  # (named in the error)
            return inner
    return obj


# -- released training checkpoint -------------------------------------------------------------------
def read_training_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split ``checkpoint-steps*.ckpt`` into (denoiser state, ReferenceNet state). A checkpoint saved as safetensors
    (its keys those of the training checkpoint's ``state_dict``; any name, e.g. ``--checkpoint x.safetensors``) is
    read as one.

    Raises:
        WeightsError: unreadable file, a pickle holding anything but tensors/containers/numbers, or no keys of
            one of the networks (keys of neither are skipped with a warning, as upstream skips them).
    """
    obj = read_safetensors(path) if is_safetensors(path) else read_torch_file(path, "checkpoint")
    state = _tensors(_unwrapped(obj), f"checkpoint {path}")
    unet, ref, ignored, foreign = {}, {}, 0, []
    for key, tensor in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith("unet."):
            unet[k[len("unet."):]] = tensor
        elif k.startswith("appearance_encoder."):
            ref[k[len("appearance_encoder."):]] = tensor
        elif k.startswith(("vae.", "text_encoder.")):
            ignored += 1
        else:
            foreign.append(key)
    if foreign:  # upstream's animate.py keeps keys containing "unet." / "appearance_encoder." (stripping
        # "module." where present) and skips the rest; it would stop at an unstripped key, this is lenient
        logger.warning("checkpoint %s: %d keys outside unet./appearance_encoder./vae./text_encoder. are not used "
                       "(as upstream): %s", path, len(foreign), ", ".join(foreign[:5]))
    if not unet or not ref:
        lacks = "unet." if not unet else "appearance_encoder."
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        theirs = f" (its other keys begin {shown}: another prefix?)" if foreign else ""
        raise WeightsError(f"checkpoint {path} lacks {lacks}* keys{theirs}")
    logger.info("checkpoint %s: %d denoiser, %d ReferenceNet tensors (%d vae/text-encoder ignored)",
                path, len(unet), len(ref), ignored)
    return unet, ref


def _read_folder_weights(folder: Path, names: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], Path]:
    """The first of ``names`` in ``folder``: its tensors and its path."""
    for name in names:
        p = folder / name
        if p.is_file():
            if p.suffix == ".safetensors":
                return read_safetensors(p), p
            return _tensors(read_torch_file(p), str(p)), p
    raise WeightsError(f"no weights file ({' or '.join(names)}) in {folder}")


# diffusers <= 0.4 named the VAE's attention projections query/key/value/proj_attn (sd-vae-ft-mse's files
# were written then); diffusers renames them on load, and so do we
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_old_attention_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``...attentions.N.query.weight`` -> ``...attentions.N.to_q.weight`` (and key, value, proj_attn); 1x1
    convolution weights of those projections become linear weights."""
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if len(parts) >= 3 and ".attentions." in f".{key}" and parts[-2] in _OLD_ATTENTION_NAMES:
            key = ".".join([*parts[:-2], _OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
            if tensor.dim() == 4 and tensor.shape[2:] == (1, 1):
                tensor = tensor[:, :, 0, 0]
        out[key] = tensor
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise WeightsError(f"missing {path}") from exc
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path} is not valid JSON: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:  # no permission, a folder, not text
        raise WeightsError(f"{path}: cannot be read as a JSON file ({type(exc).__name__}: {exc})") from exc


@contextlib.contextmanager
def _config_errors(path: Path) -> Iterator[None]:
    """A config file's missing or unusable fields as a ``WeightsError`` naming the file."""
    try:
        yield
    except WeightsError:
        raise
    except KeyError as exc:
        raise WeightsError(f"{path}: missing field {exc}") from exc
    except (ValueError, TypeError, AttributeError) as exc:
        raise WeightsError(f"{path}: unsupported configuration: {exc}") from exc


UPSTREAM_LATENT_SCALE = 0.18215  # animate.py and pipeline.py hard-code it (spec section 2)
# UNet config fields that change no tensor shape (a difference goes unnoticed by the weights' shapes)
_SHAPELESS_FIELDS = ("attention_head_dim", "norm_eps", "upcast_attention", "flip_sin_to_cos", "freq_shift",
                     "norm_num_groups", "act_fn", "only_cross_attention", "use_linear_projection")


def _check_reference_net_config(src: Path, unet_cfg: dict[str, Any]) -> None:
    """Warn where the ``appearance_encoder`` folder's config (upstream builds the ReferenceNet from it) differs
    from the SD1.5 UNet config (this conversion's) in a field no tensor shape shows."""
    path = src / "appearance_encoder" / "appearance_encoder" / "config.json"
    if not path.is_file():
        return
    try:
        ref = _read_json(path)
    except WeightsError as exc:  # only read for this check: not a reason to stop
        logger.warning("cannot compare the ReferenceNet's config with the UNet's: %s", exc)
        return
    if not isinstance(ref, dict):
        logger.warning("%s is not a config object; the ReferenceNet's config is not compared with the UNet's", path)
        return
    differ = [f"{k}: {ref[k]!r} vs {unet_cfg.get(k)!r}" for k in _SHAPELESS_FIELDS if k in ref and ref[k] != unet_cfg.get(k)]
    if differ:
        logger.warning("%s differs from the SD1.5 UNet config, whose architecture the ReferenceNet is built with "
                       "here (upstream builds it from this file): %s", path, "; ".join(differ))


def release_config(src: Path) -> ModelConfig:
    """Architecture of a released weights folder (full-size defaults, refined by the folder's configs)."""
    cfg = ModelConfig()
    unet_cfg = src / "StableDiffusion" / "unet" / "config.json"
    if unet_cfg.is_file():
        with _config_errors(unet_cfg):
            raw = _read_json(unet_cfg)
            _check_reference_net_config(src, raw)
            base = UNetConfig.from_diffusers(raw)
            cfg = ModelConfig(unet=UNetConfig(**{**base.__dict__, "in_channels": 13}),
                              reference_net=UNetConfig(**{**base.__dict__, "in_channels": 4}),
                              vae=cfg.vae, clip=cfg.clip)
    else:
        logger.warning("%s is missing: the denoiser's architecture is taken to be the released model's (SD1.5's "
                       "UNet); a checkpoint of another shape is refused below, naming its keys", unet_cfg)
    vae_json = src / "sd-vae-ft-mse" / "config.json"
    clip_json = src / "StableDiffusion" / "image_encoder" / "config.json"
    vae = _read_json(vae_json)
    clip = _read_json(clip_json)
    with _config_errors(vae_json):
        vae_cfg = VAEConfig(block_out_channels=tuple(vae["block_out_channels"]),
                            layers_per_block=vae.get("layers_per_block", 2),
                            latent_channels=vae.get("latent_channels", 4),
                            norm_num_groups=vae.get("norm_num_groups", 32),
                            scaling_factor=UPSTREAM_LATENT_SCALE)
        if vae.get("scaling_factor", UPSTREAM_LATENT_SCALE) != UPSTREAM_LATENT_SCALE:
            logger.warning("%s: scaling_factor %s; upstream scales the latents by %s whatever the config says, and "
                           "so does this conversion", vae_json, vae["scaling_factor"], UPSTREAM_LATENT_SCALE)
    with _config_errors(clip_json):
        clip = clip.get("vision_config", clip)
        clip_cfg = CLIPConfig(**{k: clip[k] for k in CLIPConfig.__dataclass_fields__ if k in clip})
    if clip_cfg.projection_dim != cfg.unet.cross_attention_dim:
        raise WeightsError(f"{clip_json}: this image encoder projects to {clip_cfg.projection_dim} features, the "
                           f"denoiser's cross-attention takes {cfg.unet.cross_attention_dim} (MegActor v1 uses "
                           "the ViT-L/14 image encoder, 768)")
    out = ModelConfig(unet=cfg.unet, reference_net=cfg.reference_net, vae=vae_cfg, clip=clip_cfg)
    meta_models(out, ", ".join(str(p) for p in (unet_cfg, vae_json, clip_json) if p.is_file()))
    return out


def meta_models(cfg: ModelConfig, where: str) -> MegActorModels:
    """``cfg``'s networks on the meta device (no memory). Values that parse but describe no network (channels
    not divisible by the groups, heads not dividing the width, ...) are a ``WeightsError`` naming ``where``
    (the config files), not an unexpected error."""
    try:
        with torch.device("meta"):
            return build_models(cfg)
    except Exception as exc:  # any builder's complaint (ValueError, TypeError, transformers' validation)
        raise WeightsError(f"{where}: these configs describe networks that cannot be built "
                           f"({type(exc).__name__}: {exc})") from exc


FEATURE_EXTRACTOR = Path("StableDiffusion") / "feature_extractor" / "preprocessor_config.json"  # in the release


def feature_extractor_differences(src: Path, size: int) -> list[str]:
    """How the released ``StableDiffusion/feature_extractor/preprocessor_config.json`` differs from the CLIP
    preprocessing this engine applies (``models.clip.clip_pixels``: shortest side -> ``size`` bicubic, centre
    crop, /255, CLIP mean/std); empty when it agrees or is absent. Upstream preprocesses with that file."""
    from megactor_rt.models.clip import CLIP_MEAN, CLIP_STD

    path = src / FEATURE_EXTRACTOR
    if not path.is_file():
        return []
    try:
        raw: Any = _read_json(path)
    except WeightsError as exc:  # an optional file the engine does not use: named, not fatal
        return [f"unreadable ({exc})"]
    if not isinstance(raw, dict):
        return [f"{path.name} holds no settings object"]

    def edge(value: Any, *keys: str) -> Any:  # transformers wrote 224 before it wrote {"shortest_edge": 224};
        # {"height": 224, "width": 224} resizes the square crop to the same 224 x 224
        if isinstance(value, dict):
            return next((value[k] for k in keys if k in value), value)
        return value

    def close(a: Any, b: tuple[float, ...]) -> bool:
        return isinstance(a, list) and len(a) == len(b) and all(abs(float(x) - y) < 1e-6 for x, y in zip(a, b))

    checks = {
        "size": (edge(raw.get("size", size), "shortest_edge", "height"), size),
        "size width": (edge(raw.get("size", size), "shortest_edge", "width"), size),
        "crop_size": (edge(raw.get("crop_size", size), "height"), size),
        "crop_size width": (edge(raw.get("crop_size", size), "width"), size),
        "resample": (raw.get("resample", 3), 3),
        "do_resize": (raw.get("do_resize", True), True),
        "do_center_crop": (raw.get("do_center_crop", True), True),
        "do_normalize": (raw.get("do_normalize", True), True),
        "do_rescale": (raw.get("do_rescale", True), True),
    }
    out = [f"{k} {got!r} (this engine: {want!r})" for k, (got, want) in checks.items() if got != want]
    try:
        if "rescale_factor" in raw and abs(float(raw["rescale_factor"]) - 1 / 255) > 1e-9:
            out.append(f"rescale_factor {raw['rescale_factor']!r} (this engine: 1/255)")
        for key, want in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
            if key in raw and not close(raw[key], want):
                out.append(f"{key} {raw[key]!r} (this engine: {list(want)!r})")
    except (TypeError, ValueError) as exc:  # a value that is no number (the file is not used: named, not fatal)
        out.append(f"a value that is no number ({exc})")
    return out


_STEP = re.compile(r"checkpoint-steps(\d+)\.ckpt$")
_CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".safetensors")  # files --checkpoint could name


def release_checkpoint(src: Path, checkpoint: str | Path | None = None) -> Path:
    """The released folder's training checkpoint: ``checkpoint`` where given (a path, or a file name inside
    ``src``), else ``checkpoint-steps<N>.ckpt``, the highest N if several (with a warning; upstream's
    inference.yaml names ``checkpoint-steps9000.ckpt``). MegActor-Sigma's ``megactor-sigma.ckpt`` in the same
    folder is another model and never taken."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file() and not path.is_absolute() and (src / path).is_file():
            path = src / path
        if not path.is_file():
            raise WeightsError(f"checkpoint {checkpoint} {'is not a file' if path.exists() else 'does not exist'}"
                               f" (give a path, or a file name inside {src})")
        if path.name == "megactor-sigma.ckpt":
            raise WeightsError(f"{path} is MegActor-Sigma's checkpoint, another model; give MegActor v1's "
                               "checkpoint-steps<N>.ckpt")
        return path
    found = sorted((int(m.group(1)), p) for p in src.glob("checkpoint-steps*.ckpt") if (m := _STEP.search(p.name)))
    if not found:
        sigma = "megactor-sigma.ckpt"
        candidates = sorted(p.name for p in src.glob("*") if p.suffix in _CHECKPOINT_SUFFIXES and p.is_file()
                            and p.name != sigma)  # (a checkpoint renamed, or saved as .pth or .safetensors)
        hint = ""
        if (src / CONFIG_NAME).is_file() and any(src.glob("*.safetensors")):  # convert-weights' own output
            hint = " (it looks like a folder convert-weights already wrote: give it to animate --weights as it is)"
        elif (src / "model_index.json").is_file():  # e.g. stable-diffusion-v1-5, which MegActor builds on
            hint = (": this is a diffusers pipeline folder (model_index.json), not MegActor's released weights/ "
                    "folder (`megactor-rt download` fetches that)")
        elif any((src / "weights").glob("checkpoint-steps*.ckpt")):  # the download root, not its weights/
            hint = f": it is in {src / 'weights'}, pass that folder"
        elif candidates:
            hint = (f" (found {', '.join(candidates[:5])}{', ...' if len(candidates) > 5 else ''}: if one is MegActor "
                    "v1's training checkpoint, name it with --checkpoint)")
        elif (src / sigma).is_file():
            hint = f" (found {sigma}: not MegActor v1's training checkpoint)"
        raise WeightsError(f"no checkpoint-steps<N>.ckpt in {src}{hint}")
    if len(found) > 1:
        logger.warning("%s holds %d checkpoints (%s): converting %s, the most trained (upstream's inference "
                       "config names checkpoint-steps9000.ckpt; --checkpoint picks one)", src, len(found),
                       ", ".join(p.name for _, p in found), found[-1][1].name)
    return found[-1][1]


def convert_release(src: str | Path, dst: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Convert a released ``weights/`` folder into the converted layout.

    Args:
        src: folder holding ``checkpoint-steps*.ckpt``, ``sd-vae-ft-mse/`` and ``StableDiffusion/image_encoder/``.
        dst: output folder (created); files are written to temporaries and renamed on success.
        checkpoint: the training checkpoint to convert (a path, or a file name in ``src``); default: the
            highest ``checkpoint-steps<N>.ckpt`` in ``src``.

    Returns:
        ``dst``.

    Raises:
        WeightsError: missing files, unsafe pickles, or keys that do not match the architecture; another
            conversion into ``dst`` runs now.
    """
    src, dst = check_release_folder(src), Path(dst)
    check_destination(src, dst)
    with _converting(dst):  # (before the sources are read: minutes at full size)
        return _convert(src, dst, checkpoint)


def _convert(src: Path, dst: Path, checkpoint: str | Path | None) -> Path:
    """:func:`convert_release`'s conversion, into a folder it holds."""
    ckpt = release_checkpoint(src, checkpoint)
    cfg = release_config(src)
    differences = feature_extractor_differences(src, cfg.clip.image_size)
    if differences:
        logger.warning("%s: the CLIP image processor differs from the fixed preprocessing this engine applies, "
                       "so its CLIP tokens will differ from upstream's: %s", src / FEATURE_EXTRACTOR,
                       "; ".join(differences))
    unet_sd, ref_sd = read_training_checkpoint(ckpt)
    vae_sd, vae_file = _read_folder_weights(src / "sd-vae-ft-mse",
                                            ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))
    clip_sd, clip_file = _read_folder_weights(src / "StableDiffusion" / "image_encoder",
                                              ("model.safetensors", "pytorch_model.bin"))
    if "vision_config" in _read_json(src / "StableDiffusion" / "image_encoder" / "config.json"):
        # a whole CLIPModel (upstream's from_pretrained of the vision tower loads it, skipping the text tower)
        text = [k for k in clip_sd if k.startswith(("text_model.", "text_projection.")) or k == "logit_scale"]
        clip_sd = {k: v for k, v in clip_sd.items() if k not in set(text)}
        logger.info("%s: a whole CLIP model; its %d text-tower tensors are not used", clip_file, len(text))
    states = {"temporal_unet": unet_sd, "reference_net": ref_sd, "vae": rename_old_attention_keys(vae_sd),
              "clip_image_encoder": clip_sd}
    files = {"temporal_unet": ckpt, "reference_net": ckpt, "vae": vae_file, "clip_image_encoder": clip_file}
    return write_converted(cfg, states, dst, source=str(ckpt.absolute()), files=files)


CONVERT_LOCK = ".convert-weights.lock"  # in the destination while a conversion writes it (hidden: check_destination)


@contextlib.contextmanager
def _converting(dst: Path) -> Iterator[None]:
    """Hold an advisory lock (``flock``) on :data:`CONVERT_LOCK` in ``dst`` (made, with the folder, where missing)
    for a conversion into it: a second ``convert-weights`` into the same folder at once is refused, naming the
    process converting (both used to report success, the folder ending with one's files). The lock goes with the
    process however it ends (SIGKILL too: the file it leaves is taken by the next conversion); the file is removed
    when the conversion ends, and the folders this conversion made (the destination, those above it) where it did
    not finish.

    Raises:
        WeightsError: another conversion holds the folder, or it cannot be made or written (a file there, or above
            it: :func:`~megactor_rt.weights_layout.check_destination` refuses it first).
    """
    made, lock = _missing_folders(dst), dst / CONVERT_LOCK  # (the folders above it too: removed where it fails)
    try:
        dst.mkdir(parents=True, exist_ok=True)
        fd = _lock_conversion(dst, lock)
    except OSError as exc:
        _remove_empty(made)
        raise WeightsError(f"{dst}: cannot write the converted weights ({type(exc).__name__}: {exc}); nothing was "
                           "written") from exc
    done = False
    try:
        yield
        done = True
    finally:
        with contextlib.suppress(OSError):  # (while still held: a conversion that opened it meanwhile is refused,
            lock.unlink()  # one that opens it after makes a new one)
        if not done:
            _remove_empty(made)  # (the folders this conversion made, left empty: was the destination alone, and
            # a conversion into converted/v1/w that failed, its checkpoint missing, left converted/v1 empty)
        os.close(fd)


def _missing_folders(dst: Path) -> list[Path]:
    """``dst`` and the folders above it that do not exist (yet), nearest first."""
    missing = []
    for folder in (dst, *dst.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (nearest first) while each is empty; a folder that is not (another process's files, or
    this one's) stops it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _lock_conversion(dst: Path, lock: Path) -> int:
    """A descriptor of ``lock`` holding its ``flock``, this process's id written in it (where the file system takes
    no locks: the descriptor alone).

    Raises:
        WeightsError: another process holds it (named by its id, where it wrote it).
        OSError: the lock file cannot be made.
    """
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError as exc:  # left by another user's conversion (killed): locked as it is
            try:
                fd = os.open(lock, os.O_RDONLY)
            except FileNotFoundError:  # none there: a folder this user may not write (was said as "No such
                raise exc from None  # file or directory" of the lock file)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.pread(fd, 32, 0).decode().strip()
            except (OSError, UnicodeDecodeError):
                owner = ""
            os.close(fd)
            who = f" (process {owner})" if owner.isdigit() else ""
            raise WeightsError(f"{dst}: another convert-weights is writing this folder{who}; wait for it to end, "
                               "or convert into another folder") from None
        except OSError as exc:  # a file system without locks
            logger.debug("%s: no lock taken (%s)", lock, exc)
            return fd
        try:
            ours = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            ours = False
        if ours:
            break
        os.close(fd)  # removed by the conversion that held it, ended meanwhile: lock the file there now
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def write_converted(cfg: ModelConfig, states: Mapping[str, Mapping[str, torch.Tensor]], dst: Path,
                    source: str = "", files: Mapping[str, str | Path] | None = None) -> Path:
    """Validate each module's state against the architecture, then write the converted layout. ``source``: what
    the conversion came from (recorded); ``files``: each module's source file (named in errors; default
    ``source``)."""
    with torch.device("meta"):
        skeleton = build_models(cfg)
    for name, module in skeleton.modules().items():
        state = dict(states[name])
        state.pop("vision_model.embeddings.position_ids", None)  # buffer of older transformers versions
        check_state(module, state, name, (files or {}).get(name, source))
        states = {**states, name: state}
    for name in MODULE_FILES:  # what the writer would refuse, or write uselessly, named with its source file
        for key, t in states[name].items():
            where = f"{name} weights in {(files or {}).get(name, source)}"
            if t.layout is not torch.strided:
                raise WeightsError(f"{where}: {key} is a {str(t.layout).removeprefix('torch.')} tensor, not a dense "
                                   "one")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise WeightsError(f"{where}: {key} holds NaN or infinite values (damaged weights)")
    if dst.exists() and not dst.is_dir():
        raise WeightsError(f"{dst}: the converted weights go to a folder, and this is a file")
    written: list[tuple[Path, Path]] = []  # (temporary, final): renamed only once every file is written
    made = not dst.exists()  # (removed again if the conversion does not finish)
    done = False
    try:
        dst.mkdir(parents=True, exist_ok=True)
        for leftover in (".*.safetensors.*.tmp", f".{CONFIG_NAME}.*.tmp", SAFETENSORS_TEMPORARY):  # left by
            # conversions killed an hour ago or more (_temporary_beside's names, and save_file's own)
            remove_stale(dst, leftover)
        digest = _id_digest(cfg)
        for name in progress(MODULE_FILES, desc="convert-weights: write", unit="file"):
            tensors: dict[str, torch.Tensor] = {}
            stored: set[int] = set()
            for k, v in states[name].items():  # (tensors sharing storage: safetensors writes each on its own)
                storage = v.untyped_storage().data_ptr()
                tensors[k] = v.clone() if storage in stored and v.numel() else v.contiguous()
                stored.add(storage)
            final = dst / f"{name}.safetensors"
            tmp = _temporary_beside(final, written)  # a name of its own: another conversion cannot take it
            save_file(tensors, str(tmp), metadata={"format": "megactor-rt", "module": name})
            tmp.chmod(umask_mode())  # readable as other written files (safetensors writes 0600), e.g. by a service
            # the id hashes the tensors, not the file: safetensors writes its metadata in an order that differs
            # from process to process, so the same weights converted twice gave two ids (and cold caches)
            _hash_state(digest, name, tensors)
        meta = {"format_version": FORMAT_VERSION, "source": source, "weights_id": digest.hexdigest()[:16],
                "model": cfg.to_dict(), "files": {final.name: _file_stamp(tmp) for tmp, final in written}}
        tmp = _temporary_beside(dst / CONFIG_NAME, written)
        tmp.write_text(json.dumps(meta, indent=1))
        for tmp, _ in written:  # (on disk before config.json names the folder complete, across a power loss too)
            sync_file(tmp)
        (dst / CONFIG_NAME).unlink(missing_ok=True)  # the folder is incomplete while its files are replaced
        for tmp, final in written:  # config.json last: its presence marks a complete folder
            tmp.replace(final)
        sync_folder(dst)
        done = True
    except Exception as exc:  # a full disk, no permission (safetensors' own error type included)
        raise WeightsError(f"{dst}: cannot write the converted weights ({type(exc).__name__}: {exc}); no "
                           "temporary file is left: run the conversion again once that is fixed") from exc
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        if made and not done:
            with contextlib.suppress(OSError):  # (a folder this conversion made, left empty: removed)
                dst.rmdir()
    logger.info("wrote converted weights to %s", dst)
    return dst


def _id_digest(cfg: ModelConfig) -> Any:
    """The weights id's hash, begun with the architecture (a config change that keeps every tensor's shape, such as
    attention heads or a norm's eps, is other weights); :func:`_hash_state` adds each module's tensors."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())


def _hash_state(digest: Any, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Add module ``name``'s tensors (as its file holds them) to the weights id's ``digest``."""
    for key in sorted(tensors):
        t = tensors[key]
        digest.update(f"{name}/{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")


def _file_stamp(path: Path) -> list[int]:
    """A file's size and modification time (ns): config.json keeps them, so that a file replaced since the
    conversion is noticed at load (then its tensors are hashed again)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _changed_files(weights_dir: Path) -> list[str] | None:
    """The module files whose size or time differ from what config.json recorded at the conversion (replaced by
    hand, or copied without their times); None where it recorded none (converted before the record existed)."""
    stamps = _read_json(weights_dir / CONFIG_NAME).get("files")
    if not isinstance(stamps, dict):
        return None
    changed = []
    for name in MODULE_FILES:
        path = weights_dir / f"{name}.safetensors"
        try:
            if stamps.get(path.name) != _file_stamp(path):
                changed.append(path.name)
        except OSError:
            changed.append(path.name)
    return changed


def _temporary_beside(final: Path, written: list[tuple[Path, Path]]) -> Path:
    """A new, empty temporary file beside ``final`` (hidden, unique to this call), listed in ``written`` with
    ``final`` as soon as it exists (the caller removes what is listed there), with the permissions a plain write
    would give it (mkstemp makes it 0600)."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    written.append((Path(name), final))
    try:
        os.fchmod(fd, umask_mode())
    finally:
        os.close(fd)
    return Path(name)


def converted_config(weights_dir: str | Path) -> tuple[ModelConfig, str]:
    """Architecture and weights id of a converted weights folder (its config.json), format-checked."""
    weights_dir = check_converted_folder(weights_dir)
    config = weights_dir / CONFIG_NAME
    meta = _read_json(config)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        made_by = isinstance(meta, dict) and "format_version" not in meta and (
            meta.get("_class_name") or meta.get("architectures") or meta.get("model_type"))
        if isinstance(made_by, list):  # (transformers: "architectures": ["CLIPVisionModelWithProjection"])
            made_by = ", ".join(map(str, made_by))
        if made_by:  # e.g. SD1.5's unet/ or vae/ folder, or the release's sd-vae-ft-mse/, given as --weights
            raise WeightsError(f"{config} is the config of a diffusers or transformers model ({made_by}), not of "
                               f"megactor-rt's converted weights: {weights_dir} is not a converted weights folder; "
                               "convert the released weights/ folder with `megactor-rt convert-weights` and pass "
                               "its output")
        raise WeightsError(f"{config}: unsupported format_version {found!r} (expected {FORMAT_VERSION})")
    with _config_errors(config):
        cfg, weights_id = ModelConfig.from_dict(meta["model"]), meta["weights_id"]
    if isinstance(cfg.image_size, bool) or not isinstance(cfg.image_size, int) or cfg.image_size <= 0:
        raise WeightsError(f"{config}: image_size {cfg.image_size!r} is not a size in pixels; convert the weights "
                           "again with `megactor-rt convert-weights`")
    if not isinstance(weights_id, str) or not weights_id:
        raise WeightsError(f"{config}: weights_id {weights_id!r} is not an id (it keys the caches and exports); "
                           "convert the weights again with `megactor-rt convert-weights`")
    return cfg, weights_id


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def check_converted_files(weights_dir: str | Path) -> str:
    """What ``doctor`` can say of a converted folder without loading it: its ``config.json`` (as
    :func:`converted_config`) and each module file's header (readable, every key of the architecture with its
    shape, floating point), read without the tensors. Returns the weights id.

    Raises:
        WeightsError: naming the file and what is wrong.
    """
    from safetensors import safe_open

    weights_dir = Path(weights_dir)
    cfg, weights_id = converted_config(weights_dir)
    models = meta_models(cfg, str(weights_dir / CONFIG_NAME))
    for name, module in models.modules().items():
        path = weights_dir / f"{name}.safetensors"
        if not path.is_file():
            raise WeightsError(f"missing {path}")
        check_not_lfs_pointer(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 - safe_open's handle is no dict
                # (a type not listed is none of the floating ones: complex64 stands for it, which check_state refuses)
                state = {k: torch.empty(s.get_shape(), device="meta",
                                        dtype=_SAFETENSORS_DTYPES.get(s.get_dtype(), torch.complex64))
                         for k, s in slices.items()}
        except Exception as exc:  # safetensors' own error type (truncated, bad header), OSError
            raise WeightsError(f"cannot read {path} ({type(exc).__name__}: {exc}): the file is damaged or "
                               "incomplete; convert the weights again") from exc
        check_state(module, state, name, path)
    return weights_id


def load_converted(weights_dir: str | Path, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> MegActorModels:
    """Load a converted weights folder into eval-mode modules on ``device``/``dtype``."""
    weights_dir = Path(weights_dir)
    cfg, weights_id = converted_config(weights_dir)
    changed = _changed_files(weights_dir)
    digest = _id_digest(cfg) if changed else None
    models = meta_models(cfg, str(weights_dir / CONFIG_NAME))
    for name, module in models.modules().items():  # one module's tensors in host memory at a time
        path = weights_dir / f"{name}.safetensors"
        if not path.is_file():
            raise WeightsError(f"missing {path}")
        state = read_safetensors(path)
        if digest is not None:
            _hash_state(digest, name, state)
        load_state_strict(module, state, name, path, assign=True)  # the file's tensors become the parameters
        del state
        _restore_buffers(module)
        left = [k for k, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if left:
            raise WeightsError(f"{path}: no values for {', '.join(left[:10])}")
        nn.Module.to(module, device=device, dtype=dtype)  # base method, as MegActorModels.to
    if digest is not None:
        weights_id = _settle_id(weights_dir, weights_id, digest.hexdigest()[:16], changed or [])
    models.weights_id = weights_id
    return models


def current_weights_id(weights_dir: str | Path) -> str:
    """The id of a converted folder's weights as they are now (it keys the portrait caches, the driver plans kept and
    the exports): ``config.json``'s, or, where a module file's size or time differs from what it recorded (replaced
    by hand, or copied without its times), the hash of the files' tensors, read for it (seconds at full size) and
    then recorded there where the folder can be written.

    Raises:
        WeightsError: as :func:`converted_config`; a module file that cannot be read.
    """
    weights_dir = Path(weights_dir)
    cfg, recorded = converted_config(weights_dir)
    changed = _changed_files(weights_dir)
    if not changed:
        return recorded
    size = sum((weights_dir / f"{n}.safetensors").stat().st_size for n in MODULE_FILES
               if (weights_dir / f"{n}.safetensors").is_file())
    logger.warning("%s: %s differ in size or time from what %s recorded: reading their tensors (%.1f GB) to know "
                   "the weights", weights_dir, ", ".join(changed), CONFIG_NAME, size / 1e9)
    digest = _id_digest(cfg)
    for name in MODULE_FILES:
        path = weights_dir / f"{name}.safetensors"
        if not path.is_file():
            raise WeightsError(f"missing {path}")
        _hash_state(digest, name, read_safetensors(path))
    return _settle_id(weights_dir, recorded, digest.hexdigest()[:16], changed)


def _settle_id(weights_dir: Path, recorded: str, found: str, changed: list[str]) -> str:
    """After the tensors of a folder whose files ``changed`` were hashed again (``found``): say what it means, and
    record the id and the files' sizes and times in its config.json (atomically) so that the next load need not
    hash them, where the folder can be written. Returns ``found``."""
    from megactor_rt.engine.cache import write_atomic

    if found != recorded:
        logger.warning("%s: %s changed since %s was written: these are other weights (id %s, not %s); portraits, "
                       "plans and graphs kept for the old ones are not used", weights_dir, ", ".join(changed),
                       CONFIG_NAME, found, recorded)
    else:
        logger.info("%s: %s have other times than %s recorded (copied?): the same weights", weights_dir,
                    ", ".join(changed), CONFIG_NAME)
    config = weights_dir / CONFIG_NAME
    try:
        meta = _read_json(config)
        meta["weights_id"] = found
        meta["files"] = {f"{n}.safetensors": _file_stamp(weights_dir / f"{n}.safetensors") for n in MODULE_FILES}
        write_atomic(config, json.dumps(meta, indent=1).encode())
    except (OSError, WeightsError) as exc:
        logger.warning("%s: cannot record the weights' id and files there (%s); every load reads their tensors "
                       "again to know them", config, exc)
    return found


def _restore_buffers(module: nn.Module) -> None:
    """Non-persistent buffers are not in state dicts; rebuild them after ``to_empty``."""
    for sub in module.modules():
        if hasattr(sub, "position_ids") and hasattr(sub, "num_positions"):
            n = int(sub.num_positions)  # type: ignore[arg-type]
            sub.register_buffer("position_ids", torch.arange(n).expand((1, -1)), persistent=False)
