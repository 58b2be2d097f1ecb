"""A client of ``megactor-rt serve`` (:mod:`megactor_rt.server`): ``megactor-rt animate --server URL`` sends each
result's inputs to a server (a GPU machine that keeps the model loaded) as a job, follows its progress, and writes
the result here as a local run would (under a temporary name, renamed when whole). Python::

    from megactor_rt.client import Client
    Client("http://gpu-box:8450").animate("me.png", "meme.mp4", "out.mp4", fields={"start": "0:42"})

The request carries what a jobs-file row carries (:data:`megactor_rt.server.TEXT_FIELDS`: the files, times, seed,
faces, sound, crf and the result's shape); the run settings (steps, guidance, window, ...) are the server's. A server
started with a token is sent it (``token=``); an ``https://`` server's certificate is checked against the system's
certificate authorities or ``ca_file`` (a self-signed certificate: that certificate).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import os
import re
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeGuard

from megactor_rt.errors import InputError, MegactorError, ResourceError
from megactor_rt.files import same_file, written_whole
from megactor_rt.progress import Progress

logger = logging.getLogger(__name__)

POLL_S = 0.5  # how often a job's state is asked for
BUSY_TRIES = 60  # a server whose queue is full (503) is asked again this many times, as long as it says to wait
BUSY_WAIT_S = 10.0  # how long to wait for a busy server that says no time (or closed a form it did not read)
OUTAGE_S = 120.0  # a job's server unreachable this long while it is followed (a network blip, a proxy's restart)
ANSWER_TIMEOUT_S = 60.0  # the longest wait for a question's answer (a job's state, health, a cancel: answered at once
# by a server that works; one that hangs, its process stopped, took the whole timeout_s for each, 10 minutes)
FETCH_TRIES = 3  # a result's download that breaks off partway is tried this many times in all (the job keeps it)
RETRY_S = 1.0  # the first wait before asking again where an answer failed (doubled after each, up to 2 s)
MIN_WAIT_S, MAX_WAIT_S = 1.0, 30.0  # a server's Retry-After is waited for at least, at most this long
_PASSING = (429, 502, 503, 504)  # answers of a server or its proxy that pass (busy, its backend restarting)
KEY_HEADER = "Idempotency-Key"  # (server.KEY_HEADER) the key of a job asked for, the same in every try of its form
RESUBMITS = 2  # a job the server no longer knows (it restarted) is sent again this many times by animate()
_CHUNK = 1 << 20
MAX_ANSWER_BYTES = 1 << 20  # the most bytes of a JSON answer (a job's state, an error) read
_sleep = time.sleep  # (the tests' stand-in waits no time)


class Stopped(Exception):  # noqa: N818 - a state, not a failure
    """The caller's ``stop`` event was set while a job ran: the job is cancelled on the server."""


class JobGone(InputError):  # noqa: N818 - named for what it says
    """The server no longer knows a job it took (it restarted, or the job was deleted or expired)."""


class Unreachable(InputError):  # noqa: N818 - named for what it says
    """The server could not be reached, or the connection broke before its answer came (tried again while a job is
    followed or its result fetched; a result's download broken off: ``etag`` names the file partly fetched)."""

    def __init__(self, message: str, etag: str | None = None, wait: float | None = None,
                 broken: bool = False, unsent: bool = False, refused: bool = False) -> None:
        super().__init__(message)
        self.etag = etag
        self.wait = wait  # (the server's Retry-After, where it said one)
        self.broken = broken  # (a result's download that broke off, not a server unreachable or refusing)
        self.unsent = unsent  # (the request broke off while it was sent: the server has not taken it)
        self.refused = refused  # (nothing listens at the address: no request of this try reached a server)


class ServerFailed(InputError):  # noqa: N818 - named for what it says
    """A job's run failed on the server for a reason of the server's own (its ``error_status`` 5xx: an error of the
    server, its GPU or memory, not of the request): another server may make the result."""


class _NotJson(InputError):  # noqa: N818 - named for what it says
    """An answer that is not JSON (a proxy's error page, or no megactor-rt server at the address); ``status``: its
    HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Client:
    """Talks to one ``megactor-rt serve`` at ``url`` (``http://host:port`` or ``https://host:port``), sending
    ``token`` with every request where given; ``ca_file``: the certificate(s) an https server's is checked against
    instead of the system's (a self-signed one)."""

    def __init__(self, url: str, timeout_s: float = 600.0, token: str | None = None,
                 ca_file: str | Path | None = None) -> None:
        try:
            parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        except ValueError as exc:  # (an IPv6 address without its closing bracket, http://[::1:8450)
            raise InputError(f"{url}: --server takes the address `megactor-rt serve` prints, http://HOST:PORT "
                             f"({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"{url}: --server takes the address `megactor-rt serve` prints, http://HOST:PORT (or "
                             "https://HOST:PORT for a server started with --tls-cert)")
        if "@" in parts.netloc:  # (shown nowhere: the address is in every message and --stats)
            raise InputError(f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}: --server's address takes no user "
                             "name or password; a server's token goes in --server-token-file (Python: token=)")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:  # (0 was taken for no port: the scheme's, 80 or 443)
            raise InputError(f"{url}: --server's port is no number from 1 to 65535")
        self.prefix = parts.path.rstrip("/")  # (a server behind a proxy at http://host/megactor/)
        self.url = f"{parts.scheme}://{parts.netloc}{self.prefix}"
        self.host, self.port = parts.hostname, port or (443 if parts.scheme == "https" else 80)
        self.timeout_s = timeout_s
        self.max_upload_bytes: int | None = None  # (the server's, from its health)
        self.keyed = False  # (whether the server takes KEY_HEADER: a form whose answer was lost may go again)
        # asked where a job's form finds the connection refused: whether another server takes the job at once
        # (then submit gives up without waiting out the outage; unset: a server restarting is waited for)
        self.others_take: Callable[[], bool] | None = None
        self._auth = {} if token is None else {"Authorization": f"Bearer {token}"}
        self._answered = False  # (whether the server ever answered: then it speaks this scheme)
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            try:
                self._tls = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise InputError(f"{ca_file}: cannot read it as certificates (PEM) for --server-ca ({exc})") from exc
        elif ca_file is not None:
            raise InputError(f"{ca_file}: --server-ca is for an https:// server; {self.url} is plain http")

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        if self._tls is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout_s, context=self._tls)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)

    # -- one request ----------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
              ) -> tuple[int, dict[str, str], http.client.HTTPResponse, http.client.HTTPConnection]:
        """One request. A form's upload (``body``) and a result's download wait up to ``timeout_s`` for each piece;
        the others are questions a server answers at once: :data:`ANSWER_TIMEOUT_S` at most."""
        transfer = body is not None or path.endswith("/result")
        conn = self._connection(self.timeout_s if transfer else min(self.timeout_s, ANSWER_TIMEOUT_S))
        try:
            try:
                conn.request(method, self.prefix + path, body, {**self._auth, **(headers or {})})
            except (BrokenPipeError, ConnectionResetError) as exc:  # a server that answered before reading the
                # whole form (a full queue's 503, a 413) and closed: its answer may be there to read (the close's
                # reset can take it: then Unreachable(unsent=True), which submit asks about)
                try:
                    answer = conn.getresponse()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    raise Unreachable(f"{self.url}: the server closed the connection while the form was sent "
                                      f"({type(exc).__name__}: {exc})", unsent=True) from exc
            else:
                answer = conn.getresponse()
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise InputError(f"{self.url}: the server's certificate is not trusted here ({exc.verify_message}); "
                             "a self-signed one: --server-ca CERT.pem") from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            hint = " (an https:// server?)" if self._tls is None and not self._answered and isinstance(
                exc, (http.client.RemoteDisconnected, ConnectionResetError)) else ""  # (not a server that answered
            # http before and was killed or restarted since: its connections reset then too)
            if self._tls is not None and isinstance(exc, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(exc):
                hint = " (a plain http:// server?)"
            raise Unreachable(f"{self.url}: cannot reach the server ({type(exc).__name__}: {exc}){hint}; is "
                             "`megactor-rt serve` running there?", refused=isinstance(exc, ConnectionRefusedError)
                              ) from exc
        self._answered = True
        if answer.status == 401:
            doc = _error(answer.read(MAX_ANSWER_BYTES), 401)
            conn.close()
            raise InputError(f"{self.url}: {doc}")
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer, conn

    def _json(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
              ) -> tuple[int, dict[str, str], dict[str, Any]]:
        status, head, answer, conn = self._call(method, path, body, headers)
        try:
            data = answer.read(MAX_ANSWER_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"{self.url}: the connection broke during the answer ({type(exc).__name__}: {exc})"
                              ) from exc
        finally:
            conn.close()
        told = head.get("content-length", "")
        if told.isdigit() and len(data) < int(told) and len(data) <= MAX_ANSWER_BYTES and method != "HEAD":
            raise Unreachable(f"{self.url}: the connection broke during the answer ({len(data)} of its {told} bytes "
                              "came)")
        if len(data) > MAX_ANSWER_BYTES:
            raise InputError(f"{self.url}{path}: the answer ({status}) is over {MAX_ANSWER_BYTES} bytes, not the "
                             "JSON a megactor-rt server gives; is this address a megactor-rt server?")
        try:
            doc = json.loads(data)
        except ValueError:
            raise _NotJson(f"{self.url}{path}: the answer ({status}) is not the JSON a megactor-rt server gives; is "
                           "this address a megactor-rt server?", status) from None
        return status, head, doc if isinstance(doc, dict) else {}

    def health(self) -> dict[str, Any]:
        """``GET /health``: the server's model and settings.

        Raises:
            Unreachable: the server, or its proxy (a 502 page: the server behind it down or restarting), answered
                a passing refusal (429, 502, 503, 504): an outage, as while a job is followed.
            InputError: the address is no megactor-rt server, or refuses the token.
        """
        try:
            status, head, doc = self._json("GET", "/health")
        except _NotJson as exc:  # (a proxy's page: is this a megactor-rt server behind it, down for now?)
            if exc.status not in _PASSING:
                raise
            raise Unreachable(f"{self.url}: GET /health answered {exc.status} (a proxy's page: the server behind it "
                              "down or restarting?)") from None
        if status in _PASSING:
            raise Unreachable(f"{self.url}: GET /health answered {status} ({doc.get('error', 'a passing refusal')})",
                              wait=_retry_after(head))
        if status != 200:
            raise InputError(f"{self.url}: GET /health answered {status}: {doc.get('error')}")
        if "max_upload_bytes" not in doc:  # (another service's health, {"status": "ok"}: its every job failed)
            raise InputError(f"{self.url}/health: the answer is not a megactor-rt server's (no max_upload_bytes: "
                             f"{', '.join(sorted(map(str, doc))[:8]) or 'empty'}); is this address a megactor-rt "
                             "server?")
        limit = doc.get("max_upload_bytes")
        self.max_upload_bytes = limit if _count(limit) else None
        self.keyed = doc.get("idempotency_keys") is True
        return doc

    def submit(self, portrait: Path, driver: Path, fields: dict[str, str] | None = None,
               files: Mapping[str, str | Path] | None = None, stop: threading.Event | None = None) -> str:
        """``POST /jobs``: a job for ``portrait`` and ``driver`` (and ``files``: mask, audio; ``fields``: the form's
        text fields); its id. A full queue (503) is asked again after the time the server says. Every try carries
        one key (:data:`KEY_HEADER`): where the server takes keys, a form whose answer was lost (the connection
        broke after it was sent, a proxy's 502/504) is sent again, for up to :data:`OUTAGE_S`, and gets the job the
        first made, if it made one, instead of a second job running unclaimed.

        Raises:
            InputError: the server refuses the form (named as it names it; a form over its upload limit before
                it is sent), or cannot be reached.
            Stopped: ``stop`` was set while the queue was full.
        """
        sent = {"portrait": Path(portrait), "driver": Path(driver), **{k: Path(v) for k, v in (files or {}).items()}}
        if self.max_upload_bytes is None:
            self.health()
        key, outage, busy, lost = uuid.uuid4().hex, None, 0, 0
        while busy < BUSY_TRIES:
            body, length, content_type = _form(fields or {}, sent)
            if self.max_upload_bytes is not None and length > self.max_upload_bytes:
                raise InputError(f"{', '.join(str(p) for p in sent.values())}: {length} bytes to send, over the "
                                 f"upload limit of {self.url} ({self.max_upload_bytes} bytes: serve --max-upload-mb)")
            try:
                try:
                    status, head, doc = self._json("POST", "/jobs", body, {
                        "Content-Type": content_type, "Content-Length": str(length), KEY_HEADER: key})
                except _NotJson as exc:
                    if not (self.keyed and exc.status in (502, 504)):
                        raise
                    status, head, doc = exc.status, {}, {"error": "a proxy's page"}
                if self.keyed and status in (502, 504):  # (a proxy's: the form may have reached the server)
                    raise Unreachable(f"{self.url}: POST /jobs answered {status} ({doc.get('error', 'a proxy')})")
            except Unreachable as exc:
                if exc.unsent:  # (a full queue refuses a form before reading it and closes: with a large driver
                    # the send broke before its answer could be read; no job was made of a form not read)
                    self.health()  # (a server gone: Unreachable)
                    logger.warning("%s; the server answers (its queue full?): asking again in %g s", exc,
                                   BUSY_WAIT_S)
                    busy += 1
                    _pause(BUSY_WAIT_S, stop, f"a request to {self.url}")
                    continue
                if not self.keyed:  # (a job may have been made: a second form would make another)
                    raise
                if exc.refused and self.others_take is not None and self.others_take():  # (the form never
                    raise  # arrived: another server of the batch takes the job now, not after the outage)
                level = logging.WARNING if outage is None else logging.DEBUG  # (said once an outage, not per try)
                outage = _outage(exc, outage, "sending a job")
                wait, lost = _backoff(lost), lost + 1
                logger.log(level, "%s; sending the form again in %g s with its key (a job it made is not made twice), "
                           "for up to %g s", exc, wait, OUTAGE_S)
                _pause(wait, stop, f"a request to {self.url}")
                continue
            outage = None  # (the server answered: an outage after this is another, said and timed anew)
            if status in (200, 202):  # (200: a job the key's form made before)
                job = doc.get("id")
                if not isinstance(job, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", job):
                    raise InputError(f"{self.url}: POST /jobs answered {status} without a job id of the form a "
                                     f"megactor-rt server gives (got {job!r:.60})")
                return job
            if status not in (429, 503):
                raise InputError(f"{self.url}: {doc.get('error', f'the server answered {status}')}")
            wait = _retry_after(head) or BUSY_WAIT_S
            logger.warning("%s: %s; asking again in %g s", self.url, doc.get("error"), wait)
            busy += 1
            _pause(wait, stop, f"a request to {self.url}")
        raise ResourceError(f"{self.url}: the server stayed busy ({BUSY_TRIES} tries); try again later")

    def wait(self, job: str, on_progress: Callable[[Progress], object] | None = None,
             stop: threading.Event | None = None) -> dict[str, Any]:
        """Follow job ``job`` until its run ends (done, failed or cancelled), passing its progress on; its state.

        Raises:
            Stopped: ``stop`` was set meanwhile.
        """
        last, outage = None, None
        while True:
            if stop is not None and stop.is_set():
                raise Stopped(f"job {job} on {self.url}")
            try:
                status, head, doc = self._json("GET", f"/jobs/{job}")
                if status in _PASSING:  # (busy, or a proxy whose backend restarts)
                    raise Unreachable(f"{self.url}: GET /jobs/{job} answered {status} "
                                      f"({doc.get('error', 'a passing refusal')})", wait=_retry_after(head))
            except (Unreachable, _NotJson) as exc:  # (the job goes on there: asked again, for a while)
                if outage is None:
                    logger.warning("%s; asking about job %s again for up to %g s", exc, job, OUTAGE_S)
                outage = _outage(exc, outage, f"following job {job}")
                wait = getattr(exc, "wait", None)
                _pause(min(2.0, POLL_S * 4) if wait is None else wait, stop, f"job {job} on {self.url}")
                continue
            if outage is not None:
                logger.warning("%s: reached again after %.0f s", self.url, time.monotonic() - outage)
                outage = None
            if status == 404:
                raise JobGone(f"{self.url}: job {job} is no longer there (the server restarted, or the job was "
                              "deleted or expired): send it again")
            if status != 200:
                raise InputError(f"{self.url}: job {job}: {doc.get('error', status)}")
            if not isinstance(doc.get("status"), str):
                raise InputError(f"{self.url}: job {job}: its state (GET /jobs/{job}) has no 'status'; is this "
                                 "address a megactor-rt server?")
            progress = doc.get("progress")
            if on_progress is not None and progress and progress != last:
                shown = _progress(progress)
                if shown is None:
                    logger.debug("%s: job %s: a progress report not understood: %.200r", self.url, job, progress)
                else:
                    on_progress(shown)
                last = progress
            if doc["status"] not in ("queued", "running"):
                return doc
            time.sleep(POLL_S)

    def fetch(self, job: str, output: Path, stop: threading.Event | None = None) -> dict[str, str]:
        """Write job ``job``'s result to ``output`` (under a temporary name in its folder, renamed when whole; a
        download that breaks off partway goes on from where it broke, :data:`FETCH_TRIES` tries in all, or is made
        again where the server sends the whole; a server unreachable or refusing for a while, 429/502/503/504, is
        asked again for up to :data:`OUTAGE_S`, after its ``Retry-After`` within :data:`MIN_WAIT_S` and
        :data:`MAX_WAIT_S`); the answer's headers (``x-megactor-frames``, ...). Kept only whole: the answer's size
        told (Content-Length, Content-Range from where asked, or the server's ETag), its type (if told) a video's.

        Raises:
            JobGone: the server no longer knows the job (404).
            InputError: a refusal that does not pass, a malformed or misplaced answer, or the outage went on.
            ResourceError: ``output`` cannot be written.
            Stopped: ``stop`` was set while waiting to ask again."""
        try:
            with written_whole(output) as partial:
                partial.write_bytes(b"")
                tag: str | None = None
                broken, failed, outage = 0, 0, None
                while True:
                    try:
                        return self._fetch(job, output, partial, tag, stop)
                    except Unreachable as exc:
                        tag = exc.etag or tag
                        have = partial.stat().st_size
                        wait, failed = exc.wait if exc.wait is not None else _backoff(failed), failed + 1
                        if exc.broken:  # (its answer came: a server's restart, a proxy's timeout)
                            broken, outage = broken + 1, None
                            if broken >= FETCH_TRIES:
                                raise
                            logger.warning("%s; fetching the result again%s (try %d of %d) in %g s", exc,
                                           f" from byte {have}" if tag and have else "", broken + 1, FETCH_TRIES,
                                           wait)
                        else:
                            level = logging.WARNING if outage is None else logging.DEBUG  # (once an outage)
                            outage = _outage(exc, outage, f"fetching job {job}'s result")
                            logger.log(level, "%s; fetching the result again in %g s (for up to %g s)", exc, wait,
                                       OUTAGE_S)
                        _pause(wait, stop, f"job {job}'s result on {self.url}")
        except OSError as exc:
            raise ResourceError(f"{output}: cannot write the result ({exc})") from exc

    def _fetch(self, job: str, output: Path, partial: Path, tag: str | None,
               stop: threading.Event | None = None) -> dict[str, str]:
        """One try of :meth:`fetch` into ``partial``: its bytes so far asked for no more (a ``Range`` from where
        they end, valid only for the file whose ``ETag`` is ``tag``); an ``Unreachable`` raised carries the
        answer's ETag (``etag``) for the next try; :class:`Stopped` where ``stop`` is set while the bytes come
        (a slow download went on after Ctrl-C until the command gave up on it, its partial file left behind)."""
        have = partial.stat().st_size if tag else 0
        ask = {"Range": f"bytes={have}-", "If-Range": tag} if tag and have else {}
        status, head, answer, conn = self._call("GET", f"/jobs/{job}/result", headers=ask)
        try:
            if status == 416 and ask:  # (what it has is all there is? asked whole on the next try)
                partial.write_bytes(b"")
                raise Unreachable(f"{output}: the server has no bytes past the {have} fetched")
            if status == 404:
                raise JobGone(f"{self.url}: job {job} is no longer there to fetch its result from (the server "
                              "restarted, or the job was deleted or expired): send it again")
            if status in _PASSING:
                raise Unreachable(f"{self.url}: GET /jobs/{job}/result answered {status} "
                                  f"({_error(answer.read(MAX_ANSWER_BYTES), status)})", wait=_retry_after(head))
            if status not in (200, 206):
                raise InputError(f"{output}: {_error(answer.read(MAX_ANSWER_BYTES), status)}")
            kind = head.get("content-type", "").partition(";")[0].strip().lower()
            if kind and not kind.startswith(("video/", "image/")) and kind != "application/octet-stream":
                raise InputError(f"{output}: {self.url} answered job {job}'s result as {kind}, not a video (a "
                                 "proxy's page?); not kept")
            start, total = self._extent(job, output, status, head, have if ask else None)
            with open(partial, "ab" if start else "wb") as out:
                try:
                    while chunk := answer.read(_CHUNK):
                        out.write(chunk)
                        if stop is not None and stop.is_set():
                            raise Stopped(f"job {job}'s result from {self.url}")
                except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
                    raise Unreachable(f"{output}: the result's download broke off ({type(exc).__name__}: {exc})",
                                      head.get("etag"), broken=True) from exc
            size = partial.stat().st_size
            if size > total:
                raise InputError(f"{output}: {self.url} sent {size} bytes of a result of {total}; not kept")
            if size != total:
                raise Unreachable(f"{output}: the result's download broke off ({size} of {total} bytes)",
                                  head.get("etag"), broken=True)
        finally:
            conn.close()
        return head

    def _extent(self, job: str, output: Path, status: int, head: dict[str, str], have: int | None
                ) -> tuple[int, int]:
        """Where a result's answer (``status`` 200 or 206, ``head``) starts and the whole result's bytes, as it
        tells them (``have``: the bytes already here that a range was asked from, None where none was): its
        Content-Range (that must start at ``have``), its Content-Length, or the size in a megactor-rt ETag.

        Raises:
            InputError: they are malformed or not what was asked, or the answer tells no size at all (a result cut
                short could not be told from a whole one).
        """
        length = head.get("content-length", "").strip() or None
        if length is not None and not length.isdigit():
            raise InputError(f"{output}: {self.url} answered job {job}'s result with a malformed Content-Length "
                             f"({length!r:.40})")
        if status == 206:
            got = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", head.get("content-range", "").strip())
            if have is None or got is None or int(got[1]) != have or int(got[2]) + 1 != int(got[3]) or (
                    length is not None and int(length) != int(got[3]) - have):
                raise InputError(f"{output}: {self.url} answered job {job}'s result with another part than the "
                                 f"bytes {have}- asked for (Content-Range {head.get('content-range')!r:.60})")
            return have, int(got[3])
        tag = re.fullmatch(rf'"{re.escape(job)}-([0-9a-f]+)-[0-9a-f]+"', head.get("etag", "").strip())
        if length is not None:
            if tag is not None and int(tag[1], 16) != int(length):
                raise InputError(f"{output}: {self.url} answered job {job}'s result with a Content-Length "
                                 f"({length}) other than its ETag's size ({int(tag[1], 16)} bytes)")
            return 0, int(length)
        if tag is None:
            raise InputError(f"{output}: {self.url} answered job {job}'s result without its length "
                             "(Content-Length); a result cut short could not be told from a whole one")
        return 0, int(tag[1], 16)

    def delete(self, job: str) -> None:
        """``DELETE /jobs/ID``: cancel the job or delete its result on the server (its answer is not needed)."""
        with contextlib.suppress(InputError):
            self._json("DELETE", f"/jobs/{job}")

    def animate(self, portrait: str | Path, driver: str | Path, output: str | Path,
                fields: dict[str, str] | None = None, files: Mapping[str, str | Path] | None = None,
                on_progress: Callable[[Progress], object] | None = None,
                stop: threading.Event | None = None) -> dict[str, str]:
        """One result made by the server, written to ``output``: submitted as a job, followed, fetched, and
        deleted on the server; stopped here (Ctrl-C, an error, ``stop`` set) before its run ended, the job is
        cancelled there; a finished result that could not be fetched or written here stays there (the error names
        its address: the server expires it by itself). A job the server loses meanwhile (it restarted: followed
        through the outage, then not found, its result included) is sent again, :data:`RESUBMITS` times at most.
        The result's headers.

        The result's format is its suffix's (``fields["format"]`` where given says otherwise), and ``output`` is
        checked as a local run checks it before anything is sent: its folder exists and is writable, it is no
        folder, and it is none of the inputs (the result would replace it).

        Raises:
            ServerFailed: the run failed for the server's own reason (5xx: another server may make it).
            InputError: the server refused the form or its run failed (with the server's message); ``output`` cannot
                be written, is an input, or has a suffix the server does not write (checked before sending).
            Stopped: ``stop`` was set before the result was fetched.
        """
        output = Path(output).expanduser()  # (where check_result_path checked it: ~/out.mp4 ran, then failed)
        check_result_path(output, portrait=portrait, driver=driver, **(files or {}))
        fields = result_fields(output, fields)
        for attempt in range(RESUBMITS + 1):
            job = self.submit(Path(portrait), Path(driver), fields, files, stop)
            keep = False  # (a finished result that could not be fetched here stays there, for a fetch by hand)
            try:
                try:
                    state = self.wait(job, on_progress, stop)
                    if state["status"] != "done":
                        server_s = isinstance(state.get("error_status"), int) and state["error_status"] >= 500
                        raise (ServerFailed if server_s else InputError)(
                            f"{output}: {state.get('error') or 'the run was ' + state['status']} (on {self.url})")
                    keep = True
                    try:
                        head = self.fetch(job, output, stop)
                    except JobGone:
                        keep = False
                        raise
                    except MegactorError as exc:
                        raise type(exc)(f"{exc}; the result stays on the server until it expires it: "
                                        f"{self.url}/jobs/{job}/result") from exc
                    keep = False
                    return head
                except JobGone as exc:
                    if attempt == RESUBMITS:
                        raise
                    logger.warning("%s; sending it again (%d of %d)", str(exc).removesuffix(": send it again"),
                                   attempt + 1, RESUBMITS)
            finally:
                if not keep:
                    self.delete(job)
        raise AssertionError("unreachable")


def result_fields(output: Path, fields: dict[str, str] | None) -> dict[str, str]:
    """The form's text ``fields`` with the result's format: ``output``'s suffix, unless ``fields`` name one.

    Raises:
        InputError: ``output``'s suffix is no video file a server writes (frame sequences and ``-`` are made
            locally), where ``fields`` name no format.
    """
    from megactor_rt.media import RESULT_SUFFIXES

    fields = dict(fields or {})
    if "format" not in fields:
        if output.suffix.lower() not in RESULT_SUFFIXES:
            raise InputError(f"{output}: a server writes a video file ({', '.join(RESULT_SUFFIXES)}); image "
                             "sequences and standard output (-) are made by a local run")
        fields["format"] = output.suffix.lower().lstrip(".")
    return fields


def check_result_path(output: Path, **inputs: object) -> None:
    """What a local run checks of its result before any work (as :func:`megactor_rt.media.check_output_path` and
    :func:`megactor_rt.media.check_not_an_input` do; the encoders are the server's), before the job is sent: the
    server's result replaces the file at ``output``, never one of the ``inputs`` (paths; others are skipped).

    Raises:
        InputError: naming ``output`` and the problem.
    """
    from megactor_rt.media import check_writable_result, is_sequence, is_stdout

    for what, source in inputs.items():  # (first: a portrait named as the result is refused as that, .png or not)
        if isinstance(source, (str, os.PathLike)) and Path(source).exists() and same_file(output, source):
            raise InputError(f"{output}: the result would overwrite the {what} (an input of this run); choose "
                             "another output path")
    if is_sequence(output) or is_stdout(output):
        raise InputError(f"{output}: a server's result is a video file; image sequences and standard output (-) "
                         "are made by a local run")
    check_writable_result(output.expanduser().absolute(), output)


def _progress(doc: Any) -> Progress | None:
    """A job state's ``progress`` as the server writes it; None where it is not that (the display skips it)."""
    if not isinstance(doc, dict):
        return None
    stage, done, total, unit = (doc.get(k) for k in ("stage", "done", "total", "unit"))
    if not (isinstance(stage, str) and isinstance(unit, str) and _count(done) and (total is None or _count(total))):
        return None
    return Progress(stage, done, total, unit)


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _retry_after(head: dict[str, str]) -> float | None:
    """The seconds an answer's ``Retry-After`` says to wait (a number), within :data:`MIN_WAIT_S` and
    :data:`MAX_WAIT_S`; None where it says none (or no number: a date is not waited for)."""
    try:
        wait = float(head.get("retry-after", "").strip())
    except ValueError:
        return None
    return min(max(wait, MIN_WAIT_S), MAX_WAIT_S) if math.isfinite(wait) else None


def _outage(exc: Exception, began: float | None, what: str) -> float:
    """When the outage that ``exc`` is part of began (now, where it is its first failure).

    Raises:
        Unreachable: it has gone on for over :data:`OUTAGE_S` (``what`` says what the client was doing)."""
    now = time.monotonic()
    began = now if began is None else began
    if now - began > OUTAGE_S:
        raise Unreachable(f"{exc} (for {now - began:.0f} s, {what})") from exc
    return began


def _backoff(failed: int) -> float:
    """The wait before asking again after ``failed`` failures in a row before this one: :data:`RETRY_S`, doubled
    after each, up to 2 s."""
    return min(2.0, RETRY_S * 2 ** failed)


def _pause(seconds: float, stop: threading.Event | None, what: str) -> None:
    """Wait ``seconds`` before asking again, unless ``stop`` is set meanwhile (then :class:`Stopped`, naming
    ``what``)."""
    if stop is None:
        _sleep(seconds)
    elif stop.wait(seconds):
        raise Stopped(what)


def result_stats(headers: dict[str, str]) -> Any:
    """A result's run as its answer's ``X-Megactor-*`` headers tell it (``Task.headers`` in
    :mod:`megactor_rt.server` writes them; names in lower case, as :meth:`Client.fetch` gives them): a
    :class:`~megactor_rt.runtime.pipeline.RunStats` of frames, seconds and what was kept from earlier requests."""
    from megactor_rt.runtime.pipeline import RunStats

    def number(name: str) -> float:  # (nonsense, NaN, infinite or negative: as not given)
        try:
            value = float(headers.get(name, "0"))
        except ValueError:
            return 0.0
        return value if math.isfinite(value) and value >= 0 else 0.0

    frames = number("x-megactor-frames")
    return RunStats(frames=int(frames) if frames == int(frames) else 0,
                    total_s=number("x-megactor-seconds"),
                    first_frame_s=number("x-megactor-first-frame-seconds"),
                    portrait_cache_hit=headers.get("x-megactor-portrait-cached") == "true",
                    driver_plan_hit=headers.get("x-megactor-driver-cached") == "true")


def _form(fields: dict[str, str], files: dict[str, Path]) -> tuple[Iterator[bytes], int, str]:
    """A multipart/form-data body streamed from the files (not read into memory), its length and Content-Type."""
    boundary = uuid.uuid4().hex
    pieces: list[bytes | Path] = []
    for name, value in fields.items():
        pieces.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, path in files.items():
        quoted = path.name.replace("\\", "_").replace('"', "_").replace("\r", "_").replace("\n", "_")
        pieces.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{quoted}"\r\n'
                      "Content-Type: application/octet-stream\r\n\r\n".encode())
        pieces.append(path)
        pieces.append(b"\r\n")
    pieces.append(f"--{boundary}--\r\n".encode())
    try:
        length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in pieces)
    except OSError as exc:
        raise InputError(f"{exc.filename}: cannot read it ({exc.strerror})") from exc

    def body() -> Iterator[bytes]:
        for piece in pieces:
            if isinstance(piece, bytes):
                yield piece
                continue
            with open(piece, "rb") as f:
                while chunk := f.read(_CHUNK):
                    yield chunk

    return body(), length, f"multipart/form-data; boundary={boundary}"


def _error(data: bytes, status: int) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return f"the server answered {status}"
