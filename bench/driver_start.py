"""What seeking saves for ``--start``: the driver passes of a late start in a long clip, seeking to the key
frame before the start vs decoding every frame from the beginning (the behaviour before 2026-11-26), in
the same run.

Writes a long clip first (the bundled driver looped and scaled to --height, H.264 at 30 fps with x264's
default group of pictures: a key frame at most every 250 frames, scene cuts aside), then times, for each
start, pass 1 (``plan_driver``: decode + face detection of the used frames) and pass 2 (the PoseGuider
inputs) of a ``--max-frames`` segment, and checks both ways give the same frames. Each start is timed
``--repeats`` times, the two ways taking turns (decode all, seek, decode all, seek, ...), so a change of the
machine's load falls on both; the table gives each way's median and spread (min-max) and the ratio of the medians.

    python bench/driver_start.py --out OUT                      # 1080p, 60 s clip, starts 0/10/30/55 s
    python bench/driver_start.py --out OUT --height 360 --seconds 12 --starts 0 5 10 --repeats 1  # quick check

Writes ``driver_start.json`` and ``driver_start.md`` to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from megactor_rt import media
from megactor_rt.assets import ASSETS_DIR
from megactor_rt.benchmark import end_on_sigterm, record_line, run_record, script_out
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


def summary(runs: list[tuple[float, float]]) -> dict[str, Any]:
    """One way's repeats (pass 1 s, pass 2 s): the median of each pass, and of their total with its spread."""
    totals = [p1 + p2 for p1, p2 in runs]
    return {"pass1": round(statistics.median(p1 for p1, _ in runs), 3),
            "pass2": round(statistics.median(p2 for _, p2 in runs), 3),
            "median": round(statistics.median(totals), 3), "min": round(min(totals), 3),
            "max": round(max(totals), 3), "runs": [[round(p1, 3), round(p2, 3)] for p1, p2 in runs]}


def time_start(clip: Path, start: float, max_frames: int, size: int, repeats: int) -> dict[str, Any]:
    """Both ways for one start, ``repeats`` rounds of decode all then seek; every run's inputs checked against the
    first's."""
    seek_from = media.SEEK_MIN_SKIP
    runs: dict[str, list[tuple[float, float]]] = {"decode_all_s": [], "seek_s": []}
    first: list[np.ndarray] | None = None
    same = True
    try:
        for _ in range(repeats):
            for way, min_skip in (("decode_all_s", 10**12), ("seek_s", seek_from)):  # 10**12: the old behaviour
                media.SEEK_MIN_SKIP = min_skip
                p1, p2, inputs = passes(clip, start, max_frames, size)
                runs[way].append((p1, p2))
                if first is None:
                    first = inputs
                else:
                    same = same and len(first) == len(inputs) and all(np.array_equal(a, b)
                                                                      for a, b in zip(first, inputs))
    finally:
        media.SEEK_MIN_SKIP = seek_from
    old, new = summary(runs["decode_all_s"]), summary(runs["seek_s"])
    return {"start_s": start, "frames": len(first or []), "identical_inputs": same, "decode_all_s": old, "seek_s": new,
            "speedup": round(old["median"] / new["median"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the long clip")
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--starts", type=float, nargs="+", default=[0.0, 10.0, 30.0, 55.0])
    ap.add_argument("--max-frames", type=int, default=48, help="segment length (frames)")
    ap.add_argument("--size", type=int, default=512, help="model input size")
    ap.add_argument("--clip", type=Path, help="use this clip instead of writing one")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per start, the two ways taking turns in each")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    script_out(args.out, "bench/driver_start.py")
    end_on_sigterm()  # (a partial clip removed)
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
    length = info.num_frames / float(info.fps) if info.num_frames and info.fps else None
    late = [s for s in args.starts if length is not None and s >= length]
    if late:  # (was a traceback when its turn came, after the warm-up and every start before it)
        ap.error(f"{clip}: --starts {' '.join(f'{s:g}' for s in late)}: at or past the clip's end ({info.num_frames} "
                 f"frames, {length:.2f} s)")
    passes(clip, 0.0, 8, args.size)  # warm-up: face detector, thread pool, file cache
    seek_from = media.SEEK_MIN_SKIP
    rows = [time_start(clip, start, args.max_frames, args.size, args.repeats) for start in args.starts]
    record = run_record()
    result = {**record, "device": f"CPU: {record['host']['cpu']}, {record['host']['cores']} cores",
              "clip": {"file": clip.name, "width": info.width, "height": info.height, "fps": str(info.fps),
                       "frames": info.num_frames, "key_frames": key_frames(clip)},
              "max_frames": args.max_frames, "size": args.size, "seek_min_skip": seek_from, "repeats": args.repeats,
              "rows": rows}
    write_atomic(args.out / "driver_start.json", (json.dumps(result, indent=2) + "\n").encode())
    lines = [f"# Driver passes for a late --start ({result['date']}, {result['device']})", "", record_line(result), "",
             f"Clip: {info.width}x{info.height} H.264, {info.fps} fps, {info.num_frames} frames, "
             f"{result['clip']['key_frames']} key frames; segment of {args.max_frames} frames; model input "
             f"{args.size} px. {args.repeats} rounds per start, the two ways taking turns; seconds: medians, the "
             "total's spread (min-max) in brackets; speed-up: the ratio of the totals' medians.", "",
             "| start s | frames | decode all: pass 1 + pass 2 s | decode all: total s | seek: pass 1 + pass 2 s | "
             "seek: total s | speed-up | same inputs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["decode_all_s"], r["seek_s"]
        lines.append(f"| {r['start_s']:g} | {r['frames']} | {a['pass1']:.2f} + {a['pass2']:.2f} | {_spread(a)} | "
                     f"{b['pass1']:.2f} + {b['pass2']:.2f} | {_spread(b)} | {r['speedup']:.2f}x | "
                     f"{r['identical_inputs']} |")
    write_atomic(args.out / "driver_start.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


def _spread(way: dict[str, Any]) -> str:
    return f"{way['median']:.2f} ({way['min']:.2f}-{way['max']:.2f})"


if __name__ == "__main__":
    main()
