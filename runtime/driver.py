"""Driving-video preprocessing as a stream (spec section 2.2).

Pass 1 decodes the clip once to find a face in every frame and fixes one square crop for the whole clip
(centre of the union of the face boxes, as upstream). Pass 2 decodes again and yields each frame cropped,
resized, face-isolated (a box around the face, black elsewhere) and grey - the PoseGuider input. Face
detection runs on a pool of threads (dlib releases the GIL), frames in order. No pass holds more than
a few frames, so drivers of any length fit in memory.

Contour mode (:mod:`megactor_rt.contour`) needs the whole clip's landmarks before its first frame: a
landmark pass over the cropped frames (:func:`plan_driver_contour`) runs between the two, and pass 2 then
keeps the eye/mouth/brow rectangles and warps them onto the portrait's face instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megactor_rt.contour import ContourPlan, Landmarker, plan_contour
from megactor_rt.errors import InputError
from megactor_rt.kernels.ops import grey_unit, preprocess_frame
from megactor_rt.media import VideoInfo, iter_video_frames, probe_video
from megactor_rt.preprocess import Box, Crop, crop_resize, driver_crop, face_keep_rect, first_face
from megactor_rt.progress import progress
from megactor_rt.runtime.pipeline import ordered_map

logger = logging.getLogger(__name__)

DETECT_MAX_SIDE = 640  # frames are downscaled to at most this for face detection


@dataclass(frozen=True)
class DriverPlan:
    """What pass 1 decided: the clip's crop and frame count."""

    path: Path
    info: VideoInfo
    crop: Crop
    num_frames: int
    face_crop: bool


def detect_scaled(frame: np.ndarray) -> Box | None:
    """Largest face of a frame, detected on a copy downscaled to ``DETECT_MAX_SIDE``."""
    h, w = frame.shape[:2]
    s = min(1.0, DETECT_MAX_SIDE / max(h, w))
    if s == 1.0:
        return first_face(frame)
    import cv2

    small = cv2.resize(frame, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    box = first_face(small)
    if box is None:
        return None
    return Box(box.left / s, box.top / s, min(box.right / s, w), min(box.bottom / s, h))


def plan_driver(path: str | Path, max_frames: int | None = None, face_crop: bool = True) -> DriverPlan:
    """Pass 1: count frames and choose the crop.

    Raises:
        InputError: unreadable/empty video, or no face in any frame (unless ``face_crop`` is False).
    """
    path = Path(path)
    info = probe_video(path)
    boxes: list[Box | None] = []
    frames = iter_video_frames(path, max_frames)
    found = ordered_map(detect_scaled, frames) if face_crop else (None for _ in frames)
    for box in progress(found, total=_total(info, max_frames), desc="driver: find faces", unit="frame"):
        boxes.append(box)
    crop = driver_crop(boxes, info.height, info.width, face_crop=face_crop, source_name=path.name)
    logger.info("driver %s: %d frames at %s fps, crop %s", path.name, len(boxes), info.fps, crop)
    return DriverPlan(path, info, crop, len(boxes), face_crop)


def _total(info: VideoInfo, max_frames: int | None) -> int | None:
    if info.num_frames is None:
        return max_frames
    return min(info.num_frames, max_frames) if max_frames else info.num_frames


def _cropped_uint8(frame: np.ndarray, crop: Crop, size: int) -> np.ndarray:
    """The frame cut to the clip's crop and resized, truncated to uint8 like upstream -> ``(size, size, 3)``."""
    return np.ascontiguousarray(crop_resize(frame, crop, size).to(torch.uint8).permute(1, 2, 0).numpy())


def plan_driver_contour(plan: DriverPlan, size: int, portrait_landmarks: np.ndarray, landmarker: Landmarker,
                        affine_frame: str = "last") -> ContourPlan:
    """Contour mode's landmark pass: 68 landmarks on every cropped frame -> kept rectangles and affine
    (``affine_frame``: see :func:`~megactor_rt.contour.plan_contour`).

    Raises:
        InputError: no face landmarks in any cropped frame.
    """
    def landmarks(frame: np.ndarray) -> np.ndarray | None:
        return landmarker(_cropped_uint8(frame, plan.crop, size))

    found = ordered_map(landmarks, iter_video_frames(plan.path, plan.num_frames))
    per_frame = progress(found, total=plan.num_frames, desc="driver: face landmarks", unit="frame")
    contour = plan_contour(per_frame, portrait_landmarks, size, plan.path.name, affine_frame)
    logger.info("driver %s: contour rectangles %s", plan.path.name, contour.rects)
    return contour


def iter_driver_inputs(plan: DriverPlan, size: int, device: torch.device | str = "cpu",
                       contour: ContourPlan | None = None) -> Iterator[torch.Tensor]:
    """Pass 2: yield the PoseGuider input of every frame, ``(3, size, size)`` float32 in [0, 1].

    Frames whose cropped version shows no face reuse the previous frame's face box; frames before the first
    detection wait (a short look-ahead buffer) and use the first one. With a ``contour`` plan every frame
    keeps the plan's rectangles instead and is warped onto the portrait's face (no detection here).
    """
    if contour is not None:
        def contour_input(frame: np.ndarray) -> torch.Tensor:
            x = crop_resize(frame, plan.crop, size).permute(1, 2, 0).numpy()  # (S, S, 3) float32 0..255
            warped = torch.from_numpy(contour.apply(x)).permute(2, 0, 1)  # (3, S, S)
            return grey_unit(warped).to(device)

        yield from ordered_map(contour_input, iter_video_frames(plan.path, plan.num_frames))
        return
    pending: list[np.ndarray] = []
    last: Box | None = None
    frames = iter_video_frames(plan.path, plan.num_frames)
    if not plan.face_crop:  # whole crops: no detection, nothing for the thread pool to do
        for frame in frames:
            yield _model_input(frame, plan.crop, None, size, device)
        return

    def detect(frame: np.ndarray) -> tuple[np.ndarray, Box | None]:
        return frame, first_face(_cropped_uint8(frame, plan.crop, size))

    for frame, box in ordered_map(detect, frames):
        last = box or last
        if last is None:
            pending.append(frame)
            continue
        keep = face_keep_rect(last, size)
        for f in [*pending, frame]:
            yield _model_input(f, plan.crop, keep, size, device)
        pending.clear()
    if pending:
        raise InputError(f"no face found in the cropped frames of driving video {plan.path.name}; "
                         "pass --no-face-crop to use whole frames")


def _model_input(frame: np.ndarray, crop: Crop, keep: Crop | None, size: int, device: torch.device | str
                 ) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(frame)).to(device)
    return preprocess_frame(t, crop, keep, size=size, dtype=torch.float32)
