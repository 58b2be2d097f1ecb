"""What seeking saves for ``--start``: the driver passes of a late start in a long clip, seeking to the key
frame before the start vs decoding every frame from the beginning (the behaviour before 2026-11-26), in
the same run.

Writes a long clip first (the bundled driver looped and scaled to --height, H.264 at 30 fps with x264's
default group of pictures: a key frame at most every 250 frames, scene cuts aside), then times, for each
start, pass 1 (``plan_driver``: decode + face detection of the used frames) and pass 2 (the PoseGuider
inputs) of a ``--max-frames`` segment, and checks both ways give the same frames.

    python bench/driver_start.py --out OUT                      # 1080p, 60 s clip, starts 0/10/30/55 s
    python bench/driver_start.py --out OUT --height 360 --seconds 12 --starts 0 5 10   # quick check

Writes ``driver_start.json`` and ``driver_start.md`` to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import date
from pathlib import Path

import av
import cv2
import numpy as np

from megactor_rt import media
from megactor_rt.assets import ASSETS_DIR
from megactor_rt.engine.cache import write_atomic
from megactor_rt.media import iter_video_frames
from megactor_rt.progress import set_progress_enabled
from megactor_rt.runtime.driver import iter_driver_inputs, plan_driver


def write_long_clip(path: Path, seconds: float, height: int) -> Path:
    """The bundled driver, looped back and forth, scaled to ``height`` (16:9), H.264 at 30 fps."""
    src = list(iter_video_frames(ASSETS_DIR / "driver.mp4"))
    width = round(height * 16 / 9) // 2 * 2
    n = round(seconds * 30)
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=30, options={"preset": "veryfast"})
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        cycle = src + src[-2:0:-1]
        for i in range(n):
            f = cycle[i % len(cycle)]
            s = height / f.shape[0]
            big = cv2.resize(f, (round(f.shape[1] * s), height), interpolation=cv2.INTER_LINEAR)
            canvas = np.zeros((height, width, 3), np.uint8)
            x = (width - big.shape[1]) // 2
            canvas[:, max(x, 0):max(x, 0) + min(big.shape[1], width)] = big[:, max(-x, 0):max(-x, 0) + width]
            c.mux(vs.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")))
        c.mux(vs.encode(None))
    return path


def key_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for p in c.demux(c.streams.video[0]) if p.is_keyframe)


def passes(path: Path, start: float, max_frames: int, size: int) -> tuple[float, float, list[np.ndarray]]:
    """(pass 1 s, pass 2 s, the pass-2 inputs)."""
    t0 = time.perf_counter()
    plan = plan_driver(path, max_frames=max_frames, start=start)
    t1 = time.perf_counter()
    inputs = [x.numpy() for x in iter_driver_inputs(plan, size)]
    return t1 - t0, time.perf_counter() - t1, inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the long clip")
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--starts", type=float, nargs="+", default=[0.0, 10.0, 30.0, 55.0])
    ap.add_argument("--max-frames", type=int, default=48, help="segment length (frames)")
    ap.add_argument("--size", type=int, default=512, help="model input size")
    ap.add_argument("--clip", type=Path, help="use this clip instead of writing one")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    set_progress_enabled(False)
    clip = args.clip or args.out / f"long_{args.height}p_{args.seconds:g}s.mp4"
    if not clip.exists():  # written under a temporary name: an interrupted write is never taken for the clip
        partial = clip.with_name(f".{clip.stem}.{os.getpid()}.tmp{clip.suffix}")
        try:
            write_long_clip(partial, args.seconds, args.height)
            partial.replace(clip)
        finally:
            partial.unlink(missing_ok=True)
    info = media.probe_video(clip)
    passes(clip, 0.0, 8, args.size)  # warm-up: face detector, thread pool, file cache
    rows = []
    seek_from = media.SEEK_MIN_SKIP
    for start in args.starts:
        media.SEEK_MIN_SKIP = 10**12  # decode from the beginning (the old behaviour)
        p1_old, p2_old, old = passes(clip, start, args.max_frames, args.size)
        media.SEEK_MIN_SKIP = seek_from
        p1_new, p2_new, new = passes(clip, start, args.max_frames, args.size)
        same = len(old) == len(new) and all(np.array_equal(a, b) for a, b in zip(old, new))
        rows.append({"start_s": start, "frames": len(new), "identical_inputs": same,
                     "decode_all_s": {"pass1": round(p1_old, 3), "pass2": round(p2_old, 3)},
                     "seek_s": {"pass1": round(p1_new, 3), "pass2": round(p2_new, 3)},
                     "speedup": round((p1_old + p2_old) / (p1_new + p2_new), 2)})
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip() or platform.processor()
    result = {"date": date.today().isoformat(), "device": f"CPU: {cpu}, {os.cpu_count()} cores",
              "clip": {"file": clip.name, "width": info.width, "height": info.height, "fps": str(info.fps),
                       "frames": info.num_frames, "key_frames": key_frames(clip)},
              "max_frames": args.max_frames, "size": args.size, "seek_min_skip": seek_from, "rows": rows}
    write_atomic(args.out / "driver_start.json", (json.dumps(result, indent=2) + "\n").encode())
    lines = [f"# Driver passes for a late --start ({result['date']}, {result['device']})", "",
             f"Clip: {info.width}x{info.height} H.264, {info.fps} fps, {info.num_frames} frames, "
             f"{result['clip']['key_frames']} key frames; segment of {args.max_frames} frames; model input "
             f"{args.size} px.", "",
             "| start s | frames | decode all: pass 1 + pass 2 s | seek: pass 1 + pass 2 s | speed-up | same inputs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["decode_all_s"], r["seek_s"]
        lines.append(f"| {r['start_s']:g} | {r['frames']} | {a['pass1']:.2f} + {a['pass2']:.2f} | "
                     f"{b['pass1']:.2f} + {b['pass2']:.2f} | {r['speedup']:.2f}x | {r['identical_inputs']} |")
    write_atomic(args.out / "driver_start.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
