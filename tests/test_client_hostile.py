"""The client of ``megactor-rt serve`` (:class:`~megactor_rt.client.Client`) against a scripted stand-in server that
answers as a failing server or proxy would: passing refusals and outages are ridden out, a finished result is never
deleted because it could not be fetched, malformed answers are named errors, a corrupted result is refused."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from media_fixtures import PORTRAIT

from megactor_rt import client as client_module
from megactor_rt.client import Client, result_stats
from megactor_rt.errors import InputError, MegactorError

JOB = "0123456789ab"
VIDEO = bytes(range(256)) * 40  # (the "result": its bytes are only compared)
TAG = f'"{JOB}-{len(VIDEO):x}-1"'
CUT = "cut"  # a body that ends (the connection closed) before its announced length
HANG = "hang"  # no answer for HANG_S (a server whose process is stopped: the connection taken, nothing said)
HANG_S = 3.0


def result(status: int = 200, start: int = 0, headers: dict[str, str] | None = None, body: Any = None,
           ) -> tuple[int, dict[str, str], Any]:
    """A result answer as the real server gives it (Content-Length, ETag, X-Megactor-*), ``headers`` overriding."""
    head = {"Content-Type": "video/mp4", "Content-Length": str(len(VIDEO) - start), "ETag": TAG,
            "X-Megactor-Frames": "4", "X-Megactor-Seconds": "1.5"}
    if status == 206:
        head["Content-Range"] = f"bytes {start}-{len(VIDEO) - 1}/{len(VIDEO)}"
    head.update(headers or {})
    return status, {k: v for k, v in head.items() if v is not None}, VIDEO[start:] if body is None else body


def answer(status: int, doc: Any = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    body = doc if isinstance(doc, bytes) else json.dumps({} if doc is None else doc).encode()
    return status, {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}, body


class _Fake(http.server.BaseHTTPRequestHandler):
    """Answers each "METHOD /path" with the next of its scripted answers (the last one again once they run out)."""

    script: dict[str, list[tuple[int, dict[str, str], Any]]] = {}
    asked: list[str] = []
    keys: list[str | None] = []  # (each POST's Idempotency-Key)

    def _answer(self) -> None:
        key = f"{self.command} {self.path}"
        _Fake.asked.append(key + (f" {self.headers['Range']}" if self.headers.get("Range") else ""))
        if self.command == "POST":
            _Fake.keys.append(self.headers.get("Idempotency-Key"))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        answers = _Fake.script.get(key) or [answer(404, {"error": "no such thing"})]
        status, head, body = answers.pop(0) if len(answers) > 1 else answers[0]
        if body == HANG:
            time.sleep(HANG_S)
            self.close_connection = True
            return
        self.send_response(status)
        for name, value in head.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(VIDEO[:100] if body == CUT else body)

    do_GET = do_POST = do_DELETE = _answer  # noqa: N815 - http.server's names

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Client, dict[str, list[Any]]]]:
    """A client of a stand-in server that runs job JOB to "done" and serves its result; the script to change."""
    for var in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    waits: list[float] = []
    monkeypatch.setattr(client_module, "_sleep", waits.append)
    monkeypatch.setattr(client_module, "POLL_S", 0.0)
    monkeypatch.setattr(client_module, "OUTAGE_S", 0.3)
    _Fake.asked, _Fake.keys = [], []
    _Fake.script = {"GET /health": [answer(200, {"max_upload_bytes": 1 << 30})],
                    "POST /jobs": [answer(202, {"id": JOB})],
                    f"GET /jobs/{JOB}": [answer(200, {"status": "done"})],
                    f"GET /jobs/{JOB}/result": [result()],
                    f"DELETE /jobs/{JOB}": [answer(200, {"status": "deleted"})]}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Client(f"http://127.0.0.1:{httpd.server_address[1]}", timeout_s=10), {"waits": waits}
    finally:
        httpd.shutdown()
        httpd.server_close()


def _animate(client: Client, tmp_path: Path) -> dict[str, str]:
    return client.animate(PORTRAIT, PORTRAIT, tmp_path / "out.mp4")


def test_a_result_fetch_rides_out_passing_refusals(fake: tuple[Client, dict[str, Any]], tmp_path: Path) -> None:
    """A 503 (Retry-After 1), a proxy's 502 and a 429 on the result are asked again (the server's wait, capped);
    the result comes whole, and only then is the job deleted."""
    client, seen = fake
    _Fake.script[f"GET /jobs/{JOB}/result"] = [answer(503, {"error": "busy"}, {"Retry-After": "1"}),
                                              answer(502, b"<html>bad gateway</html>"),
                                              answer(429, {"error": "slow down"}, {"Retry-After": "1e9"}), result()]
    head = _animate(client, tmp_path)
    assert (tmp_path / "out.mp4").read_bytes() == VIDEO and head["x-megactor-frames"] == "4"
    assert seen["waits"] == [1.0, 2.0, 30.0]
    assert _Fake.asked[-1] == f"DELETE /jobs/{JOB}"


def test_a_finished_result_that_cannot_be_saved_stays_on_the_server(fake: tuple[Client, dict[str, Any]],
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal that does not pass, an outage past the tolerance and a result that cannot be written here leave
    the finished job on the server (not deleted: the run is not lost), the error naming where to fetch it."""
    client, _ = fake
    _Fake.script[f"GET /jobs/{JOB}/result"] = [answer(500, {"error": "oops"})]
    with pytest.raises(InputError, match=rf"oops; the result stays on the server .*/jobs/{JOB}/result$"):
        _animate(client, tmp_path)
    _Fake.script[f"GET /jobs/{JOB}/result"] = [answer(503, {"error": "busy"})]  # (past OUTAGE_S)
    with pytest.raises(InputError, match=rf"answered 503.* the result stays on the server .*/jobs/{JOB}/result$"):
        _animate(client, tmp_path)
    _Fake.script[f"GET /jobs/{JOB}/result"] = [result()]

    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(client_module, "written_whole", full)
    with pytest.raises(MegactorError, match=rf"No space left on device.*/jobs/{JOB}/result$"):
        _animate(client, tmp_path)
    assert not any(a.startswith("DELETE") for a in _Fake.asked)
    assert not (tmp_path / "out.mp4").exists()


def test_a_result_lost_after_its_run_is_sent_again(fake: tuple[Client, dict[str, Any]], tmp_path: Path) -> None:
    """A job whose result the server no longer knows (404: it restarted after the run) is sent again, as a job
    lost while it runs is."""
    client, _ = fake
    _Fake.script[f"GET /jobs/{JOB}/result"] = [answer(404, {"error": "no such job"}), result()]
    _animate(client, tmp_path)
    assert (tmp_path / "out.mp4").read_bytes() == VIDEO
    assert _Fake.asked.count("POST /jobs") == 2


def test_a_followed_job_rides_out_a_proxys_refusals(fake: tuple[Client, dict[str, Any]], tmp_path: Path) -> None:
    """While a job is followed, a proxy's 502 page (its backend restarting), a 503 with Retry-After and a 504 are
    an outage (asked again), not the job's end; past the outage tolerance they are named, and the job cancelled."""
    client, seen = fake
    _Fake.script[f"GET /jobs/{JOB}"] = [answer(502, b"<html>502 Bad Gateway</html>"),
                                       answer(503, {"error": "busy"}, {"Retry-After": "3"}),
                                       answer(504, b""), answer(200, {"status": "running"}),
                                       answer(200, {"status": "done"})]
    _animate(client, tmp_path)
    assert (tmp_path / "out.mp4").read_bytes() == VIDEO and 3.0 in seen["waits"]
    _Fake.script[f"GET /jobs/{JOB}"] = [answer(502, b"<html>502 Bad Gateway</html>")]
    with pytest.raises(InputError, match=r"is not the JSON.*\(for 0 s, following job 0123456789ab\)$"):
        _animate(client, tmp_path)
    assert _Fake.asked[-1] == f"DELETE /jobs/{JOB}"


def test_malformed_answers_are_named_errors(fake: tuple[Client, dict[str, Any]], tmp_path: Path) -> None:
    """A job's state without a status (or a JSON list) and a 202 without an id are errors naming the server;
    a progress report not understood is not shown; nonsense run facts are taken as not given."""
    client, _ = fake
    shown: list[object] = []
    _Fake.script[f"GET /jobs/{JOB}"] = [answer(200, {"status": "running", "progress": {"stage": 1, "done": "x"}}),
                                       answer(200, {"status": "running", "progress": [1]}),
                                       answer(200, {"status": "running", "progress": {"stage": "denoise", "done": 1,
                                                                                      "total": 2, "unit": "window"}}),
                                       answer(200, {"status": "done"})]
    client.animate(PORTRAIT, PORTRAIT, tmp_path / "out.mp4", on_progress=shown.append)
    assert len(shown) == 1
    for doc in ({"progress": None}, [1, 2]):
        _Fake.script[f"GET /jobs/{JOB}"] = [answer(200, doc)]
        with pytest.raises(InputError, match=rf"^{client.url}: job {JOB}: its state .* has no 'status'"):
            _animate(client, tmp_path)
    _Fake.script[f"GET /jobs/{JOB}"] = [answer(200, {"status": "done"})]
    _Fake.script["GET /health"] = [answer(200, {"max_upload_bytes": "lots"})]
    for doc in ({"status": "queued"}, {"id": 12}, {"id": "../health"}, {"id": f"{JOB}\r\nX-Evil: 1"}):
        _Fake.script["POST /jobs"] = [answer(202, doc)]
        with pytest.raises(InputError, match=rf"^{client.url}: POST /jobs answered 202 without a job id"):
            _animate(client, tmp_path)
    stats = result_stats({"x-megactor-frames": "lots", "x-megactor-seconds": "NaN",
                          "x-megactor-first-frame-seconds": "-inf"})
    assert (stats.frames, stats.total_s, stats.first_frame_s) == (0, 0.0, 0.0)
    stats = result_stats({"x-megactor-frames": "4", "x-megactor-seconds": "-1",
                          "x-megactor-first-frame-seconds": "1e999"})
    assert (stats.frames, stats.total_s, stats.first_frame_s) == (4, 0.0, 0.0)


def test_a_result_cut_short_or_misplaced_is_never_kept(fake: tuple[Client, dict[str, Any]], tmp_path: Path) -> None:
    """A result without Content-Length cut short (its size told by the server's ETag) is fetched on from where it
    broke; a resumed part that does not start where asked, an answer telling no size and a malformed length are
    refused (no result file, the job left on the server)."""
    client, _ = fake
    out = tmp_path / "out.mp4"
    _Fake.script[f"GET /jobs/{JOB}/result"] = [result(headers={"Content-Length": None}, body=CUT),
                                              result(206, start=100)]
    _animate(client, tmp_path)
    assert out.read_bytes() == VIDEO and f"GET /jobs/{JOB}/result bytes=100-" in _Fake.asked
    out.unlink()
    for answers, problem in (([result(body=CUT), result(206, start=50)], r"another part than the bytes 100- asked"),
                             ([result(headers={"Content-Length": None, "ETag": None})], "without its length"),
                             ([result(headers={"Content-Length": "abc"})], "malformed Content-Length"),
                             ([result(headers={"Content-Length": "1000"})], r"other than its ETag's size")):
        _Fake.script[f"GET /jobs/{JOB}/result"] = answers
        with pytest.raises(InputError, match=rf"{problem}.*the result stays on the server"):
            _animate(client, tmp_path)
        assert not out.exists()


def test_a_busy_servers_retry_after_is_bounded(fake: tuple[Client, dict[str, Any]], tmp_path: Path) -> None:
    """A full queue's Retry-After is waited for within 1 s and 30 s (not 1e9 s, not 60 uploads in a second); a
    date or none: 10 s."""
    client, seen = fake
    _Fake.script["POST /jobs"] = [answer(503, {"error": "busy"}, {"Retry-After": value})
                                  for value in ("1e9", "0", "-5", "nan", "Wed, 21 Oct 2015 07:28:00 GMT", "7")]
    _Fake.script["POST /jobs"].append(answer(202, {"id": JOB}))
    _animate(client, tmp_path)
    assert seen["waits"] == [30.0, 1.0, 1.0, 10.0, 10.0, 7.0]


def test_a_server_address_with_a_password_is_refused() -> None:
    """User info in the server's address (a password) is refused without showing it; a port that is no number is
    named."""
    with pytest.raises(InputError) as caught:
        Client("http://alice:s3cret@gpu-box:8450")
    assert str(caught.value).startswith("http://gpu-box:8450: --server's address takes no user name or password")
    assert "s3cret" not in str(caught.value) and "alice" not in str(caught.value)
    with pytest.raises(InputError, match="port is no number"):
        Client("http://gpu-box:84x0")


def test_a_huge_answer_is_not_read_whole(fake: tuple[Client, dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    """A JSON answer over MAX_ANSWER_BYTES is refused unread (it could be any size)."""
    client, _ = fake
    monkeypatch.setattr(client_module, "MAX_ANSWER_BYTES", 1000, raising=False)
    _Fake.script[f"GET /jobs/{JOB}"] = [answer(200, {"status": "done", "pad": "x" * 5000})]
    with pytest.raises(InputError, match=rf"/jobs/{JOB}: the answer \(200\) is over 1000 bytes"):
        _animate(client, tmp_path)


def test_a_result_that_is_no_video_is_not_kept(fake: tuple[Client, dict[str, Any]], tmp_path: Path) -> None:
    """A result answered as a page (text/html: a proxy's login or error page) is refused, the job left there."""
    client, _ = fake
    _Fake.script[f"GET /jobs/{JOB}/result"] = [result(headers={"Content-Type": "text/html; charset=utf-8"})]
    with pytest.raises(InputError, match=r"result as text/html, not a video .*the result stays on the server"):
        _animate(client, tmp_path)
    assert not (tmp_path / "out.mp4").exists()
    _Fake.script[f"GET /jobs/{JOB}/result"] = [result(headers={"Content-Type": "image/gif"})]
    _animate(client, tmp_path)
    assert (tmp_path / "out.mp4").read_bytes() == VIDEO


def test_a_stop_while_a_result_is_asked_again_for_ends_the_wait(fake: tuple[Client, dict[str, Any]],
                                                                  tmp_path: Path) -> None:
    """``stop`` set (Ctrl-C in a batch) while a result's fetch waits to ask again ends it at once (Stopped), the
    finished result left on the server."""
    client, _ = fake
    stop = threading.Event()
    _Fake.script[f"GET /jobs/{JOB}"] = [answer(200, {"status": "done", "progress": {
        "stage": "write", "done": 1, "total": 1, "unit": "frame"}})]
    _Fake.script[f"GET /jobs/{JOB}/result"] = [answer(503, {"error": "busy"}, {"Retry-After": "30"})]
    with pytest.raises(client_module.Stopped):
        client.animate(PORTRAIT, PORTRAIT, tmp_path / "out.mp4", on_progress=lambda _: stop.set(), stop=stop)
    assert not any(a.startswith("DELETE") for a in _Fake.asked)


def test_a_stop_while_the_result_comes_ends_its_download(fake: tuple[Client, dict[str, Any]], tmp_path: Path) -> None:
    """``stop`` set while the result's bytes come (Ctrl-C during a slow download): the download ends at its next
    chunk (it went on until the command gave up on it 30 s later, its partial file left in the folder); nothing
    is left here, and the finished result stays on the server."""
    client, _ = fake
    stop = threading.Event()
    _Fake.script[f"GET /jobs/{JOB}"] = [answer(200, {"status": "done", "progress": {
        "stage": "write", "done": 1, "total": 1, "unit": "frame"}})]
    _Fake.script[f"GET /jobs/{JOB}/result"] = [result()]
    with pytest.raises(client_module.Stopped, match=f"job {JOB}'s result from"):
        client.animate(PORTRAIT, PORTRAIT, tmp_path / "out.mp4", on_progress=lambda _: stop.set(), stop=stop)
    assert list(tmp_path.iterdir()) == [] and not any(a.startswith("DELETE") for a in _Fake.asked)


@pytest.mark.parametrize("answered", [True, False], ids=["503", "closed"])
def test_a_busy_server_that_refuses_a_large_form_unread_is_waited_for(tmp_path: Path, answered: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A full queue's 503 comes before the server reads the form, and it closes the connection: with a driver
    larger than what it drops meanwhile, the client's send broke (BrokenPipe, ConnectionReset) and the job failed
    as "cannot reach the server" where a small driver's waited. Its answer is read where it can be (the close's
    reset can take it: then the server is asked whether it answers, and the form sent again after a wait; here
    "closed": no answer at all)."""
    import socket

    waits: list[float] = []
    monkeypatch.setattr(client_module, "_sleep", waits.append)
    big = tmp_path / "big.mp4"
    big.write_bytes(b"\0" * (40 << 20))  # (over the 16 MiB a real server drops after refusing)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        refuse = True
        while True:  # (the refusal, perhaps GET /health, the form taken)
            conn, _ = listener.accept()
            with conn:
                head = conn.recv(1 << 16)
                if head.startswith(b"GET /health"):
                    body = json.dumps({"max_upload_bytes": 1 << 40}).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                                 b"Connection: close\r\n\r\n%s" % (len(body), body))
                    continue
                if refuse:
                    refuse = False  # (answered unread, some more dropped, closed: the rest of the form unread, as the
                    # real server's _linger does)
                    body = b'{"error": "the queue is full"}'
                    refusal = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 7"
                               b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                    conn.sendall(refusal if answered else b"")
                    conn.settimeout(0.3)
                    with contextlib.suppress(OSError):
                        for _ in range(64):
                            conn.recv(1 << 16)
                    continue
                while b"\r\n\r\n" not in head:
                    head += conn.recv(1 << 16)
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                got = len(head.split(b"\r\n\r\n", 1)[1])
                while got < length:
                    got += len(conn.recv(1 << 20))
                body = json.dumps({"id": JOB}).encode()
                conn.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (len(body), body))
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = Client(f"http://127.0.0.1:{listener.getsockname()[1]}")
    client.max_upload_bytes = 1 << 40
    try:
        assert client.submit(PORTRAIT, big) == JOB
        assert waits in ([7.0], [client_module.BUSY_WAIT_S]) if answered else waits == [client_module.BUSY_WAIT_S]
    finally:
        listener.close()
        thread.join(10)


@pytest.mark.parametrize("keyed", [True, False])
def test_a_lost_answer_to_a_job_form_is_sent_again_only_with_a_key(fake: tuple[Client, dict[str, Any]],
                                                                  tmp_path: Path, keyed: bool) -> None:
    """The answer to POST /jobs lost (the connection broke within it, then a proxy's 502 page): a server whose health
    says it takes keys is sent the form again with the same key, and the one job it answers with is followed; one
    that does not take them is not (a second job would run unclaimed beside the first): the error names the
    break."""
    client, _ = fake
    _Fake.script["GET /health"] = [answer(200, {"max_upload_bytes": 1 << 30, "idempotency_keys": keyed})]
    _Fake.script["POST /jobs"] = [(202, {"Content-Type": "application/json", "Content-Length": "500"}, CUT),
                                  answer(502, b"<html>bad gateway</html>"), answer(200, {"id": JOB})]
    if not keyed:
        with pytest.raises(InputError, match="the connection broke during the answer"):
            _animate(client, tmp_path)
        assert _Fake.asked == ["GET /health", "POST /jobs"]
        return
    _animate(client, tmp_path)
    assert (tmp_path / "out.mp4").read_bytes() == VIDEO
    assert [a for a in _Fake.asked if a.startswith("POST")] == ["POST /jobs"] * 3
    assert len(set(_Fake.keys)) == 1 and len(_Fake.keys[0] or "") == 32


def test_a_new_job_gets_a_new_key(fake: tuple[Client, dict[str, Any]], tmp_path: Path) -> None:
    """Each job asked for has its own key (a job sent again after the server lost it is another job)."""
    client, _ = fake
    _animate(client, tmp_path)
    _animate(client, tmp_path)
    assert len(_Fake.keys) == 2 and len(set(_Fake.keys)) == 2


def test_a_hung_server_is_given_up_on_within_the_answer_timeout(fake: tuple[Client, dict[str, Any]],
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that takes the connection and never answers (its process stopped, kill -STOP; a hung machine) is
    an outage as one that refuses is: each question waits ANSWER_TIMEOUT_S, not the whole timeout_s meant for a
    form's upload or a result's download (10 minutes a poll: a batch stood silent for 20 minutes before handing the
    job to another server, then waited 10 more for its cancel)."""
    client, _ = fake
    monkeypatch.setattr(client_module, "ANSWER_TIMEOUT_S", 0.2, raising=False)
    _Fake.script[f"GET /jobs/{JOB}"] = [(200, {}, HANG)]
    _Fake.script[f"DELETE /jobs/{JOB}"] = [(200, {}, HANG)]
    began = time.monotonic()
    with pytest.raises(client_module.Unreachable, match=rf"TimeoutError.*following job {JOB}"):
        _animate(client, tmp_path)
    assert time.monotonic() - began < HANG_S  # (the fixture's timeout_s: 10 s a question)
    assert _Fake.asked[-1] == f"DELETE /jobs/{JOB}"
    _Fake.script["GET /health"] = [(200, {}, HANG)]
    began = time.monotonic()
    with pytest.raises(client_module.Unreachable, match="TimeoutError"):
        client.health()
    assert time.monotonic() - began < HANG_S


def test_an_outage_is_said_once_not_at_every_try(fake: tuple[Client, dict[str, Any]], tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A server that stays unreachable while a form is sent again with its key, or a result's fetch is asked
    again, is warned about once per outage (a server killed mid-batch gave some 60 identical warnings in its two
    minutes, a try each 2 s); the later tries are at debug level."""
    client, _ = fake
    _Fake.script["GET /health"] = [answer(200, {"max_upload_bytes": 1 << 30, "idempotency_keys": True})]
    _Fake.script["POST /jobs"] = [answer(502, b"<html>bad gateway</html>")] * 5 + [answer(202, {"id": JOB})]
    _Fake.script[f"GET /jobs/{JOB}/result"] = [answer(503, {"error": "busy"})] * 5 + [result()]
    with caplog.at_level("DEBUG", logger="megactor_rt.client"):
        _animate(client, tmp_path)
    assert (tmp_path / "out.mp4").read_bytes() == VIDEO
    for said in ("sending the form again", "fetching the result again"):
        levels = [r.levelname for r in caplog.records if said in r.getMessage()]
        assert levels == ["WARNING"] + ["DEBUG"] * 4, said


def test_an_outage_is_timed_from_its_own_start_not_an_earlier_ones(fake: tuple[Client, dict[str, Any]],
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A form sent again through a proxy's 502, then answered by a busy server (503) for longer than OUTAGE_S, then
    a second 502: that second outage is timed and said from its own start (it was taken for the first, which had
    ended: "for 1 s, sending a job" and the job given up on at once, said at debug level only)."""
    client, _ = fake
    monkeypatch.setattr(client_module, "_sleep", lambda s: time.sleep(0.15))  # (OUTAGE_S: 0.3 s)
    _Fake.script["GET /health"] = [answer(200, {"max_upload_bytes": 1 << 30, "idempotency_keys": True})]
    _Fake.script["POST /jobs"] = [answer(502, b"<html>bad gateway</html>")] + [
        answer(503, {"error": "busy"}, {"Retry-After": "1"})] * 4 + [answer(502, b"<html>bad gateway</html>"),
                                                                     answer(202, {"id": JOB})]
    with caplog.at_level("DEBUG", logger="megactor_rt.client"):
        _animate(client, tmp_path)
    assert (tmp_path / "out.mp4").read_bytes() == VIDEO
    levels = [r.levelname for r in caplog.records if "sending the form again" in r.getMessage()]
    assert levels == ["WARNING", "WARNING"], levels


def test_another_services_health_is_refused_before_any_job(fake: tuple[Client, dict[str, Any]],
                                                            tmp_path: Path) -> None:
    """An address whose GET /health answers JSON that is not a megactor-rt server's (another service's
    {"status": "ok"}) is refused at its health, before any upload: it passed, and in a batch it then took job after
    job and failed each while the real servers made the others."""
    client, _ = fake
    _Fake.script["GET /health"] = [answer(200, {"status": "ok", "version": "3.2.1"})]
    with pytest.raises(InputError, match=r"/health: the answer is not a megactor-rt server's \(no max_upload_bytes: "
                                         r"status, version\); is this address a megactor-rt server\?"):
        client.health()
    with pytest.raises(InputError, match="not a megactor-rt server's"):
        _animate(client, tmp_path)
    assert not any(a.startswith("POST") for a in _Fake.asked)


def test_a_refused_form_goes_to_another_server_at_once(fake: tuple[Client, dict[str, Any]], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A form whose connection is refused (the server gone: nothing listens) provably never arrived: where another
    server of the batch takes the job (``others_take``), submit gives up at once instead of waiting out the outage
    (2 minutes: the batch's last job held so); alone, it waits for a server restarting at that address."""
    client, seen = fake
    _Fake.script["GET /health"] = [answer(200, {"max_upload_bytes": 1 << 30, "idempotency_keys": True})]
    client.health()
    with socket.socket() as sock:  # (a port nothing listens on)
        sock.bind(("127.0.0.1", 0))
        client.port = sock.getsockname()[1]
    asked: list[bool] = []
    client.others_take = lambda: asked.append(True) or True
    with pytest.raises(client_module.Unreachable, match="cannot reach the server") as caught:
        client.submit(PORTRAIT, PORTRAIT)
    assert caught.value.refused and asked == [True] and seen["waits"] == []
    client.others_take = lambda: False  # (the others retired too: the outage is waited out)
    monkeypatch.setattr(client_module, "_sleep", lambda s: time.sleep(0.1))
    with pytest.raises(client_module.Unreachable, match=r"for \d+ s, sending a job"):
        client.submit(PORTRAIT, PORTRAIT)
