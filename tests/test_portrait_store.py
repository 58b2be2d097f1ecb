"""The on-disk portrait store (``--cache-dir``, ``PortraitCache(disk_dir=...)``) under damage and pressure: damaged
bytes, files of older versions, a full disk, the byte budget's order."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from media_fixtures import PORTRAIT, write_face_driver, write_leftovers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megactor_rt.config import AnimateConfig
from megactor_rt.runtime.animator import Animator
from megactor_rt.runtime.cache import CHECKSUM_KEY, PortraitCache

CFG = AnimateConfig(steps=2, window=4, overlap=2, max_frames=4)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_progress_bars")


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
    assert CHECKSUM_KEY in meta
    save_file(load_file(str(path)), str(path), metadata={k: v for k, v in meta.items() if k != CHECKSUM_KEY})
    second = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    state = second.prepare(PORTRAIT)
    assert second.cache.disk_hits == 1
    list(second.animate(state, driver))
    with safe_open(str(path), "pt") as f:
        assert CHECKSUM_KEY in f.metadata()


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


def _disk_of(monkeypatch: pytest.MonkeyPatch, store: Path, capacity: int) -> None:
    """Make the store's disk look ``capacity`` bytes large, holding nothing but the store's files."""
    import shutil

    from megactor_rt.runtime import cache as cache_module

    def usage(path: object) -> shutil._ntuple_diskusage:  # type: ignore[name-defined]
        used = sum(p.stat().st_size for p in store.iterdir())
        return shutil._ntuple_diskusage(capacity, used, max(capacity - used, 0))  # type: ignore[attr-defined]

    monkeypatch.setattr(cache_module.shutil, "disk_usage", usage)


def test_a_store_on_a_full_disk_removes_its_least_recently_used_files_to_make_room(
        anim: Animator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget larger than the disk's free space (the default 20 GiB on a small disk): once the disk is full the
    least recently used files go to make room for the new one, as over the budget (was: every later portrait failed
    with 'No space left on device' and the store kept its old files for ever)."""
    import os

    store = tmp_path / "portraits"
    base = anim.prepare(PORTRAIT)
    cache = PortraitCache(disk_dir=store)
    cache.save(replace(base, key="old"))
    size = cache._path("old").stat().st_size
    cache.save(replace(base, key="used"))
    os.utime(cache._path("old"), ns=(1, 1))
    os.utime(cache._path("used"), ns=(2, 2))
    _disk_of(monkeypatch, store, capacity=2 * size + size // 2)  # room for two files
    assert cache.persist(replace(base, key="new"))
    assert sorted(p.name for p in store.iterdir()) == sorted(cache._path(k).name for k in ("used", "new"))
    assert PortraitCache(disk_dir=store).get("new") is not None


def test_a_disk_too_small_for_one_file_removes_nothing(anim: Animator, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Where even an empty store would not hold the new file, no file is removed for nothing: a warning, and the
    portrait is not stored."""
    store = tmp_path / "portraits"
    base = anim.prepare(PORTRAIT)
    cache = PortraitCache(disk_dir=store)
    cache.save(replace(base, key="kept"))
    size = cache._path("kept").stat().st_size
    _disk_of(monkeypatch, store, capacity=size + size // 2)
    with caplog.at_level("WARNING", logger="megactor_rt.runtime.cache"):
        assert not cache.persist(replace(base, key="big", banks={999: [torch.zeros(size // 2)]}))  # 2x the file
    assert "not stored" in caplog.text and "MiB free" in caplog.text
    assert [p.name for p in store.iterdir()] == [cache._path("kept").name]


def test_the_room_asked_for_is_at_least_the_file_written(anim: Animator, tmp_path: Path) -> None:
    from megactor_rt.runtime.cache import _checksums, _file_bytes, _snapshot

    state = replace(anim.prepare(PORTRAIT), key="sized")
    _, tensors, meta = _snapshot(state)
    meta[CHECKSUM_KEY] = json.dumps(_checksums(tensors))
    cache = PortraitCache(disk_dir=tmp_path)
    cache.save(state)
    assert _file_bytes(tensors, meta) >= cache._path("sized").stat().st_size


def test_a_portrait_used_from_memory_is_recently_used_on_disk_too(anim: Animator, tmp_path: Path) -> None:
    """A batch using one portrait for hours (from memory after its first run) while writing others: its file counts as
    used at each use and stays when the store trims (was: its file kept the time of its writing and went first)."""
    import os

    store = tmp_path / "portraits"
    base = anim.prepare(PORTRAIT)
    cache = PortraitCache(disk_dir=store)
    cache.save(replace(base, key="other"))
    size = cache._path("other").stat().st_size
    cache.max_disk_bytes = 2 * size + size // 2  # room for two files
    hot = replace(base, key="hot")
    cache.put(hot)
    assert cache.persist(hot)
    os.utime(cache._path("hot"), ns=(1, 1))  # written long ago ...
    os.utime(cache._path("other"), ns=(2, 2))
    assert cache.get("hot") is hot  # ... and used now, from memory
    cache.save(replace(base, key="new"))
    assert sorted(p.name for p in store.iterdir()) == sorted(cache._path(k).name for k in ("hot", "new"))


def test_a_file_removed_by_another_process_is_written_again(anim: Animator, tmp_path: Path) -> None:
    """Another process trimming a shared store removed the file of a portrait this one holds in memory: the next run
    with it writes it again (was: the cache still took it for stored, and the next process computed it again)."""
    cache = PortraitCache(disk_dir=tmp_path / "portraits")
    hot = replace(anim.prepare(PORTRAIT), key="hot")
    cache.put(hot)
    assert cache.persist(hot) and not cache.persist(hot)
    cache._path("hot").unlink()  # the other process's trim
    assert cache.get("hot") is hot
    assert cache.persist(hot) and cache._path("hot").is_file()


def test_a_write_interrupted_leaves_neither_a_half_file_nor_its_temporary(anim: Animator, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while a state file is written: nothing under the final name, and the temporary file is removed."""
    from megactor_rt.runtime import cache as cache_module

    def half_then_interrupted(tensors: object, path: str, metadata: object = None) -> None:
        Path(path).write_bytes(b"half a state")
        raise KeyboardInterrupt

    store = tmp_path / "portraits"
    cache = PortraitCache(disk_dir=store)
    monkeypatch.setattr(cache_module, "save_file", half_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.persist(replace(anim.prepare(PORTRAIT), key="cut"))
    assert list(store.iterdir()) == []


def test_the_budget_removes_least_recently_used_first_not_the_largest(anim: Animator, tmp_path: Path) -> None:
    """Over its budget the store removes files least recently used first: a large file used since goes, and so does
    every file older than it, though a small old one would still fit (was kept over the larger, newer one)."""
    import os

    store = tmp_path / "portraits"
    base = anim.prepare(PORTRAIT)
    probe = PortraitCache(disk_dir=store)
    probe.save(replace(base, key="old-small"))
    size = probe._path("old-small").stat().st_size
    probe.save(replace(base, key="big", banks={999: [torch.zeros(size // 2)]}))  # about 3x the small file
    os.utime(probe._path("old-small"), ns=(1, 1))
    os.utime(probe._path("big"), ns=(2, 2))
    cache = PortraitCache(disk_dir=store, max_disk_bytes=2 * size + size // 2)  # the new file and the small one fit
    cache.save(replace(base, key="new"))
    assert [p.name for p in store.iterdir()] == [cache._path("new").name]


def test_a_second_process_with_fewer_banks_keeps_the_file_of_more(anim: Animator, driver: Path,
                                                                  tmp_path: Path) -> None:
    """Two processes prepare one portrait at once (neither finds a file), one runs 4 steps and the other 2 (banks of
    timesteps the 4-step file holds): the one finishing last keeps the 4-step file (was: its rename replaced it,
    and the next 4-step run computed two banks again). A run whose banks the file lacks still writes its own."""
    store = tmp_path / "portraits"
    long_run = Animator(anim.sub, replace(CFG, steps=4), PortraitCache(disk_dir=store))
    short_run = Animator(anim.sub, CFG, PortraitCache(disk_dir=store))
    long_state, short_state = long_run.prepare(PORTRAIT), short_run.prepare(PORTRAIT)
    list(long_run.animate(long_state, driver))
    (path,) = store.glob("*.safetensors")

    def banks() -> set[int]:
        with safe_open(str(path), "pt") as f:
            return set(json.loads(f.metadata()["banks"]))
    four = banks()
    assert len(four) == 4
    list(short_run.animate(short_state, driver))
    assert set(short_state.banks) < four and banks() == four
    assert not short_run.cache.persist(short_state)  # recorded as stored: not looked at again
    later = Animator(anim.sub, replace(CFG, steps=4), PortraitCache(disk_dir=store))
    state = later.prepare(PORTRAIT)
    assert later.cache.disk_hits == 1 and set(state.banks) == four
    other = Animator(anim.sub, replace(CFG, steps=3), PortraitCache(disk_dir=store))
    other_state = other.prepare(PORTRAIT)
    list(other.animate(other_state, driver))
    assert banks() == set(other_state.banks) and banks() - four


def test_safetensors_own_temporary_file_of_a_killed_writer_goes_after_an_hour(anim: Animator, tmp_path: Path) -> None:
    """safetensors' save_file writes into its own ``.tmpXXXXXX`` beside the target and renames it: a process killed
    meanwhile leaves it in the store, as large as a state (hundreds of MB), outside the budget. A later write
    removes it once an hour old (was: kept for ever); a younger one may be another process's write and stays."""

    store = tmp_path / "portraits"
    store.mkdir()
    old, young = store / ".tmpAb3xYz", store / ".tmpQ9w8e7"
    write_leftovers(b"part of a state", [old], [young])
    cache = PortraitCache(disk_dir=store)
    assert cache.persist(replace(anim.prepare(PORTRAIT), key="next"))
    assert not old.exists() and young.exists()


def test_a_disk_filled_by_killed_writers_leftovers_removes_them_before_any_portrait(
        anim: Animator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk is full because a writer killed hours ago left its temporary file (safetensors' own, as large as a
    state): making room removes that leftover and keeps the stored portrait (was: the portrait's file went first,
    the leftover only after the write)."""

    store = tmp_path / "portraits"
    base = anim.prepare(PORTRAIT)
    cache = PortraitCache(disk_dir=store)
    cache.save(replace(base, key="kept"))
    size = cache._path("kept").stat().st_size
    write_leftovers(bytes(size), [store / ".tmpK1ll3d"])
    _disk_of(monkeypatch, store, capacity=2 * size + size // 2)  # the store's file and the leftover fill it
    assert cache.persist(replace(base, key="new"))
    assert sorted(p.name for p in store.iterdir()) == sorted(cache._path(k).name for k in ("kept", "new"))


def test_a_folder_named_like_a_store_file_does_not_stop_the_budget(anim: Animator, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A folder in the store named like a state file (``x.safetensors/``, made by hand or by a tool): the store still
    keeps to its budget and each write says it stored its portrait (was: the trim tried to remove the folder as a
    file, every write warned 'the portrait is not stored' though it was, and no older file was ever removed)."""
    import os

    store = tmp_path / "portraits"
    store.mkdir()
    odd = store / "odd.safetensors"
    odd.mkdir()
    os.utime(odd, ns=(1, 1))  # the least recently used entry: the first the budget looks at
    base = anim.prepare(PORTRAIT)
    cache = PortraitCache(disk_dir=store, max_disk_bytes=1)  # room for the newest file alone
    with caplog.at_level("WARNING", logger="megactor_rt.runtime.cache"):
        for key in ("a", "b"):
            assert cache.persist(replace(base, key=key))
    assert "not stored" not in caplog.text
    assert sorted(p.name for p in store.iterdir()) == sorted([odd.name, cache._path("b").name])


def test_a_store_file_that_cannot_be_removed_stays_and_the_trim_goes_on(anim: Animator, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A store shared by several users in a folder with the sticky bit: another user's file cannot be removed. It
    stays, named in a warning, and the older files still go (was: the trim stopped at it, so the store outgrew its
    budget, and the write that had stored its portrait warned 'the portrait is not stored')."""
    import os

    store = tmp_path / "portraits"
    base = anim.prepare(PORTRAIT)
    cache = PortraitCache(disk_dir=store)
    for key in ("old", "theirs"):
        cache.save(replace(base, key=key))
    os.utime(cache._path("old"), ns=(1, 1))
    os.utime(cache._path("theirs"), ns=(2, 2))
    theirs, unlink = cache._path("theirs"), Path.unlink

    def refused(self: Path, missing_ok: bool = False) -> None:
        if self == theirs:
            raise PermissionError(1, "Operation not permitted", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    cache.max_disk_bytes = 1  # room for the newest file alone
    with caplog.at_level("WARNING", logger="megactor_rt.runtime.cache"):
        assert cache.persist(replace(base, key="new"))
    assert "not stored" not in caplog.text and str(theirs) in caplog.text and "cannot remove" in caplog.text
    assert sorted(p.name for p in store.iterdir()) == sorted(cache._path(k).name for k in ("theirs", "new"))


def test_a_store_folder_linked_to_nothing_is_named_as_such(anim: Animator, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """``--cache-dir`` a symbolic link to a folder that is not there (a drive not mounted): the portrait is not
    stored, and the warning says the link leads nowhere (was: 'File exists: <store>'); nothing is made at the link's
    target."""
    store = tmp_path / "portraits"
    target = tmp_path / "unmounted" / "cache"
    store.symlink_to(target)
    cache = PortraitCache(disk_dir=store)
    with caplog.at_level("WARNING", logger="megactor_rt.runtime.cache"):
        assert not cache.persist(replace(anim.prepare(PORTRAIT), key="linked"))
    assert "not stored" in caplog.text and "File exists" not in caplog.text
    assert f"{store} is a symbolic link to {target}, which does not exist" in caplog.text
    assert not target.parent.exists()
