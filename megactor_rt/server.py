"""An HTTP server that keeps one :class:`~megactor_rt.runtime.animator.Animator` loaded (``megactor-rt serve``).

Loading the weights, compiling and building engines take seconds to minutes; a portrait's preparation (its VAE
latents, CLIP tokens and ReferenceNet bank) and a driver's plan (every frame's face) take a while too. A command
pays them at every call; this server pays them once, keeps prepared portraits in the Animator's cache and the
latest drivers on disk (:meth:`AnimateServer.keep_driver`), and takes its work over HTTP from programs in any
language (:mod:`megactor_rt.client` is its client)::

    curl -F portrait=@me.png -F driver=@meme.mp4 -o out.mp4 http://127.0.0.1:8450/animate

``POST /animate`` takes a ``multipart/form-data`` form (what ``curl -F`` and HTML forms send): the files
``portrait`` and ``driver`` (required), ``mask`` and ``audio`` (optional; with ``allow_urls`` any of them may be an
http(s) address instead), and the text fields of :data:`TEXT_FIELDS` (``format``, ``start``, ``seed``, ``steps``,
...; each means what the ``animate`` flag or jobs-file column of its name means: a preview with fewer steps and a
final run share one loaded model). The answer is the result file (``Content-Disposition`` names it
``<portrait>_<driver>.mp4``, the ``X-Megactor-*`` headers give the run's frames, seconds and whether the portrait
and the driver's plan were kept from earlier requests), or a JSON object ``{"error": "..."}``: 400 for bad input
(the message names the field or the problem, as the command line's do), 413 for a form over the upload limit, 408
for a form that comes too slowly (:data:`MIN_UPLOAD_RATE`), 503 while more requests wait than the server queues (or
a full disk), 500 for a failure of the server itself, 503 for a run the server's stop cut short, 410 for one cancelled
meanwhile (``DELETE /jobs/ID``).

A run longer than a client, or a proxy between, waits for an answer goes as a **job**: ``POST /jobs`` takes the
same form and answers at once (202, ``{"id": ..., "status": "queued"}``, ``Location: /jobs/ID``); ``GET /jobs/ID``
says where it is (queued with the runs ``ahead`` of it, running with its ``progress``: stage, done, total, unit;
done, failed with its ``error``, or cancelled); ``GET /jobs/ID/result`` answers as ``POST /animate`` would have
(409 before it is done, 410 cancelled); ``DELETE /jobs/ID`` cancels it (queued: at once; running: at its next
progress report, and with a ``jobs_dir`` in its record at once; a cancelled job stays listed, as a finished one does)
or deletes its result; ``GET /jobs`` lists them. A job's result is kept ``keep_s`` after its run (and the
``max_kept`` latest only), then removed whether or not anyone asks about it. A ``POST /jobs`` that
carries an ``Idempotency-Key`` header (:data:`KEY_HEADER`, up to 128 letters, digits and ``_.:-``) sent again with
the same key while its job is known (a client whose connection broke before the answer came) is answered 200 with
that job instead of making a second one (its form is read and dropped). ``GET /health`` answers a
JSON object: the model's settings, the run under way and how many wait; ``GET /metrics`` counters and gauges for
Prometheus (runs, frames, run seconds, the queue, answers by status, portraits kept); ``GET /openapi.json`` the API
as an OpenAPI 3 document; ``GET /`` a page with the form for a browser (it runs the form as a job, shows its
progress, then the result and a link to save it). Pages of other sites may call the server only where
``cors_origins`` names them.

One run at a time (one model on one device), on a worker thread of the server's; the requests that come meanwhile
wait in turn. Uploads and results are kept in a temporary folder per request, removed when its answer has been
sent (a job's result: when it is deleted or expires; its uploads when its run ends). Stopping the server cancels
a run under way.

Given a ``jobs_dir``, the jobs outlive the server: each job's folder (its uploads, its result) and its record
(``job.json``, rewritten as its state changes) are kept there, the drivers kept for the next requests too. A
server started again on that folder (:meth:`AnimateServer.restore`) knows the jobs kept before, runs the jobs that
were queued, and runs again the one that was running, from its last denoising step where it saved one (a
checkpoint per job, :mod:`~megactor_rt.runtime.checkpoint`; wrapping windows); stopping such a server leaves its
queued and running jobs queued. A job's record is written before anything of it is removed: a job whose record
cannot be written is refused (503 for a full disk), and a run's record says done before its uploads and checkpoint
go, so that a server stopped or killed at any moment leaves what a server started again takes up (a result written
whole before its record said so is served as done; a job whose files were deleted meanwhile fails, naming them). It
removes there only what it made (a job's folder without a record, ``POST /animate``'s request folders) and leaves,
and logs, anything else and what it cannot read; ``jobs``, ``drivers`` and ``requests`` there are its folders (a
file of such a name is refused at start). One server at a time may use a folder (a lock).

The server listens on the loopback address unless told otherwise, and there answers requests to local names only
(``allowed_hosts``: DNS rebinding). Given a ``token``, every request but the page, the
API description and ``GET /ping`` (static; ``/ping`` for load balancers that send no header) must carry it
(``Authorization: Bearer TOKEN``; 401 otherwise); given a ``tls`` context, it speaks HTTPS (each connection's
handshake made on the connection's own thread, so a slow or broken client holds up no other).
"""

from __future__ import annotations

import bisect
import contextlib
import email.parser
import errno
import hashlib
import hmac
import http.server
import ipaddress
import json
import logging
import math
import os
import re
import select
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Protocol

from megactor_rt.assets import ASSETS_DIR
from megactor_rt.config import AnimateConfig
from megactor_rt.engine.cache import sha256_file, write_atomic
from megactor_rt.errors import InputError, MegactorError, ResourceError
from megactor_rt.files import written_whole
from megactor_rt.jobs import CONFIG_COLUMNS, FACE_COLUMNS, NO_SOUND, Job, job_from_cells
from megactor_rt.media import RESULT_SUFFIXES
from megactor_rt.remote import as_url, cut_utf8, download, safe_name

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8450
RUN_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)  # GET /metrics: the run-time histogram's bounds
KEPT_DRIVERS = 16  # uploaded drivers kept for requests that send them again (their faces found once)
KEPT_DRIVER_BYTES = 2 << 30  # ... and their bytes together at most (a few long uploads do not fill the disk)
PAGE = ASSETS_DIR / "serve.html"  # GET /: a form for a browser, which posts to /animate and shows the result
FILE_FIELDS = ("portrait", "driver", "mask", "audio")
# what a request may set besides its files: the jobs-file columns that are no file (audio: "none" for no sound),
# the result's format and what shapes its frames
TEXT_FIELDS = ("format", "audio", "audio_start", *FACE_COLUMNS, *CONFIG_COLUMNS, "crf", "side_by_side", "paste_back")
CALLBACK = "callback"  # POST /jobs: an address the server posts the job's end to (serve --allow-callbacks)
CALLBACK_TRIES = 3  # a callback answered 5xx or not reached is posted this many times in all
CALLBACK_TIMEOUT_S = 10.0  # how long a callback's receiver may take to answer (then posted again: it may have it)
# POST /jobs: a key the client chose for the job it asks for; a form sent again with it (its answer was lost) gets
# the job the first made, not a second one
KEY_HEADER = "Idempotency-Key"
_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
FORMATS = tuple(s[1:] for s in RESULT_SUFFIXES)  # the video files the writer makes (no frame sequences: folders)
# their content types in answers (others: application/octet-stream)
_MEDIA_TYPES = {".mp4": "video/mp4", ".m4v": "video/x-m4v", ".mov": "video/quicktime", ".mkv": "video/x-matroska",
                ".webm": "video/webm", ".gif": "image/gif", ".webp": "image/webp"}
_TEXT_LIMIT = 64 << 10  # a text field's most bytes
_HEADER_LIMIT = 16 << 10  # a part's headers' most bytes
_CHUNK = 1 << 20
MIN_UPLOAD_RATE, UPLOAD_GRACE_S = 8 << 10, 30.0  # bytes/s on average a form must come at, once 30 s have passed
_EXPIRE_POLL_S = 30.0  # how often an idle server's worker removes the jobs kept past keep_s
_GONE_POLL_S = 1.0  # how often a POST /animate waiting for its run looks whether its client is still there
_STOP_ANSWERS_S = 5.0  # how long a stopping server waits for the answers to the POST /animate requests it ended
_LINGER_S, _LINGER_BYTES = 2.0, 16 << 20  # how long and how much of a refused body is read before closing
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_FORMS = ("/animate", "/jobs")  # the routes that take a form
# GET without the token: the same for everyone, nothing of a user's (/ping: for load balancers that send no header)
_OPEN = ("/", "/index.html", "/openapi.json", "/ping")
TOKEN_ENV = "MEGACTOR_SERVE_TOKEN"  # the token, for `serve` (its own) and `animate --server` (the one it sends)
MIN_TOKEN = 16  # a token's fewest characters (a guess per request: it must not be guessable)
_STATUSES = ("queued", "running", "done", "failed", "cancelled")  # a job's
RECORD = "job.json"  # a job's record in its folder, with jobs_dir
RECORD_FORMAT = 1
_JOB_ID = re.compile(r"[0-9a-f]{12}")  # a job's id, its folder's name in jobs_dir/jobs (uuid4().hex[:12])
_REQUEST_PREFIX = "megactor-rt-serve-"  # a request's temporary folder's name (in jobs_dir/requests with one)
# the answer headers a page of another site may read (CORS)
_EXPOSED = ("Content-Disposition, Location, Retry-After, X-Megactor-Frames, X-Megactor-Seconds, "
            "X-Megactor-First-Frame-Seconds, X-Megactor-Portrait-Cached, X-Megactor-Driver-Cached, Accept-Ranges, "
            "Content-Range, ETag")


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class FormError(Exception):
    """A request the server cannot take; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _stopping() -> FormError:
    """The 503 of a form that came whole after the server's stop (Ctrl-C, SIGTERM, server_close)."""
    return FormError("the server is stopping; send the request again (once it is back, or to another server)", 503)


class _Body:
    """At most ``length`` bytes of a request's body, read as they come; one that comes slower than
    :data:`MIN_UPLOAD_RATE` on average once :data:`UPLOAD_GRACE_S` have passed is refused (408): a client trickling
    bytes held its place among the requests that wait (``--queue``) for as long as it liked."""

    def __init__(self, stream: _Readable, length: int) -> None:
        self.stream, self.left, self.got, self.began = stream, length, 0, time.monotonic()
        self._read = getattr(stream, "read1", stream.read)  # (what has come, without waiting for a whole chunk)

    def read(self) -> bytes:
        if self.left <= 0:
            raise FormError("the form ends before its closing boundary")
        took = time.monotonic() - self.began
        if took > UPLOAD_GRACE_S and self.got < MIN_UPLOAD_RATE * took:
            raise FormError(f"the form comes too slowly ({self.got} bytes in {took:.0f} s; a form must come at "
                            f"{MIN_UPLOAD_RATE >> 10} KiB/s or more once {UPLOAD_GRACE_S:g} s have passed)", 408)
        try:
            chunk = self._read(min(_CHUNK, self.left))
        except TimeoutError as exc:  # (nothing for the connection's timeout: as slow as a form comes; was a 400)
            raise FormError(f"the form stopped coming ({self.got} of {self.got + self.left} bytes, then nothing for "
                            f"{time.monotonic() - self.began - took:.0f} s)", 408) from exc
        except OSError as exc:
            raise FormError(f"the form could not be read ({type(exc).__name__}: {exc})") from exc
        if not chunk:
            raise FormError(f"the form ends {self.left} bytes before its announced length (Content-Length)")
        self.left -= len(chunk)
        self.got += len(chunk)
        return chunk


def _boundary(content_type: str, route: str = "/animate") -> bytes:
    header = email.parser.HeaderParser().parsestr(f"Content-Type: {content_type}\n\n")
    if header.get_content_type() != "multipart/form-data":
        raise FormError(f"the request is {header.get_content_type()}; POST {route} takes multipart/form-data (the "
                        "files as curl -F portrait=@me.png -F driver=@meme.mp4 sends them)", 415)
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise FormError("the multipart/form-data request has no valid boundary in its Content-Type")
    return boundary.encode("latin-1")


def read_form(stream: _Readable, length: int, content_type: str, folder: Path,
              files: tuple[str, ...] = FILE_FIELDS, texts: tuple[str, ...] = TEXT_FIELDS, route: str = "/animate"
              ) -> tuple[dict[str, str], dict[str, Path]]:
    """Read a ``multipart/form-data`` body of ``length`` bytes from ``stream`` without holding it in memory: each
    file part is written to ``folder/<field>/<its file name>`` as it arrives (the name made safe; the field's name
    where it has none), each text part kept (at most 64 KiB).

    Returns:
        (text fields, file fields): field name -> text, field name -> path. A field of ``files`` sent as text (an
        address, say) is among the texts (unless empty: not given); a field of ``texts`` sent as a file is read as
        its text.

    Raises:
        FormError: not multipart/form-data (415), a malformed body, a field not in ``files`` or ``texts``, a field
            given twice, a text field over 64 KiB.
    """
    boundary, body = _boundary(content_type, route), _Body(stream, length)  # (route: the one a 415 names)
    delimiter = b"\r\n--" + boundary
    text: dict[str, str] = {}
    paths: dict[str, Path] = {}
    buf = _copy_until(b"\r\n", delimiter, body, lambda _: None)  # (a preamble is skipped)
    while True:
        while len(buf) < 2:
            buf += body.read()
        if buf.startswith(b"--"):  # the closing delimiter (an epilogue is left unread)
            return text, paths
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > _HEADER_LIMIT:
                raise FormError("a part of the form has headers over 16 KiB")
            buf += body.read()
            end = buf.find(b"\r\n\r\n")
        if end > _HEADER_LIMIT:  # (come in one read: was taken whatever their size)
            raise FormError("a part of the form has headers over 16 KiB")
        # (browsers send a file name as UTF-8 bytes: read so, not as ASCII, which garbled "café.png")
        head = email.parser.HeaderParser().parsestr(
            (buf[:end].partition(b"\r\n")[2] + b"\r\n\r\n").decode("utf-8", errors="replace"))
        buf = buf[end + 4:]
        name = head.get_param("name", header="content-disposition")
        filename = head.get_filename()
        if filename:  # (browsers and curl send a name's '"', CR and LF as %22, %0D, %0A: WHATWG's form encoding)
            filename = filename.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")
        if not isinstance(name, str):
            raise FormError("a part of the form has no field name (Content-Disposition: form-data; name=...)")
        if name in text or name in paths:
            raise FormError(f"field {name!r} is given twice")
        if filename == "" and name in files:  # (a browser's file input left empty)
            buf = _copy_until(buf, delimiter, body, lambda _: None)
        elif filename is not None and name in files:
            target = folder / name / safe_name(Path(filename.replace("\\", "/")).name, name)
            target.parent.mkdir(parents=True)
            with open(target, "wb") as out:
                buf = _copy_until(buf, delimiter, body, out.write)
            paths[name] = target
        elif name in texts or name in files:  # (a file field as text: an address, or a client's "none given")
            value = bytearray()

            def keep(chunk: bytes, value: bytearray = value, name: str = name) -> None:
                value.extend(chunk)
                if len(value) > _TEXT_LIMIT:
                    raise FormError(f"field {name!r} is over 64 KiB; a text field takes a value, not a file")

            buf = _copy_until(buf, delimiter, body, keep)
            try:
                decoded = value.decode()
            except UnicodeDecodeError:
                raise FormError(f"field {name!r} is not UTF-8 text") from None
            if decoded.strip() or name in texts:  # (empty for a file field: not given, as some clients send it)
                text[name] = decoded
        else:
            raise FormError(f"unknown field {name!r}; the fields are the files {', '.join(files)} and "
                            f"{', '.join(t for t in texts if t not in files)}")


def _copy_until(buf: bytes, delimiter: bytes, body: _Body, sink: Callable[[bytes], object]) -> bytes:
    """Pass ``buf`` and then the body to ``sink`` up to ``delimiter``; return what follows the delimiter."""
    keep = len(delimiter) - 1  # (a delimiter's beginning may end a chunk)
    while True:
        at = buf.find(delimiter)
        if at >= 0:
            sink(buf[:at])
            return buf[at + len(delimiter):]
        cut = max(0, len(buf) - keep)
        if cut:
            sink(buf[:cut])
        buf = buf[cut:] + body.read()


def _flag(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise FormError(f"field {name!r} takes true or false, got {value!r}")


class Cancelled(Exception):  # noqa: N818 - a state, not a failure
    """Raised by a run's progress function where its job was cancelled (``DELETE /jobs/ID``): the run stops."""


@dataclass(frozen=True)
class RunOutcome:
    """What a finished run's answer tells of it (the Animator's ``RunStats``, kept in a job's record)."""

    frames: int
    total_s: float
    first_frame_s: float
    portrait_cache_hit: bool
    driver_plan_hit: bool

    @classmethod
    def of(cls, stats: Any) -> RunOutcome:
        return cls(int(stats.frames), float(stats.total_s or 0.0), float(stats.first_frame_s or 0.0),
                   bool(stats.portrait_cache_hit), bool(stats.driver_plan_hit))


@dataclass(eq=False)
class Task:
    """One request's run: ``keep`` for a job (``POST /jobs``), whose result stays for ``GET /jobs/ID/result``;
    ``status`` one of queued, running, done, failed, cancelled."""

    id: str
    folder: Path
    job: Job
    config: AnimateConfig
    options: dict[str, Any]
    keep: bool
    status: str = "queued"
    progress: dict[str, Any] | None = None
    error: tuple[int, str] | None = None  # (HTTP status, message) of a failed run
    stats: RunOutcome | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    over: threading.Event = field(default_factory=threading.Event)
    callback: str | None = None  # where its end is posted (CALLBACK)
    key: str | None = None  # the client's Idempotency-Key (KEY_HEADER)
    form: str | None = None  # its form's fingerprint (_form_print): the key's form sent again must be the same
    request: tuple[dict[str, str], dict[str, Path]] | None = None  # its form's text fields and files (RECORD)
    # cancelled by its client while it ran (DELETE /jobs/ID): said in its record at once, so that a server stopped
    # before the run sees it (or killed) does not run it again when it starts on the jobs folder
    withdrawn: bool = False

    @property
    def result(self) -> Path:
        return self.job.output

    def said(self, exc: BaseException) -> str:
        """``exc``'s message naming the request's files as it sent them (``driver/meme.mp4``, also for a driver the
        server keeps elsewhere: :meth:`AnimateServer.keep_driver`)."""
        text = _said(exc, self.folder)
        if not self.job.driver.is_relative_to(self.folder):
            text = text.replace(f"{self.job.driver.parent}{os.sep}", "driver/")
        return text

    def headers(self) -> dict[str, str]:
        """A finished run's answer headers (its result's name alone where its run's facts are unknown: a run
        whose server stopped after the result was written, before its record said so)."""
        if self.stats is None:
            return {"Content-Disposition": _attachment(self.result.name)}
        return {"Content-Disposition": _attachment(self.result.name), "X-Megactor-Frames": str(self.stats.frames),
                "X-Megactor-Seconds": f"{self.stats.total_s or 0.0:.3f}",
                "X-Megactor-First-Frame-Seconds": f"{self.stats.first_frame_s or 0.0:.3f}",
                "X-Megactor-Portrait-Cached": "true" if self.stats.portrait_cache_hit else "false",
                "X-Megactor-Driver-Cached": "true" if self.stats.driver_plan_hit else "false"}

    def record(self, jobs_dir: Path) -> dict[str, Any]:
        """The job as its record keeps it (:data:`RECORD`): its state and its request, the files named within its
        folder (the driver within ``jobs_dir``: the drivers kept are there)."""
        text, files = self.request or ({}, {})
        status, finished = self.status, self.finished
        # cancelled by its client, its run's end (which posts its callback) still to come: cancelled on disk at once,
        # as any server version reads it, and its callback owed
        withdrawn = self.withdrawn and status in ("queued", "running")
        if withdrawn:
            status, finished = "cancelled", finished or time.time()
        return {"format": RECORD_FORMAT, "id": self.id, "status": status, "created": self.created,
                "finished": finished, "error": None if self.error is None else list(self.error),
                "outcome": None if self.stats is None else asdict(self.stats), "callback": self.callback,
                "callback_owed": withdrawn and self.callback is not None,  # (a restore posts it)
                "key": self.key, "form": self.form,
                "text": text, "files": {k: _within(p, self.folder) for k, p in files.items() if k != "driver"},
                "driver": _within(self.job.driver, jobs_dir), "result": _within(self.result, self.folder)}

    def describe(self, ahead: int | None = None) -> dict[str, Any]:
        """The job as ``GET /jobs/ID`` answers it (``ahead``: how many jobs run before it, while queued)."""
        doc: dict[str, Any] = {"id": self.id, "status": self.status, "result_name": self.result.name,
                               "created": _iso(self.created)}
        if ahead is not None:
            doc["ahead"] = ahead
        if self.progress is not None:
            doc["progress"] = self.progress
        if self.finished is not None:
            doc["finished"] = _iso(self.finished)
        if self.error is not None:  # (its status: 400 the request's fault, 5xx the server's, as POST /animate's)
            doc["error"], doc["error_status"] = self.error[1], self.error[0]
        if self.status == "done":
            doc["result"] = f"/jobs/{self.id}/result"
            if self.stats is not None:  # (seconds: from the run's start to its last frame, as X-Megactor-Seconds)
                doc |= {"frames": self.stats.frames, "seconds": self.stats.total_s}
        return doc


# what each text field takes, for the API's description (GET /openapi.json)
_FIELD_DOCS = {
    "format": ("string", "the result's format (default mp4)"),
    "audio": ("string", "'none': no sound (or a sound file in this field)"),
    "audio_start": ("string", "begin the sound file this far in: seconds or [HH:]MM:SS[.ms]"),
    "portrait_face": ("integer", "the portrait's face to animate, 1 = the leftmost"),
    "driver_face": ("integer", "the driver's face to follow, 1 = the leftmost"),
    "start": ("string", "begin this far into the driver: seconds or [HH:]MM:SS[.ms]"),
    "duration": ("string", "use at most this much of the driver: seconds or [HH:]MM:SS[.ms]"),
    "seed": ("integer", "seed of the initial noise"),
    "steps": ("integer", "DDIM steps"),
    "guidance": ("number", "CFG scale (1: no guidance)"),
    "overlap": ("integer", "context window overlap in frames"),
    "cfg_steps": ("integer", "guidance in the first K steps only"),
    "fps": ("number", "bring a faster driver down to this frame rate"),
    "max_frames": ("integer", "use at most this many driver frames"),
    "crf": ("integer", "constant quality, lower is better (H.264 0-51, VP9 0-63)"),
    "side_by_side": ("boolean", "driver crop | portrait crop | result in each frame"),
    "paste_back": ("boolean", "the whole portrait with the animated crop put back"),
}
_FILE_DOCS = {"portrait": "the portrait image (required)", "driver": "the driving video (required)",
              "mask": "a person mask image for the portrait (white = person)",
              "audio": "the result's sound from this file instead of the driver's"}


def openapi() -> dict[str, Any]:
    """The API as an OpenAPI 3.0 document (``GET /openapi.json``), made from the fields the server takes."""
    props: dict[str, Any] = {name: {"type": "string", "format": "binary", "description": doc}
                             for name, doc in _FILE_DOCS.items()}
    for name in TEXT_FIELDS:
        kind, doc = _FIELD_DOCS[name]
        if name not in props:
            props[name] = {"type": kind, "description": doc}
    props["format"]["enum"] = list(FORMATS)
    form = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["portrait", "driver"], "properties": props}}}}
    callback = {"type": "string", "description": "an http(s) address the server posts the job's state (JSON, as GET "
                "/jobs/ID) to when its run ends, where it was started with --allow-callbacks; signed with its token "
                "(X-Megactor-Signature: sha256=HMAC of the body)"}
    job_form = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["portrait", "driver"], "properties": {**props, CALLBACK: callback}}}}}
    error = {"description": "the problem, named", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "string"}}}}}}
    media = {f"{kind}": {"schema": {"type": "string", "format": "binary"}} for kind in _MEDIA_TYPES.values()}
    result = {"description": "the result file (Content-Disposition names it; X-Megactor-Frames, -Seconds, "
                             "-First-Frame-Seconds, -Portrait-Cached, -Driver-Cached tell about the run)",
              "content": media}
    job_schema: dict[str, Any] = {"type": "object", "properties": {
        "id": {"type": "string"}, "status": {"type": "string", "enum": list(_STATUSES)},
        "ahead": {"type": "integer"}, "progress": {"type": "object"}, "error": {"type": "string"},
        "error_status": {"type": "integer", "description": "a failed run's HTTP status, as POST /animate's: 400 the "
                         "request's fault, 5xx the server's"},
        "result": {"type": "string"}, "frames": {"type": "integer"},
        "result_name": {"type": "string", "description": "the result's file name (UTF-8), as Content-Disposition "
                        "gives it"},
        "created": {"type": "string", "format": "date-time"}, "finished": {"type": "string", "format": "date-time"},
        "seconds": {"type": "number", "description": "from the run's start to its last frame (X-Megactor-Seconds; "
                    "a run that went on from its checkpoint: this last part of it)"}}}
    job = {"description": "the job", "content": {"application/json": {"schema": job_schema}}}
    # POST /jobs: the job, and where to ask about it; GET /jobs: every job kept, as GET /jobs/ID gives each
    queued = {**job, "headers": {"Location": {"description": "/jobs/ID", "schema": {"type": "string"}}}}
    listed = {"description": "the jobs kept", "content": {"application/json": {"schema": {"type": "object",
              "properties": {"jobs": {"type": "array", "items": job_schema}}}}}}
    # DELETE /jobs/ID's answer: what became of the job (cancelling: a running one, at its next progress report)
    dropped = {"description": "what became of the job", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"id": {"type": "string"}, "status": {
            "type": "string", "enum": ["cancelled", "cancelling", "deleted"]}}}}}}
    # (411: a form sent chunked, without a Content-Length)
    errors = {str(code): error for code in (400, 401, 403, 408, 410, 411, 413, 415, 500, 503)}
    refused = {str(code): error for code in (401, 403)}  # (a token wanted; a Host or Origin refused)
    job_id = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    token = {"bearer": {"type": "http", "scheme": "bearer", "description": "where the server was started with a "
                        "token (serve --token-file): every request but GET /, GET /openapi.json and GET /ping "
                        "carries it"}}
    return {"openapi": "3.0.3", "info": {"title": "megactor-rt serve", "version": _version()},
            "components": {"securitySchemes": token}, "security": [{}, {"bearer": []}], "paths": {
        "/animate": {"post": {"summary": "animate a portrait with a driver; the result in the answer",
                              "requestBody": form, "responses": {"200": result, **errors}}},
        "/jobs": {"post": {"summary": "the same as a job: answered at once", "requestBody": job_form,
                           "parameters": [{"name": KEY_HEADER, "in": "header", "required": False,
                                           "schema": {"type": "string", "pattern": _KEY.pattern}, "description":
                                           "a key of the client's choosing (a uuid): the form sent again with it "
                                           "while its job is known gets that job (200), not a second one"}],
                           "responses": {"202": queued, "200": queued, "422": error, **errors}},
                  "get": {"summary": "the jobs kept", "responses": {"200": listed, **refused}}},
        "/jobs/{id}": {"get": {"summary": "a job's state", "parameters": job_id,
                               "responses": {"200": job, "404": error, **refused}},
                       "delete": {"summary": "cancel the job, or delete its result", "parameters": job_id,
                                  "responses": {"200": dropped, "202": dropped, "404": error, **refused}}},
        "/jobs/{id}/result": {"get": {"summary": "a done job's result (a Range header: those bytes; HEAD: its "
                                                "headers alone)", "parameters": job_id, "responses": {
            "200": result, "206": {"description": "the bytes a Range header asked (Content-Range)"}, "409": error,
            "410": error, "404": error, "416": error, "500": error, **refused,
            # (a failed job: its error_status, as POST /animate would have answered)
            **{str(code): {**error, "description": "a failed job's error (its error_status)"} for code in (400, 503)}
        }}},
        "/health": {"get": {"summary": "the model's settings, the run under way, the runs waiting",
                            "responses": {"200": {"description": "a JSON object"}, **refused}}},
        "/ping": {"get": {"summary": "whether the server answers (the model is loaded); needs no token",
                          "security": [{}], "responses": {"200": {"description": "{\"status\": \"ok\"}"}}}},
        "/metrics": {"get": {"summary": "counters and gauges for Prometheus (runs, frames, run seconds, queue, "
                                        "answers by status, portraits kept)",
                             "responses": {"200": {"description": "Prometheus' text format 0.0.4", "content": {
                                 "text/plain": {"schema": {"type": "string"}}}}, **refused}}},
    }}


def _version() -> str:
    from megactor_rt import __version__

    return __version__


def _said(exc: BaseException, folder: Path | None) -> str:
    """An error's message naming a request's files by field and name (``portrait/me.png``), not by the server's
    folder (``folder``, the request's; None: none made yet)."""
    return str(exc) if folder is None else str(exc).replace(f"{folder}{os.sep}", "")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


# what GET /health tells about the server itself; the rest of it is the model's run settings
STATE_KEYS = frozenset({"status", "running", "waiting", "served", "failed", "jobs_kept", "max_waiting",
                        "max_upload_bytes", "keep_s", "formats", "portraits_kept", "portrait_memory_bytes",
                        "portrait_memory_budget", "frame_limit", "idempotency_keys"})


def run_settings_of(health: dict[str, Any]) -> dict[str, Any]:
    """The model's run settings in a server's ``GET /health`` (what ``Animator.run_settings`` gives there)."""
    return {k: v for k, v in health.items() if k not in STATE_KEYS}


class AnimateServer(http.server.ThreadingHTTPServer):
    """``megactor-rt serve``'s server (see the module doc) around a loaded ``anim``: requests are answered on
    threads of their own, their runs made one after another on one worker thread.

    Args:
        anim: the Animator every request runs on (its config and cache are the requests' defaults); may be set
            after the server is made (it listens at once, so that a port in use is known before a model loads),
            before :meth:`serve_forever`.
        address: (host, port); port 0 picks a free one (``server_address`` tells which).
        options: ``animate_to_file`` keyword arguments every request starts from (``crf``, ``audio``, ...).
        max_upload_bytes: the largest form a request may send (413 beyond, before reading it).
        max_waiting: how many runs may wait while one runs (503 beyond).
        timeout_s: a connection that sends nothing for this long is dropped.
        keep_s: how long a job's result (``POST /jobs``) is kept after its run, unless deleted before.
        max_kept: the most finished jobs kept (the oldest go first).
        cors_origins: the sites (``https://app.example.com``, or ``*``: any) whose pages may call the server from
            a browser (CORS); none by default, so that a page of any site a user visits cannot use a server on their
            machine.
        allow_urls: a file field may be an http(s) address instead, downloaded by the server (off by default: it
            makes the server fetch what a client names, hosts of its own network among them).
        token: the secret every request must send (``Authorization: Bearer TOKEN``), but for ``GET /``, ``GET
            /openapi.json`` and ``GET /ping``; none: no authentication.
        tls: a server-side SSL context (certificate and key loaded): HTTPS instead of HTTP.
        frame_limit: the most frames one request's result may have (a request whose driver, times and settings
            would make more is refused before it waits: a long video does not hold the queue for hours); none: no
            limit.
        allow_callbacks: a job (``POST /jobs``) may name an http(s) address in its ``callback`` field, to which
            the server posts the job's state (``GET /jobs/ID``'s JSON) when its run ends (off by default: the
            server then posts to what clients name). With a ``token``, each post carries ``X-Megactor-Signature:
            sha256=HEX``, the HMAC-SHA256 of its body under the token, for the receiver to check.
        jobs_dir: keep the jobs (their files and records) and the drivers kept in this folder, so that a server
            started again on it knows them (:meth:`restore`, once the model is set); created where missing.
            None: in temporary folders, gone with the server.
        allowed_hosts: a server listening on a loopback address answers requests whose ``Host`` is ``localhost``
            (or a name under it) or an address, and these names too (a proxy in front that passes its own name);
            other names are refused (403): a page of another site whose name its owner pointed at 127.0.0.1 (DNS
            rebinding) is, to the browser, of the same site as the server, and would pass the Origin check.

    Raises:
        InputError: ``jobs_dir`` cannot be written, or another server uses it.
        OSError: the address cannot be listened on.
    """

    daemon_threads = True
    allow_reuse_address = True
    # connections the system holds for the server until it accepts them (socketserver's 5: a burst of clients, or
    # those that came while the model loaded, before serve_forever, had their connections reset, unanswered)
    request_queue_size = 128

    def __init__(self, anim: Any, address: tuple[str, int], options: dict[str, Any] | None = None,
                 max_upload_bytes: int = 1 << 30, max_waiting: int = 8, timeout_s: float = 60.0,
                 keep_s: float = 3600.0, max_kept: int = 100, cors_origins: tuple[str, ...] = (),
                 allow_urls: bool = False, token: str | None = None, tls: ssl.SSLContext | None = None,
                 frame_limit: int | None = None, allow_callbacks: bool = False, jobs_dir: Path | None = None,
                 allowed_hosts: tuple[str, ...] = ()) -> None:
        self.anim, self.options = anim, dict(options or {})
        self.allowed_hosts = frozenset(_host_name(h) for h in allowed_hosts)
        self.frame_limit, self.allow_callbacks = frame_limit, allow_callbacks
        self.token = None if token is None else token.encode()
        self.tls = tls
        self.max_upload_bytes, self.max_waiting, self.timeout_s = max_upload_bytes, max_waiting, timeout_s
        self.keep_s, self.max_kept = keep_s, max_kept
        self.cors_origins = tuple(o.rstrip("/") for o in cors_origins)
        self.allow_urls = allow_urls
        self._state = threading.Condition(threading.RLock())
        self._receiving = 0  # forms being received, each holding a place in the queue
        self._tasks: dict[str, Task] = {}  # by id: the queued, the running, and the jobs kept
        self._queue: deque[Task] = deque()
        self.running: Task | None = None
        self.served = self.failed = 0
        self.started = time.time()
        self._counts: dict[str, float] = {"cancelled": 0, "frames": 0, "wait_s": 0.0, "runs_started": 0}
        self._run_s = [0] * (len(RUN_BUCKETS_S) + 1)  # runs done, by the first bucket their seconds fit (+Inf last)
        self._run_s_sum = 0.0
        self._answers: dict[int, int] = {}  # HTTP answers by status
        self._folders: set[Path] = set()
        # the temporary folders removed when the interpreter exits, where server_close never ran: the Python API's
        # serve_forever() ended by Ctrl-C (KeyboardInterrupt) or a script that never closes its server left every
        # kept job's result and the kept drivers in the temporary folder
        self._remove_folders = weakref.finalize(self, _remove_all, self._folders)
        self._answering: set[Task] = set()  # POST /animate's runs queued or under way, their answers still to send
        self._worker: threading.Thread | None = None
        self._worker_ended = threading.Event()
        self._expired_at = 0.0  # when _expire last ran (time.monotonic)
        self._closing = False
        self._drivers: OrderedDict[str, Path] = OrderedDict()  # drivers kept for the next requests (keep_driver)
        self._driver_store: Path | None = None
        self.jobs_dir: Path | None = None
        self._lock: IO[bytes] | None = None
        super().__init__(address, _Handler)  # (first: a port in use leaves no jobs folder made)
        self.local_only = _is_loopback_ip(str(self.server_address[0]))  # (then only local names are answered)
        if jobs_dir is not None:
            try:
                self._lock = _lock_jobs_dir(jobs_dir)
            except BaseException:
                self.socket.close()
                raise
            self.jobs_dir, self._driver_store = jobs_dir, jobs_dir / "drivers"

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = str(host)
        return f"{'https' if self.tls else 'http'}://{'[' + host + ']' if ':' in host else host}:{port}"

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is not None:  # (the handshake on the request's thread: _Handler.setup)
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed outside a request's own handling (a TLS handshake refused, a client gone): a
        line in the log, not a traceback on the console."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ssl.SSLError)):
            logger.info("%s: connection dropped (%s: %s)", client_address[0], type(exc).__name__, exc)
        else:
            logger.exception("%s: the connection failed", client_address[0])

    def authorized(self, header: str | None) -> bool:
        """Whether a request whose ``Authorization`` header is ``header`` may be answered."""
        if self.token is None:
            return True
        scheme, _, value = (header or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token)

    def health(self) -> dict[str, Any]:
        """``GET /health``: the server's state (:data:`STATE_KEYS`) and the model's run settings
        (``Animator.run_settings``: :func:`run_settings_of` takes them out again)."""
        cache = self.anim.cache
        return {"status": "ok", **self._snapshot(), "max_waiting": self.max_waiting,
                "max_upload_bytes": self.max_upload_bytes, "frame_limit": self.frame_limit, "keep_s": self.keep_s,
                "formats": list(FORMATS), "portraits_kept": len(cache), "portrait_memory_bytes": cache.nbytes,
                "portrait_memory_budget": cache.max_bytes, "idempotency_keys": True, **self.anim.run_settings()}

    def _snapshot(self) -> dict[str, Any]:
        """The runs' state that ``GET /health`` and ``GET /metrics`` both tell: the run under way (its result's
        name), how many wait, served, failed, and the finished jobs kept (those expired gone first)."""
        with self._state:
            self._expire()
            return {"running": None if self.running is None else self.running.result.name,
                    "waiting": len(self._queue), "served": self.served, "failed": self.failed,
                    "jobs_kept": sum(t.keep and t.finished is not None for t in self._tasks.values())}

    def answered(self, status: int) -> None:
        """Count an HTTP answer (``GET /metrics``)."""
        with self._state:
            self._answers[status] = self._answers.get(status, 0) + 1

    def metrics(self) -> str:
        """``GET /metrics``: the server's counters and gauges in Prometheus' text format (version 0.0.4)."""
        with self._state:  # (one moment for all of them: the lock is reentrant)
            counts, run_s, run_s_sum, answers = dict(self._counts), list(self._run_s), self._run_s_sum, dict(
                self._answers)
            state = self._snapshot()
        cache = self.anim.cache if self.anim is not None else None
        lines: list[str] = []

        def metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
            lines.extend((f"# HELP megactor_{name} {doc}", f"# TYPE megactor_{name} {kind}"))
            lines.extend(f"megactor_{name}{labels} {value:.10g}" for labels, value in samples)

        metric("runs_total", "counter", "Runs ended, by how they ended.", [
            ('{result="done"}', state["served"]), ('{result="failed"}', state["failed"]),
            ('{result="cancelled"}', counts["cancelled"])])
        metric("runs_started_total", "counter", "Runs started.", [("", counts["runs_started"])])
        metric("frames_total", "counter", "Frames made by the runs done.", [("", counts["frames"])])
        cumulative, buckets = 0, []
        for bound, count in zip((*RUN_BUCKETS_S, math.inf), run_s, strict=True):
            cumulative += count
            buckets.append((f'_bucket{{le="{"+Inf" if math.isinf(bound) else f"{bound:g}"}"}}', cumulative))
        metric("run_seconds", "histogram", "Seconds of each run done, from its start to its result written.",
               [*buckets, ("_sum", run_s_sum), ("_count", cumulative)])
        metric("queue_wait_seconds_total", "counter", "Seconds the runs started had waited in the queue.",
               [("", counts["wait_s"])])
        metric("waiting_runs", "gauge", "Runs waiting in the queue.", [("", state["waiting"])])
        metric("running_runs", "gauge", "Runs under way (0 or 1).", [("", int(state["running"] is not None))])
        metric("max_waiting_runs", "gauge", "The most runs that may wait (serve --queue).", [("", self.max_waiting)])
        metric("jobs_kept", "gauge", "Finished jobs kept for their clients.", [("", state["jobs_kept"])])
        metric("http_responses_total", "counter", "HTTP answers, by status.",
               [(f'{{code="{code}"}}', n) for code, n in sorted(answers.items())])
        if cache is not None:
            metric("portraits_kept", "gauge", "Prepared portraits kept in memory.", [("", len(cache))])
            metric("portrait_memory_bytes", "gauge", "Bytes the prepared portraits kept take.", [("", cache.nbytes)])
            metric("portrait_memory_budget_bytes", "gauge", "Bytes they may take (serve --cache-memory-gb).",
                   [("", cache.max_bytes)])
        metric("uptime_seconds", "gauge", "Seconds since the server started.", [("", time.time() - self.started)])
        return "\n".join(lines) + "\n"

    def folder(self, job_id: str | None = None) -> Path:
        """A new folder for one request (removed by :meth:`release`): the job ``job_id``'s in ``jobs_dir``, else a
        temporary one (removed at :meth:`server_close` too)."""
        if job_id is not None and self.jobs_dir is not None:
            path = self.jobs_dir / "jobs" / job_id
            path.mkdir(parents=True)
            return path
        requests = None  # with jobs_dir, beside the jobs and the kept drivers: an upload moved there is renamed, not
        if self.jobs_dir is not None:  # copied across file systems (a jobs folder on another disk than /tmp)
            requests = self.jobs_dir / "requests"
            requests.mkdir(exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=_REQUEST_PREFIX, dir=requests))
        with self._state:
            self._folders.add(path)
        return path

    def release(self, path: Path) -> None:
        """Remove a request's folder (also with ``_state`` held: it is reentrant)."""
        shutil.rmtree(path, ignore_errors=True)
        with self._state:
            self._folders.discard(path)

    def server_close(self) -> None:
        super().server_close()
        with self._state:
            self._closing = True
            self._state.notify_all()
            worker = self._worker
            if self.running is not None:  # (it stops at its next progress report)
                self.running.cancel.set()
            for task in self._queue:  # (never run: a request waiting for one is answered so; a job in jobs_dir
                # stays queued there: _save leaves the state the stop gives it unwritten)
                task.status, task.finished = "cancelled", time.time()
                if not task.keep:  # (its request's answer: was "... while the run was under way")
                    task.error = 503, ("the server stopped before the run began; send the request again (once it "
                                       "is back, or to another server)")
                task.over.set()
            self._queue.clear()
        if worker is not None:  # an interpreter exiting while a thread is inside torch may abort: wait for it
            from megactor_rt.runtime.pipeline import JOIN_S, note_abandoned

            worker.join(JOIN_S)
            if not self._worker_ended.is_set():  # (the command ends the process without waiting)
                note_abandoned(worker, self._worker_ended)
        with self._state:  # (the requests whose runs ended answer now, 503: the command ends the process at once
            # after this, which cut such an answer off mid-way, its headers sent without its body)
            self._state.wait_for(lambda: not any(t.over.is_set() for t in self._answering), _STOP_ANSWERS_S)
        self._remove_folders()  # (a run still under way when the server stops: its thread ends with the process)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # (the lock goes with it)
            self._lock = None

    # -- drivers sent again ---------------------------------------------------------------------------------
    def keep_driver(self, upload: Path) -> Path:
        """Where a run reads an uploaded driver: a copy the server keeps for the next requests with the same driver
        (same bytes, same name: a meme template sent with portrait after portrait), so that the Animator finds its
        plan (pass 1: every frame's face) from the first of them instead of planning it again. The
        :data:`KEPT_DRIVERS` latest are kept (and :data:`KEPT_DRIVER_BYTES` of them at most) while no queued or
        running request reads them; ``upload`` is moved there, or removed where that driver is kept already."""
        key = f"{sha256_file(upload)}/{upload.name}"
        with self._state:
            if self._closing:  # (its store removed: not made again; the request is refused, submit)
                return upload
            if self._driver_store is None:
                self._driver_store = Path(tempfile.mkdtemp(prefix="megactor-rt-serve-drivers-"))
                self._folders.add(self._driver_store)
            kept = self._drivers.get(key)
            if kept is not None and kept.is_file():
                self._drivers.move_to_end(key)
                upload.unlink()
                return kept
            kept = self._driver_store / key
            try:
                kept.parent.mkdir(parents=True, exist_ok=True)
                os.replace(upload, kept)
            except OSError as exc:  # (a folder there this server cannot write, say: the request reads its upload)
                logger.warning("%s: the driver cannot be kept there (%s); the request reads its own upload", kept,
                               _why(exc))
                return upload
            self._drivers[key] = kept
            in_use = {t.job.driver for t in self._queue} | ({self.running.job.driver} if self.running else set())
            sizes = {k: _size(p) for k, p in self._drivers.items()}
            for old in [k for k, p in self._drivers.items() if p not in in_use and p != kept]:  # (oldest first)
                if len(self._drivers) <= KEPT_DRIVERS and sum(sizes.values()) <= KEPT_DRIVER_BYTES:
                    break
                del sizes[old]
                gone = self._drivers.pop(old)
                with contextlib.suppress(OSError):  # (its folder goes with its last name: same bytes, other names)
                    gone.unlink()
                    gone.parent.rmdir()
            return kept

    # -- runs ---------------------------------------------------------------------------------------------
    def busy(self) -> FormError | None:
        """The 503 a new request gets while ``max_waiting`` runs wait (queued, or their forms being received)."""
        with self._state:
            self._expire()
            waiting = len(self._queue) + self._receiving
            if waiting + (self.running is not None) > self.max_waiting:
                return FormError(f"the server is busy ({waiting} run(s) waiting or being sent besides the one "
                                 "running); try again later", 503)
            return None

    def reserve(self) -> None:
        """Hold a place in the queue while a request's form is received (so that forms the queue would refuse are
        refused before they are read, however many come at once); :meth:`submit` takes it, :meth:`unreserve` gives
        it back.

        Raises:
            FormError: 503 (:meth:`busy`).
        """
        with self._state:
            refused = self.busy()
            if refused is not None:
                raise refused
            self._receiving += 1

    def unreserve(self) -> None:
        with self._state:
            self._receiving -= 1

    def submit(self, task: Task) -> Task:
        """Queue ``task`` behind the runs before it, in the place :meth:`reserve` held for it; the job queued, which
        is another where a form with ``task``'s key came first (its place is given back then: ``task`` is not run).

        Raises:
            FormError: a job in ``jobs_dir`` whose record cannot be written (503 for a full disk, else 500): a server
                started again would not know it; or the server is stopping (503); nothing is queued, the place is
                kept (:meth:`unreserve`).
        """
        with self._state:
            if self._closing:  # (a form that came whole after the server's stop: queued, it never ran and its
                raise _stopping()  # client waited for ever; its folder, made again by its next part, stayed)
            first = self.keyed(task.key)
            if first is not None:
                self._receiving -= 1
                return first
            if self._persists(task):
                try:
                    self._write_record(task)
                except OSError as exc:
                    raise FormError(f"{self.jobs_dir}: the job's record cannot be written in the jobs folder "
                                    f"({_disk_trouble(exc)}); the job is not taken", 503 if _full(exc) else 500
                                    ) from exc
            self._receiving -= 1
            self._tasks[task.id] = task
            self._queue.append(task)
            if not task.keep:  # (answered by its request: sent)
                self._answering.add(task)
            self._start_worker()
            return task

    def sent(self, task: Task) -> None:
        """``task``'s request (``POST /animate``) was answered, or its client is gone."""
        with self._state:
            self._answering.discard(task)
            self._state.notify_all()

    def keyed(self, key: str | None) -> Task | None:
        """The job known by the client's key (:data:`KEY_HEADER`), if any."""
        if key is None:
            return None
        with self._state:
            self._expire()
            return next((t for t in self._tasks.values() if t.key == key), None)

    def _start_worker(self) -> None:
        with self._state:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="megactor-rt-serve", daemon=True)
                self._worker.start()
            self._state.notify_all()

    def task(self, task_id: str) -> tuple[Task, int | None] | None:
        """A known job and, while it is queued, how many runs come before it."""
        with self._state:
            self._expire()
            task = self._tasks.get(task_id)
            if task is None:
                return None
            ahead = None
            if task.status == "queued":
                ahead = list(self._queue).index(task) + (self.running is not None)
            return task, ahead

    def tasks(self) -> list[dict[str, Any]]:
        with self._state:
            self._expire()
            return [t.describe() for t in self._tasks.values()]

    def forget(self, task: Task) -> str:
        """Cancel ``task`` (queued: at once; running: at its next progress report; either stays listed as
        cancelled, as a finished job does) or, finished, delete it and its result; returns its status then
        ("cancelled", "cancelling", "deleted")."""
        with self._state:
            if task.status == "queued":
                self._queue.remove(task)
                task.status, task.finished = "cancelled", time.time()
                self._settle(task)
                return "cancelled"
            if task.status == "running":
                task.withdrawn = True
                task.cancel.set()
                self._save(task)  # (on disk at once: a server stopped or killed before the run stops never runs it)
                return "cancelling"
            self._tasks.pop(task.id, None)
        self.release(task.folder)
        return "deleted"

    def _expire(self) -> None:
        """Forget finished jobs older than ``keep_s``, and the oldest beyond ``max_kept`` (with ``_state`` held)."""
        now, self._expired_at = time.time(), time.monotonic()
        finished = sorted((t for t in self._tasks.values() if t.keep and t.finished is not None),
                          key=lambda t: t.finished or 0.0)
        for i, t in enumerate(finished):
            if now - (t.finished or now) > self.keep_s or len(finished) - i > self.max_kept:
                del self._tasks[t.id]
                self.release(t.folder)

    def task_of(self, folder: Path, text: dict[str, str], files: dict[str, Path], task_id: str, keep: bool,
                callback: str | None = None) -> Task:
        """A request's run, from its form's text fields and files in ``folder`` (a driver kept elsewhere too:
        :meth:`keep_driver`), checked against this server's model, settings and frame limit.

        Raises:
            FormError: a field the server does not take (400).
            InputError: what ``animate``'s jobs file would refuse in the same cells, a driver over the frame limit.
        """
        missing = [f for f in ("portrait", "driver") if f not in files]
        if missing:
            raise FormError(f"no {' and no '.join(missing)} file in the form (curl -F portrait=@me.png -F "
                            "driver=@meme.mp4)")
        fmt = text.get("format", "mp4").strip().lower().lstrip(".")
        if fmt not in FORMATS:
            raise FormError(f"format {fmt!r} is not one the server writes: {', '.join(FORMATS)} (PNG frame "
                            "sequences are folders: use the command line)")
        result = folder / "result" / f"{_stem(files['portrait'])}_{_stem(files['driver'])}.{fmt}"
        result.parent.mkdir(exist_ok=True)
        cells = {k: v.strip() for k, v in text.items() if k not in ("format", "crf", "side_by_side", "paste_back")
                 and v.strip()}
        cells |= {k: str(v) for k, v in files.items()} | {"output": str(result)}
        job = job_from_cells(cells, "request", Path, self.anim.config)
        options = self.options | job.options
        if text.get("crf", "").strip():
            try:
                options["crf"] = int(text["crf"])
            except ValueError:
                raise FormError(f"field 'crf' takes a whole number, got {text['crf']!r}") from None
        for name in ("side_by_side", "paste_back"):
            if name in text:
                options[name] = _flag(name, text[name].strip())
        config = job.run_config(self.anim.config)
        if self.frame_limit is not None:
            _check_length(job, config, self.frame_limit)
        return Task(task_id, folder, job, config, options, keep, callback=callback, request=(dict(text), dict(files)))

    # -- jobs kept in jobs_dir ----------------------------------------------------------------------------
    def _persists(self, task: Task) -> bool:
        return self.jobs_dir is not None and task.keep  # (a job's folder is in jobs_dir then: folder())

    def _stopped(self, task: Task) -> bool:
        """Whether ``task`` (cancelled) was stopped by the server's stop, not by its client: a job in ``jobs_dir`` then
        stays queued or running there, to run when a server starts on it again."""
        return self._closing and task.status == "cancelled" and not task.withdrawn and self._persists(task)

    def _save(self, task: Task) -> bool:
        """Write ``task``'s record in its folder (a job in ``jobs_dir``), but not the cancelling of the server's
        stop (:meth:`_stopped`): such a job stays queued or running there, to run when the server starts again.
        Returns False where the record could not be written."""
        if not self._persists(task) or self._stopped(task):
            return True
        try:
            self._write_record(task)
        except OSError as exc:
            logger.warning("job %s: its record could not be written (%s); a server started again will not know it "
                           "as %s", task.id, exc, task.status)
            return False
        return True

    def _write_record(self, task: Task) -> None:
        assert self.jobs_dir is not None
        write_atomic(task.folder / RECORD, (json.dumps(task.record(self.jobs_dir), indent=1) + "\n").encode())

    def restore(self) -> tuple[int, int]:
        """Take up the jobs a server kept in ``jobs_dir`` before (with the model set, before serving): the
        finished are known again until they expire, the queued queue again in the order they came, the one that
        was running runs again (from its checkpoint, where it saved one); the drivers kept are kept again. A job
        whose form was not received whole is removed (a folder named as a job's, without a record), and so are the
        request folders of ``POST /animate`` cut short by the stop; a record that cannot be read, an entry that
        cannot be read or removed, and anything the server does not make there are left there and logged.
        Returns (jobs known, runs queued)."""
        if self.jobs_dir is None:
            return 0, 0
        for stale in _entries(self.jobs_dir / "requests"):  # (POST /animate's, under way at the stop)
            if stale.name.startswith(_REQUEST_PREFIX) and stale.is_dir() and not stale.is_symlink():
                _removed(stale, "a request's folder left by the server's stop")
            else:
                logger.warning("%s: not a request folder this server makes; left there", stale)
        tasks: list[Task] = []
        with self._state:
            self._drivers.update(self._kept_drivers(self.jobs_dir / "drivers"))
        for folder in _entries(self.jobs_dir / "jobs"):
            try:
                task = self._restored_folder(folder)
            except OSError as exc:  # (a folder or record this user may not read, say)
                logger.warning("%s: cannot be read (%s); left there, not served", folder, _why(exc))
                continue
            if task is not None:
                tasks.append(task)
        with self._state:
            for task in sorted(tasks, key=lambda t: t.created):
                self._tasks[task.id] = task
                if task.status == "queued":
                    self._queue.append(task)
            self._expire()
            known, queued = sum(t.id in self._tasks for t in tasks), len(self._queue)
            if queued or self._tasks:  # (also to remove the jobs kept once they expire: _work_on)
                self._start_worker()
        if tasks:
            logger.info("%s: %d job(s) kept from before (%d expired meanwhile), %d of them to run", self.jobs_dir,
                        known, len(tasks) - known, queued)
        return known, queued

    @staticmethod
    def _kept_drivers(store: Path) -> list[tuple[str, Path]]:
        """The drivers kept in ``store`` (``<sha256>/<name>``), oldest first; a folder there that cannot be read is
        logged (its driver is kept again by the next request that sends it, where it can be)."""
        kept: list[tuple[float, str, Path]] = []
        for folder in _entries(store):
            try:
                for path in folder.iterdir():
                    if path.is_file():
                        kept.append((path.stat().st_mtime, f"{folder.name}/{path.name}", path))
            except OSError as exc:
                logger.warning("%s: a kept driver's folder that cannot be read (%s); left there", folder, _why(exc))
        return [(key, path) for _, key, path in sorted(kept, key=lambda k: k[0])]

    def _restored_folder(self, folder: Path) -> Task | None:
        """The job kept in ``folder`` (an entry of ``jobs_dir/jobs``), or None where there is none to serve (said).

        Raises:
            OSError: the folder or its record cannot be read.
        """
        if folder.is_symlink():  # (a job's folder is made here: one that points elsewhere is not the server's)
            logger.warning("%s: a link, not a job folder this server made; left there, not served", folder)
            return None
        if not folder.is_dir():
            logger.warning("%s: not a job folder this server makes; left there", folder)
            return None
        record = folder / RECORD
        try:
            text = record.read_text(encoding="utf-8")
        except FileNotFoundError:  # (a job's folder is made, then its form received, then its record written)
            if _JOB_ID.fullmatch(folder.name):
                _removed(folder, "a job whose form was not received whole before the server stopped")
            else:
                logger.warning("%s: not a job folder this server makes; left there", folder)
            return None
        try:
            return self._restored(folder, json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError) as exc:
            logger.warning("%s: not a job record this server reads (%s: %s); left there, not served", record,
                           type(exc).__name__, exc)
            return None

    def _restored(self, folder: Path, doc: dict[str, Any]) -> Task | None:
        """The job a record describes, or None where its result is gone (then its folder goes too)."""
        assert self.jobs_dir is not None
        if doc.get("format") != RECORD_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}; this server reads {RECORD_FORMAT}")
        status, task_id = doc["status"], folder.name
        if status not in _STATUSES or doc["id"] != task_id:
            raise ValueError(f"status {status!r}, id {doc['id']!r} in folder {task_id}")
        text = {str(k): str(v) for k, v in doc["text"].items()}
        files = {str(k): _inside(folder, v) for k, v in doc["files"].items()} | {
            "driver": _inside(self.jobs_dir, doc["driver"])}
        result = _inside(folder, doc["result"])
        created = _finite_time(doc["created"])
        finished = None if doc["finished"] is None else _finite_time(doc["finished"])
        if doc["error"] is not None and (not isinstance(doc["error"], list) or len(doc["error"]) != 2):
            raise ValueError(f"error {doc['error']!r} is not [status, message]")
        callback, key, form = doc["callback"], doc.get("key"), doc.get("form")
        if key is not None and (not isinstance(key, str) or not _KEY.fullmatch(key)):
            raise ValueError(f"key {key!r} is not an {KEY_HEADER}")
        if form is not None and not isinstance(form, str):
            raise ValueError(f"form {form!r} is not a form's fingerprint")
        refused: Exception | tuple[int, str] | None = None  # (why this server does not run it again)
        changed = False  # (its record is written again)
        if status == "cancelled" and doc.get("callback_owed") is True:  # (its client's cancel, its run not ended
            changed = self.allow_callbacks  # when the server stopped: the callback it was owed is posted now; a
            # server that posts none leaves it owed, for one that does)
        elif status == "running" and result.is_file():  # (written whole, under another name, then renamed: the
            logger.info("job %s: its run ended before the server stopped (its result %s is there whole); done",
                        task_id, result)  # server stopped before its record said so)
            status, finished, changed = "done", result.stat().st_mtime, True
        elif status in ("queued", "running"):
            lost = next((p for p in files.values() if not p.is_file()), None)  # (the server's: its upload or driver)
            lost_said = (500, f"{lost}: this job's file, kept by the server, is gone (deleted from the jobs folder "
                              "while no server ran); send the job again")
            if status == "running":
                shutil.rmtree(folder / "result", ignore_errors=True)  # (a result's write the stop cut short)
            try:
                task = self.task_of(folder, text, files, task_id, True, callback)
            except (FormError, InputError) as exc:  # (this server's model, settings or limits refuse it)
                refused = lost_said if lost is not None and str(lost) in str(exc) else exc
            else:
                if lost is None:
                    task.created, task.key, task.form = created, key, form
                    if status == "running":  # (queued again; a queued job's record says so already)
                        logger.info("job %s: its run was under way when the server stopped; it runs again", task_id)
                        self._save(task)
                    return task
                refused = lost_said
            status, finished = "failed", time.time()
        if finished is None:
            raise ValueError(f"status {status!r} without the time it ended")
        job = Job(files.get("portrait", folder), files["driver"], result)
        task = Task(task_id, folder, job, self.anim.config, {}, True, status=status, created=created,
                    finished=finished, callback=callback, request=(text, files), key=key, form=form)
        if isinstance(refused, tuple):
            task.error = refused
            logger.warning("job %s: failed (%d %s)", task_id, *refused)
        elif refused is not None:
            task.error = 400, task.said(refused)
        elif doc["error"] is not None:
            task.error = int(doc["error"][0]), str(doc["error"][1])
        if doc["outcome"] is not None:
            task.stats = RunOutcome(**doc["outcome"])
        if status == "done" and not task.result.is_file():
            logger.info("job %s: its result %s is gone; forgotten", task_id, task.result)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        _prune(task)  # (its uploads are of no more use: also what a stop between its record and its cleanup left)
        if refused is not None or changed:  # (ended here: its callback, which its run's end never posted)
            self._save(task)
            if callback is not None and self.allow_callbacks:
                self._post_end(task)
        return task

    def _work(self) -> None:
        try:
            self._work_on()
        finally:
            self._worker_ended.set()

    def _work_on(self) -> None:
        while True:
            with self._state:
                while not self._queue and not self._closing:
                    self._state.wait(_EXPIRE_POLL_S)
                    self._expire()  # (also while nobody asks: their files go, and /health counts them no more)
                if self._closing:
                    return
                self._expire()  # (runs back to back: the queue never empty)
                task = self.running = self._queue.popleft()
                task.status = "running"
                self._save(task)
                self._counts["runs_started"] += 1
                self._counts["wait_s"] += time.time() - task.created
            began = time.perf_counter()
            self._run(task)
            with self._state:
                self.running = None
                task.finished = time.time()
                if task.status == "done":
                    self.served += 1
                    seconds = time.perf_counter() - began
                    self._run_s[bisect.bisect_left(RUN_BUCKETS_S, seconds)] += 1
                    self._run_s_sum += seconds
                    self._counts["frames"] += task.stats.frames if task.stats else 0
                elif task.status == "failed":
                    self.failed += 1
                else:
                    self._counts["cancelled"] += 1
                self._settle(task)

    def _settle(self, task: Task) -> None:
        """An ended job's files, record, waiters and callback (a run's, or a queued job's cancelled before it ran),
        with ``_state`` held: a job is listed with its outcome until it expires."""
        stopped = self._stopped(task)
        saved = self._save(task)  # (first: a stop or a kill after it leaves a record saying so, its result whole;
        if not task.keep:  # restore prunes what the cleanup below had not removed yet)
            self._tasks.pop(task.id, None)  # (its request answers it and removes its folder)
        elif stopped or not saved:  # (left as it is in jobs_dir, its checkpoint too: it runs when the server starts
            pass  # again; a record not written still says it runs: its files stay for that run)
        elif task.status == "done" or self._persists(task):
            _prune(task)
        else:  # (failed or cancelled: what it says is kept, no file)
            self.release(task.folder)
        task.over.set()
        if task.callback is not None and not stopped:
            self._post_end(task)

    def _post_end(self, task: Task) -> None:
        """Post ended ``task``'s state to its callback address, on a thread of its own."""
        assert task.callback is not None
        threading.Thread(target=self._call_back, args=(task.callback, task.describe()), daemon=True,
                         name=f"megactor-rt-callback-{task.id}").start()

    def _call_back(self, url: str, state: dict[str, Any]) -> None:
        """Post a finished job's ``state`` to its callback address (tried again where not reached or answered 5xx);
        the outcome is logged (the address without its credentials, where it has any)."""
        try:
            self._post_state(url, state)
        except Exception:  # noqa: BLE001 - the callback's thread: said in the log, never a traceback on stderr
            logger.exception("run %s: callback %s failed", state["id"], _shown(url))

    def _post_state(self, url: str, state: dict[str, Any]) -> None:
        import urllib.error
        import urllib.request

        body = json.dumps(state).encode()
        headers = {"Content-Type": "application/json", "User-Agent": f"megactor-rt/{_version()}",
                   "X-Megactor-Job": state["id"]}
        if self.token is not None:
            headers["X-Megactor-Signature"] = "sha256=" + hmac.new(self.token, body, hashlib.sha256).hexdigest()
        for attempt in range(1, CALLBACK_TRIES + 1):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, body, headers, method="POST"),
                                            timeout=CALLBACK_TIMEOUT_S) as answer:
                    logger.info("run %s: callback %s answered %d", state["id"], _shown(url), answer.status)
                    return
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    logger.warning("run %s: callback %s refused it: %d %s", state["id"], _shown(url), exc.code,
                                   exc.reason)
                    return
                why = f"{exc.code} {exc.reason}"
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)  # (a receiver that takes the post but answers late is no
                why = (f"no answer within {CALLBACK_TIMEOUT_S:g} s; it may have the post, each time (X-Megactor-Job "
                       "names the job)" if isinstance(reason, TimeoutError) else str(reason))  # address not reached)
            if attempt < CALLBACK_TRIES:
                time.sleep(2 ** (attempt - 1))
        logger.warning("run %s: callback %s failed (%s; %d tries)", state["id"], _shown(url), why, CALLBACK_TRIES)

    def _run(self, task: Task) -> None:
        written: list[dict[str, Any]] = []  # the last "write" report (its frames written)

        def report(progress: Any) -> None:
            task.progress = {"stage": progress.stage, "done": progress.done, "total": progress.total,
                             "unit": progress.unit}
            if progress.stage == "write":
                written[:] = [task.progress]
            if time.monotonic() - self._expired_at > _EXPIRE_POLL_S:  # (a long run: the jobs kept past keep_s go
                with self._state:  # meanwhile too, whether or not anyone asks)
                    self._expire()
            if task.cancel.is_set():
                raise Cancelled

        job = task.job
        logger.info("run %s: %s + %s -> %s", task.id, job.portrait.name, job.driver.name, task.result.name)
        options = dict(task.options)
        if self._persists(task) and not task.config.streams_frames:  # (a run the server's stop ends goes on from
            options["checkpoint_dir"] = task.folder / "checkpoint"     # its last step when it starts again)
        try:
            stats = self.anim.animate_to_file(job.portrait, job.driver, job.output, **options, config=task.config,
                                              on_progress=report)
            task.stats = RunOutcome.of(stats)
            resumed = getattr(stats, "resumed_from_step", 0)
            if resumed >= task.config.steps:
                logger.info("run %s: its denoising was saved whole before the server stopped; decoded only", task.id)
            elif resumed:
                logger.info("run %s: went on from step %d, saved before the server stopped", task.id, resumed + 1)
        except Cancelled:
            task.status = "cancelled"
            if self._stopped(task):
                logger.info("run %s: stopped with the server; it runs again when a server starts on %s", task.id,
                            self.jobs_dir)
            else:
                logger.info("run %s: cancelled", task.id)
            return
        except InputError as exc:
            task.error = 400, task.said(exc)
        except ResourceError as exc:
            task.error = 503, task.said(exc)
        except MegactorError as exc:
            task.error = 500, task.said(exc)
        except Exception as exc:  # noqa: BLE001 - a failure of the server: logged with its traceback
            logger.exception("run %s failed", task.id)
            task.error = 500, f"the server failed: {type(exc).__name__}: {exc}"
        if task.error is not None:
            task.status = "failed"
            logger.info("run %s: failed (%d %s)", task.id, *task.error)
            return
        if written:  # (the decode stage's last report, from the run's worker thread, may come after the last frame's
            task.progress = written[0]  # "write": a done job's progress is its frames written)
        task.status = "done"
        logger.info("run %s: %s, %d frames in %.1f s", task.id, task.result.name, stats.frames,  # (GET /jobs/ID's
                    float(stats.total_s or 0.0))  # seconds, X-Megactor-Seconds: from its start to its last frame)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: AnimateServer
    protocol_version = "HTTP/1.1"  # (curl sends a large form only after "100 Continue", which 1.0 does not give)
    server_version = "megactor-rt"
    _form_read = False  # (the request's form was read whole: nothing left to drop after an error answer)

    def version_string(self) -> str:
        return self.server_version  # (http.server's named the Python version too: of use to nobody but a scanner)

    def setup(self) -> None:
        self.request.settimeout(self.server.timeout_s)
        if isinstance(self.request, ssl.SSLSocket):  # (a failure ends the connection: AnimateServer.handle_error)
            self.request.do_handshake()
        super().setup()
        self.connection.settimeout(self.server.timeout_s)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        logger.debug("%s %s", self.address_string(), format % args)

    def end_headers(self) -> None:
        headers = getattr(self, "headers", None)  # (none yet in the answer to a malformed request line)
        origin = headers.get("Origin") if headers is not None else None
        allowed = self.server.cors_origins
        if origin and ("*" in allowed or origin in allowed):  # (a page of another site may read the answer)
            self.send_header("Access-Control-Allow-Origin", "*" if "*" in allowed else origin)
            self.send_header("Access-Control-Expose-Headers", _EXPOSED)
        if allowed and "*" not in allowed:  # (the answer depends on the Origin, a refusal's too: a cache between
            self.send_header("Vary", "Origin")  # that kept another site's answer would refuse the site named)
        super().end_headers()

    def do_OPTIONS(self) -> None:  # noqa: N802 - http.server's name
        """A browser's question before another site's page sends a form or a DELETE (CORS preflight); also what a
        route takes (``Allow``: the server's methods for ``OPTIONS *``)."""
        route = self._route()
        methods = "GET, HEAD, POST, DELETE" if route == "*" else _methods(route)
        if methods is None:
            self._error(404, f"no such page: {route}")
            return
        self.send_response(204)
        self.send_header("Allow", f"{methods}, OPTIONS")
        if self.server.cors_origins:
            self.send_header("Access-Control-Allow-Methods", "GET, HEAD, POST, DELETE")
            self.send_header("Access-Control-Allow-Headers",
                             f"Content-Type, Authorization, Range, If-Range, {KEY_HEADER}")
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()

    _answered = False  # (a status line was sent: no second answer after a failure)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.server.answered(code)
        self._answered = True
        super().send_response(code, message)

    def _no_such_method(self) -> None:
        route = self._route()
        methods = _methods(route)  # (the route's own, as every other 405 names them: was the server's, so that
        if methods is None:  # PUT /animate's Allow named GET and DELETE, which /animate answers 405 too)
            self._error(404, f"no such page: {route} ({self.command} is no method this server takes)")
            return
        self._error(405, f"{self.command} is not a method this server takes; {route} takes {methods}",
                    {"Allow": methods})

    do_PUT = do_PATCH = do_TRACE = do_CONNECT = _no_such_method  # noqa: N815 - http.server's names

    def _answer(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if self.command == "POST" and status >= 400 and not self._form_read:
            self._linger()

    def _client_gone(self) -> bool:
        """Whether the client has closed its connection (a read would end), looked at without waiting: after its
        form it sends nothing more, so a readable connection is one that ended (or sends what is dropped anyway:
        every answer closes the connection)."""
        sock = self.connection
        try:
            if not select.select([sock], [], [], 0)[0]:
                return False
            timeout = sock.gettimeout()
            sock.settimeout(0)
            try:  # (TLS cannot peek: a read; plain sockets peek)
                return (sock.recv(1) if isinstance(sock, ssl.SSLSocket) else sock.recv(1, socket.MSG_PEEK)) == b""
            finally:
                sock.settimeout(timeout)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except (OSError, ValueError):  # (reset by the client)
            return True

    def _linger(self) -> None:
        """After an answer that refused a body unread: read (and drop) what the client still sends, for a while, so
        that closing the connection with data unread does not reset it before the client has read the answer."""
        with contextlib.suppress(OSError, ValueError):
            self.wfile.flush()
            self.connection.settimeout(0.5)
            deadline, dropped = time.monotonic() + _LINGER_S, 0
            while time.monotonic() < deadline and dropped < _LINGER_BYTES:
                chunk = self.rfile.read1(_CHUNK)
                if not chunk:
                    break
                dropped += len(chunk)

    def _json(self, status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._answer(status, (json.dumps(doc) + "\n").encode(), "application/json", headers)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        level = logging.WARNING if status == 503 else logging.ERROR if status >= 500 else logging.INFO  # (503: busy
        logger.log(level, "%s %s: %d %s", self.command,  # or stopping, the load's and not a failure)
                   getattr(self, "path", ""), status, message)
        self._json(status, {"error": message}, headers if headers is not None else (
            {"Retry-After": "10"} if status == 503 else
            {"WWW-Authenticate": 'Bearer realm="megactor-rt"'} if status == 401 else None))

    def _from_this_site(self) -> bool:
        """Whether a request that changes something (POST, DELETE) comes from no page, this server's own page, or a
        site ``cors_origins`` allows; answered 403 if not. A browser sends another site's form without asking (no
        preflight): without this, any page a user opens could queue work on a server on their machine."""
        from urllib.parse import urlsplit

        origin = self.headers.get("Origin")
        allowed = self.server.cors_origins
        if origin is None or "*" in allowed or origin in allowed:
            return True
        hosts = {h.strip().lower() for h in (self.headers.get("Host"), self.headers.get("X-Forwarded-Host")) if h}
        try:
            site = urlsplit(origin)
            own = site.scheme in ("http", "https") and site.netloc.lower() in hosts
        except ValueError:
            own = False
        if own:
            return True
        self._error(403, f"a page of another site ({origin}) may not send work to this server (serve --cors-origin "
                         f"{origin} allows it)")
        return False

    def _host_allowed(self) -> bool:
        """Whether a server that listens on this machine only is asked by one of the names it answers (see
        ``allowed_hosts``); answered 403 if not."""
        host = self.headers.get("Host")
        if not self.server.local_only or not (host or "").strip():  # (none: no browser sends a request so)
            return True
        assert host is not None
        name = _host_name(host)
        if name == "localhost" or name.endswith(".localhost") or _is_ip(name) or name in self.server.allowed_hosts:
            return True
        hint = (f"; serve --allowed-host {name} answers this name too (a proxy in front that passes its own)"
                if re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", name) else "")  # (a name, not garble)
        self._error(403, f"Host {host.strip()!r}: this server listens on this machine only and answers the names "
                         "localhost and its addresses (a page of another site whose name was pointed at this machine, "
                         f"DNS rebinding, comes with its own name){hint}")
        return False

    def _allowed(self) -> bool:
        """Whether the request may be answered (its token, where the server has one); answered 401 if not."""
        if not self._host_allowed():
            return False
        if self.command in ("POST", "DELETE") and not self._from_this_site():
            return False
        sent = self.headers.get("Authorization")
        if (self.command in ("GET", "HEAD") and self._route() in _OPEN) or self.server.authorized(sent):
            return True
        self._error(401, "the token sent is not this server's" if sent else
                    "this server needs its token: send the header `Authorization: Bearer TOKEN` (curl -H ...; "
                    f"megactor-rt animate --server-token-file FILE, or ${TOKEN_ENV})")
        return False

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self._error(code, message or self.responses.get(code, ("error",))[0])  # (JSON for http.server's own too)

    def _length(self) -> int:
        """The announced body length, refused (411, 413) before anything is read."""
        size = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") is not None or size is None or not (
                size.strip().isascii() and size.strip().isdigit()):
            raise FormError(f"POST {self._route()} needs a Content-Length (a form sent whole, not chunked)", 411)
        if len(set(self.headers.get_all("Content-Length") or [])) > 1:
            raise FormError("the request gives several Content-Length headers that disagree", 400)
        if int(size) > self.server.max_upload_bytes:
            raise FormError(f"the form is {int(size)} bytes, over this server's limit of "
                            f"{self.server.max_upload_bytes} (serve --max-upload-mb)", 413)
        return int(size)

    def _route(self) -> str:
        path = _ABSOLUTE_FORM.sub("", self.path.split("?")[0], count=1)  # (http://host:8450/health: RFC 9112 3.2.2)
        return path.rstrip("/") or "/"

    def handle_expect_100(self) -> bool:
        if not self._allowed():  # (refused before the client sends its body)
            return False
        if self._route() in _FORMS and self.server.keyed((self.headers.get(KEY_HEADER) or "").strip()) is None:
            try:  # (refused before the client sends the form; one sent again for a job known is answered with it)
                self._length()
                refused = self.server.busy()
                if refused is not None:
                    raise refused
            except FormError as exc:
                self._error(exc.status, str(exc))
                return False
        return super().handle_expect_100()

    def _job_route(self) -> tuple[Task, int | None, str] | None:
        """``/jobs/ID[/result]``'s job (answered 404 where unknown), how many runs are ahead of it, and the rest."""
        parts = self._route().split("/")  # "", "jobs", ID[, "result"]
        found = self.server.task(parts[2]) if len(parts) in (3, 4) else None
        if found is None or (len(parts) == 4 and parts[3] != "result"):
            kept = "" if self.server.jobs_dir is not None else \
                ", and only until the server stops (serve --jobs-dir keeps them over a restart)"
            self._error(404, f"no such job: {self._route()} (a job is kept {self.server.keep_s:g} s after its run"
                             f"{kept}; GET /jobs lists them)")
            return None
        return found[0], found[1], parts[3] if len(parts) == 4 else ""

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        """GET's answer without its body (download managers ask a result's size and whether it takes ranges)."""
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        try:
            self._get()
        except (ConnectionError, TimeoutError):
            raise
        except Exception as exc:  # noqa: BLE001 - a failure of the server: logged, and answered where it still can be
            logger.exception("GET %s failed", self.path)
            if not self._answered:
                self._error(500, f"the server failed: {type(exc).__name__}")

    def _get(self) -> None:
        if not self._allowed():
            return
        route = self._route()
        if route == "/health":
            self._json(200, self.server.health())
        elif route == "/ping":
            self._json(200, {"status": "ok"})
        elif route == "/metrics":
            self._answer(200, self.server.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif route in ("/", "/index.html"):
            self._answer(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif route == "/openapi.json":
            self._json(200, openapi())
        elif route == "/jobs":
            self._json(200, {"jobs": self.server.tasks()})
        elif route.startswith("/jobs/"):
            found = self._job_route()
            if found is None:
                return
            task, ahead, rest = found
            if not rest:
                self._json(200, task.describe(ahead))
            elif task.status == "done":
                self._send_result(task)
            elif task.error is not None:
                self._error(*task.error, {})  # (its run's: no Retry-After, as asking again gets the same answer)
            else:
                self._error(410 if task.status == "cancelled" else 409,
                            f"job {task.id} is {task.status}: no result" + (
                                "" if task.status == "cancelled" else " yet (GET /jobs/ID says when it is done)"))
        elif route in _FORMS:
            self._error(405, f"POST {route} with a multipart/form-data form (curl -F portrait=@me.png -F "
                             "driver=@meme.mp4 ...)", {"Allow": "POST"})
        else:
            self._error(404, f"no such page: {route} (the server answers POST /animate, POST /jobs, GET /jobs/ID, "
                             "GET /health, GET /metrics, GET /ping, GET /openapi.json and GET /, a form for a browser)")

    def do_DELETE(self) -> None:  # noqa: N802 - http.server's name
        if not self._allowed():
            return
        route = self._route()
        if route.count("/") != 2 or not route.startswith("/jobs/"):  # (DELETE /jobs/ID/result cancelled a running job)
            methods = _methods(route)
            self._error(405 if methods else 404, "DELETE /jobs/ID cancels or deletes a job; nothing else is deleted",
                        {"Allow": methods} if methods else None)
            return
        found = self._job_route()
        if found is not None:
            status = self.server.forget(found[0])
            self._json(202 if status == "cancelling" else 200, {"id": found[0].id, "status": status})

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        if not self._allowed():
            return
        route = self._route()
        if route not in _FORMS:
            methods = _methods(route)  # (pages to GET)
            self._error(405 if methods else 404, f"POST {route}: the server takes POST /animate (the result in the "
                        "answer) and POST /jobs (a job to ask about)", {"Allow": methods} if methods else None)
            return
        key = self.headers.get(KEY_HEADER)
        if key is not None and (route != "/jobs" or not _KEY.fullmatch(key.strip())):
            self._error(400, f"the {KEY_HEADER} header is for POST /jobs and takes 1 to 128 letters, digits and "
                        "_.:- (a uuid)" if route == "/jobs" else
                        f"the {KEY_HEADER} header is for POST /jobs (POST /animate's answer is its result)")
            return
        key = None if key is None else key.strip()
        if self._known(key):
            return
        task_id = uuid.uuid4().hex[:12]  # (_JOB_ID)
        folder: Path | None = None
        task: Task | None = None
        error: tuple[int, str] | None = None
        result: IO[bytes] | None = None
        reserved = False
        try:
            folder = self.server.folder(task_id if route == "/jobs" else None)
            length = self._length()  # (a form too large, or of no size, before a place in the queue)
            self.server.reserve()
            reserved = True
            task = self._task(folder, length, task_id, keep=route == "/jobs")
            task.key = key
            queued = self.server.submit(task)
            reserved = False
            if queued is not task:  # (the same key's form came first meanwhile: its job is the one)
                self.server.release(folder)
                self._answer_keyed(queued, key, task.form)
                return
            if task.keep:
                self._json(202, task.describe(), {"Location": f"/jobs/{task.id}"})
                return
            while not task.over.wait(_GONE_POLL_S):
                if self._client_gone():  # (nobody to answer: its run, maybe hours, is cancelled)
                    logger.info("POST %s: the client went away; run %s is cancelled", route, task.id)
                    self.server.forget(task)
                    task.over.wait()
                    raise ConnectionResetError("the client went away")
            if task.status == "done":
                result = open(task.result, "rb")  # noqa: SIM115 - kept open: its folder goes before the answer
            elif task.error is not None:
                error = task.error
            elif self.server._closing:  # (cancelled by the server's stop, Ctrl-C or SIGTERM: no DELETE was sent)
                error = 503, ("the server stopped while the run was under way; send the request again (once it is "
                              "back, or to another server)")
            else:
                error = 410, f"the run was cancelled (DELETE /jobs/{task.id})"
        except FormError as exc:
            error = exc.status, _said(exc, folder)
        except InputError as exc:
            error = 400, _said(exc, folder)
        except ResourceError as exc:  # (a full disk for an upload or a download)
            error = 503, _said(exc, folder)
        except (BrokenPipeError, ConnectionResetError):
            logger.info("POST %s: the client went away before the answer", route)
        except Exception as exc:  # noqa: BLE001 - answered as a server failure, and logged with its traceback
            if _full(exc):  # (the form's files, stored as they come: the server cannot take work now)
                where = self.server.jobs_dir or Path(tempfile.gettempdir())
                error = 503, f"the server's disk is full ({where}: {exc}); try again later"
            else:
                logger.exception("POST %s failed", route)
                error = 500, f"the server failed: {type(exc).__name__}: {exc}"
        finally:
            if reserved:
                self.server.unreserve()
            if folder is not None and (task is None or not task.keep or error is not None):
                self.server.release(folder)  # (before the answer: a client that has it finds nothing left here)
        try:
            if result is not None and task is not None:
                self._send_file(result, _media_type(task.result), task.headers())
            elif error is not None:
                self._error(*error)
        except (BrokenPipeError, ConnectionResetError):
            logger.info("POST %s: the client went away before the answer", route)
        finally:
            if result is not None:
                result.close()
            if task is not None:
                self.server.sent(task)

    def _known(self, key: str | None) -> bool:
        """Answer a ``POST /jobs`` whose key (:data:`KEY_HEADER`) names a job known here with that job (200; its
        form read and dropped first, so that the client reads the answer); whether it was answered."""
        task = self.server.keyed(key)
        if task is None:
            return False
        folder = self.server.folder()  # (the form read, to compare with the job's: the key's form must be the same)
        try:
            text, files = read_form(self.rfile, self._length(), self.headers.get("Content-Type", ""), folder,
                                    texts=(*TEXT_FIELDS, CALLBACK), route=self._route())
            self._form_read = True
            form = _form_print(text, files)
        except FormError as exc:
            self._error(exc.status, str(exc))
            return True
        except OSError as exc:
            self._error(503 if _full(exc) else 500, f"the form could not be read ({exc})")
            return True
        finally:
            self.server.release(folder)
        self._answer_keyed(task, key, form)
        return True

    def _answer_keyed(self, task: Task, key: str | None, form: str | None) -> None:
        """Answer a form sent with job ``task``'s key: that job (200), or 422 where the form is another."""
        if task.form is not None and form != task.form:
            self._error(422, f"the {KEY_HEADER} {key} is job {task.id}'s, sent with another form; a new job needs a "
                             "new key")
            return
        logger.info("POST /jobs: %s %s is job %s's (its form sent again); answered with it", KEY_HEADER, key, task.id)
        self._json(200, task.describe(), {"Location": f"/jobs/{task.id}"})

    def _task(self, folder: Path, length: int, task_id: str, keep: bool) -> Task:
        """The request's form (``length`` bytes) read into ``folder`` and checked, as a run to queue."""
        text, files = read_form(self.rfile, length, self.headers.get("Content-Type", ""), folder,
                                texts=(*TEXT_FIELDS, CALLBACK), route=self._route())
        self._form_read = True
        if self.server._closing:  # (its folder was removed by the stop meanwhile)
            raise _stopping()
        form = _form_print(text, files) if keep and self.headers.get(KEY_HEADER) else None
        callback = text.pop(CALLBACK, "").strip() or None
        if callback is not None:
            if not keep:
                raise FormError("field 'callback' is for POST /jobs (POST /animate answers when its run ends)")
            if not self.server.allow_callbacks:
                raise FormError("field 'callback': this server posts to no addresses (serve --allow-callbacks)")
            url = as_url(callback)
            if url is None or not _postable(url):
                raise FormError(f"field 'callback' takes an http(s) address, got {callback!r}")
            callback = url
        for name in FILE_FIELDS:  # given as text: a web address where the server takes them, else no file
            value = text.get(name, "").strip()
            if not value or (name == "audio" and value.lower() == NO_SOUND):
                continue
            url = as_url(value)
            if self.server.allow_urls and url:
                (folder / name).mkdir()
                files[name] = download(url, folder / name, self.server.max_upload_bytes)
                del text[name]
            else:
                takes = [f"a file (curl -F {name}=@FILE)"] + (["an http(s) address"] if self.server.allow_urls else [])
                if name == "audio":
                    takes.append(f"the text {NO_SOUND!r}")
                why = "; this server downloads no addresses (serve --allow-urls)" if url else ""
                raise FormError(f"field {name!r} takes {' or '.join(takes)}{why}")
        task = self.server.task_of(folder, text, files, task_id, keep, callback)
        task.form = form
        task.job.driver = self.server.keep_driver(task.job.driver)  # (last: a request refused above keeps nothing)
        return task

    def _send_result(self, task: Task) -> None:
        try:
            file = open(task.result, "rb")  # noqa: SIM115 - closed below
        except (FileNotFoundError, NotADirectoryError):  # (deleted or expired meanwhile)
            self._error(410, f"job {task.id}: its result is gone (deleted, or kept past {self.server.keep_s:g} s)")
            return
        except OSError as exc:  # (there, but this server cannot read it: its permissions, a failing disk)
            self._error(500, f"job {task.id}: its result {task.result.name} cannot be read ({_why(exc)})")
            return
        with file:
            st = os.fstat(file.fileno())
            tag = f'"{task.id}-{st.st_size:x}-{st.st_mtime_ns:x}"'
            wanted = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if if_range is not None and if_range.strip() != tag:  # (another file than the one partly fetched)
                wanted = None
            try:
                part = byte_range(wanted, st.st_size)
            except ValueError:
                self._error(416, f"job {task.id}: the range {wanted!r} is not within its result's {st.st_size} bytes",
                            {"Content-Range": f"bytes */{st.st_size}"})
                return
            headers = {**task.headers(), "Accept-Ranges": "bytes", "ETag": tag}
            self._send_file(file, _media_type(task.result), headers, part)

    def _send_file(self, file: IO[bytes], content_type: str, headers: dict[str, str],
                   part: tuple[int, int] | None = None) -> None:
        """Answer with ``file`` (200), or its bytes ``part`` (first, last: 206 with ``Content-Range``)."""
        size = os.fstat(file.fileno()).st_size
        first, last = part if part is not None else (0, size - 1)
        self.send_response(200 if part is None else 206)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(last - first + 1))
        if part is not None:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        file.seek(first)
        left = last - first + 1
        while left > 0 and (chunk := file.read(min(_CHUNK, left))):
            self.wfile.write(chunk)
            left -= len(chunk)


_ABSOLUTE_FORM = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*")  # a request target's scheme and host, where given


def _methods(route: str) -> str | None:
    """The methods ``route`` takes, as a 405's ``Allow`` names them; None for a route the server does not have."""
    parts = route.split("/")  # "", "jobs", ID[, "result"]
    if route == "/animate":
        return "POST"
    if route == "/jobs":
        return "GET, HEAD, POST"
    if len(parts) == 3 and parts[1] == "jobs":  # (a target without a "/", "*": no parts[1], was an IndexError)
        return "GET, HEAD, DELETE"
    if len(parts) == 4 and parts[1] == "jobs" and parts[3] == "result":
        return "GET, HEAD"
    return "GET, HEAD" if route in (*_OPEN, "/health", "/metrics") else None


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The bytes (first, last) a ``Range`` header asks of a ``size``-byte file: None for the whole file (no header,
    one in another unit, several ranges or one not well formed: RFC 9110 lets a server send the whole instead).

    Raises:
        ValueError: a range that starts past the end (or an empty suffix): answered 416.
    """
    if not header or not header.strip().lower().startswith("bytes="):
        return None
    spec = header.strip()[6:].strip()
    if "," in spec:
        return None
    start, dash, end = spec.partition("-")
    start, end = start.strip(), end.strip()
    if not dash or not (start.isdigit() or (not start and end.isdigit())) or (end and not end.isdigit()):
        return None
    if not start:  # the last N bytes
        if int(end) == 0 or size == 0:
            raise ValueError("an empty range")
        return max(0, size - int(end)), size - 1
    first = int(start)
    last = min(int(end), size - 1) if end else size - 1
    if first >= size:
        raise ValueError("past the end")
    if last < first:
        return None
    return first, last


def _check_length(job: Job, config: AnimateConfig, limit: int) -> None:
    """Refuse a run that would make more than ``limit`` frames (from the driver's header: before it waits)."""
    from megactor_rt.runtime.driver import FrameSelection, driver_info

    info = driver_info(job.driver)
    frames = FrameSelection.of(info.fps, config.fps, config.start).expected_frames(info, config.duration,
                                                                                  config.max_frames)
    if frames is None:  # (named as the request sent it: _said)
        raise FormError(f"{job.driver}: its length is not in its header, and this server makes at most {limit} "
                        "frames a request (serve --frame-limit): send max_frames or duration")
    if frames > limit:
        raise FormError(f"{job.driver}: the result would have {frames} frames, over this server's limit of {limit} "
                        "(serve --frame-limit): send a part of the driver (start, duration), max_frames, or a "
                        "lower fps")


def _prune(task: Task) -> None:
    """Remove what a finished job's folder holds but its record and (done) its result: its uploads and its
    checkpoint are of no more use."""
    keep = (RECORD, "result") if task.status == "done" else (RECORD,)
    for path in task.folder.glob("*"):
        if path.name not in keep:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _remove_all(folders: set[Path]) -> None:
    """Remove a server's temporary ``folders`` (at :meth:`AnimateServer.server_close`, else at the interpreter's
    exit), without its lock: a thread that holds it when the interpreter exits never gives it back."""
    for path in list(folders):  # (a copy made at once: other threads may add or discard meanwhile)
        shutil.rmtree(path, ignore_errors=True)


def _entries(folder: Path) -> list[Path]:
    """What ``folder`` holds, sorted (none where it is missing; one that cannot be read is logged)."""
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        logger.warning("%s: cannot be read (%s); what it holds is left there, not served", folder, _why(exc))
        return []


def _removed(path: Path, what: str) -> bool:
    """Remove ``path`` (a folder with what it holds), logged as ``what``: removed, or why it was not (left there)."""
    try:
        shutil.rmtree(path)
    except OSError as exc:
        if os.path.lexists(path):
            logger.warning("%s: %s; it cannot be removed (%s: %s), left there", path, what, _why(exc),
                           exc.filename or path)
            return False
    logger.info("%s: %s; removed", path, what)
    return True


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _full(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk (or a user's quota reached)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_trouble(exc: OSError) -> str:
    """``exc`` as an answer says it: a full disk named so."""
    return f"the disk is full: {exc}" if _full(exc) else f"{type(exc).__name__}: {exc}"


def _postable(url: str) -> bool:
    """Whether ``url`` is an http(s) address a callback can be posted to: a host, a port that is one, no spaces
    or control characters (a malformed one crashed the callback's thread when the run ended)."""
    from urllib.parse import urlsplit

    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return False
    try:
        parts = urlsplit(url)
        _ = parts.port  # (raises for one out of range)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _shown(url: str) -> str:
    """``url`` as the log shows it: without the user and password it may carry."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an address that is none)"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _inside(folder: Path, name: object) -> Path:
    """``folder / name`` from a job record, where it stays inside ``folder`` (links followed): a record edited to
    name a file elsewhere (``../../etc/passwd``, an absolute path) is refused, never read, served or deleted.

    Raises:
        ValueError: ``name`` is no relative path inside ``folder``.
    """
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise ValueError(f"{name!r} is not a path within {folder}")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{name!r} leads out of {folder}")
    return path


def _finite_time(value: object) -> float:
    """A record's time (seconds since the epoch), finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a time")
    return float(value)


def _within(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` where it is inside (a record's files move with their folder), else whole."""
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)


def _media_type(path: Path) -> str:
    return _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")


def _attachment(name: str) -> str:
    """A Content-Disposition naming a download ``name``: plain ASCII for every client, and UTF-8 (RFC 6266) for
    those that read it."""
    plain = "".join(c if " " <= c < "\x7f" and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{urllib.parse.quote(name)}"


def _stem(path: Path) -> str:
    """An upload's name in its result's name (``<portrait>_<driver>.mp4``), at most 100 bytes of UTF-8: two of
    them and a suffix stay within the file systems' 255."""
    return cut_utf8(path.stem or path.name, 100)


def _form_print(text: dict[str, str], files: dict[str, Path]) -> str:
    """A form's fingerprint: its text fields, and each file's field, name and bytes (not the multipart boundary,
    which a client picks anew for each try)."""
    digest = hashlib.sha256(json.dumps(sorted((k, v.strip()) for k, v in text.items())).encode())
    for name in sorted(files):
        digest.update(f"\0{name}\0{files[name].name}\0".encode())
        with open(files[name], "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _host_name(host: str) -> str:
    """The name in a ``Host`` header or an ``--allowed-host`` (``[::1]:8450`` -> ``::1``, ``App.example.:443`` ->
    ``app.example``)."""
    name = host.strip().lower()
    if name.startswith("["):  # ([::1]:8450)
        inside, _, rest = name[1:].partition("]")
        # (anything but a port after "]" is no Host a browser sends: kept whole, so neither an address nor a name;
        # an empty port, "[::1]:", is a Host's as "localhost:" is: RFC 3986's port is *DIGIT)
        return inside if re.fullmatch(r"(:[0-9]*)?", rest) else name
    if name.count(":") == 1:  # (name:port)
        bare, _, port = name.partition(":")
        if not re.fullmatch(r"[0-9]*", port):
            return name
        name = bare
    return name.rstrip(".")


def _size(path: Path) -> int:
    """``path``'s size; 0 where it cannot be told (gone, or its folder made unreadable while the server runs)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback_ip(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.partition("%")[0]).is_loopback
    except ValueError:
        return False


def loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(info[4][0] in ("127.0.0.1", "::1") or str(info[4][0]).startswith("127.") for info in infos)


def _lock_jobs_dir(folder: Path) -> IO[bytes]:
    """Hold ``folder`` (created where missing) for one server: an open file locked until it is closed.

    Raises:
        InputError: the folder cannot be written, or another server holds it (its process named).
    """
    import fcntl
    for path in (folder, folder / "jobs", folder / "drivers", folder / "requests"):  # (named: the one in the way)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # (not a folder)
            raise InputError(f"{path}: the jobs folder (--jobs-dir) cannot be written (a file is in the way of a "
                             "folder of that name)") from None
        except OSError as exc:
            raise InputError(f"{exc.filename or path}: the jobs folder (--jobs-dir) cannot be written "
                             f"({_why(exc)})") from exc
    try:
        lock = open(folder / ".lock", "a+b")  # noqa: SIM115 - held open while the server runs
    except OSError as exc:
        raise InputError(f"{folder / '.lock'}: the jobs folder (--jobs-dir) cannot be written "
                         f"({_why(exc)})") from exc
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read(32).decode(errors="replace").strip()
        lock.close()
        raise InputError(f"{folder}: another server uses this jobs folder (--jobs-dir)"
                         f"{f' (process {holder})' if holder else ''}; one server per folder") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n".encode())
    lock.flush()
    return lock


def load_token(path: Path | None, create: bool = False) -> str | None:
    """The token a server asks for or a client sends: the first line of ``path``, else ``$MEGACTOR_SERVE_TOKEN``,
    else none. With ``create`` (``serve --token-file``), a file that does not exist yet gets a new random token (read
    by this user only), said in the log.

    Raises:
        InputError: the file cannot be read or written, or the token is too short or holds spaces.
    """
    if path is None:
        token, where = os.environ.get(TOKEN_ENV), f"${TOKEN_ENV}"
        if token is None:
            return None
    elif create and not path.exists():
        import secrets

        token, where = secrets.token_urlsafe(32), str(path)
        try:
            with written_whole(path) as partial:
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(token + "\n")
        except OSError as exc:
            raise InputError(f"{path}: cannot write a new token there ({_why(exc)})") from exc
        logger.warning("%s: a new token written there; clients send it (animate --server-token-file %s, or "
                       "curl -H \"Authorization: Bearer $(cat %s)\")", path, path, path)
    else:
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # (a BOM: Windows editors)
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read the token from it ({getattr(exc, 'strerror', None) or exc})"
                             ) from exc
        token, where = (lines[0] if lines else ""), str(path)
        if create and os.name == "posix" and path.stat().st_mode & 0o077:
            logger.warning("%s: other users of this machine may read the token in it (chmod 600 %s)", path, path)
    token = token.strip()
    if len(token) < MIN_TOKEN or any(c.isspace() or not c.isprintable() for c in token):
        raise InputError(f"{where}: a token is at least {MIN_TOKEN} printable characters without spaces (got "
                         f"{len(token)}); make one: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


def tls_context(cert: Path, key: Path | None = None) -> ssl.SSLContext:
    """A server-side TLS context of ``cert`` (PEM; a chain: the server's first) and ``key`` (PEM, unencrypted; none:
    in ``cert``'s file).

    Raises:
        InputError: a file cannot be read, is no PEM certificate or key, or the key is not the certificate's.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    names = f"{cert}" + ("" if key is None else f", {key}")

    def encrypted() -> str:
        raise InputError(f"{key or cert}: the key is encrypted; serve takes an unencrypted one (openssl pkey -in KEY "
                         "-out plain.pem), readable by this user only")

    try:
        context.load_cert_chain(cert, key, password=encrypted)
    except FileNotFoundError as exc:
        raise InputError(f"{exc.filename or names}: no such file (--tls-cert / --tls-key)") from exc
    except ssl.SSLError as exc:
        raise InputError(f"{names}: not a certificate and its key in PEM (--tls-cert CERT.pem --tls-key KEY.pem; "
                         f"{exc.reason or exc})") from exc
    except OSError as exc:
        raise InputError(f"{names}: cannot read it ({_why(exc)})") from exc
    return context
