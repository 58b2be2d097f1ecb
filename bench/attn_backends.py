"""Attention kernels for the denoiser's own shapes: which SDPA backend is fastest, and how fast it is.

Records every ``scaled_dot_product_attention`` call of one optimized window call (full-size model, 512 px,
16 frames, CFG; run on the meta device, so no weights are materialised), then times each distinct shape
with each SDPA backend (cuDNN, flash, memory-efficient, math) on the GPU and reports per backend the
attention time of the whole window call (sum over calls) and its rate. Attention FLOPs: 4 x batch x heads x
Lq x Lk x head_dim (QK^T and PV).

    python bench/attn_backends.py --out OUT        # on a GPU (fp16)
    python bench/attn_backends.py --out OUT --tiny # the tiny model on CPU: checks the script

Writes ``attn_backends.json`` and ``attn_backends.md`` to --out.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from megactor_rt.benchmark import gpu_script_here, record_line, run_record, save_tables, script_out
from megactor_rt.config import full_config, tiny_config
from megactor_rt.models import layers
from megactor_rt.runtime.backends import device_name
from megactor_rt.weights import build_models

Shape = tuple[tuple[int, ...], tuple[int, ...]]  # (q shape, k shape), both (B, heads, L, d)


def record_shapes(tiny: bool, frames: int) -> Counter[Shape]:
    """SDPA (q, k) shapes of one optimized window call and how often each occurs."""
    cfg = replace(tiny_config(), image_size=128) if tiny else replace(full_config(), image_size=512)
    seen: Counter[Shape] = Counter()
    real = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: object, **kw: object) -> torch.Tensor:
        seen[(tuple(q.shape), tuple(k.shape))] += 1
        return real(q, k, v, *a, **kw)  # type: ignore[arg-type]

    with torch.device("meta"):
        models = build_models(cfg, only=("temporal_unet", "reference_net"))
    h, dev = cfg.image_size // 8, torch.device("meta")
    tokens = torch.empty(1, 257, cfg.unet.cross_attention_dim, device=dev)
    t = torch.tensor(500, device=dev)
    with torch.inference_mode():
        bank = models.reference_net(torch.empty(1, 4, h, h, device=dev), t, tokens)
        layers.F.scaled_dot_product_attention = spy  # type: ignore[attr-defined, assignment]
        try:
            models.unet(torch.empty(1, 9, frames, h, h, device=dev), t, tokens,
                        torch.empty(1, 4, frames, h, h, device=dev), bank, n_uncond=1, shared_down=True)
        finally:
            layers.F.scaled_dot_product_attention = real  # type: ignore[attr-defined]
    return seen


def attn_flops(shape: Shape) -> int:
    (b, heads, lq, d), (_, _, lk, _) = shape
    return 4 * b * heads * lq * lk * d


def main() -> None:
    from torch.nn.attention import SDPBackend

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--frames", type=int, default=16)
    args = ap.parse_args()
    if args.frames < 1:
        ap.error("--frames must be at least 1")
    gpu_script_here("bench/attn_backends.py", args.tiny)
    script_out(args.out, "bench/attn_backends.py")
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    shapes = record_shapes(args.tiny, args.frames)
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    rows = []
    for shape, count in sorted(shapes.items(), key=lambda kv: -attn_flops(kv[0]) * kv[1]):
        row = {"q": shape[0], "k": shape[1], "calls": count, "gflop_per_call": attn_flops(shape) / 1e9}
        row.update(_time_shape(shape, backends, dev, dtype))
        rows.append(row)
    report = {**run_record(dev),
              "device": device_name(dev),
              "dtype": str(dtype).replace("torch.", ""), "frames": args.frames, "shapes": rows}
    save_tables(args.out, "attn_backends", report, markdown(report))
    print(markdown(report))  # noqa: T201 - a script's output


def _time_shape(shape: Shape, backends: dict, dev: torch.device, dtype: torch.dtype) -> dict:
    """ms per call of each backend (None where it refuses the shape) and of PyTorch's own choice."""
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(shape[0], device=dev, dtype=dtype)
    k, v = torch.randn(shape[1], device=dev, dtype=dtype), torch.randn(shape[1], device=dev, dtype=dtype)

    def call() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    out: dict = {"ms": {}}
    for name, backend in backends.items():
        try:
            with sdpa_kernel([backend]):
                out["ms"][name] = _time_ms(call, dev)
        except RuntimeError as exc:  # backend does not support this shape/device
            out["ms"][name] = None
            out.setdefault("unsupported", {})[name] = str(exc).splitlines()[0][:160]
    out["ms"]["default"] = _time_ms(call, dev)
    return out


def _time_ms(fn: Callable[[], object], dev: torch.device) -> float:
    if dev.type == "cuda":
        from bench_kernels import device_ms  # this folder is on sys.path when run as a script

        return device_ms(fn, 3, 10)  # kernel time: the small shapes' host launch floor left out
    fn()
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def markdown(r: dict) -> str:
    names = ["default", "cudnn", "flash", "efficient", "math"]
    lines = [record_line(r), "",
             f"Attention calls of one optimized denoiser window call ({r['frames']} frames, CFG) on {r['device']}, "
             f"{r['date']}, torch {r['torch']}, {r['dtype']}: ms per call by SDPA backend (- = unsupported).", "",
             "| q (B,h,L,d) | k | calls | GFLOP/call | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    totals = dict.fromkeys(names, 0.0)
    best_total, flops = 0.0, 0.0
    for row in r["shapes"]:
        ms = row["ms"]
        cells = [f"{ms[n]:.3f}" if ms.get(n) is not None else "-" for n in names]
        lines.append(f"| {tuple(row['q'])} | {tuple(row['k'])} | {row['calls']} | {row['gflop_per_call']:.1f} | "
                     + " | ".join(cells) + " |")
        for n in names:
            totals[n] = totals[n] + row["calls"] * ms[n] if ms.get(n) is not None and totals[n] is not None \
                else None  # type: ignore[assignment]
        best_total += row["calls"] * min(v for v in ms.values() if v is not None)
        flops += row["calls"] * row["gflop_per_call"] * 1e9
    lines += ["", "| backend | attention ms per window call | TFLOP/s |", "|---|---|---|"]
    for n in names + ["best per shape"]:
        tot = best_total if n == "best per shape" else totals[n]
        lines.append(f"| {n} | {tot:.1f} | {flops / tot / 1e9:.0f} |" if tot else f"| {n} | - (some shape unsupported) | - |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
