"""The client of ``megactor-rt serve`` (:class:`~megactor_rt.client.Client`) as a user of its Python API and of
``animate --server`` meets it: addresses it cannot take are named, and a result is written where it was checked."""

from __future__ import annotations

import re

import pytest

from megactor_rt.client import Client
from megactor_rt.errors import InputError


@pytest.mark.parametrize("url", ["http://[::1:8450", "http://[gpu-box", "http://gpu-box:0", "gpu-box:0"])
def test_an_address_it_cannot_take_is_named(url: str) -> None:
    """An address that cannot be parsed (an IPv6 address without its closing bracket: urlsplit's ValueError, an
    "unexpected error" before) or with port 0 (taken for no port: the request went to port 80) is an error naming
    it, as `--server` takes it."""
    with pytest.raises(InputError, match=f"^{re.escape(url)}: --server"):
        Client(url)

