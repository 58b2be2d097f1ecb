"""Small stand-ins shared by the kernel dispatch tests."""

from __future__ import annotations


class PastTheSwitch(Exception):
    """Raised by :class:`ClaimsCuda` once a check asks it anything beyond ``is_cuda``."""


class ClaimsCuda:
    """A stand-in for a CUDA tensor on a machine without one: ``is_cuda`` is True and any other question raises
    :class:`PastTheSwitch`, so a test sees whether a dispatch check stopped before its next question."""

    is_cuda = True

    def __getattr__(self, name: str) -> None:
        raise PastTheSwitch(name)
