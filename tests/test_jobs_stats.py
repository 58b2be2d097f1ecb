"""``--stats`` records of a jobs file's rows (``animate --jobs FILE --stats FILE``)."""

from __future__ import annotations

import json
from pathlib import Path

from megactor_rt.cli import StatsFile
from megactor_rt.config import AnimateConfig
from megactor_rt.jobs import read_jobs


def test_a_rows_overlap_of_the_commands_window_is_recorded(tmp_path: Path) -> None:
    """A row's overlap 16 with --window 24 is a valid run; its record has it with the command's window (was a
    ValueError, "overlap from 0 to window - 1, got window 16", once its result was written: the batch ended there,
    the other rows not made)."""
    command = AnimateConfig(window=24, steps=2)
    path = tmp_path / "jobs.csv"
    path.write_text("portrait,driver,output,overlap,start\na.png,d.mp4,a.mp4,16,0:01\nb.png,d.mp4,b.mp4,,\n")
    jobs = read_jobs(path, command)
    record = StatsFile(tmp_path / "stats.json", "animate", [j.output for j in jobs])
    for job in jobs:
        record.add({"config": command.plain()}, job, error="(stands for a run)")
    runs = json.loads((tmp_path / "stats.json").read_text())["runs"]
    assert [(r.get("config", {}).get("window"), r.get("config", {}).get("overlap"), r.get("config", {}).get("start"))
            for r in runs] == [(24, 16, 1.0), (None, None, None)]
    assert runs[0]["config"] == {**command.plain(), "overlap": 16, "start": 1.0}
