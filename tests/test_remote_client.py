"""The client of ``megactor-rt serve`` (:class:`~megactor_rt.client.Client`) as a user of its Python API and of
``animate --server`` meets it: addresses it cannot take are named, and a result is written where it was checked."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from media_fixtures import PORTRAIT
from test_client_hostile import VIDEO, _Fake, answer, fake  # noqa: F401 - the stand-in server and its fixture

from megactor_rt.client import Client, Unreachable
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


def test_a_connection_reset_is_taken_for_https_only_before_the_server_answered(
        fake: tuple[Client, dict[str, Any]], tmp_path: Path) -> None:  # noqa: F811
    """A connection closed unanswered by a server never reached over http: "(an https:// server?)" (a TLS server
    drops plain http so); by one that answered http before (killed or restarting while its job is followed), it is
    an outage, not said to be https (every reset of a batch's server killed mid-run was so)."""
    client, _ = fake
    client.health()
    listener = socket.create_server(("127.0.0.1", 0))

    def close_each() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                conn.recv(1 << 16)
                conn.close()

    threading.Thread(target=close_each, daemon=True).start()
    try:
        client.port = listener.getsockname()[1]
        with pytest.raises(Unreachable, match="cannot reach the server") as caught:
            client.wait("0123456789ab")
        assert "https" not in str(caught.value)
        with pytest.raises(Unreachable, match=r"\(an https:// server\?\)"):
            Client(f"http://127.0.0.1:{client.port}").health()
    finally:
        listener.close()


def test_files_named_as_text_are_sent(fake: tuple[Client, dict[str, Any]], tmp_path: Path) -> None:  # noqa: F811
    """``files={"mask": "mask.png"}`` (text, as the portrait and driver may be given: an AttributeError before, the
    file name asked of a str) is sent as its file."""
    client, _ = fake
    client.animate(str(PORTRAIT), str(PORTRAIT), tmp_path / "out.mp4", files={"mask": str(PORTRAIT)})
    assert (tmp_path / "out.mp4").read_bytes() == VIDEO


def test_a_proxys_refusal_of_health_is_an_outage(fake: tuple[Client, dict[str, Any]], tmp_path: Path) -> None:  # noqa: F811
    """A proxy's 502 page or a 503/504 for GET /health (the server behind it down or restarting) is an outage
    (Unreachable: `--server A B` leaves that server out and makes the batch on the others), as while a job is
    followed; it was "is this address a megactor-rt server?", an error that ended the whole batch."""
    client, _ = fake
    for refusal in (answer(502, b"<html>502 Bad Gateway</html>"), answer(503, {"error": "busy"}),
                    answer(504, b"")):
        _Fake.script["GET /health"] = [refusal]
        with pytest.raises(Unreachable, match=rf"^{client.url}: GET /health answered {refusal[0]}"):
            client.health()
    _Fake.script["GET /health"] = [answer(404, b"<html>not found</html>")]  # (no megactor-rt server there)
    with pytest.raises(InputError, match="is this address a megactor-rt server") as caught:
        client.health()
    assert not isinstance(caught.value, Unreachable)
