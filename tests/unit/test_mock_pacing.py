"""Iteration pacing of the mock engine: back-to-back iterations keep the model's time."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from backends.base import SamplingParams
from backends.mock.clock import LoopClock, next_deadline
from backends.mock.engine import DeviceEngine
from backends.mock.model import TinyTransformer, encode
from backends.perf.roofline import TimingModel, load_catalog

Engines = Callable[..., DeviceEngine]  # (clock, **engine options) -> a started engine
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
# A millisecond timer wakes up to a millisecond late; 0.7 ms is typical.
LATE_S = 0.0007


class VirtualClock(LoopClock):
    """Time that passes only while the engine sleeps, each wake ``late_s`` after its deadline."""

    def __init__(self, late_s: float) -> None:
        self.now = 1000.0
        self.late_s = late_s
        self.wakes: list[float] = []
        self.waits: list[float] = []  # each sleep's deadline minus the time it was asked for

    def time(self) -> float:
        return self.now

    async def sleep_until(self, deadline: float) -> None:
        self.waits.append(deadline - self.now)
        self.now = max(self.now, deadline) + self.late_s
        self.wakes.append(self.now)
        await asyncio.sleep(0)


@pytest.fixture(scope="module")
def tiny() -> TinyTransformer:
    return TinyTransformer()


@pytest.fixture(scope="module")
def timing() -> TimingModel:
    catalog = load_catalog()
    return TimingModel(catalog.profiles["h100"], catalog.models["llama-3.1-70b"])


@pytest.fixture
async def make_engine(tiny: TinyTransformer, timing: TimingModel) -> AsyncIterator[Engines]:
    engines: list[DeviceEngine] = []

    def make(clock: VirtualClock, **options: Any) -> DeviceEngine:
        engine = DeviceEngine(tiny, timing, clock=clock, **options)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


async def stream(engine: DeviceEngine, request_id: str, max_tokens: int) -> int:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0)
    return len([frame async for frame in engine.generate(request_id, PROMPT, sampling)])


def test_an_idle_engine_starts_from_now() -> None:
    assert next_deadline(None, 5.0, 0.014) == pytest.approx(5.014)


def test_back_to_back_iterations_end_one_step_after_the_previous_deadline() -> None:
    # Woke 0.7 ms late: the next step is 0.7 ms shorter, so the schedule holds.
    assert next_deadline(5.0, 5.0007, 0.014) == pytest.approx(5.014)
    # Woke early (timers round): still anchored.
    assert next_deadline(5.0, 4.9995, 0.014) == pytest.approx(5.014)


def test_an_anchor_more_than_one_iteration_away_is_dropped() -> None:
    # Compute overran by more than a step: no burst of zero-length steps to catch up.
    assert next_deadline(5.0, 5.02, 0.014) == pytest.approx(5.034)
    assert next_deadline(5.0, 4.98, 0.014) == pytest.approx(4.994)


def test_zero_duration_iterations_end_now() -> None:
    assert next_deadline(5.0, 5.3, 0.0) == 5.3
    assert next_deadline(5.3, 5.3, 0.0) == 5.3


async def test_a_stream_keeps_the_modelled_pace_although_every_wake_is_late(
    make_engine: Engines, timing: TimingModel
) -> None:
    clock = VirtualClock(LATE_S)
    engine = make_engine(clock, time_scale=1.0)
    start = clock.now
    assert await stream(engine, "a", max_tokens=40) == 40
    prompt_tokens = len(encode(PROMPT))
    modelled = timing.prefill_seconds([prompt_tokens]) + sum(
        timing.decode_step_seconds([prompt_tokens + step]) for step in range(1, 40)
    )
    assert len(clock.wakes) == 40
    # One wake's lateness in all, not one per token.
    assert clock.wakes[-1] - start == pytest.approx(modelled + LATE_S, abs=1e-9)


async def test_a_fixed_decode_step_is_anchored_the_same_way(
    make_engine: Engines,
) -> None:
    clock = VirtualClock(LATE_S)
    engine = make_engine(clock, time_scale=1.0, decode_step_s=0.014)
    await stream(engine, "a", max_tokens=30)
    gaps = [later - earlier for earlier, later in itertools.pairwise(clock.wakes[1:])]
    assert gaps == pytest.approx([0.014] * 28, abs=1e-9)


async def test_late_wakes_beyond_a_step_restart_the_schedule_without_bursts(
    make_engine: Engines,
) -> None:
    clock = VirtualClock(0.05)
    engine = make_engine(clock, time_scale=1.0, decode_step_s=0.014)
    await stream(engine, "a", max_tokens=10)
    assert clock.waits[1:] == pytest.approx([0.014] * 9, abs=1e-9)


async def test_after_idling_the_next_iteration_lasts_its_full_time(
    make_engine: Engines, timing: TimingModel
) -> None:
    clock = VirtualClock(LATE_S)
    engine = make_engine(clock, time_scale=1.0)
    await stream(engine, "a", max_tokens=5)
    clock.now += 100.0
    clock.waits.clear()
    await stream(engine, "b", max_tokens=1)
    prefill = timing.prefill_seconds([len(encode(PROMPT))])
    assert clock.waits == pytest.approx([prefill], abs=1e-9)


async def test_time_scale_zero_never_waits(make_engine: Engines) -> None:
    clock = VirtualClock(0.0)
    engine = make_engine(clock, time_scale=0.0)
    await stream(engine, "a", max_tokens=10)
    assert clock.waits == [0.0] * 10
