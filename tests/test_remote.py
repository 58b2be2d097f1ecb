"""Portraits and drivers given as web addresses (:mod:`megactor_rt.remote`), served here by a local HTTP server:
downloaded before any work under their own names, removed afterwards; a server's refusal, an unreachable host and
a download that breaks off are named."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from media_fixtures import PORTRAIT, write_face_driver

from megactor_rt import remote
from megactor_rt.cli import main
from megactor_rt.errors import InputError
from megactor_rt.media import result_settings
from megactor_rt.remote import as_url, download, file_name


class _Short(http.server.SimpleHTTPRequestHandler):
    """Serves files, but announces one byte more than it sends for short.mp4 (a download that breaks off), is always
    busy (503) for busy.mp4, and serves flaky.mp4 (the file talk.mp4) busy at first, then breaking off halfway, then
    the rest as the byte range asked for."""

    requests: list[str] = []
    ranges: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        _Short.requests.append(self.path)
        _Short.ranges.append(self.headers.get("Range"))
        if self.path.endswith("/unsized.mp4"):  # (no length announced: the end of the connection ends it)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"0123456789" * 300_000)
            self.close_connection = True
            return
        if self.path.endswith("/busy.mp4"):
            self._busy()
            return
        if self.path.endswith("/flaky.mp4"):
            data = (Path(self.directory) / "talk.mp4").read_bytes()
            tries = _Short.requests.count(self.path)
            if tries == 1:
                self._busy(retry_after="0")
                return
            start = int(self.headers["Range"].split("=")[1].rstrip("-")) if tries == 3 else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            self.wfile.write(data[start:] if start else data[:len(data) // 2])
            self.close_connection = True
            return
        if self.path.endswith("/otherpart.mp4"):  # (broken off, then a part from another byte than asked for)
            data = (Path(self.directory) / "talk.mp4").read_bytes()
            tries = _Short.requests.count(self.path)
            start = 10 if tries == 2 else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            self.wfile.write(data[start:] if tries != 1 else data[:len(data) // 2])
            self.close_connection = True
            return
        if self.path.endswith("/short.mp4"):
            self.send_response(200)
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.close_connection = True
            return
        super().do_GET()

    def _busy(self, retry_after: str | None = None) -> None:
        self.send_response(503)
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # (the local server is reached directly)
    monkeypatch.setattr(remote, "RETRY_WAIT_S", 0.01)
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Short, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_addresses_and_names() -> None:
    assert as_url("https://example.com/a/meme.mp4") == "https://example.com/a/meme.mp4"
    assert as_url(Path("https://example.com/a/meme.mp4")) == "https://example.com/a/meme.mp4"  # (argparse's Path)
    assert as_url("HTTP://x/y") == "http://x/y" and as_url("meme.mp4") is None and as_url("ftp://x/y") is None
    assert file_name("https://x/clips/my%20meme.gif?s=1") == "my meme.gif"
    assert file_name("https://x/") == "download" and file_name("https://x/a/..%2F..%2Fevil") == "_.._evil"


def test_a_download_is_tried_again_and_goes_on_where_it_broke_off(server: tuple[str, Path], tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A passing refusal (503) and a download that breaks off are tried again, the second time from the byte it
    broke off at; a server that stays busy is given up after 3 tries, a 404 at once."""
    url, served = server
    write_face_driver(served / "talk.mp4", n=4)
    _Short.requests.clear()
    _Short.ranges.clear()
    (tmp_path / "a").mkdir()
    got = download(f"{url}/flaky.mp4", tmp_path / "a")
    assert got.read_bytes() == (served / "talk.mp4").read_bytes()
    half = (served / "talk.mp4").stat().st_size // 2
    assert _Short.ranges == [None, None, f"bytes={half}-"]
    assert "the server answered 503 Service Unavailable; trying again in 0 s" in caplog.text  # (its Retry-After)
    assert "the download broke off" in caplog.text
    _Short.requests.clear()
    (tmp_path / "b").mkdir()
    with pytest.raises(InputError, match=r"busy.mp4: the server answered 503 Service Unavailable \(3 tries\)"):
        download(f"{url}/busy.mp4", tmp_path / "b")
    with pytest.raises(InputError, match="the server answered 404"):
        download(f"{url}/none.mp4", tmp_path / "b")
    assert _Short.requests == ["/busy.mp4"] * 3 + ["/none.mp4"]
    (tmp_path / "c").mkdir()
    with pytest.raises(InputError, match=r"unsized.mp4: larger than the limit of 1000000 bytes$"):
        download(f"{url}/unsized.mp4", tmp_path / "c", max_bytes=1_000_000)  # (found as it arrives)
    with pytest.raises(InputError, match=r"flaky.mp4: \d+ bytes, larger than the limit of 10 bytes$"):
        download(f"{url}/flaky.mp4", tmp_path / "c", max_bytes=10)  # (by its announced length)
    assert list((tmp_path / "c").iterdir()) == []  # (what came of them removed)
    assert len(download(f"{url}/unsized.mp4", tmp_path / "c").read_bytes()) == 3_000_000
    (tmp_path / "d").mkdir()  # a part from another byte than asked for: the whole file asked for again (was
    got = download(f"{url}/otherpart.mp4", tmp_path / "d")  # taken as the whole file: its first bytes lost)
    assert got.read_bytes() == (served / "talk.mp4").read_bytes()
    assert _Short.ranges[-3:] == [None, f"bytes={half}-", None]


def test_a_driver_and_portrait_from_the_web_run_as_their_files(server: tuple[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """demo with both inputs as addresses: downloaded (under their names: the result's settings record them),
    animated, and the downloads removed; a 404, a host that refuses and a download cut short are exit 2, each
    named, with no result."""
    url, served = server
    write_face_driver(served / "talk.mp4", n=4)
    (served / "me.png").write_bytes(PORTRAIT.read_bytes())
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # (TMPDIR is read again)
    common = ["-q", "demo", "--steps", "1", "--window", "4", "--overlap", "2"]
    out = tmp_path / "r.mp4"
    from media_fixtures import write_sine_audio

    write_sine_audio(served / "song.m4a", seconds=1.0)
    code = main([*common, "--portrait", f"{url}/me.png", "--driver", f"{url}/talk.mp4", "--audio",
                 f"{url}/song.m4a", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    settings = result_settings(out)
    assert settings is not None and (settings["portrait"], settings["driver"]) == ("me.png", "talk.mp4")
    assert settings["options"]["audio"] == "song.m4a"
    assert list(scratch.glob("megactor-rt-*")) == []
    for address, problem in ((f"{url}/nothing.mp4", "the server answered 404"),
                             ("http://127.0.0.1:9/x.mp4", "cannot download it"),
                             (f"{url}/short.mp4", "the download broke off")):
        code = main([*common, "--driver", address, "-o", str(tmp_path / "bad.mp4")])
        err = capsys.readouterr().err
        assert code == 2 and f"{address}: {problem}" in err, err
    assert not (tmp_path / "bad.mp4").exists() and list(scratch.glob("megactor-rt-*")) == []
    with pytest.raises(InputError, match="the server answered 404"):
        download(f"{url}/nothing.mp4", tmp_path)
    (served / "notes.mp4").write_text("not a video")
    code = main(["-q", "inspect", f"{url}/talk.mp4", f"{url}/notes.mp4", "--no-faces", "--json"])
    captured = capsys.readouterr()
    import json

    report = json.loads(captured.out)
    assert code == 2 and list(report) == [f"{url}/talk.mp4"] and report[f"{url}/talk.mp4"]["frames"] == 4
    assert f"error: {url}/notes.mp4: not a readable" in captured.err, captured.err  # (the address, not the copy)
    assert list(scratch.glob("megactor-rt-*")) == []


def test_a_jobs_files_addresses_are_downloaded_once_each(server: tuple[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--jobs rows may give web addresses for their inputs (not their outputs): each address is downloaded once,
    before any work, for every row that names it; a row's failed download is named with the address."""
    from megactor_rt.config import tiny_config
    from megactor_rt.weights import build_models, write_converted

    url, served = server
    write_face_driver(served / "talk.mp4", n=4)
    (served / "me.png").write_bytes(PORTRAIT.read_bytes())
    models = build_models(tiny_config(), seed=0)
    weights = write_converted(tiny_config(), {n: m.state_dict() for n, m in models.modules().items()},
                              tmp_path / "tiny")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("portrait,driver,output\n"
                    f"{url}/me.png,{url}/talk.mp4,out/a.mp4\n"
                    f"{PORTRAIT},{url}/talk.mp4,out/b.mp4\n")
    _Short.requests.clear()
    code = main(["-q", "animate", "--jobs", str(jobs), "--weights", str(weights), "--device", "cpu", "--steps", "1",
                 "--window", "4", "--overlap", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mp4", "b.mp4"]
    assert sorted(_Short.requests) == ["/me.png", "/talk.mp4"]  # once each
    settings = result_settings(tmp_path / "out" / "a.mp4")
    assert settings is not None and (settings["portrait"], settings["driver"]) == ("me.png", "talk.mp4")
    jobs.write_text(f"portrait,driver,output\n{PORTRAIT},{url}/gone.mp4,out/c.mp4\n")
    code = main(["-q", "animate", "--jobs", str(jobs), "--weights", str(weights), "--device", "cpu"])
    assert code == 2 and f"{url}/gone.mp4: the server answered 404" in capsys.readouterr().err
    assert not (tmp_path / "out" / "c.mp4").exists()
