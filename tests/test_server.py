"""``megactor-rt serve`` (:mod:`megactor_rt.server`): the form reader, and the server around the tiny random model on
the CPU: results equal to the Python API's, prepared portraits reused, every refusal answered with its status and
named, one run at a time, nothing left in the temporary folder."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from media_fixtures import DRIVER, PORTRAIT, decode_all
from PIL import Image
from serve_fixtures import (
    DRIVERS,
    Field,
    anim,
    animate,
    files,
    folder_served,
    form,
    hold_runs,
    left,
    media,
    post_job,
    request,
    scratch,
    served,
    serving,
    wait_for,
)

import megactor_rt.server as server_module
from megactor_rt import cli
from megactor_rt.cli import main
from megactor_rt.config import AnimateConfig
from megactor_rt.errors import InputError
from megactor_rt.runtime.animator import Animator
from megactor_rt.server import AnimateServer, FormError, byte_range, read_form

__all__ = ["anim", "media", "scratch", "served"]  # (fixtures, from serve_fixtures)


# --------------------------------------------------------------------------------------------------- the form


def _read(body: bytes, content_type: str, folder: Path, **kw: object) -> tuple[dict[str, str], dict[str, Path]]:
    return read_form(io.BytesIO(body), len(body), content_type, folder, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20], ids=["bytewise", "7-byte-chunks", "whole"])
def test_a_form_is_read_in_chunks_of_any_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Files go to disk under their field and (made safe) name, texts are kept; a file whose bytes hold the
    boundary's beginning, line breaks and dashes is copied byte for byte, whatever the read size; a preamble and an
    epilogue are skipped; a file input left empty (a browser's: no file name; or empty text) counts as not given,
    and a file field given as text is among the texts (an address, for the server to take or refuse)."""
    monkeypatch.setattr(server_module, "_CHUNK", chunk)
    boundary = "XyZ"
    # (a form's data never holds its delimiter, CRLF "--" boundary, but may hold any beginning of it)
    tricky = b"--XyZ is not at a line start\r\n--Xy\r\n-\r\n--X" + bytes(range(256)) + b"\r\n\r\n--X"
    body, ctype = form([("portrait", ("../../etc/me.png", tricky)), ("start", "1.5"), ("mask", ""),
                        ("audio", ("", b"")), ("driver", ("C:\\clips\\talk.mp4", b"\x00\x01"))], boundary)
    body = b"preamble to skip\r\n" + body + b"epilogue"
    text, files = _read(body, ctype, tmp_path)
    assert text == {"start": "1.5"}
    assert _read(*form({"mask": "https://x/m.png"}), tmp_path / "t")[0] == {"mask": "https://x/m.png"}
    assert files == {"portrait": tmp_path / "portrait" / "me.png", "driver": tmp_path / "driver" / "talk.mp4"}
    assert files["portrait"].read_bytes() == tricky and files["driver"].read_bytes() == b"\x00\x01"


def test_a_file_name_a_browser_escaped_is_read_as_the_users(tmp_path: Path) -> None:
    """Browsers (and curl) send a file name's '"', CR and LF as %22, %0D and %0A (WHATWG's multipart/form-data
    encoding): the upload, and so the result's name, keep the user's '"' (it was '%22'), a line break made safe."""
    body, ctype = form([("portrait", ("my %22best%22 caf\u00e9.png", b"x")), ("driver", ("a%0Ab.mp4", b"y"))])
    files = _read(body, ctype, tmp_path)[1]
    assert files["portrait"].name == 'my "best" caf\u00e9.png' and files["driver"].name == "a_b.mp4"


@pytest.mark.parametrize(("body", "ctype", "status", "message"), [
    (b"x", "application/json", 415, "the request is application/json; POST /animate takes multipart/form-data"),
    (b"x", "multipart/form-data", 400, "no valid boundary"),
    (form({"speed": "2"}, "b")[0], "multipart/form-data; boundary=b", 400, "unknown field 'speed'; the fields are"),
    (form([("seed", "1"), ("seed", "2")], "b")[0], "multipart/form-data; boundary=b", 400, "'seed' is given twice"),
    (form({"format": "\xe9"}, "b")[0].replace("\xe9".encode(), b"\xe9"), "multipart/form-data; boundary=b", 400,
     "'format' is not UTF-8 text"),
    (form({"format": "x" * 70000}, "b")[0], "multipart/form-data; boundary=b", 400, "'format' is over 64 KiB"),
    (form({"format": "mp4"}, "b")[0][:-9], "multipart/form-data; boundary=b", 400,
     "the form ends before its closing boundary"),
    (b"--b\r\n" + b"X-Pad: y\r\n" * 2000, "multipart/form-data; boundary=b", 400, "headers over 16 KiB"),
    (b"--b\r\n" + b"X-Pad: y\r\n" * 2000 + b"\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b", 400,
     "headers over 16 KiB"),  # (all of them in the first read: were taken)
    (b"--b\r\n\r\nno headers\r\n--b--\r\n", "multipart/form-data; boundary=b", 400, "no field name"),
], ids=["not-multipart", "no-boundary", "unknown-field", "twice", "not-utf8",
        "text-too-long", "cut-short", "huge-headers", "huge-headers-at-once", "no-name"])
def test_a_bad_form_is_refused_with_its_reason(tmp_path: Path, body: bytes, ctype: str, status: int,
                                               message: str) -> None:
    with pytest.raises(FormError, match=message) as caught:
        _read(body, ctype, tmp_path)
    assert caught.value.status == status


def test_any_body_is_read_or_refused_with_a_form_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fuzzed: 600 bodies stitched from pieces of forms (delimiters, headers of every kind, RFC 2231 names, bytes
    that are no UTF-8) and then damaged at random, read in chunks of random size: each is read, or refused with a
    FormError (an answer), never another exception (no answer at all)."""
    import random

    rng = random.Random(0)
    pieces = [b"--b\r\n", b'Content-Disposition: form-data; name="portrait"; filename="a.png"\r\n', b"\r\n", b"DATA",
              b'Content-Disposition: form-data; name="format"\r\n\r\nmp4\r\n', b"--b--\r\n", b"\r\n--b", b"\xff\xfe",
              b"Content-Disposition: form-data; name*=UTF-8''%C3%A9\r\n", b"=?utf-8?b?w6k=?=", b"--b--",
              b'Content-Disposition: form-data; name="driver"; filename="../x"\r\n', b"Content-Type: text/plain\r\n"]
    taken = refused = 0
    for i in range(600):
        body = bytearray(b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))))
        for _ in range(rng.randint(0, 3)):
            if body:
                body[rng.randrange(len(body))] = rng.randrange(256)
        monkeypatch.setattr(server_module, "_CHUNK", rng.choice([1, 3, 7, 64, 1 << 20]))
        folder = tmp_path / str(i)
        folder.mkdir()
        try:
            _read(bytes(body), "multipart/form-data; boundary=b", folder)
            taken += 1
        except FormError:
            refused += 1
    assert taken > 30 and refused > 300  # (both kinds came up)


def test_a_body_shorter_than_announced_is_named(tmp_path: Path) -> None:
    """A client that stops sending (its connection closed) mid-form."""
    body, ctype = form({"format": "mp4"})
    with pytest.raises(FormError, match="the form ends 30 bytes before its announced length"):
        read_form(io.BytesIO(body[:-30]), len(body), ctype, tmp_path)  # type: ignore[arg-type]


def test_a_form_that_trickles_in_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client sending a byte now and then held its place among the waiting requests for as long as it liked: a
    form slower than the least rate once the grace has passed is refused (408); one that comes at once is read."""
    monkeypatch.setattr(server_module, "UPLOAD_GRACE_S", 0.1)
    body, ctype = form({"format": "mp4", "seed": "3"})

    class Trickle(io.BytesIO):
        def read1(self, size: int = -1, /) -> bytes:
            time.sleep(0.02)
            return super().read1(1)

    with pytest.raises(FormError, match="the form comes too slowly") as err:
        read_form(Trickle(body), len(body), ctype, tmp_path)  # type: ignore[arg-type]
    assert err.value.status == 408
    assert read_form(io.BytesIO(body), len(body), ctype, tmp_path / "b")[0] == {  # type: ignore[arg-type]
        "format": "mp4", "seed": "3"}


def test_a_form_that_stops_coming_is_refused_408(anim: Animator, scratch: Path) -> None:
    """A client whose upload stalls (nothing for the connection's timeout) comes slower than the least rate: 408, as
    the README says of a form that comes too slowly (was 400 "the form could not be read (TimeoutError: ...)", the
    request's fault, not to be sent again)."""
    import socket

    with serving(anim, timeout_s=1) as srv, socket.create_connection(("127.0.0.1", srv.server_address[1]),
                                                                     timeout=30) as conn:
        conn.sendall(b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\nContent-Type: multipart/"
                     b'form-data; boundary=b\r\n\r\n--b\r\nContent-Disposition: form-data; name="seed"\r\n\r\n1')
        answer = b""
        while chunk := conn.recv(65536):  # (the whole answer: the server closes the connection after it)
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"the form stopped coming (53 of 100000 bytes, then nothing for 1 s)" in answer, answer
    assert left(scratch) == []


# ------------------------------------------------------------------------------------------------- the server


def test_a_result_is_the_python_apis_and_a_second_portrait_is_kept(served: AnimateServer, anim: Animator,
                                                                  media: dict[str, Path], tmp_path: Path,
                                                                  scratch: Path) -> None:
    """The answer is the result video, with the frames Animator.animate_to_file writes for the same inputs; the
    second request with the portrait finds it prepared; a request's seed, start and format are its own; the
    temporary folder is empty after each answer."""
    status, headers, body = animate(served, files(media))
    assert status == 200, body
    assert headers["Content-Type"] == "video/mp4" and int(headers["Content-Length"]) == len(body)
    assert headers["Content-Disposition"] == "attachment; filename=\"me_talk.mp4\"; filename*=UTF-8''me_talk.mp4"
    assert headers["X-Megactor-Frames"] == "6" and float(headers["X-Megactor-Seconds"]) > 0
    got = tmp_path / "served.mp4"
    got.write_bytes(body)
    (tmp_path / "me.png").write_bytes(media["portrait"].read_bytes())
    want = tmp_path / "direct.mp4"
    anim.animate_to_file(tmp_path / "me.png", media["driver"], want)
    frames = decode_all(got)
    assert len(frames) == 6 and all(np.array_equal(a, b) for a, b in zip(frames, decode_all(want), strict=True))
    assert left(scratch) == []

    status, headers, body = animate(served, {**files(media), "start": "0.08", "format": "webm"})
    assert status == 200, body
    assert headers["Content-Type"] == "video/webm" and headers["X-Megactor-Portrait-Cached"] == "true"
    assert headers["X-Megactor-Frames"] == "4"  # (6 frames at 25 fps from 0.08 s)
    status, headers, body = animate(served, {**files(media), "seed": "7"})
    assert status == 200 and headers["X-Megactor-Portrait-Cached"] == "false"  # (the seed is the portrait's too)
    other = tmp_path / "other.mp4"
    other.write_bytes(body)
    assert not np.array_equal(decode_all(other)[0], frames[0])  # (another seed: other noise)
    health = json.loads(request(served, "GET", "/health")[2])
    assert (health["served"], health["failed"], health["running"], health["config"]["steps"]) == (3, 0, None, 2)
    assert left(scratch) == []


def test_a_driver_sent_again_has_its_faces_found_once(served: AnimateServer, media: dict[str, Path],
                                                       scratch: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The same driver (bytes and name) with portrait after portrait: the server keeps it, and the Animator's plan
    of it (every frame's face) serves the later requests; another name is another driver; the oldest kept driver
    no request reads goes beyond KEPT_DRIVERS; the frames are those of a first request."""
    monkeypatch.setattr(server_module, "KEPT_DRIVERS", 2)
    cached = []
    bodies = []
    for name, seed in (("talk.mp4", "1"), ("talk.mp4", "1"), ("again.mp4", "1"), ("third.mp4", "1")):
        status, headers, body = animate(served, {**files(media), "driver": (name, media["driver"].read_bytes()),
                                                 "seed": seed})
        assert status == 200, body
        cached.append(headers["X-Megactor-Driver-Cached"])
        bodies.append(body)
    assert cached == ["false", "true", "false", "false"]
    for i in (0, 1):
        (tmp_path / f"{i}.mp4").write_bytes(bodies[i])
    assert all(np.array_equal(a, b) for a, b in zip(decode_all(tmp_path / "0.mp4"), decode_all(tmp_path / "1.mp4"),
                                                    strict=True))
    (store,) = [p for p in scratch.iterdir() if p.name.startswith(DRIVERS)]
    assert sorted(p.name for p in store.rglob("*.mp4")) == ["again.mp4", "third.mp4"]  # (talk.mp4 went first)
    monkeypatch.setattr(server_module, "KEPT_DRIVER_BYTES", media["driver"].stat().st_size)  # (room for one)
    assert animate(served, {**files(media), "driver": ("fourth.mp4", media["driver"].read_bytes())})[0] == 200
    assert sorted(p.name for p in store.rglob("*.mp4")) == ["fourth.mp4"]  # (the newest kept, even alone too big)
    real_stat = Path.stat

    def unreadable(path: Path, **kw: Any) -> os.stat_result:  # (its folder made unreadable by someone else)
        if path.name == "fourth.mp4" and path.parent.parent == store:
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, **kw)

    monkeypatch.setattr(Path, "stat", unreadable)  # (a kept driver whose size cannot be read: was a 500)
    assert animate(served, {**files(media), "driver": ("fifth.mp4", media["driver"].read_bytes())})[0] == 200
    monkeypatch.setattr(Path, "stat", real_stat)
    assert left(scratch) == []


def test_with_allow_urls_a_file_field_may_be_an_address(served: AnimateServer, media: dict[str, Path],
                                                        tmp_path: Path, scratch: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """serve --allow-urls: the driver as an http(s) address, downloaded by the server (under the address's name)
    into the request's folder; an address the server cannot get, or a file over the upload limit, is a 400 naming
    it."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    site = tmp_path / "site"
    site.mkdir()
    (site / "clip.mp4").write_bytes(media["driver"].read_bytes())
    with folder_served(site) as base:
        served.allow_urls = True
        status, headers, body = animate(served, {"portrait": files(media)["portrait"], "driver": f"{base}/clip.mp4"})
        assert status == 200 and headers["Content-Disposition"].startswith('attachment; filename="me_clip.mp4"'), body
        status, _, body = animate(served, {"portrait": files(media)["portrait"], "driver": f"{base}/gone.mp4"})
        assert status == 400 and json.loads(body)["error"] == f"{base}/gone.mp4: the server answered 404 File not found"
        (site / "me.png").write_bytes(media["portrait"].read_bytes())
        served.max_upload_bytes = 100_000  # (downloads are held to the upload limit too)
        status, _, body = animate(served, {"portrait": f"{base}/me.png", "driver": f"{base}/clip.mp4"})
        size = media["portrait"].stat().st_size
        assert status == 400 and json.loads(body)["error"] == (f"{base}/me.png: {size} bytes, larger than the limit of "
                                                               "100000 bytes"), body
    assert left(scratch) == []


def test_a_request_sets_its_own_speed(served: AnimateServer, media: dict[str, Path], tmp_path: Path) -> None:
    """A preview (1 step, no overlap, CFG in no step, 12.5 fps) from the model the server keeps: the result records
    those settings, and the server's own stay as they were for the next request."""
    status, _, body = animate(served, {**files(media), "steps": "1", "overlap": "0", "cfg_steps": "0", "fps": "12.5",
                                       "guidance": "3"})
    assert status == 200, body
    (tmp_path / "preview.mp4").write_bytes(body)
    from megactor_rt.media import result_settings

    made = result_settings(tmp_path / "preview.mp4")
    assert made is not None
    assert {k: made["config"][k] for k in ("steps", "overlap", "cfg_steps", "fps", "guidance")} == {
        "steps": 1, "overlap": 0, "cfg_steps": 0, "fps": 12.5, "guidance": 3.0}
    assert len(decode_all(tmp_path / "preview.mp4")) == 3  # (6 frames at 25 fps brought down to 12.5)
    assert json.loads(request(served, "GET", "/health")[2])["config"]["steps"] == 2


@pytest.mark.parametrize(("fields", "status", "message"), [
    ({"driver": None}, 400, r"no driver file in the form \(curl -F portrait=@me.png"),
    ({"format": "png"}, 400, "format 'png' is not one the server writes: gif, m4v, mkv, mov, mp4, webm, webp"),
    ({"seed": "x"}, 400, "^request: seed must be a whole number, got 'x'$"),
    ({"portrait_face": "0"}, 400, "request: portrait_face must be a face number from 1"),
    ({"audio": "loud"}, 400, r"^field 'audio' takes a file \(curl -F audio=@FILE\) or the text 'none'$"),
    ({"portrait": "me.png"}, 400, r"^field 'portrait' takes a file \(curl -F portrait=@FILE\)$"),
    ({"driver": "https://example.com/a.mp4"}, 400,
     r"^field 'driver' takes a file \(curl -F driver=@FILE\); this server downloads no addresses \(serve "
     r"--allow-urls\)$"),
    ({"crf": "high"}, 400, "field 'crf' takes a whole number"),
    ({"paste_back": "maybe"}, 400, "field 'paste_back' takes true or false"),
    ({"side_by_side": "yes", "paste_back": "1"}, 400, "side_by_side"),
    ({"portrait": ("me.png", b"not an image")}, 400, "^portrait/me.png: "),
    ({"driver": ("still.png", PORTRAIT.read_bytes())}, 400, "^driver/still.png: a still image, not a driving video"),
    ({"duration": "0"}, 400, "duration must be a finite number > 0"),
    ({"steps": "many"}, 400, "^request: steps must be a whole number, got 'many'$"),
    ({"overlap": "4"}, 400, "^request: window must be >= 1 and overlap from 0 to window - 1, got window 4, overlap 4$"),
    ({"steps": "5000"}, 400, "steps must be at most"),
], ids=["no-driver", "png", "seed", "face", "audio-text", "portrait-text", "address-refused", "crf", "flag",
        "two-layouts", "bad-image", "still-driver", "duration",
        "steps-word", "overlap", "steps-past-schedule"])
def test_a_bad_request_is_answered_400_with_its_reason(served: AnimateServer, media: dict[str, Path],
                                                       scratch: Path, fields: dict[str, Field | None], status: int,
                                                       message: str) -> None:
    """Named as the command line names it (the request's files by field and name, not the server's folders); no
    result is made and nothing stays in the temporary folder. ``fields`` change the good form (None: left out)."""
    sent = {k: v for k, v in {**files(media), **fields}.items() if v is not None}
    got, headers, body = animate(served, sent)
    assert (got, headers["Content-Type"]) == (status, "application/json")
    assert re.search(message, json.loads(body)["error"]), body
    assert left(scratch) == []
    assert json.loads(request(served, "GET", "/health")[2])["running"] is None


class _Inputs(HTMLParser):
    """The form fields of a page: name -> the types of its inputs (select: "select"), and the select's options."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, set[str]] = {}
        self.options: list[str] = []
        self._option = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag in ("input", "select") and found.get("name"):
            self.fields.setdefault(str(found["name"]), set()).add(str(found.get("type") or tag))
        self._option = tag == "option"

    def handle_data(self, data: str) -> None:
        if self._option:
            self.options.append(data.strip())
            self._option = False


def test_the_page_for_a_browser_offers_every_field_and_its_form_is_taken(served: AnimateServer,
                                                                        media: dict[str, Path]) -> None:
    """GET / is a form whose fields are exactly those the server takes (files as file inputs, the formats it
    writes); a form posted as a browser posts it (empty file inputs with no name, empty texts, a ticked box as
    "true") is taken."""
    status, headers, body = request(served, "GET", "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    page = _Inputs()
    page.feed(body.decode())
    assert set(page.fields) == set(server_module.FILE_FIELDS) | set(server_module.TEXT_FIELDS)
    assert all(page.fields[f] >= {"file"} for f in server_module.FILE_FIELDS)
    assert page.fields["audio"] == {"file", "checkbox"} and sorted(page.options) == list(server_module.FORMATS)
    browser = [*files(media).items(), ("mask", ("", b"")), ("format", "gif"), ("start", ""), ("duration", ""),
               ("seed", ""), ("crf", ""), ("side_by_side", "true"), ("portrait_face", ""), ("driver_face", ""),
               ("audio", ("", b"")), ("audio_start", "")]
    body, ctype = form(browser)
    status, headers, answer = request(served, "POST", "/animate", body, ctype)
    assert status == 200 and headers["Content-Type"] == "image/gif", answer
    assert Image.open(io.BytesIO(answer)).size == (3 * 128, 128)  # (side by side: three panels)


@pytest.mark.parametrize("token", [None, "page-token-0123456789abcdef"], ids=["open", "token"])
def test_the_page_shows_the_model_and_a_result_in_a_browser_like_dom(served: AnimateServer, media: dict[str, Path],
                                                                     token: str | None) -> None:
    """The page's script run by jsdom in node (tests/js/serve_page_check.mjs): it names the model (and warns of the
    demo's), posts the form as a job, shows its progress, then the result with a link to save it under its name.
    From a server that asks for a token, it shows the refusal and a field for the token, and once it is entered,
    works as above."""
    import shutil

    jsdom = os.environ.get("MEGACTOR_JSDOM")
    node = shutil.which("node")
    if not jsdom or node is None or not (Path(jsdom) / "node_modules" / "jsdom").is_dir():
        pytest.skip("needs node and jsdom: npm install jsdom@24 in a folder, and MEGACTOR_JSDOM set to that folder")
    served.token = None if token is None else token.encode()
    done = subprocess.run([node, str(Path(__file__).parent / "js" / "serve_page_check.mjs"), served.url,
                           str(media["portrait"]), str(media["driver"]), *([token] if token else [])],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout.strip().splitlines()[-1])
    if token is None:
        assert shown["asked"] is None
    else:
        assert not shown["asked"]["login_hidden"], shown
        assert shown["asked"]["status"].startswith("401: this server needs its token"), shown
    assert shown["model"].startswith("The model: tiny-random-0, torch on CPU") and not shown["warning_hidden"]
    assert re.fullmatch(r"5 frames in [0-9.]+ s( \(the portrait was prepared already\))?", shown["status"]), shown
    assert shown["status_class"] == "" and shown["seen"][:2] == ["Sending ...", "Starting ..."], shown
    running = r"Running: (driver|denoise|decode|write) \d+ of \d+ \w+\(s\) ..."
    assert any(re.fullmatch(running, s) for s in shown["seen"]), shown
    assert shown["result"] == ('<img src="blob:x"><a href="blob:x" download="portrait_talk.gif">'
                               'Save portrait_talk.gif</a>')


@pytest.mark.parametrize("scenario", ["outage", "name", "too_big", "down", "no_sound", "cancel", "refused"])
def test_the_page_rides_out_an_outage_saves_a_utf8_name_and_refuses_files_over_the_limit(
        served: AnimateServer, media: dict[str, Path], tmp_path: Path, scenario: str) -> None:
    """The page in jsdom (tests/js/serve_page_scenarios.mjs): a job whose server does not answer for a while (a
    restart on its --jobs-dir, a proxy's 502) is asked about again and its result shown, not given up at the first
    failure (the job went on, its result lost to the page); a portrait named in UTF-8 gives a save link of that name,
    not the header's ASCII stand-in; files over the server's --max-upload-mb are refused before they are sent; a
    server that does not answer the page's first question is said to be down; "no sound" ticked after a sound file
    was chosen sends the form without the file (it was refused: field 'audio' given twice), and its size does not count
    against the limit (a long recording then ticked off was refused as over --max-upload-mb); Cancel clicked while the
    job runs ends it and says so; a form the server refuses shows its 400."""
    jsdom = os.environ.get("MEGACTOR_JSDOM")
    node = shutil.which("node")
    if not jsdom or node is None or not (Path(jsdom) / "node_modules" / "jsdom").is_dir():
        pytest.skip("needs node and jsdom: npm install jsdom@24 in a folder, and MEGACTOR_JSDOM set to that folder")
    portrait = tmp_path / "портрет café.png"
    shutil.copyfile(media["portrait"], portrait)
    done = subprocess.run([node, str(Path(__file__).parent / "js" / "serve_page_scenarios.mjs"), served.url,
                           str(portrait), str(media["driver"]), scenario],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout.strip().splitlines()[-1])
    if scenario == "down":  # (the page showed nothing: "The model: ..." for ever)
        assert shown == {"status": "the server does not answer (fetch failed); load this page again once it is back",
                         "status_class": "error", "posts": 0}, shown
        return
    if scenario == "too_big":
        assert shown["posts"] == 0 and shown["status_class"] == "error", shown
        assert shown["status"] == ("the files are 2048.0 MiB together, over this server's limit of 1024.0 MiB "
                                   "(serve --max-upload-mb)"), shown
        return
    if scenario in ("cancel", "refused"):
        expected = {"cancel": "the run was cancelled",
                    "refused": "400: request: start: 'soon' is not a time: give seconds (90, 1.5) or [HH:]MM:SS[.ms] "
                               "(1:30, 0:01:30.5)"}[scenario]
        assert (shown["status"], shown["status_class"], shown["result"]) == (expected, "error", ""), shown
        assert shown["posts"] == 1 and shown["stop_hidden"], shown
        return
    assert re.fullmatch(r"5 frames in [0-9.]+ s( \(the portrait was prepared already\))?", shown["status"]), shown
    assert shown["download"] == "портрет café_talk.gif", shown
    if scenario == "outage":
        asked = [s for s in shown["seen"] if s.startswith("The server does not answer")]
        assert [s.split(";")[0] for s in asked] == ["The server does not answer (fetch failed)",
                                                   "The server does not answer (502 Bad Gateway)",
                                                   "The server does not answer (fetch failed)"], shown


def test_a_frame_limit_refuses_a_long_request_before_it_waits(served: AnimateServer, media: dict[str, Path],
                                                              scratch: Path) -> None:
    """serve --frame-limit: a request whose result would have more frames is refused (400, naming the count and
    what to send instead) and keeps nothing; the same driver within the limit (max_frames, a duration) runs."""
    served.frame_limit = 4
    status, _, body = animate(served, {**files(media), "format": "gif"})
    assert status == 400 and json.loads(body)["error"] == (
        "driver/talk.mp4: the result would have 6 frames, over this server's limit of 4 (serve --frame-limit): send "
        "a part of the driver (start, duration), max_frames, or a lower fps")
    assert served.served == 0 and left(scratch) == [] and not [p for p in scratch.iterdir()]
    for limited in ({"max_frames": "4"}, {"duration": "0.16"}):
        status, headers, _ = animate(served, {**files(media), "format": "gif", **limited})
        assert status == 200 and headers["X-Megactor-Frames"] == "4", limited
    assert json.loads(request(served, "GET", "/health")[2])["frame_limit"] == 4


def test_health_is_the_servers_state_and_the_models_run_settings(served: AnimateServer, anim: Animator) -> None:
    health = json.loads(request(served, "GET", "/health")[2])
    assert server_module.run_settings_of(health) == json.loads(json.dumps(anim.run_settings()))
    assert set(health) - set(anim.run_settings()) == server_module.STATE_KEYS


def test_metrics_count_runs_frames_answers_and_what_is_kept_for_prometheus(served: AnimateServer,
                                                                          media: dict[str, Path]) -> None:
    """GET /metrics parses as Prometheus' text format and counts what happened: a run done (its frames, its seconds
    in the histogram), a run failed, the answers by status, the portrait kept."""
    from prometheus_client.parser import text_string_to_metric_families

    def read() -> dict[str, float]:
        status, headers, body = request(served, "GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return {s.name + "".join(f"[{v}]" for v in s.labels.values()): s.value
                for family in text_string_to_metric_families(body.decode()) for s in family.samples}

    before = read()
    assert (before["megactor_runs_total[done]"], before["megactor_run_seconds_count"]) == (0, 0)
    assert before["megactor_portraits_kept"] == len(served.anim.cache)
    assert animate(served, {**files(media), "format": "gif"})[0] == 200
    bad = {"portrait": ("bad.png", b"not an image"), "driver": files(media)["driver"]}
    assert animate(served, bad)[0] == 400
    after = read()
    assert (after["megactor_runs_total[done]"], after["megactor_runs_total[failed]"],
            after["megactor_runs_total[cancelled]"], after["megactor_runs_started_total"]) == (1, 1, 0, 2)
    assert after["megactor_frames_total"] == 6 and after["megactor_run_seconds_count"] == 1
    assert after["megactor_run_seconds_bucket[+Inf]"] == 1 and 0 < after["megactor_run_seconds_sum"] < 3600
    assert after["megactor_http_responses_total[200]"] == 2 and after["megactor_http_responses_total[400]"] == 1
    assert after["megactor_waiting_runs"] == after["megactor_running_runs"] == 0
    assert after["megactor_portraits_kept"] >= 1 and after["megactor_portrait_memory_bytes"] > 0
    assert after["megactor_uptime_seconds"] >= before["megactor_uptime_seconds"]


def test_the_api_description_is_valid_openapi_and_names_every_field(served: AnimateServer) -> None:
    from openapi_spec_validator import validate

    status, headers, body = request(served, "GET", "/openapi.json")
    doc = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    validate(doc)
    props = doc["paths"]["/animate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert set(props) == set(server_module.FILE_FIELDS) | set(server_module.TEXT_FIELDS)
    job_props = doc["paths"]["/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert set(job_props) == set(props) | {"callback"}
    assert props["format"]["enum"] == list(server_module.FORMATS) and props["portrait"]["format"] == "binary"
    assert set(doc["paths"]) == {"/animate", "/jobs", "/jobs/{id}", "/jobs/{id}/result", "/health", "/metrics",
                                 "/ping"}
    answers = {path: {m: set(op["responses"]) for m, op in ops.items()} for path, ops in doc["paths"].items()}
    assert {"400", "401", "403", "408", "410", "413", "415", "500", "503"} <= answers["/animate"]["post"]  # (403: a
    assert {"401", "403"} <= answers["/health"]["get"] & answers["/metrics"]["get"] & answers["/jobs"]["get"]  # Host
    assert {"401", "500"} <= answers["/jobs/{id}/result"]["get"]  # or Origin refused; 410: the server stopped)


def test_the_api_description_names_what_the_server_answers(served: AnimateServer, media: dict[str, Path]) -> None:
    """GET /openapi.json against the real answers: a job's fields (result_name, created, finished too) are in its
    schema; DELETE /jobs/ID's statuses (deleted, cancelling) are in its own enum, not the job's; a chunked form's
    411 and a failed job's result (its error_status, 400 here) are among the answers described."""
    doc = json.loads(request(served, "GET", "/openapi.json")[2])
    paths = doc["paths"]

    def schema(answer: dict) -> dict:
        return answer["content"]["application/json"]["schema"]

    job = post_job(served, {**files(media), "duration": "0.04"})
    state = wait_for(served, lambda d: d["status"] == "done", path=f"/jobs/{job}")
    assert set(state) <= set(schema(paths["/jobs/{id}"]["get"]["responses"]["200"])["properties"]), state
    listed = schema(paths["/jobs"]["get"]["responses"]["200"])["properties"]["jobs"]["items"]["properties"]
    assert [set(j) <= set(listed) for j in json.loads(request(served, "GET", "/jobs")[2])["jobs"]] == [True]
    assert "Location" in paths["/jobs"]["post"]["responses"]["202"]["headers"]
    status, _, answer = request(served, "DELETE", f"/jobs/{job}")
    deleted = schema(paths["/jobs/{id}"]["delete"]["responses"][str(status)])
    assert json.loads(answer)["status"] == "deleted" and deleted["properties"]["status"]["enum"] == [
        "cancelled", "cancelling", "deleted"]
    body, ctype = form(files(media))
    for route in ("/animate", "/jobs"):
        status = request(served, "POST", route, body, ctype, {"Transfer-Encoding": "chunked"})[0]
        assert status == 411 and "411" in paths[route]["post"]["responses"]
    failed = post_job(served, {**files(media), "portrait": ("me.png", b"no image")})
    wait_for(served, lambda d: d["status"] == "failed", path=f"/jobs/{failed}")
    status = request(served, "GET", f"/jobs/{failed}/result")[0]
    assert status == 400 and "400" in paths["/jobs/{id}/result"]["get"]["responses"]


def test_pages_of_other_sites_cannot_send_work(served: AnimateServer, media: dict[str, Path]) -> None:
    """A browser sends another site's form without a preflight: such a POST (or a DELETE) is refused (403) unless
    --cors-origin names the site; the server's own page (Origin = its Host) and clients without a page (no
    Origin) are taken."""
    body, ctype = form({**files(media), "duration": "0.04"})
    port = served.server_address[1]
    status, _, answer = request(served, "POST", "/jobs", body, ctype, {"Origin": "https://evil.example"})
    assert status == 403 and "a page of another site (https://evil.example) may not" in json.loads(answer)["error"]
    assert request(served, "DELETE", "/jobs/abc", headers={"Origin": "null"})[0] == 403  # (a sandboxed page)
    assert json.loads(request(served, "GET", "/jobs")[2])["jobs"] == []  # (nothing was queued)
    own = {"Origin": f"http://127.0.0.1:{port}"}
    status, _, answer = request(served, "POST", "/jobs", body, ctype, own)
    assert status == 202, answer
    job = json.loads(answer)["id"]
    wait_for(served, lambda d: d["status"] == "done", path=f"/jobs/{job}")
    served.cors_origins = ("https://app.example",)
    assert request(served, "DELETE", f"/jobs/{job}", headers={"Origin": "https://app.example"})[0] == 200


def test_a_server_on_this_machine_answers_only_local_names(anim: Animator, media: dict[str, Path]) -> None:
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends Host and Origin
    evil.example, which passed the Origin check as the server's own page; a server listening on a loopback address
    answers localhost, names under it and addresses only (and --allowed-host's names); one listening on every
    address answers any name (its token guards it)."""
    body, ctype = form({**files(media), "duration": "0.04"})
    with serving(anim) as srv:
        port = srv.server_address[1]
        evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        status, _, answer = request(srv, "POST", "/jobs", body, ctype, evil)
        assert status == 403 and "Host 'evil.example:" in json.loads(answer)["error"], answer
        assert "serve --allowed-host evil.example answers" in json.loads(answer)["error"]
        assert request(srv, "GET", "/jobs", headers={"Host": "evil.example"})[0] == 403
        assert request(srv, "GET", "/", headers={"Host": "evil.example."})[0] == 403
        for odd in ("[::1]evil.example", "[::1].evil.example:80", "127.0.0.1:80.evil.example"):  # (not a port)
            status, _, answer = request(srv, "GET", "/health", headers={"Host": odd})
            assert status == 403 and "--allowed-host" not in json.loads(answer)["error"], (odd, answer)  # (no name)
        for host in (f"localhost:{port}", "LOCALHOST", f"app.localhost:{port}", f"127.0.0.1:{port}", "[::1]:80",
                     "10.0.0.7", "[::1]", "[::1]:", "localhost:"):  # (an empty port: RFC 3986's *DIGIT)
            assert request(srv, "GET", "/health", headers={"Host": host})[0] == 200, host
        assert json.loads(request(srv, "GET", "/jobs")[2])["jobs"] == []  # (nothing was queued)
    with serving(anim, allowed_hosts=("GPU.example", "app.example:8443")) as srv:  # (a port given: the name's)
        assert request(srv, "GET", "/health", headers={"Host": "gpu.example:443"})[0] == 200
        assert request(srv, "GET", "/health", headers={"Host": "app.example:8443"})[0] == 200
        assert request(srv, "GET", "/health", headers={"Host": "other.example"})[0] == 403
        assert request(srv, "GET", "/health", headers={"Host": ""})[0] == 200  # (as none: no browser sends it)
    srv = AnimateServer(anim, ("0.0.0.0", 0))
    try:
        assert not srv.local_only
    finally:
        srv.server_close()


def test_uploads_named_in_utf8_and_at_length(served: AnimateServer, media: dict[str, Path]) -> None:
    """A browser sends a file name as UTF-8: "café.png" stays so (was "caf\ufffd\ufffd.png"); names long in bytes
    (Japanese, 300 characters) are shortened to what a file system takes (they failed with 503 or 500)."""
    long_driver = "ドライバー" * 20 + ".mp4"
    body, ctype = form({"portrait": ("café.png", media["portrait"].read_bytes()),
                        "driver": (long_driver, media["driver"].read_bytes()), "duration": "0.04"})
    status, _, answer = request(served, "POST", "/jobs", body, ctype)
    assert status == 202, answer
    doc = json.loads(answer)
    assert doc["result_name"].startswith("café_ドライバー") and doc["result_name"].endswith(".mp4")
    assert len(doc["result_name"].encode()) <= 255
    done = wait_for(served, lambda d: d["status"] in ("done", "failed"), path=f"/jobs/{doc['id']}")
    assert done["status"] == "done", done
    body, ctype = form({"portrait": ("a" * 300 + ".png", media["portrait"].read_bytes()),
                        "driver": ("b" * 300 + ".mp4", media["driver"].read_bytes()), "duration": "0.04"})
    status, _, answer = request(served, "POST", "/animate", body, ctype)
    assert status == 200, answer[:300]


def test_malformed_request_framing_is_refused(served: AnimateServer, media: dict[str, Path]) -> None:
    """Content-Length that is no ASCII number (was a 500), a chunked body beside a Content-Length (its chunk lines
    went into the uploads), two Content-Lengths that disagree; a method the server has no use for: 405 with Allow
    (was 501)."""
    body, ctype = form(files(media))
    for headers, status, says in (({"Content-Length": "\u00b2"}, 411, "needs a Content-Length"),
                                  ({"Transfer-Encoding": "chunked"}, 411, "not chunked")):
        conn = http.client.HTTPConnection("127.0.0.1", served.server_address[1], timeout=60)
        conn.putrequest("POST", "/jobs")
        conn.putheader("Content-Type", ctype)
        if "Transfer-Encoding" in headers:
            conn.putheader("Content-Length", str(len(body)))
        for key, value in headers.items():
            conn.putheader(key, value.encode("latin-1"))
        conn.endheaders()
        answer = conn.getresponse()
        assert answer.status == status and says in json.loads(answer.read())["error"], headers
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", served.server_address[1], timeout=60)
    conn.putrequest("POST", "/jobs")
    conn.putheader("Content-Type", ctype)
    conn.putheader("Content-Length", str(len(body)))
    conn.putheader("Content-Length", "5")
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 400 and "several Content-Length headers" in json.loads(answer.read())["error"]
    conn.close()
    status, headers, answer = request(served, "PUT", "/jobs", b"x")
    assert status == 405 and headers["Allow"] == "GET, HEAD, POST", answer


def test_pages_of_the_sites_named_may_call_the_server_from_a_browser(served: AnimateServer) -> None:
    """CORS: no site by default; with --cors-origin, that site's pages get the answers (and the run's headers) and
    a preflight for a form or a DELETE; pages of other sites still do not."""
    site = {"Origin": "https://app.example"}
    assert "Access-Control-Allow-Origin" not in request(served, "GET", "/health", headers=site)[1]
    served.cors_origins = ("https://app.example",)
    _, headers, _ = request(served, "GET", "/health", headers=site)
    assert headers["Access-Control-Allow-Origin"] == "https://app.example" and headers["Vary"] == "Origin"
    assert "X-Megactor-Frames" in headers["Access-Control-Expose-Headers"]
    status, headers, _ = request(served, "OPTIONS", "/jobs", headers={**site, "Access-Control-Request-Method": "POST"})
    assert status == 204 and headers["Access-Control-Allow-Methods"] == "GET, HEAD, POST, DELETE"
    assert headers["Access-Control-Allow-Origin"] == "https://app.example"
    _, headers, _ = request(served, "GET", "/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in headers and headers["Vary"] == "Origin"  # (not to be cached as any)
    _, headers, _ = request(served, "OPTIONS", "/jobs", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in headers and headers["Vary"] == "Origin"
    served.cors_origins = ("*",)
    assert request(served, "GET", "/nope", headers=site)[1]["Access-Control-Allow-Origin"] == "*"
    assert request(served, "GET", "/health")[1]["Server"] == "megactor-rt"  # (no Python version)


def test_the_servers_own_refusals(served: AnimateServer, media: dict[str, Path], scratch: Path) -> None:
    """Unknown pages 404, GET /animate 405, no length 411, a form over the limit 413 (before it is read), not a
    form 415: each a JSON error."""
    cases = [(request(served, "GET", "/nope"), 404, "no such page: /nope"),
             (request(served, "GET", "/animate"), 405, "POST /animate with a multipart/form-data form"),
             (request(served, "POST", "/health", b""), 405, "the server takes POST /animate"),
             (request(served, "POST", "/ping", b""), 405, "the server takes POST /animate"),
             (request(served, "POST", "/jobs/abc", b""), 405, "the server takes POST /animate"),
             (request(served, "POST", "/nope", b""), 404, "the server takes POST /animate"),
             (request(served, "POST", "/animate", b"{}", "application/json"), 415, "takes multipart/form-data"),
             (request(served, "POST", "/jobs", b"{}", "application/json"), 415,  # (it named POST /animate)
              "the request is application/json; POST /jobs takes multipart/form-data")]
    conn = http.client.HTTPConnection("127.0.0.1", served.server_address[1], timeout=30)
    conn.putrequest("POST", "/animate")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    answer = conn.getresponse()
    cases.append(((answer.status, {}, answer.read()), 411, "needs a Content-Length"))
    conn.close()
    served.max_upload_bytes = 1000
    cases.append((animate(served, files(media)), 413, r"over this server's limit of 1000 \(serve --max-upload-mb\)"))
    for (status, _, body), want, message in cases:
        assert status == want and re.search(message, json.loads(body)["error"]), (status, body)
    assert request(served, "POST", "/jobs/abc", b"")[1]["Allow"] == "GET, HEAD, DELETE"
    assert left(scratch) == []


def test_a_target_that_is_no_path_is_answered_404(served: AnimateServer) -> None:
    """POST and DELETE of a request target without a "/" (``*``, as OPTIONS takes, or a client's ``jobs``) are
    answered 404 as any route the server does not have (the connection was dropped unanswered, and the log had an
    IndexError's traceback)."""
    import socket

    for method in ("POST", "DELETE"):
        with socket.create_connection(("127.0.0.1", served.server_address[1]), timeout=30) as sock:
            sock.sendall(f"{method} * HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode())
            answer = sock.makefile("rb").read()
        assert answer.startswith(b"HTTP/1.1 404 "), (method, answer)
        assert b'"error"' in answer, answer


def test_a_method_a_route_does_not_take_is_answered_405_with_its_allow(
        served: AnimateServer, media: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A 405 names the methods its route takes (Allow, as RFC 9110 wants; GET /animate and a DELETE of another route
    had none; a PUT's named the server's, GET and DELETE for /animate among them); DELETE /jobs/ID/result is no way
    to delete a job (it cancelled a running one); DELETE or PUT of no route 404."""
    go = hold_runs(served, monkeypatch)
    job = post_job(served, {**files(media), "duration": "0.04"})
    wait_for(served, lambda d: d["status"] == "running", path=f"/jobs/{job}")
    allowed = {("GET", "/animate"): "POST", ("DELETE", "/animate"): "POST", ("DELETE", "/jobs"): "GET, HEAD, POST",
               ("DELETE", "/health"): "GET, HEAD", ("DELETE", f"/jobs/{job}/result"): "GET, HEAD",
               ("POST", f"/jobs/{job}/result"): "GET, HEAD", ("POST", f"/jobs/{job}"): "GET, HEAD, DELETE",
               ("PUT", "/animate"): "POST", ("PATCH", f"/jobs/{job}"): "GET, HEAD, DELETE", ("PUT", "/"): "GET, HEAD"}
    for (method, path), methods in allowed.items():
        status, headers, answer = request(served, method, path, b"" if method == "POST" else None)
        assert status == 405 and headers.get("Allow") == methods, (method, path, answer)
    assert request(served, "DELETE", "/nope")[0] == 404
    assert request(served, "PUT", "/nope", b"")[0] == 404
    go.set()
    assert wait_for(served, lambda d: d["status"] != "running", path=f"/jobs/{job}")["status"] == "done"


def test_a_failed_jobs_result_is_its_error_without_a_retry_after(served: AnimateServer, media: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that failed for want of a resource (503, as POST /animate would have answered) answers GET
    /jobs/ID/result with that error but no Retry-After: the job will not succeed however long a client waits
    (a client that honours Retry-After asked again for ever); the server's own 503, a full queue, keeps it."""
    from megactor_rt.errors import ResourceError

    def short(*args: object, **kw: object) -> object:
        raise ResourceError("the device is out of memory")

    monkeypatch.setattr(served.anim, "animate_to_file", short)
    job = post_job(served, {**files(media), "duration": "0.04"})
    state = wait_for(served, lambda d: d["status"] == "failed", path=f"/jobs/{job}")
    assert state["error_status"] == 503, state
    status, headers, answer = request(served, "GET", f"/jobs/{job}/result")
    assert status == 503 and "Retry-After" not in headers, (headers, answer)
    assert json.loads(answer)["error"] == "the device is out of memory"


def test_an_expect_100_continue_form_over_the_limit_is_refused_unsent(served: AnimateServer) -> None:
    """curl asks first ("Expect: 100-continue") before a large form: the server refuses it then, unread."""
    import socket

    served.max_upload_bytes = 10
    with socket.create_connection(("127.0.0.1", served.server_address[1]), timeout=30) as conn:
        conn.sendall(b"POST /animate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nExpect: 100-continue\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):  # (the server closes the connection after its answer)
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head  # (not "100 Continue" first)
    assert "over this server's limit of 10" in json.loads(body)["error"]


def test_one_run_at_a_time_and_a_full_queue_is_answered_503(served: AnimateServer, media: dict[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """While a run is under way another request waits (queue 1) and one more is refused 503 with Retry-After (a
    warning in the log, not an error: was ERROR, filling a log collector's errors under load); /health answers
    meanwhile, naming the run and the waiting request; the waiting one runs after the first."""
    go = threading.Event()
    order: list[str] = []
    real = served.anim.animate_to_file

    def slow(portrait: Path, driver: Path, output: Path, **kw: object) -> object:
        order.append(f"start {output.name}")
        go.wait(60)
        stats = real(portrait, driver, output, **kw)
        order.append(f"end {output.name}")
        return stats

    monkeypatch.setattr(served.anim, "animate_to_file", slow)
    served.max_waiting = 1
    answers: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def send(name: str, fmt: str) -> None:
        answers[name] = animate(served, {**files(media), "format": fmt})

    first = threading.Thread(target=send, args=("first", "mp4"))
    first.start()
    health = wait_for(served, lambda h: h["running"] == "me_talk.mp4")
    second = threading.Thread(target=send, args=("second", "gif"))
    second.start()
    health = wait_for(served, lambda h: h["waiting"] == 1)
    with caplog.at_level(logging.INFO, logger="megactor_rt"):
        status, headers, body = animate(served, {**files(media), "format": "mkv"})
    assert status == 503 and headers["Retry-After"] == "10"
    assert [r.levelname for r in caplog.records if "503 the server is busy" in r.getMessage()] == ["WARNING"]
    assert "the server is busy (1 run(s) waiting or being sent besides the one running)" in json.loads(body)["error"]
    assert health["running"] == "me_talk.mp4"
    import socket

    for expect in (b"", b"Expect: 100-continue\r\n"):  # refused before the form is read (or even sent)
        with socket.create_connection(("127.0.0.1", served.server_address[1]), timeout=10) as conn:
            conn.sendall(b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000000\r\n" + expect +
                         b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
            answer = conn.recv(65536)  # (a server reading the form first would wait here for the other 10 MB)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
    go.set()
    first.join(120)
    second.join(120)
    assert answers["first"][0] == 200 and answers["second"][0] == 200
    assert order == ["start me_talk.mp4", "end me_talk.mp4", "start me_talk.gif", "end me_talk.gif"]


def test_a_burst_of_clients_is_answered_not_reset(anim: Animator) -> None:
    """30 clients connecting at once (or while `serve` loads its model: it listens first) each get an answer: with
    socketserver's backlog of 5 the connections past it were reset, the client's form unanswered (16 threads
    posting to `serve --demo` lost 4)."""
    srv = AnimateServer(anim, ("127.0.0.1", 0))  # (not accepting yet, as while the model loads)
    got: list[object] = []

    def post() -> None:
        try:
            got.append(request(srv, "POST", "/jobs", b"x" * 300_000, "text/plain")[0])
        except OSError as exc:
            got.append(type(exc).__name__)

    clients = [threading.Thread(target=post) for _ in range(30)]
    for client in clients:
        client.start()
    time.sleep(1.5)
    server = threading.Thread(target=srv.serve_forever, daemon=True)
    server.start()
    try:
        for client in clients:
            client.join(60)
    finally:
        srv.shutdown()
        srv.server_close()
    assert got == [415] * 30


@pytest.mark.parametrize(("header", "part"), [
    (None, None), ("bytes=0-99", (0, 99)), ("bytes=100-", (100, 999)), ("bytes=-10", (990, 999)),
    ("bytes=-5000", (0, 999)), ("bytes=900-5000", (900, 999)), (" Bytes=5-5 ", (5, 5)),
    ("bytes=0-1,5-9", None), ("items=0-9", None), ("bytes=9-5", None), ("bytes=a-9", None), ("bytes=-", None),
    ("bytes=1000-", ValueError), ("bytes=-0", ValueError)])
def test_a_range_header_asks_for_bytes_of_the_file_or_the_whole(header: str | None, part: object) -> None:
    """RFC 9110 byte ranges of a 1000-byte file: one range is sent (clamped to the end), anything else whole, a
    start past the end refused (416)."""
    if part is ValueError:
        with pytest.raises(ValueError):
            byte_range(header, 1000)
    else:
        assert byte_range(header, 1000) == part


def test_a_results_download_takes_ranges_and_head(served: AnimateServer, media: dict[str, Path]) -> None:
    """GET /jobs/ID/result answers a Range with 206 and those bytes (Content-Range, the run's headers too), a range
    past the end with 416 naming the size, a Range with another file's If-Range with the whole; HEAD gives the
    headers (size, ETag, Accept-Ranges) without the body."""
    job = post_job(served, files(media))
    wait_for(served, lambda d: d["status"] == "done", path=f"/jobs/{job}")
    status, headers, whole = request(served, "GET", f"/jobs/{job}/result")
    size, tag = len(whole), headers["ETag"]
    assert status == 200 and headers["Accept-Ranges"] == "bytes" and tag.startswith(f'"{job}-')
    status, headers, part = request(served, "GET", f"/jobs/{job}/result", headers={"Range": "bytes=100-"})
    assert (status, part) == (206, whole[100:]) and headers["Content-Range"] == f"bytes 100-{size - 1}/{size}"
    assert headers["X-Megactor-Frames"] == "6" and headers["Content-Length"] == str(size - 100)
    status, _, part = request(served, "GET", f"/jobs/{job}/result", headers={"Range": "bytes=-10", "If-Range": tag})
    assert (status, part) == (206, whole[-10:])
    status, _, part = request(served, "GET", f"/jobs/{job}/result", headers={"Range": "bytes=0-9",
                                                                            "If-Range": '"another"'})
    assert (status, part) == (200, whole)
    status, headers, body = request(served, "GET", f"/jobs/{job}/result", headers={"Range": f"bytes={size}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{size}"
    assert f"not within its result's {size} bytes" in json.loads(body)["error"]
    status, headers, body = request(served, "HEAD", f"/jobs/{job}/result")
    assert (status, body, headers["Content-Length"], headers["ETag"]) == (200, b"", str(size), tag)
    assert request(served, "HEAD", "/ping")[::2] == (200, b"")


def test_a_done_jobs_progress_is_its_frames_written_though_decode_reported_last(served: AnimateServer,
                                                                                 media: dict[str, Path],
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode stage's last report comes from the run's worker thread once its last frames are handed on, and
    may come after the writer's last "write" report: a done job's progress is still its frames written (was, now
    and then under load, "decode")."""
    from megactor_rt.progress import Progress

    real = served.anim.animate_to_file

    def late_decode(*args: Any, on_progress: Any = None, **kwargs: Any) -> Any:
        stats = real(*args, on_progress=on_progress, **kwargs)
        on_progress(Progress("decode", 1, 1, "batch"))  # (as the worker's report that lost the race does)
        return stats

    monkeypatch.setattr(served.anim, "animate_to_file", late_decode)
    job = post_job(served, files(media))
    doc = wait_for(served, lambda d: d["status"] in ("done", "failed"), path=f"/jobs/{job}")
    assert doc["status"] == "done" and doc["progress"] == {"stage": "write", "done": 6, "total": 6, "unit": "frame"}


def test_options_names_a_routes_methods_and_an_absolute_target_is_taken(served: AnimateServer) -> None:
    """OPTIONS answers with the route's methods in ``Allow`` (RFC 9110 9.3.7; was none), ``OPTIONS *`` with the
    server's, an unknown route 404; a request target in absolute form (``http://host:port/health``, RFC 9112
    3.2.2: a server must take it) is its path (was "no such page")."""
    for target, allow in (("/jobs", "GET, HEAD, POST, OPTIONS"), ("/jobs/abc", "GET, HEAD, DELETE, OPTIONS"),
                          ("/animate", "POST, OPTIONS"), ("*", "GET, HEAD, POST, DELETE, OPTIONS")):
        status, headers, _ = request(served, "OPTIONS", target)
        assert (status, headers.get("Allow")) == (204, allow), target
    assert request(served, "OPTIONS", "/nowhere")[0] == 404
    port = served.server_address[1]
    status, _, body = request(served, "GET", f"http://127.0.0.1:{port}/health?x=1")
    assert status == 200 and "status" in json.loads(body)


def test_a_job_runs_in_the_background_and_keeps_its_result_until_deleted(served: AnimateServer,
                                                                         media: dict[str, Path], tmp_path: Path,
                                                                         scratch: Path) -> None:
    """POST /jobs answers at once (202, the job's address); GET /jobs/ID follows it to done, with its progress and
    the result's address; the result is the one POST /animate answers with; GET /jobs lists it; DELETE removes it
    and its files."""
    job = post_job(served, files(media))
    doc = wait_for(served, lambda d: d["status"] in ("done", "failed"), path=f"/jobs/{job}")
    assert doc["status"] == "done" and doc["result"] == f"/jobs/{job}/result" and doc["frames"] == 6, doc
    assert doc["progress"]["stage"] == "write" and doc["progress"]["done"] == 6
    status, headers, body = request(served, "GET", f"/jobs/{job}/result")
    assert status == 200 and headers["Content-Type"] == "video/mp4" and headers["X-Megactor-Frames"] == "6"
    assert request(served, "GET", f"/jobs/{job}/result")[2] == body  # (kept: fetched again)
    (tmp_path / "job.mp4").write_bytes(body)
    (tmp_path / "now.mp4").write_bytes(animate(served, files(media))[2])
    assert all(np.array_equal(a, b) for a, b in zip(decode_all(tmp_path / "job.mp4"), decode_all(tmp_path / "now.mp4"),
                                                    strict=True))
    listed = json.loads(request(served, "GET", "/jobs")[2])["jobs"]
    assert [(d["id"], d["status"]) for d in listed] == [(job, "done")]
    kept = [p for p in scratch.rglob("*") if p.is_file() and not p.parent.parent.name.startswith(DRIVERS)]
    assert [p.relative_to(scratch).parts[1:] for p in kept] == [("result", "me_talk.mp4")]  # (no uploads left)
    status, _, body = request(served, "DELETE", f"/jobs/{job}")
    assert (status, json.loads(body)) == (200, {"id": job, "status": "deleted"})
    assert request(served, "GET", f"/jobs/{job}")[0] == 404 and left(scratch) == []


def test_jobs_wait_their_turn_and_can_be_cancelled(served: AnimateServer, media: dict[str, Path], scratch: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued job says how many runs are ahead and has no result yet (409); DELETE cancels it queued (at once)
    or running (at its run's next progress report: 202, then cancelled, its result gone: 410), listed as cancelled
    until a second DELETE; a job whose run fails says why, and its result answers with that error."""
    go = hold_runs(served, monkeypatch)
    first, second = post_job(served, files(media)), post_job(served, {**files(media), "format": "gif"})
    wait_for(served, lambda d: d["status"] == "running", path=f"/jobs/{first}")
    doc = json.loads(request(served, "GET", f"/jobs/{second}")[2])
    assert (doc["status"], doc["ahead"]) == ("queued", 1)
    status, _, body = request(served, "GET", f"/jobs/{second}/result")
    assert status == 409 and f"job {second} is queued: no result yet" in json.loads(body)["error"]
    assert json.loads(request(served, "DELETE", f"/jobs/{second}")[2])["status"] == "cancelled"
    status, _, body = request(served, "DELETE", f"/jobs/{first}")
    assert (status, json.loads(body)["status"]) == (202, "cancelling")
    go.set()
    doc = wait_for(served, lambda d: d["status"] != "running", path=f"/jobs/{first}")
    assert doc["status"] == "cancelled" and doc["progress"]["stage"] == "driver", doc  # (its first report)
    assert request(served, "GET", f"/jobs/{first}/result")[0] == 410
    assert json.loads(request(served, "GET", f"/jobs/{second}")[2])["status"] == "cancelled"
    assert request(served, "GET", f"/jobs/{second}/result")[0] == 410
    assert json.loads(request(served, "DELETE", f"/jobs/{second}")[2])["status"] == "deleted"
    assert request(served, "GET", f"/jobs/{second}")[0] == 404
    bad = post_job(served, {**files(media), "portrait": ("me.png", b"not an image")})
    doc = wait_for(served, lambda d: d["status"] in ("done", "failed"), path=f"/jobs/{bad}")
    assert doc["status"] == "failed" and doc["error"].startswith("portrait/me.png: "), doc
    status, _, body = request(served, "GET", f"/jobs/{bad}/result")
    assert status == 400 and json.loads(body)["error"] == doc["error"]
    health = json.loads(request(served, "GET", "/health")[2])
    assert (health["served"], health["failed"], health["jobs_kept"], health["waiting"]) == (0, 1, 2, 0)
    assert left(scratch) == []  # (a failed or cancelled job keeps what it says, no file)


def test_a_finished_job_is_kept_for_keep_s_only(served: AnimateServer, media: dict[str, Path], scratch: Path) -> None:
    served.keep_s = 0.0
    job = post_job(served, {**files(media), "duration": "0.04"})
    wait_for(served, lambda d: d.get("status") == "done" or "error" in d, path=f"/jobs/{job}")
    time.sleep(0.05)
    status, _, body = request(served, "GET", f"/jobs/{job}/result")
    assert status == 404 and "a job is kept 0 s after its run, and only until the server stops (serve --jobs-dir " \
        "keeps them over a restart)" in json.loads(body)["error"]
    assert left(scratch) == []


# ------------------------------------------------------------------------------------------------- the command


@pytest.mark.parametrize(("argv", "message"), [
    (["--demo", "--mask", "m.png"], "--mask: serve's flags are every request's settings"),
    (["--demo", "--checkpoint-dir", "c", "--bit-depth", "16"], "--checkpoint-dir, --bit-depth: serve's flags"),
    ([], "serve needs --weights DIR (converted weights) or --demo"),
    (["--demo", "--weights", "w"], "or --demo (the tiny random model), one of them"),
    (["--demo", "--overlap", "20"], "bad run settings: --window must be >= 1 and --overlap from 0"),
], ids=["mask", "checkpoint-and-16-bit", "no-model", "both-models", "bad-settings"])
def test_serve_refuses_what_it_cannot_do_before_loading(argv: list[str], message: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--max-upload-mb", "0", "must be a finite number of MiB > 0, got '0'"),
    ("--keep-min", "nan", "must be a finite number of minutes > 0, got 'nan'"),
    ("--cache-memory-gb", "-1", "must be a finite number of GiB > 0, got '-1'"),
    ("--port", "99999", "99999 is not a port (0 to 65535; 0: any free one)"),
    ("--port", "-1", "-1 is not >= 0"),
    ("--cors-origin", "app.example.com", "'app.example.com': not an http(s) address"),
    ("--cors-origin", "https://app.example.com/page",
     "'https://app.example.com/page': a site is a scheme, a host and maybe a port, no path"),
    ("--cors-origin", "https://app.example.com:99999", "'https://app.example.com:99999': Port out of range"),
])
def test_serve_flags_out_of_range_are_refused_as_read(flag: str, value: str, message: str,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused by the parser, naming the flag (`--port 99999` was an unexpected error when the socket bound;
    `--cors-origin app.example.com` matched no browser's Origin and was taken silently)."""
    monkeypatch.setattr(Animator, "demo", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--demo", f"{flag}={value}"])
    assert exc.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_serve_takes_sites_as_browsers_name_them() -> None:
    from megactor_rt.cli import build_parser

    sites = ["*", "https://app.example.com", "http://localhost:3000/", "https://[::1]:8443"]
    args = build_parser().parse_args(["serve", "--demo", *(f"--cors-origin={s}" for s in sites)])
    assert args.cors_origin == sites


def test_serve_demo_runs_the_demos_4_steps_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def demo(*args: object, config: AnimateConfig, **kw: object) -> None:
        seen.append(config.steps)
        raise InputError("stop here")

    monkeypatch.setattr(Animator, "demo", demo)
    for argv in (["--demo"], ["--demo", "--steps", "25"]):
        assert main(["serve", "--port", "0", "--no-warmup", *argv]) == 2
    assert seen == [4, 25]


def test_a_port_in_use_is_named_before_the_model_loads(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setattr(Animator, "demo", lambda *a, **k: pytest.fail("the model loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--demo", "--port", str(port)]) == 2
    assert f"127.0.0.1:{port}: cannot listen there" in capsys.readouterr().err


def test_serve_from_the_command_line_as_a_user_runs_it(media: dict[str, Path], tmp_path: Path) -> None:
    """`megactor-rt serve --demo --port 0` in a process of its own: it says where it listens, answers a form with a
    video, logs a line per run, and stops on SIGTERM (status 143) in the middle of a job's run, which it cancels,
    leaving nothing in its temporary folder."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "megactor_rt.cli", "serve", "--demo", "--port", "0", "--steps",
                             "1", "--window", "4", "--overlap", "2", "--cache-memory-gb", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("megactor-rt serve: listening on http://127.0.0.1:"), line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        body, ctype = form({**files(media), "format": "gif"})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/animate", body, {"Content-Type": ctype})
        answer = conn.getresponse()
        data = answer.read()
        conn.close()
        assert answer.status == 200 and data[:6] == b"GIF89a" and answer.getheader("X-Megactor-Frames") == "6"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
        conn.close()
        assert (health["portrait_memory_budget"], health["portraits_kept"]) == (2**29, 1)
        assert 0 < health["portrait_memory_bytes"] <= 2**29
        body, ctype = form({"portrait": ("me.png", PORTRAIT.read_bytes()), "driver": ("long.mp4", DRIVER.read_bytes())})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/jobs", body, {"Content-Type": ctype})
        job = json.loads(conn.getresponse().read())["id"]
        conn.close()
        for _ in range(600):  # (its run under way: SIGTERM comes in the middle of it)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("GET", f"/jobs/{job}")
            doc = json.loads(conn.getresponse().read())
            conn.close()
            if doc["status"] != "queued":
                break
            time.sleep(0.02)
        assert doc["status"] == "running", doc
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert re.search(r"INFO megactor_rt.server: run [0-9a-f]{12}: me.png \+ talk.mp4 -> me_talk.gif\n", err), err
    assert re.search(r"run [0-9a-f]{12}: me_talk.gif, 6 frames in [0-9.]+ s\n", err) and "terminated" in err
    assert f"run {job}: cancelled" in err and re.search(r"megactor-rt serve: warmed up in [0-9.]+ s\n", err)
    assert not [p for p in scratch.iterdir() if p.name.startswith("megactor-rt-")]


def test_serve_logs_json_lines_for_a_log_collector(tmp_path: Path) -> None:
    """serve --log-json: every line on stderr is one JSON object (time, level, logger, message), the server's own
    lines (the demo's notice, listening, a refused request) and the command's last word alike."""
    proc = subprocess.Popen([sys.executable, "-m", "megactor_rt.cli", "serve", "--demo", "--port", "0", "--no-warmup",
                             "--log-json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        port = int(line.split("127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/nope")
        assert conn.getresponse().status == 404
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    records = [json.loads(line) for line in err.splitlines()]  # (each line JSON: nothing else on stderr)
    assert all(set(r) == {"time", "level", "logger", "message"} and r["time"].endswith("+00:00") for r in records)
    said = [(r["level"], r["logger"], r["message"]) for r in records]
    assert ("INFO", "megactor_rt.server", f"listening on http://127.0.0.1:{port}") in said
    assert any(m.startswith("megactor-rt serve --demo: a TINY RANDOM-WEIGHT model") for _, _, m in said)
    assert any(m.startswith("GET /nope: 404 no such page") for _, _, m in said)
    assert said[-1] == ("INFO", "megactor_rt.cli", "terminated") and proc.returncode == 143  # (how a server ends)


# ------------------------------------------------------------------------------------------------- the client


def test_animate_with_server_writes_the_servers_result_here(served: AnimateServer, anim: Animator,
                                                            media: dict[str, Path], tmp_path: Path, scratch: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`animate --server URL` sends the inputs and the times, seed, steps and sound it was given as a job, and writes
    the frames the server's Animator makes for them; the job is deleted on the server afterwards."""
    out = tmp_path / "here.mp4"
    code = main(["-q", "animate", "--server", served.url, "--portrait", str(media["portrait"]), "--driver",
                 str(media["driver"]), "-o", str(out), "--start", "0.08", "--seed", "3", "--no-audio", "--steps", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert re.search(rf"wrote {re.escape(str(out))}: 4 frames in [0-9.]+s \(.*made by {served.url}", captured.out)
    want = tmp_path / "want.mp4"
    anim.animate_to_file(media["portrait"], media["driver"], want, audio=False,
                         config=anim.config.__class__(**{**anim.config.__dict__, "start": 0.08, "seed": 3, "steps": 1}))
    got = decode_all(out)
    assert len(got) == 4 and all(np.array_equal(a, b) for a, b in zip(got, decode_all(want), strict=True))
    import av

    with av.open(str(out)) as c:
        assert not c.streams.audio  # (--no-audio went as audio=none)
    assert json.loads(request(served, "GET", "/jobs")[2])["jobs"] == [] and left(scratch) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here.mp4", "tmp", "want.mp4"]  # (no partial file left)
    again = tmp_path / "again.mp4"  # (the same driver again: the server's plan of it is kept, and said so here)
    assert main(["-q", "animate", "--server", served.url, "--portrait", str(media["portrait"]), "--driver",
                 str(media["driver"]), "-o", str(again), "--start", "0.08", "--steps", "1"]) == 0
    assert re.search(rf"wrote {re.escape(str(again))}: .*driver's faces kept from an earlier result",
                     capsys.readouterr().out)


def test_animate_with_server_refuses_what_the_server_decides_and_names_failures(
        served: AnimateServer, media: dict[str, Path], tmp_path: Path, scratch: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--portrait", str(media["portrait"]), "--driver", str(media["driver"])]
    cases = [
        (["--server", served.url, *common, "-o", str(tmp_path / "a.mp4"), "--feature-reuse", "2", "--window", "4"],
         "--feature-reuse, --window: not with --server. A request carries its files"),
        (["--server", served.url, *common, "-o", str(tmp_path / "take/%05d.png")],
         "with --server the driver is a video file and the result a video file"),
        ([*common, "-o", str(tmp_path / "a.mp4")], "animate needs --weights DIR (converted weights), --server URL"),
        (["--server", "ftp://x", *common, "-o", str(tmp_path / "a.mp4")], "ftp://x: --server takes the address"),
        (["--server", "http://127.0.0.1:9", *common, "-o", str(tmp_path / "a.mp4")],
         "http://127.0.0.1:9: cannot reach the server"),
    ]
    for argv, message in cases:
        assert main(["-q", "animate", *argv]) == 2
        assert message in capsys.readouterr().err
    served.max_upload_bytes = 1000  # (refused here, before the upload)
    assert main(["-q", "animate", "--server", served.url, *common, "-o", str(tmp_path / "a.mp4")]) == 2
    assert f"bytes to send, over the upload limit of {served.url} (1000 bytes: serve --max-upload-mb)" in \
        capsys.readouterr().err
    served.max_upload_bytes = 1 << 30
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code = main(["-q", "animate", "--server", served.url, "--portrait", str(media["portrait"]), str(bad), "--driver",
                 str(media["driver"]), "-o", str(tmp_path / "out"), "--duration", "0.04"])
    captured = capsys.readouterr()
    assert code == 2 and f"error: 1 of 2 results not written: {tmp_path / 'out' / 'bad_talk.mp4'}" in captured.err, \
        captured.err
    assert "bad_talk.mp4: portrait/bad.png: " in captured.err  # (the server's message, naming the upload)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["portrait_talk.mp4"]
    assert json.loads(request(served, "GET", "/jobs")[2])["jobs"] == [] and left(scratch) == []


def test_a_client_takes_the_address_as_serve_prints_it_or_behind_a_proxy() -> None:
    from megactor_rt.client import Client
    from megactor_rt.errors import InputError

    assert (Client("http://127.0.0.1:8450").url, Client("127.0.0.1:8450/").url) == ("http://127.0.0.1:8450",) * 2
    proxied = Client("http://gpu-box/megactor/")
    assert (proxied.url, proxied.host, proxied.port, proxied.prefix) == ("http://gpu-box/megactor", "gpu-box", 80,
                                                                        "/megactor")
    secure = Client("https://gpu-box/")
    assert (secure.url, secure.port) == ("https://gpu-box", 443)
    with pytest.raises(InputError, match="ftp://x: --server takes the address `megactor-rt serve` prints"):
        Client("ftp://x")
    with pytest.raises(InputError, match="ca.pem: --server-ca is for an https:// server; http://x is plain http"):
        Client("http://x", ca_file="ca.pem")


def test_a_post_animate_whose_client_went_away_is_cancelled(served: AnimateServer, media: dict[str, Path],
                                                           scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """POST /animate answers when its run ends: a client that closes its connection meanwhile has nobody waiting
    for the run (hours on a real model), which is cancelled (it ran on before)."""
    import socket

    go = hold_runs(served, monkeypatch)
    body, ctype = form(files(media))
    sock = socket.create_connection(("127.0.0.1", served.server_address[1]), timeout=30)
    sock.sendall(f"POST /animate HTTP/1.1\r\nHost: localhost\r\nContent-Type: {ctype}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_for(served, lambda d: d["running"] is not None)
    running = served.running
    sock.close()
    assert running is not None
    for _ in range(100):  # (looked at every second)
        if running.cancel.is_set():
            break
        time.sleep(0.05)
    assert running.cancel.is_set()
    go.set()
    wait_for(served, lambda d: d["running"] is None)
    for _ in range(200):  # (the request's thread removes its folder once it sees the run end: no answer to wait for)
        if not left(scratch):
            break
        time.sleep(0.05)
    assert running.status == "cancelled" and left(scratch) == []


def test_a_client_stopped_meanwhile_cancels_its_job(served: AnimateServer, media: dict[str, Path], tmp_path: Path,
                                                    scratch: Path) -> None:
    """Ctrl-C in the client (here: raised by its progress function) cancels the job on the server (or deletes it,
    where it was done already); no file of it stays there, and no result here."""
    from megactor_rt.client import Client

    def stop(report: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Client(served.url).animate(media["portrait"], media["driver"], tmp_path / "never.mp4", on_progress=stop)
    wait_for(served, lambda d: d["running"] is None)
    assert [d["status"] for d in json.loads(request(served, "GET", "/jobs")[2])["jobs"]] in ([], ["cancelled"])
    assert left(scratch) == [] and not (tmp_path / "never.mp4").exists()


def test_a_queued_job_cancelled_by_someone_else_is_not_sent_again(served: AnimateServer, media: dict[str, Path],
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A client's job cancelled on the server while it waits (someone's DELETE): the client says it was cancelled,
    and does not take it for a job the server lost (which it would send again)."""
    from megactor_rt.client import Client

    go = hold_runs(served, monkeypatch)
    first = post_job(served, files(media))
    wait_for(served, lambda d: d["status"] == "running", path=f"/jobs/{first}")
    failure: list[BaseException] = []

    def client() -> None:
        try:
            Client(served.url).animate(media["portrait"], media["driver"], tmp_path / "never.mp4")
        except BaseException as exc:  # noqa: BLE001 - looked at below
            failure.append(exc)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    queued = wait_for(served, lambda d: len(d["jobs"]) == 2, path="/jobs")["jobs"][1]["id"]
    assert json.loads(request(served, "DELETE", f"/jobs/{queued}")[2])["status"] == "cancelled"
    thread.join(30)
    assert not thread.is_alive() and len(failure) == 1
    assert isinstance(failure[0], InputError) and "the run was cancelled" in str(failure[0]), failure
    go.set()
    wait_for(served, lambda d: d["status"] == "done", path=f"/jobs/{first}")
    assert [d["id"] for d in json.loads(request(served, "GET", "/jobs")[2])["jobs"]] == [first]  # (none sent again)
    assert not (tmp_path / "never.mp4").exists()


def test_several_servers_share_a_batch(served: AnimateServer, anim: Animator, media: dict[str, Path],
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--server A B` with a jobs file: each server takes the next result when it is free; every result is written
    here, each line naming the server that made it."""
    second = AnimateServer(anim.with_config(), ("127.0.0.1", 0))  # (one Animator per thread, sharing the networks)
    thread = threading.Thread(target=second.serve_forever, daemon=True)
    thread.start()
    try:
        jobs = tmp_path / "jobs.csv"
        jobs.write_text("portrait,driver,output,duration,seed\n" + "".join(
            f"{media['portrait']},{media['driver']},out/{name}.mp4,0.08,{i}\n" for i, name in enumerate("abcd")))
        stats = tmp_path / "stats.json"
        code = main(["-q", "animate", "--server", served.url, second.url, "--jobs", str(jobs), "--stats", str(stats)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        record = json.loads(stats.read_text())
        assert {k: record[k] for k in anim.run_settings()} == anim.run_settings()  # (the servers' model)
        assert sorted((Path(r["output"]).name, r["frames"]) for r in record["runs"]) == [
            ("a.mp4", 2), ("b.mp4", 2), ("c.mp4", 2), ("d.mp4", 2)]
        assert {r["server"] for r in record["runs"]} == {served.url, second.url}
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]
        made_by = re.findall(r"wrote .*: 2 frames in .*made by (http://127.0.0.1:\d+)", captured.out)
        assert len(made_by) == 4 and set(made_by) == {served.url, second.url}, captured.out
        assert [json.loads(request(s, "GET", "/health")[2])["served"] >= 1 for s in (served, second)] == [True, True]
    finally:
        second.shutdown()
        second.server_close()
        thread.join(5)


def test_a_results_folder_the_client_cannot_make_is_named(served: AnimateServer, media: dict[str, Path],
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`animate --server` of a batch whose -o folder cannot be made (under a file): exit 2 naming the folder, as a
    local run's (was "unexpected error: NotADirectoryError")."""
    (tmp_path / "afile").write_text("x")
    other = shutil.copy(media["portrait"], tmp_path / "other.png")
    code = main(["-q", "animate", "--server", served.url, "--portrait", str(media["portrait"]), str(other),
                 "--driver", str(media["driver"]), "-o", str(tmp_path / "afile" / "sub"), "--duration", "0.04"])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'afile' / 'sub'}: cannot create the results folder" in err, err
    assert "unexpected" not in err


def test_one_server_spelt_twice_is_one_server(served: AnimateServer, media: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    """`--server http://127.0.0.1:P 127.0.0.1:P/`: one server (was two clients of it, counted as two servers)."""
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("portrait,driver,output,duration\n" + "".join(
        f"{media['portrait']},{media['driver']},out/{name}.mp4,0.04\n" for name in "ab"))
    again = served.url.replace("http://", "").upper() + "/"
    with caplog.at_level(logging.INFO, logger="megactor_rt"):
        assert main(["-q", "animate", "--server", served.url, again, "--jobs", str(jobs)]) == 0
    assert len(re.findall(r"made by http://", capsys.readouterr().out)) == 2
    assert [r.getMessage().split(":")[0:3] for r in caplog.records if r.getMessage().startswith("server ")] == [
        ["server http", "//127.0.0.1", str(served.server_address[1])]], caplog.text  # (one server asked)


def test_a_setting_given_at_its_default_value_is_sent(anim: Animator, media: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A server started with seed 7: a jobs row's seed 42 and `--seed 42` (the built-in default, given) make their
    results with 42, a row without a seed with the server's 7, and --stats records the seed each was made with
    (was: 42 left to the server, which made it with 7, while --stats said 42; a --stats record of a command
    without --seed said the server's seed whatever the request had)."""
    from megactor_rt.media import result_settings

    seeded = AnimateServer(anim.with_config(seed=7), ("127.0.0.1", 0))
    thread = threading.Thread(target=seeded.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{seeded.server_address[1]}"
    try:
        jobs = tmp_path / "jobs.csv"
        jobs.write_text(f"portrait,driver,output,duration,seed\n{media['portrait']},{media['driver']},row42.mp4,0.04,"
                        f"42\n{media['portrait']},{media['driver']},row_.mp4,0.04,\n")
        stats = tmp_path / "stats.json"
        code = main(["-q", "animate", "--server", url, "--jobs", str(jobs), "--stats", str(stats), "--no-audio"])
        assert code == 0, capsys.readouterr().err
        made = {Path(r["output"]).name: r.get("config", json.loads(stats.read_text())["config"])["seed"]
                for r in json.loads(stats.read_text())["runs"]}
        assert made == {"row42.mp4": 42, "row_.mp4": 7}, made
        for name, seed in made.items():
            assert result_settings(tmp_path / name)["config"]["seed"] == seed  # (what the server made)
        one = tmp_path / "flag42.mp4"
        code = main(["-q", "animate", "--server", url, "--portrait", str(media["portrait"]), "--driver",
                     str(media["driver"]), "-o", str(one), "--duration", "0.04", "--seed", "42", "--no-audio",
                     "--stats", str(stats)])
        assert code == 0, capsys.readouterr().err
        assert result_settings(one)["config"]["seed"] == 42 and json.loads(stats.read_text())["config"]["seed"] == 42
    finally:
        seeded.shutdown()
        seeded.server_close()
        thread.join(5)


def test_a_run_the_servers_stop_cancels_is_answered_as_that(anim: Animator, media: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """POST /animate whose run the server's stop (Ctrl-C, SIGTERM) cancels: 503, to send again (was 410 "the run was
    cancelled (DELETE /jobs/ID)", naming a DELETE nobody sent and a job id its client never saw); one still waiting
    for its turn is told its run never began (was told it was under way)."""
    answers: list[tuple[int, dict[str, str], bytes]] = []
    waiting: list[tuple[int, dict[str, str], bytes]] = []
    body, ctype = form({**files(media), "duration": "0.04"})
    with serving(anim) as srv:
        started = threading.Event()
        real = srv.anim.animate_to_file

        def held(*args: Any, **kw: Any) -> Any:
            started.set()
            while not srv._closing:  # (set by the server's stop, the moment the test leaves its block)
                time.sleep(0.01)
            return real(*args, **kw)

        monkeypatch.setattr(srv.anim, "animate_to_file", held)
        client = threading.Thread(target=lambda: answers.append(request(srv, "POST", "/animate", body, ctype)),
                                  daemon=True)
        client.start()
        assert started.wait(60)
        second = threading.Thread(target=lambda: waiting.append(request(srv, "POST", "/animate", body, ctype)),
                                  daemon=True)
        second.start()
        wait_for(srv, lambda h: h["waiting"] == 1)
    client.join(60)
    second.join(60)
    (status, _, answer), = answers
    assert status == 503 and "the server stopped while the run was under way" in json.loads(answer)["error"], answer
    (status, _, answer), = waiting
    assert status == 503 and "the server stopped before the run began" in json.loads(answer)["error"], answer


_PYTHON_SERVER = """
import sys
from megactor_rt.config import AnimateConfig
from megactor_rt.runtime.animator import Animator
from megactor_rt.server import AnimateServer
srv = AnimateServer(Animator.demo(seed=0, device="cpu", config=AnimateConfig(steps=2, window=4, overlap=2)),
                    ("127.0.0.1", 0))
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


def test_a_python_api_server_stopped_by_ctrl_c_leaves_no_folder(media: dict[str, Path], tmp_path: Path) -> None:
    """The README's ``AnimateServer(anim, address).serve_forever()`` ended by Ctrl-C (a KeyboardInterrupt, no
    server_close) removes its temporary folders as the process exits (was: each kept job's folder with its result,
    and the kept drivers, stayed in /tmp for good)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _PYTHON_SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TMPDIR": str(scratch)})
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        srv: Any = SimpleNamespace(server_address=("127.0.0.1", port))  # (what request() reads of a server)
        job = post_job(srv, {**files(media), "duration": "0.04"})
        wait_for(srv, lambda doc: doc["status"] == "done", 120, f"/jobs/{job}")
        assert any(scratch.glob("megactor-rt-serve-*/result/me_talk.mp4"))  # (kept for GET /jobs/ID/result)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait(30)
    assert "KeyboardInterrupt" in err, err
    assert sorted(p.name for p in scratch.iterdir() if p.name.startswith("megactor-rt-serve")) == []


def test_a_form_still_coming_when_the_server_stops_is_refused_and_leaves_nothing(
        anim: Animator, media: dict[str, Path], scratch: Path) -> None:
    """A form whose upload goes on after the server was closed (server_close removed its folder) is answered 503
    and its files removed (it was queued on the stopped server, never run: its client waited for ever, and its
    folder and the kept drivers' folder, made again by its next part, stayed)."""
    import socket

    body, ctype = form(files(media))
    half = body.index(b"talk.mp4")  # (the portrait sent, then the server stops, then the driver)
    srv = AnimateServer(anim, ("127.0.0.1", 0))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=30) as sock:
        sock.sendall(f"POST /animate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:half])
        end = time.monotonic() + 30
        while not list(scratch.glob("megactor-rt-serve-*/portrait/me.png")) and time.monotonic() < end:
            time.sleep(0.05)
        srv.shutdown()
        srv.server_close()
        thread.join(5)
        sock.sendall(body[half:])
        answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:300]
    assert b"the server is stopping" in answer, answer
    assert sorted(p.name for p in scratch.iterdir()) == []


def test_a_stopping_server_sends_its_503s_before_it_is_closed(anim: Animator, media: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` ends its process at once when its server is closed (Ctrl-C, SIGTERM): the 503s of the POST /animate
    requests the stop ended, the run under way and those queued, are sent before server_close returns (the client
    of the run under way got its headers and no body: IncompleteRead)."""
    sent: list[int] = []
    real_answer = server_module._Handler._answer

    def answer(self: Any, status: int, *args: Any, **kw: Any) -> None:
        real_answer(self, status, *args, **kw)
        if self.command == "POST":
            sent.append(status)

    monkeypatch.setattr(server_module._Handler, "_answer", answer)
    body, ctype = form({**files(media), "duration": "0.04"})
    clients = [threading.Thread(target=lambda: request(srv, "POST", "/animate", body, ctype), daemon=True)
               for _ in range(2)]
    with serving(anim) as srv:
        real_run, real_release = srv.anim.animate_to_file, srv.release

        def held(*args: Any, **kw: Any) -> Any:  # (its first progress report comes after the stop: cancelled there)
            while not srv._closing:
                time.sleep(0.01)
            return real_run(*args, **kw)

        monkeypatch.setattr(srv.anim, "animate_to_file", held)

        def slow_release(path: Path) -> None:  # (a request's answer comes a moment after its run's end)
            time.sleep(0.5)
            real_release(path)

        monkeypatch.setattr(srv, "release", slow_release)
        clients[0].start()
        wait_for(srv, lambda h: h["running"] is not None)
        clients[1].start()
        wait_for(srv, lambda h: h["waiting"] == 1)
    assert sent == [503, 503]
    for client in clients:
        client.join(60)


def test_a_server_that_stops_answering_hands_its_results_to_the_others(
        served: AnimateServer, media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """`--server A B` where B answered at the start, then went away: its job goes back to A, which makes every
    result (B took job after job and failed each while A stood idle); where every server is gone, the results
    fail with the reason."""
    from megactor_rt.client import Client, Unreachable

    dead = "http://127.0.0.1:9"
    real_health, real_animate = Client.health, Client.animate
    tries: list[str] = []

    def health(self: Client) -> object:
        return real_health(Client(served.url)) if self.url == dead else real_health(self)

    def animate(self: Client, *args: object, **kw: object) -> object:
        if self.url == dead or self.url in gone:
            tries.append(self.url)
            raise Unreachable(f"{self.url}: cannot reach the server (ConnectionRefusedError)")
        time.sleep(0.3)  # (so that the dead server takes its turn meanwhile)
        return real_animate(self, *args, **kw)

    monkeypatch.setattr(Client, "health", health)
    monkeypatch.setattr(Client, "animate", animate)
    gone: set[str] = set()
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("portrait,driver,output,duration\n" + "".join(
        f"{media['portrait']},{media['driver']},out/{name}.mp4,0.08\n" for name in "abc"))
    with caplog.at_level(logging.WARNING, "megactor_rt.cli"):
        code = main(["-q", "animate", "--server", served.url, dead, "--jobs", str(jobs)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mp4", "b.mp4", "c.mp4"]
    assert tries == [dead] and caplog.text.count("its results go to the other servers") == 1
    gone.add(served.url)  # (now every server is gone: failed, each naming why, and no wait for one to come back)
    shutil.rmtree(tmp_path / "out")
    code = main(["-q", "animate", "--server", served.url, dead, "--jobs", str(jobs)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("cannot reach the server") >= 2 and "3 of 3 results not written" in err, err


def test_a_server_refusing_connections_hands_its_job_over_at_once(
        served: AnimateServer, media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--server A B` where B answered at the start and then refuses connections (its process gone): the job whose
    form was refused goes to A at once (the form never arrived), not after waiting out B's outage (2 minutes, the
    batch's last job held so)."""
    from megactor_rt import client as client_module
    from megactor_rt.client import Client

    dead, real_health, real_pause = "http://127.0.0.1:9", Client.health, client_module._pause

    def health(self: Client) -> object:  # (B answered at the start, as a server that takes keys)
        if self.url != dead:
            return real_health(self)
        doc = real_health(Client(served.url))
        self.keyed, self.max_upload_bytes = True, doc["max_upload_bytes"]
        return doc

    paused: list[str] = []

    def pause(seconds: float, stop: object, what: str) -> None:
        paused.append(what)
        real_pause(min(seconds, 0.01), stop, what)  # type: ignore[arg-type]

    monkeypatch.setattr(Client, "health", health)
    monkeypatch.setattr(client_module, "_pause", pause)
    monkeypatch.setattr(client_module, "OUTAGE_S", 1.0)
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("portrait,driver,output,duration\n" + "".join(
        f"{media['portrait']},{media['driver']},out/{name}.mp4,0.04\n" for name in "ab"))
    code = main(["-q", "animate", "--server", dead, served.url, "--jobs", str(jobs)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mp4", "b.mp4"]
    assert not [w for w in paused if dead in w], paused


def test_a_server_refusing_one_connection_goes_on_with_the_batch(
        served: AnimateServer, anim: Animator, media: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """`--server A B` where B refuses one connection (a restart of a second): that job goes to A, and B, asked again,
    makes results again (one refusal retired it for the rest of the batch: A made every result)."""
    from megactor_rt.client import Client, Unreachable

    real_submit, refused = Client.submit, []

    with _another_server(anim, monkeypatch) as other:
        def submit(self: Client, *args: Any, **kw: Any) -> str:
            if self.url == other.url and not refused:
                refused.append(1)
                raise Unreachable(f"{self.url}: cannot reach the server (ConnectionRefusedError)", refused=True)
            return real_submit(self, *args, **kw)

        monkeypatch.setattr(Client, "submit", submit)
        monkeypatch.setattr(cli, "REFUSED_PAUSE_S", 0.05)
        jobs = tmp_path / "jobs.csv"
        jobs.write_text("portrait,driver,output,duration,seed\n" + "".join(
            f"{media['portrait']},{media['driver']},out/{name}.mp4,0.04,{i}\n" for i, name in enumerate("abcdef")))
        stats = tmp_path / "stats.json"
        with caplog.at_level(logging.WARNING, "megactor_rt.cli"):
            code = main(["-q", "animate", "--server", served.url, other.url, "--jobs", str(jobs), "--stats",
                         str(stats)])
        assert code == 0, capsys.readouterr().err
    made_by = [r["server"] for r in json.loads(stats.read_text())["runs"]]
    assert len(made_by) == 6 and made_by.count(other.url) >= 1 and refused == [1], made_by
    assert "the job goes to another server (this one is asked again for up to" in caplog.text
    assert "its results go to the other servers" not in caplog.text


@contextlib.contextmanager
def _another_server(anim: Animator, monkeypatch: pytest.MonkeyPatch,
                    run: Callable[..., object] | None = None) -> Iterator[AnimateServer]:
    """A second server on a free port, with an Animator of its own sharing ``anim``'s networks (``run``: in place of
    its ``animate_to_file``), answering until the block ends."""
    with serving(anim.with_config()) as other:
        if run is not None:
            monkeypatch.setattr(other.anim, "animate_to_file", run)
        yield other


def _gpu_fault(*args: object, **kw: object) -> object:
    """A server's every run, where its GPU is in a bad state."""
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_server_down_from_the_start_leaves_the_batch_to_the_others(
        served: AnimateServer, media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """`--server A B` where B cannot be reached at the start: A makes every result and B is named in a warning
    (the whole batch was refused, while a server that went away later handed its work on); every server down: the
    error, as before."""
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("portrait,driver,output,duration\n" + "".join(
        f"{media['portrait']},{media['driver']},out/{name}.mp4,0.04\n" for name in "ab"))
    dead = "http://127.0.0.1:9"
    with caplog.at_level(logging.WARNING, "megactor_rt.cli"):
        code = main(["-q", "animate", "--server", dead, served.url, "--jobs", str(jobs)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mp4", "b.mp4"]
    assert f"{dead}: cannot reach the server" in caplog.text and "the results go to the other server(s)" in caplog.text
    assert main(["-q", "animate", "--server", dead, "http://127.0.0.1:7", "--jobs", str(jobs)]) == 2
    assert f"{dead}: cannot reach the server" in capsys.readouterr().err


def test_a_server_that_fails_runs_itself_hands_its_results_to_the_others(
        served: AnimateServer, anim: Animator, media: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """`--server A B` where B fails every run with an error of its own (a GPU in a bad state: 500, fast): its jobs go
    to A, which makes every result (B took job after job, failing each, 5 of 6 results lost). A result whose run
    fails for the server's reason on every server fails (handed over once, not around for ever)."""
    with _another_server(anim, monkeypatch, _gpu_fault) as broken, \
            _another_server(anim, monkeypatch, _gpu_fault) as also_broken:
        jobs = tmp_path / "jobs.csv"
        jobs.write_text("portrait,driver,output,duration\n" + "".join(
            f"{media['portrait']},{media['driver']},out/{name}.mp4,0.08\n" for name in "abcd"))
        with caplog.at_level(logging.WARNING, "megactor_rt.cli"):
            code = main(["-q", "animate", "--server", broken.url, served.url, "--jobs", str(jobs)])
        assert code == 0, capsys.readouterr().err
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]
        assert caplog.text.count("an error of the server's own, not the request's: its results go to the other") == 1
        shutil.rmtree(tmp_path / "out")
        code = main(["-q", "animate", "--server", broken.url, also_broken.url, "--jobs", str(jobs)])
        err = capsys.readouterr().err  # (each result tried on a second server once, then failed naming the error)
        assert code == 2 and "4 of 4 results not written" in err and "illegal memory access" in err, err


def test_one_pair_with_two_servers_goes_to_the_other_where_one_fails(
        served: AnimateServer, anim: Animator, media: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--server A B -p me.png -d meme.mp4 -o out.mp4` where A fails every run for its own reason (500): the one
    result is made by B, as a --jobs file of one row has it made (it failed with exit 2, B standing idle)."""
    with _another_server(anim, monkeypatch, _gpu_fault) as broken:
        code = main(["-q", "animate", "--server", broken.url, served.url, "--portrait", str(media["portrait"]),
                     "--driver", str(media["driver"]), "-o", str(tmp_path / "out.mp4"), "--duration", "0.08"])
        assert code == 0, capsys.readouterr().err
        assert (tmp_path / "out.mp4").stat().st_size > 0


def test_a_request_that_fails_every_server_retires_none_of_them(
        served: AnimateServer, anim: Animator, media: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--server A B` where one request's run fails on every server with 500 (an input that crashes a decoder: the
    request's fault, told as the server's): it fails, and both servers go on making the batch's other results (the
    first server to fail it was retired for the rest of the batch, the other making every result alone)."""
    bad = tmp_path / "bad.png"
    shutil.copy(media["portrait"], bad)
    with _another_server(anim, monkeypatch) as second:
        for srv in (served, second):
            def crash(portrait: Path, *args: object, _real: Any = srv.anim.animate_to_file, **kw: object) -> object:
                if Path(portrait).name == "bad.png":
                    raise RuntimeError("the decoder crashed on this input")
                return _real(portrait, *args, **kw)

            monkeypatch.setattr(srv.anim, "animate_to_file", crash)
        jobs = tmp_path / "jobs.csv"
        jobs.write_text(f"portrait,driver,output,duration\n{bad},{media['driver']},out/bad.mp4,0.08\n" + "".join(
            f"{media['portrait']},{media['driver']},out/{name}.mp4,0.08\n" for name in "bcdef"))
        stats = tmp_path / "stats.json"
        code = main(["-q", "animate", "--server", served.url, second.url, "--jobs", str(jobs), "--stats", str(stats)])
        err = capsys.readouterr().err
        assert code == 2 and "1 of 6 results not written" in err and "decoder crashed" in err, err
        runs = json.loads(stats.read_text())["runs"]
        assert sorted(Path(r["output"]).name for r in runs if not r.get("error")) == [f"{c}.mp4" for c in "bcdef"]
        assert {r["server"] for r in runs if not r.get("error")} == {served.url, second.url}, runs


def test_progress_json_from_a_server_gives_each_stages_last_line(served: AnimateServer, media: dict[str, Path],
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--progress-json with --server: the client sees the server's progress when it looks, and the last report of
    a stage fell between two looks (denoise stopped at 46 of 48, then write): each stage's last line is given, as
    a local run gives it, once the server has gone past the stage (here: what the client's looks saw is scripted,
    every last report missed; the tiny run itself may end before the client's first look)."""
    from megactor_rt.client import Client
    from megactor_rt.progress import Progress

    real = Client.animate
    looks = [Progress("driver", 2, 6, "frame"), Progress("denoise", 3, 8, "window"), Progress("write", 1, 6, "frame")]

    def missing_the_ends(self: Client, portrait: object, driver: object, output: object, fields: object,
                         files: object, on_progress: Any, stop: object) -> object:
        for report in looks:
            on_progress(report)
        return real(self, portrait, driver, output, fields, files, None, stop)

    monkeypatch.setattr(Client, "animate", missing_the_ends)
    lines = tmp_path / "progress.jsonl"
    assert main(["-q", "animate", "--server", served.url, "--portrait", str(media["portrait"]), "--driver",
                 str(media["driver"]), "-o", str(tmp_path / "out.mp4"), "--progress-json", str(lines)]) == 0
    reports = [(r["stage"], r["done"], r["total"]) for r in map(json.loads, lines.read_text().splitlines())]
    assert reports == [("driver", 2, 6), ("driver", 6, 6), ("denoise", 3, 8), ("denoise", 8, 8), ("write", 1, 6),
                       ("write", 6, 6)], reports


def test_ctrl_c_in_animate_with_server_cancels_the_job_there(served: AnimateServer, media: dict[str, Path],
                                                             tmp_path: Path, scratch: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    import _thread

    go = hold_runs(served, monkeypatch)

    def interrupt_when_running() -> None:
        wait_for(served, lambda d: d["running"] is not None)
        _thread.interrupt_main()  # (Ctrl-C)

    threading.Thread(target=interrupt_when_running, daemon=True).start()
    code = main(["-q", "animate", "--server", served.url, "--portrait", str(media["portrait"]), "--driver",
                 str(media["driver"]), "-o", str(tmp_path / "never.mp4")])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert "cancelling the job(s) on the server(s) (a second Ctrl-C leaves them running" in caplog.text
    running = served.running  # (asked to stop before the command returned: the command line ends the process
    assert running is not None and running.cancel.is_set()  # at once after it, its threads with it)
    go.set()
    wait_for(served, lambda d: d["running"] is None)
    assert [d["status"] for d in json.loads(request(served, "GET", "/jobs")[2])["jobs"]] == ["cancelled"]
    assert not (tmp_path / "never.mp4").exists() and left(scratch) == []


def test_skip_existing_with_a_server_keeps_results_and_names_other_settings(
        served: AnimateServer, media: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A batch run again with --skip-existing makes only what is missing; a kept result made with settings other
    than this run's (the server's, with the request's own) gets a warning naming them."""
    out = tmp_path / "out"
    out.mkdir()
    argv = ["-q", "animate", "--server", served.url, "--portrait", str(media["portrait"]), "--driver",
            str(media["driver"]), "-o", str(out / "a.mp4"), "--duration", "0.08", "--steps", "1"]
    assert main(argv) == 0
    made = (out / "a.mp4").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*argv, "--skip-existing"]) == 0
    assert f"kept {out / 'a.mp4'}: it exists (--skip-existing)" in capsys.readouterr().out
    assert (out / "a.mp4").stat().st_mtime_ns == made and "other settings" not in caplog.text
    assert main([*argv[:-2], "--skip-existing"]) == 0  # (the server's 2 steps now)
    assert "was made with other settings than this run's: steps 1 (now 2)" in caplog.text


class _FullDisk:
    """A file being written on a disk that is full (or failing: ``code``)."""

    def __init__(self, file: Any, code: int) -> None:
        self.file, self.code = file, code

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def write(self, data: bytes) -> int:
        raise OSError(self.code, os.strerror(self.code))


def test_a_full_disk_while_a_form_comes_is_answered_503(served: AnimateServer, media: dict[str, Path],
                                                        scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload the disk has no room for: 503 naming the full disk (POST /animate and POST /jobs), nothing left;
    another write error: 500."""
    import builtins
    import errno

    code = [errno.ENOSPC]

    def full(file: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
        opened = builtins.open(file, mode, *args, **kw)  # noqa: SIM115 - the server closes it
        return _FullDisk(opened, code[0]) if "w" in mode and Path(file).parent.name == "driver" else opened

    monkeypatch.setattr(server_module, "open", full, raising=False)
    body, ctype = form(files(media))
    for route in ("/animate", "/jobs"):
        status, headers, said = request(served, "POST", route, body, ctype)
        assert status == 503 and headers["Retry-After"] == "10", said
        assert json.loads(said)["error"] == (f"the server's disk is full ({scratch}: [Errno 28] No space left on "
                                             "device); try again later")
    code[0] = errno.EIO
    status, _, said = request(served, "POST", "/jobs", body, ctype)
    assert status == 500 and json.loads(said)["error"].startswith("the server failed: OSError: [Errno 5]"), said
    assert left(scratch) == [] and json.loads(request(served, "GET", "/jobs")[2])["jobs"] == []


def test_a_result_that_cannot_be_read_is_a_server_failure_not_gone(served: AnimateServer, media: dict[str, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A done job's result there but unreadable (its permissions): 500 naming it; 410 only once it is gone."""
    import builtins
    import errno

    job = post_job(served, files(media))
    wait_for(served, lambda d: d["status"] == "done", path=f"/jobs/{job}")
    task = served.task(job)[0]  # type: ignore[index]

    def denied(file: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
        if Path(file) == task.result:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return builtins.open(file, mode, *args, **kw)

    monkeypatch.setattr(server_module, "open", denied, raising=False)
    status, _, said = request(served, "GET", f"/jobs/{job}/result")
    assert status == 500 and json.loads(said)["error"] == (f"job {job}: its result me_talk.mp4 cannot be read "
                                                           "(Permission denied)"), said
    monkeypatch.delattr(server_module, "open")
    task.result.unlink()
    assert request(served, "GET", f"/jobs/{job}/result")[0] == 410
