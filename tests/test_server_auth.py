"""``megactor-rt serve`` beyond this machine: a token every request must carry (``--token-file``), HTTPS
(``--tls-cert``), and the client (``animate --server``) sending the one and checking the other."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from media_fixtures import decode_all
from serve_fixtures import (
    anim,
    animate,
    animate_through_a_restart,
    files,
    form,
    left,
    media,
    request,
    scratch,
    served,
    serving,
)

from megactor_rt.cli import main
from megactor_rt.client import Client
from megactor_rt.errors import InputError
from megactor_rt.runtime.animator import Animator
from megactor_rt.server import CALLBACK as CALLBACK_FIELD
from megactor_rt.server import TOKEN_ENV, AnimateServer, load_token, tls_context

__all__ = ["anim", "media", "scratch", "served"]  # (fixtures, from serve_fixtures)

TOKEN = "test-token-0123456789-abcdefghij"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def _error(answer: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    return answer[0], json.loads(answer[2])["error"]


def test_a_server_with_a_token_answers_only_requests_that_carry_it(served: AnimateServer, media: dict[str, Path],
                                                                   scratch: Path) -> None:
    """Every route but the page and the API description answers 401 (with WWW-Authenticate) without the token or
    with another; a form sent without it is not run and leaves nothing; with it, everything is as without a token."""
    served.token = TOKEN.encode()
    assert request(served, "GET", "/")[0] == 200 and request(served, "GET", "/openapi.json")[0] == 200
    assert request(served, "GET", "/ping")[:3:2] == (200, b'{"status": "ok"}\n')  # (a load balancer's check)
    missing = "this server needs its token: send the header `Authorization: Bearer TOKEN`"
    for method, path in [("GET", "/health"), ("GET", "/jobs"), ("GET", "/jobs/abc"), ("DELETE", "/jobs/abc"),
                         ("GET", "/nope"), ("POST", "/health")]:
        status, headers, body = request(served, method, path)
        assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="megactor-rt"'), (method, path)
        assert missing in json.loads(body)["error"], (method, path)
    for sent in (f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer"):
        assert _error(request(served, "GET", "/health", headers={"Authorization": sent})) == (
            401, "the token sent is not this server's"), sent
    body, ctype = form({**files(media), "format": "gif"})
    assert _error(request(served, "POST", "/animate", body, ctype))[0] == 401
    assert served.served == 0 and left(scratch) == []
    assert request(served, "GET", "/health", headers=BEARER)[0] == 200
    status, headers, result = request(served, "POST", "/animate", body, ctype, headers=BEARER)
    assert status == 200 and result[:6] == b"GIF89a" and headers["X-Megactor-Frames"] == "6"
    served.token = None  # (none: nothing asked)
    assert animate(served, {**files(media), "format": "gif"})[0] == 200


def test_a_form_without_the_token_is_refused_before_it_is_sent(served: AnimateServer) -> None:
    """curl's "Expect: 100-continue": a request without the token is answered 401 instead of "100 Continue"."""
    served.token = TOKEN.encode()
    with socket.create_connection(("127.0.0.1", served.server_address[1]), timeout=30) as conn:
        conn.sendall(b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nExpect: 100-continue\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ") and b"WWW-Authenticate: Bearer" in head, head
    assert "needs its token" in json.loads(body)["error"]


def test_a_client_sending_a_whole_form_unasked_reads_the_refusal(served: AnimateServer) -> None:
    """A form sent at once (no "Expect: 100-continue": curl for small forms, most libraries) to a server that refuses
    it unread (no token): the server reads and drops what comes after its answer before closing, so the client's
    sending ends well and it reads the 401 instead of a reset connection."""
    served.token = TOKEN.encode()
    body = b"x" * (8 << 20)
    sent: list[BaseException | None] = []
    with socket.create_connection(("127.0.0.1", served.server_address[1]), timeout=30) as conn:
        def send() -> None:
            try:
                conn.sendall(b"POST /animate HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                sent.append(None)
            except OSError as exc:
                sent.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                answer += chunk
        sender.join(30)
    assert answer.startswith(b"HTTP/1.1 401 ") and sent == [None], (answer[:40], sent)


def test_a_browser_page_of_another_site_may_send_the_token(served: AnimateServer) -> None:
    served.token, served.cors_origins = TOKEN.encode(), ("https://app.example",)
    status, headers, _ = request(served, "OPTIONS", "/jobs", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})  # (a preflight carries no token)
    assert status == 204 and "Authorization" in headers["Access-Control-Allow-Headers"].split(", ")


def test_animate_with_server_sends_the_token_from_a_file_or_the_environment(
        served: AnimateServer, media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    served.token = TOKEN.encode()
    common = ["-q", "animate", "--server", served.url, "--portrait", str(media["portrait"]), "--driver",
              str(media["driver"]), "--steps", "1"]
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main([*common, "-o", str(tmp_path / "none.mp4")]) == 2
    assert f"{served.url}: this server needs its token" in capsys.readouterr().err
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("another-token-0123456789\n")
    assert main([*common, "--server-token-file", str(wrong), "-o", str(tmp_path / "wrong.mp4")]) == 2
    assert f"{served.url}: the token sent is not this server's" in capsys.readouterr().err
    right = tmp_path / "token.txt"
    right.write_text(f"{TOKEN}\n")
    assert main([*common, "--server-token-file", str(right), "-o", str(tmp_path / "file.mp4")]) == 0
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert main([*common, "-o", str(tmp_path / "env.mp4")]) == 0
    assert len(decode_all(tmp_path / "file.mp4")) == len(decode_all(tmp_path / "env.mp4")) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env.mp4", "file.mp4", "tmp", "token.txt", "wrong.txt"]
    assert json.loads(request(served, "GET", "/jobs", headers=BEARER)[2])["jobs"] == []  # (each deleted there)
    assert main(["-q", "animate", "--weights", str(tmp_path), "--portrait", "a.png", "--driver", "b.mp4",
                 "--server-token-file", str(right)]) == 2
    assert "--server-token-file, --server-ca: only with --server URL" in capsys.readouterr().err


def test_a_token_file_is_read_or_made_and_a_weak_token_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert load_token(None) is None
    monkeypatch.setenv(TOKEN_ENV, f"  {TOKEN} ")
    assert load_token(None) == TOKEN
    made = tmp_path / "serve-token"
    with caplog.at_level(logging.WARNING, "megactor_rt.server"):
        token = load_token(made, create=True)
    assert token is not None and len(token) >= 40 and made.read_text() == token + "\n"
    assert stat.S_IMODE(made.stat().st_mode) == 0o600 and f"{made}: a new token written there" in caplog.text
    assert load_token(made, create=True) == token == load_token(made)  # (kept: the next start asks for the same)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serve-token"]
    with pytest.raises(InputError, match=f"{tmp_path / 'no'}: cannot read the token from it"):
        load_token(tmp_path / "no")  # (a client's file is never made)
    for bad, length in (("short", 5), ("with a space in the token", 25), ("", 0)):
        made.write_text(bad + "\n")
        with pytest.raises(InputError, match=rf"{made}: a token is at least 16 printable characters without spaces "
                                             rf"\(got {length}\)"):
            load_token(made)
    monkeypatch.setenv(TOKEN_ENV, "x")
    with pytest.raises(InputError, match=rf"\${TOKEN_ENV}: a token is at least 16"):
        load_token(None)
    made.write_bytes(b"\xef\xbb\xbf" + TOKEN.encode() + b"\r\n")  # (as a Windows editor saves it)
    assert load_token(made) == TOKEN
    made.write_text(TOKEN)
    made.chmod(0o644)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "megactor_rt.server"):
        assert load_token(made, create=True) == TOKEN
    assert "other users of this machine may read the token in it (chmod 600" in caplog.text


# ------------------------------------------------------------------------------------------------------ HTTPS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, and another pair (made by the openssl command)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a test certificate (apt install openssl)")
    root = tmp_path_factory.mktemp("certs")
    for name in ("server", "other"):
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(root / f"{name}.key"),
                        "-out", str(root / f"{name}.pem"), "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return {"cert": root / "server.pem", "key": root / "server.key", "other_cert": root / "other.pem",
            "other_key": root / "other.key"}


@pytest.fixture()
def secure(anim: Animator, scratch: Path, certs: dict[str, Path]) -> Iterator[AnimateServer]:
    with serving(anim, token=TOKEN, tls=tls_context(certs["cert"], certs["key"]), timeout_s=20) as srv:
        yield srv


def test_an_https_server_makes_results_for_a_client_that_trusts_its_certificate(
        secure: AnimateServer, certs: dict[str, Path], media: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert secure.url.startswith("https://127.0.0.1:")
    token = tmp_path / "token.txt"
    token.write_text(TOKEN)
    common = ["-q", "animate", "--server", secure.url, "--portrait", str(media["portrait"]), "--driver",
              str(media["driver"]), "--steps", "1", "--server-token-file", str(token)]
    assert main([*common, "-o", str(tmp_path / "untrusted.mp4")]) == 2
    assert f"{secure.url}: the server's certificate is not trusted here" in capsys.readouterr().err
    assert main([*common, "--server-ca", str(certs["other_cert"]), "-o", str(tmp_path / "other.mp4")]) == 2
    assert "a self-signed one: --server-ca CERT.pem" in capsys.readouterr().err
    assert main([*common, "--server-ca", str(certs["cert"]), "-o", str(tmp_path / "out.gif")]) == 0, \
        capsys.readouterr().err
    assert len(decode_all(tmp_path / "out.gif")) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gif", "tmp", "token.txt"]
    with pytest.raises(InputError, match=r"cannot reach the server .*\(an https:// server\?\)"):
        Client(secure.url.replace("https://", "http://"), timeout_s=10).health()


def test_an_https_client_of_a_plain_server_is_told_so(served: AnimateServer) -> None:
    with pytest.raises(InputError, match=r"cannot reach the server .*\(a plain http:// server\?\)"):
        Client(served.url.replace("http://", "https://"), timeout_s=10).health()


def test_a_connection_that_never_completes_its_handshake_holds_up_no_other(
        secure: AnimateServer, certs: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    """The handshake is made on each connection's thread: a client that connects and says nothing (or speaks plain
    HTTP) does not stop the next one from being answered, and a failed handshake is a log line, not a traceback."""
    port = secure.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=30):  # (says nothing)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as plain:
            plain.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            while plain.recv(4096):  # (a TLS alert, then the end of the connection)
                pass
        started = time.monotonic()
        client = Client(secure.url, timeout_s=10, token=TOKEN, ca_file=certs["cert"])
        assert client.health()["status"] == "ok" and time.monotonic() - started < 5
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--tls-key", "k.pem"], "k.pem: --tls-key goes with --tls-cert CERT"),
    (["--tls-cert", "none.pem"], "none.pem: no such file (--tls-cert / --tls-key)"),
    (["--tls-cert", "{cert}", "--tls-key", "{other_key}"], "not a certificate and its key in PEM"),
    (["--token-file", "{short}"], "a token is at least 16 printable characters"),
], ids=["key-alone", "no-cert", "not-its-key", "weak-token"])
def test_serve_refuses_a_bad_certificate_or_token_before_loading(
        argv: list[str], message: str, certs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(Animator, "demo", lambda *a, **k: pytest.fail("the model loaded"))
    short = tmp_path / "short"
    short.write_text("abc")
    names = {k: str(v) for k, v in certs.items()} | {"short": str(short)}
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--demo", "--port", "0", *[a.format(**names) for a in argv]]) == 2
    assert message in capsys.readouterr().err


def test_serve_with_a_token_and_https_from_the_command_line(certs: dict[str, Path], tmp_path: Path,
                                                            media: dict[str, Path]) -> None:
    """`serve --token-file NEW --tls-cert --tls-key`: a new token made and said, an https address printed, and the
    server answering a request that carries the token over TLS."""
    import sys

    token_file = tmp_path / "token"
    proc = subprocess.Popen([sys.executable, "-m", "megactor_rt.cli", "serve", "--demo", "--port", "0", "--steps",
                             "1", "--window", "4", "--overlap", "2", "--no-warmup", "--token-file", str(token_file),
                             "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("megactor-rt serve: listening on https://127.0.0.1:") and "send its token" in line, line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        context = ssl.create_default_context(cafile=str(certs["cert"]))
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=context)
        conn.request("GET", "/health", headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})
        answer = conn.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["weights_id"].startswith("tiny-random")
        conn.close()
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=context)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 401
        conn.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert f"{token_file}: a new token written there" in err and stat.S_IMODE(token_file.stat().st_mode) == 0o600


# ------------------------------------------------------------------------------- a network that comes and goes


def _flaky_polls(monkeypatch: pytest.MonkeyPatch, fails: int | None) -> list[str]:
    """Make the client's requests for a job's state (GET /jobs/ID) fail to connect, the first ``fails`` of them
    (None: all); the paths that failed."""
    failed: list[str] = []
    real = http.client.HTTPConnection.request

    def request(conn: http.client.HTTPConnection, method: str, url: str, *args: object, **kw: object) -> None:
        if method == "GET" and url.count("/") == 2 and url.startswith("/jobs/") and (
                fails is None or len(failed) < fails):
            failed.append(url)
            raise ConnectionRefusedError(111, "Connection refused")
        real(conn, method, url, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(http.client.HTTPConnection, "request", request)
    return failed


def test_a_job_is_followed_through_a_short_outage_and_its_result_fetched_again(
        served: AnimateServer, anim: Animator, media: dict[str, Path], tmp_path: Path, scratch: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The server unreachable for a few polls (a network blip): the client asks again and gets the result; a
    download of it that breaks off is made again; nothing partial is left here or there."""
    import megactor_rt.client as client_module

    monkeypatch.setattr(client_module, "POLL_S", 0.05)
    failed = _flaky_polls(monkeypatch, 3)
    real_read = http.client.HTTPResponse.read
    broken: list[int] = []

    def read(answer: http.client.HTTPResponse, amt: int | None = None) -> bytes:
        if answer.getheader("X-Megactor-Frames") is not None and not broken:
            broken.append(1)
            real_read(answer, 1000)
            raise http.client.IncompleteRead(b"", 5000)
        return real_read(answer, amt)

    monkeypatch.setattr(http.client.HTTPResponse, "read", read)
    out = tmp_path / "out.gif"
    with caplog.at_level(logging.WARNING, "megactor_rt.client"):
        head = Client(served.url).animate(media["portrait"], media["driver"], out, fields={"format": "gif"})
    assert len(failed) == 3 and broken == [1] and head["x-megactor-frames"] == "6" and len(decode_all(out)) == 6
    assert "asking about job" in caplog.text and "reached again after" in caplog.text
    assert "the result's download broke off (IncompleteRead" in caplog.text and "try 2 of 3" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gif", "tmp"]
    assert json.loads(request(served, "GET", "/jobs")[2])["jobs"] == [] and left(scratch) == []


def test_a_download_broken_off_goes_on_from_where_it_broke(served: AnimateServer, media: dict[str, Path],
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The result's download breaks after 1000 bytes: the next try asks for the rest (Range, If-Range with the
    file's ETag) and the file written is the server's, byte for byte."""
    import megactor_rt.client as client_module

    monkeypatch.setattr(client_module, "POLL_S", 0.05)
    real_read, real_call = http.client.HTTPResponse.read, Client._call
    reads: list[int] = []
    asked: list[dict[str, str]] = []

    def read(answer: http.client.HTTPResponse, amt: int | None = None) -> bytes:
        if answer.getheader("X-Megactor-Frames") is not None and answer.status == 200:
            reads.append(1)
            if len(reads) == 1:
                return real_read(answer, 1000)
            raise http.client.IncompleteRead(b"", 5000)
        return real_read(answer, amt)

    def call(self: Client, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
             ) -> object:
        if path.endswith("/result"):
            asked.append(dict(headers or {}))
        return real_call(self, method, path, body, headers)

    monkeypatch.setattr(http.client.HTTPResponse, "read", read)
    monkeypatch.setattr(Client, "_call", call)
    client = Client(served.url)
    job = client.submit(media["portrait"], media["driver"], {"format": "gif"})
    client.wait(job)
    with caplog.at_level(logging.WARNING, "megactor_rt.client"):
        client.fetch(job, tmp_path / "out.gif")
    monkeypatch.undo()
    _, headers, whole = request(served, "GET", f"/jobs/{job}/result")
    assert (tmp_path / "out.gif").read_bytes() == whole and len(whole) > 1000
    assert asked == [{}, {"Range": "bytes=1000-", "If-Range": headers["ETag"]}]
    assert "fetching the result again from byte 1000 (try 2 of 3)" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gif", "tmp"]


def test_a_server_gone_for_good_or_a_job_gone_is_named(served: AnimateServer, media: dict[str, Path],
                                                       tmp_path: Path, scratch: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import megactor_rt.client as client_module

    monkeypatch.setattr(client_module, "POLL_S", 0.05)
    monkeypatch.setattr(client_module, "OUTAGE_S", 0.5)
    with monkeypatch.context() as patched:
        _flaky_polls(patched, None)
        with pytest.raises(InputError, match=r"cannot reach the server .* \(for \d+ s, following job [0-9a-f]+\)"):
            Client(served.url).animate(media["portrait"], media["driver"], tmp_path / "a.gif",
                                       fields={"format": "gif"})
    client = Client(served.url)
    job = client.submit(media["portrait"], media["driver"], {"format": "gif"})
    assert client.wait(job)["status"] == "done"
    client.delete(job)  # (as a server restart would lose it)
    with pytest.raises(InputError, match=f"job {job} is no longer there \\(the server restarted"):
        client.wait(job)
    assert [p.name for p in tmp_path.iterdir()] == ["tmp"]


# --------------------------------------------------------------------------------- behind nginx, as documented

NGINX_SITE = Path(__file__).parents[1] / "docs" / "deploy" / "nginx-megactor.conf"


def test_the_documented_nginx_front_serves_clients_over_https_under_a_path(
        served: AnimateServer, certs: dict[str, Path], media: dict[str, Path], tmp_path: Path) -> None:
    """docs/deploy/nginx-megactor.conf as it is (its port, certificate and upstream replaced): TLS at nginx, the
    server under /megactor/: `animate --server https://.../megactor` with the token makes the result, the page is
    there, and a form sent without the token is refused with the server's 401 through the proxy."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("needs nginx to check the documented configuration (apt install nginx-light)")
    served.token = TOKEN.encode()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    site = NGINX_SITE.read_text()
    for old, new in (("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
                     ("/etc/ssl/certs/gpu-box.example.pem", str(certs["cert"])),
                     ("/etc/ssl/private/gpu-box.example.key", str(certs["key"])),
                     ("http://127.0.0.1:8450/", f"http://127.0.0.1:{served.server_address[1]}/")):
        assert old in site, old
        site = site.replace(old, new)
    (tmp_path / "site.conf").write_text(site)
    temps = " ".join(f"{kind}_temp_path {tmp_path / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                          "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"{'user root;' if os.geteuid() == 0 else ''} worker_processes 1; daemon off; pid {tmp_path / 'nginx.pid'};\n"
        f"error_log {tmp_path / 'error.log'};\nevents {{ worker_connections 64; }}\n"
        f"http {{ access_log off; {temps} include {tmp_path / 'site.conf'}; }}\n")
    proc = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        url = f"https://127.0.0.1:{port}/megactor"
        out = tmp_path / "out.gif"
        head = Client(url, token=TOKEN, ca_file=certs["cert"]).animate(media["portrait"], media["driver"], out,
                                                                       fields={"format": "gif"})
        assert head["x-megactor-frames"] == "6" and len(decode_all(out)) == 6
        context = ssl.create_default_context(cafile=str(certs["cert"]))
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=context)
        conn.request("GET", "/megactor/")
        page = conn.getresponse()
        assert page.status == 200 and b'<form id="form"' in page.read()
        conn.close()
        body, ctype = form({**files(media), "pad": ("pad.bin", os.urandom(2 << 20))})
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=context)
        # (from the page's own site, as a browser sends it: past the other-site check, to the token's)
        conn.request("POST", "/megactor/animate", body, {"Content-Type": ctype,
                                                         "Origin": f"https://127.0.0.1:{port}"})
        answer = conn.getresponse()
        assert answer.status == 401 and "needs its token" in json.loads(answer.read())["error"]
        conn.close()
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=context)
        conn.request("POST", "/megactor/jobs", body, {"Content-Type": ctype, "Origin": "https://evil.example"})
        answer = conn.getresponse()
        assert answer.status == 403 and "another site" in json.loads(answer.read())["error"]
        conn.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert served.served == 1


def test_a_job_the_server_lost_is_sent_again(served: AnimateServer, media: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A server that no longer knows a job (restarted while the client waited) gets it sent again, twice at most;
    the result is the one the second job makes."""
    import megactor_rt.client as client_module

    monkeypatch.setattr(client_module, "POLL_S", 0.05)
    real_task, lost = served.task, []

    def task(task_id: str) -> object:
        if not lost:
            lost.append(task_id)
        return None if task_id in lost else real_task(task_id)  # (the first job: as a restarted server knows it)

    monkeypatch.setattr(served, "task", task)
    out = tmp_path / "out.gif"
    with caplog.at_level(logging.WARNING, "megactor_rt.client"):
        head = Client(served.url).animate(media["portrait"], media["driver"], out, fields={"format": "gif"})
    assert len(lost) == 1 and head["x-megactor-frames"] == "6" and len(decode_all(out)) == 6
    assert f"job {lost[0]} is no longer there (the server restarted" in caplog.text
    assert "sending it again (1 of 2)" in caplog.text
    monkeypatch.setattr(served, "task", lambda task_id: None)  # (lost every time)
    with pytest.raises(InputError, match=r"is no longer there .*: send it again$"):
        Client(served.url).animate(media["portrait"], media["driver"], tmp_path / "never.gif", fields={"format": "gif"})
    assert "sending it again (2 of 2)" in caplog.text and not (tmp_path / "never.gif").exists()


def test_a_batch_outlives_a_server_restart(media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """`serve --demo` killed in the middle of a job's run and started again on its port: the client follows the
    job through the outage, finds it gone, sends it again, and writes the result."""
    import megactor_rt.client as client_module

    monkeypatch.setattr(client_module, "POLL_S", 0.05)
    out = tmp_path / "out.gif"
    with caplog.at_level(logging.WARNING, "megactor_rt.client"):
        head = animate_through_a_restart(media, out, [], env={**os.environ, "TMPDIR": str(tmp_path)})
    assert head["x-megactor-frames"] == "6" and len(decode_all(out)) == 6
    assert "cannot reach the server" in caplog.text and "reached again after" in caplog.text
    assert "is no longer there (the server restarted" in caplog.text and "sending it again (1 of 2)" in caplog.text


# ------------------------------------------------------------------------------------------------- callbacks


@contextlib.contextmanager
def _receiving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A callback receiver answering with ``handler`` on a free port, while the block runs: its address."""
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    finally:
        receiver.shutdown()
        receiver.server_close()


def test_a_jobs_end_is_posted_to_its_callback_signed_with_the_token(served: AnimateServer, media: dict[str, Path],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """serve --allow-callbacks: a job's callback address gets the job's state (as GET /jobs/ID) when its run ends,
    done or failed, with the job's id and an HMAC-SHA256 of the body under the server's token; an answer of 503 is
    tried again. Without the flag, on POST /animate, or not an address, the field is refused."""
    import hashlib
    import hmac
    import http.server

    posts: list[tuple[dict[str, str], bytes]] = []
    got = threading.Event()

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            posts.append((dict(self.headers), body))
            first_done = [json.loads(b)["status"] for _, b in posts].count("done") == 1 and \
                json.loads(body)["status"] == "done"
            self.send_response(503 if first_done else 204)  # (the done job's first post: refused for a while)
            self.send_header("Content-Length", "0")
            self.end_headers()
            if len(posts) >= 3:
                got.set()

        def log_message(self, *args: object) -> None:
            pass

    served.token = TOKEN.encode()
    with _receiving(Receiver) as hook:
        for fields, message in (({CALLBACK_FIELD: hook}, "this server posts to no addresses (serve --allow-callbacks)"),):
            body, ctype = form({**files(media), **fields})
            assert _error(request(served, "POST", "/jobs", body, ctype, headers=BEARER)) == (
                400, f"field 'callback': {message}")
        served.allow_callbacks = True
        for route, fields, message in (
                ("/animate", {CALLBACK_FIELD: hook}, "field 'callback' is for POST /jobs"),
                ("/jobs", {CALLBACK_FIELD: "ftp://x"}, "field 'callback' takes an http(s) address, got 'ftp://x'"),
                # (malformed ones crashed the callback's thread when the run ended)
                *[("/jobs", {CALLBACK_FIELD: bad}, "field 'callback' takes an http(s) address")
                  for bad in ("http://[::1", "http://a b/", "http://x:99999/")]):
            body, ctype = form({**files(media), **fields})
            status, message_got = _error(request(served, "POST", route, body, ctype, headers=BEARER))
            assert status == 400 and message_got.startswith(message), message_got
        ids = []
        with caplog.at_level(logging.INFO, "megactor_rt.server"):
            for portrait in (files(media)["portrait"], ("bad.png", b"not an image")):
                body, ctype = form({**files(media), "portrait": portrait, "format": "gif", CALLBACK_FIELD: hook})
                status, _, answer = request(served, "POST", "/jobs", body, ctype, headers=BEARER)
                assert status == 202, answer
                ids.append(json.loads(answer)["id"])
            assert got.wait(60), posts
            answered = f"run {ids[0]}: callback {hook} answered 204"
            for _ in range(100):  # (logged by the server's thread once the receiver has answered)
                if answered in caplog.text:
                    break
                time.sleep(0.1)
    states = {}
    for headers, body in posts:
        assert headers["Content-Type"] == "application/json"
        signature = "sha256=" + hmac.new(TOKEN.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Megactor-Signature"] == signature and headers["X-Megactor-Job"] == json.loads(body)["id"]
        states[json.loads(body)["id"]] = json.loads(body)
    done, failed = states[ids[0]], states[ids[1]]
    assert (done["status"], done["frames"], done["result"]) == ("done", 6, f"/jobs/{ids[0]}/result")
    assert failed["status"] == "failed" and failed["error"].startswith("portrait/bad.png: ")
    assert [json.loads(b)["id"] for _, b in posts].count(ids[0]) == 2  # (503 first: posted again)
    assert answered in caplog.text


def test_a_callback_answered_late_is_not_said_to_be_unreached(served: AnimateServer, media: dict[str, Path],
                                                              caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A receiver that takes each post but answers after the callback's timeout got every try (the same post, named
    by X-Megactor-Job); the log says it did not answer in time and may have the post, not that it was not reached."""
    import http.server

    import megactor_rt.server as server_module

    monkeypatch.setattr(server_module, "CALLBACK_TIMEOUT_S", 0.3)
    got: list[str] = []

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            got.append(self.headers["X-Megactor-Job"])
            time.sleep(1.0)
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    served.allow_callbacks = True
    with _receiving(Slow) as hook, caplog.at_level(logging.INFO, "megactor_rt.server"):
        body, ctype = form({**files(media), "format": "gif", CALLBACK_FIELD: hook})
        status, _, answer = request(served, "POST", "/jobs", body, ctype)
        assert status == 202, answer
        job = json.loads(answer)["id"]
        for _ in range(200):
            if f"run {job}: callback {hook} failed" in caplog.text:
                break
            time.sleep(0.1)
    assert got == [job] * 3
    assert (f"run {job}: callback {hook} failed (no answer within 0.3 s; it may have the post, each time "
            "(X-Megactor-Job names the job); 3 tries)") in caplog.text, caplog.text
    assert "not reached" not in caplog.text
