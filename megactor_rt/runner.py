"""The runner interface shared by every backend (torch, onnxruntime, tensorrt).

A runner executes one submodel graph (``temporal_unet``, ``reference_net``, ...). Inputs and outputs are
dicts of torch tensors keyed by the export spec's tensor names. Runners are context managers: ``activate``
allocates (sessions, execution contexts), ``deactivate`` frees. The public ``infer`` validates the feed and
accumulates timing; subclasses implement ``infer_impl`` (Polygraphy's runner pattern).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch

from megactor_rt.errors import InputError


class Runner(ABC):
    """Executes one submodel. Subclasses implement ``activate_impl``/``infer_impl``/``deactivate_impl``."""

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str]) -> None:
        self.name = name
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.is_active = False
        self.calls = 0
        self.total_seconds = 0.0

    def identity(self) -> str:
        """What computes this runner's outputs (backend and the graph it runs), for cache keys: two runners
        with one identity give the same numbers for the same inputs."""
        return type(self).__name__

    # -- lifecycle -----------------------------------------------------------------------------------
    def activate(self) -> Runner:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def activate_impl(self) -> None:  # noqa: B027 - optional hook
        """Allocate sessions/contexts. Default: nothing."""

    def deactivate_impl(self) -> None:  # noqa: B027 - optional hook
        """Free what ``activate_impl`` allocated. Default: nothing."""

    # -- inference -----------------------------------------------------------------------------------
    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the submodel.

        Args:
            feed: input tensors keyed by the spec's input names (extra names are an error).

        Returns:
            Output tensors keyed by the spec's output names.

        Raises:
            InputError: a required input is missing or an unknown one was given.
        """
        missing = [n for n in self.input_names if n not in feed]
        extra = [n for n in feed if n not in self.input_names]
        if missing or extra:
            raise InputError(f"runner '{self.name}': missing inputs {missing}, unexpected inputs {extra}")
        if not self.is_active:
            self.activate()
        start = time.perf_counter()
        out = self.infer_impl(feed)
        self.total_seconds += time.perf_counter() - start
        self.calls += 1
        return out

    @abstractmethod
    def infer_impl(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Backend-specific execution."""

    def max_size(self, name: str, axis: int, where: Mapping[int, int] | None = None) -> int | None:
        """The largest size axis ``axis`` of input ``name`` may have in a call (None: no limit known here);
        ``where`` (axis -> size of the same input): in a call whose input has those sizes (0: no such call)."""
        return None
