"""What the tests of ``megactor-rt serve`` and its client share: the tiny model on the CPU, a driver with faces and
sound, a server around them on a free port (its temporary folder watched), and requests to it."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from media_fixtures import PORTRAIT, write_face_driver

from megactor_rt.config import AnimateConfig
from megactor_rt.runtime.animator import Animator
from megactor_rt.server import AnimateServer

CFG = AnimateConfig(steps=2, window=4, overlap=2)
Field = str | tuple[str, bytes]  # a text field, or a file (its name, its bytes)


def form(fields: dict[str, Field] | list[tuple[str, Field]], boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body (as curl -F sends one) and its Content-Type."""
    boundary = boundary or uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in (fields.items() if isinstance(fields, dict) else fields):
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n'
                      "Content-Type: application/octet-stream\r\n\r\n".encode())
            out.write(value[1])
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def anim() -> Animator:
    return Animator.demo(seed=0, device="cpu", config=CFG)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_media")
    return {"driver": write_face_driver(root / "talk.mp4", n=6, audio=True), "portrait": PORTRAIT}


@pytest.fixture()
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary folder the server's requests use (to see that nothing stays in it)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@contextlib.contextmanager
def serving(anim: Animator, **options: Any) -> Iterator[AnimateServer]:
    """An :class:`AnimateServer` of ``anim`` (``options``: its keyword arguments) on a free port, answering on a
    thread of its own until the block ends."""
    srv = AnimateServer(anim, ("127.0.0.1", 0), **options)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture()
def served(anim: Animator, scratch: Path) -> Iterator[AnimateServer]:
    with serving(anim) as srv:
        yield srv


DRIVERS = "megactor-rt-serve-drivers-"  # the server's drivers kept for the next requests (keep_driver)


def left(scratch: Path) -> list[Path]:
    """What the server's requests left in the temporary folder (its kept drivers aside: they stay until it stops)."""
    return [p for p in scratch.iterdir() if not p.name.startswith(DRIVERS)]


@contextlib.contextmanager
def folder_served(folder: Path) -> Iterator[str]:
    """A quiet local HTTP server of ``folder``'s files while in the block: its address (``http://127.0.0.1:PORT``)."""
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def request(srv: AnimateServer, method: str, path: str, body: bytes | None = None, ctype: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=120)
    try:
        conn.request(method, path, body, {**({"Content-Type": ctype} if ctype else {}), **(headers or {})})
        answer = conn.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        conn.close()


def animate(srv: AnimateServer, fields: dict[str, Field]) -> tuple[int, dict[str, str], bytes]:
    body, ctype = form(fields)
    return request(srv, "POST", "/animate", body, ctype)


def files(media: dict[str, Path]) -> dict[str, Field]:
    return {"portrait": ("me.png", media["portrait"].read_bytes()),
            "driver": ("talk.mp4", media["driver"].read_bytes())}


def wait_for(srv: AnimateServer, test: object, seconds: float = 60, path: str = "/health") -> dict:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        doc = json.loads(request(srv, "GET", path)[2])
        if test(doc):  # type: ignore[operator]
            return doc
        time.sleep(0.05)
    raise AssertionError(f"GET {path} never showed it: {doc}")


def hold_runs(srv: AnimateServer, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make the server's runs wait, once started, until the event returned is set."""
    go = threading.Event()
    real = srv.anim.animate_to_file

    def held(*args: object, **kw: object) -> object:
        go.wait(60)
        return real(*args, **kw)

    monkeypatch.setattr(srv.anim, "animate_to_file", held)
    return go


def post_job(srv: AnimateServer, fields: dict[str, Field]) -> str:
    body, ctype = form(fields)
    status, headers, answer = request(srv, "POST", "/jobs", body, ctype)
    doc = json.loads(answer)
    assert status == 202 and headers["Location"] == f"/jobs/{doc['id']}", answer
    assert doc["status"] == "queued" and doc["result_name"] == "me_talk." + str(fields.get("format", "mp4"))
    return str(doc["id"])


def animate_through_a_restart(media: dict[str, Path], out: Path, serve_args: list[str],
                              env: dict[str, str] | None = None) -> dict[str, str]:
    """``animate --server``'s client making ``out`` (a GIF) on a ``serve --demo`` process (``serve_args`` added)
    that is killed (SIGKILL) once the client sees its job run, and started again on the same port a moment later;
    returns the result's headers. The caller sets the client's poll interval and reads its log."""
    from megactor_rt.client import Client

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "megactor_rt.cli", "serve", "--demo", "--port", str(port),
                                 "--steps", "2", "--window", "4", "--overlap", "2", "--no-warmup", *serve_args],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert "listening on" in proc.stdout.readline()  # type: ignore[union-attr]
        return proc

    servers = [start()]
    seen: list[str] = []

    def restart_when_running(progress: object) -> None:  # (the client's progress: the run is under way)
        if not seen:
            seen.append("running")
            servers[0].kill()
            servers[0].wait(30)
            threading.Thread(target=lambda: servers.append(start()), daemon=True).start()  # (seconds: an outage)

    try:
        head = Client(f"http://127.0.0.1:{port}").animate(media["portrait"], media["driver"], out,
                                                          fields={"format": "gif"}, on_progress=restart_when_running)
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(30)
    assert len(servers) == 2
    return head
