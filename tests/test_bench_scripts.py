"""The standalone scripts of bench/: each result says where, when and by what code it was measured.

``benchmark.run_record`` in every script's JSON and ``benchmark.record_line`` at the top of its markdown. The
scripts cheap enough to run here run at their smallest settings (some with their module constants shrunk, in
this process); the slower ones (profile_steps, portrait_cache, stream_memory: their markdown functions;
attn_backends, profile_unet, serve_latency) and the CUDA-only bench_kernels (its markdown, and its exit without
CUDA) are not run, and every script imports and answers ``--help``.
bench/gpu_all.sh's CPU check runs the GPU scripts in full.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from megactor_rt import benchmark
from megactor_rt.benchmark import record_line, run_record

BENCH = Path(benchmark.__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py"))
RECORD_KEYS = {"date", "host", "torch", "python", "provenance"}

SAMPLE = {"date": "2026-11-29", "host": {"cpu": "AMD EPYC 7B13", "cores": 2, "torch_threads": 2},
          "torch": "2.13.0+cpu", "python": "3.11.2",
          "provenance": {"commit": "1b7c812ab3cd0123456789abcdef0123456789ab", "uncommitted_changes": True}}


def test_record_line_names_the_date_machine_versions_and_short_commit() -> None:
    assert record_line(SAMPLE) == ("Measured 2026-11-29 on AMD EPYC 7B13 (2 cores, 2 torch threads), torch 2.13.0+cpu, "
                                   "Python 3.11.2, commit 1b7c812ab3cd with uncommitted changes.")
    clean = {**SAMPLE, "provenance": {"commit": SAMPLE["provenance"]["commit"], "uncommitted_changes": False}}
    assert record_line(clean).endswith(", commit 1b7c812ab3cd.")
    gpu = {**SAMPLE, "host": {**SAMPLE["host"], "gpu": "NVIDIA H200"}, "provenance": None}
    assert " on NVIDIA H200 with AMD EPYC 7B13 (2 cores, 2 torch threads), " in record_line(gpu)
    assert record_line(gpu).endswith(", commit unknown.")


def test_run_record_of_this_machine() -> None:
    record = run_record(torch.device("cpu"))
    assert set(record) == RECORD_KEYS and "gpu" not in record["host"]
    assert record["host"]["cores"] and record["host"]["torch_threads"] == torch.get_num_threads()
    assert record["torch"] == torch.__version__ and record["provenance"]["commit"]
    json.dumps(record)  # a JSON report's part
    assert record_line(record).startswith(f"Measured {record['date']} on {record['host']['cpu']} (")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports_and_answers_help(name: str, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """(In this process: a subprocess per script would take seconds each to import torch.)"""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    monkeypatch.syspath_prepend(str(BENCH))  # as when run as a script (some import bench_kernels)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(BENCH / f"{name}.py"), run_name="__main__")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    # its whole docstring: what it measures and how long it takes, its CPU form (was its first line, cut mid-sentence)
    doc = (BENCH / f"{name}.py").read_text().split('"""')[1]
    for line in doc.strip().splitlines():
        assert line in out, (line, out)


def _check(out: Path, stem: str, header_lines: int = 1) -> dict[str, Any]:
    """The record in ``stem``.json and its line among the first lines of ``stem``.md."""
    report = json.loads((out / f"{stem}.json").read_text())
    assert set(report) >= RECORD_KEYS, sorted(report)
    assert report["provenance"]["commit"] and report["host"]["cpu"]
    head = (out / f"{stem}.md").read_text().splitlines()[:header_lines]
    assert record_line(report) in head, head
    assert f"commit {report['provenance']['commit'][:12]}" in record_line(report)
    return report


# a CPU script's constants shrunk so that it runs in a second or two: (name, {constant: value}, extra argv)
SHRUNK = [
    ("checkpoint_cost", {"FRAMES": (4,), "REPEATS": 1}),
    ("sequence_read", {"REPEATS": 1}),
    ("hdr_decode", {"FRAMES": 2, "WIDTH": 64, "HEIGHT": 64, "REPEATS": 1}),
    ("result_formats", {"FRAMES": 2, "SIZE": 64, "REPEATS": 1, "LOWER_QUALITY": []}),
    ("audio_seek", {"MINUTES": 1, "OFFSET_S": 50, "RESULT_FRAMES": 5}),
]


@pytest.mark.parametrize(("name", "constants"), SHRUNK, ids=[s[0] for s in SHRUNK])
def test_cpu_scripts_record_their_run(name: str, constants: dict[str, Any], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from megactor_rt import media

    module = _load(name)
    for key, value in constants.items():
        monkeypatch.setattr(module, key, value)
    monkeypatch.setattr(media, "AUDIO_SEEK_MIN_S", media.AUDIO_SEEK_MIN_S)  # audio_seek sets it: restored after
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--out", str(tmp_path)])
    module.main()
    report = _check(tmp_path, name)
    assert isinstance(report["machine"], str)  # script_facts' keys kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.json", f"{name}.md"]


def test_portrait_cache_markdown_begins_with_the_record() -> None:
    report = {**run_record(torch.device("cpu")), "device": "CPU", "threads": 2, "model": "tiny", "image_size": 128,
              "precision": "fp32", "steps": 1, "computed_s": 2.0, "write_s": 0.1, "loaded_s": 0.5, "file_mb": 1.0,
              "ratio": 4.0}
    assert _load("portrait_cache").markdown(report).splitlines()[0] == record_line(report)


def test_driver_start_repeats_give_median_spread_and_ratio_of_medians(tmp_path: Path) -> None:
    """Two rounds at the smallest settings (a subprocess: it switches off the progress bars)."""
    done = subprocess.run([sys.executable, str(BENCH / "driver_start.py"), "--out", str(tmp_path), "--height", "144",
                           "--seconds", "2", "--starts", "0", "1", "--max-frames", "3", "--size", "64",
                           "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = _check(tmp_path, "driver_start", header_lines=3)
    assert report["repeats"] == 2 and report["device"].startswith("CPU: ")
    md = (tmp_path / "driver_start.md").read_text()
    assert md.startswith("# Driver passes for a late --start")
    for row in report["rows"]:
        assert row["identical_inputs"] is True and row["frames"] == 3
        for way in ("decode_all_s", "seek_s"):
            w = row[way]
            totals = sorted(p1 + p2 for p1, p2 in w["runs"])
            assert len(totals) == 2 and {"pass1", "pass2"} <= set(w)
            assert w["min"] == pytest.approx(totals[0], abs=2e-3) and w["max"] == pytest.approx(totals[1], abs=2e-3)
            assert w["min"] <= w["median"] <= w["max"]
            assert f"{w['median']:.2f} ({w['min']:.2f}-{w['max']:.2f})" in md
        assert row["speedup"] == pytest.approx(row["decode_all_s"]["median"] / row["seek_s"]["median"], abs=0.01)


def test_driver_start_refuses_no_repeats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["driver_start.py", "--out", str(tmp_path), "--repeats", "0"])
    with pytest.raises(SystemExit) as stop:
        _load("driver_start").main()
    assert stop.value.code == 2 and "--repeats must be at least 1" in capsys.readouterr().err


def test_profile_steps_on_the_cpu_says_device_time_is_not_measured() -> None:
    """Without CUDA activity a step has no device time: not measured (None, n/a), not all of it "idle"."""
    ps = _load("profile_steps")
    ranges, kernels = [(0, 0, 1000), (1, 1000, 2500)], [(100, 400), (1200, 300)]
    cpu_rows = ps.step_rows(torch.device("cpu"), ranges, kernels, [0.001, 0.0015])
    assert [r["device_busy_s"] for r in cpu_rows] == [None, None] and cpu_rows[1]["device_idle_s"] is None
    assert [r["wall_s"] for r in cpu_rows] == [0.001, 0.0015]
    cuda_rows = ps.step_rows(torch.device("cuda"), ranges, kernels, [0.001, 0.0015])
    assert cuda_rows[0]["device_busy_s"] == pytest.approx(4e-4) and cuda_rows[0]["device_idle_s"] == pytest.approx(6e-4)
    assert cuda_rows[1]["kernels"] == 1
    report = {**run_record(torch.device("cpu")), "device": "CPU", "device_time": ps.NOT_MEASURED, "scenario": "tiny",
              "mode": "optimized", "frames": 10, "steps": 2, "stage_s": {}, "per_step": cpu_rows,
              "new_flop_signatures_in_timed_run": []}
    md = ps.markdown(json.loads(json.dumps(report)))  # as saved
    lines = md.splitlines()
    assert lines[0] == record_line(report)
    assert "Device time is not measured on the CPU" in md
    assert "| 0 | 0.001 | n/a | n/a | n/a |" in lines and "| 1 | 0.002 | n/a | n/a | n/a |" in lines
    gpu = ps.markdown({**report, "device_time": "measured", "per_step": cuda_rows})
    assert "not measured" not in gpu and "| 0 | 0.001 | 0.000 | 0.001 | 1 |" in gpu.splitlines()


def test_profile_steps_takes_host_ranges_and_kernels_not_the_device_copies_of_its_ranges() -> None:
    """With CUDA activity the profiler lists each step's range twice (host, and a device-side user annotation
    as long as the step's kernels): each step once, its busy time from kernels alone, overlapping kernels
    (concurrent streams) counted once. The 2026-11-29 H200 run listed step 0 twice and a busy time above the
    wall time."""
    ps = _load("profile_steps")
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def ev(name: str, start: int, end: int, dev: Any, annotation: bool = False) -> SimpleNamespace:
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=dev,
                               is_user_annotation=annotation)
    events = [ev(ps.STEP + "0", 0, 1000, cpu, True), ev(ps.STEP + "0", 50, 1100, cuda, True),
              ev(ps.STEP + "1", 1000, 2000, cpu, True), ev(ps.STEP + "1", 1100, 2100, cuda, True),
              ev("aten::mm", 10, 20, cpu), ev("gemm_kernel", 100, 400, cuda), ev("pose_kernel", 200, 500, cuda),
              ev("gemm_kernel", 1200, 1500, cuda)]
    ranges, kernels = ps.step_events(events)
    assert ranges == [(0, 0, 1000), (1, 1000, 2000)]
    assert sorted(kernels) == [(100, 300), (200, 300), (1200, 300)]
    rows = ps.step_rows(torch.device("cuda"), ranges, kernels, [0.001, 0.001])
    assert [r["step"] for r in rows] == [0, 1] and [r["kernels"] for r in rows] == [2, 1]
    assert rows[0]["device_busy_s"] == pytest.approx(4e-4) and rows[1]["device_busy_s"] == pytest.approx(3e-4)
    assert ps.busy_us([(0, 10), (2, 3), (20, 5), (22, 10)]) == 22


def test_stream_memory_markdown_begins_with_the_record() -> None:
    sm = _load("stream_memory")
    report = {**run_record(torch.device("cpu")), "device": "CPU", "size": 64, "steps": 1, "window": 16,
              "overlap": 8, "results": []}
    assert sm.markdown(report).splitlines()[0] == record_line(report)


def test_bench_kernels_records_its_run_and_without_cuda_writes_nothing(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    bk = _load("bench_kernels")
    report = {**SAMPLE, "host": {**SAMPLE["host"], "gpu": "NVIDIA H200"}, "device": "NVIDIA H200", "copy_gbs": 3900.0,
              "warmup": 1, "iters": 2, "kernels": {"available": True}, "results": []}
    assert bk.to_markdown(report).splitlines()[0] == record_line(report)
    if torch.cuda.is_available():
        return
    assert bk.main(["--out", str(tmp_path / "out")]) == 0
    assert "No CUDA GPU available" in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_driver_start_refuses_a_start_past_the_clips_end_before_timing(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`--starts 20` on a 12 s clip was a traceback (plan_driver's InputError) after the warm-up and every start
    before it had been timed (minutes at 1080p): it is refused at once, naming the clip, the start and its length."""
    module = _load("driver_start")
    clip = module.write_long_clip(tmp_path / "clip.mp4", 1, 64)
    monkeypatch.setattr(module, "passes", lambda *a: pytest.fail("timed before the starts were checked"))
    monkeypatch.setattr(sys, "argv", ["driver_start.py", "--out", str(tmp_path), "--clip", str(clip),
                                      "--starts", "0", "1", "5"])
    with pytest.raises(SystemExit) as stop:
        module.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "clip.mp4: --starts 1 5: at or past the clip's end (30 frames, 1.00 s)" in err, err


def test_serve_latency_says_why_the_server_did_not_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that did not start (a port, a flag) was "IndexError: list index out of range" from the script's
    parsing of its first line, the server's own message sent to /dev/null: the script now stops with that message."""
    module = _load("serve_latency")
    monkeypatch.setattr(module, "command", lambda out: 1.0)  # (the commands' minutes are not what is checked)
    monkeypatch.setattr(module, "SETTINGS", ["--no-such-flag", "x", "--duration", "1"])
    monkeypatch.setattr(sys, "argv", ["serve_latency.py", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"`megactor-rt serve` did not start \(exit status 2\): .*--no-such-flag"):
        module.main()
    assert list(tmp_path.iterdir()) == []  # (its scratch folder removed)


def test_profile_unet_puts_several_profiled_calls_side_by_side() -> None:
    """`--profile compiled eager upstream`: the first call's classes and top kernels as before, then every profiled
    call's classes in one table with its TFLOP per second of kernel time (where the optimized call's time per FLOP
    goes against the upstream-style call's: the 2026-11-29 H200 run measured 250 against 269 TFLOP/s)."""
    pu = _load("profile_unet")
    calls = {"optimized": {"seconds": 0.123, "tflop": 30.7, "tflops_per_s": 249.6},
             "upstream": {"seconds": 0.150, "tflop": 40.4, "tflops_per_s": 269.0},
             pu.COMPILED: {"seconds": 0.093, "tflop": 30.7, "tflops_per_s": 330.0, "compile_s": 17.5,
                           "max_abs_diff_vs_eager": 0.003, "max_abs_eager": 1.5}}
    by_call = {"compiled": {"gemm": 0.0256, "attention": 0.0222},
               "eager": {"gemm": 0.040, "attention": 0.030, "normalisation": 0.020},
               "upstream": {"gemm": 0.060, "attention": 0.040, "normalisation": 0.025}}
    report = {**run_record(torch.device("cpu")), "device": "NVIDIA H200", "dtype": "float16", "image_size": 512,
              "frames": 16, "matmul_tflops": 758.0, "calls": calls, "profiled": "compiled",
              "kernel_classes_s": by_call["compiled"], "top_kernels_s": [["flash_kernel", 0.0159]],
              "kernel_classes_by_call": by_call}
    lines = pu.markdown(json.loads(json.dumps(report))).splitlines()
    assert "Compiled optimized call, device time by kernel class (torch.profiler):" in lines
    assert "| class | compiled optimized | optimized (eager) | upstream-style (eager) |" in lines
    assert "| gemm | 25.6 | 40.0 | 60.0 |" in lines and "| normalisation | 0.0 | 20.0 | 25.0 |" in lines
    assert "| all kernels | 47.8 | 90.0 | 125.0 |" in lines
    assert "| TFLOP/s of kernel time | 642 | 341 | 323 |" in lines  # 30.7 / 0.0478, 30.7 / 0.090, 40.4 / 0.125
    one = pu.markdown({**report, "kernel_classes_by_call": {"compiled": by_call["compiled"]}})
    assert "side by side" not in one


def test_the_readmes_bench_list_says_which_help_gives_a_duration() -> None:
    """README's bench list said each script's ``--help`` tells how long it runs; bench_kernels' and stream_memory's
    do not: the line says so of the CPU ones, and each script listed as ``# CPU:`` gives its time."""
    import re

    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    assert "what each measures, and how long" not in readme
    assert "# the CPU ones also how long)" in readme
    cpu = re.findall(r"^python bench/(\w+)\.py --out out/ +# CPU:", readme, flags=re.M)
    assert cpu, "no CPU bench scripts found in README"
    for name in cpu:
        doc = _load(name).__doc__ or ""
        assert re.search(r"about \d+ (s|minutes?) on 2 cores", doc), name


# the scripts that take --out (bench_kernels: tested below; without CUDA it writes nothing), with their CPU form
OUT_SCRIPTS = [(name, ["--tiny"] if name in ("attn_backends", "portrait_cache", "profile_steps", "profile_unet")
                else []) for name in SCRIPTS if name != "bench_kernels"]


@pytest.mark.parametrize(("name", "extra"), OUT_SCRIPTS, ids=[s[0] for s in OUT_SCRIPTS])
def test_a_file_named_by_out_is_refused_before_measuring(name: str, extra: list[str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out` naming a file was "FileExistsError" from mkdir; attn_backends, portrait_cache, profile_steps and
    profile_unet made the folder only to write their results, so their measurements (minutes at full size) were
    lost to that traceback. Every script now names the problem before it measures anything."""
    module = _load(name)
    monkeypatch.setattr(benchmark, "random_models", lambda *a, **k: pytest.fail("measured before --out was checked"))
    monkeypatch.setattr(benchmark, "_submodels", lambda *a, **k: pytest.fail("measured before --out was checked"))
    taken = tmp_path / "taken.md"
    taken.write_text("a file")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--out", str(taken), *extra])
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert str(stop.value.code) == f"bench/{name}.py: {taken}: --out names a folder for the results, and this is a file"
    assert taken.read_text() == "a file"
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--out", str(taken / "sub"), *extra])
    with pytest.raises(SystemExit, match=rf"bench/{name}\.py: .*sub: --out cannot be written \(.*taken\.md is a file"):
        module.main()


def test_bench_kernels_refuses_a_file_named_by_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bk = _load("bench_kernels")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (its CUDA check comes first)
    monkeypatch.setattr(bk, "run", lambda *a: pytest.fail("measured before --out was checked"))
    taken = tmp_path / "taken"
    taken.write_text("")
    with pytest.raises(SystemExit, match="bench/bench_kernels.py: .*taken: --out names a folder for the results"):
        bk.main(["--out", str(taken)])


@pytest.mark.parametrize(("mode", "says"), [
    ("optimized+onnxruntime", "this script profiles the torch networks, not the exported graphs"),
    ("optimized+tensorrt-graphs", "this script profiles the torch networks, not the exported graphs"),
    ("optimized+no-wrap", "no step spans the clip"),
    ("fast", "not a mode: reference or optimized, each optionally with variants +serial-decode"),
    ("optimized+bogus", "not a mode"),
    ("optimized+compile+upstream-ops", "upstream-ops switches kernels of the eager torch networks"),
])
def test_profile_steps_refuses_a_mode_it_would_not_profile(mode: str, says: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`--mode optimized+onnxruntime` profiled the torch networks under the graph backend's name; `+no-wrap` wrote an
    empty step table; an unknown mode was a ValueError traceback after the networks were built."""
    module = _load("profile_steps")
    monkeypatch.setattr(benchmark, "_submodels", lambda *a, **k: pytest.fail("built before --mode was checked"))
    monkeypatch.setattr(sys, "argv", ["profile_steps.py", "--out", str(tmp_path), "--tiny", "--mode", mode])
    with pytest.raises(SystemExit) as stop:
        module.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"error: --mode {mode}: " in err.replace("'", "") and says in err, err


def test_profile_steps_runs_upstream_ops_with_its_kernel_switches(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`--mode reference+upstream-ops` ran with this project's kernels (the switches `megactor-rt bench` sets for the
    mode were never set): its profile was the plain reference's under the upstream baseline's name."""
    from megactor_rt.runtime import animator

    module = _load("profile_steps")
    monkeypatch.setattr(animator, "denoise", animator.denoise)  # (main wraps it: restored after)
    monkeypatch.delenv("MEGACTOR_SHORT_ATTENTION", raising=False)
    monkeypatch.setattr(benchmark, "_submodels", lambda *a, **k: (SimpleNamespace(), None))
    seen: dict[str, str | None] = {}

    class Seen(Exception):
        pass

    def settings(*a: Any) -> None:
        seen["switch"] = os.environ.get("MEGACTOR_SHORT_ATTENTION")
        raise Seen

    monkeypatch.setattr(benchmark, "mode_settings", settings)
    monkeypatch.setattr(sys, "argv", ["profile_steps.py", "--out", str(tmp_path), "--tiny", "--mode",
                                      "reference+upstream-ops"])
    with pytest.raises(Seen):
        module.main()
    assert seen == {"switch": "0"}
    assert "MEGACTOR_SHORT_ATTENTION" not in os.environ


def test_profile_steps_refuses_no_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """(Was "ValueError: steps must be >= 1" from the run's config, after the networks were built.)"""
    monkeypatch.setattr(benchmark, "_submodels", lambda *a, **k: pytest.fail("built before --steps was checked"))
    monkeypatch.setattr(sys, "argv", ["profile_steps.py", "--out", str(tmp_path), "--tiny", "--steps", "0"])
    with pytest.raises(SystemExit) as stop:
        _load("profile_steps").main()
    assert stop.value.code == 2 and "--steps must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "argv", "says"), [
    ("portrait_cache", ["--tiny", "--steps", "0"], "--steps must be at least 1"),
    ("attn_backends", ["--tiny", "--frames", "0"], "--frames must be at least 1"),
    ("stream_memory", ["--window", "4", "--overlap", "4"], "0 <= --overlap < --window (got --frames 250 1000 4000"),
    ("stream_memory", ["--steps", "0"], "--steps 0,"),
    ("stream_memory", ["--frames", "100", "0"], "--frames 100 0,"),
])
def test_scripts_refuse_sizes_they_cannot_run(name: str, argv: list[str], says: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """These were tracebacks once the work began: portrait_cache's "steps must be >= 1" after the full-size networks
    were built, attn_backends' reshape error, stream_memory's "case wrap 250 failed" with a child's
    ZeroDivisionError or range() error."""
    module = _load(name)
    monkeypatch.setattr(benchmark, "_submodels", lambda *a, **k: pytest.fail("built before the arguments were checked"))
    monkeypatch.setattr(module, "run_record", lambda *a: pytest.fail("ran before the arguments were checked"),
                        raising=False)
    monkeypatch.setattr(benchmark, "run_record", lambda *a: pytest.fail("ran before the arguments were checked"))
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--out", str(tmp_path / "out"), *argv])
    with pytest.raises(SystemExit) as stop:
        module.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and says in err, err
    assert not (tmp_path / "out").exists()


def test_a_terminated_script_removes_its_scratch_folder_from_out(tmp_path: Path) -> None:
    """SIGTERM (`timeout`, a session's time limit) killed a CPU script where it stood: its scratch folder in --out
    (hdr_decode's clips, result_formats' results; serve_latency also left its `serve` child running) stayed.
    It now ends as Ctrl-C does, its cleanup run, with status 143."""
    out = tmp_path / "out"
    _terminate_once_made([sys.executable, str(BENCH / "hdr_decode.py"), "--out", str(out)], out, "hdr-decode-*", 120,
                         "no scratch folder appeared")
    assert list(out.iterdir()) == []


def _terminate_once_made(cmd: list[str], where: Path, pattern: str, seconds: float, missing: str,
                         env: dict[str, str] | None = None) -> None:
    """Run ``cmd``, wait (at most ``seconds``) for ``pattern`` to appear in ``where`` (``missing``: the failure where
    it does not), send SIGTERM and check that the script ends with status 143."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + seconds
        while not list(where.glob(pattern)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(where.glob(pattern)), missing
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143
    finally:
        proc.kill()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_terminated_stream_memory_stops_the_case_it_runs(tmp_path: Path) -> None:
    """SIGTERM (gpu_all.sh's `timeout` on this step) ended the parent only: the case's child process ran on,
    measuring into a pipe no one read, beside the next step's measurements."""
    proc = subprocess.Popen([sys.executable, str(BENCH / "stream_memory.py"), "--out", str(tmp_path), "--frames",
                             "100000", "--steps", "50"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not children and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            children = _children(proc.pid)
        assert children, "no case process appeared"
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [c for c in children if Path(f"/proc/{c}").exists()]
        assert not left, "the case's process still runs"
    finally:
        proc.kill()
        for c in children:
            with contextlib.suppress(OSError):
                os.kill(c, signal.SIGKILL)


def test_a_terminated_portrait_cache_removes_its_temporary_store(tmp_path: Path) -> None:
    """SIGTERM left portrait_cache's temporary store (every bank of the run: hundreds of MB at full size) in the
    temporary folder; it is removed as after Ctrl-C."""
    temp, out = tmp_path / "temp", tmp_path / "out"
    temp.mkdir()
    _terminate_once_made([sys.executable, str(BENCH / "portrait_cache.py"), "--out", str(out), "--tiny", "--steps",
                          "200"], temp, "megactor-portraits-*", 180, "no temporary store appeared",
                         env={**os.environ, "TMPDIR": str(temp)})
    assert not list(temp.glob("megactor-portraits-*"))


def test_serve_latency_says_why_the_command_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing `megactor-rt demo` was "CalledProcessError: ... returned non-zero exit status 2", its own message
    captured and never shown; the script now stops with that message (and removes its scratch folder)."""
    module = _load("serve_latency")
    monkeypatch.setattr(module, "SETTINGS", ["--no-such-flag", "x", "--duration", "1"])
    monkeypatch.setattr(sys, "argv", ["serve_latency.py", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"`megactor-rt demo` failed \(exit status 2\): .*--no-such-flag"):
        module.main()
    assert list(tmp_path.iterdir()) == []
