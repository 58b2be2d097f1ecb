"""InFlight (device work issued ahead of its consumer): order, laziness off-GPU, streams on GPU."""

from __future__ import annotations

import pytest
import torch

from megactor_rt.runtime.pipeline import InFlight


def test_cpu_runs_each_item_when_asked_and_keeps_order() -> None:
    calls: list[int] = []

    def fn(i: int) -> torch.Tensor:
        calls.append(i)
        return torch.full((2,), i)

    flight = InFlight(torch.device("cpu"), depth=3)
    it = flight.map(fn, range(5))
    assert calls == []  # nothing before the first request
    assert next(it).tolist() == [0, 0] and calls == [0]  # no run-ahead without concurrency
    assert [t[0].item() for t in it] == [1, 2, 3, 4]
    assert flight.launched == 5 and flight.device_seconds > 0


def test_bad_depth_is_rejected() -> None:
    with pytest.raises(ValueError, match="depth"):
        InFlight(torch.device("cpu"), depth=0)


def test_producer_error_reaches_the_consumer() -> None:
    def fn(i: int) -> torch.Tensor:
        if i == 2:
            raise RuntimeError("decode failed at 2")
        return torch.zeros(1)

    it = InFlight(torch.device("cpu")).map(fn, range(4))
    next(it), next(it)
    with pytest.raises(RuntimeError, match="at 2"):
        next(it)


@pytest.mark.gpu
def test_cuda_streams_give_the_same_results_in_order() -> None:
    dev = torch.device("cuda")
    x = torch.randn(8, 256, 256, device=dev)
    fn = lambda i: (x[i] @ x[i]).relu()  # noqa: E731
    ref = [fn(i).cpu() for i in range(8)]
    flight = InFlight(dev, depth=3)
    launched_at_first = None
    out = []
    for t in flight.map(fn, range(8)):
        launched_at_first = launched_at_first or flight.launched
        assert t.is_pinned()
        out.append(t)
    assert launched_at_first == 4  # depth ahead, plus the next one issued before the first is handed out
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert flight.device_seconds > 0


@pytest.mark.gpu
def test_streamed_decode_gives_the_same_frames_as_serial_decode() -> None:
    import numpy as np

    from megactor_rt.assets import ASSETS_DIR
    from megactor_rt.config import AnimateConfig
    from megactor_rt.runtime.animator import Animator

    cfg = AnimateConfig(steps=1, window=4, overlap=2, max_frames=10)
    anim = Animator.demo(device="cuda", config=cfg)
    state = anim.prepare(ASSETS_DIR / "portrait.png")
    driver = ASSETS_DIR / "driver.mp4"
    streamed = list(anim.animate(state, driver))
    assert anim.last_stats.stage_seconds["vae_decode"] > 0
    serial = list(anim.animate(state, driver, config=AnimateConfig(**{**cfg.__dict__, "decode_streams": False})))
    assert len(streamed) == len(serial) == 10
    assert all(np.array_equal(a, b) for a, b in zip(streamed, serial))
