"""Contour-preserving driver preprocessing (upstream ``--contour-preserve``; spec section 2.2, step 3).

The default driver input keeps the whole face box, so the driver's face *shape* reaches the PoseGuider and
the portrait's contour drifts towards it. Contour mode keeps only the eyes, the mouth and the brows and
moves them onto the portrait's face:

1. 68 face landmarks (iBUG 300-W order) on the portrait crop and on every cropped driving frame.
2. For four landmark groups (eye 36-41, eye 42-47, mouth 48-67, brows 17-26) a box of ``size/4`` around the
   group's centroid (clipped to the frame, truncated to ints) per frame; each group's box is the **union
   over the clip**, so the kept region is four static rectangles. Everything else is black. Upstream uses at
   most 50 driving frames, so its union spans at most 50 frames; a longer clip here takes, for each frame,
   the union over the :data:`CONTOUR_SPAN` frames around it (the same union for every frame of a clip of up
   to 50 frames), so the boxes do not grow with the clip's length and let the driver's face shape back in.
3. One affine transform from three corners of the driver's landmark bounding box (top-left, bottom-right,
   bottom-left) onto the same corners of the portrait's, applied to every masked frame (bilinear, black
   border), then the usual grey conversion.

Upstream quirk reproduced by default: the driver's bounding box comes from the landmarks of the **last** frame
(the code reads a loop variable left over from the landmark pass), although the branch is written for frame 0
(spec pitfall 6). The fix is an option (``affine_frame="first"``, CLI ``--contour-affine-frame first``): the
first frame with landmarks, as the code intended.

Difference from upstream, forced by what runs offline here: landmarks come from dlib's 68-point shape
predictor on dlib's HOG face box instead of DWPose (YOLOX + DWPose-L, downloaded weights). Both use the
iBUG 68-point layout; dlib's points are placed slightly differently (its jaw line especially), which moves
the bounding box and therefore the affine by a few pixels. Frames where no face is found reuse the previous
frame's landmarks (the first found, for frames before it); no face in the whole clip or in the portrait
is an :class:`InputError`.

The shape predictor is a 100 MB model file, not bundled with megactor-rt. It is found, in this order, at
the path given explicitly (``--landmarks-model``), at ``$MEGACTOR_LANDMARKS_MODEL``, or inside the
``face_recognition_models`` package (``pip install face-recognition-models==0.3.0``, the ``contour`` extra; no network at run time). It is
also at http://dlib.net/files/shape_predictor_68_face_landmarks.dat.bz2 (unpack with ``bunzip2``). Its
training data (iBUG 300-W) is licensed for research use only; check that before shipping it commercially.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from megactor_rt.errors import InputError
from megactor_rt.preprocess import UPSAMPLE_BELOW_PX, Box, Crop, cnn_faces, detect_faces, packaged_dlib_model

logger = logging.getLogger(__name__)

LANDMARKS_ENV = "MEGACTOR_LANDMARKS_MODEL"
LANDMARKS_FILE = "shape_predictor_68_face_landmarks.dat"
LANDMARKS_URL = "http://dlib.net/files/shape_predictor_68_face_landmarks.dat.bz2"
NUM_LANDMARKS = 68
LANDMARKS_BYTES = 99_693_937  # the size of dlib's file (unpacked), which face-recognition-models 0.3.0 holds too
LANDMARKS_HEAD = b"\x01\x01\x81\x88\x81\x01\x03M"  # its first bytes: a shorter file that starts so is cut short

# (first, end) landmark index ranges of the kept groups, in upstream's order: eye, eye, mouth, brows
CONTOUR_GROUPS: tuple[tuple[int, int], ...] = ((36, 42), (42, 48), (48, 68), (17, 27))
PATCH_DIV = 8  # each group box reaches size / PATCH_DIV from its centroid (128 px at 512)
# frames whose group boxes make one frame's kept rectangles: upstream animates at most 50 driving frames and
# takes the union over all of them; a longer clip takes it over the 50 frames around each frame
CONTOUR_SPAN = 50
CNN_LANDMARK_SIDE = 256  # the CNN detector's copy of a crop whose landmarks HOG found no face for (0.4 s at 512 px)


# ---------------------------------------------------------------------------------------------- the model


def landmarks_model_path(path: str | Path | None = None) -> Path:
    """Locate the 68-point shape predictor file.

    Args:
        path: an explicit file; if None, ``$MEGACTOR_LANDMARKS_MODEL``, then the ``face_recognition_models``
            package's copy.

    Returns:
        The model file's path.

    Raises:
        InputError: the explicit (or environment) path is not a file, or no copy was found anywhere; the
            message says how to get one.
    """
    explicit = path if path is not None else os.environ.get(LANDMARKS_ENV) or None
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            source = "--landmarks-model" if path is not None else f"${LANDMARKS_ENV}"
            what = "is a folder, not a file" if p.is_dir() else "does not exist"
            raise InputError(f"{p}: landmark model file ({source}) {what}; contour mode needs dlib's "
                             f"{LANDMARKS_FILE} ({LANDMARKS_URL}, unpack with bunzip2)")
        return p
    packaged = packaged_landmarks_model()
    if packaged is not None:
        return packaged
    raise InputError(f"contour mode needs dlib's 68-point face landmark model ({LANDMARKS_FILE}): install it with "
                     f"pip install face-recognition-models==0.3.0 (the 'contour' extra of this package), or download {LANDMARKS_URL}, unpack it with bunzip2 "
                     f"and pass --landmarks-model FILE (or set ${LANDMARKS_ENV})")


def packaged_landmarks_model() -> Path | None:
    """The model file inside an installed ``face_recognition_models`` package, or None."""
    return packaged_dlib_model(LANDMARKS_FILE)


def _size_and_head(path: str) -> tuple[int, bytes]:
    """A file's size and its first bytes (as many as :data:`LANDMARKS_HEAD`); (0, b"") where it cannot be read."""
    try:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_size, f.read(len(LANDMARKS_HEAD))
    except OSError:
        return 0, b""


@functools.lru_cache(maxsize=2)
def _load_predictor(path: str) -> tuple[object, threading.Lock]:
    import dlib  # lazy: loading the 100 MB model takes about a second

    try:
        predictor = dlib.shape_predictor(path)
    except RuntimeError as exc:
        size, head = _size_and_head(path)
        if head == LANDMARKS_HEAD and size < LANDMARKS_BYTES:  # dlib's own file, cut short (a broken download)
            raise InputError(f"{path}: the landmark model is damaged or incomplete ({size} of the {LANDMARKS_BYTES} "
                             f"bytes of dlib's {LANDMARKS_FILE}): download it again ({LANDMARKS_URL}, unpack it "
                             f"with bunzip2) or reinstall face-recognition-models") from exc
        hint = ("; it is still compressed: unpack it with bunzip2 first" if path.endswith(".bz2") else "")
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__  # (dlib: a line per
        raise InputError(f"{path}: not a dlib shape predictor model ({detail}){hint}") from exc  # nested type)
    parts = predictor(np.zeros((16, 16, 3), np.uint8), dlib.rectangle(0, 0, 15, 15)).num_parts
    if parts != NUM_LANDMARKS:
        raise InputError(f"{path}: a {parts}-point model; contour mode needs the 68-point one ({LANDMARKS_FILE})")
    logger.info("loaded face landmark model %s", path)
    return predictor, threading.Lock()  # one shared model; a prediction takes ~3 ms, so a lock costs nothing


class Landmarker:
    """68 face landmarks of the face at the centre of an image, else its largest (dlib HOG box + dlib shape predictor).

    Args:
        model: the shape predictor file (see :func:`landmarks_model_path`); None finds it.

    Raises:
        InputError: no model file, or not a 68-point dlib model.
    """

    # which face of an image its landmarks are of; a portrait store's landmarks from another choice (the largest
    # face, before 2026-11-30) are computed again
    CHOICE = "centre"

    def __init__(self, model: str | Path | None = None) -> None:
        self.path = landmarks_model_path(model)
        self._predictor, self._lock = _load_predictor(str(self.path))

    @property
    def identity(self) -> str:
        """What a portrait's kept landmarks are checked against: the model file and the face chosen in the crop."""
        return f"{self.path}#{self.CHOICE}"

    def __call__(self, image: np.ndarray, cnn: bool = False) -> np.ndarray | None:
        """Landmarks of the face at ``image``'s centre (of those whose box holds it, the one centred nearest), else
        of its largest face: a portrait's crop is centred on the face it animates (``--portrait-face N`` in a group
        photo), which need not be the largest face in the crop.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            cnn: where HOG finds no face, place them in dlib's CNN detector's box (see :meth:`faces`).

        Returns:
            ``(68, 2)`` float64 (x, y) pixel coordinates, or None when no face is found.
        """
        faces = self.faces(image, cnn)
        if not faces:
            return None
        cx, cy = image.shape[1] / 2, image.shape[0] / 2
        central = [b for b in faces if b.left <= cx <= b.right and b.top <= cy <= b.bottom]
        chosen = min(central, key=lambda b: math.dist(b.center, (cx, cy))) if central else faces[0]
        return self.on_box(image, chosen)

    @staticmethod
    def faces(image: np.ndarray, cnn: bool = False) -> list[Box]:
        """The face boxes the landmarks are placed in (largest first; dlib's own boxes, which may reach past the
        border: the predictor places its mean shape in them), looking closer where none is found; with ``cnn``,
        dlib's CNN detector's boxes where HOG finds none at all (where its model is installed: a face half in
        shadow or tilted). HOG comes first because the 68-point model was trained on HOG's boxes."""
        faces = detect_faces(image, clip=False)
        if not faces and min(image.shape[:2]) >= UPSAMPLE_BELOW_PX:  # a face under ~80 px: look closer
            faces = detect_faces(image, clip=False, upsample=1)
        if not faces and cnn:
            faces = cnn_faces(image, CNN_LANDMARK_SIDE)
        return faces

    def on_box(self, image: np.ndarray, box: Box) -> np.ndarray:
        """Landmarks inside a known face box of ``image`` (``(H, W, 3)`` uint8 RGB) -> ``(68, 2)``."""
        import dlib

        rect = dlib.rectangle(int(box.left), int(box.top), int(box.right) - 1, int(box.bottom) - 1)
        with self._lock:
            shape = self._predictor(np.ascontiguousarray(image), rect)  # type: ignore[operator]
        return np.array([(shape.part(i).x, shape.part(i).y) for i in range(NUM_LANDMARKS)], np.float64)


# ---------------------------------------------------------------------------------------------- geometry


def group_box(points: np.ndarray, size: int, div: int = PATCH_DIV) -> Crop:
    """The box kept around one landmark group in one frame (upstream ``get_patch_div``).

    Args:
        points: ``(k, 2)`` (x, y) of the group.
        size: frame side.
        div: the box reaches ``size / div`` from the centroid in each direction.

    Returns:
        ``(top, left, bottom, right)``: centroid -/+ size/div, clipped to the frame, each truncated to int.
        A group off the frame gives an empty box (upstream's union starts from an empty box whose right and
        bottom edges are 0, which clamps a negative edge to 0).
    """
    x, y = np.mean(points, axis=0)
    half = size / div

    def inside(v: float) -> int:
        return int(min(float(size), max(0.0, v)))

    return inside(y - half), inside(x - half), inside(y + half), inside(x + half)


def contour_rects(landmarks_per_frame: Iterable[np.ndarray], size: int) -> list[Crop]:
    """The four kept rectangles of a clip: for each group, the union over all frames of its per-frame box.

    Args:
        landmarks_per_frame: ``(68, 2)`` landmarks of every frame (at least one).
        size: frame side.

    Returns:
        One ``(top, left, bottom, right)`` per group of :data:`CONTOUR_GROUPS`.

    Raises:
        ValueError: no frames, or landmarks of the wrong shape.
    """
    per_frame = [group_boxes(lm, size) for lm in landmarks_per_frame]
    if not per_frame:
        raise ValueError("contour_rects needs the landmarks of at least one frame")
    return _crops(span_unions(np.stack(per_frame), len(per_frame))[0])


def group_boxes(lm: np.ndarray, size: int) -> np.ndarray:
    """One frame's ``(68, 2)`` landmarks -> its ``(4, 4)`` int32 :func:`group_box` per group of
    :data:`CONTOUR_GROUPS`.

    Raises:
        ValueError: landmarks of the wrong shape.
    """
    _check_landmarks(lm)
    return np.array([group_box(lm[a:b], size) for a, b in CONTOUR_GROUPS], np.int32)


def _crops(boxes: np.ndarray) -> list[Crop]:
    """``(G, 4)`` int boxes -> ``(top, left, bottom, right)`` tuples of Python ints."""
    return [(int(t), int(left), int(b), int(r)) for t, left, b, r in boxes]


def bbox_corners(landmarks: np.ndarray) -> np.ndarray:
    """Top-left, bottom-right and bottom-left corner of the landmarks' bounding box, truncated to ints like
    upstream (``astype("int32")``) -> ``(3, 2)`` float32, the point format of ``cv2.getAffineTransform``."""
    _check_landmarks(landmarks)
    left, top = landmarks.min(axis=0)
    right, bottom = landmarks.max(axis=0)
    return np.array([[left, top], [right, bottom], [left, bottom]]).astype(np.int32).astype(np.float32)


def contour_affine(driver_landmarks: np.ndarray, portrait_landmarks: np.ndarray, driver_name: str = "driver"
                   ) -> np.ndarray:
    """The ``(2, 3)`` affine matrix mapping the driver's landmark box onto the portrait's.

    Raises:
        InputError: either box has no width or no height (degenerate landmarks).
    """
    check_landmark_area(driver_landmarks, f"driving video {driver_name}")
    check_landmark_area(portrait_landmarks, "the portrait")
    return cv2.getAffineTransform(bbox_corners(driver_landmarks), bbox_corners(portrait_landmarks))


def check_landmark_area(landmarks: np.ndarray, what: str) -> None:
    """InputError naming ``what`` where the landmarks' box (as :func:`bbox_corners` truncates it) has no width or
    no height: the affine onto or from it would be singular."""
    pts = bbox_corners(landmarks)
    if pts[1, 0] <= pts[0, 0] or pts[1, 1] <= pts[0, 1]:
        raise InputError(f"contour mode: the face landmarks of {what} span no area ({pts.tolist()})")


def contour_frame(frame: np.ndarray, rects: Sequence[Crop], matrix: np.ndarray) -> np.ndarray:
    """Keep ``rects`` of one cropped driving frame, black elsewhere, and warp it with ``matrix``.

    Args:
        frame: ``(S, S, 3)`` float32 RGB in 0..255 (the cropped, resized frame).
        rects: kept rectangles ``(top, left, bottom, right)``.
        matrix: ``(2, 3)`` affine (:func:`contour_affine`).

    Returns:
        ``(S, S, 3)`` float32: masked, then warped (bilinear, constant black border), like upstream.
    """
    size = frame.shape[0]
    masked = np.zeros_like(frame)
    for top, left, bottom, right in rects:
        masked[top:bottom, left:right] = frame[top:bottom, left:right]
    return cv2.warpAffine(masked, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


@dataclass(frozen=True)
class ContourPlan:
    """What the landmark pass decided for a clip: the kept rectangles of each frame and the affine onto the
    portrait.

    Attributes:
        unions: ``(U, 4, 4)`` int: for each span start, the four groups' union boxes
            ``(top, left, bottom, right)`` over the ``span`` frames from there (U = 1 for a clip of at most
            ``span`` frames: one union for the whole clip).
        matrix: ``(2, 3)`` float64 affine (:func:`contour_affine`).
        span: frames per union (:data:`CONTOUR_SPAN`).
    """

    unions: np.ndarray
    matrix: np.ndarray
    span: int = CONTOUR_SPAN

    def rects(self, index: int = 0) -> list[Crop]:
        """The kept rectangles of frame ``index``: the union over the ``span`` frames centred on it (clamped to
        the clip)."""
        start = min(max(index - self.span // 2, 0), len(self.unions) - 1)
        return _crops(self.unions[start])

    def apply(self, frame: np.ndarray, index: int = 0) -> np.ndarray:
        """Frame ``index`` of the clip, masked to its rectangles and warped (:func:`contour_frame`)."""
        return contour_frame(frame, self.rects(index), self.matrix)


def span_unions(boxes: np.ndarray, span: int = CONTOUR_SPAN) -> np.ndarray:
    """``(N, G, 4)`` per-frame group boxes -> ``(max(N - span + 1, 1), G, 4)``: the union of each run of ``span``
    consecutive frames (of all N where N <= span)."""
    if len(boxes) <= span:
        return np.concatenate([boxes[:, :, :2].min(axis=0), boxes[:, :, 2:].max(axis=0)], axis=-1)[None]
    runs = np.lib.stride_tricks.sliding_window_view(boxes, span, axis=0)  # (N - span + 1, G, 4, span)
    return np.concatenate([runs[:, :, :2].min(axis=-1), runs[:, :, 2:].max(axis=-1)], axis=-1)


AFFINE_FRAMES = ("last", "first")  # whose landmarks give the driver's box: upstream's quirk, the intended one


def check_affine_frame(affine_frame: str) -> None:
    """ValueError unless ``affine_frame`` is one of ``AFFINE_FRAMES``."""
    if affine_frame not in AFFINE_FRAMES:
        raise ValueError(f"affine_frame must be one of {AFFINE_FRAMES}, got {affine_frame!r}")


def plan_contour(driver_landmarks: Iterable[np.ndarray | None], portrait_landmarks: np.ndarray, size: int,
                 source_name: str = "driver", affine_frame: str = "last", span: int = CONTOUR_SPAN) -> ContourPlan:
    """Rectangles and affine of a clip from its per-frame landmarks (None: no face in that frame).

    Consumes ``driver_landmarks`` as a stream, keeping only each frame's four group boxes.
    Frames without landmarks reuse the previous frame's (the first found, before it), as upstream's DWPose
    would always return some face. Each frame's rectangles are the union of the group boxes over the ``span``
    frames around it (:class:`ContourPlan`): for a clip of up to ``span`` frames, one union over all of it, as
    upstream. The affine maps the driver's landmark box of the last frame (``affine_frame="last"``, upstream's
    quirk) or of the first frame with landmarks (``"first"``, the fix) onto the portrait's.

    Raises:
        InputError: no frame has landmarks.
        ValueError: ``affine_frame`` not in ``AFFINE_FRAMES``, or ``span`` < 1.
    """
    check_affine_frame(affine_frame)
    if span < 1:
        raise ValueError(f"span must be at least 1 frame, got {span}")
    boxes: list[np.ndarray | None] = []
    first: np.ndarray | None = None
    last: np.ndarray | None = None
    missing = 0
    for lm in driver_landmarks:
        if lm is None:
            missing += 1
            boxes.append(boxes[-1] if boxes else None)
            continue
        boxes.append(group_boxes(lm, size))
        last = lm
        first = lm if first is None else first
    if first is None or last is None:
        raise InputError(f"contour mode: no face landmarks found in any of the {len(boxes)} cropped frames of "
                         f"driving video {source_name}; it needs the driver's face landmarks (use a driver whose "
                         f"face is in view in its crop, or run without --contour-preserve)")
    if missing:
        logger.warning("contour mode: %d of %d frames of %s have no face; they reuse a neighbour's landmarks",
                       missing, len(boxes), source_name)
    lead = next(b for b in boxes if b is not None)  # frames before the first face take its boxes
    per_frame = np.stack([lead if b is None else b for b in boxes])
    return ContourPlan(span_unions(per_frame, span),
                       contour_affine(last if affine_frame == "last" else first, portrait_landmarks, source_name),
                       span)


def _check_landmarks(lm: np.ndarray) -> None:
    if lm.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"expected ({NUM_LANDMARKS}, 2) landmarks, got {lm.shape}")
