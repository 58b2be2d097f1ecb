"""The run's initial noise, whole or a few frames at a time.

A run's noise is ``torch.randn((1, 4, n, h, w), generator=torch.Generator().manual_seed(seed))`` (CPU generator,
fp32: the same frames for a seed on every device; upstream draws fp16 noise on the GPU, so its exact values
differ: docs/decisions.md, "Random numbers"). The streamed loop (open windows) needs the frames in order and only a few at a
time; holding the whole tensor would cost 64 KiB per frame at 512 px for the whole run. ``FrameNoise`` gives
the same values a frame range at a time: the tensor is channel-major, so it keeps one generator per channel,
each advanced to its channel's first element.

This relies on how torch's CPU generator fills a float tensor of 16 or more elements: one 32-bit draw per
element, then a Box-Muller transform on blocks of 16, so consecutive fills whose sizes are multiples of 16
give the values of one fill of their total size. ``chunked_fill_matches`` checks that on this torch at first
use; where it does not hold (or a frame's size is not a multiple of 16), the whole tensor is drawn once.
"""

from __future__ import annotations

import logging
from functools import cache

import torch

logger = logging.getLogger(__name__)

_BLOCK = 16  # the generator's transform block (elements)
_SKIP_CHUNK = 1 << 20  # elements drawn (and dropped) per call while advancing a generator


@cache
def chunked_fill_matches() -> bool:
    """Whether consecutive fills of multiples of 16 elements reproduce one fill of their total on this torch."""
    shape = (3, 5, 4, 8)  # 480 elements
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(7), device="cpu")
    gen = torch.Generator().manual_seed(7)
    flat = torch.cat([torch.randn(k, generator=gen, device="cpu") for k in (32, 16, 224, 208)])
    return torch.equal(flat, whole.flatten())


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The whole noise tensor (CPU, fp32; see the module's docstring)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), device="cpu")


class FrameNoise:
    """``initial_noise(seed, (1, channels, n, h, w))``, read frame range by frame range, in order (``take``).

    Args:
        seed: the run's seed.
        n: frames.
        channels, h, w: latent channels and size.
    """

    def __init__(self, seed: int, n: int, channels: int, h: int, w: int) -> None:
        self.seed, self.n, self.channels, self.h, self.w = seed, n, channels, h, w
        self.next = 0  # first frame not yet handed out
        self._gens: list[torch.Generator] | None = None
        self._whole: torch.Tensor | None = None
        self.chunked = (h * w) % _BLOCK == 0 and chunked_fill_matches()
        if not self.chunked:
            logger.debug("noise of %d frames drawn whole (frame size %d x %d, or this torch's generator fills "
                         "differently in parts)", n, h, w)

    def take(self, start: int, end: int) -> torch.Tensor:
        """Frames ``[start, end)`` of the noise, ``(1, channels, end - start, h, w)`` (CPU, fp32); ranges are read
        in order, each once (``start`` is where the last one ended).

        Raises:
            ValueError: a range not starting where the last one ended, or past the last frame.
        """
        if start != self.next or not start <= end <= self.n:
            raise ValueError(f"noise frames are read in order: asked for frames [{start}, {end}) after {self.next} "
                             f"of {self.n}")
        self.next = end
        if not self.chunked:
            if self._whole is None:
                self._whole = initial_noise(self.seed, (1, self.channels, self.n, self.h, self.w))
            out = self._whole[:, :, start:end].clone()
            if end == self.n:
                self._whole = None
            return out
        gens = self._generators()
        out = torch.empty((1, self.channels, end - start, self.h, self.w), device="cpu")
        if end > start:
            for c, gen in enumerate(gens):
                out[0, c].normal_(generator=gen)
        return out

    def _generators(self) -> list[torch.Generator]:
        """One generator per channel, at its channel's first element (advanced by drawing and dropping)."""
        if self._gens is None:
            gen = torch.Generator().manual_seed(self.seed)
            gens = [gen]
            scratch = torch.empty(min(_SKIP_CHUNK, self.n * self.h * self.w), device="cpu")
            for _ in range(1, self.channels):
                gen = _clone(gen)
                left = self.n * self.h * self.w  # a multiple of 16: so is every part drawn
                while left:
                    k = min(left, scratch.numel())
                    scratch[:k].normal_(generator=gen)
                    left -= k
                gens.append(gen)
            self._gens = gens
        return self._gens


def _clone(gen: torch.Generator) -> torch.Generator:
    out = torch.Generator()
    out.set_state(gen.get_state())
    return out
