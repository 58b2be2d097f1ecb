"""The weights folders' layout (the released one, the converted one), checked without importing torch (the CLI
asks before loading the runtime, which takes seconds to import)."""

from __future__ import annotations

import os
from pathlib import Path

from megactor_rt.errors import WeightsError
from megactor_rt.files import nearest_folder

CONFIG_NAME = "config.json"  # its presence marks a complete converted folder (written last)
DOWNLOADING = ".megactor-rt-download-unfinished"  # in `download --out`'s folder while its files come


def check_converted_folder(weights_dir: str | Path) -> Path:
    """``weights_dir`` as a ``Path`` if it looks like a converted weights folder (a folder with ``config.json``);
    otherwise a ``WeightsError`` that says what it is instead and what to run."""
    weights_dir = Path(weights_dir)
    if weights_dir.exists() and not weights_dir.is_dir():
        raise WeightsError(f"{weights_dir}: --weights names the converted weights folder, and this is a file")
    if not weights_dir.is_dir():
        raise WeightsError(f"weights directory {weights_dir} does not exist (run `megactor-rt convert-weights` "
                           f"or `megactor-rt download` first)")
    if (weights_dir / CONFIG_NAME).is_file():
        return weights_dir
    released = next((d for d in (weights_dir, weights_dir / "weights") if any(d.glob("checkpoint-steps*.ckpt"))),
                    None)  # the released folder, or the download's root
    if released is not None:
        raise WeightsError(f"{weights_dir} holds the released weights, not converted ones: convert them once with "
                           f"`megactor-rt convert-weights {released} OUT` and pass OUT as --weights")
    raise WeightsError(f"missing {weights_dir / CONFIG_NAME}: {weights_dir} is not a converted weights folder (or its "
                       "conversion did not finish): run `megactor-rt convert-weights` into it")


def check_destination(src: str | Path, dst: str | Path) -> None:
    """Refuse a ``convert-weights`` destination that would overwrite what is not a conversion: the release folder
    itself or a folder inside it (its ``config.json`` files are the release's), or a folder holding other files
    than an earlier conversion's; a file (it, or one above it); a symbolic link to nothing (it, or a folder above
    it).

    Raises:
        WeightsError: naming the destination and what it holds.
    """
    # a symbolic link to nothing, the destination or a folder above it (mkdir said "File exists" of it, after
    # reading every file)
    dangling = next((p for p in (Path(dst), *Path(dst).parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:
        which = "" if dangling == Path(dst) else f"{dangling} is "
        raise WeightsError(f"{dst}: {which}a symbolic link to {os.readlink(dangling)}, which does not exist: create "
                           "that folder first, or choose another")
    given, src, dst = dst, Path(src).resolve(), Path(dst).resolve()
    existing = nearest_folder(dst)  # (a file there: was named after reading every file)
    if not existing.is_dir():
        raise WeightsError(f"{given}: the converted weights go to a folder, and "
                           f"{'this' if existing == dst else existing} is a file")
    if dst == src or dst.is_relative_to(src):
        raise WeightsError(f"{dst}: the converted weights would be written into the released folder {src}, over "
                           "its own files: choose a folder outside it")
    if not dst.is_dir():
        return
    import json

    config = dst / CONFIG_NAME
    try:
        ours = config.is_file() and "format_version" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        ours = False
    others = sorted(p.name for p in dst.iterdir() if not p.name.startswith("."))  # (hidden: temporary files)
    if others and not ours:
        raise WeightsError(f"{dst}: the folder holds other files than converted weights ({', '.join(others[:5])}"
                           f"{', ...' if len(others) > 5 else ''}), which the conversion would overwrite: choose a new "
                           "or empty folder")


def check_release_folder(src: str | Path) -> Path:
    """``src`` as a ``Path`` if it is a folder (the released ``weights/`` folder ``convert-weights`` reads);
    otherwise a ``WeightsError`` saying what it is."""
    src = Path(src)
    if not src.is_dir():
        raise WeightsError(f"weights folder {src} {'is a file, not a folder' if src.exists() else 'does not exist'}")
    unfinished = next((d for d in (src, src.parent) if (d / DOWNLOADING).exists()), None)
    if unfinished is not None:
        raise WeightsError(f"{src}: the download into {unfinished} did not finish (some files are missing or cut "
                           f"off): run `megactor-rt download --out {unfinished}` again, which goes on with it")
    return src
