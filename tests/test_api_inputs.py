"""What the Python API (:class:`~megactor_rt.client.Client`, :class:`~megactor_rt.runtime.animator.Animator`,
:class:`~megactor_rt.config.AnimateConfig`) checks of its arguments before any work, as the CLI checks its flags:
a result that would replace an input, a result's format and path, values of the wrong type."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from media_fixtures import DRIVER, PORTRAIT

from megactor_rt.client import Client
from megactor_rt.errors import InputError


class _Stub(http.server.BaseHTTPRequestHandler):
    """A stand-in for ``megactor-rt serve``: takes any job (its form kept in ``forms``), says it is done, and sends
    ``RESULT`` as its result."""

    forms: list[bytes] = []

    def _answer(self, status: int, doc: dict[str, object] | None = None, body: bytes | None = None) -> None:
        data = json.dumps(doc).encode() if body is None else body
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            self._answer(200, {"max_upload_bytes": 1 << 30})
        elif self.path.endswith("/result"):
            self._answer(200, body=b"RESULT")
        else:
            self._answer(200, {"status": "done"})

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        _Stub.forms.append(self.rfile.read(int(self.headers["Content-Length"])))
        self._answer(202, {"id": "j1"})

    def do_DELETE(self) -> None:  # noqa: N802 - http.server's name
        self._answer(200, {})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # (the local server is reached directly)
    _Stub.forms = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Client(f"http://127.0.0.1:{httpd.server_address[1]}", timeout_s=10)
    finally:
        httpd.shutdown()
        httpd.server_close()


def _format_sent(form: bytes) -> str:
    return form.split(b'name="format"\r\n\r\n')[1].split(b"\r\n")[0].decode()


def test_a_clients_result_never_replaces_its_inputs(stub: Client, tmp_path: Path) -> None:
    portrait, driver = tmp_path / "me.png", tmp_path / "talk.mp4"
    shutil.copy(PORTRAIT, portrait)
    shutil.copy(DRIVER, driver)
    mask = tmp_path / "mask.png"
    shutil.copy(PORTRAIT, mask)
    for output, what in ((portrait, "portrait"), (driver, "driver"), (tmp_path / "." / "talk.mp4", "driver")):
        with pytest.raises(InputError, match=f"would overwrite the {what}"):
            stub.animate(portrait, driver, output)
    with pytest.raises(InputError, match="would overwrite the mask"):
        stub.animate(portrait, driver, tmp_path / "mask.png", fields={"format": "mp4"}, files={"mask": mask})
    assert _Stub.forms == []  # (refused before anything was sent)
    assert portrait.read_bytes() == PORTRAIT.read_bytes() and driver.read_bytes() == DRIVER.read_bytes()


def test_a_clients_result_format_is_its_suffixes(stub: Client, tmp_path: Path) -> None:
    for name, fmt in (("a.gif", "gif"), ("b.WEBP", "webp"), ("c.mp4", "mp4"), ("d.mkv", "mkv")):
        stub.animate(PORTRAIT, DRIVER, tmp_path / name)
        assert _format_sent(_Stub.forms[-1]) == fmt and (tmp_path / name).read_bytes() == b"RESULT"
    stub.animate(PORTRAIT, DRIVER, tmp_path / "e.mp4", fields={"format": "gif"})  # (the caller's word stands)
    assert _format_sent(_Stub.forms[-1]) == "gif"


def test_a_clients_result_path_is_checked_before_sending(stub: Client, tmp_path: Path) -> None:
    (tmp_path / "folder.mp4").mkdir()
    for output, message in ((tmp_path / "missing" / "a.mp4", "output folder .* does not exist"),
                            (tmp_path / "folder.mp4", "output path is a directory"),
                            (tmp_path / "take" / "%05d.png", "image sequences .* are made by a local run"),
                            (tmp_path / "a.txt", "a server writes a video file"),
                            (Path("-"), "made by a local run")):
        with pytest.raises(InputError, match=message):
            stub.animate(PORTRAIT, DRIVER, output)
    assert _Stub.forms == []
