"""``megactor-rt serve --jobs-dir DIR``: jobs that outlive the server (their files, results and states kept in DIR,
taken up again by a server started on it, a run under way going on from its last step)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from media_fixtures import decode_all
from serve_fixtures import (
    anim,
    animate,
    animate_through_a_restart,
    files,
    form,
    hold_runs,
    media,
    post_job,
    request,
    serving,
    wait_for,
)

from megactor_rt.errors import InputError
from megactor_rt.runtime.animator import Animator
from megactor_rt.server import RECORD, AnimateServer

__all__ = ["anim", "media"]  # (fixtures, from serve_fixtures)


def _records(jobs_dir: Path) -> dict[str, str]:
    """Each job's status as its record on disk says."""
    return {p.parent.name: json.loads(p.read_text())["status"] for p in jobs_dir.glob(f"jobs/*/{RECORD}")}


def _stop_after_a_step(srv: AnimateServer, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[Any]]:
    """Make the server's next run, once its first denoising step is saved in its checkpoint, wait until the server's
    stop cancels it (deterministically: the run stops at the progress report that follows). Returns the event set
    when the checkpoint is there, and the checkpoint folders the runs were given."""
    saved, given = threading.Event(), []
    real = srv.anim.animate_to_file

    def run(*args: Any, **kw: Any) -> Any:
        folder, report = kw.get("checkpoint_dir"), kw["on_progress"]
        given.append(folder)

        def reported(progress: Any) -> None:
            if folder is not None and not saved.is_set() and any(Path(folder).glob("run-*.safetensors")):
                saved.set()
                assert srv.running is not None
                srv.running.cancel.wait(60)  # (set by the server's stop)
            report(progress)

        return real(*args, **{**kw, "on_progress": reported})

    monkeypatch.setattr(srv.anim, "animate_to_file", run)
    return saved, given


def test_jobs_outlive_the_server_and_a_stopped_run_goes_on_from_its_step(
        anim: Animator, media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """With a jobs folder, a server stopped with a job done, one failed, one running (past its first step) and one
    queued leaves them all there; a server started on the folder serves the done one's very result and the failed
    one's error, runs the queued one, and the stopped run goes on from its second step, with the frames an
    uninterrupted run makes."""
    jobs_dir = tmp_path / "jobs"
    with serving(anim, jobs_dir=jobs_dir) as srv:
        done = post_job(srv, files(media))
        wait_for(srv, lambda d: d["status"] == "done", path=f"/jobs/{done}")
        result = request(srv, "GET", f"/jobs/{done}/result")[2]
        bad = post_job(srv, {**files(media), "portrait": ("me.png", b"not an image")})
        error = wait_for(srv, lambda d: d["status"] == "failed", path=f"/jobs/{bad}")["error"]
        saved, given = _stop_after_a_step(srv, monkeypatch)
        stopped, queued = post_job(srv, {**files(media), "format": "gif"}), post_job(srv, files(media))
        assert saved.wait(120)
    assert given == [jobs_dir / "jobs" / stopped / "checkpoint"]
    assert _records(jobs_dir) == {done: "done", bad: "failed", stopped: "running", queued: "queued"}
    assert len(list((jobs_dir / "jobs" / stopped / "checkpoint").glob("run-*.safetensors"))) == 1
    monkeypatch.undo()
    (jobs_dir / "jobs" / stopped / "result" / ".me_talk.0a1b.tmp.gif").write_bytes(b"GIF8")  # (a kill -9's write)

    with serving(anim, jobs_dir=jobs_dir) as srv, caplog.at_level(logging.INFO, "megactor_rt.server"):
        assert srv.restore() == (4, 2)
        assert request(srv, "GET", f"/jobs/{done}/result")[:3:2] == (200, result)
        assert request(srv, "GET", f"/jobs/{bad}/result")[0] == 400
        assert json.loads(request(srv, "GET", f"/jobs/{bad}")[2])["error"] == error
        for job in (stopped, queued):
            wait_for(srv, lambda d: d["status"] in ("done", "failed"), path=f"/jobs/{job}")
        status, headers, gif = request(srv, "GET", f"/jobs/{stopped}/result")
        assert status == 200 and headers["X-Megactor-Frames"] == "6"
        (tmp_path / "resumed.gif").write_bytes(gif)
        status, _, whole = animate(srv, {**files(media), "format": "gif"})
        (tmp_path / "whole.gif").write_bytes(whole)
        assert request(srv, "GET", f"/jobs/{queued}/result")[0] == 200
    assert f"run {stopped}: went on from step 2, saved before the server stopped" in caplog.text
    assert f"job {stopped}: its run was under way when the server stopped; it runs again" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(decode_all(tmp_path / "resumed.gif"),
                                                    decode_all(tmp_path / "whole.gif"), strict=True))
    assert _records(jobs_dir) == {done: "done", bad: "failed", stopped: "done", queued: "done"}
    kept = sorted(str(p.relative_to(jobs_dir / "jobs" / stopped)) for p in (jobs_dir / "jobs" / stopped).rglob("*"))
    assert kept == [RECORD, "result", "result/me_talk.gif"]  # (its uploads and checkpoint gone with its run)


def test_a_queued_job_cancelled_stays_cancelled_in_the_folder(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """DELETE on a queued job in a jobs folder: its record says cancelled (its uploads gone), and a server started
    on the folder lists it as cancelled and does not run it."""
    jobs_dir = tmp_path / "jobs"
    with serving(anim, jobs_dir=jobs_dir) as srv:
        go = hold_runs(srv, monkeypatch)
        first = post_job(srv, files(media))
        wait_for(srv, lambda d: d["status"] == "running", path=f"/jobs/{first}")
        second = post_job(srv, files(media))
        assert json.loads(request(srv, "DELETE", f"/jobs/{second}")[2])["status"] == "cancelled"
        assert _records(jobs_dir)[second] == "cancelled"
        assert [p.name for p in (jobs_dir / "jobs" / second).iterdir()] == [RECORD]
        go.set()
        wait_for(srv, lambda d: d["status"] == "done", path=f"/jobs/{first}")
    monkeypatch.undo()
    with serving(anim, jobs_dir=jobs_dir) as srv:
        assert srv.restore() == (2, 0)
        assert json.loads(request(srv, "GET", f"/jobs/{second}")[2])["status"] == "cancelled"
        assert request(srv, "GET", f"/jobs/{second}/result")[0] == 410


def test_deleted_and_expired_jobs_leave_nothing_in_the_folder(anim: Animator, media: dict[str, Path],
                                                              tmp_path: Path) -> None:
    jobs_dir = tmp_path / "jobs"
    with serving(anim, jobs_dir=jobs_dir) as srv:
        job = post_job(srv, files(media))
        wait_for(srv, lambda d: d["status"] == "done", path=f"/jobs/{job}")
        assert json.loads(request(srv, "DELETE", f"/jobs/{job}")[2])["status"] == "deleted"
        assert list((jobs_dir / "jobs").iterdir()) == []
        job = post_job(srv, {**files(media), "duration": "0.04"})
        wait_for(srv, lambda d: d["status"] == "done", path=f"/jobs/{job}")
    with serving(anim, jobs_dir=jobs_dir, keep_s=0.0) as srv:
        assert srv.restore() == (0, 0) and request(srv, "GET", f"/jobs/{job}")[0] == 404  # (expired meanwhile)
        assert list((jobs_dir / "jobs").iterdir()) == []
        assert len(list((jobs_dir / "drivers").glob("*/talk.mp4"))) == 1  # (the driver kept for the next requests)
    with serving(anim, jobs_dir=jobs_dir) as srv:  # (a POST /animate leaves nothing there)
        assert animate(srv, files(media))[0] == 200 and list((jobs_dir / "jobs").iterdir()) == []


def test_a_jobs_folder_on_another_file_system_than_the_temporary_folder(anim: Animator, media: dict[str, Path],
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Files do not move across file systems by renaming (EXDEV): with the jobs folder on another disk, a POST
    /animate's driver still goes to the drivers kept there (its upload made beside it), and nothing stays behind."""
    import errno

    jobs_dir = tmp_path / "jobs"
    real = os.replace

    def replace(src: Any, dst: Any) -> None:  # (jobs_dir as another file system)
        if Path(src).is_relative_to(jobs_dir) != Path(dst).is_relative_to(jobs_dir):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with serving(anim, jobs_dir=jobs_dir) as srv:
        status, headers, _ = animate(srv, files(media))
        assert status == 200 and headers["X-Megactor-Frames"] == "6"
        assert [p.name for p in (jobs_dir / "drivers").glob("*/*")] == ["talk.mp4"]
        assert list((jobs_dir / "requests").iterdir()) == []
        (jobs_dir / "requests" / "megactor-rt-serve-left").mkdir()  # (as a server stopped mid-request leaves it)
    with serving(anim, jobs_dir=jobs_dir) as srv:
        srv.restore()
        assert list((jobs_dir / "requests").iterdir()) == []


def test_one_server_per_jobs_folder(anim: Animator, tmp_path: Path) -> None:
    jobs_dir = tmp_path / "jobs"
    taken = rf"{jobs_dir}: another server uses this jobs folder \(--jobs-dir\) \(process {os.getpid()}\); one server"
    with serving(anim, jobs_dir=jobs_dir), pytest.raises(InputError, match=taken):
        AnimateServer(anim, ("127.0.0.1", 0), jobs_dir=jobs_dir)
    with serving(anim, jobs_dir=jobs_dir) as srv:  # (free again once the first has stopped)
        assert srv.restore() == (0, 0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"file: the jobs folder \(--jobs-dir\) cannot be written"):
        AnimateServer(anim, ("127.0.0.1", 0), jobs_dir=tmp_path / "file")
    with serving(anim) as srv, pytest.raises(OSError):  # (a port in use: said before a jobs folder is made)
        AnimateServer(anim, ("127.0.0.1", srv.server_address[1]), jobs_dir=tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_what_cannot_be_taken_up_is_said(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """A form never received whole is removed; a record that is not one is left there and named; a done job whose
    result is gone is forgotten; a queued job the new server's limits refuse fails, saying why."""
    jobs_dir = tmp_path / "jobs"
    with serving(anim, jobs_dir=jobs_dir) as srv:
        done, later = post_job(srv, files(media)), post_job(srv, files(media))
        for job in (done, later):
            wait_for(srv, lambda d: d["status"] == "done", path=f"/jobs/{job}")
    (jobs_dir / "jobs" / done / "result" / "me_talk.mp4").unlink()
    record = json.loads((jobs_dir / "jobs" / later / RECORD).read_text())
    (jobs_dir / "jobs" / later / RECORD).write_text(json.dumps({**record, "status": "queued"}))
    (jobs_dir / "jobs" / "0a1b2c3d4e5f" / "driver").mkdir(parents=True)  # (named as a job is)
    (jobs_dir / "jobs" / "broken").mkdir()
    (jobs_dir / "jobs" / "broken" / RECORD).write_text("{not json")
    with serving(anim, jobs_dir=jobs_dir, frame_limit=2) as srv, caplog.at_level(logging.INFO, "megactor_rt.server"):
        assert srv.restore() == (1, 0)
        doc = json.loads(request(srv, "GET", f"/jobs/{later}")[2])
        assert doc["status"] == "failed" and doc["error"].startswith("driver/talk.mp4: the result would have 6 "
                                                                     "frames, over this server's limit of 2"), doc
        assert request(srv, "GET", f"/jobs/{done}")[0] == 404
    assert sorted(p.name for p in (jobs_dir / "jobs").iterdir()) == sorted(["broken", later])
    assert [p.name for p in (jobs_dir / "jobs" / later).iterdir()] == [RECORD]  # (its files go with its run)
    assert f"job {done}: its result {jobs_dir / 'jobs' / done / 'result' / 'me_talk.mp4'} is gone" in caplog.text
    assert f"{jobs_dir / 'jobs' / '0a1b2c3d4e5f'}: a job whose form was not received whole" in caplog.text
    assert f"{jobs_dir / 'jobs' / 'broken' / RECORD}: not a job record this server reads (JSONDecodeError" in caplog.text
    assert json.loads((jobs_dir / "jobs" / later / RECORD).read_text())["status"] == "failed"


def test_records_edited_to_name_files_elsewhere_are_not_served(anim: Animator, media: dict[str, Path],
                                                                tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A record naming a result, an upload or a driver outside its folder (``../../secret``, an absolute path), a job
    folder that is a link to elsewhere, a record whose error or times are not what the server writes: each is named
    in the log and not served, run, pruned or rewritten; the server starts and serves the rest."""
    jobs_dir = tmp_path / "jobs"
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET")
    outside = tmp_path / "outside"
    (outside / "uploads").mkdir(parents=True)
    (outside / "uploads" / "keep.txt").write_text("mine")
    with serving(anim, jobs_dir=jobs_dir) as srv:
        jobs = [post_job(srv, files(media)) for _ in range(6)]
        for job in jobs:
            wait_for(srv, lambda d: d["status"] == "done", path=f"/jobs/{job}")
    record = json.loads((jobs_dir / "jobs" / jobs[0] / RECORD).read_text())
    edits = [{"result": "../../../secret.txt"}, {"result": str(secret)}, {"status": "queued", "driver": str(secret)},
             {"error": [400]}, {"created": float("inf")}]
    for job, edit in zip(jobs, edits):
        doc = json.loads((jobs_dir / "jobs" / job / RECORD).read_text())
        (jobs_dir / "jobs" / job / RECORD).write_text(json.dumps({**doc, **edit}))
    linked = jobs[5]
    shutil.copy(jobs_dir / "jobs" / linked / RECORD, outside / RECORD)
    shutil.rmtree(jobs_dir / "jobs" / linked)
    (jobs_dir / "jobs" / linked).symlink_to(outside)
    with serving(anim, jobs_dir=jobs_dir) as srv, caplog.at_level(logging.INFO, "megactor_rt.server"):
        assert srv.restore() == (0, 0)
        for job in jobs:
            assert request(srv, "GET", f"/jobs/{job}/result")[0] == 404
        assert request(srv, "GET", "/jobs")[0] == 200
    assert secret.read_text() == "SECRET" and (outside / "uploads" / "keep.txt").read_text() == "mine"
    assert caplog.text.count("not a job record this server reads") == 5 and "leads out of" in caplog.text
    assert f"{jobs_dir / 'jobs' / linked}: a link, not a job folder this server made" in caplog.text
    assert record["status"] == "done"


def test_a_client_follows_its_job_through_a_killed_and_restarted_serve(media: dict[str, Path], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """`serve --demo --jobs-dir DIR` killed (SIGKILL) in the middle of a job's run and started again on DIR: the
    client finds its job again (not sent a second time) and writes the result."""
    import megactor_rt.client as client_module

    monkeypatch.setattr(client_module, "POLL_S", 0.05)
    out = tmp_path / "out.gif"
    with caplog.at_level(logging.INFO, "megactor_rt.client"):
        head = animate_through_a_restart(media, out, ["--jobs-dir", str(tmp_path / "jobs")])
    assert head["x-megactor-frames"] == "6" and len(decode_all(out)) == 6
    assert "cannot reach the server" in caplog.text and "reached again after" in caplog.text
    assert "sending it again" not in caplog.text and "no longer there" not in caplog.text
    assert _records(tmp_path / "jobs") == {}  # (the client deleted its job once it had the result)


def test_a_form_sent_again_with_its_key_gets_the_job_the_first_made(anim: Animator, media: dict[str, Path],
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A POST /jobs sent again with the same Idempotency-Key (its answer was lost) is answered 200 with the job the
    first made, queued, done, and from a server started again on the jobs folder; another key, or none, makes a
    job of its own; a malformed key, or a key on POST /animate, is refused by name."""
    jobs_dir = tmp_path / "jobs"
    body, ctype = form(files(media))
    key = {"Idempotency-Key": "8a0e-retry:1.x"}
    with serving(anim, jobs_dir=jobs_dir) as srv:
        assert json.loads(request(srv, "GET", "/health")[2])["idempotency_keys"] is True
        go = hold_runs(srv, monkeypatch)
        status, _, first = request(srv, "POST", "/jobs", body, ctype, key)
        job = json.loads(first)["id"]
        assert status == 202
        status, headers, again = request(srv, "POST", "/jobs", *form(files(media)), key)  # (another boundary)
        assert status == 200 and json.loads(again)["id"] == job and headers["Location"] == f"/jobs/{job}"
        status, _, said = request(srv, "POST", "/jobs", *form({**files(media), "seed": "2"}), key)
        assert status == 422 and f"is job {job}'s, sent with another form" in json.loads(said)["error"], said
        other = json.loads(request(srv, "POST", "/jobs", body, ctype, {"Idempotency-Key": "another"})[2])["id"]
        plain = post_job(srv, files(media))
        assert len({job, other, plain}) == 3 and len(json.loads(request(srv, "GET", "/jobs")[2])["jobs"]) == 3
        for bad, path in (("", "/jobs"), ("x" * 129, "/jobs"), ("a b", "/jobs"), ("k", "/animate")):
            status, _, said = request(srv, "POST", path, body, ctype, {"Idempotency-Key": bad})
            assert status == 400 and "Idempotency-Key header is for POST /jobs" in json.loads(said)["error"], said
        go.set()
        wait_for(srv, lambda d: d["status"] == "done", path=f"/jobs/{plain}")
        status, _, done = request(srv, "POST", "/jobs", body, ctype, key)
        assert status == 200 and json.loads(done)["status"] == "done"
        assert len(json.loads(request(srv, "GET", "/jobs")[2])["jobs"]) == 3
    monkeypatch.undo()
    with serving(anim, jobs_dir=jobs_dir) as srv:
        assert srv.restore() == (3, 0)
        status, _, kept = request(srv, "POST", "/jobs", body, ctype, key)
        assert status == 200 and json.loads(kept)["id"] == job
        assert request(srv, "POST", "/jobs", *form({**files(media), "seed": "2"}), key)[0] == 422  # (kept too)
        request(srv, "DELETE", f"/jobs/{job}")  # (gone: the key makes a new job)
        status, _, new = request(srv, "POST", "/jobs", body, ctype, key)
        assert status == 202 and json.loads(new)["id"] != job


def _hold_until_stopped(srv: AnimateServer, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make the server's runs, once started, wait until the server stops (then they go on, to be cancelled at their
    first progress report, as a run the stop catches midway). Returns the event set when a run has started."""
    started = threading.Event()
    real = srv.anim.animate_to_file

    def held(*args: Any, **kw: Any) -> Any:
        started.set()
        while not srv._closing:  # (set by the server's stop, the moment the test leaves its block)
            threading.Event().wait(0.01)
        return real(*args, **kw)

    monkeypatch.setattr(srv.anim, "animate_to_file", held)
    return started


def test_a_running_job_its_client_cancelled_is_not_run_again(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """DELETE on a running job is in its record at once: a server stopped before the run sees the cancel writes it
    cancelled, and one killed meanwhile (its record as the DELETE left it) is not run again by the next server."""
    jobs_dir = tmp_path / "jobs"
    with serving(anim, jobs_dir=jobs_dir) as srv:
        started = _hold_until_stopped(srv, monkeypatch)
        job = post_job(srv, files(media))
        assert started.wait(60)
        status, _, said = request(srv, "DELETE", f"/jobs/{job}")
        assert (status, json.loads(said)["status"]) == (202, "cancelling")
        as_deleted = (jobs_dir / "jobs" / job / RECORD).read_text()  # (a kill -9 now leaves this)
    assert _records(jobs_dir) == {job: "cancelled"}
    assert json.loads(as_deleted)["status"] == "cancelled"  # (what a server of any version reads as cancelled)
    monkeypatch.undo()
    with serving(anim, jobs_dir=jobs_dir) as srv:
        assert srv.restore() == (1, 0)
        assert json.loads(request(srv, "GET", f"/jobs/{job}")[2])["status"] == "cancelled"
    (jobs_dir / "jobs" / job / RECORD).write_text(as_deleted)
    with serving(anim, jobs_dir=jobs_dir) as srv:
        assert srv.restore() == (1, 0)
        assert json.loads(request(srv, "GET", f"/jobs/{job}")[2])["status"] == "cancelled"
    assert _records(jobs_dir) == {job: "cancelled"}
    assert [p.name for p in (jobs_dir / "jobs" / job).iterdir()] == [RECORD]


def test_a_cancelled_jobs_callback_is_posted_by_the_next_server_where_a_kill_kept_its_run_from_it(
        anim: Animator, media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job its client cancelled while it ran: its run's end posts its callback; a server killed before that end
    (its record as the DELETE left it, cancelled) posted none, and the next server, reading cancelled, none either.
    The record now says the callback is owed: the next server posts it, once."""
    jobs_dir = tmp_path / "jobs"
    hook = "http://127.0.0.1:9/hook"
    with serving(anim, jobs_dir=jobs_dir, allow_callbacks=True) as srv:
        posted: list[tuple[str, str]] = []
        monkeypatch.setattr(srv, "_call_back", lambda url, state: posted.append((url, state["status"])))
        started = _hold_until_stopped(srv, monkeypatch)
        job = post_job(srv, {**files(media), "callback": hook})
        assert started.wait(60)
        assert request(srv, "DELETE", f"/jobs/{job}")[0] == 202
        record = jobs_dir / "jobs" / job / RECORD
        as_deleted = record.read_text()  # (a kill -9 now leaves this)
    assert json.loads(as_deleted)["callback_owed"] is True
    _wait_until(lambda: posted)
    assert posted == [(hook, "cancelled")]  # (its run's end, the server stopping)
    assert json.loads(record.read_text())["callback_owed"] is False
    monkeypatch.undo()
    record.write_text(as_deleted)
    with serving(anim, jobs_dir=jobs_dir) as srv:  # (one that posts no callbacks leaves it owed)
        assert srv.restore() == (1, 0)
    assert json.loads(record.read_text())["callback_owed"] is True
    for turn in (1, 2):
        posted = []
        with serving(anim, jobs_dir=jobs_dir, allow_callbacks=True) as srv:
            monkeypatch.setattr(srv, "_call_back", lambda url, state, posted=posted: posted.append(
                (url, state["status"])))
            assert srv.restore() == (1, 0)
            assert json.loads(request(srv, "GET", f"/jobs/{job}")[2])["status"] == "cancelled"
            _wait_until(lambda posted=posted: posted, 10 if turn == 1 else 0.5)  # (the callback's thread)
        assert posted == ([(hook, "cancelled")] if turn == 1 else []), turn
        assert json.loads(record.read_text())["callback_owed"] is False


def _wait_until(ready: Callable[[], Any], seconds: float = 10) -> None:
    """Wait up to ``seconds`` for ``ready()`` to be truthy (a callback's thread has posted)."""
    end = time.monotonic() + seconds
    while not ready() and time.monotonic() < end:
        time.sleep(0.01)


class _Killed(BaseException):
    """The server's process killed here (the worker's thread ends; nothing after it is done)."""


@pytest.mark.parametrize("where", ["after its result", "before its cleanup", "after its cleanup"])
def test_a_kill_as_a_job_ends_loses_neither_its_result_nor_its_run(anim: Animator, media: dict[str, Path],
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    where: str) -> None:
    """A server killed once a job's result is written (before its record says so), or between its record and the
    removal of its uploads and checkpoint, or after it: a server started on the folder serves that result, done, and
    does not run it again; what the removal had not done yet is done then."""
    import megactor_rt.server as server_module

    jobs_dir = tmp_path / "jobs"
    killed = threading.Event()
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # (the worker's thread ends with _Killed)
    real_prune = server_module._prune

    def kill(*args: Any) -> None:
        if where == "after its cleanup":
            real_prune(*args)
        killed.set()
        raise _Killed

    with serving(anim, jobs_dir=jobs_dir) as srv:
        if where == "after its result":
            monkeypatch.setattr(srv, "_settle", kill)
        else:
            monkeypatch.setattr(server_module, "_prune", kill)
        job = post_job(srv, {**files(media), "format": "gif"})
        assert killed.wait(120)
        result = (jobs_dir / "jobs" / job / "result" / "me_talk.gif").read_bytes()
    monkeypatch.undo()
    with serving(anim, jobs_dir=jobs_dir) as srv:
        assert srv.restore() == (1, 0)
        doc = json.loads(request(srv, "GET", f"/jobs/{job}")[2])
        assert doc["status"] == "done", doc
        status, headers, served = request(srv, "GET", f"/jobs/{job}/result")
        assert status == 200 and served == result
        assert (headers.get("X-Megactor-Frames") == "6") == (where != "after its result")
    assert _records(jobs_dir) == {job: "done"}
    kept = sorted(str(p.relative_to(jobs_dir / "jobs" / job)) for p in (jobs_dir / "jobs" / job).rglob("*"))
    assert kept == [RECORD, "result", "result/me_talk.gif"]


def test_a_job_whose_record_cannot_be_written_is_refused(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk where a job's record is written: 503 naming it, nothing queued, its folder gone (answered 202,
    a server started again would not know it); another error there: 500."""
    import errno

    import megactor_rt.server as server_module

    jobs_dir = tmp_path / "jobs"
    real = server_module.write_atomic
    failure = [errno.ENOSPC]

    def write_atomic(path: Path, data: bytes) -> None:
        if path.name == RECORD and failure:
            raise OSError(failure[0], os.strerror(failure[0]))
        real(path, data)

    monkeypatch.setattr(server_module, "write_atomic", write_atomic)
    with serving(anim, jobs_dir=jobs_dir) as srv:
        body, ctype = form(files(media))
        status, headers, said = request(srv, "POST", "/jobs", body, ctype)
        assert status == 503 and headers["Retry-After"] == "10", said
        assert f"{jobs_dir}: the job's record cannot be written" in json.loads(said)["error"]
        assert "the disk is full: [Errno 28] No space left on device" in json.loads(said)["error"]
        failure[0] = errno.EIO
        status, _, said = request(srv, "POST", "/jobs", body, ctype)
        assert status == 500 and "OSError: [Errno 5]" in json.loads(said)["error"], said
        assert list((jobs_dir / "jobs").iterdir()) == []
        health = json.loads(request(srv, "GET", "/health")[2])
        assert (health["waiting"], health["running"], json.loads(request(srv, "GET", "/jobs")[2])["jobs"]) == (
            0, None, [])
        failure.clear()  # (room again: the places the refused took are free)
        job = post_job(srv, files(media))
        wait_for(srv, lambda d: d["status"] == "done", path=f"/jobs/{job}")
    assert _records(jobs_dir) == {job: "done"}


def test_restore_removes_only_what_the_server_makes_and_names_what_it_leaves(
        anim: Animator, media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """In the jobs folder, a server starting removes the folders it makes and no longer needs (a job's whose form was
    cut short: named as a job; a POST /animate's: named as its requests' are) and nothing else (an operator's files,
    named in the log); an entry it cannot read or remove is left there and named, and the server starts."""
    jobs_dir = tmp_path / "jobs"
    with serving(anim, jobs_dir=jobs_dir) as srv:
        job = post_job(srv, files(media))
        wait_for(srv, lambda d: d["status"] == "done", path=f"/jobs/{job}")
    jobs, requests = jobs_dir / "jobs", jobs_dir / "requests"
    requests.mkdir(exist_ok=True)
    (jobs / "mystuff").mkdir()
    (jobs / "mystuff" / "notes.txt").write_text("mine")
    (jobs / "readme.txt").write_text("mine")
    (jobs / "0123456789ab" / "portrait").mkdir(parents=True)  # (a form cut short)
    locked = jobs / "abcdef012345"  # (a folder this user may not read: chmod 000, the server not root)
    shutil.copytree(jobs / job, locked)
    (requests / "junkfile").write_text("mine")
    (requests / "mine").mkdir()
    (requests / "megactor-rt-serve-a1b2c3d4" / "driver").mkdir(parents=True)  # (a POST /animate cut short)
    stuck = requests / "megactor-rt-serve-stuck000"  # (one that cannot be removed)
    stuck.mkdir()

    def denied(real: Any) -> Any:
        def call(self: Path, *args: Any, **kw: Any) -> Any:
            if self.is_relative_to(locked) and self != locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kw)
        return call

    for name in ("is_file", "read_text", "stat", "open", "iterdir"):
        monkeypatch.setattr(Path, name, denied(getattr(Path, name)))
    real_rmtree = shutil.rmtree

    def rmtree(path: Any, ignore_errors: bool = False, **kw: Any) -> None:
        if Path(path) == stuck:
            if not ignore_errors:
                raise PermissionError(13, "Permission denied", str(stuck))
            return
        real_rmtree(path, ignore_errors, **kw)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with serving(anim, jobs_dir=jobs_dir) as srv, caplog.at_level(logging.INFO, "megactor_rt.server"):
        assert srv.restore() == (1, 0)
        assert request(srv, "GET", f"/jobs/{job}/result")[0] == 200
    assert sorted(p.name for p in jobs.iterdir()) == sorted([job, "abcdef012345", "mystuff", "readme.txt"])
    assert (jobs / "mystuff" / "notes.txt").read_text() == "mine" and (requests / "junkfile").read_text() == "mine"
    assert sorted(p.name for p in requests.iterdir()) == sorted(["junkfile", "mine", stuck.name])
    for other in (jobs / "mystuff", jobs / "readme.txt"):
        assert f"{other}: not a job folder this server makes; left there" in caplog.text
    for other in (requests / "junkfile", requests / "mine"):
        assert f"{other}: not a request folder this server makes; left there" in caplog.text
    assert f"{jobs / '0123456789ab'}: a job whose form was not received whole before the server stopped; removed" \
        in caplog.text
    assert f"{requests / 'megactor-rt-serve-a1b2c3d4'}: a request's folder left by the server's stop; removed" \
        in caplog.text
    assert f"{stuck}: a request's folder left by the server's stop; it cannot be removed (Permission denied" \
        in caplog.text and f"{stuck}: a request's folder left by the server's stop; removed" not in caplog.text
    assert f"{locked}: cannot be read (Permission denied); left there, not served" in caplog.text


def test_what_is_in_the_way_in_the_jobs_folder_is_named(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A file where the jobs folder keeps its jobs, drivers or requests: the server does not start, naming it; one
    put there while it runs: a POST is answered (500, named), not dropped; a kept driver that cannot be written
    there: the request reads its own upload."""
    import re

    for name in ("jobs", "drivers", "requests"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_text("in the way")
        with pytest.raises(InputError, match=re.escape(f"{folder / name}: the jobs folder (--jobs-dir) cannot be "
                                                       "written (a file is in the way")):
            AnimateServer(anim, ("127.0.0.1", 0), jobs_dir=folder)
    jobs_dir = tmp_path / "ok"
    with serving(anim, jobs_dir=jobs_dir) as srv:
        shutil.rmtree(jobs_dir / "requests", ignore_errors=True)
        (jobs_dir / "requests").write_text("in the way")
        status, _, said = animate(srv, files(media))
        assert status == 500 and "FileExistsError" in json.loads(said)["error"], said
    real = os.replace

    def replace(src: Any, dst: Any) -> None:  # (a kept driver's folder this user may not write)
        if Path(dst).is_relative_to(tmp_path / "other" / "drivers"):
            raise PermissionError(13, "Permission denied", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with serving(anim, jobs_dir=tmp_path / "other") as srv, caplog.at_level(logging.INFO, "megactor_rt.server"):
        job = post_job(srv, files(media))
        assert wait_for(srv, lambda d: d["status"] in ("done", "failed"), path=f"/jobs/{job}")["status"] == "done"
        assert animate(srv, files(media))[0] == 200
    assert "the driver cannot be kept there (Permission denied); the request reads its own upload" in caplog.text


def test_expired_jobs_go_without_being_asked_about(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A job kept past keep_s is removed (its folder, and from /health's count) by an idle server nobody asks about
    its jobs, and at once where /health or /metrics is asked."""
    import megactor_rt.server as server_module

    jobs_dir = tmp_path / "jobs"
    with serving(anim, jobs_dir=jobs_dir, keep_s=0.0) as srv:  # (/health alone asked)
        job = post_job(srv, files(media))
        health = wait_for(srv, lambda d: d["served"] == 1)
        assert health["jobs_kept"] == 0 and not (jobs_dir / "jobs" / job).exists()
        assert "megactor_jobs_kept 0" in request(srv, "GET", "/metrics")[2].decode()
    monkeypatch.setattr(server_module, "_EXPIRE_POLL_S", 0.05)
    with serving(anim, jobs_dir=jobs_dir, keep_s=0.0) as srv:  # (nothing asked)
        job = post_job(srv, files(media))
        for _ in range(400):
            if not (jobs_dir / "jobs" / job).exists():
                break
            threading.Event().wait(0.05)
        assert not (jobs_dir / "jobs" / job).exists() and srv.served == 1
    with serving(anim, jobs_dir=jobs_dir) as srv:
        job = post_job(srv, files(media))
        wait_for(srv, lambda d: d["status"] == "done", path=f"/jobs/{job}")
    with serving(anim, jobs_dir=jobs_dir, keep_s=1.0) as srv:  # (a server that only took up jobs kept before)
        srv.restore()
        for _ in range(400):
            if not (jobs_dir / "jobs" / job).exists():
                break
            threading.Event().wait(0.05)
        assert not (jobs_dir / "jobs" / job).exists()


def test_expired_jobs_go_while_a_long_run_is_under_way(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "results past --keep-min go within 30 s whether or not anyone asks" held only while the server
    was idle: a job's result expired during a run of hours that nobody asked about stayed until that run ended."""
    import megactor_rt.server as server_module

    monkeypatch.setattr(server_module, "_EXPIRE_POLL_S", 0.05)
    jobs_dir = tmp_path / "jobs"
    with serving(anim, jobs_dir=jobs_dir, keep_s=2.0) as srv:
        first = post_job(srv, files(media))
        wait_for(srv, lambda d: d["status"] == "done", path=f"/jobs/{first}")
        real = srv.anim.animate_to_file
        gone: list[bool] = []

        def long_run(*args: Any, **kw: Any) -> Any:  # (its progress reports, a window after another; no request)
            end = time.monotonic() + 10
            while (jobs_dir / "jobs" / first).exists() and time.monotonic() < end:
                kw["on_progress"](SimpleNamespace(stage="denoise", done=0, total=1, unit="window"))
                time.sleep(0.05)
            gone.append(not (jobs_dir / "jobs" / first).exists())
            return real(*args, **kw)

        monkeypatch.setattr(srv.anim, "animate_to_file", long_run)
        post_job(srv, files(media))
        for _ in range(400):  # (nothing asked meanwhile: GET /jobs/ID would remove it)
            if gone:
                break
            time.sleep(0.05)
    assert gone == [True]


def test_a_checkpoint_that_cannot_be_written_does_not_end_the_run(anim: Animator, media: dict[str, Path],
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A full disk where a job's checkpoint is saved: said once, and the run goes on (done), saving no more."""
    import errno

    import megactor_rt.runtime.checkpoint as checkpoint_module

    tries: list[Path] = []

    def full(path: Path, data: bytes) -> None:
        tries.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "write_atomic", full)
    with serving(anim, jobs_dir=tmp_path / "jobs") as srv, caplog.at_level(logging.INFO):
        job = post_job(srv, files(media))
        doc = wait_for(srv, lambda d: d["status"] in ("done", "failed"), path=f"/jobs/{job}")
        assert doc["status"] == "done", doc
    assert len(tries) == 1 and tries[0].parent == tmp_path / "jobs" / "jobs" / job / "checkpoint"
    assert caplog.text.count("cannot be written (No space left on device); the run goes on without saving") == 1


def test_a_kept_driver_lost_while_no_server_ran_fails_its_job_naming_it(anim: Animator, media: dict[str, Path],
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver the server kept for a job, deleted from the jobs folder while no server ran: the job fails naming
    the server's file (a 500: not the client's upload to blame)."""
    jobs_dir = tmp_path / "jobs"
    with serving(anim, jobs_dir=jobs_dir) as srv:
        started = _hold_until_stopped(srv, monkeypatch)
        job = post_job(srv, files(media))
        assert started.wait(60)
    monkeypatch.undo()
    assert _records(jobs_dir) == {job: "running"}
    [kept] = (jobs_dir / "drivers").glob("*/talk.mp4")
    kept.unlink()
    with serving(anim, jobs_dir=jobs_dir) as srv:
        assert srv.restore() == (1, 0)
        doc = json.loads(request(srv, "GET", f"/jobs/{job}")[2])
        assert doc["status"] == "failed" and doc["error"].startswith(
            f"{kept}: this job's file, kept by the server, is gone (deleted from the jobs folder"), doc
        assert request(srv, "GET", f"/jobs/{job}/result")[0] == 500
    assert _records(jobs_dir) == {job: "failed"}


def test_a_runs_seconds_are_the_same_in_the_log_and_its_job(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The log's "N frames in S s" is GET /jobs/ID's seconds (from the run's start to its last frame), not the time
    until the result's file was finished too (its sound muxed, say: here made to take a second more)."""
    real = anim.animate_to_file

    def slow_to_finish(*args: Any, **kw: Any) -> Any:
        stats = real(*args, **kw)
        threading.Event().wait(1.0)
        return stats

    with serving(anim, jobs_dir=tmp_path / "jobs") as srv, caplog.at_level(logging.INFO, "megactor_rt.server"):
        monkeypatch.setattr(srv.anim, "animate_to_file", slow_to_finish)
        job = post_job(srv, files(media))
        doc = wait_for(srv, lambda d: d["status"] == "done", path=f"/jobs/{job}")
    assert f"run {job}: me_talk.mp4, 6 frames in {doc['seconds']:.1f} s\n" in caplog.text


def test_a_job_whose_end_cannot_be_recorded_keeps_its_files(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The record of a run's end cannot be written (a full disk): its uploads stay, so a server started on the
    folder runs it again and says its own error (was: the uploads removed, the record still "running", and the
    next server failed it as "this job's file, kept by the server, is gone")."""
    import errno

    import megactor_rt.server as server_module

    jobs_dir = tmp_path / "jobs"
    real = server_module.write_atomic

    def full(path: Path, data: bytes) -> None:
        if path.name == RECORD and b'"status": "failed"' in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    with serving(anim, jobs_dir=jobs_dir) as srv:
        monkeypatch.setattr(server_module, "write_atomic", full)
        job = post_job(srv, {**files(media), "portrait": ("me.png", b"not an image")})
        wait_for(srv, lambda d: d["status"] == "failed", path=f"/jobs/{job}")
        assert _records(jobs_dir) == {job: "running"} and (jobs_dir / "jobs" / job / "portrait").exists()
    monkeypatch.undo()
    with serving(anim, jobs_dir=jobs_dir) as srv:
        srv.restore()
        error = wait_for(srv, lambda d: d["status"] == "failed", path=f"/jobs/{job}")["error"]
    assert "is gone" not in error and "me.png" in error, error


def test_a_job_ended_by_a_restore_posts_its_callback(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A server killed after a job's result was written, before its record said so (and before its callback was
    posted): the server that takes it up as done posts the callback (where it allows callbacks)."""
    jobs_dir = tmp_path / "jobs"
    with serving(anim, jobs_dir=jobs_dir, allow_callbacks=True) as srv:
        monkeypatch.setattr(srv, "_call_back", lambda url, state: None)
        job = post_job(srv, {**files(media), "callback": "http://127.0.0.1:9/hook"})
        wait_for(srv, lambda d: d["status"] == "done", path=f"/jobs/{job}")
    record = jobs_dir / "jobs" / job / RECORD
    doc = json.loads(record.read_text())
    record.write_text(json.dumps({**doc, "status": "running", "finished": None, "outcome": None}))
    for allowed in (False, True):
        posted: list[tuple[str, dict]] = []
        done = threading.Event()
        with serving(anim, jobs_dir=jobs_dir, allow_callbacks=allowed) as srv:
            monkeypatch.setattr(srv, "_call_back", lambda url, state, posted=posted, done=done: (
                posted.append((url, state)), done.set()))
            if allowed:
                record.write_text(json.dumps({**doc, "status": "running", "finished": None, "outcome": None}))
            srv.restore()
            assert done.wait(10 if allowed else 0.5) is allowed
        assert [(u, s["status"]) for u, s in posted] == ([("http://127.0.0.1:9/hook", "done")] if allowed else [])
