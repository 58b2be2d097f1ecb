"""``animate --dry-run``: what a run would do, found out without the networks.

A run's usual failures come before its first denoising step (no face in the portrait or in the driver, a
``--start`` past the driver's end, an unreadable file, a mask of another size), but on a GPU machine they come
after the weights have loaded, and in a batch after the jobs before them. :func:`preflight` does the part of a
run that can fail that way, on the CPU and without weights: it reads the portrait and finds its crop (face
detection), reads the mask, plans the driver (its frames, rate and crop: pass 1's face detection over the
frames used), in contour mode finds the landmarks of the portrait's crop and of the driver's cropped frames (the
run's landmark pass), and checks the result's rate against its format. It returns what it found, with the size of
the denoising work (context windows per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from megactor_rt.config import AnimateConfig
from megactor_rt.contour import Landmarker
from megactor_rt.media import check_not_an_input, check_output_path, check_result_rate
from megactor_rt.models.scheduler import context_windows
from megactor_rt.preprocess import Box, load_user_mask
from megactor_rt.runtime.animator import crop_landmarks, crop_portrait
from megactor_rt.runtime.driver import (
    Driver,
    DriverPlan,
    PlanCache,
    cropped_uint8,
    driver_file,
    driver_source,
    plan_driver_contour,
    plan_run,
)


@dataclass(frozen=True)
class Preflight:
    """What :func:`preflight` found: the portrait's size, face and crop side; the driver's plan; the context
    windows each denoising step runs (``windows``, of ``steps`` steps)."""

    portrait: str
    portrait_size: tuple[int, int]  # (width, height)
    face: Box | None
    crop_side: int
    plan: DriverPlan
    windows: int
    steps: int
    contour: bool = False  # contour mode's landmarks were found (portrait crop and driver frames)

    @property
    def fps(self) -> Fraction:
        return self.plan.selection.fps

    def summary(self) -> str:
        """One line: portrait, driver, and the run's size."""
        w, h = self.portrait_size
        face = (f"face {round(self.face.width)}x{round(self.face.height)} px" if self.face is not None
                else "centre crop")
        plan, info = self.plan, self.plan.info
        seen = "" if plan.with_face is None else f", a face in {plan.with_face} of them"
        if plan.detector == "cnn":
            seen += " (CNN detector)"
        driver_side = plan.crop[2] - plan.crop[0]
        return (f"portrait {w}x{h}, {face}, crop {self.crop_side} px; driver {info.width}x{info.height}, "
                f"{plan.num_frames} frames at {float(self.fps):g} fps{seen}, crop {driver_side} px; "
                f"{self.windows} window(s) x {self.steps} steps{'; contour landmarks found' if self.contour else ''}")


def preflight(portrait: str | Path, driver: Driver, output: str | Path | None, *, image_size: int,
              config: AnimateConfig, face_crop: bool = True, face: int | None = None, driver_face: int | None = None,
              mask: str | Path | None = None, landmarker: Landmarker | None = None,
              contour_affine_frame: str = "last", folders_made: bool = False, plans: PlanCache | None = None
              ) -> Preflight:
    """Do what can fail in a run before its networks are used (see the module doc), without them.

    Args:
        image_size: the crop's side the networks take (the weights' config, or ``--size``).
        output: the result: a path the run can write, not one of its inputs, whose format takes the driver's
            rate (None: not checked).
        folders_made: the caller makes the result's folder where it is missing (the command line, which checks
            its results' paths itself): its path is then not checked here.
        landmarker: contour mode's landmark model (``Landmarker(path)``, loaded once for many calls); None: not
            contour mode.
        plans: driver plans kept for the next calls (a batch's rows with one driver and several portraits: its
            faces found once, as a run's :class:`~megactor_rt.runtime.driver.PlanCache` does; was once per row).
        Others: as for :meth:`~megactor_rt.runtime.animator.Animator.animate_to_file`.

    Raises:
        InputError: what the run would raise for these inputs, before its first step.
    """
    out = None
    source = driver_source(driver)
    if output is not None:  # (as the run: before the portrait is read)
        out = Path(output) if folders_made else check_output_path(output)
        check_not_an_input(out, portrait=portrait, driver=driver_file(source), mask=mask)
    img, name, crop, found = crop_portrait(portrait, image_size, face_crop, face, config.face_detector)
    if mask is not None:
        load_user_mask(mask, image_size, crop=crop, image_shape=img.shape[:2])
    plan = plan_run(source, config, face_crop, driver_face) if plans is None else \
        plans.plan(source, config, face_crop, driver_face)[0]
    if landmarker is not None:  # as the run: the portrait's crop as the networks take it, then the driver's frames
        found_lm = crop_landmarks(cropped_uint8(img, crop, image_size), landmarker, name, config.cnn_fallback)
        plan_driver_contour(plan, image_size, found_lm, landmarker, contour_affine_frame, cnn=config.cnn_fallback)
    if out is not None:
        check_result_rate(out, plan.selection.fps)
    windows = len(context_windows(plan.num_frames, min(config.window, plan.num_frames), config.overlap,
                                  config.closed_loop))
    return Preflight(name, (img.shape[1], img.shape[0]), found, crop[2] - crop[0], plan, windows, config.steps,
                     landmarker is not None)
