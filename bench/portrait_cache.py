"""What the on-disk portrait store saves: per-portrait work computed vs read back, in the same run.

Prepares the bundled portrait with random full-size weights (seed 0) as a run does - VAE encode, CLIP tokens,
FiLM code, and the ReferenceNet bank of every DDIM timestep of a ``--steps`` run - times it, writes the state to
a store (``PortraitCache(disk_dir=...)``, as ``--cache-dir`` does), then times a fresh cache reading it back
(the next process's path; every tensor is read once, so lazily mapped file pages count). The face crop and
mask come before either and are not timed.

    python bench/portrait_cache.py --out OUT                    # full-size, 512 px, 25 steps (GPU: fp16)
    python bench/portrait_cache.py --out OUT --size 256         # CPU-friendly
    python bench/portrait_cache.py --out OUT --tiny             # tiny model: checks the script

Writes ``portrait_cache.json`` and ``portrait_cache.md`` to --out.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from megactor_rt import benchmark as B
from megactor_rt.assets import ASSETS_DIR
from megactor_rt.config import AnimateConfig
from megactor_rt.models.scheduler import DDIM
from megactor_rt.runtime.animator import Animator
from megactor_rt.runtime.backends import device_name
from megactor_rt.runtime.cache import PortraitCache
from megactor_rt.runtime.portrait import PortraitState


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _touch(state: PortraitState) -> float:
    """Read every tensor of a state once (a loaded file may be mapped lazily: this makes its pages count)."""
    return float(sum(t.float().sum() for t in state.tensors().values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=512, help="image size (full-size model)")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps: one bank per timestep")
    ap.add_argument("--tiny", action="store_true", help="the tiny model at 128 px (a check of the script)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    B.script_out(args.out, "bench/portrait_cache.py")
    B.end_on_sigterm()  # (its temporary store removed: hundreds of MB at full size)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "fp16" if dev.type == "cuda" else "fp32"
    sc = B.Scenario("portrait cache", "tiny" if args.tiny else "full", 128 if args.tiny else args.size, 1, 1, 0,
                    args.steps, precision=precision)
    sub, _ = B._submodels(sc, dev)
    anim = Animator(sub, AnimateConfig(steps=args.steps))
    inputs = anim.portrait_inputs(ASSETS_DIR / "portrait.png")  # crop + mask: not timed
    timesteps = DDIM(sub.config.scheduler).timesteps(args.steps)
    anim.prepare(inputs).bank(timesteps[0], sub)  # warm-up (kernels, allocator, the ReferenceNet's first
    # call); its state is dropped below

    def timed_state() -> tuple[PortraitState, float]:
        """Prepare the portrait and fill every bank of the run, as a run does; every tensor read once."""
        _sync(dev)
        t0 = time.perf_counter()
        state = anim.prepare(inputs)
        for t in timesteps:
            state.bank(t, sub)
        _touch(state)
        _sync(dev)
        return state, time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="megactor-portraits-") as store:
        anim.cache = PortraitCache(disk_dir=store)
        state, computed = timed_state()
        t0 = time.perf_counter()
        anim.cache.persist(state)
        write = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in Path(store).iterdir()) / 1e6
        anim.cache = PortraitCache(disk_dir=store)  # the next process: an empty memory cache, the same store
        calls = dict(sub.calls)
        _, loaded = timed_state()
        recomputed = {k: v - calls.get(k, 0) for k, v in sub.calls.items() if v - calls.get(k, 0)}
    if recomputed or anim.cache.disk_hits != 1:
        raise SystemExit(f"the store did not serve the state: disk hits {anim.cache.disk_hits}, calls {recomputed}")
    report = {**B.run_record(dev), "device": device_name(dev),
              "threads": torch.get_num_threads(), "model": sc.model, "image_size": sc.image_size,
              "precision": precision, "steps": args.steps, "computed_s": computed, "write_s": write,
              "loaded_s": loaded, "file_mb": size_mb, "ratio": computed / loaded}
    B.save_tables(args.out, "portrait_cache", report, markdown(report))
    print(markdown(report))  # noqa: T201 - a script's output


def markdown(r: dict) -> str:
    return "\n".join([
        B.record_line(r), "",
        f"Per-portrait work, {r['model']} model (random weights), {r['image_size']} px, {r['precision']}, "
        f"{r['steps']} timesteps, on {r['device']} ({r['threads']} threads), {r['date']}, torch {r['torch']}.",
        "",
        "| per-portrait state | s |", "|---|---|",
        f"| computed (VAE encode, CLIP, FiLM, {r['steps']} ReferenceNet banks) | {r['computed_s']:.2f} |",
        f"| written to the store ({r['file_mb']:.1f} MB) | {r['write_s']:.2f} |",
        f"| read back by a fresh cache (the next process), every tensor read once | {r['loaded_s']:.2f} |",
        "", f"Read back {r['ratio']:.0f}x faster than computed (the file was just written, so it came from the "
        "OS page cache: a cold disk adds the time to read it).", ""])


if __name__ == "__main__":
    main()
