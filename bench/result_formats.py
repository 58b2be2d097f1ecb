"""What each result format costs the writer: seconds, bytes and error per frame, on the bundled driver's frames.

The result is encoded by the consumer thread while the next frames are denoised, so a format costs nothing
as long as its encoder is faster than the denoiser: this measures that margin. Frames: the bundled driver's
first 48, centre-cropped to 512 px (real faces, unlike the demo model's output); its MP3 audio is carried
(copied into MP4/MKV, converted to Opus for WebM, left out of a GIF, an animated WebP or a PNG frame sequence). Each
format is written 3 times, best kept;
H.264 and VP9 also at higher ``--crf`` values (smaller files), and H.264 with ``--paste-back`` (each frame put
back into the bundled portrait, 768x844, where its 768 px face crop came from: 512x562 frames; the paste is
timed with the writer). The error is the mean absolute difference of the
decoded result from the frames written, in 8-bit levels. 16-bit PNG frames (``--bit-depth 16``) are measured on
the same frames softened in float (a Gaussian blur, sigma 0.6 px), whose levels fall between the 8-bit ones as the
decoder's output does, against 8-bit PNG frames of the same pictures (truncated, as upstream's frames are). The
stream of ``-o -`` is written to /dev/null (a reader that keeps up; its bytes are the raw 4:4:4 planes; error not
measured: the YUV conversion's rounding, at most 3 levels in the tests).

    python bench/result_formats.py --out OUT     # writes result_formats.md / .json (about 30 s on 2 cores)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from megactor_rt.assets import ASSETS_DIR
from megactor_rt.benchmark import (
    end_on_sigterm,
    record_line,
    run_record,
    save_tables,
    script_facts,
    script_out,
)
from megactor_rt.media import ALL_RESULT_SUFFIXES, AnimatedWebP, iter_video_frames, read_image, result_writer
from megactor_rt.preprocess import PasteBack, portrait_crop
from megactor_rt.sequence import SEQUENCE_SUFFIXES, frame_pattern, is_sequence

FRAMES, SIZE, REPEATS = 48, 512, 3
# (suffix, crf) beyond each format at its default
LOWER_QUALITY = [(".mp4", 23), (".mp4", 28), (".webm", 32), (".webm", 40)]


def driver_frames() -> list[np.ndarray]:
    """The bundled driver's first frames, centre-cropped to ``SIZE`` px."""
    out = []
    for f in iter_video_frames(ASSETS_DIR / "driver.mp4", max_frames=FRAMES):
        h, w = f.shape[:2]
        top, left = (h - SIZE) // 2, (w - SIZE) // 2
        out.append(np.ascontiguousarray(f[top:top + SIZE, left:left + SIZE]))
    return out


def time_format(scratch: Path, suffix: str, frames: list[np.ndarray], crf: int | None = None,
                paste: PasteBack | None = None) -> dict[str, Any]:
    path = scratch / "png" / f"%05d{suffix}" if suffix in SEQUENCE_SUFFIXES else scratch / f"result{suffix}"
    width, height = (paste.width, paste.height) if paste else (SIZE, SIZE)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        with result_writer(path, Fraction(30), width, height, audio_source=ASSETS_DIR / "driver.mp4", crf=crf) as w:
            for f in frames:
                w.write(paste(f) if paste else f)
        times.append(time.perf_counter() - t0)
    files = frame_pattern(path).frames() if is_sequence(path) else [path]
    decoded = [read_image(p) for p in files] if is_sequence(path) else list(AnimatedWebP(path)) \
        if suffix == ".webp" else list(iter_video_frames(path))  # (FFmpeg cannot decode animated WebP)
    written = [paste(f) for f in frames] if paste else frames
    error = float(np.mean([np.abs(d.astype(np.int16) - f).mean() for d, f in zip(decoded, written, strict=True)]))
    return {"format": suffix, "crf": crf, "paste_back": f"{width}x{height}" if paste else None,
            "ms_per_frame": 1000 * min(times) / len(frames),
            "kb_per_frame": sum(p.stat().st_size for p in files) / len(frames) / 1000, "mean_error": error}


def time_png16(scratch: Path, frames: list[np.ndarray]) -> list[dict[str, Any]]:
    """8-bit and 16-bit PNG sequences of the frames softened in float (see the module doc)."""
    import cv2

    soft = [cv2.GaussianBlur(f.astype(np.float32), (0, 0), 0.6) for f in frames]
    rows = []
    variants: list[tuple[int, list[np.ndarray]]] = [(8, [s.astype(np.uint8) for s in soft]),
                                                    (16, [np.round(s * 257).astype(np.uint16) for s in soft])]
    for depth, pictures in variants:
        path = scratch / f"png{depth}" / "%05d.png"
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            with result_writer(path, Fraction(30), SIZE, SIZE, bit_depth=depth) as w:
                for p in pictures:
                    w.write(p)
            times.append(time.perf_counter() - t0)
        files = frame_pattern(path).frames()
        decoded = [np.asarray(cv2.imread(str(p), cv2.IMREAD_UNCHANGED))[..., ::-1] for p in files]
        error = float(np.mean([np.abs(d.astype(np.int64) - p).mean() for d, p in zip(decoded, pictures, strict=True)]))
        rows.append({"format": f".png, {depth}-bit, softened frames", "crf": None, "paste_back": None,
                     "ms_per_frame": 1000 * min(times) / len(frames),
                     "kb_per_frame": sum(p.stat().st_size for p in files) / len(frames) / 1000,
                     "mean_error": error / (257 if depth == 16 else 1)})
    return rows


def time_stream(frames: list[np.ndarray]) -> dict[str, Any]:
    """``-o -``: the YUV4MPEG2 stream (4:4:4) written to /dev/null, as into a pipe whose reader keeps up."""
    import os

    times = []
    with open(os.devnull, "wb") as sink:
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            with result_writer("-", Fraction(30), SIZE, SIZE, stream=sink) as w:
                for f in frames:
                    w.write(f)
            times.append(time.perf_counter() - t0)
    return {"format": "- (YUV4MPEG2 4:4:4 stream)", "crf": None, "paste_back": None,
            "ms_per_frame": 1000 * min(times) / len(frames), "kb_per_frame": 3 * SIZE * SIZE / 1000,
            "mean_error": None}


def photo_paste() -> PasteBack:
    """The paste-back into the bundled portrait, from its face crop."""
    photo = read_image(ASSETS_DIR / "portrait.png")
    return PasteBack.of(photo, portrait_crop(photo, size=SIZE)[0], SIZE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    script_out(args.out, "bench/result_formats.py")
    end_on_sigterm()  # (its scratch folder in --out removed)
    frames = driver_frames()
    scratch = Path(tempfile.mkdtemp(prefix="result-formats-", dir=args.out))  # the results: removed however
    try:  # the run ends
        rows = [time_format(scratch, suffix, frames) for suffix in ALL_RESULT_SUFFIXES]
        rows += [time_format(scratch, suffix, frames, crf) for suffix, crf in LOWER_QUALITY]
        rows.append(time_format(scratch, ".mp4", frames, paste=photo_paste()))
        rows += time_png16(scratch, frames)
        rows.append(time_stream(frames))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {**script_facts(), **run_record(),
              "frames": len(frames), "size": SIZE, "fps": 30, "repeats": REPEATS, "rows": rows}
    lines = [record_line(report), "",
             f"Writing {len(frames)} frames of {SIZE} px at 30 fps with the driver's audio, {report['date']} "
             f"(best of {REPEATS}):", "",
             "| format | --crf | --paste-back | ms per frame | KB per frame | mean error (levels) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {'default' if r['crf'] is None else r['crf']} | {r['paste_back'] or '-'} | "
              f"{r['ms_per_frame']:.1f} | {r['kb_per_frame']:.1f} | "
              f"{'-' if r['mean_error'] is None else format(r['mean_error'], '.2f')} |" for r in rows]
    save_tables(args.out, "result_formats", report, "\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201 - a script's output


if __name__ == "__main__":
    main()
