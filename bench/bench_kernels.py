"""Benchmark the fused kernels (megactor_rt.kernels) against their PyTorch references on one GPU.

For each scenario: device time per call (torch.profiler's kernel and copy time over --iters calls, after
warm-up) of the fused op and of op_ref, the achieved bandwidth over the op's minimal memory traffic, that
bandwidth as a fraction of the device's measured copy bandwidth (a large device-to-device copy), and the median
time of one call as a caller sees it (CUDA events around the call: host checks and launch included, which is
most of it for these microsecond kernels; before 2026-11-27 the table's only time). Writes bench_kernels.json
and bench_kernels.md to --out.

    python bench/bench_kernels.py --out out/bench

Without a CUDA GPU it prints that and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from megactor_rt import kernels as K
from megactor_rt.benchmark import record_line, run_record, script_out
from megactor_rt.engine.cache import write_atomic
from megactor_rt.kernels import _lib


@dataclass
class Scenario:
    name: str
    bytes_moved: int  # minimal traffic: every input byte read once, every output byte written once
    fused: Callable[[], object]
    ref: Callable[[], object]


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over iters runs, each timed with its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_seconds(prof: Any) -> dict[str, float]:
    """Device seconds per kernel name (summed over calls) of a ``torch.profiler.profile`` with CUDA activity."""
    out: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if us and getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
            out[evt.key] = out.get(evt.key, 0.0) + us / 1e6
    return out


def device_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Milliseconds of device (kernel and copy) time per fn() call, summed by torch.profiler over ``iters``
    calls: the GPU's own time, without the host's checks and launch latency, which a pair of events around one
    call of a microsecond kernel mostly measures (:func:`time_ms`)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total = sum(kernel_seconds(prof).values())
    if total <= 0:
        raise RuntimeError("torch.profiler recorded no device time (CUPTI unavailable?)")
    return 1e3 * total / iters


def copy_bandwidth_gbs(warmup: int, iters: int, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write) in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup, iters)
    return 2 * nbytes / ms / 1e6


def scenarios() -> list[Scenario]:
    out: list[Scenario] = []
    frame = torch.randint(0, 256, (1080, 1920, 3), dtype=torch.uint8, device="cuda")  # (H, W, 3)
    crop, keep = (100, 500, 900, 1300), (0, 40, 512, 472)
    for dtype in (torch.float16, torch.float32):
        res = torch.empty(3, 512, 512, dtype=dtype)
        moved = 800 * 800 * 3 + _nbytes(res)
        out.append(
            Scenario(
                f"preprocess_frame 1080x1920 crop800->512 {dtype}",
                moved,
                partial(K.preprocess_frame_cuda, frame, crop, keep, 512, dtype),
                partial(K.preprocess_frame_ref, frame, crop, keep, 512, dtype),
            )
        )
    for frames in (16, 48):
        for dtype in (torch.float16, torch.float32):
            eps_sum = torch.randn(2, 4, frames, 64, 64, device="cuda", dtype=dtype)  # (2, C, N, H, W)
            lat = torch.randn(1, 4, frames, 64, 64, device="cuda", dtype=dtype)  # (1, C, N, H, W)
            counts = torch.full((frames,), 2.0, device="cuda")
            moved = _nbytes(eps_sum, lat, lat, counts)
            out.append(
                Scenario(
                    f"ddim_cfg_update (2,4,{frames},64,64) {dtype}",
                    moved,
                    partial(K.ddim_cfg_update_cuda, eps_sum, counts, lat, 7.5, 0.3, 0.4),
                    partial(K.ddim_cfg_update_ref, eps_sum, counts, lat, 7.5, 0.3, 0.4),
                )
            )
    for dtype in (torch.float16, torch.float32):
        images = torch.rand(16, 3, 512, 512, device="cuda", dtype=dtype) * 2 - 1  # (N, 3, H, W)
        moved = _nbytes(images) + images.numel()
        out.append(
            Scenario(
                f"latents_to_uint8 (16,3,512,512) {dtype}",
                moved,
                partial(K.latents_to_uint8_cuda, images),
                partial(K.latents_to_uint8_ref, images),
            )
        )
    return out


def run(warmup: int, iters: int) -> dict:
    copy_gbs = copy_bandwidth_gbs(warmup, iters)
    lib = _lib.cuda_lib()
    rows = []
    for sc in scenarios():
        # device time (the bandwidth figures' basis), and one call's time with the host's part, as a caller sees it
        ref_ms = device_ms(sc.ref, warmup, iters)
        fused_ms = device_ms(sc.fused, warmup, iters) if lib.available else float("nan")
        row: dict[str, Any] = {"scenario": sc.name, "bytes": sc.bytes_moved, "fused_ms": fused_ms, "ref_ms": ref_ms,
                               "ref_call_ms": time_ms(sc.ref, warmup, iters),
                               "fused_call_ms": time_ms(sc.fused, warmup, iters) if lib.available else float("nan")}
        row["fused_gbs"] = sc.bytes_moved / fused_ms / 1e6
        row["ref_gbs"] = sc.bytes_moved / ref_ms / 1e6
        row["fused_frac_of_copy"] = row["fused_gbs"] / copy_gbs
        row["speedup"] = ref_ms / fused_ms
        rows.append(row)
    return {
        **run_record(torch.device("cuda", torch.cuda.current_device())),
        "device": torch.cuda.get_device_name(),
        "kernels": _lib.kernels_status(),
        "copy_gbs": copy_gbs,
        "warmup": warmup,
        "iters": iters,
        "results": rows,
    }


def to_markdown(report: dict) -> str:
    lines = [
        record_line(report),
        "",
        f"Device: {report['device']}; copy bandwidth {report['copy_gbs']:.0f} GB/s; "
        f"{report['iters']} calls after {report['warmup']} warm-up; device ms: kernel time per call "
        "(torch.profiler); call ms: median of one call between CUDA events, host part included",
        "",
        "| scenario | fused device ms | fused GB/s | % of copy | ref device ms | ref GB/s | speedup (device) "
        "| fused call ms | ref call ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['scenario']} | {r['fused_ms']:.4f} | {r['fused_gbs']:.0f} | {100 * r['fused_frac_of_copy']:.0f}% "
            f"| {r['ref_ms']:.4f} | {r['ref_gbs']:.0f} | {r['speedup']:.2f}x "
            f"| {r.get('fused_call_ms', float('nan')):.4f} | {r.get('ref_call_ms', float('nan')):.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/bench"), help="directory for JSON + markdown")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU available: nothing to benchmark.")
        return 0
    script_out(args.out, "bench/bench_kernels.py")
    report = run(args.warmup, args.iters)
    if not report["kernels"]["available"]:
        print(f"Fused kernels unavailable ({report['kernels']['reason']}); timing references only.")
    write_atomic(args.out / "bench_kernels.json", json.dumps(report, indent=2, default=str).encode())
    md = to_markdown(report)
    write_atomic(args.out / "bench_kernels.md", md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
