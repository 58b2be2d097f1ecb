"""The weights folders' layout (the released one, the converted one), checked without importing torch (the CLI
asks before loading the runtime, which takes seconds to import)."""

from __future__ import annotations

from pathlib import Path

from megactor_rt.errors import WeightsError

CONFIG_NAME = "config.json"  # its presence marks a complete converted folder (written last)


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


def check_release_folder(src: str | Path) -> Path:
    """``src`` as a ``Path`` if it is a folder (the released ``weights/`` folder ``convert-weights`` reads);
    otherwise a ``WeightsError`` saying what it is."""
    src = Path(src)
    if not src.is_dir():
        raise WeightsError(f"weights folder {src} {'is a file, not a folder' if src.exists() else 'does not exist'}")
    return src
