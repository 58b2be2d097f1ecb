"""Runtime: the public Animator API, backend registry, portrait cache, denoising loop, stream pipeline.

``from megactor_rt.runtime import Animator`` works (imported on first use, so importing this package stays
light); the class lives in :mod:`megactor_rt.runtime.animator`.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (type checkers see the class; at run time it is imported on first use, below)
    from megactor_rt.runtime.animator import Animator

__all__ = ["Animator"]


def __getattr__(name: str) -> Any:
    if name == "Animator":
        from megactor_rt.runtime.animator import Animator

        return Animator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
