"""What a driver pass costs per frame by the driver's form: the bundled driver's frames read as its H.264 file,
as a PNG sequence (this engine's own result format, zlib level 1) and as a JPEG sequence (quality 95), each
through what a run's passes use (``megactor_rt.runtime.driver.driver_frames``), 3 times, best kept.

    python bench/sequence_read.py --out OUT     # writes sequence_read.md / .json (about 30 s on 2 cores)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

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
from megactor_rt.media import iter_video_frames, result_writer
from megactor_rt.runtime.driver import driver_frames, driver_source

REPEATS = 3


def time_pass(driver: Path) -> tuple[float, int]:
    """Best seconds of one whole pass over ``driver``, and its frame count."""
    best, count = float("inf"), 0
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        count = sum(1 for _ in driver_frames(driver_source(driver)))
        best = min(best, time.perf_counter() - t0)
    return best, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    script_out(args.out, "bench/sequence_read.py")
    end_on_sigterm()  # (its scratch folder in --out removed)
    video = ASSETS_DIR / "driver.mp4"
    frames = list(iter_video_frames(video))
    height, width = frames[0].shape[:2]
    scratch = Path(tempfile.mkdtemp(prefix="sequence-read-", dir=args.out))  # removed however the run ends
    try:
        with result_writer(scratch / "png" / "%05d.png", Fraction(30), width, height) as w:
            for f in frames:
                w.write(f)
        (scratch / "jpg").mkdir()
        for i, f in enumerate(frames, 1):
            Image.fromarray(f).save(scratch / "jpg" / f"{i:05d}.jpg", quality=95)
        rows: list[dict[str, Any]] = []
        for name, driver in (("H.264 file (.mp4)", video), ("PNG sequence", scratch / "png" / "%05d.png"),
                             ("JPEG sequence (quality 95)", scratch / "jpg" / "%05d.jpg")):
            seconds, count = time_pass(driver)
            rows.append({"driver": name, "frames": count, "ms_per_frame": 1000 * seconds / count})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {**script_facts(), **run_record(), "size": f"{width}x{height}", "repeats": REPEATS, "rows": rows}
    lines = [record_line(report), "",
             f"One driver pass over the bundled driver's {len(frames)} frames ({width}x{height}), {report['date']} "
             f"(best of {REPEATS}):", "", "| driver | frames | ms per frame |", "|---|---|---|"]
    lines += [f"| {r['driver']} | {r['frames']} | {r['ms_per_frame']:.1f} |" for r in rows]
    save_tables(args.out, "sequence_read", report, "\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201 - a script's output


if __name__ == "__main__":
    main()
