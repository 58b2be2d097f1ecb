"""Jobs files (``megactor-rt animate --jobs FILE``): chosen portrait/driver pairs in one process.

``--portrait A B --driver X Y`` animates every portrait with every driver. A jobs file names the pairs
instead, each with its own result and, where wanted, its own mask, sound, faces and part of the driver. It is
CSV (comma-separated, as spreadsheets save it; semicolons or tabs are taken too, as the header row shows, and
then ``3,5`` in a number column is 3.5; a first line ``sep=;`` names the separator, as Excel reads and writes it)
with a header row naming its columns:

    portrait,driver,output,start,duration
    alice.jpg,speech.mp4,out/alice_speech.mp4,,
    bob.png,song.mov,out/bob_song.webm,0:42,15

Columns (any order; the first three are required): ``portrait``, ``driver``, ``output`` (its suffix picks the
format), and ``mask``, ``audio`` (a file, or ``none`` for no sound), ``audio_start``, ``portrait_face``,
``driver_face``, ``start``, ``duration``, ``seed``, ``steps``, ``guidance``, ``overlap``, ``cfg_steps``, ``fps``,
``max_frames``, ``sequence_fps`` (an image-sequence driver's rate), which mean what the ``animate`` flags of the
same name mean (with ``-`` or a space for ``_``, in any case). An empty cell takes the flag's value (or its
default). Relative paths are relative to the jobs file's folder; blank lines, rows of empty cells (a spreadsheet's
blank rows) and lines starting with ``#`` are skipped; a cell in double quotes may go over lines (a spreadsheet's cell
with a line break at its end). Result folders are created. Columns without a name in the
header row, and cells past its last column, are taken where they are empty (the columns a spreadsheet saves beyond
the named ones).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from megactor_rt.config import AnimateConfig, parse_frame_rate, time_seconds
from megactor_rt.errors import InputError
from megactor_rt.remote import as_url

REQUIRED = ("portrait", "driver", "output")
PATH_COLUMNS = ("mask", "audio")
FACE_COLUMNS = {"portrait_face": "face", "driver_face": "driver_face"}  # column -> animate_to_file keyword
# AnimateConfig fields a row may set: the part of the driver, the seed, and settings that trade quality for speed
# (the window stays the run's: graph backends and compiled denoisers are made for it)
CONFIG_COLUMNS = ("start", "duration", "seed", "steps", "guidance", "overlap", "cfg_steps", "fps", "max_frames")
COLUMNS = (*REQUIRED, *PATH_COLUMNS, "audio_start", *FACE_COLUMNS, *CONFIG_COLUMNS, "sequence_fps")
NO_SOUND = "none"
DECIMAL_COLUMNS = ("start", "duration", "audio_start", "guidance", "fps", "sequence_fps")  # fractional numbers
_SEP_LINE = re.compile(r"sep=([,;\t])", re.IGNORECASE)  # Excel's first line naming the separator
_DECIMAL_COMMA = re.compile(r"[-+]?[0-9:]*[0-9],[0-9]+")  # 3,5 or 1:02,5 (a decimal comma)

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One result to make: ``options`` are ``animate_to_file`` keyword arguments and ``config`` changes to the
    run's :class:`~megactor_rt.config.AnimateConfig` that this job sets; ``where`` names its line for errors."""

    portrait: Path
    driver: Path
    output: Path
    options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    sequence_fps: Fraction | None = None  # an image-sequence driver's rate (None: --sequence-fps)

    def run_config(self, base: AnimateConfig) -> AnimateConfig:
        """``base`` with this job's changes."""
        return replace(base, **self.config) if self.config else base


def read_jobs(path: Path, base: AnimateConfig) -> list[Job]:
    """The jobs in ``path`` (see the module doc), each checked against ``base`` (its start and duration make a
    valid run config).

    Raises:
        InputError: naming the file and line: unreadable file, no header or rows, a missing or unknown column, a
            row with fewer cells than the header or text in a cell no column name covers, a face number or time
            that is not one, two jobs writing the same result.
    """
    if str(path) == "-":  # (was "-: jobs file not found")
        raise InputError("--jobs -: a jobs file is read from its path, not standard input (its rows' paths are "
                         "relative to its folder): save it as a file and name that")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: jobs file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: --jobs names a CSV file, and this is a folder") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the jobs file ({exc})") from exc
    if raw.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):  # a zip (.xlsx, .ods, .numbers) or OLE (.xls) file
        raise InputError(f"{path}: a spreadsheet's workbook, not a CSV file; save the sheet as \"CSV UTF-8\" (or "
                         "\"Unicode Text\") and name that")
    utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
    if not utf16:
        _refuse_nul(path, raw)
    try:  # UTF-8 with or without a BOM (spreadsheets' "CSV UTF-8"); UTF-16 with its BOM ("Unicode Text": tabs)
        text = raw.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: the jobs file is not UTF-8 text ({exc}); save it as \"CSV UTF-8\" (a "
                         "spreadsheet's plain \"CSV\" is the system's code page)") from exc
    _refuse_nul(path, text)
    lines = text.splitlines(keepends=True)
    n_first = next((n for n, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")), None)
    first = "" if n_first is None else lines[n_first]
    directive = _SEP_LINE.fullmatch(first.strip(" \r\n").strip('"'))  # Excel's "sep=;" line: the separator, not the header
    if directive is not None and n_first is not None:
        delimiter = directive.group(1)
        lines[n_first] = "\n"  # (a blank line: the rows keep their line numbers)
        text = "".join(lines)
    else:
        delimiter = _delimiter(first)
    rows = _rows(path, text, delimiter)
    if not rows:
        raise InputError(f"{path}: the jobs file is empty (a header row, then one row per result: "
                         f"{','.join(REQUIRED)})")
    head_line, header = rows[0]
    # ("Portrait face", "max-frames": portrait_face, max_frames; "": a column without a name, left empty)
    names = [re.sub(r"[\s_-]+", "_", c.strip().lower()) for c in header]
    unknown = [c for c in names if c and c not in COLUMNS]
    if unknown:
        raise InputError(f"{path}:{head_line}: unknown column(s) {', '.join(map(repr, unknown))}; the columns are "
                         f"{', '.join(COLUMNS)} (the first row names them)")
    missing = [c for c in REQUIRED if c not in names]
    twice = sorted({c for c in names if c and names.count(c) > 1})
    if missing or twice:
        problem = f"no {', '.join(missing)} column" if missing else f"column(s) {', '.join(twice)} given twice"
        raise InputError(f"{path}:{head_line}: {problem} (the first row names the columns: {','.join(REQUIRED)}, ...)")
    _say_rows_left_out(text, head_line, names, delimiter, path)
    folder = path.parent
    jobs = [_job(path, n, _row_cells(f"{path}:{n}", names, cells), folder, base, decimal_comma=delimiter != ",")
            for n, cells in rows[1:] if any(c.strip() for c in cells)]  # (",,,": a spreadsheet's blank row)
    if not jobs:
        raise InputError(f"{path}: no jobs (only the header row)")
    _check_outputs_apart(jobs)
    return jobs


def _refuse_nul(path: Path, data: str | bytes) -> None:
    """Refuse a file with a NUL character (byte 0) in it, naming its line (was "unexpected error: ValueError:
    embedded null byte", naming no file, once a row's path was looked at; or "not UTF-8 text", "unknown column(s)
    '\\x00p\\x00o...'" for UTF-16 without its BOM).

    Raises:
        InputError: naming the file and line.
    """
    at = data.find("\0") if isinstance(data, str) else data.find(b"\0")
    if at >= 0:
        raise InputError(f"{path}:{len(data[:at + 1].splitlines())}: a NUL character (byte 0), which no text has: a "
                         "file in UTF-16 without its byte order mark, or one cut short or padded; save it as \"CSV "
                         "UTF-8\" (or \"Unicode Text\")")


def _rows(path: Path, text: str, delimiter: str) -> list[tuple[int, list[str]]]:
    """The file's rows (cells) with the line each begins on; blank lines and ``#`` lines between rows are skipped. A
    cell in double quotes may go on over lines (a spreadsheet saves a cell with a line break so: ``"out/a.mp4\n"``,
    taken without it; was split into two rows, "1 cell(s), the header has 3").

    Raises:
        InputError: naming the file and line: a cell with a line break inside its text (no path or number has one:
            a double quote left open, which runs on to the next one).
    """
    lines = iter(enumerate(text.splitlines(keepends=True), 1))
    begins, ends, between = 0, 0, True

    def source() -> Iterator[str]:  # the lines the reader asks for: between rows, blank and # lines left out
        nonlocal begins, ends, between
        for n, line in lines:
            if between and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if between:
                begins, between = n, False
            ends = n
            yield line

    rows = []
    for cells in csv.reader(source(), delimiter=delimiter, skipinitialspace=True):
        broken = next((c for c in cells if "\n" in c.strip() or "\r" in c.strip()), None)
        if broken is not None:
            raise InputError(f"{path}:{begins}: a cell in double quotes goes on to line {ends} ({broken.strip()!r}): "
                             "a line break inside a cell is no path or number; remove it, or close the cell's "
                             "double quote where it ends")
        rows.append((begins, cells))
        between = True
    return rows


def _say_rows_left_out(text: str, head_line: int, names: list[str], delimiter: str, path: Path) -> None:
    """A warning for each ``#`` line after the header that reads as a row whose first cell, ``#`` and all, names a
    file there (``#1.png``): a row of a file whose name begins with ``#`` is a comment, left out without a word
    otherwise (a row commented out, ``#a.png,...`` for ``a.png``, is not named)."""
    for n, line in enumerate(text.splitlines(), 1):
        if n <= head_line or not line.lstrip().startswith("#"):
            continue
        cells = next(csv.reader([line.lstrip()], delimiter=delimiter, skipinitialspace=True), [])
        if len(cells) == len(names) and os.path.exists(path.parent / cells[0].strip()):
            logger.warning("%s:%d: left out as a comment (it begins with #), though it reads as a row; a path "
                           "beginning with # goes in double quotes (\"#1.png\")", path, n)


def _check_outputs_apart(jobs: list[Job]) -> None:
    """Refuse two jobs writing one result, however their paths spell it (``out/x.mp4``, ``out/../out/x.mp4``, a
    linked folder), or one writing into another's frame sequence folder (a sequence replaces its folder whole).

    Raises:
        InputError: naming both rows.
    """
    from megactor_rt.sequence import frame_pattern, is_sequence

    files: dict[Path, Job] = {}
    folders: dict[Path, Job] = {}  # frame sequences' folders
    for job in jobs:
        sequence = is_sequence(job.output)
        try:
            place = frame_pattern(job.output).folder if sequence else job.output.expanduser()
        except InputError:  # (a pattern that is none: said with its line when the results are checked)
            place, sequence = job.output, False
        place = Path(os.path.realpath(place))
        other = files.get(place) or folders.get(place)
        if other is not None:
            raise InputError(f"{job.where}: writes {job.output}, as {other.where} does ({other.output}); each job "
                             "needs its own output")
        inside = next((f for f in folders if place.is_relative_to(f) or sequence and f.is_relative_to(place)), None)
        if inside is not None:
            raise InputError(f"{job.where}: writes {job.output}, where {folders[inside].where} writes the frame "
                             f"sequence {folders[inside].output}, whose folder is replaced whole; each job needs its "
                             "own output")
        held = next((f for f in files if f.is_relative_to(place)), None) if sequence else None
        if held is not None:
            raise InputError(f"{job.where}: writes the frame sequence {job.output}, whose folder is replaced whole, "
                             f"and {files[held].where} writes {files[held].output} in it; each job needs its own "
                             "output")
        (folders if sequence else files)[place] = job


def _config_value(column: str, text: str) -> Any:
    """A config column's cell as its field's value (its range is the config's to check)."""
    if column in ("start", "duration"):
        return time_seconds(column, text)
    try:
        return float(text) if column in ("guidance", "fps") else int(text)
    except ValueError:
        kind = "a number" if column in ("guidance", "fps") else "a whole number"
        raise ValueError(f"{column} must be {kind}, got {text!r}") from None


def _delimiter(header: str) -> str:
    """The header row's separator: a comma; a semicolon (spreadsheets in locales whose decimal mark is a comma save
    CSV so) or a tab (TSV) where the header has one of them and no comma."""
    if "," in header:
        return ","
    return next((d for d in (";", "\t") if d in header), ",")


def _row_cells(where: str, names: list[str], cells: list[str]) -> dict[str, str]:
    """A row's cells by column name. Spreadsheets save the columns they once used beyond the named ones: columns
    without a name in the header row and cells past its last column are taken where they are empty.

    Raises:
        InputError: beginning with ``where``: fewer cells than the header names, or text in a cell no column name
            covers.
    """
    if len(cells) < len(names):
        raise InputError(f"{where}: {len(cells)} cell(s), the header has {len(names)} (each row has a cell for each "
                         "column, an empty one too: a separator is missing)")
    if any(c.strip() for c in cells[len(names):]):
        raise InputError(f"{where}: {len(cells)} cell(s), the header has {len(names)} (a comma inside a path needs "
                         "the path in double quotes)")
    stray = next((i for i, name in enumerate(names) if not name and cells[i].strip()), None)
    if stray is not None:
        raise InputError(f"{where}: {cells[stray].strip()!r} in column {stray + 1}, which has no name in the header "
                         "row; name it there (one of the columns) or leave its cells empty")
    return {name: cell for name, cell in zip(names, cells) if name}


def _job(path: Path, line: int, cells: dict[str, str], folder: Path, base: AnimateConfig,
         decimal_comma: bool = False) -> Job:
    """A row's job; with ``decimal_comma`` (a file separated by semicolons or tabs, as spreadsheets in locales whose
    decimal mark is a comma save it) ``3,5`` in a number column is 3.5."""
    where = f"{path}:{line}"
    value = {k: v.strip() for k, v in cells.items() if v.strip()}
    if decimal_comma:
        value.update({k: v.replace(",", ".") for k, v in value.items()
                      if k in DECIMAL_COLUMNS and _DECIMAL_COMMA.fullmatch(v)})
    for column in REQUIRED:
        if column not in value:
            raise InputError(f"{where}: no {column} given")
    piped = [c for c in ("portrait", "driver", "output", "mask", "audio") if value.get(c) == "-"]
    if piped:  # (was "-: driver file does not exist", or a result written to a file named "-")
        raise InputError(f"{where}: {piped[0]} '-' (standard input or output) is for one run on the command line "
                         "(--driver -, -o -), not a jobs file's row")
    if as_url(value["output"]):  # (was written under ./https:/host/..., folders made, without a word)
        raise InputError(f"{where}: output {value['output']}: a web address; a result is written to a file here (the "
                         "input cells may be addresses, downloaded): name a file, relative to the jobs file's folder")

    def resolve(text: str) -> Path:
        if as_url(text):  # a web address: downloaded before any work (megactor_rt.remote)
            return Path(text)
        p = Path(text).expanduser()
        return p if p.is_absolute() else folder / p

    return job_from_cells(value, where, resolve, base)


def job_from_cells(value: dict[str, str], where: str, resolve: Callable[[str], Path], base: AnimateConfig) -> Job:
    """The job a row's non-empty cells (column -> text; the three :data:`REQUIRED` among them) describe, checked
    against ``base``; ``resolve`` makes a cell's text a path (the portrait, driver, output, mask and audio columns).
    Also used by :mod:`megactor_rt.server` for a request's fields.

    Raises:
        InputError: beginning with ``where``: a face number, time or seed that is not one, or a run config that
            ``base`` with the row's changes does not make.
    """
    job = Job(resolve(value["portrait"]), resolve(value["driver"]), resolve(value["output"]), where=where)
    if "mask" in value:
        job.options["mask"] = resolve(value["mask"])
    if "audio" in value:
        job.options["audio"] = False if value["audio"].lower() == NO_SOUND else resolve(value["audio"])
    for column, keyword in FACE_COLUMNS.items():
        if column in value:
            try:
                number = int(value[column])
            except ValueError:
                number = 0
            if number < 1:
                raise InputError(f"{where}: {column} must be a face number from 1 (the leftmost), got "
                                 f"{value[column]!r}")
            job.options[keyword] = number
    try:
        if "audio_start" in value:
            job.options["audio_start"] = time_seconds("audio_start", value["audio_start"])
        if "sequence_fps" in value:
            job.sequence_fps = parse_frame_rate(value["sequence_fps"])
        for column in CONFIG_COLUMNS:
            if column in value:
                job.config[column] = _config_value(column, value[column])
        job.run_config(base)  # a start/duration the run config refuses
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from None
    return job
