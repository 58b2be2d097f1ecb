"""``megactor-rt`` command line on CPU: demo, animate (CLI == Python), doctor, download (offline), convert-weights,
and every bad-input case (exit code 2, ``error: <file>: <problem>`` on stderr, no output file left behind).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Iterator
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from media_fixtures import (
    BAD_INPUT_CASES,
    PORTRAIT,
    bad_input,
    block_means,
    face_frames,
    plain_image,
    stream_facts,
    write_face_driver,
    write_plain_driver,
)
from PIL import Image

from megactor_rt import cli
from megactor_rt.cli import main
from megactor_rt.config import AnimateConfig, tiny_config
from megactor_rt.errors import InputError
from megactor_rt.media import iter_video_frames, probe_video, read_image
from megactor_rt.progress import progress_enabled, set_progress_enabled
from megactor_rt.runtime.animator import Animator
from megactor_rt.weights import build_models, write_converted
from megactor_rt.weights_layout import DOWNLOADING

FAST = ["--steps", "2", "--window", "4", "--overlap", "2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_media")
    face = root / "my_face.png"
    Image.fromarray(face_frames(1, 256)[0]).save(face)  # a different portrait than the bundled one
    return {
        "driver": write_face_driver(root / "my_driver.mp4", n=6, fps=25, audio=True),
        "portrait": face,
        "faceless_portrait": plain_image(root / "faceless.png", 256, 256),
        "faceless_driver": write_plain_driver(root / "faceless_driver.mp4", n=6, fps=25, audio=True),
    }


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real converted-weights folder holding the tiny architecture with seeded random weights."""
    models = build_models(tiny_config(), seed=0)
    states = {name: module.state_dict() for name, module in models.modules().items()}
    return write_converted(tiny_config(), states, tmp_path_factory.mktemp("cli_weights") / "tiny")


@pytest.fixture(autouse=True)
def _restore_progress() -> Iterator[None]:
    was = progress_enabled()  # main(["-q", ...]) switches progress bars off process-wide
    yield
    set_progress_enabled(was)


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def frames_of(path: Path) -> list[np.ndarray]:
    return list(iter_video_frames(path))


# ---------------------------------------------------------------------------------------------- demo


def test_demo_bundled_media_capped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.mp4"
    code, stdout, err = run(capsys, "demo", "--max-frames", 6, *FAST, "-o", out)
    assert code == 0, err
    assert "TINY RANDOM-WEIGHT" in stdout and f"wrote {out}: 6 frames" in stdout
    assert stream_facts(out) == (6, Fraction(30), True)  # the cap, the bundled clip's 30 fps, its MP3 audio
    assert [p.name for p in tmp_path.iterdir()] == ["demo.mp4"]


def test_demo_checks_its_inputs_before_building_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing portrait or driver is named with its role before the banner and the model (was: the model
    built first, then "meme.mp4: video file does not exist")."""
    for flag, what in (("--portrait", "portrait"), ("--driver", "driver")):
        code, stdout, err = run(capsys, "demo", flag, tmp_path / "missing.file", "-o", tmp_path / "out.mp4")
        assert code == 2 and f"missing.file: {what} file does not exist" in err and "TINY" not in stdout, err
    assert list(tmp_path.iterdir()) == []


def test_demo_on_onnxruntime_matches_torch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`demo --backend onnxruntime`: the tiny model is exported into --work-dir (only the graphs the run
    needs), runs there, and gives the torch demo's frames up to fp32 rounding (and H.264); the TensorRT
    demo runs where TensorRT is installed and is a one-line error naming it elsewhere."""
    ort, ref, work = tmp_path / "ort.mp4", tmp_path / "torch.mp4", tmp_path / "work"
    code, _, err = run(capsys, "demo", "--backend", "onnxruntime", "--work-dir", work, "--max-frames", 4, *FAST,
                       "-o", ort)
    assert code == 0, err
    manifest = json.loads(next(work.glob("onnx-*/manifest.json")).read_text())
    assert "temporal_unet.fp32" in manifest["graphs"] and "temporal_unet_cond.fp32" not in manifest["graphs"]
    assert run(capsys, "demo", "--max-frames", 4, *FAST, "-o", ref)[0] == 0
    a, b = (np.stack(frames_of(p)).astype(np.float64) for p in (ort, ref))
    assert a.shape == b.shape == (4, 128, 128, 3) and np.abs(a - b).mean() < 2.0
    trt = tmp_path / "trt.mp4"
    code, _, err = run(capsys, "demo", "--backend", "tensorrt", "--work-dir", work, "--max-frames", 4, *FAST, "-o", trt)
    if code == 0:  # a TensorRT machine: fp16 plans of the same networks
        c = np.stack(frames_of(trt)).astype(np.float64)
        assert c.shape == b.shape and np.abs(c - b).mean() < 8.0
    else:
        assert code == 2 and "backend 'tensorrt' is unavailable" in err and not trt.exists()


def test_demo_user_media_matches_python(media: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo_user.mp4"
    code, _, err = run(capsys, "demo", "--portrait", media["portrait"], "--driver", media["driver"], *FAST,
                       "--seed", 3, "-o", out, "--stats", tmp_path / "stats" / "demo.json")
    assert code == 0, err
    assert stream_facts(out) == (6, Fraction(25), True)  # no cap: every frame of the user's clip
    doc = json.loads((tmp_path / "stats" / "demo.json").read_text())
    (facts,) = doc["runs"]
    assert doc["command"] == "demo" and doc["backend"] == "torch" and doc["device"] == "cpu"
    assert doc["weights_id"] == "tiny-random-42"  # (--seed seeds the run, not the demo model: as with weights)
    assert doc["config"]["steps"] == 2 and doc["config"]["seed"] == 3 and doc["config"]["mode"] == "optimized"
    assert doc["options"] == {"face_crop": True, "portrait_face": None, "driver_face": None, "mask": None,
                              "audio": True, "audio_start": None, "contour": False, "contour_affine_frame": "last", "side_by_side": False,
                              "paste_back": False, "crf": None, "metadata": True,
                              "first_number": None}
    assert facts["output"] == str(out) and facts["frames"] == 6 and len(facts["step_seconds"]) == 2
    assert facts["fps"] == pytest.approx(6 / facts["total_s"]) and 0 < facts["first_frame_s"] <= facts["total_s"]
    assert facts["stage_seconds"]["denoise"] > 0 and facts["calls"]["unet"] == 3 * 2  # 3 windows x 2 steps
    anim = Animator.demo(device="cpu", config=AnimateConfig(steps=2, window=4, overlap=2, seed=3))
    py_out = tmp_path / "python.mp4"
    anim.animate_to_file(media["portrait"], media["driver"], py_out)
    cli_frames, py_frames = frames_of(out), frames_of(py_out)
    assert len(cli_frames) == len(py_frames) == 6
    assert all(np.array_equal(a, b) for a, b in zip(cli_frames, py_frames))
    # ... and the user's portrait was really used: the bundled one gives other frames
    bundled = tmp_path / "bundled.mp4"
    anim.animate_to_file(PORTRAIT, media["driver"], bundled, config=AnimateConfig(steps=2, window=4, overlap=2,
                                                                                    seed=3, max_frames=2))
    assert not np.array_equal(frames_of(bundled)[0], cli_frames[0])


def test_python_demo_has_the_commands_default_weights() -> None:
    """`megactor-rt demo` and `Animator.demo()` build the same random weights (their frames then agree, as the test
    above shows), whatever the run's seed."""
    assert Animator.demo().sub.weights_id == cli.tiny_weights_id(cli.DEMO_WEIGHTS_SEED) == "tiny-random-42"


# ---------------------------------------------------------------------------------------------- animate


def test_cache_dir_lets_the_next_run_skip_the_portrait(weights: Path, media: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """--cache-dir: the second process-level run finds the prepared portrait on disk (and says so); same frames."""
    common = ("animate", "--portrait", media["portrait"], "--driver", media["driver"], "--weights", weights,
              "--device", "cpu", *FAST, "--max-frames", 4, "--no-audio", "--cache-dir", tmp_path / "cache")
    code, first, err = run(capsys, *common, "-o", tmp_path / "a.mp4")
    assert code == 0, err
    assert "portrait from cache" not in first and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    code, second, err = run(capsys, *common, "-o", tmp_path / "b.mp4")
    assert code == 0 and "portrait from cache" in second, err
    a, b = frames_of(tmp_path / "a.mp4"), frames_of(tmp_path / "b.mp4")
    assert len(a) == len(b) == 4 and all(np.array_equal(x, y) for x, y in zip(a, b))
    budget = cli._cache(argparse.Namespace(cache_dir=tmp_path / "cache", cache_max_gb=0.5))
    assert budget is not None and budget.max_disk_bytes == 2**29  # GiB, as PortraitCache's default (20 << 30)
    (tmp_path / "a_file").write_text("not a store")
    with pytest.raises(InputError, match="a_file: --cache-dir names a folder .* this is a file"):
        cli._cache(argparse.Namespace(cache_dir=tmp_path / "a_file", cache_max_gb=1.0))


def test_animate_cli_and_python_give_identical_frames(weights: Path, media: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.mp4"
    code, stdout, err = run(capsys, "animate", "--portrait", PORTRAIT, "--driver", media["driver"], "-o", out,
                            "--weights", weights, "--device", "cpu", *FAST, "--seed", 7)
    assert code == 0, err
    assert f"wrote {out}: 6 frames" in stdout
    assert stream_facts(out) == (6, Fraction(25), True)
    anim = Animator.from_weights(weights, device="cpu", config=AnimateConfig(steps=2, window=4, overlap=2, seed=7))
    py_out = tmp_path / "python.mp4"
    anim.animate_to_file(PORTRAIT, media["driver"], py_out)
    cli_frames, py_frames = frames_of(out), frames_of(py_out)
    assert len(cli_frames) == 6
    assert all(np.array_equal(a, b) for a, b in zip(cli_frames, py_frames, strict=True))
    assert any(not np.array_equal(cli_frames[0], f) for f in cli_frames[1:])  # not a frozen image


def test_no_face_crop_falls_back_to_centre_crop(weights: Path, media: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "centre.mp4"
    args = ["animate", "--portrait", media["faceless_portrait"], "--driver", media["faceless_driver"], "-o", out,
            "--weights", weights, "--device", "cpu", *FAST]
    code, _, err = run(capsys, *args)
    assert code == 2 and "no face found in portrait faceless.png" in err and "--no-face-crop" in err
    assert not out.exists()
    code, _, err = run(capsys, *args, "--no-face-crop", "--no-audio")
    assert code == 0, err
    assert stream_facts(out) == (6, Fraction(25), False)  # --no-audio drops the driver's audio


@pytest.mark.parametrize("case", [*BAD_INPUT_CASES, "output_read_only", "weights_missing"])
def test_bad_input_exit_2_names_file_and_leaves_no_output(case: str, weights: Path, media: dict[str, Path],
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if case in BAD_INPUT_CASES:
        portrait, driver, output, needle = bad_input(case, tmp_path, media["portrait"], media["driver"])
    else:
        portrait, driver, output, needle = bad_input("output_is_directory", tmp_path, media["portrait"], media["driver"])
        output.rmdir()
    if case == "output_read_only":
        real_access = os.access  # chmod cannot be used: tests may run as root, which ignores it
        monkeypatch.setattr("megactor_rt.media.os.access",
                            lambda p, mode: False if Path(p) == output.parent else real_access(p, mode))
        needle = r"result\.mp4: output folder .*out is not writable"
    if case == "weights_missing":
        weights, needle = tmp_path / "no_weights", r"weights directory .*no_weights does not exist"
    before = sorted(tmp_path.rglob("*"))
    code, _, err = run(capsys, "animate", "--portrait", portrait, "--driver", driver, "-o", output,
                       "--weights", weights, "--device", "cpu", *FAST)
    assert code == 2
    assert err.startswith("error: ")
    assert re.search(needle, err), err
    assert sorted(tmp_path.rglob("*")) == before  # no output, no temporary file


def test_failed_run_keeps_previous_output(weights: Path, media: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.mp4"
    out.write_bytes(b"an earlier result")
    code, _, err = run(capsys, "animate", "--portrait", PORTRAIT, "--driver", media["faceless_driver"], "-o", out,
                       "--weights", weights, "--device", "cpu", *FAST)
    assert code == 2 and "faceless_driver.mp4" in err
    assert out.read_bytes() == b"an earlier result"
    assert [p.name for p in tmp_path.iterdir()] == ["result.mp4"]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """One line, as the other clear errors (was: argparse's usage block above the message)."""
    for argv, needle in ((["animate", "--backend", "nope"], "argument --backend: invalid choice: 'nope'"),
                         (["demo", "--steps", "0"], "argument --steps: 0 is not >= 1")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
        assert f"`megactor-rt {argv[0]} --help` lists the options" in err
    for argv, said in ((["animate", "--demo", "--foo"], "unrecognized arguments: --foo (`megactor-rt animate --help`"),
                       (["--bogus", "animate", "--demo"], "unrecognized arguments: --bogus (`megactor-rt --help`"),
                       (["-vq"], "a command is needed: animate, serve, demo"),
                       ([], "error: a command is needed: animate, serve, demo")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and said in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("megactor-rt 0.")


def test_unexpected_error_exits_1_without_traceback(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    def boom(args: object) -> int:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "cmd_doctor", boom)
    code, _, err = run(capsys, "doctor")
    assert code == 1
    assert "unexpected error: RuntimeError: kaboom" in err and "-v" in err and "Traceback" not in err


def test_a_name_too_long_for_the_file_system_is_named(media: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A portrait, driver or result whose name is over the file system's 255 bytes: exit 2 naming it (was exit 1,
    "unexpected error: OSError: [Errno 36] File name too long", from wherever pathlib first looked at it)."""
    long = tmp_path / ("a" * 300)
    for flags in (("--portrait", f"{long}.png", "--driver", media["driver"], "-o", tmp_path / "r.mp4"),
                  ("--portrait", media["portrait"], "--driver", media["driver"], "-o", f"{long}.mp4",
                   "--skip-existing")):
        code, _, err = run(capsys, "animate", "--demo", *flags, "--max-frames", 2)
        assert code == 2 and f"{long}" in err and "the name is too long for the file system" in err, err
        assert "unexpected" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- other commands


def test_doctor_lists_backends(weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "doctor")
    assert code == 0
    assert "backends:" in out and "torch:" in out and "cuda:" in out
    assert re.search(r"^  formats: \.gif gif, .*\.webm libvpx-vp9, \.webp libwebp_anim, - YUV4MPEG2 stream to "
                     r"standard output$", out, re.M)  # one line
    code, out, _ = run(capsys, "doctor", "--json", "--weights", weights)
    assert code == 0
    report = json.loads(out)
    assert report["backends"]["torch"].startswith("available")
    assert report["weights"]["status"].startswith("converted weights found")
    assert isinstance(report["kernels"]["available"], bool)  # was the string "False", true to any script
    assert isinstance(report["kernels"]["compute_capabilities"], list)
    code, out, _ = run(capsys, "doctor", "--json", "--weights", weights / "missing")
    assert code == 2 and json.loads(out)["weights"]["status"] == "missing"  # a script can tell
    assert "11.4.0.106" in report["tensorrt"]["code checked against"] and report["tensorrt"]["installed"]
    import av

    assert report["media"]["pyav"] == av.__version__ and report["media"]["encoder"] in ("libx264", "libopenh264",
                                                                                         "mpeg4")
    formats = report["media"]["formats"]
    assert formats[".png"] == "png frames (Pillow; 16-bit: OpenCV)"
    assert (formats[".mp4"], formats[".webm"], formats[".gif"], formats[".webp"]) == (
        report["media"]["encoder"], "libvpx-vp9", "gif", "libwebp_anim")
    import pillow_heif

    assert report["media"]["portrait images"]["heic"] == f"pillow-heif {pillow_heif.__version__}"
    assert report["face detection"]["hog"] == "dlib's HOG detector (built in)"


def test_download_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[dict] = []

    def offline(**kwargs: object) -> str:
        calls.append(kwargs)
        raise OSError("[Errno -3] Temporary failure in name resolution")

    fake_hub = types.ModuleType("huggingface_hub")
    fake_hub.snapshot_download = offline  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub)  # never touches the network
    out = tmp_path / "dl"
    code, _, err = run(capsys, "download", "--out", out)
    assert code == 2
    assert len(calls) == 1 and calls[0]["repo_id"] == cli.HF_REPO
    assert err.startswith(f"error: could not download {cli.HF_REPO}")
    assert "Temporary failure in name resolution" in err and "offline" in err and "convert-weights" in err
    assert not out.exists()
    code, _, err = run(capsys, "download", "--out", cli.__file__)  # (said before the hub is asked)
    assert code == 2 and "--out names a folder for the outputs, and this is a file" in err and len(calls) == 1

    def breaks_off(**kwargs: object) -> str:  # a file came, then the transfer broke
        weights = Path(str(kwargs["local_dir"])) / "weights"
        weights.mkdir()
        (weights / "checkpoint-steps9000.ckpt").write_bytes(b"cut")
        raise OSError("Connection reset by peer")

    fake_hub.snapshot_download = breaks_off  # type: ignore[attr-defined]
    code, _, err = run(capsys, "download", "--out", out)
    assert code == 2 and "Run the command again to go on with what came" in err
    code, _, err = run(capsys, "convert-weights", out / "weights", tmp_path / "converted")
    assert code == 2 and f"the download into {out} did not finish" in err and not (tmp_path / "converted").exists()
    fake_hub.snapshot_download = lambda **kwargs: str(kwargs["local_dir"])  # type: ignore[attr-defined]
    code, stdout, err = run(capsys, "download", "--out", out)  # (offline, the hub returned what was there: exit 0)
    assert code == 2 and "no weights/sd-vae-ft-mse/config.json, no weights/StableDiffusion/image_encoder/" in err
    assert "could not download" in err and (out / DOWNLOADING).exists()
    for part in ("sd-vae-ft-mse", "StableDiffusion/image_encoder"):
        (out / "weights" / part).mkdir(parents=True)
        (out / "weights" / part / "config.json").write_text("{}")
    code, stdout, err = run(capsys, "download", "--out", out)
    assert code == 0 and "next: megactor-rt convert-weights" in stdout and not (out / DOWNLOADING).exists(), err


def test_convert_weights_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "release_weights", tmp_path / "converted"
    code, _, err = run(capsys, "convert-weights", src, dst)
    assert code == 2
    assert err.startswith("error: ") and f"weights folder {src} does not exist" in err
    assert not dst.exists()


def test_build_engines_without_tensorrt_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is importable here; this checks the no-TensorRT path")
    (tmp_path / "onnx").mkdir()
    assert main(["build-engines", "--onnx", str(tmp_path / "onnx"), "--out", str(tmp_path / "eng")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "TensorRT" in err and "Traceback" not in err
    assert not (tmp_path / "eng").exists() or not any((tmp_path / "eng").iterdir())


def test_export_cli_writes_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["-q", "export", "--weights", "tiny", "--out", str(tmp_path / "onnx"), "--graphs", "pose_guider",
               "--precision", "fp32", "--window", "4"])
    assert rc == 0
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert list(manifest["graphs"]) == ["pose_guider.fp32"]
    assert "pose_guider" in capsys.readouterr().out
    bad = ["-q", "export", "--weights", "tiny", "--out", str(tmp_path / "more"), "--graphs", "pose_guider",
           "--precision", "fp32", "--tiny-decoder", str(tmp_path / "gone.pth")]
    assert main(bad) == 2 and "gone.pth: tiny decoder weights not found" in capsys.readouterr().err
    assert not (tmp_path / "more").exists()  # refused before any export


def test_compile_is_torch_only(weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Backend-only options with another backend, and a device this machine lacks, are bad settings: exit code
    2 with the flag named (was: exit 1, "unexpected error: ValueError/AssertionError")."""
    with pytest.raises(InputError, match=r"compile \(--compile\) applies to the torch backend only"):
        Animator.from_weights(weights, backend="onnxruntime", device="cpu", compile=True)
    with pytest.raises(InputError, match=r"--cuda-graphs\) applies to the tensorrt backend only.*--compile "
                                         "reduce-overhead"):
        Animator.from_weights(weights, backend="torch", device="cpu", cuda_graphs=True)
    code, _, err = run(capsys, "demo", "--cuda-graphs", "-o", "x.mp4")
    assert code == 2 and "applies to the tensorrt backend only" in err and "unexpected" not in err
    code, _, err = run(capsys, "demo", "--device", "tpu9", "-o", "x.mp4")
    assert code == 2 and "'tpu9' is not a torch device name" in err
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "demo", "--device", "cuda", "-o", "x.mp4")
        assert code == 2 and "sees no CUDA GPU" in err and "unexpected" not in err
    code, _, err = run(capsys, "animate", "--portrait", "p.png", "--driver", "d.mp4", "-o", "o.mp4", "--weights",
                       weights, "--backend", "tensorrt", "--torch-fallback", "vae_decoder", "--fallback",
                       "onnxruntime")
    assert code == 2 and "cannot be combined with --fallback onnxruntime" in err
    base = ["animate", "--portrait", "p", "--driver", "d", "-o", "o", "--weights", "w"]
    assert cli.build_parser().parse_args([*base, "--cuda-graphs"]).cuda_graphs is True
    assert cli.build_parser().parse_args(base).cuda_graphs is False


def test_an_unknown_compile_mode_is_refused_before_any_work(weights: Path, media: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: accepted, the weights loaded, and torch refused it at the first UNet call (exit 1, "unexpected
    error: RuntimeError")."""
    import megactor_rt.runtime.animator as animator_module

    loads: list[object] = []
    real_load = animator_module.load_converted
    monkeypatch.setattr(animator_module, "load_converted", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    with pytest.raises(InputError, match=r"unknown torch.compile mode 'bogus' \(--compile MODE\);.*reduce-overhead"):
        Animator.from_weights(weights, device="cpu", compile="bogus")
    out = tmp_path / "o.mp4"
    code, _, err = run(capsys, "animate", "--weights", weights, "--portrait", media["portrait"], "--driver",
                       media["driver"], "-o", out, *FAST, "--compile", "bogus")
    assert code == 2 and "unknown torch.compile mode 'bogus'" in err and "unexpected" not in err
    assert loads == [] and not out.exists()


def test_compile_flag_reaches_the_torch_submodels(weights: Path) -> None:
    anim = Animator.from_weights(weights, device="cpu", compile=True)
    assert anim.sub.compile is True  # type: ignore[attr-defined]
    assert anim.sub.dtype == torch.float32  # no precision given: fp32 on the CPU (fp16 on a GPU)
    assert Animator.from_weights(weights, device="cpu", compile="max-autotune").sub.compile == "max-autotune"  # type: ignore[attr-defined]
    base = ["animate", "--portrait", "p", "--driver", "d", "-o", "o", "--weights", "w"]
    assert cli.build_parser().parse_args([*base, "--compile"]).compile is True
    assert cli.build_parser().parse_args([*base, "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert cli.build_parser().parse_args(base).compile is False


def test_speed_and_contour_flags_reach_the_animator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from megactor_rt.runtime.pipeline import RunStats

    seen: dict[str, object] = {}

    def fake(self: Animator, portrait: Path, driver: Path, output: Path, **kw: object) -> RunStats:
        seen.update(kw, config=self.config)
        return RunStats()

    monkeypatch.setattr(Animator, "animate_to_file", fake)
    monkeypatch.setattr(cli, "_report", lambda stats, out, **kw: None)
    model = tmp_path / "lm.dat"
    code, _, err = run(capsys, "demo", "--cfg-steps", 5, "--contour-preserve", "--landmarks-model", model,
                       "--tiny-decoder", tmp_path / "taesd", "--feature-reuse", 3, "--no-wrap", "--window-batch", 3,
                       "-o", tmp_path / "o.mp4")
    assert code == 0, err
    assert seen["config"].window_batch == 3  # type: ignore[attr-defined]
    assert seen["config"].closed_loop is False  # type: ignore[attr-defined]
    assert seen["config"].cfg_steps == 5  # type: ignore[attr-defined]
    assert seen["config"].feature_reuse == 3  # type: ignore[attr-defined]
    assert seen["config"].tiny_decoder == str(tmp_path / "taesd")  # type: ignore[attr-defined]
    assert seen["contour"] is True and seen["landmarks_model"] == model
    assert seen["contour_affine_frame"] == "last"  # upstream's quirk unless asked
    code, _, _ = run(capsys, "demo", "--contour-reserve", "--contour-affine-frame", "first", "-o", tmp_path / "o.mp4")
    assert code == 0 and seen["contour_affine_frame"] == "first"
    code, _, _ = run(capsys, "demo", "--contour-reserve", "-o", tmp_path / "o.mp4")  # upstream's spelling
    assert code == 0 and seen["contour"] is True and seen["config"].cfg_steps is None  # type: ignore[attr-defined]
    assert seen["config"].feature_reuse is None  # type: ignore[attr-defined]
    assert seen["config"].closed_loop is True  # type: ignore[attr-defined]
    assert seen["config"].window_batch == 1  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="cfg_steps must be >= 0"):
        AnimateConfig(cfg_steps=-1)


@pytest.mark.parametrize("flags,message", [
    (("--window", 4, "--overlap", 4), "--window must be >= 1 and --overlap from 0 to window - 1, got --window 4, "
                                      "--overlap 4"),
    (("--window", 33), "--window must be <= 32"),
    (("--fps", 0), "--fps must be a finite number >= 0.01"),
    (("--duration", 0), "--duration must be a finite number > 0 seconds"),
])
def test_out_of_range_settings_are_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                flags: tuple, message: str) -> None:
    out = tmp_path / "o.mp4"
    code, _, err = run(capsys, "demo", *flags, "-o", out)
    assert code == 2 and f"error: bad run settings: {message}" in err and "unexpected" not in err
    assert not out.exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--steps", "0", "0 is not >= 1"),
    ("--feature-reuse", "0", "0 is not >= 1"),
    ("--cfg-steps", "-1", "-1 is not >= 0"),
    ("--overlap", "-2", "-2 is not >= 0"),
    ("--reference-timestep", "-1", "-1 is not >= 0"),
    ("--max-frames", "0", "0 is not >= 1"),
    ("--window", "0", "0 is not >= 1"),
    ("--window-batch", "0", "0 is not >= 1"),
    ("--steps", "2.5", "'2.5' is not a whole number"),
    ("--guidance", "0.5", "0.5 is not a finite number >= 1"),
    ("--guidance", "nan", "nan is not a finite number >= 1"),
])
def test_out_of_range_flags_name_the_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: str,
                                          value: str, message: str) -> None:
    """A count or scale out of range is refused by the parser, naming the flag (not the config field)."""
    out = tmp_path / "o.mp4"
    with pytest.raises(SystemExit) as exc:
        main(["-q", "demo", f"{flag}={value}", "-o", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {flag}: {message}" in err
    assert not out.exists()


@pytest.mark.parametrize("argv, problem", [(["--suite", "nope"], "unknown benchmark suite 'nope'"),
                                           (["--suite", "gpu-full", "--scenarios", "1", "9", "0"],
                                            "suite 'gpu-full' has scenarios 1 to 5, not 0, 9"),
                                           (["--suite", "gpu-full", "--modes", "fast"], "has no mode(s) fast"),
                                           (["--suite", "cpu-smoke", "--modes", "optimized+warp"],
                                            "has no mode(s) optimized+warp")])
def test_bench_rejects_unknown_suite_or_mode(argv: list[str], problem: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "bench", *argv, "--out", tmp_path / "b")
    assert code == 2 and problem in err
    assert not (tmp_path / "b").exists()


def test_out_of_memory_is_exit_2_with_a_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    def oom(self: Animator, *args: object, **kw: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr("megactor_rt.runtime.submodels.TorchSubmodels.unet", oom)
    out = tmp_path / "o.mp4"
    code, _, err = run(capsys, "demo", *FAST, "-o", out)
    assert code == 2 and "error: out of GPU memory while animating" in err and "Tried to allocate 8.00 GiB" in err
    assert "--window 8" in err and "unexpected" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- batches


def test_batch_runs_every_pair_in_one_process_and_reports_failures(weights: Path, media: dict[str, Path],
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """One portrait x three drivers (one without a face): two results written, named <portrait>_<driver>.mp4,
    the portrait prepared once, the failed pair named on stderr with exit code 2; a pair's frames equal a
    single run's."""
    out = tmp_path / "results"
    common = ("--weights", weights, "--device", "cpu", *FAST, "--max-frames", 4, "--no-audio")
    code, stdout, err = run(capsys, "animate", "--portrait", media["portrait"], "--driver", media["driver"],
                            media["faceless_driver"], shutil.copy(media["driver"], tmp_path / "second_driver.mp4"),
                            "-o", out, *common, "--stats", tmp_path / "stats.json")
    assert code == 2
    runs = json.loads((tmp_path / "stats.json").read_text())["runs"]  # a record per pair, in order
    assert [Path(r["output"]).name for r in runs] == ["my_face_my_driver.mp4", "my_face_faceless_driver.mp4",
                                                      "my_face_second_driver.mp4"]
    assert [r.get("frames") for r in runs] == [4, None, 4] and "no face found" in runs[1]["error"]
    assert not runs[0]["portrait_cache_hit"] and runs[2]["portrait_cache_hit"]
    assert sorted(p.name for p in out.iterdir()) == ["my_face_my_driver.mp4", "my_face_second_driver.mp4"]
    assert "no face found" in err and "faceless_driver.mp4" in err
    assert "error: my_face.png + faceless_driver.mp4 -> my_face_faceless_driver.mp4: " in err  # which pair
    assert f"1 of 3 results not written: {out / 'my_face_faceless_driver.mp4'}" in err
    lines = [ln for ln in stdout.splitlines() if ln.startswith("wrote ")]
    assert len(lines) == 2 and "portrait from cache" not in lines[0] and "portrait from cache" in lines[1]
    single = tmp_path / "single.mp4"
    code, _, err = run(capsys, "animate", "--portrait", media["portrait"], "--driver", media["driver"], "-o", single,
                       *common)
    assert code == 0, err
    a, b = frames_of(out / "my_face_my_driver.mp4"), frames_of(single)
    assert len(a) == len(b) == 4 and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_skip_existing_does_the_rest_of_a_batch(weights: Path, media: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """--skip-existing: a batch run again keeps the results there (not rewritten, named on stdout) and writes the
    missing one; a single result that exists: nothing to do, the weights not even loaded. Without the flag a
    result is overwritten. A kept result made with other settings (its metadata says) is named in a warning."""
    out = tmp_path / "results"
    second = shutil.copy(media["driver"], tmp_path / "second.mp4")
    common = ("--portrait", media["portrait"], "--weights", weights, "--device", "cpu", *FAST, "--max-frames", 2,
              "--no-audio")
    code, _, err = run(capsys, "animate", "--driver", media["driver"], second, "-o", out, *common)
    assert code == 0, err
    kept, redone = out / "my_face_my_driver.mp4", out / "my_face_second.mp4"
    redone.unlink()
    os.utime(kept, (1e9, 1e9))
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        code, stdout, err = run(capsys, "animate", "--driver", media["driver"], second, "-o", out, *common,
                                "--skip-existing", "--stats", tmp_path / "stats.json")
    assert code == 0, err
    assert f"kept {kept}: it exists (--skip-existing)" in stdout and f"wrote {redone}" in stdout
    runs = json.loads((tmp_path / "stats.json").read_text())["runs"]  # (every result accounted for)
    assert runs[0] == {"portrait": str(media["portrait"]), "driver": str(media["driver"]), "output": str(kept),
                       "kept": True}
    assert runs[1]["output"] == str(redone) and runs[1]["frames"] == 2
    assert kept.stat().st_mtime == 1e9 and len(frames_of(redone)) == 2
    assert "other settings" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        code, stdout, err = run(capsys, "animate", "--driver", media["driver"], second, "-o", out, *common,
                                "--skip-existing", "--seed", 9, "--crf", 20, "--window-batch", 2)
    assert code == 0 and stdout.count("kept ") == 2, err  # kept, with a warning naming what differs
    assert (f"kept {kept} was made with other settings than this run's: seed 42 (now 9); crf None (now 20)"
            in caplog.text)
    assert "window_batch" not in caplog.text  # (the same math)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):  # the sound and the mask are settings too
        code, stdout, err = run(capsys, "animate", "--driver", media["driver"], second, "-o", out, *common[:-1],
                                "--skip-existing", "--mask", media["portrait"])
    assert code == 0 and stdout.count("kept ") == 2, err
    assert (f"kept {kept} was made with other settings than this run's: mask None (now '{media['portrait'].name}'); "
            "audio False (now True)" in caplog.text), caplog.text

    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(Animator, "from_weights", load)
    code, stdout, err = run(capsys, "animate", "--driver", media["driver"], "-o", kept, *common, "--skip-existing",
                            "--stats", tmp_path / "all_kept.json", "--seed", 9)
    assert code == 0 and f"kept {kept}" in stdout and kept.stat().st_mtime == 1e9, err
    doc = json.loads((tmp_path / "all_kept.json").read_text())  # (nothing made: the record says what was kept)
    assert doc["command"] == "animate" and [(r["output"], r["kept"]) for r in doc["runs"]] == [(str(kept), True)]
    assert doc["runs"][0]["other_settings"] == ["seed 42 (now 9)"]
    code, stdout, err = run(capsys, "animate", "--driver", second, "-o", kept, *common, "--skip-existing",
                            "--stats", tmp_path / "other_driver.json")  # the same result's name, another driver
    assert code == 0 and f"kept {kept}" in stdout and kept.stat().st_mtime == 1e9, err
    said = json.loads((tmp_path / "other_driver.json").read_text())["runs"][0]["other_settings"]
    assert said == ["driver 'my_driver.mp4' (now 'second.mp4')"], said  # (was: kept without a word)
    code, stdout, err = run(capsys, "animate", "--driver", media["driver"], "-o", kept, *common, "--skip-existing",
                            "--stats", tmp_path / "dry.json", "--dry-run")
    assert code == 0 and not (tmp_path / "dry.json").exists(), err
    monkeypatch.undo()
    code, _, err = run(capsys, "animate", "--driver", media["driver"], "-o", kept, *common)
    assert code == 0 and kept.stat().st_mtime > 1e9, err


def test_a_stopped_batch_says_how_far_it_came(weights: Path, media: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Ctrl-C in a batch's third result: besides "interrupted", how many results were written and how to make the
    rest (--skip-existing) (was "interrupted" alone: which results of hundreds were whole?)."""
    from megactor_rt.runtime.animator import Animator

    out = tmp_path / "results"
    drivers = [shutil.copy(media["driver"], tmp_path / f"d{i}.mp4") for i in range(3)]
    real, calls = Animator.animate_to_file, []

    def animate_to_file(self: Animator, *args: object, **kw: object) -> object:
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Animator, "animate_to_file", animate_to_file)
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        code, _, err = run(capsys, "animate", "--portrait", media["portrait"], "--driver", *drivers, "-o", out,
                           "--weights", weights, "--device", "cpu", *FAST, "--max-frames", 2, "--no-audio")
    assert code == 130 and "interrupted" in err, err
    assert (f"stopped at {out / 'my_face_d2.mp4'}: 2 of 3 results written; the same command with --skip-existing "
            "makes the rest") in caplog.text


def test_skip_existing_names_a_kept_file_that_is_no_result(media: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "my_face_my_driver.mp4").write_bytes(b"")  # (not this engine's: its results are whole)
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        code, stdout, err = run(capsys, "animate", "--demo", "--portrait", media["portrait"], "--driver",
                                media["driver"], "-o", tmp_path / "res", "--skip-existing")
    assert code == 0 and "kept " in stdout, err
    assert f"kept {tmp_path / 'res' / 'my_face_my_driver.mp4'}, which is not a readable result" in caplog.text
    assert "remove it to make it again" in caplog.text


def test_a_jobs_file_runs_its_pairs_with_their_own_options(weights: Path, media: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """--jobs: each row's pair into its own result (folders created, formats by suffix), with its own start and
    sound; a failed row is reported and the others still run (exit 2); a row's frames equal a single run's with
    the same flags; --skip-existing keeps what a jobs file wrote."""
    shutil.copy(media["driver"], tmp_path / "clip.mp4")
    shutil.copy(media["portrait"], tmp_path / "face.png")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("portrait,driver,output,start,audio\n"
                    "face.png,clip.mp4,out/late.mp4,0.08,\n"
                    f"face.png,{media['faceless_driver']},out/none.mp4,,\n"
                    "face.png,clip.mp4,other/quiet.webm,,none\n")
    common = ("--weights", weights, "--device", "cpu", *FAST, "--max-frames", 2)
    code, stdout, err = run(capsys, "animate", "--jobs", jobs, *common, "--stats", tmp_path / "stats.json")
    assert code == 2
    assert f"error: {jobs}:3: face.png + faceless_driver.mp4 -> none.mp4: " in err  # (the row's line)
    assert "1 of 3 results not written" in err
    late, quiet = tmp_path / "out" / "late.mp4", tmp_path / "other" / "quiet.webm"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["late.mp4"] and quiet.is_file()
    assert stream_facts(late) == (2, Fraction(25), True) and stream_facts(quiet) == (2, Fraction(25), False)
    doc = json.loads((tmp_path / "stats.json").read_text())
    runs = doc["runs"]
    assert [Path(r["output"]).name for r in runs] == ["late.mp4", "none.mp4", "quiet.webm"]
    # each row's own settings in its record (the document's are the command's)
    assert doc["config"]["start"] is None and doc["options"]["audio"] is True
    assert runs[0]["config"] == {**doc["config"], "start": 0.08} and "options" not in runs[0]
    assert "config" not in runs[1] and "options" not in runs[1]
    assert runs[2]["options"] == {**doc["options"], "audio": False} and "config" not in runs[2]
    single = tmp_path / "single.mp4"
    code, _, err = run(capsys, "animate", "--portrait", media["portrait"], "--driver", media["driver"], "-o", single,
                       "--start", "0.08", *common)
    assert code == 0, err
    a, b = frames_of(late), frames_of(single)
    assert len(a) == len(b) == 2 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], frames_of(quiet.with_suffix(".webm"))[0])  # from the clip's start instead
    os.utime(late, (1e9, 1e9))
    code, stdout, err = run(capsys, "animate", "--jobs", jobs, *common, "--skip-existing")
    assert code == 2 and f"kept {late}" in stdout and f"kept {quiet}" in stdout and late.stat().st_mtime == 1e9
    assert "1 of 3 results not written (2 kept from before)" in err, err  # (was "1 of 1")


@pytest.fixture()
def web(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A local web server (its address) for the files in a folder (its path)."""
    from serve_fixtures import folder_served

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # (the local server is reached directly)

    served = tmp_path / "served"
    served.mkdir()
    with folder_served(served) as url:
        yield url, served


def test_stats_name_a_jobs_files_web_inputs_by_their_addresses(weights: Path, media: dict[str, Path], tmp_path: Path,
                                                               web: tuple[str, Path],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--stats records a downloaded input by its address, in a written result's record and a failed one's (was the
    temporary copy's path, gone once the command ends)."""
    url, served = web
    shutil.copy(media["portrait"], served / "me.png")
    shutil.copy(media["driver"], served / "talk.mp4")
    jobs, stats = tmp_path / "jobs.csv", tmp_path / "stats.json"
    jobs.write_text(f"portrait,driver,output,start\n{url}/me.png,{url}/talk.mp4,a.mp4,\n"
                    f"{url}/me.png,{url}/talk.mp4,b.mp4,60\n")
    code, _, err = run(capsys, "animate", "--jobs", jobs, "--weights", weights, "--device", "cpu", *FAST,
                       "--stats", stats)
    assert code == 2 and f"error: {jobs}:3: " in err, err
    text = stats.read_text()
    runs = json.loads(text)["runs"]
    assert [(r["portrait"], r["driver"], "error" in r) for r in runs] == [
        (f"{url}/me.png", f"{url}/talk.mp4", False), (f"{url}/me.png", f"{url}/talk.mp4", True)]
    assert "megactor-rt-" not in text  # (no temporary copy named anywhere)


def test_a_failed_download_names_the_jobs_files_row(weights: Path, media: dict[str, Path], tmp_path: Path,
                                                    web: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A row's address that cannot be downloaded is named with the first row giving it, as the jobs file's other
    errors are (was the address alone: which of a thousand rows?), before any work."""
    url, _ = web
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"portrait,driver,output\n{media['portrait']},{media['driver']},a.mp4\n"
                    f"{media['portrait']},{url}/gone.mp4,b.mp4\n{url}/gone.png,{url}/gone.mp4,c.mp4\n")
    code, _, err = run(capsys, "animate", "--jobs", jobs, "--weights", weights, "--device", "cpu", *FAST)
    assert code == 2 and f"error: {jobs}:3: {url}/gone.mp4: the server answered 404" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.csv", "served"]


def test_skip_existing_keeps_a_row_whose_address_has_gone(weights: Path, media: dict[str, Path], tmp_path: Path,
                                                         web: tuple[str, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--skip-existing after a partial batch: a row whose result exists is kept without downloading its inputs
    again (was: every address downloaded again, and one that had expired - a signed link - refused the whole run
    before any work), and named by its address in --stats."""
    url, served = web
    shutil.copy(media["driver"], served / "talk.mp4")
    jobs, stats = tmp_path / "jobs.csv", tmp_path / "stats.json"
    jobs.write_text(f"portrait,driver,output\n{media['portrait']},{url}/talk.mp4,a.mp4\n"
                    f"{media['portrait']},{media['driver']},b.mp4\n")
    common = ("animate", "--jobs", jobs, "--weights", weights, "--device", "cpu", *FAST, "--max-frames", 2)
    code, _, err = run(capsys, *common)
    assert code == 0, err
    (served / "talk.mp4").unlink()  # (the link has expired)
    (tmp_path / "b.mp4").unlink()  # (the batch stopped before this one)
    code, stdout, err = run(capsys, *common, "--skip-existing", "--stats", stats)
    assert code == 0, err
    assert f"kept {tmp_path / 'a.mp4'}: it exists" in stdout and f"wrote {tmp_path / 'b.mp4'}" in stdout
    runs = json.loads(stats.read_text())["runs"]
    assert (runs[0]["driver"], runs[0]["kept"]) == (f"{url}/talk.mp4", True)


@pytest.mark.parametrize(("row", "named"), [("{portrait},out/a.mp4,b.mp4", "out/a.mp4: the driver"),
                                            ("out/seq/00001.png,{driver},b.mp4", "out/seq/00001.png: the portrait"),
                                            ("{portrait},out/seq,b.mp4", "out/seq: the driver")],
                         ids=["result-as-driver", "sequence-frame-as-portrait", "sequence-folder-as-driver"])
def test_a_row_using_another_rows_result_is_named_so(row: str, named: str, weights: Path, media: dict[str, Path],
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A row whose input is another row's result (not made yet: every row is checked before any runs) says so (was
    "driver file does not exist", though the file names a result of the same jobs file)."""
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"portrait,driver,output\n{media['portrait']},{media['driver']},out/a.mp4\n"
                    f"{media['portrait']},{media['driver']},out/seq/%05d.png\n"
                    + row.format(**media) + "\n")
    code, _, err = run(capsys, "animate", "--jobs", jobs, "--weights", weights, "--device", "cpu", *FAST)
    where = 2 if "a.mp4" in named else 3
    assert code == 2 and f"error: {jobs}:4: {tmp_path / named} is the result of {jobs}:{where}, which does not exist " \
        "yet" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.csv"]


@pytest.mark.parametrize(("row", "named"), [("out/seq/typo.png,{driver},b.mp4", "out/seq/typo.png: portrait file"),
                                            ("{portrait},b.mp4,b.mp4", "b.mp4: driver file")],
                         ids=["another-file-in-a-sequence-folder", "a-rows-own-result"])
def test_a_missing_input_that_is_no_rows_result_is_named_missing(row: str, named: str, weights: Path,
                                                                 media: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A file in a sequence result's folder that is none of its frames (a typo), and a row's own result as its input,
    are missing files (were "the result of jobs.csv:N, which does not exist yet")."""
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"portrait,driver,output\n{media['portrait']},{media['driver']},out/seq/%05d.png\n"
                    + row.format(**media) + "\n")
    code, _, err = run(capsys, "animate", "--jobs", jobs, "--weights", weights, "--device", "cpu", *FAST)
    assert code == 2 and f"{tmp_path / named} does not exist" in err and "is the result of" not in err, err


@pytest.mark.parametrize("case", ["missing-portrait", "result-over-input", "with-portrait", "nothing", "bad-crf",
                                  "folder-is-a-file"])
def test_a_jobs_file_is_checked_before_the_weights_load(case: str, weights: Path, media: dict[str, Path],
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row's inputs, result and settings are checked first (the error names the file and line); --jobs
    replaces --portrait, --driver and -o, and without it they are needed."""
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(Animator, "from_weights", load)
    jobs = tmp_path / "jobs.csv"
    rows = {"missing-portrait": f"{media['portrait']},{media['driver']},a.mp4\nnobody.png,{media['driver']},b.mp4\n",
            "result-over-input": f"{media['portrait']},{media['driver']},a.mp4\n{media['portrait']},"
                                 f"{media['faceless_driver']},{media['driver']}\n",  # row 1's driver
            "bad-crf": f"{media['portrait']},{media['driver']},a.mp4\n{media['portrait']},{media['driver']},b.gif\n",
            "folder-is-a-file": f"{media['portrait']},{media['driver']},a.mp4\n{media['portrait']},{media['driver']},"
                                f"{media['portrait']}/b.mp4\n"}
    jobs.write_text("portrait,driver,output\n" + rows.get(case, rows["missing-portrait"]))
    flags = {"with-portrait": ("--jobs", jobs, "--portrait", media["portrait"]), "nothing": (),
             "bad-crf": ("--jobs", jobs, "--crf", 20)}.get(case, ("--jobs", jobs))
    code, _, err = run(capsys, "animate", *flags, "--weights", weights, "--device", "cpu")
    expected = {"missing-portrait": f"{jobs}:3: .*nobody.png.*portrait",
                "result-over-input": f"{jobs}:3: .*my_driver.mp4: the result would overwrite an input",
                "with-portrait": "--portrait cannot be given with --jobs",
                "nothing": "animate needs --portrait, --driver, -o .or --jobs FILE",
                "bad-crf": f"{jobs}:3: .*b.gif",
                "folder-is-a-file": f"{jobs}:3: .*b.mp4: its folder cannot be created .*my_face.png is a file, not a "
                                    "folder"}[case]
    assert code == 2 and re.search(expected, err), err
    assert "Traceback" not in err and not list(tmp_path.glob("*.mp4"))


def test_dry_run_finds_the_failures_without_the_weights(weights: Path, media: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """--dry-run: each result's portrait crop and driver plan, a line each, without loading the weights or writing
    anything; a faceless portrait or driver, or a start past the driver's end, is named (exit 2). Its frame count
    and crop are the real run's."""
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    jobs = tmp_path / "jobs.csv"
    jobs.write_text("portrait,driver,output,start\n"
                    f"{media['portrait']},{media['driver']},out/good.mp4,0.08\n"
                    f"{media['faceless_portrait']},{media['driver']},out/no_face.mp4,\n"
                    f"{media['portrait']},{media['faceless_driver']},out/no_driver_face.mp4,\n"
                    f"{media['portrait']},{media['driver']},out/late.mp4,9\n")
    with monkeypatch.context() as m:
        m.setattr(Animator, "from_weights", load)
        code, stdout, err = run(capsys, "animate", "--jobs", jobs, "--weights", weights, "--dry-run")
    assert code == 2 and "Traceback" not in err
    [line] = stdout.splitlines()
    found = re.fullmatch(rf"ok {re.escape(str(tmp_path / 'out' / 'good.mp4'))}: portrait 256x256, face \d+x\d+ px, "
                         r"crop (\d+) px; driver 192x192, 4 frames at 25 fps, a face in 4 of them, crop (\d+) px; "
                         r"1 window\(s\) x 25 steps", line)
    assert found, line
    for line, name, problem in ((3, "no_face.mp4", "no face found"), (4, "no_driver_face.mp4", "no face found"),
                                (5, "late.mp4", "no frame starts at or after 9.0 s")):
        assert re.search(rf"error: {re.escape(str(jobs))}:{line}: \S+ \+ \S+ -> {name}: .*{problem}", err), err
    assert "3 of 4 results would not be written (--dry-run: nothing was)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.csv"]  # no result, no folder
    code, _, err = run(capsys, "animate", "--jobs", jobs, "--weights", weights, "--dry-run", "--steps", 5000)
    assert code == 2 and err.count("steps must be at most") == 4, err  # the scheduler's limit, for every result
    anim = Animator.from_weights(weights, device="cpu", config=AnimateConfig(steps=2, window=4, overlap=2, start=0.08))
    anim.animate_to_file(media["portrait"], media["driver"], tmp_path / "real.mp4", audio=False)
    plan = anim.last_plan
    assert plan is not None and plan.num_frames == len(frames_of(tmp_path / "real.mp4")) == 4
    assert int(found[2]) == plan.crop[2] - plan.crop[0]
    crop = anim._portrait_crop(media["portrait"], True, None, "auto")[2]  # the run's portrait crop
    assert int(found[1]) == crop[2] - crop[0]
    code, stdout, err = run(capsys, "animate", "--jobs", jobs, "--dry-run")  # (no weights at all: the released
    assert code == 2 and "3 of 4 results would not be written" in err  # model's settings, 512 px)
    [line] = stdout.splitlines()
    assert re.fullmatch(r"ok \S+good.mp4: portrait 256x256, .* 4 frames at 25 fps, .*1 window\(s\) x 25 steps", line)
    code, _, err = run(capsys, "animate", "--jobs", jobs, "--dry-run", "--size", 100)
    assert code == 2 and "image_size (--size) 100: must be a multiple of 64" in err, err
    code, _, err = run(capsys, "animate", "--jobs", jobs)
    assert code == 2 and "animate needs --weights DIR (converted weights), --server URL" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.csv", "real.mp4"]


def test_a_dry_run_finds_a_shared_portrait_and_driver_once(weights: Path, media: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """--dry-run of many rows sharing a portrait and driver (a jobs file of 1000 results) finds their faces once
    per portrait, driver and settings, as the run does (was: again for every row: 4.5 minutes for 1000 rows of a
    4-frame driver); every row still gets its line, its own settings their own look, a failure each row's. A driver
    with several portraits has its faces found once per settings, as in the run (was once per portrait)."""
    from megactor_rt.runtime import driver as driver_module
    from megactor_rt.runtime import preflight as preflight_module

    looked: list[object] = []
    planned: list[object] = []
    crop_portrait, plan_run = preflight_module.crop_portrait, driver_module.plan_run

    def counted(portrait: object, *args: object, **kwargs: object) -> object:
        looked.append(portrait)
        return crop_portrait(portrait, *args, **kwargs)

    def counted_plan(driver: object, *args: object, **kwargs: object) -> object:
        planned.append(driver)
        return plan_run(driver, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(preflight_module, "crop_portrait", counted)
    monkeypatch.setattr(driver_module, "plan_run", counted_plan)  # (PlanCache's)
    monkeypatch.setattr(preflight_module, "plan_run", counted_plan)
    other = shutil.copy(media["portrait"], tmp_path / "other.png")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("portrait,driver,output,max_frames\n"
                    + "".join(f"{media['portrait']},{media['driver']},out/{i}.mp4,\n" for i in range(5))
                    + f"{media['portrait']},{media['driver']},out/short.gif,2\n"
                    + "".join(f"{media['faceless_portrait']},{media['driver']},out/f{i}.mp4,\n" for i in range(2))
                    + f"{other},{media['driver']},out/other.mp4,\n")
    code, stdout, err = run(capsys, "animate", "--jobs", jobs, "--weights", weights, "--dry-run")
    assert code == 2 and "2 of 9 results would not be written" in err, err
    assert len(looked) == 4  # (was 9)
    assert len(planned) == 2, planned  # (all settings, and max_frames 2; was 3: other.png's again)
    lines = stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"ok {tmp_path / 'out' / n}" for n in (
        "0.mp4", "1.mp4", "2.mp4", "3.mp4", "4.mp4", "short.gif", "other.mp4")]
    assert len(set(line.split(":", 1)[1] for line in lines[:5])) == 1 and " 2 frames at 25 fps" in lines[5]
    assert err.count("no face found") == 2 and f"{jobs}:8: " in err and f"{jobs}:9: " in err


def test_a_sequence_rate_for_a_video_driver_is_said_to_be_ignored(weights: Path, media: dict[str, Path],
                                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A jobs file's sequence_fps on a row driven by a video, and --sequence-fps with a jobs file of video drivers,
    change nothing: a warning says so, as --sequence-fps does with --driver (was silent)."""
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"portrait,driver,output,sequence_fps\n{media['portrait']},{media['driver']},a.mp4,24\n"
                    f"{media['portrait']},{media['driver']},b.mp4,\n")
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        code, _, err = run(capsys, "animate", "--jobs", jobs, "--weights", weights, "--dry-run", "--sequence-fps", 30)
    assert code == 0, err
    assert f"{jobs}:2: sequence_fps sets the rate of an image-sequence driver" in caplog.text
    assert "--sequence-fps sets the rate of image-sequence drivers (plate/%04d.png, plate/); none is given: ignored" \
        in caplog.text


def test_a_result_carries_its_settings(weights: Path, media: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Every setting of the run, the weights id and the inputs' file names (not their folders) are in the result's
    comment tag, in MP4 and WebM alike; --no-metadata leaves them out, and a GIF or an animated WebP has no place
    for them."""
    from megactor_rt import __version__
    from megactor_rt.media import result_settings

    common = ("--portrait", media["portrait"], "--driver", media["driver"], "--weights", weights, "--device", "cpu",
              *FAST, "--max-frames", 2, "--seed", 7)
    for suffix in ("mp4", "webm"):
        out = tmp_path / f"r.{suffix}"
        code, _, err = run(capsys, "animate", *common, "-o", out, "--crf", 20, "--driver-face", 1)
        assert code == 0, err
        doc = result_settings(out)
        assert doc is not None
        assert (doc["megactor_rt"], doc["portrait"], doc["driver"]) == (__version__, "my_face.png", "my_driver.mp4")
        assert (doc["config"]["seed"], doc["config"]["steps"], doc["config"]["window"]) == (7, 2, 4)
        assert doc["config"]["max_frames"] == 2 and doc["backend"] == "torch" and doc["image_size"] == 128
        assert doc["options"] | {"crf": 20, "driver_face": 1, "audio": True} == doc["options"]
        assert doc["weights_id"] == Animator.from_weights(weights, device="cpu").sub.weights_id
        with av.open(str(out)) as c:
            assert str(tmp_path) not in json.dumps(dict(c.metadata))
    for flags, name in ((("--no-metadata",), "bare.mp4"), ((), "r.gif"), ((), "r.webp")):
        code, _, err = run(capsys, "animate", *common, "-o", tmp_path / name, *flags)
        assert code == 0, err
        assert result_settings(tmp_path / name) is None
    assert result_settings(media["driver"]) is None  # another program's video
    from megactor_rt.runtime.driver import DriverFrames

    anim = Animator.from_weights(weights, device="cpu", config=AnimateConfig(steps=1, window=4, overlap=2,
                                                                             max_frames=2))
    anim.animate_to_file(read_image(media["portrait"]), DriverFrames(frames_of(media["driver"]), 25, "clip"),
                         tmp_path / "api.mkv")
    doc = result_settings(tmp_path / "api.mkv")
    assert doc is not None and (doc["portrait"], doc["driver"], doc["options"]["audio"]) == ("in memory", "clip", True)


def test_inspect_says_what_the_engine_sees(weights: Path, media: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """inspect: an image's size and faces, a video's rate, frames, sound and faces, a result's settings; a missing
    file is named (exit 2) and the others still reported; --json gives the same as JSON."""
    result = tmp_path / "r.mp4"
    code, _, err = run(capsys, "animate", "--portrait", media["portrait"], "--driver", media["driver"], "-o", result,
                       "--weights", weights, "--device", "cpu", *FAST, "--max-frames", 2, "--seed", 5)
    assert code == 0, err
    files = (media["portrait"], media["faceless_portrait"], media["driver"], result, tmp_path / "missing.mp4")
    code, stdout, err = run(capsys, "inspect", *files, "--json")
    assert code == 2 and "missing.mp4: input file does not exist" in err
    reports = json.loads(stdout)
    portrait, faceless, driver, made = (reports[str(f)] for f in files[:4])
    assert (portrait["kind"], portrait["size"], len(portrait["faces"])) == ("image", "256x256", 1)
    assert faceless["faces"] == []
    assert (driver["kind"], driver["fps"], driver["frames"], driver["audio"], driver["hdr"]) == ("video", "25", 6,
                                                                                                True, None)
    assert len(driver["faces"]) == 1 and "made_with" not in driver
    assert made["made_with"]["config"]["seed"] == 5 and made["made_with"]["portrait"] == "my_face.png"
    code, stdout, _ = run(capsys, "inspect", media["portrait"], media["driver"], "--no-faces")
    assert code == 0 and "faces" not in stdout and "fps: 25" in stdout and "size: 256x256" in stdout
    junk = tmp_path / "junk.png"
    junk.write_text("hello")
    code, _, err = run(capsys, "inspect", junk)
    assert code == 2 and f"{junk}: not a readable image" in err, err
    # images FFmpeg reads but a portrait's reading refuses: why, not "not an image Pillow reads, nor a video"
    Image.new("RGB", (40, 40)).save(tmp_path / "tiny.png")
    half = tmp_path / "half.png"
    half.write_bytes(media["portrait"].read_bytes()[: media["portrait"].stat().st_size // 2])
    for path, why in ((tmp_path / "tiny.png", "image is 40x40 px; each side must be at least 64 px"),
                      (half, "image is corrupt or truncated")):
        code, _, err = run(capsys, "inspect", path, "--no-faces")
        assert code == 2 and f"{path}: {why}" in err, err


def test_results_as_webm_and_gif(weights: Path, media: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--format webm names a batch's results .webm (VP9, the driver's AAC audio as Opus); -o NAME.gif writes a GIF
    (the audio left out). Each has the run's frames, near the mp4 result's (the GIF in 8x8 blocks: the tiny
    random model's frames are coloured noise, which 256 dithered colours draw only on average)."""
    common = ("--weights", weights, "--device", "cpu", *FAST, "--max-frames", 4)
    second = shutil.copy(media["driver"], tmp_path / "second.mp4")
    code, _, err = run(capsys, "animate", "--portrait", media["portrait"], "--driver", media["driver"], second,
                       "-o", tmp_path / "res", "--format", "webm", *common)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["my_face_my_driver.webm", "my_face_second.webm"]
    webm = tmp_path / "res" / "my_face_my_driver.webm"
    assert stream_facts(webm) == (4, Fraction(25), True)
    with av.open(str(webm)) as c:
        assert (c.streams.video[0].codec_context.name, c.streams.audio[0].codec_context.name) == ("vp9", "opus")
    gif = tmp_path / "one.gif"
    code, stdout, err = run(capsys, "animate", "--portrait", media["portrait"], "--driver", media["driver"], "-o", gif,
                            *common)
    assert code == 0, err
    assert f"wrote {gif}: 4 frames" in stdout and stream_facts(gif) == (4, Fraction(25), False)
    code, stdout, err = run(capsys, "inspect", gif, webm, "--json", "--no-faces")  # (a GIF driver: read as a video)
    facts, webm_facts = json.loads(stdout)[str(gif)], json.loads(stdout)[str(webm)]
    assert code == 0 and (facts["kind"], facts["fps"], facts["frames"], facts["audio"]) == ("animated GIF", "25", 4,
                                                                                          False), err
    assert (webm_facts["kind"], webm_facts["frames"]) == ("video", 4)  # (WebM's header has no count: counted)
    code, _, err = run(capsys, "animate", "--portrait", media["portrait"], "--driver", media["driver"],
                       "-o", tmp_path / "one.mp4", *common)
    assert code == 0, err
    for other, limit in ((gif, 5), (webm, 3)):
        errors = [np.abs(block_means(a) - block_means(b)).mean()
                  for a, b in zip(frames_of(other), frames_of(tmp_path / "one.mp4"), strict=True)]
        assert max(errors) < limit, (other.name, errors)


def test_side_by_side_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--side-by-side: driver crop, portrait crop and result in one frame, three times as wide, with the audio."""
    out = tmp_path / "compare.mp4"
    code, _, err = run(capsys, "demo", "--max-frames", 3, *FAST, "--side-by-side", "-o", out)
    assert code == 0, err
    frames = frames_of(out)
    size = frames[0].shape[0]
    assert len(frames) == 3 and frames[0].shape == (size, 3 * size, 3) and stream_facts(out)[2]


def test_paste_back_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--paste-back: the whole bundled portrait (768x844) at the scale of its 768 px face crop for the tiny
    model's result, with the audio; with --side-by-side: refused by the parser, nothing written."""
    from megactor_rt.preprocess import PasteBack, portrait_crop

    out = tmp_path / "whole.mp4"
    code, _, err = run(capsys, "demo", "--max-frames", 3, *FAST, "--paste-back", "-o", out)
    assert code == 0, err
    frames = frames_of(out)
    size = tiny_config().image_size
    image = read_image(PORTRAIT)
    paste = PasteBack.of(image, portrait_crop(image, size=size)[0], size)
    assert len(frames) == 3 and frames[0].shape == paste.canvas.shape and stream_facts(out)[2]
    assert frames[0].shape[0] > size > frames[0].shape[1] - 2  # taller than the square result
    both = tmp_path / "both.mp4"
    with pytest.raises(SystemExit) as exc:
        run(capsys, "demo", "--max-frames", 3, *FAST, "--paste-back", "--side-by-side", "-o", both)
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err and not both.exists()


def test_size_flag(weights: Path, media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """--size 192: results of 192 px from the 128 px tiny weights, recorded in --stats; --size 100 is refused
    before the weights load."""
    common = ("--portrait", media["portrait"], "--driver", media["driver"], "--weights", weights, "--device", "cpu",
              *FAST, "--max-frames", 2)
    out = tmp_path / "r.mp4"
    code, _, err = run(capsys, "animate", "-o", out, *common, "--size", 192, "--stats", tmp_path / "s.json")
    assert code == 0, err
    assert frames_of(out)[0].shape == (192, 192, 3)
    assert json.loads((tmp_path / "s.json").read_text())["image_size"] == 192

    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr("megactor_rt.runtime.animator.load_converted", load)
    code, _, err = run(capsys, "animate", "-o", tmp_path / "x.mp4", *common, "--size", 100)
    assert code == 2 and "image_size (--size) 100: must be a multiple of 64 from 128 to 1024" in err, err
    assert not (tmp_path / "x.mp4").exists()


def test_a_crf_the_format_does_not_take_is_refused_before_the_weights_load(
        weights: Path, media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--crf past H.264's 51 (one result) or for a batch of GIFs: exit 2 naming the scale, before the weights load;
    --crf 30 is taken (and recorded in --stats)."""
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    common = ("--portrait", media["portrait"], "--weights", weights, "--device", "cpu", *FAST, "--max-frames", 2)
    monkeypatch.setattr(Animator, "from_weights", load)
    code, _, err = run(capsys, "animate", "--driver", media["driver"], "-o", tmp_path / "r.mp4", *common, "--crf", 60)
    assert code == 2 and "r.mp4: crf (--crf) 60 is outside libx264's scale of 0" in err
    second = shutil.copy(media["driver"], tmp_path / "second.mp4")
    code, _, err = run(capsys, "animate", "--driver", media["driver"], second, "-o", tmp_path / "gifs", "--format",
                       "gif", *common, "--crf", 20)
    assert code == 2 and "encoder, gif, has no such scale" in err and not (tmp_path / "gifs").exists()
    monkeypatch.undo()
    code, _, err = run(capsys, "animate", "--driver", media["driver"], "-o", tmp_path / "r.mp4", *common, "--crf", 30,
                       "--stats", tmp_path / "s.json")
    assert code == 0 and len(frames_of(tmp_path / "r.mp4")) == 2, err
    assert json.loads((tmp_path / "s.json").read_text())["options"]["crf"] == 30


def test_an_animated_webp_meme_drives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An animated WebP driver (the portrait's face moving, 50 ms per frame): a result of every frame at 20 fps,
    silent; --fps 10 keeps every second frame."""
    meme = tmp_path / "meme.webp"
    faces = [Image.fromarray(f) for f in face_frames(6)]
    faces[0].save(meme, save_all=True, append_images=faces[1:], duration=50, loop=0, quality=90)
    out = tmp_path / "r.mp4"
    code, _, err = run(capsys, "demo", "--driver", meme, *FAST, "-o", out)
    assert code == 0, err
    assert stream_facts(out) == (6, Fraction(20), False)
    code, _, err = run(capsys, "demo", "--driver", meme, *FAST, "--fps", 10, "-o", tmp_path / "half.mp4")
    assert code == 0 and stream_facts(tmp_path / "half.mp4") == (3, Fraction(10), False), err


def test_a_60_fps_driver_into_a_gif_is_refused_before_the_weights_load(
        weights: Path, media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    fast = write_face_driver(tmp_path / "fast.mp4", n=12, fps=60)

    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(Animator, "from_weights", load)
    code, _, err = run(capsys, "animate", "--portrait", media["portrait"], "--driver", fast, "-o", tmp_path / "r.gif",
                       "--weights", weights, "--device", "cpu", *FAST)
    assert code == 2 and "r.gif: a GIF plays at most 50 frames per second" in err and "not 60: pass --fps 25" in err
    # a batch's and a jobs file's GIF results too (the row named), no results folder made
    code, _, err = run(capsys, "animate", "--portrait", media["portrait"], "--driver", fast, media["driver"], "-o",
                       tmp_path / "gifs", "--format", "gif", "--weights", weights, "--device", "cpu", *FAST)
    assert code == 2 and "fast.gif: a GIF plays at most 50 frames per second" in err
    assert not (tmp_path / "gifs").exists()
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"portrait,driver,output,fps\n{media['portrait']},{fast},a.gif,30\n"
                    f"{media['portrait']},{fast},b.gif,\n")
    code, _, err = run(capsys, "animate", "--jobs", jobs, "--weights", weights, "--device", "cpu", *FAST)
    assert code == 2 and f"{jobs}:3: {tmp_path / 'b.gif'}: a GIF plays at most 50 frames per second" in err, err
    monkeypatch.undo()
    code, _, err = run(capsys, "animate", "--portrait", media["portrait"], "--driver", fast, "-o", tmp_path / "r.gif",
                       "--weights", weights, "--device", "cpu", *FAST, "--fps", 30)
    assert code == 0, err
    assert len(frames_of(tmp_path / "r.gif")) == 6 and probe_video(tmp_path / "r.gif").fps == 30


def test_formats_of_the_cli_are_the_writers() -> None:
    from megactor_rt.media import ALL_RESULT_SUFFIXES

    assert tuple(f".{f}" for f in cli.RESULT_FORMATS) == ALL_RESULT_SUFFIXES


def test_a_60_fps_driver_into_a_gif_is_refused_before_the_portrait_is_prepared(
        media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    anim = Animator.demo()
    driver = write_face_driver(tmp_path / "fast.mp4", n=4, fps=60)

    def prepared(*args: object, **kwargs: object) -> None:
        raise AssertionError("the portrait was prepared")

    monkeypatch.setattr(anim, "_prepare", prepared)
    with pytest.raises(InputError, match=r"r\.gif: a GIF plays at most 50 frames per second .* not 60: pass --fps 25"):
        anim.animate_to_file(media["portrait"], driver, tmp_path / "r.gif")
    monkeypatch.undo()
    anim.animate_to_file(media["portrait"], driver, tmp_path / "r.gif", config=replace(anim.config, fps=25, steps=1,
                                                                                     window=4, overlap=2))
    assert stream_facts(tmp_path / "r.gif")[1] == Fraction(25)


def test_stats_naming_a_folder_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.mp4"
    code, _, err = run(capsys, "demo", "-o", out, "--stats", tmp_path)
    assert code == 2 and f"{tmp_path}: --stats names a file to write, and this is a folder" in err
    assert not out.exists()


@pytest.mark.parametrize("case", ["file_output", "gif_file_output", "format_disagrees", "same_stems",
                                  "overwrites_input", "mask_with_two_portraits", "weights_missing"])
def test_batch_settings_checked_before_any_work(case: str, weights: Path, media: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a").mkdir()
    twin = shutil.copy(media["driver"], tmp_path / "a" / media["driver"].name)  # same name, other folder
    portraits, drivers, out, extra = [media["portrait"]], [media["driver"], twin], tmp_path / "res", []
    needle = "several jobs would write my_face_my_driver.mp4"
    if case in ("file_output", "gif_file_output"):
        drivers, out, needle = [media["driver"], media["faceless_driver"]], \
            tmp_path / ("res.mp4" if case == "file_output" else "res.gif"), \
            "-o names a folder for the results, not a video file"
    elif case == "format_disagrees":
        drivers, out, extra, needle = [media["driver"]], tmp_path / "res.mp4", ["--format", "gif"], \
            "--format gif is for a folder of results (several portraits or drivers): name the file res.gif instead"
    elif case == "overwrites_input":
        clash = tmp_path / "a" / f"{media['portrait'].stem}_{media['driver'].stem}.mp4"
        shutil.copy(media["driver"], clash)
        drivers, out, needle = [media["driver"], clash], tmp_path / "a", "a result would overwrite an input"
    elif case == "mask_with_two_portraits":
        portraits, drivers, extra, needle = [media["portrait"], PORTRAIT], [media["driver"]], \
            ["--mask", PORTRAIT], "--mask belongs to one portrait"
    elif case == "weights_missing":  # the results folder is not created for nothing
        drivers, weights, needle = [media["driver"], media["faceless_driver"]], tmp_path / "none", "does not exist"
    before = sorted(tmp_path.rglob("*"))
    code, _, err = run(capsys, "animate", "--portrait", *portraits, "--driver", *drivers, "-o", out,
                       "--weights", weights, "--device", "cpu", *FAST, *extra)
    assert code == 2 and err.startswith("error: ") and needle in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_truncated_driver_error_says_how_to_use_what_decodes(weights: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A cut-off driver fails before any denoising, and the --max-frames the message suggests then works."""
    from media_fixtures import write_truncated_video

    cut = write_truncated_video(tmp_path / "cut.mp4")
    out = tmp_path / "o.mp4"
    args = ["animate", "--portrait", PORTRAIT, "--driver", cut, "-o", out, "--weights", weights, "--device", "cpu",
            *FAST]
    code, _, err = run(capsys, *args)
    hint = re.search(r"--max-frames (\d+) \(AnimateConfig.max_frames\) animates the \1 frames before the break", err)
    assert code == 2 and "cut.mp4: video is truncated" in err and hint, err
    assert not out.exists()
    code, _, err = run(capsys, *args, "--max-frames", hint.group(1))
    assert code == 0, err
    assert len(frames_of(out)) == int(hint.group(1))


@pytest.mark.parametrize("text,value", [("90", 90.0), ("1.5", 1.5), ("1:30", 90.0), ("0:01:30.5", 90.5),
                                        ("1:02:03", 3723.0), ("00:00", 0.0)])
def test_times_in_seconds_or_clock_notation(text: str, value: float) -> None:
    assert cli.seconds(text) == value
    for bad in ({"start": -1}, {"start": float("inf")}, {"duration": float("inf")}):  # the Python API checks its own
        with pytest.raises(ValueError, match=r"(start|duration) must be a finite number"):
            AnimateConfig(**bad)
    # and takes the command line's notation too (was: "TypeError: must be real number, not str")
    assert AnimateConfig(start=text).start == value
    assert value == 0 or AnimateConfig(duration=text).duration == value  # (a duration must be > 0)
    with pytest.raises(ValueError, match=r"start: '1:60' is not a time"):
        AnimateConfig(start="1:60")
    with pytest.raises(ValueError, match=r"duration must be seconds \(a number\) or a '\[HH:\]MM:SS\[.ms\]' string, "
                                         r"got list"):
        AnimateConfig(duration=[8])  # type: ignore[arg-type]
    from fractions import Fraction as F

    assert AnimateConfig(start=np.float32(1.5), duration=F(1, 2)).duration == 0.5  # any real number, as before


@pytest.mark.parametrize("text", ["", "a", "1:60", "-1", "1::2", ":30", "1.5:30", "1:2:3:4", "nan", "inf"])
def test_bad_times_are_usage_errors(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.mp4"
    with pytest.raises(SystemExit) as exc:
        main(["-q", "demo", f"--start={text}", "-o", str(out)])
    assert exc.value.code == 2 and f"'{text}' is not a time" in capsys.readouterr().err
    assert not out.exists()


def test_check_export_says_which_graphs_tensorrt_would_take(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``check-export`` on an export folder: each graph ready or its problems, exit 2 when any has one."""
    import onnx
    from onnx import TensorProto, helper

    out = tmp_path / "onnx"
    code, _, _ = run(capsys, "export", "--weights", "tiny", "--out", out, "--precision", "fp16",
                     "--graphs", "pose_guider", "pose_guider_film")
    assert code == 0
    code, text, _ = run(capsys, "check-export", "--onnx", out)
    assert code == 0, text
    assert re.search(r"pose_guider\.fp16 +ready", text) and "2 of 2 graphs ready" in text

    # the same graph name, now holding an operator TensorRT's parser does not take
    path = out / json.loads((out / "manifest.json").read_text())["graphs"]["pose_guider_film.fp16"]["file"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Unique", ["x"], ["y"])], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 18)]), str(path))
    code, text, _ = run(capsys, "check-export", "--onnx", out)
    assert code == 2 and "1 of 2 graphs ready" in text
    assert re.search(r"pose_guider_film\.fp16 +\d problem", text) and "op 'Unique'" in text

    # a shape profile that no longer covers a dynamic dimension: reported with that graph's other problems
    # (the checks of every other graph still run)
    manifest = json.loads((out / "manifest.json").read_text())
    profile = manifest["graphs"]["pose_guider.fp16"]["profiles"]["default"]
    name = next(iter(profile))
    profile[name] = [profile[name][2], profile[name][1], profile[name][0]]  # min and max swapped
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, text, _ = run(capsys, "check-export", "--onnx", out)
    assert code == 2 and "0 of 2 graphs ready" in text
    assert re.search(r"pose_guider\.fp16 +1 problem", text) and "shape profile: " in text and "op 'Unique'" in text

    code, _, err = run(capsys, "check-export", "--onnx", out, "--precision", "fp32")
    assert code == 2 and "no fp32 graphs" in err
    code, _, err = run(capsys, "check-export", "--onnx", tmp_path / "nowhere")
    assert code == 2 and "nowhere: no such export folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "check-export", "--onnx", tmp_path / "empty")
    assert code == 2 and "no export manifest" in err


def test_a_result_onto_an_input_is_refused_before_the_model_is_built(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from megactor_rt.assets import ASSETS_DIR

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built")

    monkeypatch.setattr(Animator, "demo", built)
    monkeypatch.setattr(Animator, "from_weights", built)
    driver = tmp_path / "d.mp4"
    shutil.copy(ASSETS_DIR / "driver.mp4", driver)
    portrait = tmp_path / "p.mp4"  # a video portrait (its first frame)
    shutil.copy(ASSETS_DIR / "driver.mp4", portrait)
    for argv, what in ((["demo", "--driver", driver, "-o", driver], "driver"),
                       (["demo", "--portrait", portrait, "-o", portrait], "portrait"),
                       (["animate", "--weights", tmp_path, "--portrait", portrait, "--driver", driver, "-o", driver],
                        "driver")):
        code, _, err = run(capsys, *argv)
        assert code == 2 and f"would overwrite the {what}" in err, err


def test_a_run_never_overwrites_its_inputs_and_bad_settings_fail_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A result or --stats path that is one of the run's inputs (or the result itself) is refused, and the
    input is untouched; settings no run can use (infinite or vanishing fps, NaN guidance, more steps than the
    scheduler has, a seed over 64 bits, a NaN store budget, a file name too long for the file system) are exit
    2 with the setting named, before any frame is computed. Output folders that are files: exit 2."""
    from megactor_rt.assets import ASSETS_DIR

    driver = tmp_path / "d.mp4"
    shutil.copy(ASSETS_DIR / "driver.mp4", driver)
    before = driver.read_bytes()
    code, _, err = run(capsys, "demo", "--driver", driver, "-o", driver, *FAST)
    assert code == 2 and "would overwrite the driver" in err and driver.read_bytes() == before
    out = tmp_path / "r.mp4"
    code, _, err = run(capsys, "demo", "--stats", out, "-o", out, *FAST)
    assert code == 2 and "--stats would overwrite a result" in err
    code, _, err = run(capsys, "demo", "--driver", driver, "--stats", driver, "-o", out, *FAST)
    assert code == 2 and "--stats would overwrite an input" in err and driver.read_bytes() == before
    for flag, value, says in (("--fps", "inf", "--fps must be a finite number"), ("--fps", "1e-9", "--fps must be"),
                              ("--steps", "5000", "--steps must be at most 999"),
                              ("--steps", "1000", "--steps must be at most 999"),  # t = 1000 does not exist
                              ("--seed", str(10 ** 20), "seed must fit in 64 bits"),
                              ("--reference-timestep", "1000", "--reference-timestep must be below 1000")):
        code, _, err = run(capsys, "demo", *FAST, flag, value, "-o", out)
        assert code == 2 and says in err, (flag, value, err)
    for value in ("nan", "0", "-1", "big"):  # (refused as the flags are read: a --dry-run too)
        for argv in (("demo", *FAST), ("animate", "--demo", "--portrait", PORTRAIT, "--driver", driver, "--dry-run")):
            with pytest.raises(SystemExit) as stop:  # (argparse's usage error)
                run(capsys, *argv, "--cache-dir", tmp_path / "c", "--cache-max-gb", value, "-o", out)
            err = capsys.readouterr().err
            assert stop.value.code == 2 and f"--cache-max-gb: must be a finite number of GiB > 0, got '{value}'" in err
    assert not (tmp_path / "c").exists()
    code, _, err = run(capsys, "demo", *FAST, "-o", tmp_path / ("a" * 300 + ".mp4"))
    assert code == 2 and "file name is longer than this file system allows" in err
    assert not out.exists()
    for argv in (("export", "--weights", "tiny", "--graphs", "pose_guider", "--out", driver),
                 ("bench", "--suite", "cpu-tiny", "--dry-run", "--out", driver),
                 ("bench", "--suite", "cpu-smoke", "--out", tmp_path / "b", "--work-dir", driver),
                 ("demo", *FAST, "--backend", "onnxruntime", "--work-dir", driver, "-o", out)):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "names a folder for the outputs, and this is a file" in err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.mp4"] and driver.read_bytes() == before


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_temporary_file(tmp_path: Path, signame: str) -> None:
    """SIGTERM (``docker stop``, a scheduler) and SIGHUP (the terminal or SSH session closed) raise
    ``Terminated`` in the main thread while a command runs, so the output being written is discarded on the way
    out, as on Ctrl-C (exit 143 / 129); the previous handlers come back afterwards. An ignored SIGHUP (``nohup``)
    stays ignored."""
    import signal

    from megactor_rt.media import VideoWriter

    sig = getattr(signal, signame)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    previous = cli._terminate_like_interrupt()
    try:
        with pytest.raises(cli.Terminated) as stopped, VideoWriter(tmp_path / "r.mp4", Fraction(25), 64, 64) as w:
            w.write(np.zeros((64, 64, 3), np.uint8))
            os.kill(os.getpid(), sig)
            for _ in range(100):  # the handler runs between bytecodes of the main thread
                pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert stopped.value.signum == sig
    assert list(tmp_path.iterdir()) == [] and {s: signal.getsignal(s) for s in before} == before
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert signal.SIGHUP not in cli._terminate_like_interrupt()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before[signal.SIGTERM])
        signal.signal(signal.SIGHUP, before[signal.SIGHUP])


def test_the_same_input_twice_in_a_batch_is_named(tmp_path: Path) -> None:
    d = tmp_path / "d.mp4"
    d.write_bytes(b"")
    with pytest.raises(cli.InputError, match="the same driver is given more than once"):
        cli.animate_jobs([tmp_path / "p.png"], [d, tmp_path / "." / "d.mp4"], tmp_path / "out")


def test_a_result_name_that_is_not_utf8_is_written(weights: Path, media: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """File names are bytes on Linux and need not be UTF-8 (Python gives them surrogates): such a result name
    is written like any other (was: UnicodeEncodeError, exit 1, and in a batch every later pair lost)."""
    out = tmp_path / os.fsdecode(b"r\xe9sultat.mp4")
    code, _, err = run(capsys, "animate", "--portrait", media["portrait"], "--driver", media["driver"], "-o", out,
                       "--weights", weights, "--device", "cpu", "--max-frames", "2", *FAST)
    assert code == 0, err
    assert len(frames_of(out)) == 2 and os.fsencode(out.name) in os.listdir(os.fsencode(tmp_path))


def test_one_pair_into_a_folder(media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-o naming a folder that exists (or a name without a suffix, with --format) takes one pair's result as it
    takes a batch's: <portrait>_<driver>.<format> in it, so a job runner need not tell one pair from several."""
    (tmp_path / "res").mkdir()
    common = ("--demo", "--portrait", media["portrait"], "--driver", media["driver"], *FAST, "--max-frames", 2)
    code, _, err = run(capsys, "animate", *common, "-o", tmp_path / "res")
    assert code == 0, err
    assert stream_facts(tmp_path / "res" / "my_face_my_driver.mp4")[0] == 2
    code, _, err = run(capsys, "animate", *common, "-o", tmp_path / "gifs", "--format", "gif")
    assert code == 0, err
    assert [p.name for p in (tmp_path / "gifs").iterdir()] == ["my_face_my_driver.gif"]
    code, _, err = run(capsys, "animate", *common, "-o", tmp_path / "r.mp4", "--format", "gif")
    assert code == 2 and "--format gif is for a folder of results" in err
    code, _, err = run(capsys, "animate", *common, "-o", f"{tmp_path / 'new'}/")  # (a slash: a folder, made)
    assert code == 0, err
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["my_face_my_driver.mp4"]


@pytest.mark.parametrize("flag", ["--portrait", "--driver", "-o", "--mask", "--stats"])
def test_an_empty_path_is_refused(flag: str, media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``--driver "$UNSET"`` named the working folder (and animated the image sequence there): refused."""
    monkeypatch.chdir(tmp_path)
    given = {"--portrait": str(media["portrait"]), "--driver": str(media["driver"]), "-o": "r.mp4", flag: ""}
    with pytest.raises(SystemExit) as stop:
        main(["-q", "animate", "--demo", *[x for k, v in given.items() for x in (k, v)]])
    assert stop.value.code == 2 and "an empty path (an unset variable in a script?)" in capsys.readouterr().err


def test_typos_in_inputs_and_output_are_named_before_the_weights_load(tmp_path: Path, media: dict[str, Path],
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A missing or empty portrait or driver, or an output folder that does not exist, is named before the weights (and
    TensorRT plans) are loaded: here the weights are missing too, and the error is about the typo. A still image
    given as the driver (portrait and driver swapped) is refused."""
    missing = tmp_path / "no_weights"
    empty, empty_image = tmp_path / "empty.mp4", tmp_path / "empty.png"
    empty.write_bytes(b"")
    empty_image.write_bytes(b"")
    for argv, needle in (
            (["--portrait", tmp_path / "potrait.png", "--driver", media["driver"], "-o", tmp_path / "r.mp4"],
             "potrait.png: portrait file does not exist"),
            (["--portrait", media["portrait"], "--driver", tmp_path / "drvier.mp4", "-o", tmp_path / "r.mp4"],
             "drvier.mp4: driver file does not exist"),
            (["--portrait", media["portrait"], "--driver", media["driver"], "-o", tmp_path / "nope" / "r.mp4"],
             "output folder"),
            (["--portrait", media["portrait"], "--driver", media["driver"], empty, "-o", tmp_path / "out"],
             "empty.mp4: the video file is empty"),  # (a batch: was found after the weights, at its own pair)
            (["--portrait", media["portrait"], empty_image, "--driver", media["driver"], "-o", tmp_path / "out"],
             "empty.png: the image file is empty")):
        code, _, err = run(capsys, "animate", *argv, "--weights", missing, "--device", "cpu")
        assert code == 2 and needle in err and "no_weights" not in err, err
    from megactor_rt.runtime.driver import driver_info

    with pytest.raises(InputError, match="a still image, not a driving video"):
        driver_info(media["portrait"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_gpu_suite_without_a_gpu_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bench --suite gpu-full` on a machine without CUDA is a usage error naming --dry-run (was: the full-size
    suite started on the CPU, silently, for hours)."""
    code, _, err = run(capsys, "bench", "--suite", "gpu-full", "--out", tmp_path / "b")
    assert code == 2 and "sees no CUDA device" in err and "--dry-run" in err, err


@pytest.mark.parametrize("stop,code,said", [(KeyboardInterrupt(), 130, "interrupted"),
                                            (cli.Terminated(signal.SIGTERM), 143, "terminated")])
def test_an_error_raised_while_a_stop_unwinds_ends_as_that_stop(stop: BaseException, code: int, said: str,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A second signal landing inside the first's unwinding (in a queue's lock, say) turned it into "unexpected
    error: RuntimeError: release unlocked lock", exit 1: the stop's status and word stand."""
    def command(args: argparse.Namespace) -> int:
        try:
            raise stop
        finally:
            raise RuntimeError("release unlocked lock")  # noqa: B012 - what the lock's release raised

    monkeypatch.setattr(cli, "cmd_demo", command)
    assert cli.main(["demo"]) == code
    err = capsys.readouterr().err
    assert said in err and "unexpected error" not in err


@pytest.mark.parametrize("hold", [False, True])
def test_a_second_interrupt_during_the_cleanup_is_ignored(hold: bool, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C twice 20 ms apart: the second landed in the command's cleanup and came out of main as a traceback
    (the process died of SIGINT). Now ignored: 130, "interrupted"; the handlers are as before on return, or held
    ignored for the process's end (entry's hold_stops)."""
    import os

    def command(args: argparse.Namespace) -> int:
        args.cleanup.callback(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.05)))  # (the second one)
        raise KeyboardInterrupt

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.setattr(cli, "cmd_demo", command)
    try:
        assert cli.main(["demo"], hold_stops=hold) == 130
        assert "interrupted" in capsys.readouterr().err
        now = {sig: signal.getsignal(sig) for sig in before}
        assert now == ({sig: signal.SIG_IGN for sig in before} if hold else before)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_the_command_ignores_signals_after_an_interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    """After Ctrl-C (130) or SIGTERM (143) stopped a command, a second one while it ends is ignored (it aborted the
    process with SIGABRT), and it ends at once (os._exit, its cleanup done: the interpreter's shutdown aborted a
    stopped server once); a normal exit leaves the handlers alone and ends as usual."""
    import signal

    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for code, ignored in ((0, False), (130, True), (143, True)):
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            monkeypatch.setattr(cli, "main", lambda code=code, **kw: code)
            with pytest.raises(SystemExit) as exc:
                cli.entry()
            assert exc.value.code == code
            assert (signal.getsignal(signal.SIGINT) == signal.SIG_IGN) == ignored
            assert (signal.getsignal(signal.SIGTERM) == signal.SIG_IGN) == ignored
        assert exits == [130, 143]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_stopped_command_ends_without_waiting_for_a_worker_still_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer thread that does not reach a cancellation point within the pipeline's wait (e.g. inside a
    torch.compile compilation) is listed as abandoned, and a stopped command then ends the process at once with
    its status (a shutdown waiting for such a thread hung a terminated GPU benchmark, 2026-11-27); once the
    thread has ended it is no longer listed, and a command without one exits normally."""
    import signal
    import threading

    from megactor_rt.runtime import pipeline

    release = threading.Event()

    def stuck():
        yield 1
        release.wait(10)  # "inside a call" that checks for cancellation only afterwards
        yield 2

    monkeypatch.setattr(pipeline, "JOIN_S", 0.2)
    monkeypatch.setattr(pipeline, "_abandoned", [])
    items = pipeline.prefetch(stuck(), depth=1, name="stuck")
    assert next(items) == 1
    items.close()  # the consumer stops; the producer is still waiting
    assert [t.name for t in pipeline.abandoned_workers()] == ["stuck"]

    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    try:
        for code in (143, 2):  # after an interrupt, and after an error that stopped the run mid-way
            monkeypatch.setattr(cli, "main", lambda code=code, **kw: code)
            with pytest.raises(SystemExit):
                cli.entry()
        assert exits == [143, 2]
        monkeypatch.setattr(cli, "main", lambda **kw: 2)
        release.set()
        for t, _ in pipeline._abandoned:
            t.join(5)
        assert pipeline.abandoned_workers() == []
        with pytest.raises(SystemExit) as done:
            cli.entry()
        assert done.value.code == 2 and exits == [143, 2]  # sys.exit this time, not the immediate end
    finally:
        release.set()
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_files_written_under_a_private_temporary_name_get_the_umask_mode(tmp_path: Path) -> None:
    """Results written atomically (mkstemp: 0600) and safetensors files (0600) end up with the mode a plain write
    gets, so a service account can read a store or weights another user wrote."""
    from megactor_rt.engine.cache import write_atomic
    from megactor_rt.files import umask_mode

    write_atomic(tmp_path / "stats.json", b"{}")
    assert (tmp_path / "stats.json").stat().st_mode & 0o777 == umask_mode()
    models = build_models(tiny_config(), seed=0)
    dst = write_converted(tiny_config(), {n: m.state_dict() for n, m in models.modules().items()}, tmp_path / "w")
    assert {p.stat().st_mode & 0o777 for p in dst.iterdir()} == {umask_mode()}


def test_a_second_interrupt_during_the_wait_still_records_the_running_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C twice: the second one breaks off the wait for the producer; the producer, still running, is
    recorded all the same, so the command ends at once instead of the interpreter shutting down under a thread
    inside torch (was: SIGABRT, 'terminate called without an active exception')."""
    import _thread
    import contextlib
    import threading

    from megactor_rt.runtime import pipeline

    release = threading.Event()

    def stuck():
        yield 1
        release.wait(10)
        yield 2

    monkeypatch.setattr(pipeline, "JOIN_S", 5.0)
    monkeypatch.setattr(pipeline, "_abandoned", [])
    items = pipeline.prefetch(stuck(), depth=1, name="stuck-twice")
    assert next(items) == 1
    timer = threading.Timer(0.3, _thread.interrupt_main)  # the second Ctrl-C, during the 5 s wait
    timer.start()
    with contextlib.suppress(KeyboardInterrupt):
        items.close()
    try:
        assert [t.name for t in pipeline.abandoned_workers()] == ["stuck-twice"]
    finally:
        timer.cancel()
        release.set()
        for t, _ in pipeline._abandoned:
            t.join(5)


@pytest.mark.parametrize("argv,warning", [
    (["animate", "--backend", "torch", "--torch-fallback", "vae_decoder"],
     "--torch-fallback only applies to --backend tensorrt, not torch: ignored"),
    (["animate", "--backend", "onnxruntime", "--fallback", "onnxruntime"],
     "--fallback only applies to --backend tensorrt, not onnxruntime"),
    (["demo", "--steps", "4", "--cfg-steps", "4"], "--cfg-steps 4 with --steps 4: guidance in every step"),
    (["demo", "--feature-reuse", "1"], "--feature-reuse 1 runs the whole UNet in every step"),
    (["demo", "--window-batch", "2", "--no-wrap"], "--window-batch 2 applies to the optimized mode with wrapping "
                                                   "windows, not --no-wrap"),
    (["demo", "--window-batch", "2", "--mode", "reference"], "not --mode reference"),
    (["demo", "--cache-max-gb", "5"], "--cache-max-gb is the size of --cache-dir's store, which is not given"),
    (["demo", "--cache-max-gb", "5", "--cache-dir", "c"], None),
    (["demo", "--steps", "4", "--cfg-steps", "3", "--feature-reuse", "2", "--window-batch", "2"], None),
    (["animate", "--backend", "tensorrt", "--torch-fallback", "vae_decoder"], None),
    (["animate", "--backend", "torch", "--onnx", "exp"], "--onnx only applies to --backend onnxruntime and "
                                                         "tensorrt, not torch: ignored"),
    (["animate", "--backend", "onnxruntime", "--engines", "plans"], "--engines only applies to --backend tensorrt, "
                                                                    "not onnxruntime: ignored"),
    (["animate", "--backend", "onnxruntime", "--onnx", "exp"], None),
    (["animate", "--backend", "tensorrt", "--onnx", "exp", "--engines", "plans"], None),
])
def test_options_that_change_nothing_are_named_as_ignored(argv: list[str], warning: str | None,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    import logging

    if argv[0] == "animate":
        argv = [*argv, "--portrait", "p", "--driver", "d", "-o", "o", "--weights", "w"]
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        cli._note_ignored_options(args := cli.build_parser().parse_args(argv), cli._run_config(args))
    if warning is None:
        assert caplog.text == ""
    else:
        assert warning in caplog.text and len(caplog.records) == 1


def test_contour_options_without_contour_mode_are_named_as_ignored(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    both = "--landmarks-model and --contour-affine-frame only apply with --contour-preserve"
    one = "--contour-affine-frame only applies with --contour-preserve"
    for argv, warning in ((["demo", "--landmarks-model", "lm.dat", "--contour-affine-frame", "first"], both),
                          (["demo", "--contour-affine-frame", "first"], one),
                          (["demo", "--landmarks-model", "lm.dat", "--contour-preserve"], None),
                          (["demo"], None)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megactor_rt"):
            cli._note_ignored_options(args := cli.build_parser().parse_args(argv), cli._run_config(args))
        if warning is None:
            assert caplog.text == "", argv
        else:
            assert warning in caplog.text and len(caplog.records) == 1, (argv, caplog.text)


def test_bench_prints_its_table_and_where_the_results_are(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A successful bench said nothing (the tables were only in the files); a mode that failed is exit 2."""
    from megactor_rt import benchmark

    report = {"suite": "cpu-smoke", "results": [], "errors": []}
    monkeypatch.setattr(benchmark, "run_bench", lambda *a, **k: report)
    monkeypatch.setattr(benchmark, "markdown", lambda r: "| the table |")
    code, out, _ = run(capsys, "bench", "--suite", "cpu-smoke", "--out", tmp_path / "b")
    assert code == 0 and "| the table |" in out and str(tmp_path / "b" / "results.json") in out
    report["errors"] = [{"scenario": "s", "mode": "optimized", "error": "RuntimeError: boom"}]
    code, _, err = run(capsys, "bench", "--suite", "cpu-smoke", "--out", tmp_path / "b")
    assert code == 2 and "1 mode(s) failed" in err


def test_a_closed_stdout_pipe_ends_quietly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    """`megactor-rt doctor --json | head`: the reader leaving is exit 141 (as a shell reports SIGPIPE), not an
    'unexpected error' on stderr."""
    from megactor_rt import cli

    def gone(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_doctor", gone)
    monkeypatch.setattr(cli.os, "dup2", lambda *a: None)  # keep pytest's stdout
    code, _, err = run(capsys, "doctor")
    assert code == 141 and "unexpected error" not in err


def test_half_precision_on_the_cpu_is_named_slow(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        Animator.demo(precision="fp16")
    assert any("fp16 on the CPU is several times slower than fp32" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Animator.demo()
    assert not any("slower than fp32" in r.message for r in caplog.records)


def test_a_bad_file_is_named_before_torch_is_imported(tmp_path: Path) -> None:
    """`animate` and `demo` check their files, `animate`/`export`/`convert-weights` the weights folder and `bench`
    its suite before importing the runtime (torch: about 7 s on this machine), so a typo is answered in about 2 s
    instead of 9."""
    code = ("import sys\nfrom megactor_rt.cli import main\n"
            f"code = main(['-q', 'animate', '--weights', 'w', '--portrait', {str(tmp_path / 'missing.png')!r}, "
            f"'--driver', 'x.mp4', '-o', {str(tmp_path / 'o.mp4')!r}])\n"
            "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert "missing.png: portrait file does not exist" in done.stderr
    media = Path(__file__).resolve().parents[1] / "megactor_rt" / "assets"
    released = tmp_path / "release"
    released.mkdir()
    (released / "checkpoint-steps9000.ckpt").write_bytes(b"")
    for argv, says in ((["animate", "--weights", str(tmp_path / "nope"), "--portrait", str(media / "portrait.png"),
                         "--driver", str(media / "driver.mp4"), "-o", str(tmp_path / "o.mp4")],
                        "nope does not exist"),
                       (["export", "--weights", str(released), "--out", str(tmp_path / "onnx")],
                        "holds the released weights, not converted ones"),
                       (["export", "--weights", str(tmp_path), "--out", str(tmp_path / "onnx")],
                        "is not a converted weights folder"),
                       (["convert-weights", str(tmp_path / "nope"), str(tmp_path / "onnx")], "nope does not exist"),
                       (["demo", "--portrait", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o.mp4")],
                        "nope.png: portrait file does not exist"),
                       (["bench", "--suite", "gpu-ful", "--out", str(tmp_path / "onnx")],
                        "unknown benchmark suite 'gpu-ful'")):
        code = ("import sys\nfrom megactor_rt.cli import main\n"
                f"code = main(['-q', *{argv!r}])\nprint(code, 'torch' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == ["2", "False"] and says in done.stderr, (argv, done.stdout + done.stderr)
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "onnx").exists()


def test_a_hang_up_ends_the_command_with_129_although_the_terminal_is_gone(tmp_path: Path) -> None:
    """A closed terminal sends SIGHUP and takes stderr with it: writing "hung up" there raises (EIO), which
    must not make the status 1 (nor skip the exit's guards). A command on a pseudo-terminal whose other side
    closes."""
    script = tmp_path / "hup.py"
    script.write_text(textwrap.dedent("""
        import os, pty, sys, time
        master, slave = pty.openpty()
        pid = os.fork()
        if pid == 0:
            os.close(master)
            os.setsid()
            import fcntl, termios
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            os.dup2(slave, 1)
            os.dup2(slave, 2)
            import signal
            signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as from a shell (a CI job may run with it ignored)
            from megactor_rt import cli
            cli.cmd_doctor = lambda args: time.sleep(20) or 0
            sys.argv = ["megactor-rt", "doctor"]
            cli.entry()
        os.close(slave)
        time.sleep(3)  # the child is inside its command
        os.close(master)  # the terminal goes away: SIGHUP to the session
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["129"], done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------- docs audit


def test_verbose_and_quiet_also_go_after_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`megactor-rt doctor -q` and `... -v` work as before the command (were: 'unrecognized arguments');
    not given after it, the value given before stands."""
    parser = cli.build_parser()
    assert parser.parse_args(["doctor", "-q"]).quiet and not parser.parse_args(["doctor", "-q"]).verbose
    assert parser.parse_args(["-v", "doctor"]).verbose and parser.parse_args(["doctor", "--verbose"]).verbose
    assert parser.parse_args(["-q", "demo"]).quiet and not parser.parse_args(["demo"]).quiet
    assert main(["doctor", "-q"]) == 0 and "backends:" in capsys.readouterr().out


def test_doctor_exits_2_for_unusable_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Missing weights are a clear error (2), not the 'unexpected error' code (1), so a script tells them apart."""
    code, out, _ = run(capsys, "doctor", "--weights", tmp_path / "missing")
    assert code == 2 and "missing" in out


def test_reference_mode_on_a_graph_backend_is_named_by_its_flag() -> None:
    """The graph backends' refusal of reference mode, as the CLI prints it, names the flag to use."""
    from megactor_rt.runtime.onnx_backend import GraphSubmodels

    sub = GraphSubmodels("onnxruntime", tiny_config(), "w", {}, torch.device("cpu"), torch.float32)
    with pytest.raises(InputError) as info:
        sub.check_run(AnimateConfig(mode="reference"))
    assert cli.as_flags(str(info.value)).endswith("use --mode optimized (the same math)")


def test_the_cli_defaults_are_the_python_apis(tmp_path: Path) -> None:
    """`animate` without settings runs AnimateConfig()'s (seed 42, guidance 4.5, ...) and --cache-dir keeps
    PortraitCache's disk budget (20 GiB), as the README says."""
    from megactor_rt.runtime.cache import PortraitCache

    args = cli.build_parser().parse_args(["animate", "--weights", "w", "--portrait", "p.png", "--driver", "d.mp4",
                                          "-o", "o.mp4", "--cache-dir", str(tmp_path / "c")])
    assert cli._run_config(args) == AnimateConfig() and AnimateConfig().seed == 42
    assert cli._cache(args).max_disk_bytes == PortraitCache().max_disk_bytes == 20 * 2**30


def test_progress_bars_follow_the_switch_and_the_environment() -> None:
    """-q (``set_progress_enabled(False)``) hides every progress bar and they show by default; the environment's
    MEGACTOR_PROGRESS=0 starts a process with them off, any other value with them on. (Mutation audit.)"""
    from megactor_rt.progress import progress

    set_progress_enabled(False)
    assert progress(range(2)).disable
    set_progress_enabled(True)
    bar = progress(range(2))
    assert not bar.disable
    bar.close()
    script = "from megactor_rt.progress import progress_enabled; print(progress_enabled())"
    for value, shown in (("0", "False"), ("false", "False"), ("1", "True")):
        res = subprocess.run([sys.executable, "-c", script], env={**os.environ, "MEGACTOR_PROGRESS": value},
                             capture_output=True, text=True, timeout=60)
        assert res.stdout.strip() == shown, (value, res.stdout + res.stderr)


def test_audio_from_another_file(weights: Path, media: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--audio FILE: the result's sound is that file's (from its start), also for a silent driver; a file
    without sound, or --audio with --no-audio, is an error before any work."""
    from media_fixtures import write_sine_audio

    tone = write_sine_audio(tmp_path / "song.m4a", seconds=2.0, freq=1000.0)
    out = tmp_path / "sung.mp4"
    common = ("--portrait", media["portrait"], "--weights", weights, "--device", "cpu", *FAST, "--max-frames", 4)
    code, _, err = run(capsys, "animate", "--driver", media["faceless_driver"], "--no-face-crop", "-o", out,
                       "--audio", tone, *common)
    assert code == 0, err
    found, length = _main_hz(out)
    assert abs(found - 1000) <= 20  # the file's 1 kHz, not the driver's 440 Hz
    assert 0.1 < length < 0.25  # 4 frames at 25 fps, plus AAC's frame padding
    silent = plain_image(tmp_path / "still.png", 64, 64)
    code, _, err = run(capsys, "animate", "--driver", media["driver"], "-o", tmp_path / "x.mp4", "--audio", silent,
                       *common)
    assert code == 2 and "still.png: has no audio stream (given for the result's sound)" in err
    code, _, err = run(capsys, "animate", "--driver", media["driver"], "-o", tmp_path / "x.mp4", "--audio", tone,
                       "--no-audio", *common)
    assert code == 2 and "cannot be used with --no-audio" in err
    assert not (tmp_path / "x.mp4").exists()


def _main_hz(path: Path, seconds: float = 0.1) -> tuple[int, float]:
    """The strongest frequency of a result's first ``seconds`` of sound (10 Hz bins), and its sound's length."""
    with av.open(str(path)) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
        rate = c.streams.audio[0].codec_context.sample_rate
    n = int(rate * seconds)
    return int(np.argmax(np.abs(np.fft.rfft(pcm[:n])))) * round(1 / seconds), len(pcm) / rate


def test_audio_from_another_file_from_a_later_start(weights: Path, media: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """--audio-start: the --audio file's sound from there (a file of 1 kHz, then 2 kHz after 1 s: from 1.5 s or
    0:01.2 the result sounds 2 kHz, from its start 1 kHz); past the file's end, or without --audio, an error
    before any work."""
    from media_fixtures import write_sine_audio

    song = write_sine_audio(tmp_path / "song.m4a", seconds=2.0, freq=1000.0, then=2000.0)
    common = ("--portrait", media["portrait"], "--driver", media["driver"], "--weights", weights, "--device", "cpu",
              *FAST, "--max-frames", 4)
    for start, hz in ((None, 1000), ("1.5", 2000), ("0:01.2", 2000)):
        out = tmp_path / f"from_{start}.mp4"
        code, _, err = run(capsys, "animate", "-o", out, "--audio", song, *common,
                           *(("--audio-start", start) if start else ()))
        assert code == 0, err
        found, length = _main_hz(out)
        assert abs(found - hz) <= 20 and 0.1 < length < 0.25, (start, found, length)
    code, _, err = run(capsys, "animate", "-o", tmp_path / "x.mp4", "--audio", song, "--audio-start", "2.5", *common)
    assert code == 2 and "song.m4a: its sound is 2.0 s long; the audio start (2.5 s, --audio-start) is at or past" in err
    code, _, err = run(capsys, "animate", "-o", tmp_path / "x.mp4", "--audio-start", "1", *common)
    assert code == 2 and "audio_start (--audio-start) is where in an audio file" in err
    assert not (tmp_path / "x.mp4").exists()


def test_animate_demo_tries_the_whole_command_without_weights(media: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """animate --demo: a batch with the tiny random model (said on stderr), its results those of `demo` for the same
    pair; --skip-existing keeps them without a settings warning; --dry-run goes by the tiny model's size; --demo
    with --weights is refused."""
    common = ("--demo", "--portrait", media["portrait"], media["faceless_portrait"], "--driver", media["driver"],
              *FAST, "--max-frames", 3, "--no-audio")
    code, stdout, err = run(capsys, "animate", *common, "-o", tmp_path / "out")
    assert code == 2 and "animate --demo: a TINY RANDOM-WEIGHT model" in err  # (the faceless portrait fails alone)
    assert "1 of 2 results not written" in err and "wrote" in stdout
    [made] = list((tmp_path / "out").iterdir())
    code, _, err = run(capsys, "demo", "--portrait", media["portrait"], "--driver", media["driver"], *FAST,
                       "--max-frames", 3, "--no-audio", "-o", tmp_path / "demo.mp4")
    assert code == 0, err
    assert all(np.array_equal(a, b) for a, b in zip(frames_of(made), frames_of(tmp_path / "demo.mp4"), strict=True))
    code, stdout, err = run(capsys, "animate", "--demo", "--portrait", media["portrait"], "--driver", media["driver"],
                            *FAST, "--max-frames", 3, "--no-audio", "-o", made, "--skip-existing")
    assert code == 0 and f"kept {made}: it exists" in stdout and "other settings" not in err, err
    code, stdout, err = run(capsys, "animate", *common, "-o", tmp_path / "dry", "--dry-run")
    assert code == 2 and re.search(r"ok \S+: portrait 256x256, .*crop \d+ px; 1 window\(s\) x 2 steps", stdout), stdout
    assert not (tmp_path / "dry").exists()
    code, _, err = run(capsys, "animate", *common, "-o", tmp_path / "x", "--weights", tmp_path)
    assert code == 2 and "one of them; got --weights, --demo" in err
    for flags in (["--onnx", tmp_path], ["--engines", tmp_path, "--compile"]):  # (the weights' artefacts: not taken)
        code, _, err = run(capsys, "animate", *common, "-o", tmp_path / "x", *flags)
        named = ", ".join(str(f) for f in flags if str(f).startswith("--"))
        assert code == 2 and f"{named}: for the released model's weights (--weights), not --demo" in err, err
    assert not (tmp_path / "x").exists()


def test_servers_of_a_batch_with_other_settings_are_named(caplog: pytest.LogCaptureFixture) -> None:
    """`animate --server A B`: each result is made by whichever server is free, so servers with other weights or
    settings made a batch of mixed results without a word (a slow server with --max-frames 24 beside ones with 12);
    their GPUs and device numbers may differ."""
    a = {"weights_id": "w1", "device": "cuda:0", "device_name": "NVIDIA H200", "config": {"steps": 25, "seed": 42}}
    b = {**a, "device": "cuda:1", "device_name": "NVIDIA H100"}
    with caplog.at_level(logging.WARNING, logger="megactor_rt.cli"):
        cli._say_servers_differ({"http://a": a, "http://b": b})
    assert not caplog.records
    c = {**a, "weights_id": "w2", "config": {"steps": 4, "seed": 42}}
    with caplog.at_level(logging.WARNING, logger="megactor_rt.cli"):
        cli._say_servers_differ({"http://a": a, "http://b": b, "http://c": c})
    assert ("the servers make results with other settings (config.steps, weights_id differ: http://a against "
            "http://c)") in caplog.text


def test_an_output_folder_under_a_folder_this_user_may_not_search_is_named(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``convert-weights SRC /root/x/y`` as another user: Path.exists raises PermissionError for a folder under one
    the user may not search; the flag and the path are named (was: "unexpected error: PermissionError", exit 1).
    (The tests run as root: the refusal is simulated.)"""
    from megactor_rt import cli
    from megactor_rt.errors import InputError

    hidden = tmp_path / "private" / "x" / "y"
    real_exists = Path.exists

    def exists(self: Path, *args: object, **kwargs: object) -> bool:
        if self == hidden:
            raise PermissionError(13, "Permission denied", str(hidden))
        return real_exists(self)

    monkeypatch.setattr(Path, "exists", exists)
    with pytest.raises(InputError, match=re.escape(f"{hidden}: --out cannot be looked at (Permission denied: {hidden})")):
        cli.check_output_folder(hidden, "--out")


def test_face_is_the_portrait_face_as_in_the_python_api() -> None:
    """``--face 2`` (the Python API's ``face=2``) picks the portrait's face; it was taken as an abbreviation of
    ``--face-detector`` and refused as "invalid choice: '2'"."""
    args = cli.build_parser().parse_args(["animate", "--weights", "w", "--portrait", "p.png", "--driver", "d.mp4",
                                          "-o", "o.mp4", "--face", "2"])
    assert (args.portrait_face, args.face_detector) == (2, "auto")
