"""Media I/O: portrait images (Pillow), driving-video decode and result-video encode (PyAV).

Frames cross this module's boundary as numpy ``(H, W, 3)`` uint8 RGB arrays.

Behaviour on bad input (every case raises :class:`~megactor_rt.errors.InputError` naming the file):

* images: missing, unreadable, not an image, smaller than 64 px or larger than 8192 px on a side;
* videos: missing, empty, unreadable (an MP4/MOV cut off before its index is said to be: :func:`iso_cut_off`), no
  video stream, zero decodable frames;
* a video's display matrix (phones record upright clips as landscape frames plus a rotation) is applied to
  every decoded frame the way the ffmpeg command line applies it (quarter turns and flips), so frames and
  :class:`VideoInfo` sizes are the upright picture a player shows; another angle is logged and ignored;
* a video that breaks off mid-stream (truncated download, corrupt packets) raises when the break is
  reached, after the frames before it were yielded; a clean end of stream well short of the frame count
  the header announces counts as a break too (raised after the last decoded frame). A consumer that writes through :class:`VideoWriter`
  therefore loses nothing: the exception discards the temporary output. Pass ``strict=False`` to
  :func:`iter_video_frames` to log a warning and stop at the break instead.

Outputs are written to a hidden temporary file in the destination folder and renamed onto the final
name only after the container was closed successfully; no partial file ever carries the final name.
"""

from __future__ import annotations

import glob
import itertools
import logging
import math
import os
import struct
import threading
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, cast

import av
import numpy as np
from av.video.reformatter import Colorspace
from PIL import Image, ImageOps, UnidentifiedImageError

from megactor_rt.errors import InputError, ResourceError
from megactor_rt.files import UNHELD_S, hold, let_go, remove_stale, replace_synced, same_file
from megactor_rt.hdr import BT709_PRIMARIES, HDR_TRANSFERS, tone_map
from megactor_rt.pipe import STDOUT, Y4MWriter, check_stdout, is_stdout
from megactor_rt.sequence import (
    SEQUENCE_SUFFIXES,
    SETTINGS_KEY,
    LazyFrames,
    ResultWriter,
    SequenceWriter,
    check_sequence_path,
    find_pattern,
    frame_pattern,
    frame_text,
    is_frame_pattern,
    is_sequence,
    sequence_exists,
    sequence_name,
    sequence_settings,
)

logger = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 64
MAX_IMAGE_SIDE = 8192

# Pillow warns of an image over Image.MAX_IMAGE_PIXELS (89 MP: 10000x10000 px) as it opens it, its raw
# DecompressionBombWarning on stderr before this engine's own error: a side over MAX_IMAGE_SIDE is refused here,
# one over Pillow's error limit said as too large (image_too_large). Filtered for the process, once, at import
# (warnings.catch_warnings around each read is not thread-safe: the server reads images in its threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Output containers we write, and the audio codecs each accepts without transcoding (.gif: no audio track).
_AUDIO_COPY_CODECS: dict[str, frozenset[str]] = {
    ".mp4": frozenset({"aac", "mp3", "alac", "ac3", "eac3"}),
    ".m4v": frozenset({"aac", "alac", "ac3"}),  # FFmpeg's ipod muxer refuses MP3 and E-AC-3
    ".mov": frozenset({"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le"}),
    ".mkv": frozenset({"aac", "mp3", "alac", "ac3", "eac3", "opus", "vorbis", "flac", "pcm_s16le"}),
    ".webm": frozenset({"opus", "vorbis"}),  # WebM takes these two audio codecs only
    ".gif": frozenset(),
    ".webp": frozenset(),  # animated WebP: no sound either
}
# the suffixes of the results VideoWriter writes
RESULT_SUFFIXES = tuple(sorted(_AUDIO_COPY_CODECS))
# every result format: those and PNG frame sequences (megactor_rt.sequence)
ALL_RESULT_SUFFIXES = tuple(sorted((*RESULT_SUFFIXES, *SEQUENCE_SUFFIXES)))
# what other audio is converted to: AAC, except in WebM (Opus) and the WAV file beside a frame sequence (16-bit PCM)
_AUDIO_ENCODER = {".webm": "libopus", ".wav": "pcm_s16le"}
_ENCODER_NAME = {"aac": "AAC", "libopus": "Opus", "pcm_s16le": "16-bit PCM"}
# the sample rates each audio encoder takes (and its sample format); other sources (192 kHz, 37.8 kHz) are
# resampled to the nearest
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
_ENCODER_RATES = {"aac": _AAC_RATES, "libopus": (48000, 24000, 16000, 12000, 8000)}
_ENCODER_FORMAT = {"aac": "fltp", "libopus": "flt", "pcm_s16le": "s16"}
# MP3 below this rate (MPEG-2.5) is refused by the MP4/MOV muxers ("not standard"): transcoded there instead
_MP3_MIN_COPY_RATE = 16000
# a transcoded audio stream starting later than this after the video's first frame (or a gap in it) is
# padded with silence, so it stays in step
AUDIO_GAP_S = Fraction(1, 100)
# H.264 encoders in order of preference; mpeg4 (part 2) is the last resort every FFmpeg build has.
_VIDEO_ENCODERS = ("libx264", "libopenh264", "mpeg4")
# the encoder of the containers that take no H.264
_OTHER_VIDEO_ENCODERS = {".webm": "libvpx-vp9", ".gif": "gif", ".webp": "libwebp_anim"}
# animated WebP: lossy at libwebp's quality 80 of 100 (on the bundled driver's 512 px frames: mean error 2.4
# levels, 11 KB per frame against 3 KB in H.264 and 82 KB in a GIF; 40 ms per frame: docs/performance.md),
# looping forever
_WEBP_OPTIONS = {"quality": "80"}
_UNTAGGED = (".gif", ".webp")  # results whose container keeps no metadata tags
# VP9 (WebM) quality: constant quality 24 of 0-63 (about libx264's crf 18 on the bundled driver: mean error
# 1.7 levels); speed 4 of 0-8 with row threading (about 25 ms per 512 px frame on one core)
_VP9_OPTIONS = {"crf": "24", "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}
# the constant-quality scale of the encoders that have one: (best, worst, default); lower is better and larger
CRF_SCALES = {"libx264": (0, 51, 18), "libvpx-vp9": (0, 63, int(_VP9_OPTIONS["crf"]))}
# GIF: frame delays are whole hundredths of a second, and browsers show a delay under 2/100 s as 1/10 s
GIF_MAX_FPS = 50
# GIF colours: one 256-colour palette made from the first frames (a portrait keeps its colours; a palette per
# frame doubled the file and flickers): the first GIF_PALETTE_FRAMES frames (half a second at 30 fps: an open mouth,
# teeth, a turned head seen early get their colours; they are held until the palette is made, at most
# GIF_PALETTE_BYTES of them), ordered dithering (error diffusion shimmers between frames and took 3x as long)
_GIF_PALETTE = "stats_mode=full"
GIF_PALETTE_FRAMES = 16
GIF_PALETTE_BYTES = 64 << 20
_GIF_DITHER = "dither=bayer:bayer_scale=3"

PathLike = str | os.PathLike[str]


# ---------------------------------------------------------------------------------------------- images


def read_image(path: PathLike, say_transparent: bool = False) -> np.ndarray:
    """Read a still image as RGB (``say_transparent``: a warning where a share of it is transparent, for a
    portrait).

    RGBA/LA and palette images lose their alpha the way ``PIL.Image.convert("RGB")`` does (alpha is
    dropped, not composited); greyscale (8 or 16 bit) is replicated to three channels. EXIF orientation
    is applied (upstream ignored it; a rotated phone photo would otherwise lose its face).

    Args:
        path: PNG, JPEG, WebP, AVIF, HEIC/HEIF (phone photos, through pillow-heif), BMP or any other format Pillow
            reads.

    Returns:
        ``(H, W, 3)`` uint8 RGB array.

    Raises:
        InputError: the file is missing, unreadable, not an image, or a side is outside 64..8192 px.
    """
    path = Path(path)
    require_file(path, "image")
    require_content(path, "image")
    register_heif()
    try:
        with Image.open(path) as im:
            _check_image_size(path, im.size)  # before decoding pixels: no decompression bombs
            hdr = _hdr_photo(path, im)
            rgb = image_to_rgb(im) if hdr is None else hdr
            if say_transparent and ("A" in im.getbands() or "transparency" in im.info):
                _say_transparent(path, im)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise image_too_large(path, exc) from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: image is corrupt or truncated ({exc})") from exc
    _check_image_size(path, (rgb.shape[1], rgb.shape[0]))  # EXIF rotation swaps sides, limits are symmetric
    return rgb  # (H, W, 3)


def _hdr_photo(path: Path, im: Image.Image) -> np.ndarray | None:
    """An HDR photo (HEIF or AVIF whose colour tags say PQ or HLG: Lightroom's HDR export, a phone's HDR AVIF)
    tone-mapped to SDR RGB as HDR video is (:mod:`megactor_rt.hdr`), upright; None for any other image. Read as
    8-bit SDR, such a photo is pale: its white near 58 % (PQ), its colours those of BT.2020 shown as BT.709.
    HEIF comes at its own depth through pillow-heif (libheif turns it upright); AVIF, whose colour tags Pillow
    does not give, through FFmpeg (upright by its display matrix, as any video frame)."""
    tags = _photo_transfer(path, im)
    if tags is None:
        return None
    transfer, bt2020 = tags
    if im.format == "HEIF":
        import pillow_heif

        deep = np.asarray(pillow_heif.open_heif(str(path), convert_hdr_to_8bit=False))  # (H, W, 3 or 4) uint16
        if deep.dtype != np.uint16:  # (an 8-bit picture tagged PQ: its 8 bits as 16)
            deep = deep.astype(np.uint16) * 257
        rgb = tone_map(np.ascontiguousarray(deep[..., :3]), transfer, bt2020)
    else:
        rgb = next(iter_video_frames(path, 1))
    logger.info("%s is an HDR photo (%s): tone-mapped to SDR (BT.709)", path, HDR_TRANSFERS[transfer])
    return rgb


def _photo_transfer(path: Path, im: Image.Image) -> tuple[int, bool] | None:
    """An HDR photo's transfer (16: PQ, 18: HLG) and whether its primaries are BT.2020 (see :func:`_hdr_photo`);
    None for any other image."""
    if im.format == "HEIF":
        nclx = im.info.get("nclx_profile") or {}
        transfer, primaries = nclx.get("transfer_characteristics"), nclx.get("color_primaries")
    elif im.format == "AVIF":
        try:
            with av.open(str(path)) as container:
                first = _first_frame(container, container.streams.video[0])
        except (av.error.FFmpegError, OSError, IndexError):
            return None  # (FFmpeg cannot read it: Pillow's SDR reading stands)
        if first is None:
            return None
        transfer, primaries = int(first.color_trc), int(first.color_primaries)
    else:
        return None
    return (transfer, primaries != BT709_PRIMARIES) if transfer in HDR_TRANSFERS else None


def photo_hdr(path: PathLike) -> str | None:
    """"PQ" or "HLG" for an HDR photo (tone-mapped where read), else None (any other image, or none)."""
    try:
        with Image.open(path) as im:
            tags = _photo_transfer(Path(path), im)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError):
        return None
    return None if tags is None else HDR_TRANSFERS[tags[0]]


def _say_transparent(path: Path, im: Image.Image) -> None:
    """Warn where over 1 % of a portrait is transparent (a cut-out on a transparent background): its alpha is
    dropped, as upstream drops it, so what lies under it (often black) is its background."""
    alpha = np.asarray(im.convert("RGBA").getchannel("A"))
    share = float((alpha < 255).mean())
    if share > 0.01:
        logger.warning("%s: %.0f %% of the portrait is transparent; its alpha is dropped (as the original model's "
                       "code drops it), so the colour stored under it (often black) is its background: put the "
                       "portrait on the background you want first", path, 100 * share)


VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"})


def read_portrait(path: PathLike) -> np.ndarray:
    """The portrait as RGB: a still image (:func:`read_image`), or the first frame of a video, as upstream's
    ``eval.py`` takes it (files ending in .mp4, .mov, .m4v, .mkv, .webm, .avi, and any other file that is no
    image but FFmpeg reads as a video: .ts, .3gp, .flv, ...; an animated GIF gives its first frame through
    Pillow either way).

    Returns:
        ``(H, W, 3)`` uint8 RGB array.

    Raises:
        InputError: missing/unreadable file, no decodable frame, or a side outside 64..8192 px.
    """
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        try:
            return read_image(path, say_transparent=True)
        except InputError:
            if not path.is_file() or not _has_video(path):  # not a video under another name (.ts, .3gp, .flv):
                raise  # the image error stands
    require_file(path, "video")
    frame = next(iter_video_frames(path, 1), None)
    if frame is None:  # iter_video_frames raises on a file without frames; this is only a safety net
        raise InputError(f"{path}: no decodable video frame for the portrait")
    _check_image_size(path, (frame.shape[1], frame.shape[0]))
    return frame


def _has_video(path: Path) -> bool:
    """Whether FFmpeg reads ``path`` as a video (not as a still image: its image demuxers) with a frame size."""
    try:
        with av.open(str(path)) as container:
            if _still_image_format(container):
                return False
            return any(v.codec_context.width for v in container.streams.video)
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError):
        return False


def _still_image_format(container: av.container.InputContainer) -> bool:
    """Whether FFmpeg opened the file with one of its image demuxers (a still picture, not a video)."""
    name = container.format.name
    return name == "image2" or name.endswith("_pipe")


# the major brands of HEIF and AVIF files that hold a still picture (a phone's photo; "avis", "msf1": sequences)
_STILL_BRANDS = frozenset({"mif1", "mif2", "heic", "heix", "heim", "heis", "avif"})


def _still_picture(container: av.container.InputContainer) -> bool:
    """Whether the file is a single picture: one FFmpeg reads with its image demuxers, or a HEIF or AVIF photo,
    which it reads as a one-frame video (a portrait may be such, read_portrait; a driver may not)."""
    brand = str((container.metadata or {}).get("major_brand", "")).strip().lower()
    return _still_image_format(container) or (container.format.name.startswith("mov") and brand in _STILL_BRANDS)


@lru_cache(maxsize=1)
def register_heif() -> bool:
    """Teach Pillow HEIC/HEIF (iPhones' photos) through pillow-heif, once; False where it is not installed (FFmpeg
    then reads such a photo as a one-frame video where it can). libheif applies the photo's rotation and
    pillow-heif clears its EXIF orientation, so it is not applied twice."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        logger.debug("pillow-heif is not installed: HEIC photos are read through FFmpeg where it can")
        return False
    register_heif_opener()
    return True


def is_animated_webp(path: PathLike) -> bool:
    """Whether ``path`` is an animated WebP (FFmpeg decodes still WebP images only; Pillow reads the frames), by its
    content, under any name; False for anything but a regular file (a pipe is not read here)."""
    if not os.path.isfile(path):
        return False
    try:
        with Image.open(path) as im:
            return im.format == "WEBP" and bool(getattr(im, "is_animated", False))
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        pass
    try:  # one Pillow cannot open (cut off: a partial download) says so in its header: VP8X with the animation flag
        with open(path, "rb") as f:
            head = f.read(21)
    except OSError:
        return False
    return len(head) == 21 and head[:4] == b"RIFF" and head[8:16] == b"WEBPVP8X" and bool(head[20] & 0x02)


def _file_version(path: Path) -> tuple[int, int]:
    """``(mtime_ns, size)``: with the path, the key of what is cached about a file (another version is read
    again).

    Raises:
        OSError: the file cannot be looked at.
    """
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=8)
def _webp_durations(path: Path, mtime_ns: int, size: int) -> tuple[int, ...]:
    """Each frame's display time (ms) of an animated WebP (Pillow decodes every frame to tell; cached per file
    version, :func:`_file_version`)."""
    durations = []
    with Image.open(path) as im:
        _check_image_size(path, im.size)
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            im.load()  # (Pillow sets a frame's duration when it decodes it)
            durations.append(int(im.info.get("duration", 0) or 0))
    return tuple(durations)


# an animated WebP frame without a display time is shown for this long (as browsers do)
WEBP_DEFAULT_MS = 100


class AnimatedWebP(LazyFrames):
    """The frames of an animated WebP (a meme as Giphy or a browser saves it), on a constant-rate grid: the rate
    of its most common display time, each frame repeated to fill its own (a pause is repeated frames, as for a
    GIF). Frames are decoded by Pillow when asked for (a pass reads them in order), RGB, the alpha dropped.

    Raises:
        InputError: not readable as an animated WebP, or a side outside 64..8192 px.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        require_file(self.path, "driver")
        try:
            durations = _webp_durations(self.path, *_file_version(self.path))
        except InputError:
            raise
        except Image.DecompressionBombError as exc:  # (a canvas over Pillow's limit: was "corrupt or cut off")
            raise image_too_large(self.path, exc) from exc
        except (OSError, ValueError, EOFError, UnidentifiedImageError) as exc:
            raise InputError(f"{self.path}: not a readable animated WebP: corrupt or cut off ({exc})") from exc
        shown = [d if d > 0 else WEBP_DEFAULT_MS for d in durations]
        self.durations_ms = shown  # each stored frame's display time
        base = max(sorted(set(shown)), key=shown.count)  # the most common display time (a tie: the shortest)
        self.fps = Fraction(1000, base)
        self._source = [i for i, d in enumerate(shown) for _ in range(max(1, round(d / base)))]
        self._open = threading.local()  # each reading thread its own decoder

    def __len__(self) -> int:
        return len(self._source)

    def _read(self, k: int) -> np.ndarray:
        im = getattr(self._open, "image", None)
        if im is None:
            im = self._open.image = Image.open(self.path)
        try:
            im.seek(self._source[k])
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"{self.path}: frame {self._source[k]} of the animated WebP cannot be decoded ({exc})"
                             ) from exc


def image_to_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image as :func:`read_image` reads a file: upright by its EXIF orientation, RGB (see
    :func:`_to_rgb`), ``(H, W, 3)`` uint8.

    Raises:
        ValueError: its EXIF block is cut short (Pillow's own ``struct.error``)."""
    return np.asarray(_to_rgb(exif_upright(im)), dtype=np.uint8).copy()


def exif_upright(im: Image.Image) -> Image.Image:
    """``ImageOps.exif_transpose``, with an EXIF block cut short (Pillow raises ``struct.error`` reading it: a PNG's
    eXIf chunk truncated by an editor) as a ValueError naming it.

    Raises:
        ValueError: that."""
    try:
        return ImageOps.exif_transpose(im)
    except struct.error as exc:
        raise ValueError(f"its EXIF data is cut short: {exc}") from exc


def _to_rgb(im: Image.Image) -> Image.Image:
    """``convert("RGB")``, except that greyscale of more than 8 bits is scaled to 8 bits instead of clipped to
    white (see :func:`grey_to_uint8`)."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = Image.fromarray(grey_to_uint8(im), "L")
    return im.convert("RGB")


def grey_to_uint8(im: Image.Image) -> np.ndarray:
    """A greyscale image of more than 8 bits as ``(H, W)`` uint8: 16-bit (``I;16*``) over 0..65535; 32-bit
    integer (``I``, which 16-bit PNGs may also open as) over 0..65535 where any value exceeds 255, else as it
    is; floating point (``F``) over 0..1 where nothing exceeds 1.5 (overshoot from resampling is clipped; a
    0..255 picture has brighter pixels), else over 0..255."""
    grey = np.nan_to_num(np.asarray(im).astype(np.float64))  # (H, W)
    if im.mode.startswith("I;16") or (im.mode == "I" and grey.max() > 255):
        grey = grey * (255 / 65535)
    elif im.mode == "F" and grey.max() <= 1.5:
        grey = grey * 255
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def _check_image_size(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InputError(f"{path}: image is {width}x{height} px; each side must be at least {MIN_IMAGE_SIDE} px")
    if max(width, height) > MAX_IMAGE_SIDE:  # (a phone's 64, 108 or 200 MP photo: 9248 to 16320 px wide)
        raise InputError(f"{path}: image is {width}x{height} px; each side must be at most {MAX_IMAGE_SIDE} px (scale "
                         "it down first, to 4096 px on its longer side say: the crop around the face is scaled to "
                         "the model's 512 px anyway)")


def _check_picture_header(path: Path) -> None:
    """Where FFmpeg gives a picture (a GIF, a PNG) no frame size, as it does over its own limit (some 16384 px
    square), an InputError saying it is too large where Pillow reads so in its header (was: "no frame size
    (corrupt header?)"); nothing where Pillow does not read it."""
    try:
        with Image.open(path) as im:
            size = im.size
    except Image.DecompressionBombError as exc:
        raise image_too_large(path, exc) from exc
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError):
        return
    _check_image_size(path, size)


def image_too_large(path: Path, exc: Image.DecompressionBombError) -> InputError:
    """The error for an image over Pillow's decompression bomb limit (twice ``Image.MAX_IMAGE_PIXELS``), which Pillow
    refuses as it opens it, before its sides can be checked (was: "not a readable image", or an unexpected error)."""
    count = next((word for word in str(exc).replace("(", " ").split() if word.isdigit()), None)  # "Image size (N
    pixels = f" ({int(count):,} pixels)" if count else ""  # pixels) exceeds limit of M pixels, could be ..."
    return InputError(f"{path}: image is too large to read{pixels}; each side must be at most {MAX_IMAGE_SIDE} px "
                      "(scale it down first, to 4096 px on its longer side say)")


def _backslash_hint(path: Path) -> str:
    """Where ``path`` names its folders with backslashes (a jobs file written on Windows) and the same path with
    slashes exists: a hint saying so (a backslash is a letter of a file's name here)."""
    if os.sep == "\\" or "\\" not in str(path):
        return ""
    slashes = Path(str(path).replace("\\", "/"))
    return f" (its folders are separated by backslashes, as on Windows; write {slashes}, which exists)" \
        if slashes.exists() else ""


def require_file(path: Path, what: str) -> None:
    """An InputError naming ``path`` unless it is a readable regular file (``what``: its role, for the message)."""
    if not path.exists():
        raise InputError(f"{path}: {what} file does not exist{_backslash_hint(path)}")
    if not path.is_file():
        raise InputError(f"{path}: {what} path is not a regular file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: {what} file is not readable (permission denied)")


def require_content(path: Path, what: str) -> None:
    """An InputError naming ``path`` where it is an empty file (a copy or download that failed: every reader says
    only "not a readable" or "Invalid data" of it), before it is parsed."""
    try:
        empty = path.stat().st_size == 0
    except OSError:
        return  # (the reading that follows says why)
    if empty:
        raise InputError(f"{path}: the {what} file is empty (0 bytes: a copy or download that failed?)")


# ---------------------------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns from a container header (and the first frame's display matrix).

    Attributes:
        path: the probed file.
        width: frame width in pixels, upright (after the display matrix, as :func:`iter_video_frames`
            yields the frames).
        height: frame height in pixels, upright.
        fps: the container's average frame rate, exact.
        num_frames: frame count from the header, or None where the container does not record it.
        has_audio: whether the file has at least one audio stream.
        duration_s: duration in seconds (video stream, else container), or None if unknown.
        start_s: where the first decodable frame is on the container's clock, seconds: where the frame grid
            of :func:`iter_video_frames` starts (the audio stream may start elsewhere, e.g. in MPEG-TS or
            screen recordings: :class:`VideoWriter`'s ``video_start``; a cut MPEG-TS may start its video
            stream at frames that cannot be decoded).
        variable_rate: the header's average frame rate differs from its nominal one by over 1 % (a variable
            frame rate, which :func:`iter_video_frames` puts on a constant-rate grid by timestamp; some
            containers, e.g. Matroska, do not tell).
        still_image: the file is a single picture (PNG, JPEG, ... read through FFmpeg's image demuxers, or a HEIC or
            AVIF photo), not a video.
        hdr: "HLG" or "PQ" for HDR video (its frames are tone-mapped to SDR), else None.
        stream: the video stream read, "#0 (1280x720)" (its index in the file and coded size).
        other_streams: the file's other video streams (cover pictures aside), each as ``stream``, which are not
            read (a file of several: a camera's second angle, a preview; the one read is the one FFmpeg chooses,
            its default one where a stream is marked so).
    """

    path: Path
    width: int
    height: int
    fps: Fraction
    num_frames: int | None
    has_audio: bool
    duration_s: float | None
    start_s: Fraction = Fraction(0)
    variable_rate: bool = False
    still_image: bool = False
    hdr: str | None = None
    stream: str = ""
    other_streams: tuple[str, ...] = ()


def _stream_name(stream: av.video.stream.VideoStream) -> str:
    """``#1 (1920x1080)``: a video stream's index in its file and coded size."""
    return f"#{stream.index} ({stream.codec_context.width}x{stream.codec_context.height})"


def _open_input(path: Path, what: str = "video") -> av.container.InputContainer:
    require_file(path, what)
    require_content(path, what)
    try:
        return av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        # FFmpeg's errors read "[Errno 1094995529] Invalid data found when processing input: 'x.txt'": keep the words
        reason = getattr(exc, "strerror", None) or str(exc)
        cut = iso_cut_off(path)  # (an MP4 cut before its index: FFmpeg says only "Invalid data")
        if cut is not None:
            raise _cut_off(path, what, cut, reason) from exc
        raise InputError(f"{path}: not a readable {what} file ({reason})") from exc


def _cut_off(path: Path, what: str, cut: str, reason: str) -> InputError:
    """The error of an MP4/MOV that :func:`iso_cut_off` finds ``cut`` off, FFmpeg saying ``reason``."""
    return InputError(f"{path}: not a readable {what} file: the MP4/MOV is cut off ({cut}: a partial download or "
                      f"copy, or a recording that was not finished; {reason})")


# the top-level boxes an MP4 or MOV (ISO BMFF, QuickTime) file begins with
_ISO_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"})


def iso_cut_off(path: PathLike) -> str | None:
    """How an MP4/MOV/M4V/3GP file (ISO BMFF: a sequence of boxes, each a 32-bit size and a four-letter type) is
    cut off: a top-level box that runs past the end of the file (a partial download: the frames counted in its
    header are not all there), or no index (``moov`` box: a recording whose writer stopped before it wrote it, or a
    download cut before it; FFmpeg then reads nothing); None where it is whole, or is no such file (HEIF/AVIF
    photos have a ``meta`` box instead of an index). Reads the boxes' headers only."""
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            pos, seen = 0, set()
            while pos < end:
                f.seek(pos)
                head = f.read(16)
                kind = head[4:8]
                if len(head) < 8 or not (kind.isalnum() or kind in (b"\xa9too", b"uuid")):
                    if pos == 0:
                        return None
                    break  # (padding or other bytes after the last box: not a box)
                if pos == 0 and kind not in _ISO_FIRST_BOXES:
                    return None
                size = int.from_bytes(head[:4], "big")
                if size == 1 and len(head) == 16:  # a 64-bit size follows the type
                    size = int.from_bytes(head[8:16], "big")
                elif size == 0:  # the box runs to the end of the file
                    size = end - pos
                if size < 8:
                    return None  # (no box: not an ISO BMFF file, or one broken otherwise; FFmpeg says what it can)
                seen.add(kind)
                if pos + size > end:
                    short = f"it ends {pos + size - end} bytes short of the end of its {kind.decode()} box"
                    return short if b"moov" in seen else f"{short}, before its index (moov box)"
                pos += size
    except OSError:
        return None
    if seen and b"moov" not in seen and b"meta" not in seen:
        return "it has no index, no moov box"
    return None


def check_sound(audio: object, start: float | str | None = None) -> tuple[Path | None, float]:
    """The result's sound from another file (``animate_to_file(audio=PATH, audio_start=...)``, ``--audio``,
    ``--audio-start``), checked before any work: the file, and where in it (seconds) the sound begins; ``(None,
    0.0)`` where ``audio`` is no file (True: the driver's sound; False: none).

    Raises:
        InputError: a start without an audio file, a start that is no time >= 0, or a file that is missing,
            unreadable, without audio, or whose sound ends at or before the start.
    """
    from megactor_rt.config import time_seconds

    if not isinstance(audio, (str, os.PathLike)):
        if start is not None:
            raise InputError("audio_start (--audio-start) is where in an audio file (audio=PATH, --audio FILE) the "
                             "result's sound begins; the driver's own audio begins with its frames (start=, --start)")
        return None, 0.0
    try:
        from_s = 0.0 if start is None else time_seconds("audio_start (--audio-start)", start)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if not (math.isfinite(from_s) and from_s >= 0):
        raise InputError(f"audio_start (--audio-start) must be a finite time >= 0 seconds, got {start}")
    return _check_audio_file(Path(audio), from_s), from_s


def _check_audio_file(path: Path, start: float) -> Path:
    """``path`` has an audio stream PyAV can read, with sound after ``start`` seconds where its length is known."""
    with _open_input(path, what="audio") as container:
        if not container.streams.audio:
            raise InputError(f"{path}: has no audio stream (given for the result's sound)")
        stream = sound_stream(container)
        length = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else \
            (container.duration / av.time_base if container.duration else None)
        if not _holds_sound(path, container, stream):  # (was: a result without sound, said at -v only)
            raise InputError(f"{path}: its audio stream holds no sound (no samples: a recording stopped at once, a "
                             "failed export?); given for the result's sound, pass a file with sound, or --no-audio")
    if start and length is not None and start >= length:
        raise InputError(f"{path}: its sound is {length:.1f} s long; the audio start ({start:g} s, --audio-start) is "
                         "at or past its end")
    return path


def _holds_sound(path: Path, container: av.container.InputContainer, stream: av.audio.stream.AudioStream) -> bool:
    """Whether an audio stream has a packet of sound (a WAV of no samples has none, its header no length to tell
    it by); reads up to its first such packet, from the start (``container`` is then read on from there).

    Raises:
        InputError: FFmpeg cannot read its packets.
    """
    try:
        return any(packet.size for packet in container.demux(stream))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"{path}: its audio cannot be read ({exc})") from exc


def _display_size(stream: av.video.stream.VideoStream) -> tuple[int, int]:
    """The frame size players show: the coded width scaled by the sample aspect ratio where pixels are not
    square (DV and HDV camcorders, anamorphic DVD rips: 1440x1080 shown as 1920x1080), the height kept. Frames
    are scaled to it, so faces keep their shape (was, until 2026-11-27: the coded size, faces squeezed)."""
    width, height = stream.codec_context.width, stream.codec_context.height
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio  # None or 0/1: unknown
    if not sar or sar <= 0 or sar == 1:
        return width, height
    if not Fraction(1, 4) <= sar <= 4:  # no real footage has such pixels: a broken header, read as square
        logger.warning("ignoring the video's sample aspect ratio %s (pixels that wide or narrow are a broken "
                       "header); its frames are taken as square-pixel %dx%d", sar, width, height)
        return width, height
    return max(1, round(width * sar)), height


def _stream_fps(path: Path, stream: av.video.stream.VideoStream) -> Fraction:
    """The rate of a stream's frame grid (and of the result): its nominal rate where that is at most twice
    the average (and at most 240 fps), else the average, else a guess. A constant-rate MP4 whose last sample is
    short or long averages, say, 30.19 or 20 fps over 30 fps frames, and a phone recording that dips to 24 fps
    in low light averages below its 30; a grid at the average would drop frames and show an odd rate. A nominal
    rate far above the average (a static screen recording) would repeat most frames, so the average is used, unless
    most of its frames do come at it (:func:`_frames_at_rate`: a recording that freezes for seconds, whose average
    the freeze pulls down; the average dropped most frames of its motion).
    A nominal rate 1.5 to 2.5 times the average may be FFmpeg's misreading of jittered timestamps, at which
    nearly every frame would repeat (or, above twice the average, an odd rate like 29.997 fps): where the
    timestamps show the frames mostly coming at half of it or slower (:func:`_frames_at_half_rate`), the grid
    is at half the nominal rate. A GIF's rate is its frames over its duration where FFmpeg gives that (below)."""
    avg, base = stream.average_rate, stream.base_rate
    gif = _gif_rate(path, stream)
    if gif is not None:
        return gif
    if avg and base and base <= 240:
        nominal = Fraction(base.numerator, base.denominator)
        if 1.5 <= base / avg <= 2.5 and _frames_at_half_rate(path, stream.index, stream.time_base, nominal):
            return nominal / 2
        if 0.99 <= base / avg <= 2 or (base / avg > 2 and _frames_at_rate(path, stream, nominal)):
            return nominal
    for rate in (avg, stream.guessed_rate, base):
        if rate:
            return Fraction(rate.numerator, rate.denominator)
    raise InputError(f"{path}: the video stream has no usable frame rate")


def _gif_rate(path: Path, stream: av.video.stream.VideoStream) -> Fraction | None:
    """A GIF's (or animated PNG's) frame rate: its frames over its duration (or the whole number within 0.5 % of
    that: 30, not 4700/157), else the lowest of the rate of its most common delay (as an animated WebP's) and
    FFmpeg's nominal and average rate, whichever is first to put each of its first frames' timestamps on a step
    of its own on the reader's grid (:func:`_grid_step`), so no frame is dropped. GIF frame delays are whole
    hundredths of a second, so a 30 fps GIF steps 3, 3, 4, ... hundredths: its average rate may come out as
    100/3 fps, on whose grid every tenth frame would repeat (and the work grow by as much), its mean rate is 30.
    A GIF that holds a frame (a pause at the end, or between its frames) keeps the rate of its other frames, the
    pause then repeats a frame: 40 ms frames with pauses of 200 and 500 ms are read at 25 fps (FFmpeg's nominal
    50 fps computed each frame twice). None for other codecs, or where no rate fits (then the rules for any video
    apply)."""
    if stream.codec_context.name not in ("gif", "apng") or stream.time_base is None:  # (an animated PNG's delays
        return None  # are a GIF's: its pauses made it read at its average rate, dropping frames between them)
    times = _stream_times(path, stream)
    if times is None:
        return None
    others = {Fraction(r.numerator, r.denominator) for r in (stream.base_rate, stream.average_rate) if r}
    delays = [b - a for a, b in itertools.pairwise(times) if b > a]
    if delays:
        others.add(1 / max(sorted(set(delays)), key=delays.count))  # the most common delay (a tie: the shortest)
    candidates = sorted(others)
    if stream.frames and stream.duration:
        mean = Fraction(stream.frames) / (stream.duration * stream.time_base)
        whole = Fraction(round(mean))
        candidates.insert(0, whole if whole and abs(whole / mean - 1) <= Fraction(1, 200) else mean)
    for rate in (r for r in candidates if r > 0):
        steps = [_grid_step(t * rate) for t in times]
        if len(set(steps)) == len(steps):
            return rate
    return None


def _grid_step(position: Fraction) -> int:
    """The step of the reader's grid a frame ``position`` steps after the first falls on: ``floor(position +
    1/2)``, halves up (:class:`_FrameClock`; Python's round() takes halves to the even step, which a check for
    frames sharing a step must not)."""
    return math.floor(position + Fraction(1, 2))


def _stream_times(path: Path, stream: av.video.stream.VideoStream) -> tuple[Fraction, ...] | None:
    """:func:`_packet_times` of ``stream`` in the file's current version; None where the file cannot be looked at
    or the stream has no time base."""
    if stream.time_base is None:
        return None
    try:
        version = _file_version(path)
    except OSError:
        return None
    return _packet_times(str(path), *version, stream.index, stream.time_base)


@lru_cache(maxsize=64)
def _packet_times(path: str, mtime_ns: int, size: int, index: int, time_base: Fraction) -> tuple[Fraction, ...]:
    """The times (s, from the first) of a stream's first packets, sorted; () where they cannot be read."""
    del mtime_ns, size  # in the cache key: another version of the file is read again
    try:
        with av.open(path, mode="r") as container:
            stream = next(s for s in container.streams if s.index == index)
            pts = sorted({p.pts for p in itertools.islice(container.demux(stream), _RATE_CHECK_PACKETS)
                          if p.pts is not None and p.size})
    except (av.error.FFmpegError, OSError, ValueError, StopIteration):
        return ()
    return tuple((p - pts[0]) * time_base for p in pts)  # () where no packet has a time


# How many of a video's first packets _frames_at_half_rate reads (their timestamps; nothing is decoded).
_RATE_CHECK_PACKETS = 1200


def _frames_at_half_rate(path: Path, index: int, time_base: Fraction | None, nominal: Fraction) -> bool:
    """Whether the stream's first frames mostly come two or more nominal frame times apart: at most a third of
    the steps between their timestamps (sorted) are under 1.5 frame times. Such timestamps are jittered or
    vsync-locked capture (33, 50, 17 ms at 30 fps on a 60 Hz clock), for which FFmpeg reads the nominal rate
    from the shortest steps; a phone clip that runs at the nominal rate half of the time keeps it. Cached per
    file version (and logged once), as every pass over a driver asks it."""
    if time_base is None:
        return False
    try:
        version = _file_version(path)
    except OSError:
        return False
    return _mostly_slow(str(path), *version, index, time_base, nominal)


@lru_cache(maxsize=64)
def _mostly_slow(path: str, mtime_ns: int, size: int, index: int, time_base: Fraction, nominal: Fraction) -> bool:
    times = _packet_times(path, mtime_ns, size, index, time_base)  # cached per file version too
    if len(times) < 8:  # too few to tell
        return False
    fast = sum((b - a) * nominal < Fraction(3, 2) for a, b in itertools.pairwise(times))
    if 3 * fast > len(times) - 1:
        return False
    logger.info("%s: the header's %.3f fps is twice the rate of most of its frames' timestamps; read at %.3f fps",
                path, float(nominal), float(nominal / 2))
    return True


def _frames_at_rate(path: Path, stream: av.video.stream.VideoStream, nominal: Fraction) -> bool:
    """Whether most steps between the stream's first frames' timestamps (:func:`_stream_times`) are under 1.5
    ``nominal`` frame times: frames that come at the nominal rate, the average pulled down by gaps (a picture that
    freezes), not a static screen recording's rare frames."""
    # (a short clip's few steps tell too, a sticker's six frames: a wrong yes repeats frames, a wrong no drops them)
    times = _stream_times(path, stream) or ()
    fast = sum((b - a) * nominal < Fraction(3, 2) for a, b in itertools.pairwise(times))
    return 2 * fast > len(times) - 1 > 0


def _gif_variable(path: Path, stream: av.video.stream.VideoStream, fps: Fraction) -> bool:
    """Whether a GIF's frames (the first ones) leave steps empty at ``fps``: a pause, or delays of several
    lengths beyond the hundredths' rounding (a 30 fps GIF's 3, 3, 4 hundredths fill every step: not variable)."""
    times = _stream_times(path, stream)
    if times is None:
        return False
    return _steps_vary(times, fps)


def _steps_vary(times: Sequence[Fraction], fps: Fraction) -> bool:
    """Whether frames at ``times`` (seconds from the first) leave a step of ``fps`` empty or share one."""
    return [_grid_step(t * fps) for t in times] != list(range(len(times)))


def timestamps_vary(path: PathLike, fps: Fraction) -> bool:
    """Whether a Matroska/WebM video's first frames (their timestamps, up to 1200) leave steps of ``fps`` empty or
    share one: a variable rate, which those headers do not tell (FFmpeg gives their nominal rate as the average,
    so :attr:`VideoInfo.variable_rate` is False); False for other containers, whose header tells.

    Raises:
        InputError: missing or unreadable file, no video stream.
    """
    path = Path(path)
    with _open_input(path) as container:
        if "matroska" not in container.format.name:
            return False
        times = _stream_times(path, _video_stream(path, container))
    if not times:
        return False
    # (the packets are read in decoding order: the last ones read may be of frames shown after some not read yet,
    # B-frames, a step that looks empty; a cut file's likewise: those are left out)
    return _steps_vary(times[:-_REORDER_DEPTH] if len(times) > 2 * _REORDER_DEPTH else times, fps)


_REORDER_DEPTH = 16  # the most frames a codec shows before one stored ahead of them (H.264/HEVC's most: 16)


def _variable(stream: av.video.stream.VideoStream) -> bool:
    """Whether the header's average rate differs from its nominal one by over 1 %."""
    return bool(stream.average_rate and stream.base_rate and abs(stream.average_rate / stream.base_rate - 1) > 0.01)


def probe_video(path: PathLike) -> VideoInfo:
    """Read a video's header: size, exact frame rate, frame count, audio presence, duration (and its first
    frame, whose display matrix says whether the upright picture swaps width and height).

    Args:
        path: any container/codec FFmpeg (PyAV) can demux.

    Returns:
        The :class:`VideoInfo`.

    Raises:
        InputError: missing or unreadable file, or no video stream in it.
    """
    path = Path(path)
    with _open_input(path) as container:
        stream = _video_stream(path, container)
        if not stream.codec_context.width or not stream.codec_context.height:
            if is_animated_webp(path):  # FFmpeg's WebP decoder reads still images only (under any name: a .gif)
                raise InputError(f"{path}: an animated WebP, which FFmpeg cannot decode (a driver reads it through "
                                 "Pillow: megactor_rt.media.AnimatedWebP)")
            _check_picture_header(path)  # (a GIF or an image over FFmpeg's size limit: said as too large)
            raise InputError(f"{path}: the video stream has no frame size (corrupt header?)")
        duration_s: float | None = None
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
            if container.format.name.startswith("matroska") and container.start_time and container.start_time > 0:
                # (a Matroska segment's duration counts from 0, not from its first timestamp: a clip cut at 10 s
                # of 0.4 s read as 10.4 s, its frames estimated 26 times over)
                duration_s = max(container.duration - container.start_time, 0) / av.time_base
        width, height = _display_size(stream)
        first = _first_frame(container, stream)
        if first is not None and _frame_orientation(path, first).swaps_sides:
            width, height = height, width
        hdr = HDR_TRANSFERS.get(int(first.color_trc)) if first is not None else None
        if hdr is not None:
            logger.info("%s is HDR video (%s): its frames are tone-mapped to SDR (BT.709)", path, hdr)
        elif first is not None and _hdr_untold(first) and _first_word(("untold HDR", path, *_file_version(path))):
            logger.warning("%s: 10-bit video with BT.2020 colours but no transfer tag, read as SDR: if it looks "
                           "washed out (grey whites, pale colours), it is HDR whose tag an editor dropped; tag it "
                           "(ffmpeg -i IN -c copy -bsf:v hevc_metadata=transfer_characteristics=18 OUT.mov for an "
                           "iPhone's HLG, 16 for PQ, h264_metadata for H.264) and pass that", path)
        start_s = Fraction(stream.start_time * stream.time_base) if stream.start_time and stream.time_base \
            else Fraction(0)
        if first is not None and first.pts is not None and first.time_base is not None:
            start_s = Fraction(first.pts * first.time_base)  # where the frame grid starts (a cut MPEG-TS may
            # start its stream at a frame that cannot be decoded without the ones before it)
        fps = _stream_fps(path, stream)
        return VideoInfo(
            path=path,
            width=width,
            height=height,
            fps=fps,
            num_frames=stream.frames if stream.frames > 0 else None,
            has_audio=bool(container.streams.audio),
            duration_s=duration_s,
            start_s=start_s,
            variable_rate=_variable(stream) if stream.codec_context.name != "gif" else _gif_variable(path, stream, fps),
            still_image=_still_picture(container),
            hdr=hdr,
            stream=_stream_name(stream),
            other_streams=tuple(_stream_name(v) for v in picture_streams(container) if v is not stream),
        )


# ---------------------------------------------------------------------------------------------- orientation


@dataclass(frozen=True)
class _Orientation:
    """How to turn a decoded frame upright: an optional transpose, then optional flips (numpy views).

    ``transpose`` swaps rows and columns (FFmpeg's ``transpose=cclock_flip``); ``hflip``/``vflip`` mirror
    the columns/rows after it. Every quarter turn and mirror is one such combination."""

    transpose: bool = False
    hflip: bool = False
    vflip: bool = False

    @property
    def swaps_sides(self) -> bool:
        return self.transpose

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        if not (self.transpose or self.hflip or self.vflip):
            return rgb
        out = rgb.transpose(1, 0, 2) if self.transpose else rgb
        if self.hflip:
            out = out[:, ::-1]
        if self.vflip:
            out = out[::-1]
        return np.ascontiguousarray(out)


_UPRIGHT = _Orientation()
# FFmpeg's transpose filter directions as transpose + flips of the transposed picture.
_CLOCK = _Orientation(transpose=True, hflip=True)        # 90 degrees clockwise
_CCLOCK = _Orientation(transpose=True, vflip=True)       # 90 degrees counter-clockwise
_CCLOCK_FLIP = _Orientation(transpose=True)              # counter-clockwise, then vertical flip
_CLOCK_FLIP = _Orientation(transpose=True, hflip=True, vflip=True)  # clockwise, then vertical flip


def display_orientation(matrix: np.ndarray, path: Path | None = None) -> _Orientation:
    """The upright transform of a display matrix (FFmpeg's ``AV_FRAME_DATA_DISPLAYMATRIX``: 9 int32, 16.16
    fixed point for the 2x2 part), decided exactly as the ffmpeg command line's autorotation does: the angle
    is ``-av_display_rotation_get`` in [0, 360); 90 -> clockwise turn (or a transpose when the matrix also
    mirrors), 180 -> horizontal and/or vertical flip, 270 -> counter-clockwise turn (or the clockwise
    flip), 0 -> vertical flip when the matrix mirrors rows. Any other angle is logged and ignored (the
    frame is used as decoded)."""
    m = [float(v) / 65536.0 for v in np.asarray(matrix, dtype=np.int64).reshape(9)]
    scale0, scale1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if scale0 == 0.0 or scale1 == 0.0:
        logger.warning("%s: singular display matrix ignored", path or "video")
        return _UPRIGHT
    theta = float(round(math.degrees(math.atan2(m[1] / scale1, m[0] / scale0))))  # = -rotation_get
    theta -= 360.0 * math.floor(theta / 360.0 + 0.9 / 360.0)
    if abs(theta - 90.0) < 1.0:
        return _CCLOCK_FLIP if m[3] > 0 else _CLOCK
    if abs(theta - 180.0) < 1.0:
        return _Orientation(hflip=m[0] < 0, vflip=m[4] < 0)
    if abs(theta - 270.0) < 1.0:
        return _CLOCK_FLIP if m[3] < 0 else _CCLOCK
    if abs(theta) > 1.0:
        logger.warning("%s: display rotation of %.0f degrees is not a quarter turn; frames are used as "
                       "decoded", path or "video", theta)
        return _UPRIGHT
    return _Orientation(vflip=m[4] < 0)


def _frame_orientation(path: Path, frame: av.VideoFrame) -> _Orientation:
    try:
        entries = list(cast(Any, frame.side_data))  # SideData entries (the stubs say str keys)
    except ValueError:  # side data of a type this PyAV does not know: FFmpeg 8's EXIF (HEIF photos), view ids
        return _rotation_only(path, frame)  # (MV-HEVC), ...; PyAV 18.1 fails to list any then
    for sd in entries:
        if str(sd.type).endswith("DISPLAYMATRIX") and len(bytes(sd)) >= 36:
            return display_orientation(np.frombuffer(bytes(sd), dtype=np.int32, count=9), path)
    return _UPRIGHT


def _rotation_only(path: Path, frame: av.VideoFrame) -> _Orientation:
    """The frame's display rotation as PyAV reads it without listing its side data (``VideoFrame.rotation``,
    counter-clockwise degrees), as the display matrix of that rotation; a mirroring in the matrix is not seen."""
    angle = math.radians(float(getattr(frame, "rotation", 0) or 0))
    if angle == 0.0:
        return _UPRIGHT
    logger.debug("%s: frame side data unreadable by this PyAV; its display rotation alone is applied", path)
    c, s = round(math.cos(angle) * 65536), round(math.sin(angle) * 65536)
    return display_orientation(np.array([c, -s, 0, s, c, 0, 0, 0, 1 << 30], np.int64), path)


def _first_frame(container: av.container.InputContainer, stream: av.video.stream.VideoStream
                 ) -> av.VideoFrame | None:
    """The stream's first decodable frame (PyAV exposes the display matrix on decoded frames only), or None
    when none decodes (decoding reports that, with the file's name)."""
    try:
        return next(container.decode(stream), None)
    except (av.error.FFmpegError, OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- decoding


# A start this many frames or more into the clip is reached by seeking to the key frame before it; a nearer
# one by decoding from the beginning (a seek costs about as much as decoding a group of pictures).
SEEK_MIN_SKIP = 60
# How far before the start successive seek attempts aim, in seconds (a container that indexes key frames by
# decoding time may land on one shown after the start; then aim earlier, at most at the first frame).
_SEEK_BACK_S = (0, 2, 10)


# The driver's audio for a result that starts this far (seconds) or more into it is read from a seek to a
# second before that point (AUDIO_SEEK_MARGIN_S: a decoder's warm-up after a seek falls before it); nearer, from
# the beginning (demuxing takes about a second per 10 minutes of copied audio, decoding longer).
AUDIO_SEEK_MIN_S = Fraction(10)
AUDIO_SEEK_MARGIN_S = Fraction(1)


class _SeekFailed(Exception):
    """Seeking could not position decoding at or before the start frame; decode from the beginning."""


def _check_first_after_seek(t: Fraction, latest: Fraction, what: str) -> None:
    """The first audio packet or frame read after a seek must not start after ``latest``.

    Raises:
        _SeekFailed: it starts later (the seek overshot, so audio before it would be lost).
    """
    if t > latest:
        raise _SeekFailed(f"the first {what} after seeking is at {float(t):.2f} s")


class _FrameClock:
    """Grid slots from timestamps: slot ``floor((pts - first pts) * time_base * fps + 1/2)``, which for a
    constant-rate clip is the frame's position in decoding order, and after a seek still is. Frames without a
    timestamp take their position in decoding order (``fallback``). Halves round up, so a stretch at twice the
    grid's rate keeps every other frame evenly (Python's round() would keep 1, 3, 1, 3 frames apart)."""

    def __init__(self, stream: av.video.stream.VideoStream, fps: Fraction) -> None:
        self.time_base = stream.time_base
        self.fps = fps
        self.first_pts: int | None = None

    def position(self, pts: int) -> Fraction:
        """Where ``pts`` falls on the grid, in steps after the first frame (exact)."""
        assert self.first_pts is not None and self.time_base is not None
        return (pts - self.first_pts) * self.time_base * self.fps

    def slot_of(self, pts: int) -> int:
        return _grid_step(self.position(pts))

    def index(self, frame: av.VideoFrame, fallback: int) -> int:
        if frame.pts is None or self.time_base is None:
            return fallback
        if self.first_pts is None:
            self.first_pts = frame.pts
        return self.slot_of(frame.pts)

    def offset(self, frame: av.VideoFrame, slot: int) -> Fraction:
        """How far ``frame``'s time is from ``slot``'s, in grid steps (0 without a timestamp)."""
        if frame.pts is None or self.time_base is None or self.first_pts is None:
            return Fraction(0)
        return abs(self.position(frame.pts) - slot)

    def reanchor(self, frame: av.VideoFrame, slot: int) -> None:
        """Number the timeline from ``frame`` on so that it lands on ``slot`` (after a timestamp discontinuity)."""
        if frame.pts is not None and self.time_base is not None:
            self.first_pts = frame.pts - math.floor(Fraction(slot) / self.fps / self.time_base)

    def seek(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream, skip: int
             ) -> Iterator[av.VideoFrame]:
        """Decoded frames from a key frame at or before source frame ``skip`` (frames before that key frame
        are dropped, so none shown is decoded from a reference before the seek point).

        Raises:
            _SeekFailed: no timestamps, a demuxer that cannot seek, or no such key frame found.
        """
        if self.first_pts is None or self.time_base is None:
            raise _SeekFailed("no timestamps")
        for back in _SEEK_BACK_S:
            aim = max(Fraction(skip) / self.fps - back, Fraction(0))  # seconds after the first frame
            try:
                container.seek(self.first_pts + math.floor(aim / self.time_base), stream=stream, backward=True,
                               any_frame=False)
                frames = container.decode(stream)
                for frame in frames:
                    if frame.pts is None:
                        raise _SeekFailed("a frame without a timestamp after seeking")
                    i = self.index(frame, -1)
                    if frame.key_frame and i <= skip:
                        logger.debug("seek to frame %d: decoding from key frame %d", skip, i)
                        return itertools.chain([frame], frames)
                    if i >= skip:
                        break  # landed after the start: aim earlier
                if aim == 0:
                    break
            except (av.error.FFmpegError, OSError, ValueError) as exc:
                raise _SeekFailed(str(exc)) from exc
        raise _SeekFailed(f"no key frame before frame {skip}")


def iter_video_frames(path: PathLike, max_frames: int | None = None, *, strict: bool = True, skip: int = 0
                      ) -> Iterator[np.ndarray]:
    """Decode a video frame by frame (streaming; never holds the whole clip), on a constant-rate grid.

    Frames are placed by timestamp at the grid rate ``probe_video(path).fps`` (the nominal rate, or the average
    where that is far off: ``_stream_fps``): output frame k
    is the frame shown ``k / fps`` seconds after the first one (of the frames whose timestamps round to k on
    that grid, the nearest; a frame with none holds the one before). A constant-rate clip yields each frame
    once, in order. A variable-rate one (phone recordings) keeps its timing: a frame is repeated over a gap in
    the timestamps and one of several frames within one grid step is shown, as ``ffmpeg -fps_mode cfr`` does,
    so the result's motion stays with its audio; the last frame lasts until the stream's declared end.
    Timestamps that jump back (joined recordings) continue from the next step. Frames without timestamps are
    counted instead.

    Args:
        path: the video file.
        max_frames: stop after yielding this many frames (None: all).
        skip: start at frame ``skip`` of that grid (the frame on screen ``skip / fps`` seconds after the
            first, where the audio for it is). From :data:`SEEK_MIN_SKIP` frames on, decoding seeks to the
            key frame before it (the frames yielded are the same); nearer starts, containers that cannot
            seek and clips without timestamps decode from the beginning. Frames before the start are
            decoded but not converted to RGB.
        strict: when the stream breaks off after some frames were decoded (truncated or corrupt file,
            or fewer frames than the header announces), raise (True, default) or log a warning and stop
            (False). A file that yields no frame at all always raises. With ``max_frames`` the check
            only covers the frames actually read.

    Yields:
        ``(H, W, 3)`` uint8 RGB frames in presentation order.

    Raises:
        InputError: unreadable file, no video stream, zero frames, or (strict) a mid-stream break.
    """
    path = Path(path)
    if max_frames is not None and max_frames <= 0:
        return
    frames = _decode(path, max_frames, strict, skip, seek=skip >= SEEK_MIN_SKIP)
    try:
        first = next(frames)
    except StopIteration:
        return
    except _SeekFailed as exc:  # raised before any frame was yielded
        logger.info("%s: cannot seek to frame %d (%s); decoding from the beginning", path, skip, exc)
        frames = _decode(path, max_frames, strict, skip, seek=False)
        first = next(frames, None)  # type: ignore[arg-type]
        if first is None:
            return
    yield first
    yield from frames


# YUV -> RGB keeps swscale's fast path: its accurate one (ACCURATE_RND | FULL_CHR_H_INT) gets colours within a
# level instead of 2-3 (10-bit white 253 instead of 255) but took 10 instead of 1 ms per 1080p frame here, for
# every frame of every driver pass; the driver is greyed, and such an error does not show there
_UNSPECIFIED = 2  # AVCOL_SPC_UNSPECIFIED: a stream without a colour matrix tag
_SMPTE170M, _TV_RANGE = 6, 1  # AVCOL_SPC_SMPTE170M (BT.601), AVCOL_RANGE_MPEG: how results are converted
HD_MIN_HEIGHT = 720  # untagged streams this tall are decoded as BT.709, as players show them
# colour matrices swscale does not convert from (it fails with "Operation not supported"): read as the nearest it
# does, BT.2020 for the BT.2020 family, else as an untagged frame is (_to_rgb24), with a warning
_UNCONVERTED_MATRICES = {8: "YCgCo", 10: "BT.2020 constant luminance", 11: "SMPTE 2085",
                         12: "chromaticity-derived", 13: "chromaticity-derived constant luminance", 14: "ICtCp"}
_BT2020_LIKE = (10, 14)


def _to_rgb24(frame: av.VideoFrame, size: tuple[int, int], path: Path | None = None) -> np.ndarray:
    """A decoded frame as ``(H, W, 3)`` uint8 RGB at the stream's probed ``size`` (width, height): a frame after
    a mid-stream size change (WebRTC recordings) is scaled to it, so every frame has the size the crop was
    planned for. A frame without a colour matrix tag is BT.709 from 720 lines on (what players assume for
    HD; swscale would take BT.601), tagged ones use their tag, but those swscale does not take
    (:data:`_UNCONVERTED_MATRICES`: YCgCo, ICtCp, ...), which are read as the nearest it does, said once for
    ``path``. HDR frames (HLG, PQ) are tone-mapped to SDR (:mod:`megactor_rt.hdr`; an untagged matrix is
    BT.2020's there)."""
    kwargs: dict[str, Any] = {"format": "rgb24"}
    if (frame.width, frame.height) != size:
        kwargs["width"], kwargs["height"] = size
    transfer = int(frame.color_trc)
    matrix = int(frame.colorspace)
    if matrix in _UNCONVERTED_MATRICES:
        nearest, name = (Colorspace.BT2020, "BT.2020") if matrix in _BT2020_LIKE or transfer in HDR_TRANSFERS else \
            (Colorspace.ITU709, "BT.709") if frame.height >= HD_MIN_HEIGHT else (Colorspace.ITU601, "BT.601")
        kwargs["src_colorspace"] = nearest
        if path is not None and _first_word(("colour matrix", path, *_file_version(path))):
            logger.warning("%s: its colour matrix (%s) is one FFmpeg's converter does not take; read as %s, the "
                           "nearest (neutral tones are right; colours, and the grey a driver gives the model, may be "
                           "off)", path, _UNCONVERTED_MATRICES[matrix], name)
    if transfer in HDR_TRANSFERS:
        kwargs["format"] = "rgb48le"
        if int(frame.colorspace) == _UNSPECIFIED:
            kwargs["src_colorspace"] = Colorspace.BT2020
        return tone_map(frame.to_ndarray(**kwargs), transfer, int(frame.color_primaries) != BT709_PRIMARIES)
    if int(frame.colorspace) == _UNSPECIFIED and frame.height >= HD_MIN_HEIGHT:
        kwargs["src_colorspace"] = Colorspace.ITU709
    return frame.to_ndarray(**kwargs)


_SAID: set[tuple[object, ...]] = set()  # what was said once per file version (a driver is probed per run)


def _first_word(what: tuple[object, ...]) -> bool:
    """Whether ``what`` (a warning and the file version it is about) is said for the first time (then noted)."""
    if what in _SAID:
        return False
    _SAID.add(what)
    return True


_BT2020_PRIMARIES, _TRC_UNSPECIFIED = 9, 2  # AVCOL_PRI_BT2020, AVCOL_TRC_UNSPECIFIED


def _hdr_untold(frame: av.VideoFrame) -> bool:
    """Whether a frame looks like HDR whose transfer tag was dropped: more than 8 bits, BT.2020 primaries and no
    transfer (an iPhone's HLG clip through an editor that keeps the primaries only); read as SDR, it is pale."""
    deep = any(c.bits > 8 for c in frame.format.components)
    return deep and int(frame.color_primaries) == _BT2020_PRIMARIES and int(frame.color_trc) == _TRC_UNSPECIFIED


def picture_streams(container: av.container.InputContainer) -> list[av.video.stream.VideoStream]:
    """A file's video streams but cover pictures (an MP3's album art is a one-frame "video" stream)."""
    return [v for v in container.streams.video if not v.disposition & av.stream.Disposition.attached_pic]


def sound_stream(container: av.container.InputContainer, path: Path | None = None) -> av.audio.stream.AudioStream:
    """A file's audio stream that a result takes (its sound, :func:`probe_sound`'s): the one FFmpeg chooses, as
    players do (its default one where a stream is marked so), else the first (was: always the first, so a file whose
    first track is a silent, commentary or other-language one not marked default gave the result that sound). Where
    the file has several, the one taken is said once (``path``: the file, for that line). The file must have one.
    """
    streams = list(container.streams.audio)
    best = container.streams.best("audio")
    chosen = best if best in streams else streams[0]
    if len(streams) > 1 and path is not None and _first_word(("audio streams", path, *_file_version(path))):
        logger.warning("%s has %d audio streams: the result's sound is its stream %s, the one FFmpeg chooses (and "
                       "players play); %s not used (another one is taken once copied out alone: ffmpeg -i IN -map 0:v "
                       "-map 0:N -c copy OUT.mkv, N its number)", path, len(streams), _sound_name(chosen),
                       ", ".join(_sound_name(a) for a in streams if a is not chosen) +
                       (" is" if len(streams) == 2 else " are"))
    return chosen


def _sound_name(stream: av.audio.stream.AudioStream) -> str:
    """``#2 ("main", 2 channels)``: an audio stream's index in its file, its title where it has one, channels."""
    title = (stream.metadata or {}).get("title")
    return f"#{stream.index} ({f'{title!r}, ' if title else ''}{stream.codec_context.channels} channels)"


def probe_sound(path: PathLike) -> dict[str, Any] | None:
    """A sound file's audio stream (:func:`sound_stream`): codec, rate, channels and duration (seconds); None where
    the file has a video stream (cover pictures aside), or no sound either.

    Raises:
        InputError: no media file FFmpeg reads.
    """
    with _open_input(Path(path), what="media") as container:
        if picture_streams(container) or not container.streams.audio:
            return None
        stream = sound_stream(container)
        seconds = stream.duration * stream.time_base if stream.duration and stream.time_base else \
            container.duration / av.time_base if container.duration else None
        if seconds is None and not _holds_sound(Path(path), container, stream):
            seconds = 0  # (a WAV of no samples: "0 s", not no length at all)
        codec = stream.codec_context
        return {"codec": codec.codec.canonical_name, "sample_rate": codec.sample_rate, "channels": codec.channels,
                "duration_s": None if seconds is None else round(float(seconds), 3)}


def _video_stream(path: Path, container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The file's main video stream: FFmpeg's best one that is not a cover picture (an MP3's album art is a
    one-frame "video" stream).

    Raises:
        InputError: no video stream, or only cover pictures.
    """
    streams = picture_streams(container)
    if not streams and not container.streams.video and (cut := iso_cut_off(path)) is not None:
        # (cut inside its index: FFmpeg reads the part there as an index of no streams)
        raise _cut_off(path, "video", cut, "no video stream in what is there")
    if not streams:
        raise InputError(f"{path}: the file has no video stream" + (
            " (only a cover picture)" if container.streams.video else ""))
    best = container.streams.best("video")
    return best if best in streams else max(streams, key=lambda v: v.frames or 0)  # the first of equals


# A timestamp jump forward of more than this many seconds is logged (a joined recording; the grid keeps it).
_JUMP_WARN_S = 10


def _decode(path: Path, max_frames: int | None, strict: bool, skip: int, seek: bool) -> Iterator[np.ndarray]:
    """:func:`iter_video_frames`' generator: frames on a constant-rate grid by timestamp (see there)."""
    with _open_input(path) as container:
        stream = _video_stream(path, container)
        size = _display_size(stream)  # the probed size, as planned
        # No frame threading: it delays output, so a corrupt packet would hide the frames before it.
        frames = container.decode(stream)
        clock = _FrameClock(stream, _stream_fps(path, stream))
        decoded = 0  # frames decoded in this pass
        seeked = False
        slot = 0  # the next grid slot to yield
        held: av.VideoFrame | None = None  # the last decoded frame, on screen from slot ``held_at`` on
        held_at = 0
        held_off = Fraction(0)  # how far ``held`` is from its slot's time, in slots
        last_time: float | None = None  # the last decoded frame's presentation time, seconds
        orient: _Orientation | None = None
        repeats = 0  # frames yielded more than once
        reanchored = False

        def done() -> bool:
            return max_frames is not None and slot - skip >= max_frames

        def shown(frame: av.VideoFrame, upto: int) -> Iterator[np.ndarray]:
            """``frame`` for each slot before ``upto`` not yet yielded (from ``skip`` on, at most max_frames)."""
            nonlocal slot, orient, repeats
            slot = max(slot, skip)
            if slot >= upto or done():
                return
            if orient is None:  # the matrix is the stream's; FFmpeg attaches it to every frame
                orient = _frame_orientation(path, frame)
            rgb = orient.apply(_to_rgb24(frame, size, path))  # (H, W, 3) uint8, upright
            first = slot
            while slot < upto and not done():
                yield rgb
                slot += 1
            repeats += max(slot - first - 1, 0)

        def where() -> int:  # frames up to the last one decoded (after a seek, counted on the grid)
            return held_at + 1 if seeked else decoded

        while not done():
            try:
                frame = next(frames)
            except StopIteration:
                break
            except (av.error.FFmpegError, OSError, ValueError) as exc:
                if decoded == 0:
                    raise InputError(f"{path}: no decodable video frame ({exc}){_cut_before_a_frame(path)}") from exc
                if held is not None:  # the last frame before the break, shown once
                    yield from shown(held, held_at + 1)
                if done():
                    return  # the frames wanted all came before the break
                if strict:
                    raise CutShort(f"{path}: video is truncated or corrupt after frame {where()} ({exc})",
                                   slot - skip) from exc
                logger.warning("%s: video is truncated or corrupt after frame %d (%s); using the %d frame(s) "
                               "decoded so far", path, where(), exc, slot - skip)
                return
            decoded += 1
            at = clock.index(frame, decoded - 1)
            if seek and at < skip:
                frames, seek, seeked = clock.seek(container, stream, skip), False, True
                continue
            if held is not None and at < held_at and frame.pts is not None:
                # timestamps went back (joined MPEG-TS recordings): go on from the next slot
                logger.warning("%s: timestamps jump back at %.3f s; the frames from there follow on", path,
                               float(frame.time or 0.0))
                clock.reanchor(frame, held_at + 1)
                at, reanchored = held_at + 1, True
            elif held is not None and at - held_at > _JUMP_WARN_S * clock.fps:
                logger.warning("%s: no frame for %.1f s before %.3f s; the frame before is shown for that long",
                               path, float((at - held_at) / clock.fps), float(frame.time or 0.0))
            last_time = frame.time
            if held is not None and at > held_at:  # ``held`` was on screen until this frame's slot
                yield from shown(held, at)
            if held is None or at > held_at:
                held, held_at, held_off = frame, at, clock.offset(frame, at)
            elif (off := clock.offset(frame, at)) < held_off:  # frames on one slot (a faster stretch):
                held, held_off = frame, off  # the one nearest the slot's time
        if done():
            return  # the completeness check covers only the frames read
        ends = _reaches_the_end(stream, last_time)
        if held is not None:
            complete = ends or not _short(stream.frames, where())
            end = None if reanchored or not complete else _end_slot(stream, clock, _frame_end(held.pts, held.duration))
            yield from shown(held, max(held_at + 1, end or 0))  # the last frame until the stream ends
            if done():
                return  # as many frames as asked for: the completeness check covers only the frames read
        if 3 * repeats >= slot - skip > 0:  # a third or more repeats
            if stream.codec_context.name in ("gif", "apng"):  # an animation's pauses (a lower --fps would drop
                # frames: its rate gives each frame a step of its own, _gif_rate)
                logger.info("%s: %d of %d yielded frames repeat the one before (the animation's pauses, each "
                            "computed again)", path, repeats, slot - skip)
            else:  # the grid is finer than the frames (e.g. a clip at its nominal rate for a while, then at half of
                # it: _stream_fps keeps the nominal rate)
                logger.warning("%s: its frames come much slower than its header's %.3f fps (%d of %d yielded frames "
                               "repeat the one before, each computed again); --fps F (AnimateConfig.fps) animates "
                               "it at F fps with fewer repeats", path, float(clock.fps), repeats, slot - skip)
        if decoded == 0:
            raise InputError(f"{path}: the video stream contains no decodable frames{_cut_before_a_frame(path)}")
        if not ends:
            _check_complete(path, stream.frames, where(), strict, slot - skip)
            _check_declared_end(path, stream, last_time, strict, slot - skip)
        _check_gif_trailer(path, stream)


def _end_slot(stream: av.video.stream.VideoStream, clock: _FrameClock, last_end: int | None = None) -> int | None:
    """The grid slot at which the stream's declared end falls (its last frame is shown up to it), or None. An
    animated PNG declares none (FFmpeg gives it no stream duration): it ends where its last frame's delay does,
    ``last_end`` (that frame's timestamp plus its duration), as a GIF's declared end does (was: its last frame shown
    once, a sticker's held final pose lost)."""
    if clock.first_pts is None:
        return None
    if not stream.duration or stream.time_base is None:
        apng = stream.codec_context.name == "apng"
        return clock.slot_of(last_end) if apng and last_end is not None else None
    start = stream.start_time if stream.start_time is not None else clock.first_pts
    return clock.slot_of(start + stream.duration)


def _frame_end(pts: int | None, duration: int | None) -> int | None:
    """Where a frame (or packet) of timestamp ``pts`` and ``duration`` (the stream's time base) ends; None where
    either is unknown."""
    return pts + duration if pts is not None and duration else None


def grid_frame_count(info: VideoInfo) -> int | None:
    """How many frames :func:`iter_video_frames` yields for the video ``info`` describes (its :func:`probe_video`):
    its frames' timestamps on the reader's constant-rate grid at ``info.fps`` from its first frame, the last one
    shown until the stream's declared end. A variable-rate clip's differs from the frames it stores (a frame is
    repeated over a gap; of several within one step, one is shown). Read from its packets, nothing decoded (a
    clip whose timestamps jump back, a joined recording, may yield some more); None where they have no
    timestamps or cannot be read.

    Raises:
        InputError: missing or unreadable file, no video stream.
    """
    with _open_input(info.path) as container:
        stream = _video_stream(info.path, container)
        if stream.time_base is None:
            return None
        try:
            packets = [(p.pts, p.duration) for p in container.demux(stream) if p.size]
        except (av.error.FFmpegError, OSError, ValueError):
            return None
        pts = [t for t, _ in packets]
        if not pts or None in pts:
            return None
        clock = _FrameClock(stream, info.fps)
        clock.first_pts = math.floor(info.start_s / stream.time_base)  # (the first decoded frame's)
        last = max(clock.slot_of(t) for t in pts if t is not None)  # (none is: said to the type checker)
        last_end = _frame_end(*max(packets, key=lambda p: p[0] or 0))  # (the frame shown last)
        return max(last + 1, _end_slot(stream, clock, last_end) or 0)


def _reaches_the_end(stream: av.video.stream.VideoStream, last_time: float | None) -> bool:
    """Whether the last decoded frame is shown until the stream's declared end (within two frame times). Then
    the file is complete even where fewer frames decode than its header counts: an edit list hides some (what
    a cut on a non-key frame writes), or the rate varies. A file cut off ends early in time too."""
    end = _declared_end(stream)
    if last_time is None or end is None:
        return False
    rate = stream.average_rate or stream.guessed_rate
    frame_s = float(1 / rate) if rate else 0.0
    return last_time + 2 * frame_s >= end


def _declared_end(stream: av.video.stream.VideoStream) -> float | None:
    """Where the video stream says it ends, in seconds: its start plus its duration, or (Matroska, WebM: no frame
    count, no stream duration) its track's ``DURATION`` tag, which FFmpeg's and mkvmerge's writers set to the
    track's end; None where it says neither."""
    if stream.duration and stream.time_base is not None:
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        return start + float(stream.duration * stream.time_base)
    from megactor_rt.config import parse_time

    tag = next((v for k, v in (stream.metadata or {}).items() if k.upper() == "DURATION"), None)
    try:
        return parse_time(tag) if tag else None
    except ValueError:
        return None


def _check_declared_end(path: Path, stream: av.video.stream.VideoStream, last_time: float | None, strict: bool,
                        usable: int) -> None:
    """A stream without a frame count (Matroska, WebM) whose frames end well before its declared end was cut off
    (a partial download): as :func:`_check_complete` for a header's count. "Well before": over a second and a
    twentieth of the length short (a variable-rate recording may show its last frame for a while), or, where the
    file itself is cut short (:func:`matroska_cut_off`), over two frame times (was: a clip of a second or two cut
    in half read as whole)."""
    end = _declared_end(stream)
    if stream.frames > 0 or end is None or last_time is None:
        return
    rate = stream.average_rate or stream.guessed_rate
    slack = max(1.0, end / 20)
    if end - last_time > 2 * float(1 / rate if rate else 0) and matroska_cut_off(path) is not None:
        slack = 0.0
    if end - last_time <= slack:
        return
    message = f"{path}: video is truncated: its header says it lasts until {end:.3f} s, but its frames end at " \
              f"{last_time:.3f} s"
    if strict:
        raise CutShort(message, usable)
    logger.warning("%s; using the frames before", message)


_EBML_ID, _SEGMENT_ID = b"\x1a\x45\xdf\xa3", b"\x18\x53\x80\x67"


def _ebml_size(data: bytes, at: int) -> tuple[int | None, int]:
    """The EBML variable-length size at ``data[at:]`` (None: unknown, all its bits set) and where it ends.

    Raises:
        ValueError: no size there.
    """
    if at >= len(data) or data[at] == 0:
        raise ValueError("no EBML size")
    length = 9 - data[at].bit_length()
    if at + length > len(data):
        raise ValueError("cut EBML size")
    value = int.from_bytes(data[at:at + length], "big") & ((1 << (7 * length)) - 1)
    return (None if value == (1 << (7 * length)) - 1 else value), at + length


def _cut_before_a_frame(path: Path) -> str:
    """Why a file whose first frame cannot be decoded has none, where it is cut off (a download stopped in its
    first KB: was "no decodable frames" alone, as of a file whose frames are damaged): ``": the file is cut off
    (...)"``, else ``""``."""
    cut = matroska_cut_off(path) or iso_cut_off(path)
    return f": the file is cut off ({cut}: a partial download or copy, or a recording that was not finished)" \
        if cut else ""


def matroska_cut_off(path: PathLike) -> str | None:
    """How a Matroska/WebM file is cut off (a partial download or copy): its Segment (what follows the EBML header:
    the whole clip) says it is longer than the file holds; None where it is whole, says no length (a live
    recording) or is no such file. Reads its first bytes only."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            end = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if head[:4] != _EBML_ID:
        return None
    try:
        size, at = _ebml_size(head, 4)
        if size is None or head[at + size:at + size + 4] != _SEGMENT_ID:
            return None
        size, at = _ebml_size(head, at + size + 4)
    except ValueError:
        return None
    if size is None or at + size <= end:
        return None
    return f"it ends {at + size - end} bytes short of the end of its Segment"


_PNG_END = b"\0\0\0\0IEND\xaeB`\x82"  # the chunk every PNG (an animated one too) ends with


def picture_cut_off(path: PathLike) -> str | None:
    """How an animated GIF or PNG (APNG) is cut off (a partial download or copy): it lacks the byte that ends a GIF
    (0x3B) or the chunk that ends a PNG (IEND); None where it ends so, or is neither. Reads its first and last
    bytes only."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(-min(len(_PNG_END), os.fstat(f.fileno()).st_size), os.SEEK_END)
            tail = f.read()
            if head[:4] == b"GIF8" and tail[-1:] != b"\x3b" and not _gif_has_end(f):
                return "it lacks the byte that ends a GIF"
            if head == b"\x89PNG\r\n\x1a\n" and tail != _PNG_END and not _png_has_end(f):
                return "it lacks the chunk that ends a PNG, IEND"
    except OSError:
        return None
    return None


def _gif_has_end(f: BinaryIO) -> bool:
    """Whether the GIF in ``f`` reaches its trailer byte, its blocks walked from the start (bytes after it: a file
    with something appended, an upload's padding, is whole). Asked only of a GIF whose last byte is not the
    trailer."""
    f.seek(10)
    packed = f.read(1)
    if not packed:
        return False
    f.seek(2 + (3 << ((packed[0] & 7) + 1) if packed[0] & 0x80 else 2), os.SEEK_CUR)  # (the global palette)
    while block := f.read(1):
        if block == b"\x3b":
            return True
        if block == b"\x2c":  # an image: its descriptor, local palette, LZW code size, then data sub-blocks
            desc = f.read(9)
            if len(desc) < 9:
                return False
            f.seek((3 << ((desc[8] & 7) + 1) if desc[8] & 0x80 else 0) + 1, os.SEEK_CUR)
        elif block == b"\x21":  # an extension: its label, then sub-blocks
            f.seek(1, os.SEEK_CUR)
        else:
            return False  # (not a block: damaged)
        while (size := f.read(1)) and size[0]:
            f.seek(size[0], os.SEEK_CUR)
        if not size:
            return False
    return False


def _png_has_end(f: BinaryIO) -> bool:
    """Whether the PNG in ``f`` has its IEND chunk, its chunks walked from the start (bytes after it: a file with
    something appended is whole). Asked only of a PNG that does not end with IEND."""
    pos, end = 8, os.fstat(f.fileno()).st_size
    while pos + 12 <= end:
        f.seek(pos)
        head = f.read(8)
        if head[4:] == b"IEND":
            return True
        pos += 12 + int.from_bytes(head[:4], "big")
    return False


def _check_gif_trailer(path: Path, stream: av.video.stream.VideoStream) -> None:
    """A GIF ends with its trailer byte (0x3B); one cut off (a partial download) lacks it, and its header counts
    no frames to compare with: a warning (how much is missing is unknown; a cut inside a frame is an error of its
    own)."""
    if stream.codec_context.name != "gif":
        return
    cut = picture_cut_off(path)  # (None also where it cannot be told: not a seekable file, a pipe)
    if cut is not None:
        logger.warning("%s: the GIF may be truncated (%s: a partial download?); its %d whole frames are used", path,
                       cut, stream.frames)


def _use_first(count: int) -> str:
    if count <= 0:
        return "it breaks off before the first frame used (--start)"
    what = "the frame" if count == 1 else f"the {count} frames"
    return f"--max-frames {count} (AnimateConfig.max_frames) animates {what} before the break"


class CutShort(InputError):
    """A video that breaks off (``strict`` reading): ``what`` happened, and the ``--max-frames`` that animates the
    ``usable`` frames before the break (:func:`_use_first`)."""

    def __init__(self, what: str, usable: int) -> None:
        super().__init__(f"{what}; {_use_first(usable)}")
        self.what, self.usable = what, usable

    def counting(self, usable: int) -> CutShort:
        """The same break, its hint counting ``usable`` frames (those a lower rate keeps, say)."""
        return CutShort(self.what, usable)


def _short(announced: int, decoded: int) -> bool:
    """Whether ``decoded`` frames fall short of the header's count by more than an edit list may hide."""
    return announced > 0 and announced - decoded > max(2, announced // 100)


def _check_complete(path: Path, announced: int, decoded: int, strict: bool, usable: int) -> None:
    """A clean EOF well short of the header's frame count means the file was cut off (no moov error);
    ``usable``: the frames yielded (the ``--max-frames`` that animates them)."""
    if announced <= 0 or decoded >= announced:
        return
    message = f"{path}: video is truncated: the header announces {announced} frames but only {decoded} decode"
    # Edit lists may legitimately hide a frame or two; a cut-off file misses many more.
    if strict and _short(announced, decoded):
        raise CutShort(message, usable)
    logger.warning("%s; using the %d decoded frames", message, decoded)


# ---------------------------------------------------------------------------------------------- encoding


RESULT_TAG = "comment"  # the container tag that holds a result's settings (MP4/MOV ©cmt, Matroska COMMENT)


def recorded_options(face_crop: bool = True, face: int | None = None, driver_face: int | None = None,
                     mask: object = None, audio: object = True, audio_start: float | str | None = None,
                     contour: bool = False, contour_affine_frame: str = "last", side_by_side: bool = False,
                     paste_back: bool = False, crf: int | None = None, first_number: int | None = None,
                     **others: object) -> dict[str, Any]:
    """The ``options`` a result's settings record holds for ``animate_to_file``'s keyword arguments (``others``,
    which do not shape the result, left out): files by name, the sound as its file's name or whether the driver's
    is copied, ``audio_start`` only with a sound file, ``contour_affine_frame`` only in contour mode."""
    from megactor_rt.config import time_seconds

    sound = audio if isinstance(audio, (str, os.PathLike)) else None
    start = (0.0 if audio_start is None else time_seconds("audio_start", audio_start)) if sound is not None else None
    return {"face_crop": face_crop, "face": face, "driver_face": driver_face, "mask": file_name(mask),
            "audio": file_name(sound) if sound is not None else bool(audio), "audio_start": start, "contour": contour,
            "contour_affine_frame": contour_affine_frame if contour else None, "side_by_side": side_by_side,
            "paste_back": paste_back, "crf": crf, "first_number": first_number}


def file_name(path: object) -> str | None:
    """A file's name without its folders (an image sequence's: with its folder's; None for anything that is no
    path)."""
    if is_frame_pattern(path):
        return sequence_name(path)  # type: ignore[arg-type]
    return Path(path).name if isinstance(path, (str, os.PathLike)) else None


def result_settings(path: PathLike) -> dict[str, Any] | None:
    """The settings a result was made with (``animate_to_file`` writes them as JSON into the container's
    comment tag, or a frame sequence's frames: ``path`` is then its pattern, its folder or one frame,
    :mod:`megactor_rt.sequence`), or None
    where the file has none (a GIF, ``metadata=False``, another program's video, a sequence without frames).

    Raises:
        InputError: missing or unreadable file.
    """
    import json

    path = Path(path)
    if path.is_dir():  # a sequence's folder
        path = find_pattern(path)
    if is_sequence(path) and (is_frame_pattern(path) or not _has_video(path)):  # a sequence's pattern: its first
        # frame's; a frame alone: its own (a video named as a frame, clip.png, is read as a video: its container's)
        text = (sequence_settings(path) if is_frame_pattern(path) else frame_text(path)) or {}
        tags = {RESULT_TAG: text.get(SETTINGS_KEY, "")}
    else:
        with _open_input(path) as container:
            tags = {k.lower(): v for k, v in container.metadata.items()}
    try:
        doc = json.loads(tags.get(RESULT_TAG, ""))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and "megactor_rt" in doc else None


def check_output_path(path: PathLike) -> Path:
    """Check, before any work, that a result video can be written to ``path``.

    Args:
        path: destination file; its suffix picks the container (.mp4, .m4v, .mov, .mkv: H.264; .webm: VP9;
            .gif; .webp: animated WebP), a PNG frame sequence's number pattern (``take1/%05d.png``:
            :func:`~megactor_rt.sequence.check_sequence_path`), or ``-``: a YUV4MPEG2 stream on standard output
            (:mod:`megactor_rt.pipe`).

    Returns:
        ``path`` as an absolute :class:`Path`.

    Raises:
        InputError: unsupported suffix (or no encoder for it in this PyAV build), missing or unwritable folder,
            or ``path`` is a directory.
    """
    if is_sequence(path):
        return check_sequence_path(path)
    if is_stdout(path):
        check_stdout()
        return Path(STDOUT)
    path = Path(path).expanduser().absolute()
    _check_name_length(path, path)
    if path.is_dir():  # (first: a folder named x.mp4 is that, not a format problem)
        raise InputError(f"{path}: output path is a directory (name the result file, e.g. {path / 'result.mp4'})")
    if path.suffix.lower() not in _AUDIO_COPY_CODECS:
        raise InputError(f"{path}: unsupported output format {path.suffix!r}; use one of "
                         f"{', '.join(ALL_RESULT_SUFFIXES)}")
    try:
        _encoder_for(path.suffix.lower())
    except RuntimeError as exc:
        raise InputError(f"{path}: {exc}; write .mp4 or .mkv instead") from exc
    check_writable_result(path)
    return path


def check_writable_result(path: Path, named: PathLike | None = None) -> None:
    """A result file can be written at ``path``: no folder, in an existing folder this process may write in, not
    a file it may not replace (also the client's check of a server's result, whose encoders are the server's).

    Raises:
        InputError: naming ``named`` (default: ``path``) and the problem.
    """
    named = path if named is None else named
    _check_name_length(path, named)
    if path.is_dir():
        raise InputError(f"{named}: output path is a directory (name the result file, e.g. {path / 'result.mp4'})")
    parent = path.parent
    if not parent.exists():
        raise InputError(f"{named}: output folder {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"{named}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{named}: output folder {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{named}: existing output file is not writable")


def check_result_rate(path: Path, fps: Fraction) -> None:
    """Refuse a frame rate the result's format cannot show: a GIF above :data:`GIF_MAX_FPS`.

    Raises:
        InputError: naming the result and the way out.
    """
    if path.suffix.lower() == ".gif" and fps > GIF_MAX_FPS:
        raise InputError(f"{path}: a GIF plays at most {GIF_MAX_FPS} frames per second (its frame delays are whole "
                         f"hundredths of a second, and browsers slow shorter ones down), not {float(fps):g}: pass "
                         "--fps 25 (Python: fps=25 in the AnimateConfig), or write .mp4 or .webm")


def check_first_number(path: Path, first_number: int | None) -> None:
    """Refuse a first frame number (``first_number``; None: the default) for a result that is one file, or below 0.

    Raises:
        InputError: naming the result, or the number.
    """
    if first_number is None:
        return
    if not is_sequence(path):
        raise InputError(f"{path}: first_number (--first-number) numbers the frames of a PNG sequence result (e.g. "
                         "take1/%05d.png, or --format png); this result is one file")
    if first_number < 0:
        raise InputError(f"first_number (--first-number) must be >= 0, got {first_number}")


def check_bit_depth(path: Path, bit_depth: int) -> None:
    """Refuse frames of more than 8 bits (``AnimateConfig.bit_depth``) for a result that cannot hold them: all but
    PNG sequences (H.264, VP9, GIF and WebP results are 8-bit).

    Raises:
        InputError: naming the result.
    """
    if bit_depth != 8 and not is_sequence(path) and not is_stdout(path):
        raise InputError(f"{path}: {bit_depth}-bit frames (bit_depth, --bit-depth) go into PNG sequence results "
                         "(e.g. take1/%05d.png, or --format png) and the stream of -o -; this result holds 8-bit "
                         "frames")


def check_quality(path: Path, crf: int | None) -> None:
    """Refuse a constant-quality value (``crf``; None: the format's default) that the result's encoder does not take:
    outside its scale (:data:`CRF_SCALES`), or an encoder without one (GIF; FFmpeg builds without libx264).

    Raises:
        InputError: naming the result, the encoder and its scale.
    """
    if crf is None:
        return
    if is_stdout(path):
        raise InputError("-o -: the stream carries raw frames: crf (--crf) does not apply; leave it out")
    if is_sequence(path):
        raise InputError(f"{path}: PNG frames are lossless: crf (--crf) does not apply; leave it out")
    try:
        encoder = _encoder_for(path.suffix.lower())
    except RuntimeError as exc:
        raise InputError(f"{path}: {exc}") from exc
    scale = CRF_SCALES.get(encoder)
    if scale is None:
        raise InputError(f"{path}: crf (--crf) sets the quality of H.264 (libx264) and VP9 results; this result's "
                         f"encoder, {encoder}, has no such scale: leave it out")
    best, worst, default = scale
    if not best <= crf <= worst:
        raise InputError(f"{path}: crf (--crf) {crf} is outside {encoder}'s scale of {best} (best, largest) to "
                         f"{worst} (worst, smallest); its default is {default}")


def _check_name_length(path: Path, named: PathLike) -> None:
    size = len(os.fsencode(path.name))  # the bytes the file system gets (a name need not be UTF-8)
    if size > _name_max(path.parent):
        raise InputError(f"{named}: the file name is longer than this file system allows "
                         f"({size} > {_name_max(path.parent)} bytes)")


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) ``folder``'s file system takes (255 where it cannot be asked)."""
    try:
        return os.pathconf(folder if folder.exists() else folder.anchor or "/", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


# the temporary file of a result: hidden, beside it, the stem cut so that a name the file system takes
# still fits with the added characters
_TMP_STEM_CHARS = 200


def _tmp_prefix(path: Path) -> str:
    return f".{path.stem[:_TMP_STEM_CHARS]}."


def check_not_an_input(output: Path, **inputs: object) -> None:
    """Refuse a result path that is one of the run's input files (the result would replace it), or for a frame
    sequence, an input inside the sequence's folder (replaced as a whole); inputs that are not paths (arrays,
    frames in memory, None) are skipped.

    Raises:
        InputError: naming the input.
    """
    for what, source in inputs.items():
        if source is None or not isinstance(source, (str, os.PathLike)) or is_stdout(output):
            continue
        if is_sequence(output) and result_replaces(output, source):
            raise InputError(f"{output}: the {what} {source} (an input of this run) is in the result's folder, which "
                             "the frames replace as a whole; choose another output folder")
        if Path(source).exists() and same_file(output, source):
            raise InputError(f"{output}: the result would overwrite the {what} (an input of this run); "
                             "choose another output path")


def result_replaces(output: PathLike, source: PathLike) -> bool:
    """Whether writing the result ``output`` would replace ``source``: the same file, or a file in a frame
    sequence's folder (replaced as a whole)."""
    if is_sequence(output):
        folder, source = frame_pattern(output).folder, Path(source).absolute()
        return folder.exists() and any(same_file(folder, p) for p in (source, *source.parents))
    return same_file(output, source)


def result_exists(output: PathLike) -> bool:
    """Whether the result ``output`` is in place (a file; a frame sequence: a frame in its folder). Results are
    renamed into place only when complete, so one that exists is whole."""
    return sequence_exists(output) if is_sequence(output) else not is_stdout(output) and Path(output).is_file()


def result_folder(output: PathLike) -> Path:
    """The folder a result is written into: the file's, or the folder that holds a frame sequence's folder."""
    return frame_pattern(output).folder.parent if is_sequence(output) else Path(output).parent


@lru_cache(maxsize=1)
def _video_encoder() -> str:
    for name in _VIDEO_ENCODERS:
        try:
            av.codec.Codec(name, "w")
        except (av.error.FFmpegError, ValueError):
            continue
        if name != _VIDEO_ENCODERS[0]:
            logger.warning("libx264 is not available in this PyAV build; encoding with %s instead", name)
        return name
    raise RuntimeError(f"PyAV has none of the video encoders {_VIDEO_ENCODERS}")


@lru_cache(maxsize=8)
def _encoder_for(suffix: str) -> str:
    """The video encoder of a result container (``suffix``: lower case, with its dot).

    Raises:
        RuntimeError: this PyAV build lacks it.
    """
    name = _OTHER_VIDEO_ENCODERS.get(suffix)
    if name is None:
        return _video_encoder()
    try:
        av.codec.Codec(name, "w")
    except (av.error.FFmpegError, ValueError) as exc:
        raise RuntimeError(f"this PyAV build has no {name} encoder for {suffix} results") from exc
    return name


def _sample_slice(frame: av.AudioFrame, first: int, end: int) -> av.AudioFrame:
    """Samples ``[first, end)`` of an audio frame as a new frame (planar: (C, N) arrays; packed: (1, N*C))."""
    data: Any = frame.to_ndarray()
    per_sample = 1 if frame.format.is_planar else len(frame.layout.channels)
    part = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, first * per_sample: end * per_sample]),
                                      format=frame.format.name, layout=frame.layout)
    part.sample_rate = frame.sample_rate
    return part


def _palette_filter(sample: list[av.VideoFrame], time_base: Fraction
                    ) -> tuple[av.filter.Graph, av.filter.FilterContext]:
    """A filter graph that maps RGB frames onto a 256-colour palette made from the frames of ``sample`` (their
    colours counted together), and its frame input (frames are pushed there and pulled from the graph one at a
    time: nothing waits for the end of the video)."""
    rgb = av.video.format.VideoFormat("rgb24")
    first = sample[0]
    make = av.filter.Graph()
    source = make.add_buffer(width=first.width, height=first.height, format=rgb, time_base=time_base)
    sink = make.add("buffersink")
    gen = make.add("palettegen", _GIF_PALETTE)
    source.link_to(gen)
    gen.link_to(sink)
    make.configure()
    for frame in sample:
        source.push(frame)
    source.push(None)
    palette = cast(av.VideoFrame, make.pull())
    graph = av.filter.Graph()
    frames = graph.add_buffer(width=first.width, height=first.height, format=rgb, time_base=time_base)
    colours = graph.add_buffer(width=palette.width, height=palette.height, format=palette.format,
                               time_base=time_base)
    use, out = graph.add("paletteuse", _GIF_DITHER), graph.add("buffersink")
    frames.link_to(use, 0, 0)
    colours.link_to(use, 0, 1)
    use.link_to(out)
    graph.configure()
    palette.pts = 0
    colours.push(palette)
    colours.push(None)  # the one palette serves every frame
    return graph, frames


def _file_start(container: av.container.InputContainer) -> Fraction:
    """Where a media file starts on its own clock, seconds: its container's first timestamp (an MPEG-TS recording's
    is 1.4 s or more, not 0), or 0 where it has none or an earlier one (an Opus stream's pre-skip)."""
    start = container.start_time
    return Fraction(start, av.time_base) if start is not None and start > 0 else Fraction(0)


class _AudioTrack:
    """The sound of a result: a source file's audio stream (:func:`sound_stream`), trimmed to the result's span and
    copied into (or converted for) the output container ``_out``; shared by :class:`VideoWriter` and
    :func:`write_soundtrack`."""

    _out: av.container.OutputContainer
    _suffix: str

    def _init_audio(self, audio_source: PathLike | None, audio_offset: Fraction, video_start: Fraction | None
                    ) -> None:
        """Open ``audio_source`` (see :class:`VideoWriter`; ``video_start`` None: the file's own start,
        :func:`_file_start`); nothing is written yet."""
        self._audio_in: av.container.InputContainer | None = None
        self._audio_in_stream: av.audio.stream.AudioStream | None = None
        self._audio_path: Path | None = None
        self._resampler: av.AudioResampler | None = None  # transcoded audio: to AAC's format, layout and rate
        self._resampler_in: tuple[str, str, int] | None = None  # the source parameters it was made for
        self._audio_copy = False
        self._audio_samples = 0  # transcoded audio handed to the encoder so far (samples at the AAC rate)
        self._audio_offset = Fraction(audio_offset)
        if self._audio_offset < 0:
            raise ValueError(f"audio_offset must be >= 0, got {audio_offset}")
        self._video_start = Fraction(video_start or 0)
        if audio_source is not None:
            self._open_audio_source(Path(audio_source))
            if video_start is None and self._audio_in is not None:
                self._video_start = _file_start(self._audio_in)

    def _open_audio_source(self, source: Path) -> None:
        container = _open_input(source, what="audio source")
        if not container.streams.audio:
            container.close()
            logger.info("%s has no audio stream; the output will be silent", source)
            return
        self._audio_in, self._audio_in_stream = container, sound_stream(container, source)
        self._audio_path = source

    def _setup_audio_stream(self, src: av.audio.stream.AudioStream) -> None:
        codec = src.codec_context.codec.canonical_name  # "mp3", not the decoder name "mp3float"
        rate = src.codec_context.sample_rate or 44100
        suffix = self._suffix
        self._audio_copy = codec in _AUDIO_COPY_CODECS.get(suffix, ()) and not (
            codec == "mp3" and suffix != ".mkv" and rate < _MP3_MIN_COPY_RATE)
        if self._audio_copy:
            self._audio_out = cast(av.audio.stream.AudioStream, self._out.add_stream_from_template(src))
        else:
            encoder = _AUDIO_ENCODER.get(suffix, "aac")
            rates = _ENCODER_RATES.get(encoder)  # (PCM: any)
            out_rate = rate if rates is None or rate in rates else min(rates, key=lambda r: abs(r - rate))
            logger.info("transcoding audio %s at %d Hz to %s at %d Hz", codec, rate, _ENCODER_NAME[encoder],
                        out_rate)
            self._audio_out = cast(av.audio.stream.AudioStream, self._out.add_stream(encoder, rate=out_rate))
            # by channel count: sources may carry unordered layouts ("1 channels") that AAC rejects
            self._audio_out.layout = "mono" if src.codec_context.channels == 1 else "stereo"
            # the encoder's sample format: frames are resampled to it (_encode_audio)
            self._audio_out.format = _ENCODER_FORMAT[encoder]
        try:  # writes the header now: a stream the container cannot hold fails here, before any frame is made
            self._out.start_encoding()
        except OSError:  # (the file itself, first opened here: a full disk, no permission; PyAV's errno errors
            raise  # are OSErrors, for the writer to name its file)
        except av.error.FFmpegError as exc:
            raise InputError(f"{self._audio_path}: its audio ({codec}, {rate} Hz) cannot be written into a "
                             f"{suffix} result ({exc}); pass --no-audio (Python: audio=False), or convert the audio") from exc

    def _close_audio_in(self) -> None:
        if self._audio_in is not None:
            self._audio_in.close()
            self._audio_in = None


    def _mux_audio(self, source: av.container.InputContainer, src: av.audio.stream.AudioStream,
                   duration: Fraction) -> None:
        """Carry the source audio of ``[offset, offset + duration)`` s over (copy: whole packets; transcode:
        exact samples). From :data:`AUDIO_SEEK_MIN_S` on, reading starts at a seek to a second before the
        offset; where that cannot be done exactly (the demuxer cannot seek, lands after that point, or frames
        lack timestamps) it starts again from the beginning, before anything of the audio is written."""
        mux = self._copy_audio if self._audio_copy else self._transcode_audio
        if self._audio_offset >= AUDIO_SEEK_MIN_S:
            try:
                mux(source, src, duration, True)
                return
            except _SeekFailed as exc:
                logger.info("%s: cannot seek the audio to %.1f s (%s); reading it from the beginning",
                            self._audio_path, float(self._audio_offset), exc)
                assert self._audio_path is not None  # set with the source
                self._close_audio_in()
                source = self._audio_in = _open_input(self._audio_path, what="audio source")
                src = self._audio_in_stream = sound_stream(source)
        mux(source, src, duration, False)

    def _audio_clock(self, source: av.container.InputContainer, src: av.audio.stream.AudioStream, seek: bool
                     ) -> tuple[Fraction, Fraction, Fraction | None]:
        """(stream time base, the video's start in s on the stream's clock, the time the first packet must not be
        after or None): with ``seek``, the demuxer is positioned at or before a second ahead of the offset.

        Raises:
            _SeekFailed: the demuxer cannot seek there.
        """
        tb = src.time_base or Fraction(1, src.codec_context.sample_rate or 1)
        start = self._video_start  # audio times count from the video's first frame
        if not seek:
            return tb, start, None
        aim = self._audio_offset - AUDIO_SEEK_MARGIN_S
        try:
            source.seek(math.floor((start + aim) / tb), stream=src, backward=True, any_frame=False)
        except (av.error.FFmpegError, OverflowError, ValueError) as exc:
            raise _SeekFailed(str(exc)) from exc
        return tb, start, aim

    def _copy_audio(self, source: av.container.InputContainer, src: av.audio.stream.AudioStream,
                    duration: Fraction, seek: bool) -> None:
        tb, start, latest = self._audio_clock(source, src, seek)
        offset = self._audio_offset
        shift = round((start + offset) / tb)  # in stream ticks: the packet at the offset lands at 0
        # a packet may start this much before the offset: the decoder's start-up delay (AAC's priming, Opus's
        # pre-skip), which the result's container records (MP4 edit list, Matroska codec delay) and decoders
        # skip; was: none, so the first packet (the priming one) was left out and a Matroska result's decoder
        # skipped the first real packet instead (21 ms of sound lost at the start of AAC, 41 ms from --start)
        rate, delay = src.codec_context.sample_rate, src.codec_context.delay
        # (in stream ticks, rounded as muxers round it: Matroska's 6.5 ms of Opus pre-skip is 7)
        lead = math.floor(Fraction(delay, rate) / tb + Fraction(1, 2)) if rate and delay > 0 else 0
        # MP4 and MOV results also keep the packet that straddles the start: an edit list cuts its part before it
        # (was: left out, so the sound began up to a packet late: 128 ms of 8 kHz AAC, 72 ms of 16 kHz MP3)
        edit_list = self._suffix in (".mp4", ".m4v", ".mov")
        for packet in source.demux(src):
            if packet.pts is None or packet.size == 0:
                continue  # flush packet
            t = packet.pts * tb - start
            if latest is not None:  # the first packet after the seek
                _check_first_after_seek(t, latest, "packet")
                latest = None
            if t < offset and packet.pts - shift < -lead and not (
                    edit_list and packet.duration and packet.pts + packet.duration > shift):
                continue  # audio before the video's start (or the offset); a later start keeps its delay
            if t - offset >= duration:
                break
            if shift:
                packet.pts -= shift
                if packet.dts is not None:
                    packet.dts -= shift
            packet.stream = self._audio_out
            self._out.mux(packet)

    def _transcode_audio(self, source: av.container.InputContainer, src: av.audio.stream.AudioStream,
                         duration: Fraction, seek: bool) -> None:
        tb, start, latest = self._audio_clock(source, src, seek)
        offset = self._audio_offset
        # when the next frame starts if it has no timestamp: unknown after a seek until a frame with one
        following: Fraction | None = None if latest is not None else Fraction(0)
        written = Fraction(0)  # output audio so far, seconds
        last: av.AudioFrame | None = None  # the latest source frame (the format of any silence after it)
        for frame in self._decoded(source, src):
            last = frame
            if frame.pts is not None:
                t0 = frame.pts * tb - start
            elif following is not None:
                t0 = following
            else:
                raise _SeekFailed("a frame without a timestamp after seeking")
            if latest is not None:  # the first frame after the seek
                _check_first_after_seek(t0, latest, "frame")
                latest = None
            following = t0 + Fraction(frame.samples, frame.sample_rate)
            first = max(0, math.ceil((offset - t0) * frame.sample_rate))  # samples before the offset
            end = min(frame.samples, math.ceil((offset + duration - t0) * frame.sample_rate))
            if end <= 0:  # past the result's end; its sound starts (or comes back) only after it: silence till then
                if duration - written > AUDIO_GAP_S:  # (was: none, so a sequence's audio.wav held no sample)
                    written += self._encode_silence(duration - written, frame)
                break
            if first >= frame.samples:
                continue
            at = t0 + Fraction(first, frame.sample_rate) - offset  # where this audio belongs in the result
            if at - written > AUDIO_GAP_S:  # audio starting after the video (or a gap): keep it in step
                written += self._encode_silence(at - written, frame)
            if first > 0 or end < frame.samples:
                frame = _sample_slice(frame, first, end)
            written += Fraction(frame.samples, frame.sample_rate)
            self._encode_audio(frame)
        if self._suffix == ".wav" and last is not None and duration - written > AUDIO_GAP_S:
            # sound that ends before the frames: a WAV beside them is as long as they are, silence after it (was:
            # as long as the sound, so `ffmpeg -i - -i s.wav -shortest` cut the video there)
            written += self._encode_silence(duration - written, last)
        self._encode_audio(None)
        self._out.mux(self._audio_out.encode(None))

    def _decoded(self, source: av.container.InputContainer, src: av.audio.stream.AudioStream
                 ) -> Iterator[av.AudioFrame]:
        """The source's audio frames; a packet that does not decode (damaged audio in a good driver) is skipped
        and counted in a warning instead of failing the run at its end."""
        bad = 0
        for packet in source.demux(src):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                bad += 1
                continue
            yield from cast(list[av.AudioFrame], frames)
        if bad:
            logger.warning("%s: %d audio packets could not be decoded and were skipped (silence in their place, "
                           "from the timestamps of the frames after them)", self._audio_path, bad)

    def _encode_audio(self, frame: av.AudioFrame | None) -> None:
        """Encode ``frame`` (None: flush the resampler) after resampling it to the AAC (Opus) stream's format, layout
        and rate, with a resampler made anew whenever the source's format, layout or rate changes (a joined
        broadcast recording going from stereo to mono): the encoder's own one is fixed by the first frame."""
        if frame is not None:
            params = (frame.format.name, frame.layout.name, frame.sample_rate)
            if params != self._resampler_in:
                self._flush_resampler()
                self._resampler_in = params
                self._resampler = av.AudioResampler(
                    format=self._audio_out.format.name, layout=self._audio_out.layout.name,
                    rate=self._audio_out.rate)
            frame.pts = None
            resampler = self._resampler
            assert resampler is not None
            for out in resampler.resample(frame):
                self._encode_resampled(out)
        else:
            self._flush_resampler()

    def _flush_resampler(self) -> None:
        resampler = self._resampler
        if resampler is not None:
            for out in resampler.resample(None):
                self._encode_resampled(out)
            self._resampler = None

    def _encode_resampled(self, out: av.AudioFrame) -> None:
        """Encode a frame of AAC's format, numbered contiguously from sample 0. A frame with a timestamp lets
        the encoder stamp its first packet before 0 by its start-up delay (1024 samples), which the muxer
        records (an MP4 edit list, a Matroska codec delay) so that players skip the priming samples; without
        one (was, until 2026-11-27) the first packet was stamped 0 and all the audio played 1024 samples late:
        21 ms at 48 kHz, 128 ms at 8 kHz."""
        out.pts, out.time_base = self._audio_samples, Fraction(1, self._audio_out.rate)
        self._audio_samples += out.samples
        self._out.mux(self._audio_out.encode(out))

    def _encode_silence(self, seconds: Fraction, like: av.AudioFrame) -> Fraction:
        """Encode ``seconds`` of silence in the sample format, layout and rate of the source frame ``like`` (so it
        goes through the same resampler); returns the seconds encoded."""
        n = round(seconds * like.sample_rate)
        channels = len(like.layout.channels)
        shape = (channels, n) if like.format.is_planar else (1, n * channels)
        frame = av.AudioFrame.from_ndarray(np.zeros(shape, like.to_ndarray().dtype), format=like.format.name,
                                           layout=like.layout)
        frame.sample_rate, frame.pts = like.sample_rate, None
        self._encode_audio(frame)
        return Fraction(n, like.sample_rate)


class Soundtrack(_AudioTrack):
    """A result's sound as a WAV file of its own (16-bit PCM at the source's rate, mono or stereo), for results that
    hold no sound (a PNG frame sequence): the span and timing a video result's audio would have
    (:class:`VideoWriter`'s ``audio_source``, ``audio_offset`` and ``video_start``). The source is opened at once,
    so an unreadable one fails before any work; :meth:`write` writes the file, :meth:`close` lets the source go.

    Example:
        >>> track = Soundtrack("driver.mp4", audio_offset=Fraction(5))
        >>> track.write(Path("take1/audio.wav"), Fraction(96, 30))  # False: the source has no sound
    """

    def __init__(self, audio_source: PathLike, audio_offset: Fraction = Fraction(0),
                 video_start: Fraction | None = None) -> None:
        """Raises: InputError: ``audio_source`` is missing or unreadable."""
        self._suffix = ".wav"
        self._init_audio(audio_source, audio_offset, video_start)

    @property
    def has_sound(self) -> bool:
        """Whether the source has an audio stream (else :meth:`write` writes nothing)."""
        return self._audio_in_stream is not None

    def write(self, path: Path, duration: Fraction) -> bool:
        """Write the sound of a result ``duration`` seconds long at ``path`` (a new file in a temporary place: a
        failure leaves a partial one); False where the source has no sound (nothing written). The source is
        closed afterwards.

        Raises:
            OSError: ``path`` cannot be written (a full disk).
        """
        source, src = self._audio_in, self._audio_in_stream
        try:
            if source is None or src is None:
                return False
            self._out = av.open(str(path), mode="w", format="wav")
            try:
                self._setup_audio_stream(src)
                self._mux_audio(source, src, duration)
            finally:
                self._out.close()
            return True
        finally:
            self.close()

    def close(self) -> None:
        self._close_audio_in()


class VideoWriter(ResultWriter, _AudioTrack):
    """Encode RGB frames to a video at an exact frame rate, optionally with audio: H.264 (yuv420p) in .mp4, .m4v,
    .mov and .mkv, VP9 in .webm, or an animated GIF (looping, no audio, at most :data:`GIF_MAX_FPS`).

    Frames go to a hidden temporary file beside ``path``. :meth:`close` (or a clean ``with`` exit)
    muxes the first audio stream of ``audio_source`` trimmed to the video's duration (packets copied
    when the codec fits the container, e.g. MP3/AAC into MP4, Opus into WebM; otherwise transcoded to AAC,
    in WebM to Opus) and renames the file onto ``path``. An exception inside the ``with`` block, or
    :meth:`abort`, deletes it.

    Example:
        >>> with VideoWriter("out.mp4", Fraction(30), 512, 512, audio_source="driver.mp4") as w:
        ...     for frame in frames:
        ...         w.write(frame)
    """

    def __init__(self, path: PathLike, fps: Fraction | int, width: int, height: int,
                 audio_source: PathLike | None = None, crf: int | None = None, audio_offset: Fraction = Fraction(0),
                 video_start: Fraction | None = None, metadata: Mapping[str, str] | None = None) -> None:
        """Open the temporary output and set up streams.

        Args:
            path: final destination (.mp4/.m4v/.mov/.mkv/.webm/.gif/.webp).
            fps: exact frame rate; frame i is stamped i/fps.
            width: frame width (even).
            height: frame height (even).
            audio_source: a media file whose first audio stream is carried over, or None (a GIF has no sound: it is
                left out, logged).
            crf: constant quality of an H.264 (libx264: 0-51) or VP9 (0-63) result, lower is better and larger;
                None: 18 for H.264 (visually lossless), 24 for VP9 (about the same error); a GIF takes none.
            video_start: where the driver's video starts on ``audio_source``'s clock (its video stream's start,
                :attr:`VideoInfo.start_s`); ``audio_offset`` counts from there, so audio that starts before or
                after the video stays in step (audio before it is dropped, a later start is kept as silence);
                None (another file's sound, ``--audio``): the file's own start, its container's first timestamp
                (an MPEG-TS recording's clock starts at 1.4 s or later: counted from 0, its sound was silence, or
                none at all in a short result).
            audio_offset: where in ``audio_source`` (seconds) the result's first frame is: its audio from
                there on is carried over (copied audio: MP4 and MOV from the exact sample, the packet under the
                start cut by an edit list; Matroska and WebM from the first whole packet there, at most one
                packet late: about 20-30 ms at 44.1-48 kHz, longer at low sample rates; transcoded audio
                starts at the exact sample).
            metadata: container tags (e.g. ``{"comment": ...}``; a GIF holds none: left out).

        Raises:
            InputError: the destination is unwritable, ``audio_source`` is unreadable, a GIF above
                :data:`GIF_MAX_FPS`, or a ``crf`` the encoder does not take (:func:`check_quality`).
            ValueError: non-positive fps, odd or non-positive frame size.
        """
        self.path = check_output_path(path)
        self.fps = Fraction(fps)
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self._suffix = self.path.suffix.lower()
        self._gif = self._suffix == ".gif"
        check_result_rate(self.path, self.fps)
        check_quality(self.path, crf)
        if not _AUDIO_COPY_CODECS[self._suffix] and audio_source is not None:
            logger.info("%s: a%s has no sound; the audio of %s is left out", self.path.name,
                        " GIF" if self._gif else "n animated WebP", audio_source)
            audio_source = None
        # GIF: a filter graph applying the palette of the first frames, and its input; the frames held until it
        # is made
        self._palette: tuple[av.filter.Graph, av.filter.FilterContext] | None = None
        self._palette_sample: list[av.VideoFrame] = []
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"frame size must be positive and even for yuv420p, got {width}x{height}")
        self.width, self.height = width, height
        self.frames_written = 0
        self._closed = False
        self._init_audio(audio_source, audio_offset, video_start)
        self._tmp = self.path.with_name(f"{_tmp_prefix(self.path)}{uuid.uuid4().hex[:8]}.tmp{self.path.suffix}")
        self._hold: int | None = None
        try:
            self._hold = hold(self._tmp, create=True)  # (a leftover of this write, killed, is known as one at once;
            # made here, as FFmpeg makes its file at the first frame it muxes)
            self._setup_output(crf, metadata or {})
        except OSError as exc:  # (the file, opened where the sound's stream is set up)
            self._discard()
            raise self._write_error(exc) from exc
        except BaseException:
            self._discard()
            raise

    # -- setup

    def _setup_output(self, crf: int | None, metadata: Mapping[str, str]) -> None:
        options = {"movflags": "+faststart"} if self._suffix in (".mp4", ".m4v", ".mov") else \
            {"loop": "0"} if self._suffix == ".webp" else {}
        self._out = av.open(str(self._tmp), mode="w", format="webp" if self._suffix == ".webp" else None,
                            container_options=options)
        if self._suffix not in _UNTAGGED:
            self._out.metadata.update(metadata)
        encoder = _encoder_for(self._suffix)
        stream = cast(av.video.stream.VideoStream, self._out.add_stream(encoder, rate=self.fps))
        stream.width, stream.height = self.width, self.height
        stream.pix_fmt = "pal8" if self._gif else "yuv420p"
        if not self._gif:
            # frames are converted to YUV with BT.601 in limited range (swscale's default): say so, or players
            # guess, and take BT.709 for HD sizes
            stream.codec_context.colorspace, stream.codec_context.color_range = _SMPTE170M, _TV_RANGE
        stream.time_base = self._frame_tb = 1 / self.fps  # the muxer changes stream.time_base later
        if encoder in CRF_SCALES:
            quality = str(CRF_SCALES[encoder][2] if crf is None else crf)
            stream.options = {"crf": quality, "preset": "medium"} if encoder == "libx264" else \
                {**_VP9_OPTIONS, "crf": quality}
        elif encoder == "libwebp_anim":
            stream.options = dict(_WEBP_OPTIONS)
        self._video = stream
        if self._audio_in_stream is not None:
            self._setup_audio_stream(self._audio_in_stream)

    # -- writing

    def write(self, frame: np.ndarray) -> None:
        """Encode one frame.

        Args:
            frame: ``(height, width, 3)`` uint8 RGB.

        Raises:
            ValueError: wrong shape or dtype, or the writer is closed.
        """
        if self._closed:
            raise ValueError(f"{self.path}: VideoWriter is closed")
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"expected a ({self.height}, {self.width}, 3) uint8 frame, got "
                             f"{frame.shape} {frame.dtype}")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        if not self._gif:
            vf = vf.reformat(format="yuv420p")
            vf.colorspace, vf.color_range = _SMPTE170M, _TV_RANGE
        vf.pts, vf.time_base = self.frames_written, self._frame_tb
        try:
            if self._gif:
                self._encode_gif(vf)
            else:
                self._out.mux(self._video.encode(vf))
        except OSError as exc:  # e.g. a full disk (PyAV's file errors are OSErrors)
            raise self._write_error(exc) from exc
        self.frames_written += 1

    def _encode_gif(self, vf: av.VideoFrame | None) -> None:
        """Hold the first :data:`GIF_PALETTE_FRAMES` frames (fewer for large frames: at most
        :data:`GIF_PALETTE_BYTES`), make the palette from them, then reduce and encode them and every later frame;
        None (at the end): make the palette from the frames held, if not made yet, and flush the filter."""
        if self._palette is None:
            if vf is not None:
                self._palette_sample.append(vf)
                held = max(1, min(GIF_PALETTE_FRAMES, GIF_PALETTE_BYTES // (3 * vf.width * vf.height)))
                if len(self._palette_sample) < held:
                    return
            sample, self._palette_sample = self._palette_sample, []
            self._palette = _palette_filter(sample, self._frame_tb)
            for held_frame in sample:
                self._reduce_gif(held_frame)
            if vf is not None:
                return
        self._reduce_gif(vf)

    def _reduce_gif(self, vf: av.VideoFrame | None) -> None:
        """Reduce an RGB frame to the palette (made) and encode it; None: flush the filter."""
        assert self._palette is not None
        graph, source = self._palette
        source.push(vf)
        while True:
            try:
                out = cast(av.VideoFrame, graph.pull())
            except (av.error.BlockingIOError, av.error.EOFError):
                return
            self._out.mux(self._video.encode(out))

    def _write_error(self, exc: OSError) -> ResourceError:
        return ResourceError(f"{self.path}: cannot write the result video ({exc}); nothing was written under "
                             "this name")

    def close(self) -> None:
        """Flush the encoder, mux the audio, close the file and rename it onto ``path``.

        Raises:
            ValueError: no frame was written (the temporary file is removed).
        """
        if self._closed:
            return
        with self._or_discard():
            if self.frames_written == 0:
                raise ValueError(f"{self.path}: no frames were written")
            if self._gif:
                self._encode_gif(None)
            self._out.mux(self._video.encode(None))
            if self._audio_in is not None and self._audio_in_stream is not None:
                self._mux_audio(self._audio_in, self._audio_in_stream, Fraction(self.frames_written) / self.fps)
            self._out.close()
            self._close_audio_in()
            replace_synced(self._tmp, self.path)  # (a power loss then leaves no empty result)
        self._closed = True
        let_go(self._hold)
        # earlier writes of this name killed midway (same naming as self._tmp; held while written)
        remove_stale(self.path.parent,
                     f"{glob.escape(_tmp_prefix(self.path))}{'[0-9a-f]' * 8}.tmp{glob.escape(self.path.suffix)}",
                     unheld_s=UNHELD_S)
        logger.info("wrote %s (%d frames at %s fps)", self.path, self.frames_written, self.fps)

    def abort(self) -> None:
        """Close without publishing: the temporary file is deleted and ``path`` is left untouched."""
        if not self._closed:
            self._discard()

    def _discard(self) -> None:
        self._closed = True
        out = getattr(self, "_out", None)
        try:
            if out is not None:
                try:
                    out.close()
                except (av.error.FFmpegError, OSError, ValueError) as exc:
                    logger.debug("ignoring error while closing aborted output: %s", exc)
            self._close_audio_in()
        finally:  # also when a second Ctrl-C or SIGTERM breaks the close off (GNU timeout signals twice)
            let_go(getattr(self, "_hold", None))
            try:
                self._tmp.unlink(missing_ok=True)
            except OSError as exc:  # never hide the error that made us discard
                logger.warning("could not remove the temporary file %s: %s", self._tmp, exc)

def result_writer(path: PathLike, fps: Fraction | int, width: int, height: int, **options: Any
                  ) -> ResultWriter:
    """The writer of a result at ``path``: a :class:`VideoWriter`, for a PNG frame sequence's pattern
    (``take1/%05d.png``) a :class:`~megactor_rt.sequence.SequenceWriter`, for ``-`` a
    :class:`~megactor_rt.pipe.Y4MWriter` (standard output); ``options``: :class:`VideoWriter`'s."""
    writer = SequenceWriter if is_sequence(path) else Y4MWriter if is_stdout(path) else VideoWriter
    return writer(path, fps, width, height, **options)
