"""HDR video (HLG, PQ) to SDR: the tone mapping behind every decoded frame of an HDR clip.

Phones record HDR by default (an iPhone's Camera app writes HLG with BT.2020 primaries). Converted to 8-bit
RGB as if it were SDR, such a clip looks flat: PQ puts diffuse white near 58 % of the signal, so whites come
out grey and shadows lifted, and BT.2020 colours read as BT.709 lose saturation. The driver's luminance is
what the PoseGuider sees, and a video portrait's colours are what the result keeps, so both are mapped to SDR:

1. R'G'B' at 16 bits (swscale's YUV->RGB with the stream's matrix, normally BT.2020 non-constant luminance).
2. Display light, relative to HDR reference white (203 cd/m2, ITU-R BT.2408) = 1.0: PQ through its EOTF
   (SMPTE ST 2084); HLG through its inverse OETF and the OOTF of a 1000 cd/m2 display (system gamma 1.2,
   ITU-R BT.2100), both applied in BT.2020 RGB.
3. BT.2020 -> BT.709 primaries (a 3x3 matrix on linear light); colours outside BT.709 are clipped.
4. Highlights: values up to ``KNEE`` stay, brighter ones roll off towards 1.0 along an exponential shoulder
   (continuous slope), applied to the largest channel and scaling all three alike, so hues keep their
   ratios. Reference white lands at 0.91 (about 245 of 255), HLG's and PQ's 1000 cd/m2 at 255.
5. BT.1886's inverse (gamma 1/2.4) to 8-bit SDR code values, as a BT.709 display shows them.

An SDR picture put into HLG or PQ this way (its white at reference white) comes back within a few levels
below the knee; ``tests/test_hdr.py`` checks that with 10-bit clips encoded here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

HDR_TRANSFERS = {16: "PQ", 18: "HLG"}  # AVCOL_TRC_SMPTE2084, AVCOL_TRC_ARIB_STD_B67
BT709_PRIMARIES = 1  # AVCOL_PRI_BT709: an HLG/PQ clip tagged so needs no gamut conversion

REFERENCE_WHITE_NITS = 203.0  # ITU-R BT.2408: HDR diffuse white, mapped to SDR white before the shoulder
HLG_PEAK_NITS = 1000.0  # the nominal display of BT.2100's HLG OOTF
HLG_GAMMA = 1.2  # its system gamma at 1000 cd/m2
KNEE = 0.75  # linear SDR light where the highlight shoulder starts
SDR_GAMMA = 2.4  # BT.1886
_BAND_ROWS = 64  # rows per slice: keeps each slice's float planes in the CPU's cache (1.5x faster at 1080p)

# BT.2020 -> BT.709 on linear RGB (ITU-R BT.2087's inverse; rows give R, G, B of BT.709)
_BT2020_TO_BT709 = np.linalg.inv(np.array([[0.6274, 0.3293, 0.0433],
                                           [0.0691, 0.9195, 0.0114],
                                           [0.0164, 0.0880, 0.8956]]))
_BT2020_LUMA = (0.2627, 0.6780, 0.0593)

_PQ_M1, _PQ_M2 = 2610 / 16384, 2523 / 4096 * 128
_PQ_C1, _PQ_C2, _PQ_C3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
_HLG_A = 0.17883277
_HLG_B = 1 - 4 * _HLG_A
_HLG_C = 0.5 - _HLG_A * np.log(4 * _HLG_A)


def pq_eotf(signal: np.ndarray) -> np.ndarray:
    """SMPTE ST 2084: non-linear signal in [0, 1] -> display light in cd/m2 (0..10000)."""
    p = np.asarray(signal, np.float64) ** (1 / _PQ_M2)
    return 10000 * (np.maximum(p - _PQ_C1, 0) / (_PQ_C2 - _PQ_C3 * p)) ** (1 / _PQ_M1)


def hlg_inverse_oetf(signal: np.ndarray) -> np.ndarray:
    """ARIB STD-B67 / BT.2100 HLG: non-linear signal in [0, 1] -> scene light in [0, 1]."""
    e = np.asarray(signal, np.float64)
    return np.where(e <= 0.5, e * e / 3, (np.exp((e - _HLG_C) / _HLG_A) + _HLG_B) / 12)


@lru_cache(maxsize=2)
def _linear_lut(transfer: int) -> np.ndarray:
    """16-bit code -> linear light (float32): PQ's display light / reference white, HLG's scene light."""
    code = np.arange(65536) / 65535.0
    lut = pq_eotf(code) / REFERENCE_WHITE_NITS if transfer == 16 else hlg_inverse_oetf(code)
    return lut.astype(np.float32)


def tone_map(rgb16: np.ndarray, transfer: int, bt2020: bool = True) -> np.ndarray:
    """An HDR picture's 16-bit R'G'B' (``(H, W, 3)`` uint16) as ``(H, W, 3)`` uint8 SDR (see the module doc).

    Args:
        rgb16: non-linear RGB scaled to 0..65535 (swscale's ``rgb48le``).
        transfer: 16 (PQ) or 18 (HLG), FFmpeg's ``color_trc``.
        bt2020: whether the primaries are BT.2020 (convert to BT.709) rather than BT.709 already.
    """
    if transfer not in HDR_TRANSFERS:
        raise ValueError(f"transfer {transfer} is not HLG (18) or PQ (16)")
    import torch  # here: importing this module (media does) stays light

    lut = _linear_lut(transfer)
    luma = torch.tensor(_BT2020_LUMA) if transfer == 18 else None
    gamut = torch.from_numpy(_BT2020_TO_BT709.T.astype(np.float32)) if bt2020 else None
    out = np.empty(rgb16.shape, np.uint8)
    with torch.inference_mode():
        for y in range(0, rgb16.shape[0], _BAND_ROWS):
            band = torch.from_numpy(lut[rgb16[y:y + _BAND_ROWS]])  # (h, W, 3) float32
            out[y:y + _BAND_ROWS] = _band_to_sdr(band, luma, gamut).numpy()
    return out


def _band_to_sdr(light: torch.Tensor, luma: torch.Tensor | None, gamut: torch.Tensor | None) -> torch.Tensor:
    """Steps 2-5 of the module doc on one slice of linear light (changed in place): ``luma``, BT.2020's luminance
    weights for HLG's OOTF (None: PQ, already display light); ``gamut``, the BT.2020 -> BT.709 matrix (None:
    BT.709 primaries)."""
    import torch

    if luma is not None:  # HLG OOTF: Fd = Lw * Ys^(gamma - 1) * E, relative to reference white
        light.mul_((light @ luma).clamp_min_(1e-6).pow_(HLG_GAMMA - 1).mul_(HLG_PEAK_NITS / REFERENCE_WHITE_NITS)
                   .unsqueeze(-1))
    if gamut is not None:
        light = light @ gamut
    light.clamp_min_(0)
    peak = light.amax(-1)
    rolled = torch.where(peak > KNEE, KNEE + (1 - KNEE) * (1 - torch.exp((KNEE - peak) / (1 - KNEE))), peak)
    light.mul_((rolled / peak.clamp_min(1e-12)).unsqueeze(-1))
    return light.clamp_(0, 1).pow_(1 / SDR_GAMMA).mul_(255).round_().to(torch.uint8)
