"""Per-portrait state: everything that depends only on the portrait, computed once (spec section 2.7).

crop pixels -> VAE posterior (mean for the ReferenceNet, a seeded sample for the concat channels) ->
background mask at latent size -> CLIP background tokens and the UNet's cross-attention keys/values of them ->
PoseGuider FiLM code -> ReferenceNet bank per timestep (filled lazily, then reused by every window and every
later video of the same portrait).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from megactor_rt.models.clip import clip_pixels
from megactor_rt.models.vae import posterior_sample
from megactor_rt.runtime.submodels import Submodels


@dataclass
class PortraitInputs:
    """Preprocessed portrait pixels (CHW; uint8, the FiLM reference fp32) as the networks consume them.

    Attributes:
        image: ``(3, S, S)`` face crop (VAE input, both latent paths).
        background_mask: ``(S, S)`` 1 = background, 0 = person.
        clip_image: ``(3, S, S)`` person-removed image for CLIP.
        ada_reference: ``(3, 512, 512)`` FiLM reference, 0..255 in fp32 as upstream's resize gives it, not
            truncated (the crop itself before truncation when S = 512); uint8 is taken too.
    """

    image: torch.Tensor
    background_mask: torch.Tensor
    clip_image: torch.Tensor
    ada_reference: torch.Tensor

    def digest(self) -> str:
        h = hashlib.sha256()
        for t in (self.image, self.background_mask, self.clip_image, self.ada_reference):
            h.update(str(tuple(t.shape)).encode())
            h.update(np.ascontiguousarray(t.cpu().numpy()).tobytes())
        return h.hexdigest()


@dataclass
class PortraitState:
    """Cached per-portrait tensors (all on the submodels' device).

    Attributes:
        key: cache key (portrait content + weights + options).
        ref_latent: ``(1, 4, h, w)`` VAE mean x scaling (ReferenceNet input).
        cond: ``(1, 5, h, w)`` VAE sample x scaling | background mask (conv_in channels 4..8).
        tokens: CLIP tokens ``(1, T, D)``.
        token_kv: the temporal UNet's cross-attention keys and values of ``tokens`` (``Submodels.token_kv``;
            None where the backend's UNet projects the tokens itself, or not computed yet: :meth:`cross_kv`).
        film_scale / film_shift: ``(1, 128)`` PoseGuider FiLM code.
        ada_reference: ``(1, 3, 512, 512)`` in [0, 1] (kept for the reference-mode evaluation).
        banks: ReferenceNet bank per timestep, filled on demand.
        face_landmarks: ``(68, 2)`` landmarks of the crop (contour mode), filled on demand.
        landmarks_model: the landmark model file ``face_landmarks`` came from and the face chosen in the crop
            (``Landmarker.identity``; another model or choice recomputes them).
    """

    key: str
    inputs: PortraitInputs
    ref_latent: torch.Tensor
    cond: torch.Tensor
    tokens: torch.Tensor
    film_scale: torch.Tensor
    film_shift: torch.Tensor
    ada_reference: torch.Tensor
    banks: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    token_kv: list[torch.Tensor] | None = None
    face_landmarks: np.ndarray | None = None
    landmarks_model: str | None = None

    def bank(self, timestep: int, sub: Submodels) -> list[torch.Tensor]:
        """The batch-1 ReferenceNet bank at ``timestep`` (computed once, then cached)."""
        if timestep not in self.banks:
            self.banks[timestep] = sub.reference_bank(self.ref_latent, timestep, self.tokens)
        return self.banks[timestep]

    def cross_kv(self, sub: Submodels) -> list[torch.Tensor] | None:
        """The UNet's cross-attention keys and values of the tokens (computed once, then cached; a state read
        from a store file written without them computes them here), or None where ``sub``'s UNet projects the
        tokens itself."""
        if self.token_kv is None:
            self.token_kv = sub.token_kv(self.tokens)
        return self.token_kv

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"ref_latent": self.ref_latent, "cond": self.cond, "tokens": self.tokens,
               "film_scale": self.film_scale, "film_shift": self.film_shift, "ada_reference": self.ada_reference}
        out.update({f"token_kv_{i:02d}": t for i, t in enumerate(self.token_kv or ())})
        for t, bank in list(self.banks.items()):  # a snapshot: another thread's run may be adding a bank
            out.update({f"bank_{t}_{i:02d}": b for i, b in enumerate(bank)})
        return out

    def nbytes(self) -> int:
        """Bytes held: the cached tensors and the portrait's pixels (one tensor in two fields counted once)."""
        inp = self.inputs
        held = [*self.tensors().values(), inp.image, inp.background_mask, inp.clip_image, inp.ada_reference]
        return sum({(t.data_ptr(), t.shape): t.numel() * t.element_size() for t in held}.values())


def prepare_portrait(sub: Submodels, inputs: PortraitInputs, seed: int, key: str = "",
                     vae_eps: torch.Tensor | None = None) -> PortraitState:
    """Compute everything per-portrait (except banks, which fill lazily per timestep).

    Args:
        sub: the backend's submodels.
        inputs: preprocessed portrait pixels.
        seed: seed of the VAE posterior sample (upstream draws it from the global RNG after set_seed).
        key: cache key to store in the state.
        vae_eps: explicit posterior noise ``(1, 4, h, w)`` (golden tests); default: seeded randn.
    """
    cfg = sub.config
    # (1, 3, S, S) in [-1, 1]; in fp16 runs computed in fp16 as upstream does (x / 255 - 0.5) * 2 (its concat
    # path's x / 127.5 - 1 gives the same fp16 values), elsewhere in fp32 and cast once
    dtype = torch.float16 if sub.dtype == torch.float16 else torch.float32
    mean, logvar = sub.vae_encode((inputs.image.to(dtype)[None] / 255 - 0.5) * 2)
    if vae_eps is None:
        gen = torch.Generator().manual_seed(seed)
        vae_eps = torch.randn(mean.shape, generator=gen, dtype=torch.float32)
    scale = cfg.vae.scaling_factor
    z_cat = posterior_sample(mean.float(), logvar.float(), vae_eps.to(mean.device)) * scale
    mask = F.interpolate(inputs.background_mask[None, None].float(), size=mean.shape[-2:], mode="nearest")
    cond = torch.cat([z_cat, mask.to(z_cat.device)], dim=1)  # (1, 5, h, w)
    tokens = sub.clip_tokens(clip_pixels(inputs.clip_image, cfg.clip.image_size))
    ada = inputs.ada_reference.float()[None] / 255.0
    film_scale, film_shift = sub.film(ada)
    return PortraitState(key=key, inputs=inputs, ref_latent=mean * scale, cond=cond.to(mean.dtype),
                         tokens=tokens, film_scale=film_scale, film_shift=film_shift,
                         ada_reference=ada.to(mean.device, mean.dtype), token_kv=sub.token_kv(tokens))
