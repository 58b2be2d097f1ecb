"""Where one denoiser window call spends its time (GPU): event-timed calls and a kernel profile.

For one context window (full-size SD1.5 UNet + motion modules, 512 px -> 64x64 latents, 16 frames, CFG) it
times the optimized call (with the Triton kernels for the motion-module attention and the frame-spanning
GroupNorm+SiLU, and again with each and both switched off for comparison; batch-1 down path shared by both CFG halves, bank attention in the conditional
half only) and the upstream-style call (batch 2, bank attention for both halves, uncond recomputed) with
CUDA events, counts their FLOPs (torch.utils.flop_counter), times the call a ``--feature-reuse`` step makes
instead (the shallow path from a kept deep feature) and the optimized call for ``--window-batch`` windows at
once (``AnimateConfig.window_batch``; reported per window), and profiles the optimized call: device time per
kernel class (GEMM, attention, convolution, normalisation, other) and the top kernels. Also times the
optimized call with the UNet in channels_last memory format (a layout experiment; same math), and (GPU) with
the CPU's residual order, in which channels-last activations flow on from the first transformer
(``layers.residual_add``; CUDA's order before 2026-11-27).

    python bench/profile_unet.py --out OUT            # on a GPU (fp16)
    python bench/profile_unet.py --out OUT --tiny     # the tiny model on CPU, fp32: checks the script

Writes ``profile_unet.json`` and ``profile_unet.md`` to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from megactor_rt.benchmark import (
    gpu_script_here,
    matmul_tflops,
    random_models,
    record_line,
    run_record,
    save_tables,
    script_out,
    switched_env,
)
from megactor_rt.config import full_config, tiny_config
from megactor_rt.engine.cache import write_atomic
from megactor_rt.runtime.backends import device_name

# first match wins: convolutions run as cuDNN implicit GEMMs (``sm90_xmma_fprop_implicit_gemm...``) and Inductor
# names fused pointwise kernels after the ops they follow (``triton_poi_fused_mm_t_view``), so the specific
# patterns come before the generic GEMM ones
CLASSES = (("attention", ("fmha", "flash", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
           ("other (elementwise, copies, ...)", ("triton_poi", "nchwtonhwc", "nhwctonchw")),
           ("normalisation", ("norm", "welford", "moments", "triton_red", "triton_per")),  # Inductor reductions: mostly norms
           ("convolution", ("conv", "implicit", "winograd", "dgrad", "fprop")),
           ("gemm", ("gemm", "cutlass", "xmma", "sm90_", "cublas", "matmul", "mm_", "triton_tem")))


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other (elementwise, copies, ...)"


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of fn(): CUDA events on GPU (``bench_kernels.time_ms``), wall clock elsewhere."""
    if device.type == "cuda":
        from bench_kernels import time_ms  # this folder is on sys.path when run as a script

        return time_ms(fn, warmup, iters) / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny model, 128 px, fp32 on CPU (script check)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--compile", action="store_true",
                    help="also time the optimized call through torch.compile (compile time, max |diff| vs eager)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode (e.g. max-autotune-no-cudagraphs, reduce-overhead); default Inductor's")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY (e.g. freezing=1, coordinate_descent_tuning=1); repeatable")
    ap.add_argument("--profile", nargs="+", choices=PROFILED, default=None,
                    help="which calls torch.profiler breaks down by kernel class, the first also by kernel (eager: "
                         "the optimized call, upstream: the upstream-style call, compiled: the optimized call "
                         "compiled; default: eager; none with --quick); several give a table of the classes side "
                         "by side (where the optimized call's time per FLOP goes against the upstream call's)")
    ap.add_argument("--name", default="", help="suffix of the output files (profile_unet-NAME.*)")
    ap.add_argument("--quick", action="store_true", help="skip the upstream call, the profile and channels_last")
    ap.add_argument("--window-batch", type=int, default=3, metavar="K",
                    help="also time one eager call holding K windows (reported per window; default 3, 1: skip)")
    args = ap.parse_args()
    gpu_script_here("bench/profile_unet.py", args.tiny)
    profiled = [p for p in (args.profile or (["none"] if args.quick else ["eager"])) if p != "none"]
    if "compiled" in profiled and not args.compile:
        ap.error("--profile compiled needs --compile")
    inductor_opts = dict(_parse_option(o) for o in args.inductor)
    stem = "profile_unet" + (f"-{args.name}" if args.name else "")
    script_out(args.out, "bench/profile_unet.py")
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    cfg = replace(tiny_config(), image_size=128) if args.tiny else replace(full_config(), image_size=512)
    models = random_models(cfg, dev, only=("temporal_unet", "reference_net")).to(dev, dtype)
    unet, refnet = models.unet, models.reference_net
    h, f = cfg.image_size // 8, args.frames
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dev, dtype)

    tokens = rand(1, 257, cfg.unet.cross_attention_dim)
    t = torch.tensor(500, device=dev)
    with torch.inference_mode():
        bank = refnet(rand(1, 4, h, h), t, tokens)
        kv = unet.token_kv(tokens)  # the optimized calls take the portrait's cached K/V, as in a run
    lat1, pose1 = rand(1, 9, f, h, h), rand(1, 4, f, h, h)
    lat2, pose2, tok2 = lat1.repeat(2, 1, 1, 1, 1), pose1.repeat(2, 1, 1, 1, 1), tokens.repeat(2, 1, 1)
    bank2 = [b.repeat(2, 1, 1) for b in bank]

    @torch.inference_mode()
    def optimized() -> object:
        return unet(lat1, t, tokens, pose1, bank, n_uncond=1, shared_down=True, token_kv=kv)

    k = args.window_batch
    lat_k, pose_k = lat1.repeat(k, 1, 1, 1, 1), pose1.repeat(k, 1, 1, 1, 1)

    @torch.inference_mode()
    def windows() -> object:  # K windows in one call (AnimateConfig.window_batch): the same math per window
        return unet(lat_k, t, tokens, pose_k, bank, n_uncond=1, shared_down=True, token_kv=kv)

    @torch.inference_mode()
    def upstream() -> object:
        return unet(lat2, t, tok2, pose2, bank2, n_uncond=1, upstream=True)

    with torch.inference_mode():
        _, deep = unet(lat1, t, tokens, pose1, bank, n_uncond=1, shared_down=True, keep_deep=True, token_kv=kv)

    @torch.inference_mode()
    def reusing() -> object:  # a feature-reuse step's call: the shallow path from a kept deep feature
        return unet(lat1, t, tokens, pose1, bank, n_uncond=1, shared_down=True, deep=deep, token_kv=kv)

    report: dict = {**run_record(dev),
                    "device": device_name(dev),
                    "dtype": str(dtype).replace("torch.", ""), "image_size": cfg.image_size, "frames": f,
                    "matmul_tflops": matmul_tflops(dev, dtype), "calls": {},
                    "compile_mode": args.compile_mode, "inductor": inductor_opts,
                    "profiled": profiled[0] if profiled else "none"}
    calls = (("optimized", optimized), ("upstream", upstream), (REUSING, reusing))
    for name, fn in calls[:1] if args.quick else calls:
        secs = time_call(fn, dev)
        flops = count_flops(fn)
        report["calls"][name] = {"seconds": secs, "tflop": flops / 1e12, "tflops_per_s": flops / 1e12 / secs}
    opt_tflop = report["calls"]["optimized"]["tflop"]
    if k > 1:  # cheap (eager), so also with --quick; seconds and FLOPs per window
        secs, flops = time_call(windows, dev) / k, count_flops(windows) / k
        report["calls"][f"optimized, {k} windows per call (per window)"] = {
            "seconds": secs, "tflop": flops / 1e12, "tflops_per_s": flops / 1e12 / secs}
    if dev.type == "cuda":  # the same eager call with the Triton kernels switched off (eager reads the switches)
        for label, switches in TRITON_OFF:
            with switched_env(dict.fromkeys(switches, "0")):  # restored after: gpu_all.sh may have set one to 0
                secs = time_call(optimized, dev)
            report["calls"][f"optimized, {label}"] = {"seconds": secs, "tflop": opt_tflop,
                                                      "tflops_per_s": opt_tflop / secs}
        # the residual order the CPU takes (layers.residual_add): channels-last activations flow on from the
        # first transformer, and the resnet norms fall back to PyTorch; the eager figures before 2026-11-27 had it
        from megactor_rt.models import layers

        layers.KEEP_NCHW_ON_CUDA = False
        try:
            secs = time_call(optimized, dev)
        finally:
            layers.KEEP_NCHW_ON_CUDA = True
        report["calls"][CL_FLOW] = {"seconds": secs, "tflop": opt_tflop, "tflops_per_s": opt_tflop / secs}
    # the eager rows first, so a compilation cut short by the time limit loses only its own rows
    save_tables(args.out, stem, report, markdown(report))
    if args.compile:
        import torch._inductor.config as inductor_config

        for key, value in inductor_opts.items():
            setattr(inductor_config, key, value)
        compiled_unet = torch.compile(unet, dynamic=False, mode=args.compile_mode)

        @torch.inference_mode()
        def compiled() -> torch.Tensor:
            return compiled_unet(lat1, t, tokens, pose1, bank, n_uncond=1, shared_down=True, token_kv=kv)

        try:
            t0 = time.perf_counter()
            out_c = compiled()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            out_e = optimized()
            diff = (out_c.float() - out_e.float()).abs().max().item()  # type: ignore[union-attr, attr-defined]
            secs = time_call(compiled, dev)
            report["calls"][COMPILED] = {
                "seconds": secs, "tflop": opt_tflop, "tflops_per_s": opt_tflop / secs, "compile_s": compile_s,
                "max_abs_diff_vs_eager": diff, "max_abs_eager": out_e.float().abs().max().item()}  # type: ignore
        except Exception as exc:
            report["compile_error"] = repr(exc)
        write_atomic(args.out / f"{stem}.json", json.dumps(report, indent=1).encode())

    by_call: dict[str, dict[str, float]] = {}
    for what in profiled if dev.type == "cuda" else []:
        if what == "compiled" and COMPILED not in report["calls"]:
            continue  # (its compilation failed: compile_error says why)
        try:
            kernels = profile_kernels(compiled if what == "compiled" else upstream if what == "upstream" else optimized)
        except Exception as exc:  # the timings above still count
            report["profile_error"] = repr(exc)
            continue
        classes: dict[str, float] = defaultdict(float)
        for k, s in kernels.items():
            classes[kernel_class(k)] += s
        by_call[what] = dict(classes)
        if len(by_call) == 1:  # the first call named: its classes and top kernels, as before
            report["profiled"] = what
            report["kernel_classes_s"] = dict(classes)
            report["top_kernels_s"] = sorted(kernels.items(), key=lambda kv: -kv[1])[:20]
    report.setdefault("kernel_classes_s", {})
    report.setdefault("top_kernels_s", [])
    report["kernel_classes_by_call"] = by_call
    save_tables(args.out, stem, report, markdown(report))  # (a time limit during channels_last keeps the profiles)

    if not args.quick:
        try:
            unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            secs = time_call(optimized, dev)
            report["calls"]["optimized, channels_last"] = {"seconds": secs, "tflop": opt_tflop,
                                                          "tflops_per_s": opt_tflop / secs}
        except Exception as exc:
            report["channels_last_error"] = repr(exc)
    save_tables(args.out, stem, report, markdown(report))
    print(markdown(report))  # noqa: T201 - a script's output


def profile_kernels(fn: Callable[[], object]) -> dict[str, float]:
    """Device seconds per kernel name of one ``fn()`` call under torch.profiler (CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    from bench_kernels import kernel_seconds  # this folder is on sys.path when run as a script

    return kernel_seconds(prof)


PROFILED = ("eager", "upstream", "compiled", "none")
PROFILED_CALL = {"eager": "optimized (eager)", "upstream": "upstream-style (eager)", "compiled": "compiled optimized"}
COMPILED = "optimized, torch.compile"
CL_FLOW = "optimized, channels-last flow (the CPU's residual order; before 2026-11-27 also CUDA's)"
REUSING = "optimized, a feature-reuse step (shallow path), eager"
TRITON_OFF = (("motion-module attention via SDPA", ("MEGACTOR_SHORT_ATTENTION",)),
              ("GroupNorm+SiLU via PyTorch", ("MEGACTOR_TRITON_GROUP_NORM",)),
              ("no Triton kernels", ("MEGACTOR_SHORT_ATTENTION", "MEGACTOR_TRITON_GROUP_NORM")))


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--inductor wants KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def markdown(r: dict) -> str:
    lines = [record_line(r), "",
             f"One denoiser window call on {r['device']}, {r['date']}, torch {r['torch']}, {r['dtype']}, "
             f"{r['image_size']} px, {r['frames']} frames, CFG; measured matmul rate {r['matmul_tflops']:.3g} "
             "TFLOP/s.", "", "| call | ms | TFLOP | TFLOP/s | % of matmul |", "|---|---|---|---|---|"]
    for name, c in r["calls"].items():
        lines.append(f"| {name} | {1e3 * c['seconds']:.1f} | {c['tflop']:.2f} | {c['tflops_per_s']:.1f} | "
                     f"{100 * c['tflops_per_s'] / r['matmul_tflops']:.0f} % |")
    c = r["calls"].get(COMPILED)
    if c:
        opts = ", ".join([f"mode {r.get('compile_mode')}"] + [f"{k}={v}" for k, v in r.get("inductor", {}).items()])
        lines += ["", f"torch.compile ({opts}): first call (compilation) {c['compile_s']:.1f} s; max |compiled - eager| "
                      f"{c['max_abs_diff_vs_eager']:.3g} (max |eager| {c['max_abs_eager']:.3g})."]
    for key in ("compile_error", "profile_error", "channels_last_error"):
        if key in r:
            lines += ["", f"{key}: {r[key]}"]
    total = sum(r.get("kernel_classes_s", {}).values())
    if total:
        what = PROFILED_CALL.get(r.get("profiled", "eager"), "optimized (eager)")
        lines += ["", f"{what[0].upper()}{what[1:]} call, device time by kernel class (torch.profiler):", "",
                  "| class | ms | share |", "|---|---|---|"]
        for cls, s in sorted(r["kernel_classes_s"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {cls} | {1e3 * s:.1f} | {100 * s / total:.0f} % |")
        lines += ["", "| top kernels | ms |", "|---|---|"]
        lines += [f"| `{k[:110]}` | {1e3 * s:.2f} |" for k, s in r["top_kernels_s"]]
    by_call = r.get("kernel_classes_by_call", {})
    if len(by_call) > 1:
        names = list(by_call)
        classes = sorted({c for v in by_call.values() for c in v},
                         key=lambda c: -max(v.get(c, 0) for v in by_call.values()))
        tflop = {"eager": "optimized", "upstream": "upstream", "compiled": COMPILED}
        lines += ["", "Device time by kernel class, the profiled calls side by side (ms; the last row: the call's "
                      "TFLOP per second of kernel time):", "",
                  "| class | " + " | ".join(PROFILED_CALL[n] for n in names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {c} | " + " | ".join(f"{1e3 * by_call[n].get(c, 0.0):.1f}" for n in names) + " |"
                  for c in classes]
        lines.append("| all kernels | " + " | ".join(f"{1e3 * sum(by_call[n].values()):.1f}" for n in names) + " |")
        rates = [r["calls"][tflop[n]]["tflop"] / sum(by_call[n].values()) if tflop[n] in r["calls"]
                 and sum(by_call[n].values()) else None for n in names]
        lines.append("| TFLOP/s of kernel time | " + " | ".join("-" if x is None else f"{x:.0f}" for x in rates) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
