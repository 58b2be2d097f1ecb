"""Why is the first denoising step slower? Device-busy vs wall time per step of one benchmark run.

On the H200 (docs/performance.md, 2026-11-26) the first of 25 steps took 1.2-2.0 s longer than the others in
every mode, after a warm-up run of the same window shape. This runs one mode of the `gpu-full` suite's
first scenario exactly as `megactor-rt bench` does (same submodels, FLOP ledger, warm-up and whole-run
consumer; the profiled run itself animates in this thread and discards the frames), with fewer steps,
under torch.profiler, and reports per step: wall time, the time in which at least one of the device kernels
launched in it ran (kernels on concurrent streams counted once), the difference (device idle: the host was the
bottleneck) and the kernel count. On the CPU (``--tiny`` without CUDA) there is no device time to split a step
into: busy and idle are not measured there (None in the JSON, n/a in the table, and a sentence saying why),
rather than the whole step reported as idle. It also lists call signatures the FLOP ledger saw first in the timed
run (each is counted under FlopCounterMode once, which is slow).

    python bench/profile_steps.py --out OUT                       # GPU, optimized mode, 48 frames, 3 steps
    python bench/profile_steps.py --out OUT --mode optimized+compile
    python bench/profile_steps.py --out OUT --tiny                # the dry-run scenario on CPU: checks the script

Writes ``profile_steps.json`` and ``profile_steps.md`` to --out.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import megactor_rt.runtime.animator as animator_module
from megactor_rt import benchmark as B
from megactor_rt.assets import ASSETS_DIR
from megactor_rt.runtime.backends import device_name

STEP = "megactor denoise step "
NOT_MEASURED = ("Device time is not measured on the CPU: the busy time is the time in which the CUDA kernels "
                "torch.profiler records in each step ran, and a CPU run launches none, so each step's wall time is "
                "host time, not device idle time.")


def _with_step_ranges(denoise):  # type: ignore[no-untyped-def]
    """``denoise`` whose steps are profiler ranges named ``STEP + i`` (after the caller's own on_step hook,
    which synchronises the device first)."""
    def wrapped(*args, on_step=None, **kwargs):  # type: ignore[no-untyped-def]
        steps = len(args[2])
        open_ranges: list[record_function] = []

        def hook(i: int) -> None:
            if on_step is not None:
                on_step(i)
            if open_ranges:
                open_ranges.pop().__exit__(None, None, None)
            if i < steps:
                rf = record_function(f"{STEP}{i}")
                rf.__enter__()
                open_ranges.append(rf)
        return denoise(*args, on_step=hook, **kwargs)
    return wrapped


def mode_refusal(mode: str) -> str | None:
    """Why ``--mode`` cannot be profiled here (None: it can). This script runs the torch networks with the mode's
    run and torch settings: a graph backend's mode would be the torch run under its name, and open windows
    (``no-wrap``) have no step that spans the clip (an empty table)."""
    from megactor_rt.config import Mode

    base, *variants = mode.split("+")
    unknown = [v for v in variants if v not in B.VARIANTS]
    if base not in {m.value for m in Mode} or unknown:
        return (f"--mode {mode}: not a mode: {' or '.join(m.value for m in Mode)}, each optionally with variants "
                f"{', '.join('+' + v for v in B.VARIANTS)}")
    if B.mode_backend(mode)["name"] != "torch":
        return f"--mode {mode}: this script profiles the torch networks, not the exported graphs of a graph backend"
    if "no-wrap" in variants:
        return f"--mode {mode}: open windows are denoised window by window, so no step spans the clip"
    problem = B.mode_problem(mode)
    return None if problem is None else f"--mode {problem.removeprefix('mode ')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", default="optimized", help="a mode of the gpu-full suite (e.g. optimized+compile)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="the dry-run (tiny, CPU) form of the scenario")
    args = ap.parse_args()
    refused = mode_refusal(args.mode)
    if refused:
        ap.error(refused)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    B.gpu_script_here("bench/profile_steps.py", args.tiny)
    B.script_out(args.out, "bench/profile_steps.py")
    B.end_on_sigterm()  # (its temporary work folder removed)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    sc = B.SUITES["gpu-full"][0]
    sc = replace(B.shrink(sc, dev) if args.tiny else sc, steps=args.steps, modes=(args.mode,))
    sub, ledger = B._submodels(sc, dev)
    animator_module.denoise = _with_step_ranges(animator_module.denoise)
    # the mode's kernel switches (upstream-ops) for its runs, as `megactor-rt bench` sets them
    with tempfile.TemporaryDirectory(prefix="megactor-steps-") as work, B.switched_env(B.mode_env(args.mode)):
        cfg, sub_options = B.mode_settings(sc, args.mode, Path(work))
        for k, v in sub_options.items():
            setattr(sub, k, v)
        driver = B.driver_of_length(sc.frames, Path(work))
        anim = animator_module.Animator(sub, cfg)
        inputs = anim.portrait_inputs(ASSETS_DIR / "portrait.png")
        B.warm_up(sc, cfg, anim, inputs, ledger, driver, Path(work))
        anim.cache = type(anim.cache)()
        known = set(ledger.table)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=activities) as prof:  # in this thread (the profiler's ranges are per thread)
            for _ in anim.animate(anim.prepare(inputs), driver, config=cfg):
                pass  # frames discarded: the steps are what is looked at
        stats = anim.last_stats
    new_signatures = [repr(k)[:200] for k in ledger.table if k not in known]

    ranges, kernels = step_events(prof.events())
    rows = step_rows(dev, ranges, kernels, stats.step_seconds)
    report = {**B.run_record(dev), "device": device_name(dev),
              "device_time": "measured (CUDA kernels under torch.profiler)" if dev.type == "cuda" else NOT_MEASURED,
              "scenario": sc.name, "mode": args.mode, "frames": sc.frames, "steps": sc.steps,
              "stage_s": dict(stats.stage_seconds), "per_step": rows,
              "new_flop_signatures_in_timed_run": new_signatures}
    B.save_tables(args.out, "profile_steps", report, markdown(report))
    print(markdown(report))  # noqa: T201 - a script's output


def step_events(events: Any) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """The steps' host-side ranges (index, start, end in us) and the CUDA kernels (start, duration in us) of a
    profile's events. With CUDA activity torch.profiler also puts each ``record_function`` range on the device's
    timeline (a user annotation of device type CUDA, as long as the step's kernels): neither a step's range
    (2026-11-29 on the H200: every step listed twice, the second row given the next step's time) nor a kernel
    (it counted each step's own length as device busy time)."""
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    ranges = sorted((int(e.name[len(STEP):]), e.time_range.start, e.time_range.end) for e in events
                    if e.name.startswith(STEP) and getattr(e, "device_type", cpu) == cpu)
    kernels = [(e.time_range.start, e.time_range.end - e.time_range.start) for e in events
               if getattr(e, "device_type", None) == cuda and not getattr(e, "is_user_annotation", False)
               and not e.name.startswith(STEP)]
    return ranges, kernels


def busy_us(kernels: list[tuple[int, int]]) -> int:
    """Microseconds in which at least one of the kernels (start, duration) ran: kernels on concurrent streams
    (the optimized mode's PoseGuider and decode streams) overlap, and their summed durations can exceed the
    wall time."""
    total, reach = 0, None
    for start, dur in sorted(kernels):
        end = start + dur
        if reach is None or start >= reach:
            total += dur
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def step_rows(dev: torch.device, ranges: list[tuple[int, int, int]], kernels: list[tuple[int, int]],
              step_seconds: list[float]) -> list[dict]:
    """Per step (its profiler range: index, start and end in us): wall seconds, and the device's busy and idle
    seconds and kernel count from the CUDA kernels (start, duration in us) that began in it (busy: the time at
    least one of them ran, :func:`busy_us`). Not measured (None)
    off CUDA: without CUDA activity there is no device time to split a step into."""
    rows: list[dict] = []
    for (i, start, end), wall in zip(ranges, step_seconds):
        if dev.type != "cuda":
            rows.append({"step": i, "wall_s": wall, "device_busy_s": None, "device_idle_s": None, "kernels": None})
            continue
        inside = [(s, d) for s, d in kernels if start <= s < end]
        busy = busy_us(inside) / 1e6
        rows.append({"step": i, "wall_s": wall, "device_busy_s": busy, "device_idle_s": wall - busy,
                     "kernels": len(inside)})
    return rows


def markdown(r: dict) -> str:
    lines = [B.record_line(r), "",
             f"Per-step device time, {r['scenario']} [{r['mode']}], {r['steps']} steps, on {r['device']}, "
             f"{r['date']}, torch {r['torch']} (under torch.profiler: its overhead is in every step).", ""]
    if r.get("device_time") == NOT_MEASURED:
        lines += [NOT_MEASURED, ""]
    lines += ["| step | wall s | device busy s | device idle s | kernels |", "|---|---|---|---|---|"]
    lines += [f"| {x['step']} | {x['wall_s']:.3f} | {_s(x['device_busy_s'])} | {_s(x['device_idle_s'])} | "
              f"{'n/a' if x['kernels'] is None else x['kernels']} |" for x in r["per_step"]]
    feed = r["stage_s"].get("driver+pose_guider")
    if feed is not None and not r["mode"].startswith("reference"):
        lines += ["", f"Step 0 includes {feed:.3f} s of host time on the driver's second pass and the PoseGuider "
                      "(the optimized mode computes them as the windows of step 0 first need their frames)."]
    sigs = r["new_flop_signatures_in_timed_run"]
    lines += ["", f"FLOP-ledger signatures first seen in the timed run: {len(sigs)}"]
    lines += [f"* `{s}`" for s in sigs]
    return "\n".join(lines) + "\n"


def _s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.3f}"


if __name__ == "__main__":
    main()
