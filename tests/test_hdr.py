"""HDR (HLG, PQ) clips come out as the SDR picture they carry: tone mapping of drivers and video portraits.

The clips here are made the other way round, with the standards' forward curves written out in this file
(not megactor_rt.hdr's inverse ones): an SDR picture as BT.1886 display light, its white at HDR reference white
(203 cd/m2), in BT.2020 primaries, through PQ's inverse EOTF or HLG's inverse OOTF and OETF, encoded as
lossless 10-bit HEVC with the tags a phone writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import av
import numpy as np
import pillow_heif
import pytest
from av.bitstream import BitStreamFilterContext
from av.video.reformatter import Colorspace
from PIL import Image

from megactor_rt import hdr
from megactor_rt.describe import describe
from megactor_rt.media import iter_video_frames, probe_video, read_portrait, register_heif

PQ, HLG = 16, 18
BT2020 = 9  # AVCOL_PRI_BT2020 / AVCOL_SPC_BT2020_NCL
BT709_TO_BT2020 = np.array([[0.6274, 0.3293, 0.0433], [0.0691, 0.9195, 0.0114], [0.0164, 0.0880, 0.8956]])


def _pq_inverse_eotf(nits: np.ndarray) -> np.ndarray:
    m1, m2, c1, c2, c3 = 0.1593017578125, 78.84375, 0.8359375, 18.8515625, 18.6875
    y = (np.asarray(nits) / 10000) ** m1
    return ((c1 + c2 * y) / (1 + c3 * y)) ** m2


def _hlg_signal(display_nits: np.ndarray) -> np.ndarray:
    """Display light (BT.2020 RGB, cd/m2) -> HLG signal: inverse OOTF at 1000 cd/m2 (gamma 1.2), then OETF."""
    fd = display_nits / 1000
    yd = np.maximum(fd @ np.array([0.2627, 0.6780, 0.0593]), 1e-9)[..., None]
    e = fd * yd ** ((1 - 1.2) / 1.2)  # scene light
    a, b, c = 0.17883277, 0.28466892, 0.55991073
    return np.where(e <= 1 / 12, np.sqrt(3 * np.maximum(e, 0)), a * np.log(np.maximum(12 * e - b, 1e-12)) + c)


def _hdr_signal(sdr: np.ndarray, transfer: int) -> np.ndarray:
    """SDR uint8 RGB -> HDR signal in [0, 1] (BT.2020 primaries, SDR white at 203 cd/m2)."""
    nits = ((sdr / 255.0) ** 2.4) @ BT709_TO_BT2020.T * 203
    return _pq_inverse_eotf(nits) if transfer == PQ else _hlg_signal(nits)


def _write_hdr_clip(path: Path, sdr: np.ndarray, transfer: int, frames: int = 2) -> None:
    h, w = sdr.shape[:2]
    signal = np.clip(np.round(_hdr_signal(sdr, transfer) * 65535), 0, 65535).astype(np.uint16)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx265", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p10le"
        s.options = {"x265-params": "lossless=1:bframes=0:log-level=error"}
        cc = s.codec_context
        cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range = BT2020, transfer, BT2020, 1
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(signal, format="rgb48le").reformat(
                format="yuv420p10le", dst_colorspace=Colorspace.BT2020, dst_color_range=1)
            f.color_primaries, f.color_trc, f.colorspace, f.color_range, f.pts = BT2020, transfer, BT2020, 1, i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def _patches(rng: np.random.Generator, rows: int = 6, cols: int = 8, side: int = 16) -> np.ndarray:
    """Flat colour patches (4:2:0 chroma is exact inside them), every channel below the highlight knee."""
    top = round(255 * hdr.KNEE ** (1 / 2.4))
    colours = rng.integers(0, top, (rows, cols, 3)).astype(np.uint8)
    colours[0, :4] = [[0, 0, 0], [top, top, top], [top, 0, 0], [0, top // 2, top]]  # black, grey, saturated
    return np.repeat(np.repeat(colours, side, 0), side, 1)


def _interiors(image: np.ndarray, side: int = 16) -> np.ndarray:
    """Each patch without its 4-pixel border (4:2:0 chroma and the scaler's taps reach 3 pixels across it)."""
    h, w = image.shape[:2]
    keep = np.zeros((h, w), bool)
    for y in range(0, h, side):
        for x in range(0, w, side):
            keep[y + 4:y + side - 4, x + 4:x + side - 4] = True
    return image[keep]


@pytest.mark.parametrize("transfer", [HLG, PQ], ids=["hlg", "pq"])
def test_an_sdr_picture_in_an_hdr_clip_comes_back(tmp_path: Path, transfer: int) -> None:
    """Below the highlight knee the SDR picture returns within 2 levels (10-bit and YUV rounding), saturated
    colours included, and within 1 % of white in linear light where a channel is near black (there BT.1886's
    steep start turns a 10-bit code of the other channels' gamut conversion into up to 15 levels). As a plain
    SDR conversion reads them, the same clip is off by tens of levels."""
    sdr = _patches(np.random.default_rng(transfer))
    path = tmp_path / "phone.mov"
    _write_hdr_clip(path, sdr, transfer)
    frames = list(iter_video_frames(path))
    assert len(frames) == 2
    got, want = _interiors(frames[0]).astype(int), _interiors(sdr).astype(int)
    assert np.abs(got - want)[want >= 48].max() <= 2
    assert np.abs((got / 255) ** 2.4 - (want / 255) ** 2.4).max() < 0.01
    np.testing.assert_array_equal(read_portrait(path), frames[0])  # a video portrait is mapped alike
    with av.open(str(path)) as c:  # the same frame as an SDR conversion reads it: what was used before
        plain = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(_interiors(plain).astype(int) - _interiors(sdr)).max() > 30


def test_reference_white_black_and_peak() -> None:
    """Reference white (HLG 75 %, PQ 203 cd/m2) lands at 245 of 255, 1000 cd/m2 at 255, black at 0; a grey ramp
    stays in order."""
    def grey(signal: float, transfer: int) -> int:
        rgb16 = np.full((1, 1, 3), round(signal * 65535), np.uint16)
        out = hdr.tone_map(rgb16, transfer)
        assert out[0, 0, 0] == out[0, 0, 1] == out[0, 0, 2]
        return int(out[0, 0, 0])

    assert abs(grey(0.75, HLG) - 245) <= 1 and grey(1.0, HLG) == 255 and grey(0.0, HLG) == 0
    assert abs(grey(float(_pq_inverse_eotf(203)), PQ) - 245) <= 1 and grey(float(_pq_inverse_eotf(1000)), PQ) >= 254
    assert grey(0.0, PQ) == 0
    ramp = np.repeat(np.linspace(0, 65535, 4096).astype(np.uint16)[None, :, None], 3, axis=2)
    for transfer in (HLG, PQ):
        values = hdr.tone_map(ramp, transfer)[0, :, 0].astype(int)
        assert (np.diff(values) >= 0).all() and values[0] == 0 and values[-1] == 255


def test_bt709_primaries_are_not_converted_again() -> None:
    """An HLG signal tagged with BT.709 primaries (broadcast does this) keeps a pure red pure; read as BT.2020
    the same signal is a red outside BT.709: a brighter red there, green and blue clipped to 0."""
    red = np.zeros((1, 1, 3), np.uint16)
    red[..., 0] = round(0.6 * 65535)
    as709 = hdr.tone_map(red, HLG, bt2020=False)[0, 0]
    assert as709[0] > 150 and as709[1] == as709[2] == 0
    as2020 = hdr.tone_map(red, HLG, bt2020=True)[0, 0]
    assert as2020[0] > as709[0]  # BT.2020 red is outside BT.709: brighter there, the rest clipped to 0
    with pytest.raises(ValueError, match="not HLG"):
        hdr.tone_map(red, 1)


def test_an_hdr_clip_is_logged_as_tone_mapped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "hlg.mov"
    _write_hdr_clip(path, np.full((64, 64, 3), 100, np.uint8), HLG)
    with caplog.at_level(logging.INFO, logger="megactor_rt.media"):
        assert probe_video(path).hdr == "HLG"
    assert any("is HDR video (HLG): its frames are tone-mapped" in r.getMessage() for r in caplog.records)


def test_a_10_bit_bt2020_clip_without_transfer_tag_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An HLG clip whose transfer tag an editor dropped (BT.2020 primaries and 10 bits kept) is read as SDR, pale:
    the user is told it may be HDR and how to tag it; a tagged one and an 8-bit BT.2020 one are not warned about."""
    untagged, tagged = tmp_path / "untagged.mov", tmp_path / "tagged.mov"
    sdr = np.full((64, 64, 3), 100, np.uint8)
    _write_hdr_clip(untagged, sdr, 2)  # AVCOL_TRC_UNSPECIFIED (the HLG signal stays)
    _write_hdr_clip(tagged, sdr, HLG)
    with caplog.at_level(logging.INFO, logger="megactor_rt.media"):
        assert probe_video(untagged).hdr is None
        assert probe_video(tagged).hdr == "HLG"
        assert probe_video(untagged).hdr is None  # (probed again, as each run of a batch does: said once)
    said = [r.getMessage() for r in caplog.records if "no transfer tag" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{untagged}: 10-bit video with BT.2020 colours")
    assert "hevc_metadata=transfer_characteristics=18" in said[0]
    fixed = tmp_path / "fixed.mov"  # the advice, through PyAV's bitstream filter as ffmpeg -bsf:v runs it
    with av.open(str(untagged)) as src, av.open(str(fixed), "w") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        bsf = BitStreamFilterContext("hevc_metadata=transfer_characteristics=18", stream, out)
        for packet in src.demux(stream):
            for tagged_packet in bsf.filter(packet if packet.size else None):
                tagged_packet.stream = out
                dst.mux(tagged_packet)
    assert probe_video(fixed).hdr == "HLG"


def _write_hdr_photo(path: Path, sdr: np.ndarray, transfer: int) -> None:
    """``sdr`` as a 10-bit HDR photo: HEIF through pillow-heif (its colour tags in an nclx box), AVIF through FFmpeg
    (SVT-AV1 at its finest quality)."""
    h, w = sdr.shape[:2]
    signal = np.clip(np.round(_hdr_signal(sdr, transfer) * 65535), 0, 65535).astype(np.uint16)
    if path.suffix == ".heic":
        photo = pillow_heif.from_bytes(mode="RGB;16", size=(w, h), data=signal.tobytes())
        photo.info["nclx_profile"] = {"color_primaries": BT2020, "transfer_characteristics": transfer,
                                      "matrix_coefficients": BT2020, "full_range_flag": 1}
        photo.save(str(path), quality=-1, save_nclx_profile=True, chroma=444)
        return
    with av.open(str(path), "w", format="avif") as c:
        s = c.add_stream("libsvtav1", rate=1)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p10le"
        s.options = {"crf": "1", "svtav1-params": "log-level=0"}
        cc = s.codec_context
        cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range = BT2020, transfer, BT2020, 1
        f = av.VideoFrame.from_ndarray(signal, format="rgb48le").reformat(
            format="yuv420p10le", dst_colorspace=Colorspace.BT2020, dst_color_range=1)
        f.color_primaries, f.color_trc, f.colorspace, f.color_range, f.pts = BT2020, transfer, BT2020, 1, 0
        for p in [*s.encode(f), *s.encode(None)]:
            c.mux(p)


@pytest.mark.parametrize("suffix", [".heic", ".avif"])
@pytest.mark.parametrize("transfer", [HLG, PQ], ids=["hlg", "pq"])
def test_an_hdr_photo_portrait_is_tone_mapped(tmp_path: Path, transfer: int, suffix: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """An HDR photo (Lightroom's HDR export: PQ or HLG in a HEIF or AVIF) is tone-mapped as HDR video is: the SDR
    picture put into it comes back within 2 levels below the knee (1.5 % of white in linear light near black); read
    as SDR, as it was, it is off by tens of levels (pale)."""
    sdr = _patches(np.random.default_rng(transfer))
    path = tmp_path / f"hdr{suffix}"
    _write_hdr_photo(path, sdr, transfer)
    with caplog.at_level(logging.INFO, logger="megactor_rt.media"):
        got = _interiors(read_portrait(path)).astype(int)
    want = _interiors(sdr).astype(int)
    assert np.abs(got - want)[want >= 48].max() <= 2
    assert np.abs((got / 255) ** 2.4 - (want / 255) ** 2.4).max() < 0.02
    name = "PQ" if transfer == PQ else "HLG"
    assert any(r.getMessage() == f"{path} is an HDR photo ({name}): tone-mapped to SDR (BT.709)" for r in caplog.records)
    assert describe(path, faces=False)["hdr"] == name  # (inspect)
    register_heif()
    with Image.open(path) as im:  # as Pillow reads it
        assert np.abs(_interiors(np.asarray(im.convert("RGB"))).astype(int) - want).max() > 30
