"""Resumable runs (``checkpoint_dir``, ``--checkpoint-dir``): a run stopped after a step and started again continues
from the step after it and gives the uninterrupted run's frames exactly; another run never reads its checkpoint."""

from __future__ import annotations

import itertools
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from media_fixtures import PORTRAIT, face_frames, write_face_driver, write_leftovers

from megactor_rt.cli import main
from megactor_rt.config import AnimateConfig
from megactor_rt.errors import InputError
from megactor_rt.runtime.animator import Animator
from megactor_rt.runtime.checkpoint import StepCheckpoint
from megactor_rt.runtime.driver import DriverFrames

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = AnimateConfig(steps=4, window=4, overlap=2, max_frames=6)


class Stop(Exception):
    """Stands for a crash, Ctrl-C or a preempted machine."""


@pytest.fixture(scope="module")
def anim() -> Animator:
    return Animator.demo(seed=0, device="cpu", config=CFG)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_face_driver(tmp_path_factory.mktemp("ckpt") / "driver.mp4", n=6, fps=25)


def _stop_after(monkeypatch: pytest.MonkeyPatch, step: int) -> list[int]:
    """Make the run stop right after step ``step`` (its checkpoint written first); returns the steps saved."""
    saved: list[int] = []
    original = StepCheckpoint.save

    def save(self: StepCheckpoint, i: int, latents: object) -> None:
        before = self.path.stat().st_mtime_ns if self.path.exists() else None
        original(self, i, latents)  # type: ignore[arg-type]
        if self.path.exists() and self.path.stat().st_mtime_ns != before:
            saved.append(i)
        if i == step:
            raise Stop

    monkeypatch.setattr(StepCheckpoint, "save", save)
    return saved


def _run(anim: Animator, driver: Path | DriverFrames, folder: Path, config: AnimateConfig = CFG) -> list[np.ndarray]:
    return list(anim.animate(anim.prepare(PORTRAIT), driver, config=config, checkpoint_dir=folder))


@pytest.mark.parametrize("feature_reuse", [None, 2], ids=["whole-unet", "feature-reuse"])
def test_a_stopped_run_continues_where_it_stopped(anim: Animator, driver: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, feature_reuse: int | None) -> None:
    """Stopped after step 3 of 4 (index 2), the run started again makes only step 4 and gives the uninterrupted
    run's frames bit for bit; the checkpoint is gone once it is done. With feature reuse every 2nd step only
    the states before a whole UNet step are saved (after steps 2 and 4, not 1 and 3)."""
    cfg = replace(CFG, feature_reuse=feature_reuse)
    whole = list(anim.animate(anim.prepare(PORTRAIT), driver, config=cfg))
    calls = anim.last_stats.calls["unet"]
    with monkeypatch.context() as m:
        saved = _stop_after(m, 2)
        with pytest.raises(Stop):
            _run(anim, driver, tmp_path, cfg)
    assert saved == ([0, 1, 2] if feature_reuse is None else [1])
    assert len(list(tmp_path.glob("run-*.safetensors"))) == 1
    again = _run(anim, driver, tmp_path, cfg)
    resumed = 3 if feature_reuse is None else 2
    assert anim.last_stats.resumed_from_step == resumed
    assert anim.last_stats.calls["unet"] == calls * (4 - resumed) // 4  # only the steps left
    assert len(again) == len(whole) == 6 and all(np.array_equal(a, b) for a, b in zip(again, whole, strict=True))
    assert list(tmp_path.iterdir()) == []  # done: the checkpoint went


def test_the_same_driver_at_another_path_resumes_and_another_one_does_not(anim: Animator, driver: Path,
                                                                          tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver is known by its bytes, not its path: one downloaded again (a web address) or read from standard
    input again is a new temporary file of the same bytes, and the run resumes (it started over, and the first
    run's checkpoint stayed); a driver of other bytes under the first one's path is another run."""
    folder, first, again = tmp_path / "ck", tmp_path / "dl1" / "driver.mp4", tmp_path / "dl2" / "d.mp4"
    for path in (first, again):
        path.parent.mkdir()
        shutil.copy(driver, path)
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(Stop):
            _run(anim, first, folder)
    _run(anim, again, folder)
    assert anim.last_stats.resumed_from_step == 2 and list(folder.iterdir()) == []
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(Stop):
            _run(anim, first, folder)
    write_face_driver(again, n=6, fps=30)  # (another clip under the second path)
    _run(anim, again, folder)
    assert anim.last_stats.resumed_from_step == 0


def test_a_run_whose_every_frame_was_taken_leaves_no_checkpoint(anim: Animator, driver: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A caller that takes exactly the run's frames and lets the generator go (never asking past the last one)
    has had every frame: the checkpoint goes (was: left behind, and the next run "resumed at step 5 of 4").
    Closed before its last frame the finished checkpoint stays, and the run started again decodes its saved
    latents without a step, giving the same frames."""
    state = anim.prepare(PORTRAIT)
    whole = list(anim.animate(state, driver))
    frames = anim.animate(state, driver, checkpoint_dir=tmp_path)
    taken = list(itertools.islice(frames, 6))
    assert len(list(tmp_path.glob("run-*.safetensors"))) == 1  # (the generator is not done: it may be asked again)
    del frames
    assert list(tmp_path.iterdir()) == [] and all(np.array_equal(a, b) for a, b in zip(taken, whole, strict=True))
    frames = anim.animate(state, driver, checkpoint_dir=tmp_path)
    first = next(frames)
    frames.close()  # stopped while its frames were handed out: every step done, the latents kept
    assert np.array_equal(first, whole[0]) and len(list(tmp_path.glob("run-*.safetensors"))) == 1
    with caplog.at_level(logging.INFO, logger="megactor_rt"):
        again = _run(anim, driver, tmp_path)
    assert anim.last_stats.resumed_from_step == 4 and "unet" not in anim.last_stats.calls
    assert "every step of 4 was done: decoding the latents saved in" in caplog.text
    assert "resuming at step 5" not in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(again, whole, strict=True)) and list(tmp_path.iterdir()) == []


def test_another_run_never_reads_the_checkpoint(anim: Animator, driver: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Another seed starts from its first step (its own checkpoint name); a corrupt checkpoint is named in a
    warning and the run starts from the first step, giving the uninterrupted frames."""
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(Stop):
            _run(anim, driver, tmp_path)
    (stopped,) = tmp_path.glob("run-*.safetensors")
    _run(anim, driver, tmp_path, replace(CFG, seed=7))
    assert anim.last_stats.resumed_from_step == 0 and stopped.exists()
    whole = list(anim.animate(anim.prepare(PORTRAIT), driver))
    stopped.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        again = _run(anim, driver, tmp_path)
    assert "unreadable checkpoint" in caplog.text and anim.last_stats.resumed_from_step == 0
    assert all(np.array_equal(a, b) for a, b in zip(again, whole, strict=True)) and not stopped.exists()


def test_runs_that_cannot_be_saved_say_so(anim: Animator, driver: Path, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    """Open windows and drivers in memory run without a checkpoint (a warning each); a checkpoint folder that
    is a file is refused by the CLI before any work."""
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        _run(anim, driver, tmp_path / "a", replace(CFG, closed_loop=False))
        _run(anim, DriverFrames(face_frames(6, 96), 25), tmp_path / "b")
    assert "open windows" in caplog.text and "a driver in memory is not saved" in caplog.text
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (tmp_path / "file").write_text("")
    code = main(["-q", "demo", "--checkpoint-dir", str(tmp_path / "file"), "-o", str(tmp_path / "r.mp4")])
    assert code == 2 and "the checkpoint folder (--checkpoint-dir) is a file" in capsys.readouterr().err
    assert not (tmp_path / "r.mp4").exists()
    state = anim.prepare(PORTRAIT)
    for run in (lambda: anim.animate_to_file(PORTRAIT, driver, tmp_path / "r.mp4", checkpoint_dir=tmp_path / "file"),
                lambda: next(anim.animate(state, driver, checkpoint_dir=tmp_path / "file"))):  # (the Python API
        anim.last_plan = None
        with pytest.raises(InputError, match="is a file"):  # too, before its driver's face search: was after)
            run()
        assert anim.last_plan is None
    assert not (tmp_path / "r.mp4").exists()


@pytest.mark.parametrize(("stop", "said"), [(1, "resumed at step 3; "), (2, "all 3 steps from its checkpoint; ")])
def test_the_cli_resumes_and_says_so(driver: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str], stop: int, said: str) -> None:
    """A run stopped after a step continues from the next; one stopped after its last (while its frames were
    decoded) decodes its saved latents, and says so (was "resumed at step 4" of 3)."""
    flags = ["-q", "demo", "--driver", str(driver), "--steps", "3", "--window", "4", "--overlap", "2",
             "--checkpoint-dir", str(tmp_path / "ckpt")]
    with monkeypatch.context() as m:
        _stop_after(m, stop)
        assert main([*flags, "-o", str(tmp_path / "r.mp4")]) == 1  # (an unexpected error, for the CLI)
    assert not (tmp_path / "r.mp4").exists()
    capsys.readouterr()
    assert main([*flags, "-o", str(tmp_path / "r.mp4")]) == 0
    assert said in capsys.readouterr().out and (tmp_path / "r.mp4").is_file()
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_checkpoints_of_runs_never_started_again_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint untouched for a week is named in a warning (the folder's others are not), and none is deleted."""
    import os
    import time

    from megactor_rt.runtime.checkpoint import warn_stale_checkpoints

    old, fresh, other = (tmp_path / "run-old.safetensors", tmp_path / "run-new.safetensors", tmp_path / "notes.txt")
    for p in (old, fresh, other):
        p.write_bytes(b"x" * 1000)
    week_ago = time.time() - 8 * 86400
    for p in (old, other):
        os.utime(p, (week_ago, week_ago))
    with caplog.at_level(logging.WARNING, logger="megactor_rt.runtime.checkpoint"):
        assert warn_stale_checkpoints(tmp_path) == [old]
    assert "1 checkpoint(s) (0.0 GB) of runs stopped more than 7 days ago" in caplog.text and "run-old" in caplog.text
    assert old.exists() and fresh.exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megactor_rt.runtime.checkpoint"):
        assert warn_stale_checkpoints(tmp_path / "missing") == [] and warn_stale_checkpoints(tmp_path, days=30) == []
    assert caplog.text == ""


def _stopped_after(anim: Animator, driver: Path, folder: Path, monkeypatch: pytest.MonkeyPatch, step: int) -> Path:
    """A run stopped after step ``step``; its checkpoint file."""
    with monkeypatch.context() as m:
        _stop_after(m, step)
        with pytest.raises(Stop):
            _run(anim, driver, folder)
    (stopped,) = folder.glob("run-*.safetensors")
    return stopped


def _read(checkpoint: Path) -> tuple[dict[str, str], torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        return dict(f.metadata()), f.get_tensor("latents")


@pytest.mark.parametrize("damage", ["nan", "values", "next_step"])
def test_a_damaged_checkpoint_is_not_resumed_from(anim: Animator, driver: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                  damage: str) -> None:
    """A checkpoint whose latents were damaged on disk (NaNs, other finite values: safetensors checks nothing) was
    resumed from and gave wrong frames with exit 0; a "next_step" that is no number was an unexpected ValueError at
    every run. Both: named in a warning, the run starts from its first step and gives the uninterrupted frames."""
    from safetensors.torch import save_file

    stopped = _stopped_after(anim, driver, tmp_path, monkeypatch, 1)
    meta, latents = _read(stopped)
    if damage == "next_step":
        meta["next_step"] = "two"
    else:
        latents.view(-1)[:50] = float("nan") if damage == "nan" else 1e4
    save_file({"latents": latents}, str(stopped), metadata=meta)
    whole = list(anim.animate(anim.prepare(PORTRAIT), driver))
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        again = _run(anim, driver, tmp_path)
    said = "unreadable checkpoint" if damage == "next_step" else "damaged checkpoint (its latents do not match"
    assert said in caplog.text and anim.last_stats.resumed_from_step == 0
    assert all(np.array_equal(a, b) for a, b in zip(again, whole, strict=True)) and not stopped.exists()


def test_a_folder_in_the_checkpoints_place_is_named_before_the_steps(anim: Animator, driver: Path,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from megactor_rt.errors import InputError

    stopped = _stopped_after(anim, driver, tmp_path, monkeypatch, 0)
    stopped.unlink()
    stopped.mkdir()
    with pytest.raises(InputError, match=r"run-.*\.safetensors: this run's checkpoint file is a folder here"):
        _run(anim, driver, tmp_path)
    assert anim.last_stats is None or "unet" not in anim.last_stats.calls


def test_another_window_batch_is_another_run(anim: Animator, driver: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """window_batch gives the frames up to rounding only: a run resumed with another batch matched neither
    uninterrupted run bit for bit; it is another run's checkpoint now (decode_streams and bit_depth keep it). A run
    that finds a checkpoint of its portrait and driver saved with other settings says so (it started over
    silently)."""
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(Stop):
            _run(anim, driver, tmp_path)
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        _run(anim, driver, tmp_path, replace(CFG, window_batch=2))
    assert anim.last_stats.resumed_from_step == 0 and len(list(tmp_path.glob("run-*.safetensors"))) == 1
    assert "another run's checkpoint of this portrait and driver, saved with other settings" in caplog.text  # (was
    # silent)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        _run(anim, write_face_driver(tmp_path.parent / f"{tmp_path.name}-other.mp4", n=6, fps=25), tmp_path)
    assert "other settings" not in caplog.text  # (another driver's)
    _run(anim, driver, tmp_path, replace(CFG, decode_streams=False))
    assert anim.last_stats.resumed_from_step == 2 and list(tmp_path.iterdir()) == []


def test_a_checkpoint_without_a_checksum_is_named_as_an_older_versions(anim: Animator, driver: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import save_file

    stopped = _stopped_after(anim, driver, tmp_path, monkeypatch, 1)
    meta, latents = _read(stopped)
    del meta["sha256"]
    save_file({"latents": latents}, str(stopped), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        _run(anim, driver, tmp_path)
    assert "it carries no checksum (written by an older megactor-rt)" in caplog.text
    assert anim.last_stats.resumed_from_step == 0
    # an older version's, of another key: format 1 knew a driver by its path (its checksum and inputs' hash saved, no
    # format): never continued by this version, which knows a driver by its bytes
    older = tmp_path / "run-0123456789abcdef0123456789abcdef.safetensors"
    save_file({"latents": latents}, str(older), metadata={**{k: v for k, v in meta.items() if k != "format"},
                                                           "sha256": "0" * 64})
    for turn in (1, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megactor_rt"):
            _run(anim, driver, tmp_path, replace(CFG, seed=turn))
        assert ("1 checkpoint(s) written by an older megactor-rt, e.g. " + older.name in caplog.text) is (turn == 1)


def test_a_save_killed_midway_leaves_no_file_for_ever(anim: Animator, driver: Path, tmp_path: Path) -> None:
    """A run killed while writing its checkpoint (kill -9, a preempted machine) leaves the atomic write's temporary
    file, as large as the checkpoint; the next run using the folder, with any settings, removes it once it is an hour
    old (was: left for ever unless that very run was started again, and named by no warning), and keeps a younger one
    (another run may be writing it now)."""


    folder = tmp_path / "ckpt"
    folder.mkdir()
    old, young = folder / ".run-0123.safetensors.abcd1234.tmp", folder / ".run-4567.safetensors.efgh5678.tmp"
    write_leftovers(b"half a checkpoint", [old], [young])
    _run(anim, driver, folder)
    assert sorted(p.name for p in folder.iterdir()) == [young.name]


def test_a_drivers_bytes_are_hashed_once_per_version(driver: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint knows its driver by its bytes: hashed once per version of the file (a batch of portraits on one
    long driver hashed it again for each), again once it changed."""
    import os

    from megactor_rt.engine import cache as engine_cache
    from megactor_rt.runtime.driver import driver_identity

    hashed: list[Path] = []
    real = engine_cache.sha256_file
    monkeypatch.setattr(engine_cache, "sha256_file", lambda p, *a, **k: hashed.append(p) or real(p, *a, **k))
    clip = Path(shutil.copy(driver, tmp_path / "clip.mp4"))
    first = driver_identity(clip, content=True)
    assert driver_identity(clip, content=True) == first and len(hashed) == 1
    os.utime(clip, ns=(1, 1))  # (another version, as far as the file system tells)
    assert driver_identity(clip, content=True) == first and len(hashed) == 2


def test_latents_of_other_graphs_are_not_resumed_from(anim: Animator, driver: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint's key holds what computes the latents: a UNet graph exported again under the same weights
    (another ONNX file) starts from the first step; another decoder graph reads the same latents and resumes."""
    from megactor_rt.runtime.onnx_backend import GraphSubmodels

    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(Stop):
            _run(anim, driver, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(type(anim.sub), "latents_id", property(lambda self: "torch(another export)"))
        _stop_after(m, 0)
        with pytest.raises(Stop):
            _run(anim, driver, tmp_path)
        assert anim.last_stats.resumed_from_step == 0
    _run(anim, driver, tmp_path)
    assert anim.last_stats.resumed_from_step == 2

    class Graph:  # a runner for one exported graph
        def __init__(self, sha: str) -> None:
            self.sha = sha

        def identity(self) -> str:
            return f"onnxruntime:{self.sha}"

        def max_size(self, name: str, axis: int, where: object = None) -> None:
            return None

    def latents_id(runners: dict) -> str:
        return GraphSubmodels("onnxruntime", anim.sub.config, "w", runners, torch.device("cpu"), torch.float32,
                              fallback=anim.sub).latents_id

    every = {g: Graph("a") for g in ("temporal_unet", "pose_guider", "reference_net", "vae_decoder", "tiny_decoder")}
    assert latents_id(every) != latents_id({**every, "temporal_unet": Graph("b")})
    assert latents_id(every) != latents_id({g: r for g, r in every.items() if g != "pose_guider"})  # torch's
    assert latents_id(every) == latents_id({**every, "vae_decoder": Graph("b"), "tiny_decoder": Graph("c")})


def test_a_run_started_again_with_another_seed_names_the_checkpoint_it_does_not_continue(
        driver: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The seed is also in the portrait state's key (its posterior sample), as are the precision, backend and device:
    a run stopped and started again with another one was told of no checkpoint of its portrait and driver (its
    inputs' hash changed with the state's key); now the checkpoint is named, and the run starts over."""
    flags = ["-q", "demo", "--driver", str(driver), "--steps", "3", "--window", "4", "--overlap", "2",
             "--max-frames", "6", "--checkpoint-dir", str(tmp_path / "ckpt"), "-o", str(tmp_path / "r.mp4")]
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        assert main(flags) == 1
    (stopped,) = (tmp_path / "ckpt").glob("run-*.safetensors")
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        assert main([*flags, "--seed", "7"]) == 0
    assert f"{stopped}: another run's checkpoint of this portrait and driver, saved with other settings" in caplog.text
    assert stopped.exists() and list((tmp_path / "ckpt").iterdir()) == [stopped]


def test_a_driver_piped_in_again_resumes_without_a_warning_that_it_cannot(
        driver: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """--driver -: a checkpoint knows the driver by its bytes, so the same clip piped in again continues the run; a
    warning said it could not ("a new file on every run"), which kept users from the insurance."""
    import io

    def piped() -> None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(driver.read_bytes())))

    flags = ["-q", "demo", "--driver", "-", "--steps", "3", "--window", "4", "--overlap", "2",
             "--checkpoint-dir", str(tmp_path / "ckpt"), "-o", str(tmp_path / "r.mp4")]
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="megactor_rt"):
        _stop_after(m, 1)
        piped()
        assert main(flags) == 1
    piped()
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        assert main(flags) == 0
    assert "resumed at step 3" in capsys.readouterr().out
    assert "standard input" not in caplog.text, caplog.text
    assert list((tmp_path / "ckpt").iterdir()) == []


@pytest.mark.parametrize("inside", ["", "ckpt"], ids=["the-folder", "a-folder-in-it"])
def test_a_checkpoint_folder_in_a_sequence_results_folder_is_refused_before_the_work(
        driver: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], inside: str) -> None:
    """-o take/%05d.png --checkpoint-dir take: the checkpoint went into the folder that holds the frames alone, so
    the result failed once every step was done ("take now holds run-....safetensors, which is no frame of this
    result"), and the run started again was refused; now the folder is refused before any work."""
    take = tmp_path / "take"
    flags = ["-q", "demo", "--driver", str(driver), "--steps", "2", "--window", "4", "--overlap", "2",
             "--checkpoint-dir", str(take / inside), "-o", str(take / "%05d.png")]
    assert main(flags) == 2
    out, err = capsys.readouterr()
    assert "the checkpoint folder (--checkpoint-dir) is in the folder of the frame sequence result" in err, err
    assert "TINY RANDOM-WEIGHT" not in out + err  # (before the model is built)
    assert not take.exists() and list(tmp_path.iterdir()) == []
