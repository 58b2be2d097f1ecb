"""The on-disk portrait store (``--cache-dir``, ``PortraitCache(disk_dir=...)``) under damage and pressure: damaged
bytes, files of older versions, a full disk, the byte budget's order."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from media_fixtures import PORTRAIT, write_face_driver
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megactor_rt.config import AnimateConfig
from megactor_rt.progress import progress_enabled, set_progress_enabled
from megactor_rt.runtime.animator import Animator
from megactor_rt.runtime.cache import PortraitCache

CFG = AnimateConfig(steps=2, window=4, overlap=2, max_frames=4)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def _quiet() -> Iterator[None]:
    was = progress_enabled()
    set_progress_enabled(False)
    yield
    set_progress_enabled(was)


@pytest.fixture(scope="module")
def anim() -> Animator:
    return Animator.demo(seed=0, device="cpu", config=CFG)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_face_driver(tmp_path_factory.mktemp("store") / "driver.mp4", n=4, fps=25)


def _flip(path: Path, tensor: str, nbytes: int = 64) -> None:
    """Invert the first ``nbytes`` bytes of ``tensor``'s data in a safetensors file (its header stays valid), as a
    bad sector or a bit flip would."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = 8 + n + json.loads(raw[8:8 + n])[tensor]["data_offsets"][0]
    raw[start:start + nbytes] = bytes(b ^ 0xFF for b in raw[start:start + nbytes])
    path.write_bytes(bytes(raw))


def test_a_store_file_with_damaged_bytes_is_recomputed_and_rewritten(anim: Animator, driver: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Bytes damaged inside a tensor of a store file (the header intact) are found by the checksums saved with it:
    the portrait is computed again (same frames as the first run), with a warning naming the file, and the file is
    rewritten (was: the damaged latents were read as the portrait's state, silently, in every later run)."""
    store = tmp_path / "portraits"
    first = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    frames1 = list(first.animate(first.prepare(PORTRAIT), driver))
    (path,) = store.glob("*.safetensors")
    _flip(path, "ref_latent")
    second = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    with caplog.at_level("WARNING", logger="megactor_rt.runtime.cache"):
        state = second.prepare(PORTRAIT)
    assert second.cache.disk_hits == 0
    assert str(path) in caplog.text and "damaged" in caplog.text and "ref_latent" in caplog.text
    frames2 = list(second.animate(state, driver))
    assert all(np.array_equal(a, b) for a, b in zip(frames1, frames2, strict=True))
    third = PortraitCache(disk_dir=store)
    assert third.get(state.key) is not None and third.disk_hits == 1  # rewritten whole


def test_a_store_file_without_checksums_is_read_and_rewritten_with_them(anim: Animator, driver: Path,
                                                                        tmp_path: Path) -> None:
    """A file an older version wrote (no checksums) is still read, and rewritten with checksums after its run."""
    store = tmp_path / "portraits"
    first = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    list(first.animate(first.prepare(PORTRAIT), driver))
    (path,) = store.glob("*.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert "sha256" in meta
    save_file(load_file(str(path)), str(path), metadata={k: v for k, v in meta.items() if k != "sha256"})
    second = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    state = second.prepare(PORTRAIT)
    assert second.cache.disk_hits == 1
    list(second.animate(state, driver))
    with safe_open(str(path), "pt") as f:
        assert "sha256" in f.metadata()


def test_a_checksum_names_the_tensor_it_was_made_of(anim: Animator, tmp_path: Path) -> None:
    """Each tensor's checksum covers its dtype and shape too: a tensor saved under another's name is damage."""
    store = tmp_path / "portraits"
    cache = PortraitCache(disk_dir=store)
    base = anim.prepare(PORTRAIT)
    cache.save(replace(base, key="swapped"))
    path = cache._path("swapped")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["film_scale"], tensors["film_shift"] = tensors["film_shift"], tensors["film_scale"]
    save_file(tensors, str(path), metadata=meta)
    assert PortraitCache(disk_dir=store).get("swapped") is None
