"""Web addresses of inputs (:mod:`megactor_rt.remote`) as users paste them: with spaces and letters beyond ASCII
(as a browser shows an address) they are fetched as a browser fetches them; an address no request can be made to
is named at once, not taken for a download that broke off nor for an unexpected error."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_remote import _Short, server  # noqa: F401 - the local file server and its fixture

from megactor_rt import remote
from megactor_rt.errors import InputError
from megactor_rt.remote import download


def test_an_address_with_spaces_and_accents_is_fetched_as_a_browser_does(server: tuple[str, Path],  # noqa: F811
                                                                         tmp_path: Path) -> None:
    """``.../Café 1.mp4`` (UnicodeEncodeError: an unexpected error; a space: InvalidURL taken for a download that
    broke off, tried 3 times) is asked for as ``/Caf%C3%A9%201.mp4``, its escapes kept, under its own name."""
    url, served = server
    (served / "Café 1.mp4").write_bytes(b"video bytes")
    _Short.requests.clear()
    for address in (f"{url}/Café 1.mp4?v=1#t=3", f"{url}/Caf%C3%A9%201.mp4"):
        got = download(address, tmp_path)
        assert got == tmp_path / "Café 1.mp4" and got.read_bytes() == b"video bytes"
        got.unlink()
    assert _Short.requests == ["/Caf%C3%A9%201.mp4?v=1", "/Caf%C3%A9%201.mp4"]


@pytest.mark.parametrize("address", ["http://[::1/meme.mp4", "http://127.0.0.1:99999/meme.mp4",
                                     "http://gpu box/meme.mp4"])
def test_an_address_no_request_can_be_made_to_is_named_at_once(address: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An address urlsplit cannot take (an unexpected ValueError), a port over 65535 ("connection refused") and a
    host with a space (InvalidURL: three tries) are an InputError naming the address, without a try."""
    waits: list[float] = []
    monkeypatch.setattr(remote.time, "sleep", waits.append)
    began = time.monotonic()
    with pytest.raises(InputError, match=rf"^{address.replace('[', '.')}: not a web address that can be downloaded"):
        download(address, tmp_path)
    assert waits == [] and time.monotonic() - began < 5 and list(tmp_path.iterdir()) == []
