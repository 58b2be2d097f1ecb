"""Weights a user really has: checkpoints in other files and wrappers, folders of other models, conversions killed
midway (tests/test_weights.py covers the released layout and its error paths)."""

from __future__ import annotations

import os
import time

from golden_pack import GoldenPack, pack_dir
from test_weights import write_release

from megactor_rt.weights import convert_release


def _pack() -> GoldenPack:
    return GoldenPack(pack_dir())


def test_safetensors_own_temporary_files_left_by_a_killed_conversion_are_removed(tmp_path):
    """safetensors' save_file writes each network into a temporary ``.tmpXXXXXX`` beside it and renames it: a
    conversion killed meanwhile (SIGKILL, the OOM killer) left it, as large as the network, and later conversions
    into the folder kept it for ever (they removed only their own temporaries). One older than an hour goes; a
    recent one (maybe another conversion's, still writing) stays, as do the user's other hidden files."""
    src = write_release(_pack(), tmp_path / "weights")
    dst = convert_release(src, tmp_path / "converted")
    stale, fresh, other = dst / ".tmpAb3dE9", dst / ".tmpXy12Z4", dst / ".tmp-notes"
    for leftover in (stale, fresh, other):
        leftover.write_bytes(b"half a network")
    old = time.time() - 2 * 3600
    for path in (stale, other):
        os.utime(path, (old, old))
    convert_release(src, dst)
    assert not stale.exists() and fresh.exists() and other.exists()
