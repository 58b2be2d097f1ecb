"""Jobs files (``animate --jobs FILE``): parsing and every malformed-file case (named by file and line)."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import pytest

from megactor_rt.config import AnimateConfig
from megactor_rt.errors import InputError
from megactor_rt.jobs import read_jobs

BASE = AnimateConfig()


def _jobs_file(tmp_path: Path, text: str, name: str = "jobs.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def test_rows_become_jobs_with_their_own_options(tmp_path: Path) -> None:
    """Columns in any order and case, spaces after commas, a spreadsheet's BOM, comments and blank lines; relative
    paths from the file's folder, absolute ones kept; empty cells set nothing; times as seconds or M:SS."""
    path = _jobs_file(tmp_path, "\ufeffDriver, Portrait ,output,start,duration,portrait_face,driver-face,mask,audio,"
                                "audio_start\n"
                                "# the first pair\n"
                                "\n"
                                "d1.mp4, a.png, out/a_d1.mp4,,,,,,,\n"
                                f"{tmp_path}/d2.mov,sub/b.jpg,b.webm,0:42,15,2,1,b_mask.png,none,\n"
                                '"d,3.mp4",c.png,c.gif,,,,,,song.mp3,1:05.5\n')
    jobs = read_jobs(path, BASE)
    assert [(j.portrait, j.driver, j.output) for j in jobs] == [
        (tmp_path / "a.png", tmp_path / "d1.mp4", tmp_path / "out" / "a_d1.mp4"),
        (tmp_path / "sub" / "b.jpg", tmp_path / "d2.mov", tmp_path / "b.webm"),
        (tmp_path / "c.png", tmp_path / "d,3.mp4", tmp_path / "c.gif")]
    assert [j.options for j in jobs] == [{}, {"mask": tmp_path / "b_mask.png", "audio": False, "face": 2,
                                               "driver_face": 1},
                                         {"audio": tmp_path / "song.mp3", "audio_start": 65.5}]
    assert [j.config for j in jobs] == [{}, {"start": 42.0, "duration": 15.0}, {}]
    assert jobs[1].run_config(BASE) == AnimateConfig(start=42, duration=15) and jobs[0].run_config(BASE) is BASE
    assert [j.where for j in jobs] == [f"{path}:4", f"{path}:5", f"{path}:6"]


@pytest.mark.parametrize(("text", "message"), [
    ("", "the jobs file is empty"),
    ("# only a comment\n\n", "the jobs file is empty"),
    ("portrait,driver,output\n", r"no jobs \(only the header row\)"),
    ("portrait,driver\np.png,d.mp4\n", r"jobs.csv:1: no output column"),
    ("portrait,driver,output,speed\np,d,o.mp4,2\n", r"jobs.csv:1: unknown column\(s\) 'speed'; the columns are"),
    ("portrait,driver,output,output\np,d,o.mp4,x.mp4\n", "jobs.csv:1: column.s. output given twice"),
    ("portrait,driver,output\np.png,d,3.mp4,o.mp4\n", "jobs.csv:2: 4 cell.s., the header has 3 .a comma inside a path"),
    ("portrait,driver,output\n\np.png,,o.mp4\n", "jobs.csv:3: no driver given"),
    ("portrait,driver,output,portrait_face\np,d,o.mp4,0\n", "jobs.csv:2: portrait_face must be a face number from 1"),
    ("portrait,driver,output,driver_face\np,d,o.mp4,left\n", "jobs.csv:2: driver_face must be a face number"),
    ("portrait,driver,output,start\np,d,o.mp4,soon\n", "jobs.csv:2: start: "),
    ("portrait,driver,output,duration\np,d,o.mp4,0\n", "jobs.csv:2: duration must be a finite number > 0"),
    ("portrait,driver,output,audio_start\np,d,o.mp4,1:xx\n", "jobs.csv:2: audio_start: "),
    ("portrait,driver,output,seed\np,d,o.mp4,1.5\n", "jobs.csv:2: seed must be a whole number, got '1.5'"),
    ("portrait,driver,output,seed\np,d,o.mp4,99999999999999999999\n", "jobs.csv:2: seed must fit in 64 bits"),
    ("portrait,driver,output,steps\np,d,o.mp4,ten\n", "jobs.csv:2: steps must be a whole number, got 'ten'"),
    ("portrait,driver,output,guidance\np,d,o.mp4,high\n", "jobs.csv:2: guidance must be a number, got 'high'"),
    ("portrait,driver,output,overlap\np,d,o.mp4,16\n", "jobs.csv:2: window must be >= 1 and overlap from 0 to"),
    ("portrait,driver,output,sequence_fps\np,d/%04d.png,o.mp4,fast\n", "jobs.csv:2: 'fast' is not a frame rate"),
    ("portrait,driver,output\np,d,o.mp4\nq,e,./o.mp4\n", r"jobs.csv:3: writes .*o.mp4, as .*jobs.csv:2 does"),
    ("portrait,driver,output\np,d,out/o.mp4\nq,e,out/../out/o.mp4\n", r"jobs.csv:3: writes .*, as .*jobs.csv:2 does"),
    ("portrait,driver,output\np,d,seq/%05d.png\nq,e,seq/%04d.png\n", r"jobs.csv:3: writes .*, as .*jobs.csv:2 does"),
    ("portrait,driver,output\np,d,seq/x.mp4\nq,e,seq/%05d.png\n",
     r"jobs.csv:3: writes the frame sequence .*seq/%05d.png, .* and .*jobs.csv:2 writes .*seq/x.mp4 in it"),
    ("portrait,driver,output\np,d,seq/%05d.png\nq,e,seq/x.mp4\n",
     r"jobs.csv:3: writes .*seq/x.mp4, where .*jobs.csv:2 writes the frame sequence"),
    ("portrait;driver;output;guidance\np;d;o.mp4;3,5,1\n", "jobs.csv:2: guidance must be a number, got '3,5,1'"),
    ("portrait,driver,output\np,-,o.mp4\n", r"jobs.csv:2: driver '-' \(standard input or output\) is for one run"),
    ("portrait,driver,output\np,d,-\n", r"jobs.csv:2: output '-' \(standard input or output\) is for one run"),
    ("portrait,driver,output\np,d,https://example.com/up/o.mp4\n",
     r"jobs.csv:2: output https://example.com/up/o.mp4: a web address; a result is written to a file here"),
], ids=["empty", "comments-only", "header-only", "no-output-column", "unknown-column", "column-twice",
        "unquoted-comma", "empty-required-cell", "face-zero", "face-word", "bad-start", "zero-duration",
        "bad-audio-start", "bad-seed", "huge-seed", "bad-steps", "bad-guidance", "overlap-too-large", "bad-sequence-fps",
        "same-output-twice",
        "same-output-other-spelling", "one-sequence-folder-twice", "sequence-over-a-result", "result-in-a-sequence",
        "not-a-decimal-comma", "stdin-driver", "stdout-output", "address-output"])
def test_a_malformed_jobs_file_is_named_by_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        read_jobs(_jobs_file(tmp_path, text), BASE)


def test_a_row_has_its_own_seed_and_speed(tmp_path: Path) -> None:
    """A preview row and a final row in one file: seed, steps, guidance, overlap, CFG truncation, rate, frames."""
    jobs = read_jobs(_jobs_file(tmp_path, "portrait,driver,output,seed,steps,guidance,overlap,cfg_steps,fps,max_frames\n"
                                          "a.png,d.mp4,a.mp4,7,10,3.5,4,5,12.5,48\n"
                                          "b.png,d.mp4,b.mp4,,,,,,,\n"
                                          "c.png,d.mp4,c.mp4,-3,,,,,,\n"), BASE)
    assert [j.run_config(BASE).seed for j in jobs] == [7, BASE.seed, -3]
    assert jobs[0].config == {"seed": 7, "steps": 10, "guidance": 3.5, "overlap": 4, "cfg_steps": 5, "fps": 12.5,
                              "max_frames": 48}
    assert jobs[1].run_config(BASE) is BASE


def test_an_image_sequence_row_has_its_own_rate(tmp_path: Path) -> None:
    path = _jobs_file(tmp_path, "portrait,driver,output,sequence_fps\n"
                                "a.png,plate/%04d.jpg,a/%05d.png,30000/1001\n"
                                "a.png,b/%d.png,b.mp4,23.976\n"
                                "a.png,c.mp4,c.mp4,\n")
    jobs = read_jobs(path, BASE)
    assert [j.sequence_fps for j in jobs] == [Fraction(30000, 1001), Fraction(2997, 125), None]
    assert (jobs[0].driver, jobs[0].output) == (tmp_path / "plate" / "%04d.jpg", tmp_path / "a" / "%05d.png")


@pytest.mark.parametrize("separator", [";", "\t"], ids=["semicolons", "tabs"])
def test_semicolons_and_tabs_separate_cells_too(tmp_path: Path, separator: str) -> None:
    """Spreadsheets in locales with a decimal comma save CSV with semicolons; TSV has tabs: the header tells."""
    text = separator.join(["portrait", "driver", "output", "start"]) + "\n" + separator.join(
        ["a, b.png", "d.mp4", "o.mp4", "1.5"]) + "\n"
    (job,) = read_jobs(_jobs_file(tmp_path, text), BASE)
    assert (job.portrait, job.output, job.config) == (tmp_path / "a, b.png", tmp_path / "o.mp4", {"start": 1.5})


def test_a_spreadsheets_unnamed_and_trailing_empty_columns_are_taken(tmp_path: Path) -> None:
    """Excel saves every column once used: empty header cells and empty cells past the header's last column (CRLF,
    BOM) are taken; text in an unnamed column, or past the last one, is refused by line, as is a row short of
    cells (a missing separator, not a comma in a path)."""
    path = _jobs_file(tmp_path, "\ufeffportrait,driver,,output,,\r\na.png,d.mp4,,o.mp4,,\r\nb.png,d.mp4,,p.mp4,,,,\r\n"
                                ",,,,,\r\n")
    jobs = read_jobs(path, BASE)
    assert [(j.portrait, j.output, j.options, j.config) for j in jobs] == [
        (tmp_path / "a.png", tmp_path / "o.mp4", {}, {}), (tmp_path / "b.png", tmp_path / "p.mp4", {}, {})]
    for row, message in (("a.png,d.mp4,note,o.mp4,,", r"jobs.csv:2: 'note' in column 3, which has no name"),
                         ("a.png,d.mp4,,o.mp4,,,x", r"jobs.csv:2: 7 cell\(s\), the header has 6 \(a comma inside"),
                         ("a.png,d.mp4,,o.mp4", r"jobs.csv:2: 4 cell\(s\), the header has 6 \(each row has a cell for "
                                                r"each column, an empty one too: a separator is missing\)")):
        with pytest.raises(InputError, match=message):
            read_jobs(_jobs_file(tmp_path, f"portrait,driver,,output,,\n{row}\n"), BASE)


def test_a_row_of_a_file_named_with_a_hash_is_not_left_out_without_a_word(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A line beginning with # is a comment, but one whose first cell names a file there (#1.png) is a row lost: a
    warning names its line (was silent); a row commented out (#a.png for a.png) and a note are not named."""
    (tmp_path / "#1.png").write_bytes(b"")
    path = _jobs_file(tmp_path, "portrait,driver,output\na.png,d.mp4,a.mp4\n#1.png,d.mp4,b.mp4\n#a.png,d.mp4,c.mp4\n"
                                "# takes, final, 2\n\"#1.png\",d.mp4,d.mp4\n")
    with caplog.at_level(logging.WARNING, logger="megactor_rt"):
        jobs = read_jobs(path, BASE)
    assert [j.output.name for j in jobs] == ["a.mp4", "d.mp4"] and jobs[1].portrait == tmp_path / "#1.png"
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:3: left out as a comment (it begins with #), though it reads as a row; a path beginning with # goes "
        "in double quotes (\"#1.png\")"]


def test_a_header_written_as_words_names_its_columns(tmp_path: Path) -> None:
    """A spreadsheet's headings as people type them ("Portrait face", "Max  Frames", "audio-start") name the columns
    (were "unknown column(s) 'portrait face'")."""
    (job,) = read_jobs(_jobs_file(tmp_path, "Portrait,Driver,Output,Portrait face,Max  Frames,audio-start,Audio\n"
                                            "a.png,d.mp4,o.mp4,2,12,1.5,s.wav\n"), BASE)
    assert job.options == {"face": 2, "audio_start": 1.5, "audio": tmp_path / "s.wav"}
    assert job.config == {"max_frames": 12}


def test_a_linked_folder_does_not_hide_two_jobs_writing_one_result(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "out")
    with pytest.raises(InputError, match=r"jobs.csv:3: writes .*link/o.mp4, as .*jobs.csv:2 does \(.*out/o.mp4\)"):
        read_jobs(_jobs_file(tmp_path, "portrait,driver,output\np,d,out/o.mp4\nq,e,link/o.mp4\n"), BASE)


def test_a_decimal_comma_in_a_file_separated_by_semicolons_or_tabs(tmp_path: Path) -> None:
    """Spreadsheets whose decimal mark is a comma write 3.5 as 3,5 (and separate cells by semicolons): numbers with
    a fraction read so; a comma file keeps commas as separators."""
    (job,) = read_jobs(_jobs_file(tmp_path, "portrait;driver;output;guidance;start;duration;fps;audio_start\n"
                                            "a,1.png;d.mp4;o.mp4;3,5;1:02,5;0,5;12,5;0,25\n"), BASE)
    assert job.portrait == tmp_path / "a,1.png"  # (a path keeps its comma)
    assert job.config == {"guidance": 3.5, "start": 62.5, "duration": 0.5, "fps": 12.5}
    assert job.options == {"audio_start": 0.25}
    (job,) = read_jobs(_jobs_file(tmp_path, "portrait\tdriver\toutput\tsequence_fps\na.png\td/%04d.png\to.mp4\t"
                                            "23,976\n"), BASE)
    assert job.sequence_fps == Fraction(2997, 125)


def test_jobs_files_in_a_spreadsheets_encodings(tmp_path: Path) -> None:
    """"Unicode Text" (UTF-16 with its BOM, tab-separated) reads; a code-page CSV (cp1252) is named with the way
    to save it."""
    path = tmp_path / "jobs.txt"
    path.write_bytes("portrait\tdriver\toutput\nRené.png\td.mp4\to.mp4\n".encode("utf-16"))
    (job,) = read_jobs(path, BASE)
    assert job.portrait == tmp_path / "René.png"
    path.write_bytes("portrait,driver,output\nRené.png,d.mp4,o.mp4\n".encode("cp1252"))
    with pytest.raises(InputError, match=r"jobs.txt: the jobs file is not UTF-8 text .*save it as \"CSV UTF-8\""):
        read_jobs(path, BASE)
    for data, line in (("portrait\tdriver\toutput\nRené.png\td.mp4\to.mp4\n".encode("utf-16-le"), 1),  # (no BOM)
                       (b"portrait,driver,output\r\na.png,d.mp4,o.mp4\r\nb.png,d.mp4,p\0.mp4\r\n", 3)):
        path.write_bytes(data)  # (was "unexpected error: ValueError: embedded null byte" once its path was used)
        with pytest.raises(InputError, match=rf"jobs.txt:{line}: a NUL character \(byte 0\), which no text has"):
            read_jobs(path, BASE)


def test_a_workbook_or_standard_input_is_named_as_such(tmp_path: Path) -> None:
    """An .xlsx/.ods (a zip) or .xls workbook given as the jobs file, and --jobs -, are named as what they are (were
    "not UTF-8 text (... can't decode byte ...)" and "-: jobs file not found")."""
    for name, head in (("jobs.xlsx", b"PK\x03\x04\x14\x00\x06\x00"), ("jobs.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1")):
        (tmp_path / name).write_bytes(head + bytes(range(256)))
        with pytest.raises(InputError, match=rf"{name}: a spreadsheet's workbook, not a CSV file; save the sheet as "
                                             "\"CSV UTF-8\""):
            read_jobs(tmp_path / name, BASE)
    with pytest.raises(InputError, match="--jobs -: a jobs file is read from its path, not standard input"):
        read_jobs(Path("-"), BASE)


def test_an_unreadable_jobs_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="jobs file not found"):
        read_jobs(tmp_path / "missing.csv", BASE)
    with pytest.raises(InputError, match="names a CSV file, and this is a folder"):
        read_jobs(tmp_path, BASE)
    with pytest.raises(InputError, match="the jobs file is not UTF-8 text"):
        read_jobs(_jobs_file(tmp_path, "portrait,driver,output\n\xe9,d,o.mp4\n", encoding="latin-1"), BASE)


def test_a_quoted_cell_over_lines_is_one_cell(tmp_path: Path) -> None:
    """A spreadsheet saves a cell with a line break in double quotes over two lines: the row is one row, named by
    the line it begins on, the cell without its trailing break (was split into two rows, "1 cell(s), the header has
    3"); a break inside a path's text, or a double quote left open, is named with the lines it spans."""
    path = _jobs_file(tmp_path, 'portrait,driver,output\r\n\r\n"a.png\r\n",d.mp4,o.mp4\r\n# note, "half\r\n'
                                'b.png,d.mp4,"p.mp4\n"\n')
    jobs = read_jobs(path, BASE)
    assert [(j.portrait, j.output, j.where) for j in jobs] == [(tmp_path / "a.png", tmp_path / "o.mp4", f"{path}:3"),
                                                               (tmp_path / "b.png", tmp_path / "p.mp4", f"{path}:6")]
    for text, message in (('portrait,driver,output\n"a\nb.png",d.mp4,o.mp4\n', r"jobs.csv:2: a cell in double quotes "
                           r"goes on to line 3 \('a\\nb.png'\): a line break inside a cell is no path"),
                          ('portrait,driver,output\n"a.png,d.mp4,o.mp4\nb.png,d.mp4,p.mp4\n',
                           r"jobs.csv:2: a cell in double quotes goes on to line 3 .*close the cell's double quote")):
        with pytest.raises(InputError, match=message):
            read_jobs(_jobs_file(tmp_path, text), BASE)


@pytest.mark.parametrize("separator", [";", "\t", ","], ids=["semicolons", "tabs", "commas"])
def test_an_excel_sep_line_names_the_separator(tmp_path: Path, separator: str) -> None:
    """Excel writes and reads a first line ``sep=;`` naming the separator: taken so, not as the header row (was
    "unknown column(s) 'sep=;'"), and the rows keep their line numbers in messages."""
    head = separator.join(["portrait", "driver", "output", "guidance"])
    text = f"sep={separator}\r\n{head}\r\n" + separator.join(["a.png", "d.mp4", "o.mp4", "3,5" if separator != ","
                                                              else "3.5"]) + "\r\n"
    (job,) = read_jobs(_jobs_file(tmp_path, text), BASE)
    assert (job.portrait, job.output, job.config) == (tmp_path / "a.png", tmp_path / "o.mp4", {"guidance": 3.5})
    bad = f"sep={separator}\n{head}\n" + separator.join(["a.png", "d.mp4", "o.mp4", "lots"]) + "\n"
    with pytest.raises(InputError, match=r"jobs\.csv:3: "):
        read_jobs(_jobs_file(tmp_path, bad), BASE)


def test_a_missing_input_named_with_windows_backslashes_says_so(tmp_path: Path) -> None:
    """A jobs file written on Windows names folders with backslashes, a letter of a name here: the missing file's
    message says which path with slashes exists (was "clips\\a.png: portrait file does not exist" alone)."""
    from megactor_rt.media import require_file

    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"portrait file does not exist \(its folders are separated by backslashes, "
                                         r"as on Windows; write .*clips/a\.png, which exists\)"):
        require_file(tmp_path / "clips\\a.png", "portrait")
    with pytest.raises(InputError, match=r"portrait file does not exist$"):  # (no such file either way: no hint)
        require_file(tmp_path / "clips\\b.png", "portrait")
