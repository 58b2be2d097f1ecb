"""What ``--checkpoint-dir`` costs a step: seconds to save and to load the latents of N frames at 512 px (4 x 64 x
64 fp32 each: 64 KiB), through :class:`megactor_rt.runtime.checkpoint.StepCheckpoint` (safetensors, written to a
temporary file, fsynced and renamed), on the file system of ``--out``. Best of 3 for each size.

    python bench/checkpoint_cost.py --out OUT     # writes checkpoint_cost.md / .json (about 1 minute on 2 cores)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from megactor_rt.benchmark import (
    end_on_sigterm,
    record_line,
    run_record,
    save_tables,
    script_facts,
    script_out,
)
from megactor_rt.runtime.checkpoint import StepCheckpoint

FRAMES = (48, 1800, 18000)  # the GPU suite's clip; a minute at 30 fps; ten minutes
STEPS, REPEATS = 25, 3


def measure(scratch: Path, frames: int) -> dict[str, float]:
    latents = torch.randn(1, 4, frames, 64, 64)
    ckpt = StepCheckpoint(scratch, f"{frames:064d}", STEPS, lambda i: True)
    save_s, load_s = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        ckpt.save(0, latents)
        save_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert ckpt.load(torch.empty_like(latents)) == 1
        load_s.append(time.perf_counter() - t0)
    size = ckpt.path.stat().st_size
    ckpt.remove()
    return {"frames": frames, "mb": size / 1e6, "save_s": min(save_s), "load_s": min(load_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    script_out(args.out, "bench/checkpoint_cost.py")
    end_on_sigterm()  # (its scratch folder in --out removed)
    scratch = Path(tempfile.mkdtemp(prefix="checkpoint-cost-", dir=args.out))
    try:
        rows = [measure(scratch, n) for n in FRAMES]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {**script_facts(), **run_record(),
              "repeats": REPEATS, "rows": rows}
    lines = [record_line(report), "",
             f"Saving and loading a checkpoint of N frames at 512 px, {report['date']} (best of {REPEATS}):", "",
             "| frames | MB | save s | load s |", "|---|---|---|---|"]
    lines += [f"| {r['frames']} | {r['mb']:.0f} | {r['save_s']:.3f} | {r['load_s']:.3f} |" for r in rows]
    save_tables(args.out, "checkpoint_cost", report, "\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201 - a script's output


if __name__ == "__main__":
    main()
