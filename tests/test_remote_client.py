"""The client of ``megactor-rt serve`` (:class:`~megactor_rt.client.Client`) as a user of its Python API and of
``animate --server`` meets it: addresses it cannot take are named, and a result is written where it was checked."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from media_fixtures import PORTRAIT
from test_client_hostile import VIDEO, _Fake, fake  # noqa: F401 - the stand-in server and its fixture

from megactor_rt.client import Client
from megactor_rt.errors import InputError


@pytest.mark.parametrize("url", ["http://[::1:8450", "http://[gpu-box", "http://gpu-box:0", "gpu-box:0"])
def test_an_address_it_cannot_take_is_named(url: str) -> None:
    """An address that cannot be parsed (an IPv6 address without its closing bracket: urlsplit's ValueError, an
    "unexpected error" before) or with port 0 (taken for no port: the request went to port 80) is an error naming
    it, as `--server` takes it."""
    with pytest.raises(InputError, match=f"^{re.escape(url)}: --server"):
        Client(url)


def test_a_result_named_from_the_home_folder_is_written_there(fake: tuple[Client, dict[str, Any]],  # noqa: F811
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``output`` written ``~/out.mp4`` is checked in the home folder, and written there (it was checked there and
    then written to a folder named ``~`` here, which is not: the whole run made, then "cannot write the result")."""
    client, _ = fake
    home, here = tmp_path / "home", tmp_path / "here"
    home.mkdir()
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    client.animate(PORTRAIT, PORTRAIT, "~/out.mp4")
    assert (home / "out.mp4").read_bytes() == VIDEO and list(here.iterdir()) == []
    assert _Fake.asked[-1].startswith("DELETE")
