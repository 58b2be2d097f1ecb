"""What tone mapping costs a driver pass: milliseconds per decoded frame of 10-bit HEVC clips tagged SDR
(BT.709), HLG and PQ, the same coded pictures in each (only the tags differ), so the difference is the tone
mapping (``megactor_rt.hdr``) against swscale's plain conversion.

Frames: the bundled portrait scaled to 1920x1080 (a phone's default HDR video size), moving one pixel per frame
so no two frames are alike; x265 at ``--crf 18``. Each clip is decoded 3 times through
``megactor_rt.media.iter_video_frames`` (what every driver pass and a video portrait use), best kept.

    python bench/hdr_decode.py --out OUT     # writes hdr_decode.md / .json (about 1 minute on 2 cores)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image

from megactor_rt.assets import ASSETS_DIR
from megactor_rt.benchmark import (
    end_on_sigterm,
    record_line,
    run_record,
    save_tables,
    script_facts,
    script_out,
)
from megactor_rt.media import iter_video_frames

FRAMES, WIDTH, HEIGHT, REPEATS = 24, 1920, 1080, 3
# (name, color_primaries, color_trc, colorspace): FFmpeg's AVCOL_* codes
TAGS = [("SDR (BT.709)", 1, 1, 1), ("HLG (BT.2020)", 9, 18, 9), ("PQ (BT.2020)", 9, 16, 9)]


def pictures() -> list[np.ndarray]:
    still = np.asarray(Image.open(ASSETS_DIR / "portrait.png").convert("RGB").resize((WIDTH + FRAMES, HEIGHT)))
    return [np.ascontiguousarray(still[:, i:i + WIDTH]) for i in range(FRAMES)]


def write_clip(path: Path, frames: list[np.ndarray], primaries: int, transfer: int, matrix: int) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx265", rate=30)
        s.width, s.height, s.pix_fmt = WIDTH, HEIGHT, "yuv420p10le"
        s.options = {"x265-params": "crf=18:bframes=0:log-level=error", "preset": "ultrafast"}
        cc = s.codec_context
        cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range = primaries, transfer, matrix, 1
        for i, rgb in enumerate(frames):
            f = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p10le")
            f.color_primaries, f.color_trc, f.colorspace, f.color_range, f.pts = primaries, transfer, matrix, 1, i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def time_decode(path: Path) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        count = sum(1 for _ in iter_video_frames(path))
        best = min(best, time.perf_counter() - t0)
    assert count == FRAMES, count
    return 1000 * best / FRAMES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    script_out(args.out, "bench/hdr_decode.py")
    end_on_sigterm()  # (its scratch folder in --out removed)
    frames = pictures()
    scratch = Path(tempfile.mkdtemp(prefix="hdr-decode-", dir=args.out))
    rows: list[dict[str, Any]] = []
    try:
        for name, primaries, transfer, matrix in TAGS:
            path = scratch / f"clip-{transfer}.mov"
            write_clip(path, frames, primaries, transfer, matrix)
            rows.append({"clip": name, "color_trc": transfer, "ms_per_frame": time_decode(path)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base = rows[0]["ms_per_frame"]
    for r in rows:
        r["ratio_to_sdr"] = r["ms_per_frame"] / base
    report = {**script_facts(), **run_record(),
              "torch_threads": torch.get_num_threads(), "frames": FRAMES, "size": f"{WIDTH}x{HEIGHT}",
              "repeats": REPEATS, "rows": rows}
    lines = [record_line(report), "",
             f"Decoding {FRAMES} frames of 10-bit HEVC at {WIDTH}x{HEIGHT} to 8-bit RGB, {report['date']}, "
             f"{torch.get_num_threads()} torch threads (best of {REPEATS}):", "",
             "| clip | ms per frame | vs SDR |", "|---|---|---|"]
    lines += [f"| {r['clip']} | {r['ms_per_frame']:.1f} | {r['ratio_to_sdr']:.2f}x |" for r in rows]
    save_tables(args.out, "hdr_decode", report, "\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201 - a script's output


if __name__ == "__main__":
    main()
