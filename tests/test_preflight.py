"""``preflight`` (the API's and ``--dry-run``'s check of a run before its networks): the result's path is checked
as the run checks it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from media_fixtures import DRIVER, PORTRAIT

from megactor_rt.config import AnimateConfig
from megactor_rt.errors import InputError
from megactor_rt.runtime.preflight import preflight

CONFIG = AnimateConfig(steps=1, window=4, overlap=2, max_frames=3)


@pytest.mark.parametrize(("output", "says"), [
    ("missing/out.mp4", "does not exist"),
    ("out.avi", "unsupported output format '.avi'"),
    ("driver.mp4", "overwrite"),
    ("portrait.png", "a .png result is a folder of numbered frames"),
])
def test_preflight_refuses_the_results_the_run_refuses(tmp_path: Path, output: str, says: str) -> None:
    """A result in a missing folder, of a format no writer has, or over one of the inputs: refused as the run
    refuses it (preflight said ok to all of them)."""
    portrait, driver = shutil.copy(PORTRAIT, tmp_path / "portrait.png"), shutil.copy(DRIVER, tmp_path / "driver.mp4")
    with pytest.raises(InputError, match=says):
        preflight(portrait, driver, tmp_path / output, image_size=128, config=CONFIG)
    found = preflight(portrait, driver, tmp_path / "out.mp4", image_size=128, config=CONFIG)
    assert found.plan.num_frames == 3
