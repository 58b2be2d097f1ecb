"""Benchmark smoke run (CI): the suite machinery runs end to end and its derived figures are consistent."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megactor_rt.benchmark import FlopLedger, run_bench


def test_cpu_smoke_suite(tmp_path):
    report = run_bench("cpu-smoke", tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["suite"] == "cpu-smoke" and saved["matmul_tflops"] > 0
    modes = {r["mode"]: r for r in saved["results"]}
    assert set(modes) == {"reference", "optimized"}
    for r in modes.values():
        assert r["frames"] == 4 and r["fps"] > 0 and r["first_frame_s"] <= r["total_s"]
        assert r["stage_s"]["denoise"] > 0 and r["peak_memory_gb"] > 0
        assert 0 <= r["run_memory_gb"] < r["peak_memory_gb"]  # (the run's own: its growth, not the process's)
    assert saved["complete"] is True and saved["memory"] == "resident" and len(saved["matmul_samples_tflops"]) == 2
    ref, opt = modes["reference"]["flops"], modes["optimized"]["flops"]
    # upstream evaluation does strictly more denoiser work: batch-2 ReferenceNet, PoseGuider in every call,
    # bank attention for both halves; same number of UNet calls
    assert ref["reference_bank"] > 1.9 * opt["reference_bank"]
    assert ref["unet"] > opt["unet"] and "pose_guider_full" in ref
    assert modes["reference"]["calls"]["unet"] == modes["optimized"]["calls"]["unet"]
    md = (tmp_path / "results.md").read_text()
    assert "| reference |" in md and "FLOP ratio" in md
    assert report["results"] == saved["results"]


def test_flop_ledger_counts_each_signature_once():
    import torch

    class Sub:
        def unet(self, x, t):
            return x @ x

    sub = Sub()
    ledger = FlopLedger(sub)  # wraps the methods sub has
    x = torch.randn(8, 8)
    sub.unet(x, 1)
    sub.unet(x, 2)
    sub.unet(torch.randn(4, 4), 1)
    assert len(ledger.table) == 2
    assert ledger.totals["unet"] == 2 * (2 * 8**3) + 2 * 4**3


def test_a_compiled_unets_first_call_is_counted_eager_and_made_compiled_outside_the_counter():
    """With ``compile`` on, a new signature is counted by an eager call and then really made, compiled,
    outside the FLOP counter: a torch.compile'd module first called under the counter (a dispatch mode) is
    never compiled afterwards, so a mode such as ``optimized+compile`` run first would have been timed eager.
    The call counters see the real call only."""
    from collections import Counter

    import torch
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    seen = []

    class Sub:
        compile = True

        def __init__(self):
            self.calls = Counter()

        def unet(self, x):
            self.calls["unet"] += 1
            seen.append((self.compile, _get_current_dispatch_mode() is not None))
            return x @ x

    sub = Sub()
    ledger = FlopLedger(sub)
    x = torch.randn(8, 8)
    sub.unet(x)
    assert seen == [(False, True), (True, False)]  # counted eager under the counter, then the compiled call
    sub.unet(x)
    assert seen[2:] == [(True, False)] and sub.calls["unet"] == 2 and ledger.totals["unet"] == 2 * (2 * 8**3)


def test_a_failing_mode_is_recorded_and_the_next_mode_still_runs(tmp_path, monkeypatch):
    import torch

    from megactor_rt import benchmark

    def broken_compile(*args, **kwargs):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setitem(benchmark.SUITES, "test-errors", [
        benchmark.Scenario("tiny, 2 frames", "tiny", 128, 2, 2, 1, 1, modes=("optimized+compile", "optimized"))])
    report = run_bench("test-errors", tmp_path)
    assert [e["mode"] for e in report["errors"]] == ["optimized+compile"]
    assert "compiler exploded" in report["errors"][0]["error"]
    assert [r["mode"] for r in report["results"]] == ["optimized"]
    assert "[optimized+compile] failed:** RuntimeError: compiler exploded" in (tmp_path / "results.md").read_text()


def test_cpu_stream_suite_dry_run(tmp_path):
    """The streamed open-window variant runs through the benchmark (dry run: tiny model, 10 frames, window 4 /
    overlap 3): fewer window calls than the wrapped run (7 open windows, 10 wrapping), per-step times only for
    the step-by-step run, and the variant's ratios in the table."""
    run_bench("cpu-stream", tmp_path, dry_run=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    modes = {r["mode"]: r for r in saved["results"]}
    assert set(modes) == {"optimized", "optimized+no-wrap"} and saved["errors"] == []
    wrapped, open_ = modes["optimized"], modes["optimized+no-wrap"]
    assert wrapped["calls"]["unet"] == 10 * 2 and open_["calls"]["unet"] == 7 * 2
    assert len(wrapped["step_s"]) == 2 and open_["step_s"] == []
    assert open_["frames"] == 10 and 0 < open_["first_frame_s"] < open_["total_s"]
    assert "optimized+no-wrap" in (tmp_path / "results.md").read_text()


def test_graph_backend_modes_run_the_same_networks(tmp_path, monkeypatch, caplog):
    """An onnxruntime mode runs the exported graphs of the same random networks (every graph it needs called,
    none the run does not need exported) and counts the FLOPs of the torch networks' calls: the same totals as
    a torch-only run; modes a graph backend cannot run are recorded with the reason, and named before the
    first mode runs."""
    from megactor_rt import benchmark

    monkeypatch.setitem(benchmark.SUITES, "test-backends", [benchmark.Scenario(
        "tiny, 4 frames", "tiny", 128, 4, 4, 2, 1,
        modes=("optimized+onnxruntime", "reference+onnxruntime", "optimized+onnxruntime+compile",
               "optimized+tensorrt", "optimized+fp16-softmax"))])
    monkeypatch.setattr(benchmark, "_MODELS", {})  # a fresh FLOP table: counted through the onnxruntime mode
    with caplog.at_level(logging.INFO, logger="megactor_rt.benchmark"):
        report = run_bench("test-backends", tmp_path / "graphs")
    said = [r.getMessage() for r in caplog.records]
    assert "mode(s) optimized+tensorrt will be recorded as errors" in said[0] and "warming up" in said[1], said
    (ort,) = report["results"]
    assert ort["mode"] == "optimized+onnxruntime" and ort["frames"] == 4 and ort["fps"] > 0
    assert ort["calls"]["temporal_unet"] == 1 and ort["calls"]["reference_net"] == 1  # 1 window, 1 step, CFG
    assert {"pose_guider", "vae_decoder"} <= set(ort["calls"])  # (the portrait's calls come before the count)
    errors = {e["mode"]: e["error"] for e in report["errors"]}
    assert "optimized mode only" in errors["reference+onnxruntime"]
    assert "without torch settings" in errors["optimized+onnxruntime+compile"]
    assert "tensorrt" in errors["optimized+tensorrt"] and "unavailable" in errors["optimized+tensorrt"]
    assert "add a graph backend" in errors["optimized+fp16-softmax"]

    monkeypatch.setattr(benchmark, "_MODELS", {})
    monkeypatch.setitem(benchmark.SUITES, "test-torch", [benchmark.Scenario(
        "tiny, 4 frames", "tiny", 128, 4, 4, 2, 1, modes=("optimized",))])
    (torch_run,) = run_bench("test-torch", tmp_path / "torch")["results"]
    assert ort["flops"] == torch_run["flops"] and ort["flops"]["unet"] > 0


def test_a_suite_mode_with_other_variants_runs_where_that_mode_does():
    from megactor_rt import benchmark

    gpu = benchmark.SUITES["gpu-full"]
    chosen = benchmark.select_modes("gpu-full", gpu, ["reference", "optimized+tensorrt"])
    assert [s.modes for s in chosen] == [("reference", "optimized+tensorrt")] + [("optimized+tensorrt",)] * (len(gpu) - 1)
    assert benchmark.select_modes("gpu-full", gpu, ["optimized+compile"])[0].modes == ("optimized+compile",)


def test_the_cli_names_every_suite():
    from megactor_rt import benchmark, cli

    assert set(cli.SUITE_HELP.split(", ")) == set(benchmark.SUITES)


def test_the_warm_up_meets_the_calls_of_window_batch_windows():
    """A mode running K windows per UNet call warms up on calls of the sizes the timed run makes, and no others
    (a compiled UNet compiles per call size); one window per call warms up on one window."""
    from megactor_rt.benchmark import SUITES, mode_settings, warmup_config
    from megactor_rt.models.scheduler import context_windows
    from megactor_rt.runtime.denoise import window_batches

    def sizes(sc, cfg):
        return {len(g) for g in window_batches(context_windows(cfg.max_frames, sc.window, sc.overlap),
                                               cfg.window_batch)}

    for suite, mode in (("gpu-full", "optimized"), ("gpu-full", "optimized+batch3"),
                        ("cpu-window-batch", "optimized+batch3")):
        sc = SUITES[suite][0]
        cfg, _ = mode_settings(sc, mode, None)  # type: ignore[arg-type]
        warm = warmup_config(sc, cfg)
        assert sizes(sc, warm) == sizes(sc, cfg) and warm.steps == 1
        assert warm.max_frames == (sc.window if mode == "optimized" else sc.frames)


def test_scenarios_picks_a_suite_s_scenarios_by_position(tmp_path):
    from megactor_rt.benchmark import SUITES

    report = run_bench("cpu-window-batch", tmp_path, dry_run=True, only=[2], modes=["optimized"])
    [name] = [s["name"] for s in report["scenarios"]]  # (the dry run's own sizes named: they are not the label's)
    assert name.startswith(SUITES["cpu-window-batch"][1].name + " [dry run: tiny 128px, ") and "2 steps]" in name
    assert [r["mode"] for r in report["results"]] == ["optimized"] and not report["errors"]


def test_profile_kernel_classes_put_implicit_gemm_convolutions_with_convolutions():
    """bench/profile_unet.py's kernel classes: cuDNN's implicit-GEMM convolutions are convolutions, Inductor's
    fused pointwise kernels named after a matmul are elementwise, layout copies are copies (all three were
    GEMM or convolution before, which skewed the compiled call's split in docs/performance.md)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from profile_unet import kernel_class

    cases = {"sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x256x64_cudnn": "convolution",
             "triton_poi_fused_mm_t_view_3": "other (elementwise, copies, ...)",
             "void cudnn::ops::nchwToNhwcKernel<__half>": "other (elementwise, copies, ...)",
             "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64": "gemm", "triton_tem_fused_mm_1": "gemm",
             "triton_red_fused_native_group_norm_0": "normalisation",
             "cudnn_generated_fort_native_sdpa_sm90_knob_7": "attention"}
    assert {name: kernel_class(name) for name in cases} == cases


def test_ratio_table_uses_each_modes_median_and_both_flop_ratios():
    """The reference-vs-mode table takes each mode's median over its repeats (was: the last repeat) and
    gives the denoise stage's FLOP ratio beside the whole run's (was: only the whole run's, next to the
    denoise speed-up)."""
    from megactor_rt.benchmark import markdown

    def result(mode, total, denoise, unet_flops):
        return {"scenario": "s", "mode": mode, "frames": 4, "total_s": total, "fps": 4 / total,
                "first_frame_s": total, "stage_s": {"denoise": denoise}, "flops": {"unet": unet_flops,
                "vae_decode": 1.0}, "denoise_tflops_per_s": 1.0, "peak_memory_gb": 1.0, "warmup_s": 1.0}

    report = {"suite": "t", "device": "cpu", "date": "2026-11-27", "torch": "x", "threads": 2,
              "matmul_tflops": 2.0, "matmul_dtype": "float32",
              "results": [result("reference", 10.0, 8.0, 3.0), result("reference", 12.0, 9.0, 3.0),
                          result("reference", 30.0, 20.0, 3.0),
                          result("optimized", 5.0, 4.0, 1.0), result("optimized", 6.0, 4.5, 1.0),
                          result("optimized", 2.0, 1.0, 1.0), result("optimized+no-wrap", 4.0, 3.0, 1.0)]}
    md = markdown(report)
    # medians: reference 12 s / 9 s, optimized 5 s / 4 s; FLOPs: denoise 3/1, whole run 4/2
    assert "| s | optimized | yes | 2.40x | 2.25x | 3.00x | 2.00x |" in md, md
    # open windows change the output: its speed-up is marked as not the same math
    assert "| s | optimized+no-wrap | no | 3.00x | 3.00x | 3.00x | 2.00x |" in md, md
    assert "Incomplete" not in md and "Memory:" not in md  # (a report from before either was recorded)


def test_an_incomplete_report_says_how_many_timed_runs_were_planned() -> None:
    """A suite stopped part way (Ctrl-C, a GPU machine's time limit) said "1 of the suite's timed runs are here",
    not of how many: the planned runs (each scenario's modes times its repeats, as the report records them) are
    given, so a reader sees how much of the suite the figures cover."""
    from megactor_rt.benchmark import markdown

    row = {"scenario": "s", "mode": "reference", "frames": 4, "total_s": 2.0, "fps": 2.0, "first_frame_s": 1.0,
           "stage_s": {"denoise": 1.0}, "flops": {"unet": 1.0}, "denoise_tflops_per_s": 1.0, "peak_memory_gb": 0.91,
           "warmup_s": 1.0}
    scenarios = [{"name": "s", "modes": ["reference", "optimized"], "repeats": 2},
                 {"name": "t", "modes": ["optimized"], "repeats": 1}]
    report = {"suite": "t", "device": "cpu", "date": "2026-11-29", "torch": "x", "threads": 2, "matmul_tflops": 2.0,
              "matmul_dtype": "float32", "matmul_samples_tflops": [2.0], "results": [row], "complete": False,
              "scenarios": scenarios}
    md = markdown(report)
    assert "**Incomplete**: 1 of the suite's timed runs are here (5 planned: 2 scenario(s)" in md, md
    assert "the run was stopped, or is still under way)." in md


def test_an_incomplete_report_names_the_runs_it_lacks() -> None:
    """A report cut short said how many timed runs it had of how many planned, not which: after a GPU machine's
    time limit the reader had to work out from the rows which modes were never reached. It names them (a mode
    recorded as failed is left to its error line)."""
    from megactor_rt.benchmark import markdown

    def row(scenario: str, mode: str) -> dict:
        return {"scenario": scenario, "mode": mode, "frames": 4, "total_s": 2.0, "fps": 2.0, "first_frame_s": 1.0,
                "stage_s": {"denoise": 1.0}, "flops": {"unet": 1.0}, "denoise_tflops_per_s": 1.0,
                "peak_memory_gb": 0.91, "warmup_s": 1.0}

    scenarios = [{"name": "s", "modes": ["reference", "optimized", "optimized+compile"], "repeats": 2},
                 {"name": "t", "modes": ["optimized", "optimized+batch3"], "repeats": 1}]
    report = {"suite": "t", "device": "cpu", "date": "2026-11-29", "torch": "x", "threads": 2, "matmul_tflops": 2.0,
              "matmul_dtype": "float32", "matmul_samples_tflops": [2.0], "complete": False, "scenarios": scenarios,
              "results": [row("s", "reference"), row("s", "optimized"), row("s", "reference"), row("t", "optimized")],
              "errors": [{"scenario": "s", "mode": "optimized+compile", "error": "RuntimeError: x"}]}
    md = markdown(report)
    assert "**Incomplete**: 4 of the suite's timed runs are here (8 planned" in md, md
    assert "Not measured (yet): s [optimized] (1 of its 2 runs); t [optimized+batch3]." in md, md
    assert "Not measured" not in markdown({**report, "complete": True})


def test_a_report_says_what_its_memory_is_and_whether_it_is_complete() -> None:
    """The memory columns say what they measure (CPU: the process's resident peak, which grew with the modes run
    before it, and the run's own growth; CUDA: torch's allocations only), and a report cut short says it is
    (it looked complete, and claimed a matmul sample "after the runs" that was never taken)."""
    from megactor_rt.benchmark import markdown

    row = {"scenario": "s", "mode": "reference", "frames": 4, "total_s": 2.0, "fps": 2.0, "first_frame_s": 1.0,
           "stage_s": {"denoise": 1.0}, "flops": {"unet": 1.0}, "denoise_tflops_per_s": 1.0, "peak_memory_gb": 0.91,
           "run_memory_gb": 0.08, "warmup_s": 1.0}
    report = {"suite": "t", "device": "cpu", "date": "2026-11-29", "torch": "x", "threads": 2, "matmul_tflops": 2.0,
              "matmul_dtype": "float32", "matmul_samples_tflops": [2.0], "results": [row], "complete": False,
              "memory": "resident"}
    md = markdown(report)
    assert "**Incomplete**: 1 of the suite's timed runs are here" in md and "measured before the runs only" in md
    assert "Memory: the process's peak resident memory" in md and "| 0.91 | 0.08 | 1.0 |" in md, md
    md = markdown({**report, "complete": True, "matmul_samples_tflops": [1.5, 2.0], "memory": "cuda allocated"})
    assert "Incomplete" not in md and "the best of 1.500 and 2.000, measured before and after the runs" in md
    assert "TensorRT's and onnxruntime's own allocations are not in it" in md


def test_modes_are_told_apart_by_math_and_by_cuda_graphs():
    from megactor_rt.benchmark import changes_math, replays_cuda_graphs

    assert [changes_math(m) for m in ("optimized", "optimized+compile+batch3", "optimized+tiny-decoder",
                                      "optimized+no-wrap", "optimized+tensorrt+fp16-softmax")] == \
        [False, False, True, True, True]
    assert [replays_cuda_graphs(m) for m in ("optimized+compile", "optimized+compile-graphs",
                                             "optimized+tensorrt", "optimized+tensorrt-graphs")] == \
        [False, True, False, True]


def test_modes_warm_up_twice_for_cuda_graphs_and_release_their_portrait_state(tmp_path, monkeypatch):
    """A mode that replays CUDA graphs makes its warm-up run twice (graphs are recorded on the second call of a
    shape, which would otherwise fall in the timed run). After its warm-up and after each timed run a mode
    drops the portrait state its cache keeps, so the next mode's peak memory does not include it."""
    from megactor_rt import benchmark

    runs, held = [], []
    consume, timed = benchmark._consume, benchmark._ModeRun.timed

    def count(anim, inputs, driver, cfg, work_dir):
        runs.append(cfg.steps)
        return consume(anim, inputs, driver, cfg, work_dir)

    def spy(self, *args):
        out = timed(self, *args)
        held.append(len(self.anim.cache))
        return out

    monkeypatch.setattr(benchmark, "_consume", count)
    monkeypatch.setattr(benchmark._ModeRun, "timed", spy)
    monkeypatch.setattr(benchmark, "replays_cuda_graphs", lambda mode: mode == "optimized+batch2")
    monkeypatch.setitem(benchmark.SUITES, "test-graphs", [benchmark.Scenario(
        "tiny, 2 frames", "tiny", 128, 2, 2, 1, 2, modes=("optimized", "optimized+batch2"))])
    report = run_bench("test-graphs", tmp_path)
    assert not report["errors"]
    assert runs == [1, 2, 1, 1, 2], runs  # warm-up, timed; warm-up twice, timed
    assert held == [0, 0], held


def test_the_warm_up_counts_every_call_size_of_the_timed_run(tmp_path, monkeypatch):
    """After the warm-up (one window) the FLOP ledger knows every call signature the timed run makes: the
    PoseGuider's batches of all the run's frames and the decoder's last, shorter batch are counted untimed
    (counted inside the timed run, under the slow FLOP counter, they lengthened its stages). Without those
    untimed calls the run reports them as first counted in it. The tiny decoder's FLOPs are counted; the
    optimized mode's PoseGuider FLOPs are part of the denoise stage's."""
    from megactor_rt import benchmark

    monkeypatch.setitem(benchmark.SUITES, "test-warm", [benchmark.Scenario(
        "tiny, 6 frames", "tiny", 128, 6, 4, 2, 1, modes=("optimized", "optimized+tiny-decoder", "reference"))])
    report = run_bench("test-warm", tmp_path / "a")
    assert not report["errors"]
    modes = {r["mode"]: r for r in report["results"]}
    assert all(r["first_counted"] == [] for r in modes.values()), modes
    opt, tiny = modes["optimized"], modes["optimized+tiny-decoder"]
    assert tiny["flops"]["tiny_decode"] > 0 and "vae_decode" not in tiny["flops"]
    assert opt["flops"]["pose_features"] > 0
    denoise = sum(opt["flops"][k] for k in ("unet", "reference_bank", "pose_features"))
    assert abs(opt["denoise_tflops_per_s"] * opt["stage_s"]["denoise"] - denoise) < 1e-9 * max(denoise, 1)
    import subprocess
    from pathlib import Path

    git = subprocess.run(["git", "-C", str(Path(benchmark.__file__).parents[1]), "rev-parse", "HEAD"],
                         capture_output=True, text=True)
    if git.returncode == 0:  # a git checkout (CI's is): the run names its commit
        assert report["provenance"]["commit"] == git.stdout.strip()
    assert len(report["matmul_samples_tflops"]) == 2
    assert report["matmul_tflops"] == max(report["matmul_samples_tflops"])

    monkeypatch.setattr(benchmark, "_MODELS", {})  # a fresh FLOP table
    monkeypatch.setattr(benchmark, "batch_sizes", lambda n, batch: set())  # the warm-up's window only
    monkeypatch.setitem(benchmark.SUITES, "test-warm", [benchmark.Scenario(
        "tiny, 6 frames", "tiny", 128, 6, 4, 2, 1, modes=("optimized",))])
    (late,) = run_bench("test-warm", tmp_path / "b")["results"]
    assert late["first_counted"] == ["pose_features", "vae_decode"]
    assert "first counted inside a timed run" in (tmp_path / "b" / "results.md").read_text()


def test_provenance_takes_the_commit_from_the_environment_without_git(tmp_path, monkeypatch):
    from megactor_rt.benchmark import provenance

    monkeypatch.setenv("MEGACTOR_COMMIT", "abc123")
    monkeypatch.setenv("MEGACTOR_SHORT_ATTENTION", "0")
    prov = provenance(tmp_path)  # not a git checkout
    assert prov["commit"] == "abc123" and prov["commit_from"] == "MEGACTOR_COMMIT"
    assert prov["uncommitted_changes"] is None and prov["switches"] == {"MEGACTOR_SHORT_ATTENTION": "0"}
    monkeypatch.delenv("MEGACTOR_COMMIT")
    assert provenance(tmp_path)["commit"] is None


def test_repeats_run_in_rounds_of_one_run_per_mode(tmp_path, monkeypatch):
    """With repeats, the timed runs interleave (reference, optimized, reference, optimized): a slow spell of the
    machine falls on one run of each mode, not on all of one mode's. Each mode warms up once."""
    from megactor_rt import benchmark

    monkeypatch.setitem(benchmark.SUITES, "test-rounds", [benchmark.Scenario(
        "tiny, 2 frames", "tiny", 128, 2, 2, 1, 1, repeats=2, modes=("reference", "optimized"))])
    order = []
    timed = benchmark._ModeRun.timed

    def spy(self, sc, mode, *args):
        order.append(mode)
        return timed(self, sc, mode, *args)

    monkeypatch.setattr(benchmark._ModeRun, "timed", spy)
    from megactor_rt.runtime.driver import PlanCache

    plan, hits = PlanCache.plan, []

    def kept(self, *args, **kwargs):
        made = plan(self, *args, **kwargs)
        hits.append(made[1])
        return made

    monkeypatch.setattr(PlanCache, "plan", kept)
    report = run_bench("test-rounds", tmp_path)
    assert order == ["reference", "optimized", "reference", "optimized"] and not report["errors"]
    assert hits and not any(hits)  # every run finds the driver's faces: pass 1 is timed in each round
    assert [r["mode"] for r in report["results"]] == order
    warm = {}
    for r in report["results"]:
        assert warm.setdefault(r["mode"], r["warmup_s"]) == r["warmup_s"]  # one warm-up per mode


def test_attention_products_are_counted_on_the_cpu():
    """SDPA's CPU kernel counts q k^T and the weighted sum of v, as its GPU kernels do (it counted 0: every CPU
    FLOP figure lacked the attention products)."""
    import torch
    import torch.nn.functional as F

    class Sub:
        def unet(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    sub = Sub()
    ledger = FlopLedger(sub)
    b, h, n, d = 2, 4, 64, 32
    sub.unet(torch.randn(b, h, n, d))
    assert ledger.totals["unet"] == 2 * (2 * b * h * n * n * d)


def test_random_networks_are_built_on_the_device_they_are_asked_for(caplog):
    """The GPU benchmarks build their random networks on the GPU (the CPU's initialisation of the full-size
    networks took 40-50 s of every GPU benchmark process). Every constructor must honour the default device:
    built under the meta device, no parameter or buffer may land elsewhere. Where building there fails (here:
    CUDA on a CPU-only torch), the networks come from the CPU, with a warning, equal to a plain CPU build."""
    import logging

    import torch

    from megactor_rt.benchmark import random_models
    from megactor_rt.config import tiny_config
    from megactor_rt.weights import build_models

    cfg = tiny_config()
    meta = random_models(cfg, torch.device("meta"))
    tensors = [t for m in meta.modules().values() for t in [*m.parameters(), *m.buffers()]]
    assert len(tensors) > 100 and {t.device.type for t in tensors} == {"meta"}
    assert meta.weights_id == "random-built-on-meta"  # where they were built: other values, another id
    if not torch.cuda.is_available():
        with caplog.at_level(logging.WARNING, logger="megactor_rt.benchmark"):
            fallback = random_models(cfg, torch.device("cuda"))
        assert "building them on the CPU" in caplog.text and fallback.weights_id == "random-built-on-cpu"
        plain = build_models(cfg, seed=0)
        for name, module in fallback.modules().items():
            ref = plain.modules()[name].state_dict()
            assert all(torch.equal(v, ref[k]) and v.device.type == "cpu" for k, v in module.state_dict().items())


def test_suites_run_the_eager_headline_and_faster_settings_before_compilations(tmp_path, monkeypatch):
    """A GPU time slice that ends early keeps the reference-vs-optimized ratio and every faster setting: the
    eager reference and optimized modes of all scenarios run first, then the compiled and graph-backend modes,
    then the other variants (the 2026-11-26/27 GPU runs spent their whole slice on scenario 1's modes)."""
    from megactor_rt import benchmark

    assert benchmark.mode_priority("reference") == benchmark.mode_priority("optimized") == 0
    assert benchmark.mode_priority("reference+upstream-ops") == 0  # the second baseline
    assert {benchmark.mode_priority(m) for m in ("optimized+compile", "optimized+compile-graphs",
                                                 "optimized+compile+batch3", "optimized+tensorrt",
                                                 "optimized+tensorrt-graphs", "optimized+onnxruntime")} == {1}
    assert {benchmark.mode_priority(m) for m in ("optimized+batch3", "optimized+no-wrap",
                                                 "optimized+tiny-decoder")} == {2}
    ran = []

    def spy(sc, device, work_dir, errors=None):
        ran.append((sc.name.split(",")[0], sc.modes))
        return iter(())

    monkeypatch.setattr(benchmark, "run_scenario", spy)
    monkeypatch.setattr(benchmark, "matmul_tflops", lambda *a: 1.0)
    benchmark.run_bench("gpu-full", tmp_path, device="cpu")
    gpu_full = benchmark.SUITES["gpu-full"]
    assert ran == [
        ("full 512px fp16", ("reference", "optimized", "reference+upstream-ops")), ("faster: 10 steps", ("optimized",)),
        ("faster: 6 steps", ("optimized",)), ("faster: 10 steps", ("optimized",)),
        ("faster: 10 steps", ("optimized",)),
        ("full 512px fp16", ("optimized+compile", "optimized+compile-graphs")),
        ("faster: 10 steps", ("optimized+compile",)), ("faster: 6 steps", ("optimized+compile",)),
        ("full 512px fp16", ("optimized+batch3", "optimized+no-wrap")), ("faster: 10 steps", ("optimized+tiny-decoder",)),
    ]
    assert sorted(m for _, modes in ran for m in modes) == sorted(m for sc in gpu_full for m in sc.modes)
    for suite in ("cpu-full-256", "cpu-window-batch"):  # elsewhere variants alternate with their base modes
        assert benchmark.in_run_order(suite, benchmark.SUITES[suite]) == benchmark.SUITES[suite]


def test_cpu_suites_measure_the_cpu_by_default(tmp_path, monkeypatch):
    """`bench --suite cpu-*` without --device measures the CPU also where torch sees a GPU (was: the GPU)."""
    import torch

    from megactor_rt import benchmark

    devices = []
    monkeypatch.setattr(benchmark, "run_scenario", lambda sc, device, *a, **k: devices.append(device) or iter(()))
    monkeypatch.setattr(benchmark, "matmul_tflops", lambda *a: 1.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    benchmark.run_bench("cpu-smoke", tmp_path)
    assert [d.type for d in devices] == ["cpu"]


# ---------------------------------------------------------------------------------------------- benchmark (mutation audit)


def test_the_measured_matmul_rate_counts_two_flops_per_multiply_add(monkeypatch: pytest.MonkeyPatch) -> None:
    """An n x n matmul is 2 n^3 FLOPs (a multiply and an add per term), as torch's FLOP counter counts the
    denoiser's: with n^3 the ceiling is half the real one and every "% of matmul" in results.md doubles."""
    from megactor_rt import benchmark

    clock = iter(np.arange(0.0, 100.0, 0.5))  # every timed round: 0.5 s
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: float(next(clock)))
    n, reps = 32, 3
    rate = benchmark.matmul_tflops(torch.device("cpu"), torch.float32, n=n, reps=reps, rounds=2)
    assert rate == pytest.approx(2 * n**3 * reps / 0.5 / 1e12, rel=1e-12)


def _timed_result(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, totals: dict[str, float],
                  stage_s: dict[str, float], peak_bytes: int) -> object:
    """A ``_ModeRun.timed`` result whose run (``_consume``) counted ``totals`` FLOPs per method, took
    ``stage_s`` per stage, and whose sampled peak resident memory was ``peak_bytes``."""
    from megactor_rt import benchmark

    ledger = benchmark.FlopLedger(SimpleNamespace())  # no methods to wrap: the test sets the totals

    def consume(anim, inputs, driver, cfg, work_dir):  # type: ignore[no-untyped-def]
        ledger.totals.update(totals)
        return SimpleNamespace(frames=4, total_s=sum(stage_s.values()), fps=1.0, first_frame_s=0.5,
                               stage_seconds=dict(stage_s), calls={"unet": 2}, step_seconds=[0.1])

    class Peak:
        def __init__(self) -> None:
            self.peak, self.start = peak_bytes, 2**30

        def __enter__(self) -> Peak:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(benchmark, "_consume", consume)
    monkeypatch.setattr(benchmark, "PeakRSS", Peak)
    run = benchmark._ModeRun(cfg=None, sub=None, ledger=ledger, sub_options={},
                             anim=SimpleNamespace(cache={}, plans={}))
    sc = benchmark.Scenario("s", "tiny", 128, 4, 4, 2, 1)
    return run.timed(sc, "reference", torch.device("cpu"), tmp_path / "driver.mp4", tmp_path)


def test_a_timed_runs_figures_are_in_the_units_the_report_names(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """results.md's columns say "peak mem GiB" and "denoise TFLOP/s": the peak is bytes / 2^30 (in GB it reads
    7 % high), the rate is the denoise stage's FLOPs (the reference path's per-call PoseGuider,
    ``pose_guider_full``, included: without it the reference looks cheaper than it is) over the denoise stage's
    time (over the whole run's it mixes in the decoder's and the portrait's seconds)."""
    r = _timed_result(monkeypatch, tmp_path,
                      totals={"unet": 6e12, "reference_bank": 2e12, "pose_guider_full": 1e12, "vae_decode": 5e12},
                      stage_s={"denoise": 3.0, "vae_decode": 1.0, "prepare_portrait": 1.0}, peak_bytes=3 * 2**30)
    assert r.peak_memory_gb == 3.0 and r.run_memory_gb == 2.0  # type: ignore[attr-defined]
    assert r.flops == {"unet": 6.0, "reference_bank": 2.0, "pose_guider_full": 1.0,  # type: ignore[attr-defined]
                       "vae_decode": 5.0}
    assert r.denoise_tflops_per_s == pytest.approx((6 + 2 + 1) / 3.0)  # type: ignore[attr-defined]


def test_first_frame_latency_includes_the_portrait_preparation(tmp_path: Path) -> None:
    """The first-frame latency is what a user waits for: the portrait's preparation (timed as its own stage)
    and then the run's first frame; without the preparation a cold portrait's latency reads too low."""
    from megactor_rt.assets import ASSETS_DIR
    from megactor_rt.benchmark import _consume

    class Anim:
        image_size = 64

        def prepare(self, inputs: object) -> str:
            time.sleep(0.3)
            return "state"

        def animate(self, state, driver, config):  # type: ignore[no-untyped-def]
            self.last_stats = SimpleNamespace(stage_seconds={"denoise": 0.1}, first_frame_s=0.25, total_s=0.0)
            time.sleep(0.3)  # its first frame, 0.25 s after it started as its own stats say (and a bit)
            for _ in range(2):
                yield np.zeros((64, 64, 3), np.uint8)

    stats = _consume(Anim(), None, ASSETS_DIR / "driver.mp4", None, tmp_path)
    prep = stats.stage_seconds["prepare_portrait"]
    assert prep >= 0.3 and stats.first_frame_s == pytest.approx(0.25 + prep)
    assert stats.first_frame_s <= stats.total_s


def _row(scenario: str, mode: str, total: float, first: float, flops: dict[str, float],
         denoise_s: float = 2.0, rate: float = 1.0) -> dict:
    return {"scenario": scenario, "mode": mode, "frames": 4, "total_s": total, "fps": 4 / total,
            "first_frame_s": first, "stage_s": {"denoise": denoise_s, "vae_decode": 0.5}, "flops": flops,
            "denoise_tflops_per_s": rate, "peak_memory_gb": 1.0, "warmup_s": 1.0}


def test_report_rows_give_percent_of_matmul_denoise_flops_and_median_first_frame_ratios() -> None:
    """results.md: "% of matmul" is a percentage (0.5 of the rate reads 50 %, not 0 %); the "denoise TFLOP"
    column counts the PoseGuider calls of either path (per-call in the reference, per-frame in the optimized
    mode); a variant's first-frame time over its base mode's is variant / base (under 1: the variant is
    faster) and uses each mode's median first frame over its repeats, as the whole-run time does."""
    from megactor_rt.benchmark import markdown

    ref = {"unet": 3.0, "reference_bank": 1.0, "pose_guider_full": 0.5, "vae_decode": 1.0}
    opt = {"unet": 2.0, "reference_bank": 0.5, "pose_features": 0.25, "vae_decode": 1.0}
    report = {"suite": "t", "device": "cpu", "date": "2026-11-28", "torch": "x", "threads": 2,
              "matmul_tflops": 2.0, "matmul_dtype": "float32",
              "results": [_row("s", "reference", 10.0, 4.0, ref),
                          _row("s", "optimized", 6.0, 1.0, opt), _row("s", "optimized", 6.0, 2.0, opt),
                          _row("s", "optimized", 6.0, 9.0, opt),
                          _row("s", "optimized+no-wrap", 3.0, 1.0, opt)]}
    md = markdown(report)
    assert "| s | reference | 4 | 10.00 | 0.400 | 4.00 | 2.00 | 0.50 | 4.500 | 1.000 | 50 % | 1.00 | – | 1.0 |" \
        in md, md
    assert "| s | optimized | 4 | 6.00 | 0.667 | 1.00 | 2.00 | 0.50 | 2.750 | 1.000 | 50 % | 1.00 | – | 1.0 |" in md, md
    # medians of optimized: whole run 6 s, first frame 2 s (its last repeat's is 9 s)
    assert "| s | optimized+no-wrap | 0.500 | 0.500 |" in md, md


def test_upstream_ops_switch_this_projects_kernels_off_for_that_modes_runs_only(tmp_path, monkeypatch):
    """``reference+upstream-ops`` (upstream's path with PyTorch's own ops, a second baseline) runs its warm-up and
    timed runs with the kernel switches off; the modes around it see the switches as they were, and afterwards
    each switch has its old value again (or none). The ratio table then gives every mode's speed-up over it
    too. The switches mean nothing to exported or compiled graphs: such a mode is refused."""
    import os

    from megactor_rt import benchmark

    monkeypatch.setenv("MEGACTOR_SHORT_ATTENTION", "1")
    monkeypatch.delenv("MEGACTOR_TRITON_GROUP_NORM", raising=False)
    seen = []
    consume = benchmark._consume

    def spy(anim, inputs, driver, cfg, work_dir):
        seen.append((cfg.mode.value, os.environ.get("MEGACTOR_SHORT_ATTENTION"),
                     os.environ.get("MEGACTOR_TRITON_GROUP_NORM")))
        return consume(anim, inputs, driver, cfg, work_dir)

    monkeypatch.setattr(benchmark, "_consume", spy)
    monkeypatch.setitem(benchmark.SUITES, "test-upstream", [benchmark.Scenario(
        "tiny, 2 frames", "tiny", 128, 2, 2, 1, 1, modes=("reference", "reference+upstream-ops", "optimized"))])
    report = run_bench("test-upstream", tmp_path)
    assert not report["errors"]
    assert seen == [("reference", "1", None)] * 2 + [("reference", "0", "0")] * 2 + [("optimized", "1", None)] * 2
    assert os.environ["MEGACTOR_SHORT_ATTENTION"] == "1" and "MEGACTOR_TRITON_GROUP_NORM" not in os.environ
    md = (tmp_path / "results.md").read_text()
    assert "speed-up over reference+upstream-ops (upstream's own ops), whole run |" in md
    totals = {r["mode"]: r["total_s"] for r in report["results"]}
    row = next(line for line in md.splitlines() if line.startswith("| tiny, 2 frames | optimized | yes |"))
    assert row.endswith(f" {totals['reference+upstream-ops'] / totals['optimized']:.2f}x |"), row
    assert any(line.startswith("| tiny, 2 frames | reference+upstream-ops | yes |") and line.endswith(" - |")
               for line in md.splitlines()), md
    sc = benchmark.SUITES["test-upstream"][0]
    for mode in ("optimized+upstream-ops+compile", "optimized+onnxruntime+upstream-ops"):
        with pytest.raises(ValueError, match="upstream-ops switches kernels of the eager torch networks"):
            benchmark.mode_settings(sc, mode, tmp_path)


@pytest.mark.parametrize("script", ["attn_backends", "profile_unet", "profile_steps"])
def test_a_gpu_script_at_full_size_without_cuda_stops_at_once_naming_tiny(script: str, tmp_path: Path) -> None:
    """The GPU profiling scripts, run where torch sees no CUDA device without --tiny, stop before building the
    full-size networks (attn_backends.py ran out of 24 GB on this machine) and say how to check them here."""
    import subprocess
    import sys

    from megactor_rt import benchmark

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the scripts run in full there")
    root = Path(benchmark.__file__).parents[1]
    done = subprocess.run([sys.executable, str(root / "bench" / f"{script}.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"python bench/{script}.py --tiny ... checks it here" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_bench_flags_named_twice_or_of_a_device_here_unknown(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A variant mode named twice is timed once (it was timed twice); ``--device mps`` is refused before --out is
    made (was "unexpected error: NotImplementedError" with torch's dispatcher dump, --out left behind)."""
    from megactor_rt.benchmark import SUITES, select_modes
    from megactor_rt.cli import main

    chosen = select_modes("cpu-tiny", SUITES["cpu-tiny"], ["optimized+batch2", "optimized+batch2"])
    assert [s.modes for s in chosen] == [("optimized+batch2",)] * len(chosen)
    assert main(["bench", "--suite", "cpu-tiny", "--device", "mps", "--out", str(tmp_path / "res")]) == 2
    assert "device mps: megactor-rt runs on cpu or cuda" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()


def test_a_results_folder_takes_one_run_at_a_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two benchmarks into one --out at once each rewrote results.json after every mode (one's results lost, both
    exit 0): the second is refused; results of another suite there are named as replaced."""
    import fcntl

    from megactor_rt import benchmark
    from megactor_rt.errors import InputError

    out = tmp_path / "res"
    out.mkdir()
    with open(out / ".bench.lock", "a") as other:  # (another process's run holds it)
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another megactor-rt bench is writing its results there now"):
            run_bench("cpu-smoke", out)
    (out / "results.json").write_text(json.dumps({"suite": "cpu-full-256", "date": "2026-11-27"}))
    with caplog.at_level(logging.WARNING, "megactor_rt.benchmark"):
        benchmark._hold_results_folder(out, "cpu-smoke")
    assert "the results of suite 'cpu-full-256' from 2026-11-27 there are replaced" in caplog.text


def test_a_results_folder_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    """(Was "unexpected error: FileNotFoundError" for `--out /proc/x`, which root's access check passes.)"""
    from megactor_rt.errors import InputError

    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"file/x: cannot make the results folder \(--out\) \(Not a directory\)"):
        run_bench("cpu-tiny", tmp_path / "file" / "x", dry_run=True)


def test_a_run_stopped_before_its_first_result_does_not_leave_an_earlier_runs_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results were first written after the first timed run: a run stopped before it (Ctrl-C in a warm-up, a GPU
    machine's time limit during a compile) left the earlier run's complete results in --out, read as this run's;
    and a results file that cannot be written failed ("unexpected error: IsADirectoryError") only after the first
    mode had run. The report is written before the first mode now."""
    from megactor_rt import benchmark
    from megactor_rt.errors import InputError

    def stopped(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "run_scenario", stopped)
    monkeypatch.setattr(benchmark, "matmul_tflops", lambda *a: 1.0)
    (tmp_path / "results.json").write_text(json.dumps({"suite": "cpu-smoke", "date": "2000-01-01", "results": [],
                                                       "complete": True}))
    (tmp_path / "results.md").write_text("the earlier run's table\n")
    with pytest.raises(KeyboardInterrupt):
        run_bench("cpu-smoke", tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is False and saved["results"] == [] and saved["date"] != "2000-01-01"
    md = (tmp_path / "results.md").read_text()
    assert "**Incomplete**: 0 of the suite's timed runs are here (2 planned" in md, md

    out = tmp_path / "blocked"
    (out / "results.json").mkdir(parents=True)
    with pytest.raises(InputError, match=r"blocked: cannot write the benchmark's results there \(.*results\.json"):
        run_bench("cpu-smoke", out)  # (before run_scenario: not the KeyboardInterrupt)


def test_runs_without_per_step_times_are_named_under_the_step_table() -> None:
    """The step table left out the open-window modes (+no-wrap: no step spans the clip, so none is timed) without a
    word: the reader could not tell a missing row from a dropped one."""
    from megactor_rt.benchmark import markdown

    def row(mode: str, steps: list[float]) -> dict:
        return {"scenario": "s", "mode": mode, "frames": 4, "total_s": 2.0, "fps": 2.0, "first_frame_s": 1.0,
                "stage_s": {"denoise": 1.0}, "flops": {"unet": 1.0}, "denoise_tflops_per_s": 1.0,
                "peak_memory_gb": 0.91, "warmup_s": 1.0, "step_s": steps}

    report = {"suite": "t", "device": "cpu", "date": "2026-11-29", "torch": "x", "threads": 2, "matmul_tflops": 2.0,
              "matmul_dtype": "float32", "results": [row("optimized", [0.5, 0.5]), row("optimized+no-wrap", [])]}
    md = markdown(report)
    assert "| s | optimized | 0.500 | 0.500 | 0.500 |" in md, md
    assert "No per-step times for s [optimized+no-wrap]: open windows (+no-wrap) are denoised window by window" in md
    assert "No per-step times" not in markdown({**report, "results": report["results"][:1]})


def test_modes_whose_variants_do_not_go_together_are_refused_before_any_run(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`--modes reference+compile+tensorrt` (or optimized+upstream-ops+compile, +fp16-softmax without a graph
    backend) was accepted, then recorded as an error when its turn came, after the matmul sample and every mode
    before it (minutes of a GPU session): such a mode is refused with the reason, before --out is written."""
    from megactor_rt.benchmark import SUITES, select_modes
    from megactor_rt.cli import main
    from megactor_rt.errors import InputError

    for mode, reason in (("reference+compile+tensorrt", "in the optimized mode only"),
                         ("optimized+upstream-ops+compile", "switches kernels of the eager torch networks"),
                         ("optimized+fp16-softmax", "add a graph backend")):
        with pytest.raises(InputError, match=reason):
            select_modes("cpu-tiny", SUITES["cpu-tiny"], ["optimized", mode])
    assert main(["bench", "--suite", "cpu-smoke", "--modes", "optimized+compile+onnxruntime", "--out",
                 str(tmp_path / "res")]) == 2
    assert "without torch settings such as compile" in capsys.readouterr().err
    assert not (tmp_path / "res" / "results.json").exists()


def test_the_2026_11_29_gpu_section_gives_the_raw_files_figures() -> None:
    """docs/performance.md's 2026-11-29 GPU section, recomputed from its raw files (docs/bench/gpu-2026-11-29/):
    the compiled call's kernel time and its gap to the call (it summed the rounded classes: 89.7 and 3.7 ms), the
    elementwise and normalisation share (25.4 ms), call 1's time used (541 s, the log says 540 s), and the
    stream-memory cases the call brought back (an open-window case at 1000 frames it named none of)."""
    import re

    root = Path(__file__).parents[1]
    doc = " ".join((root / "docs" / "performance.md").read_text().split())  # lines joined
    raw = root / "docs" / "bench" / "gpu-2026-11-29"
    unet = json.loads((raw / "call1" / "e2e" / "profile_unet.json").read_text())
    classes = {k: v * 1e3 for k, v in unet["kernel_classes_s"].items()}
    call_ms = unet["calls"]["optimized, torch.compile"]["seconds"] * 1e3
    total = sum(classes.values())
    assert f"{total:.1f} ms of kernels in a {call_ms:.1f} ms call, so about {call_ms - total:.1f} ms" in doc
    fusable = classes["other (elementwise, copies, ...)"] + classes["normalisation"]
    assert f"elementwise work and normalisation together ({fusable:.1f} ms)" in doc
    used = re.search(r"done in (\d+)s", (raw / "call1" / "gpu_all.log").read_text())
    assert used is not None and f"590 s limit, {used.group(1)} s used" in doc
    memory = json.loads((raw / "call3" / "memory" / "stream_memory.json").read_text())["results"]
    cases = {(r["kind"], r["frames"]) for r in memory}
    assert ("open", 1000) not in cases and "The open-window case at 1000 frames did not come back" in doc


def test_a_mode_missing_from_the_chosen_scenarios_is_named_as_theirs(tmp_path: Path) -> None:
    """`--suite cpu-full-256 --scenarios 2 --modes reference` said the suite had no mode 'reference' (its scenario 1
    has it): the error names the scenarios chosen and the modes known there."""
    from megactor_rt.benchmark import run_bench
    from megactor_rt.errors import InputError

    with pytest.raises(InputError) as err:
        run_bench("cpu-full-256", tmp_path / "out", dry_run=True, modes=["reference"], only=[2])
    assert str(err.value).startswith("suite 'cpu-full-256', scenario(s) 2, has no mode(s) reference; known there: "
                                     "optimized, each optionally with variants +serial-decode"), err.value
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("mode", "pair"), [("optimized+batch2+batch3", "batch2 and batch3 set window_batch"),
                                            ("optimized+compile+compile-graphs", "compile and compile-graphs set compile")])
def test_variants_that_set_one_setting_differently_are_refused(mode: str, pair: str, tmp_path: Path) -> None:
    """`--modes optimized+batch2+batch3` ran batch3 alone (the last variant's value won) under a name that promised
    both; such a mode is refused before anything runs, as other variants that do not go together are."""
    from megactor_rt.benchmark import mode_problem
    from megactor_rt.errors import InputError

    assert mode_problem(mode) == f"mode '{mode}': {pair} differently; keep one of them"
    with pytest.raises(InputError, match=pair):
        run_bench("cpu-tiny", tmp_path / "out", modes=[mode])
    assert not (tmp_path / "out").exists()
    assert mode_problem("optimized+batch3+no-wrap") is None and mode_problem("optimized+onnxruntime+batch3") is None
