"""How the denoising loop's memory grows with the driver's length: wrapping windows vs open windows, streamed.

The loop's own state is what grows with the frame count: the noise and latents, the CFG accumulator and the
PoseGuider features. The networks' share is the same for every length (one window call at a time), so this
script replaces them with stand-ins to measure that state alone, quickly, at the real latent size: a
prediction that is a cheap function of the window's latents and PoseGuider features, and PoseGuider features
(fp16, 4 channels, as the real ones) computed from the frame index. Everything else is the runtime's code:
``denoise`` with the whole noise (upstream's wrapping windows, step by step) and ``denoise_stream`` from
``FrameNoise`` with a ``PoseFeed`` that releases (open windows, ``--no-wrap``), each final segment dropped as
a decoder would drop it.

Each case runs in a fresh process, so each peak is its own: on the GPU the peak of allocated memory, on the
CPU the peak resident set size, both also given as the growth over the process before the loop.

    python bench/stream_memory.py --out OUT                              # 512 px, 25 steps, 250/1000/4000 frames
    python bench/stream_memory.py --out OUT --frames 100 400 --steps 3   # quick check

Writes ``stream_memory.json`` and ``stream_memory.md`` to --out.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from megactor_rt import benchmark as B
from megactor_rt.config import StepKind
from megactor_rt.engine.cache import write_atomic
from megactor_rt.models.scheduler import DDIM, DDIMStep, context_windows
from megactor_rt.runtime.backends import device_name
from megactor_rt.runtime.denoise import denoise, denoise_stream
from megactor_rt.runtime.noise import FrameNoise, initial_noise
from megactor_rt.runtime.pipeline import to_device_queued
from megactor_rt.runtime.predictor import PoseFeed


class _PoseStandIn:
    """Stands in for the submodels in a ``PoseFeed``: features (b, 4, h, h) in fp16 from each frame's index."""

    def __init__(self, device: torch.device, h: int) -> None:
        self.device, self.h = device, h

    def pose_features(self, frames: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return (frames[:, :1, :1, :1] * 1e-3).expand(-1, 4, self.h, self.h).to(torch.float16) * scale + shift


class _Predictor:
    """An ``EpsModel`` standing in for the UNet: reads the window's PoseGuider features, as the real one does."""

    def __init__(self, feed: PoseFeed, guidance: float) -> None:
        self.feed, self.halves = feed, 2 if guidance != 1.0 else 1

    def begin_step(self, step: DDIMStep, kind: StepKind) -> None:
        self.halves = 2 if kind.cfg else 1

    def predict(self, latents: torch.Tensor, frames: torch.Tensor, step: DDIMStep, window: int) -> torch.Tensor:
        pose = self.feed.window(window, frames)
        eps = torch.sin(latents * 3 + pose.to(latents.dtype) + step.timestep * 1e-3)
        return eps.expand(self.halves, -1, -1, -1, -1)

    def end_window(self, window: int) -> None:
        self.feed.release(window)


def run_case(kind: str, n: int, size: int, steps: int, window: int, overlap: int, device: torch.device) -> dict:
    """One loop over ``n`` frames (``kind``: "wrap" or "open"); its peak memory and time."""
    h = size // 8
    base_rss = B.PeakRSS.rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    windows = context_windows(n, window, overlap, closed_loop=kind == "wrap")
    frames = (torch.full((3, 2, 2), float(i)) for i in range(n))  # the decoded driver: a stand-in
    feed = PoseFeed(_PoseStandIn(device, h), frames, n, torch.tensor(1.0, device=device),  # type: ignore[arg-type]
                    torch.tensor(0.0, device=device), windows, 16)
    model = _Predictor(feed, 4.5)
    plan = DDIM().plan(steps)
    t0 = time.perf_counter()
    checksum = 0.0
    if kind == "wrap":
        latents = denoise(initial_noise(0, (1, 4, n, h, h)).to(device), model, plan, windows, 4.5)
        checksum = float(latents.sum())
        del latents
    else:
        noise = FrameNoise(0, n, 4, h, h)
        for _, final in denoise_stream(lambda a, b: to_device_queued(noise.take(a, b), device), model, plan, windows,
                                       4.5):
            if final is not None:
                checksum += float(final.sum())  # then dropped, as after its decode
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"kind": kind, "frames": n, "seconds": seconds, "window_calls": steps * len(windows),
                           "checksum": checksum}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out |= {"peak_gb": peak / 2**30, "growth_gb": (peak - base) / 2**30, "measure": "allocated GPU memory"}
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out |= {"peak_gb": peak / 2**30, "growth_gb": (peak - base_rss) / 2**30, "measure": "resident set size"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--frames", type=int, nargs="+", default=[250, 1000, 4000])
    ap.add_argument("--size", type=int, default=512, help="image size (the latents are size / 8)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--overlap", type=int, default=8)
    ap.add_argument("--case", nargs=2, metavar=("KIND", "FRAMES"), help=argparse.SUPPRESS)  # one case, in-process
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.case:
        result = run_case(args.case[0], int(args.case[1]), args.size, args.steps, args.window, args.overlap, dev)
        print(json.dumps(result))  # noqa: T201 - read by the parent process
        return
    if args.out is None:
        ap.error("--out is required")
    if min(args.frames) < 1 or args.steps < 1 or args.window < 1 or not 0 <= args.overlap < args.window:
        ap.error(f"--frames and --steps must be at least 1 and 0 <= --overlap < --window (got --frames "
                 f"{' '.join(map(str, args.frames))}, --steps {args.steps}, --window {args.window}, --overlap "
                 f"{args.overlap})")
    B.script_out(args.out, "bench/stream_memory.py")
    B.end_on_sigterm()  # (the case running in its child process is killed too)
    report = {**B.run_record(dev), "device": device_name(dev), "size": args.size, "steps": args.steps,
              "window": args.window, "overlap": args.overlap, "results": []}
    for n in args.frames:
        for kind in ("wrap", "open"):
            cmd = [sys.executable, __file__, "--case", kind, str(n), "--size", str(args.size), "--steps",
                   str(args.steps), "--window", str(args.window), "--overlap", str(args.overlap)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"case {kind} {n} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            report["results"].append(json.loads(done.stdout.strip().splitlines()[-1]))
            # after every case: a run stopped by a time limit keeps what it measured
            write_atomic(args.out / "stream_memory.json", json.dumps(report, indent=1).encode())
            write_atomic(args.out / "stream_memory.md", markdown(report).encode())
            print(f"{kind} {n}: {report['results'][-1]['peak_gb']:.3f} GiB", file=sys.stderr)  # noqa: T201
    print(markdown(report))  # noqa: T201 - a script's output


def markdown(r: dict) -> str:
    measure = r["results"][0]["measure"] if r["results"] else "memory"
    lines = [B.record_line(r), "",
             f"Denoising-loop state vs driver length ({r['size']} px, latents {r['size'] // 8}x{r['size'] // 8}, "
             f"window {r['window']} / overlap {r['overlap']}, {r['steps']} steps, CFG; the networks replaced by "
             f"stand-ins) on {r['device']}, {r['date']}, torch {r['torch']}. Peak {measure}, each case in its "
             "own process; growth: over the process before the loop.", "",
             "| windows | frames | window calls | s | peak GiB | growth GiB |",
             "|---|---|---|---|---|---|"]
    for x in r["results"]:
        name = "wrapping, step by step" if x["kind"] == "wrap" else "open (`--no-wrap`), streamed"
        lines.append(f"| {name} | {x['frames']} | {x['window_calls']} | {x['seconds']:.1f} | {x['peak_gb']:.3f} | "
                     f"{x['growth_gb']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
