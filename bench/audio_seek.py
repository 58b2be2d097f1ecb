"""The driver's audio for a result that starts late in a long clip: read from a seek vs from the beginning.

Writes a 30-minute stereo 44.1 kHz audio file twice (AAC, which an MP4 result copies packet by packet, and MP2,
which it transcodes to AAC), then times ``VideoWriter`` writing an 8 s result (200 tiny frames) with the audio
from 29:50 on, reading it both ways (best of 3, same run, same files).

    python bench/audio_seek.py --out OUT     # writes audio_seek.md / .json (about 80 s on 2 cores)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from megactor_rt import media
from megactor_rt.benchmark import (
    end_on_sigterm,
    record_line,
    run_record,
    save_tables,
    script_facts,
    script_out,
)
from megactor_rt.media import VideoWriter

MINUTES, OFFSET_S, RESULT_FRAMES = 30, 29 * 60 + 50, 200


def long_audio(path: Path, codec: str, seconds: int, rate: int = 44100) -> Path:
    """``seconds`` of a stereo tone whose pitch changes every second."""
    with av.open(str(path), "w") as c:
        s: Any = c.add_stream(codec, rate=rate)  # an audio stream (av's stubs give the union of all kinds)
        s.layout = "stereo"
        size, fmt = s.codec_context.frame_size or 1024, s.codec_context.format
        t = np.arange(size) / rate
        for i in range(0, seconds * rate, size):
            x = (0.2 * np.sin(2 * np.pi * (220 + (i // rate) % 200) * (t + i / rate))).astype(np.float32)
            data = np.stack([x, x]) if fmt.is_planar else np.stack([x, x], 1).reshape(1, -1)
            if fmt.name.startswith("s16"):
                data = (data * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt.name, layout="stereo")
            frame.sample_rate, frame.pts = rate, i
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path


def time_codec(scratch: Path, codec: str, suffix: str, how: str, frames: list[np.ndarray],
               seek_from: Fraction) -> dict[str, Any]:
    """The writer's time with a 30-minute ``codec`` audio source, reading its audio from the beginning and seeking
    (best of 3 each)."""
    src = long_audio(scratch / f"audio_{codec}{suffix}", codec, MINUTES * 60)
    seconds = {}
    for label, minimum in (("from the beginning", Fraction(10**9)), ("seek", seek_from)):
        media.AUDIO_SEEK_MIN_S = minimum
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            with VideoWriter(scratch / f"result_{codec}.mp4", Fraction(25), 64, 64, audio_source=src,
                             audio_offset=Fraction(OFFSET_S)) as w:
                for f in frames:
                    w.write(f)
            times.append(time.perf_counter() - t0)
        seconds[label] = min(times)
    return {"codec": codec, "audio": how, **seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    script_out(args.out, "bench/audio_seek.py")
    end_on_sigterm()  # (its scratch folder in --out removed)
    frames = [np.zeros((64, 64, 3), np.uint8)] * RESULT_FRAMES
    rows: list[dict[str, Any]] = []
    seek_from = media.AUDIO_SEEK_MIN_S  # the writer's own threshold; "from the beginning" raises it past the offset
    scratch = Path(tempfile.mkdtemp(prefix="audio-seek-", dir=args.out))  # the sources and results: removed
    try:  # however the run ends
        for codec, suffix, how in (("aac", ".m4a", "copied"), ("mp2", ".mka", "transcoded to AAC")):
            rows.append(time_codec(scratch, codec, suffix, how, frames, seek_from))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {**script_facts(), **run_record(),
              "source_minutes": MINUTES, "offset_s": OFFSET_S, "result_frames": RESULT_FRAMES, "rows": rows}
    lines = [record_line(report), "",
             f"Audio of an 8 s result from 29:50 of a {MINUTES}-minute file, {report['date']} (best of 3 each):", "",
             "| source audio | into the MP4 | from the beginning s | seek s | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['codec']} | {r['audio']} | {r['from the beginning']:.2f} | {r['seek']:.2f} | "
              f"{r['from the beginning'] / r['seek']:.1f}x |" for r in rows]
    save_tables(args.out, "audio_seek", report, "\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201 - a script's output


if __name__ == "__main__":
    main()
