"""The admission gate: a bound on requests in flight, a bounded FIFO per priority."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from backends.errors import OverloadedError
from router.dispatch.admission import (
    RETRY_AFTER_MAX_S,
    RETRY_AFTER_MIN_S,
    RETRY_AFTER_UNKNOWN_S,
    AdmissionGate,
)
from router.metrics import RouterMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gate(max_in_flight: int = 1, queue_limit: int = 4, clock: Clock | None = None) -> AdmissionGate:
    return AdmissionGate(
        max_in_flight, queue_limit, RouterMetrics(CollectorRegistry()), clock=clock or Clock()
    )


def depth(admission: AdmissionGate, priority: int) -> float:
    value = admission._metrics.registry.get_sample_value(
        "hetero_router_admission_queue_depth", {"priority": str(priority)}
    )
    assert value is not None
    return value


async def settle() -> None:
    """Lets every task that can run, run (tasks here only wait on the gate)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_requests_within_the_bound_pass_without_waiting() -> None:
    admission = gate(max_in_flight=2)
    assert await admission.acquire(0) is False
    assert await admission.acquire(9) is False
    assert admission.in_flight == 2
    admission.release()
    admission.release()
    assert admission.in_flight == 0


async def test_a_freed_slot_goes_to_the_most_urgent_then_first_come() -> None:
    admission = gate(max_in_flight=1)
    await admission.acquire(0)
    order: list[str] = []

    async def wait(name: str, priority: int) -> None:
        assert await admission.acquire(priority) is True
        order.append(name)

    tasks = []
    for name, priority in [("low-a", 1), ("high-a", 7), ("low-b", 1), ("high-b", 7), ("mid", 4)]:
        tasks.append(asyncio.create_task(wait(name, priority)))
        await settle()  # queued in this order
    assert admission.waiting() == 5
    assert (depth(admission, 1), depth(admission, 7), depth(admission, 4)) == (2, 2, 1)
    for _ in tasks:
        admission.release()
        await settle()
    assert order == ["high-a", "high-b", "mid", "low-a", "low-b"]
    assert admission.in_flight == 1  # the last admitted still holds its slot
    assert admission.waiting() == 0
    assert depth(admission, 7) == depth(admission, 1) == 0
    await asyncio.gather(*tasks)


async def test_a_full_queue_sheds_with_a_reason_and_a_hint() -> None:
    admission = gate(max_in_flight=1, queue_limit=2)
    await admission.acquire(3)
    waiters = [asyncio.create_task(admission.acquire(3)) for _ in range(2)]
    await settle()
    with pytest.raises(OverloadedError) as raised:
        await admission.acquire(3)
    assert "the queue for priority 3 is full (2 waiting)" in raised.value.message
    assert raised.value.retry_after_s == RETRY_AFTER_UNKNOWN_S  # nothing finished yet
    # Another priority has its own queue.
    other = asyncio.create_task(admission.acquire(5))
    await settle()
    assert admission.waiting(5) == 1
    registry = admission._metrics.registry
    assert registry.get_sample_value("hetero_router_shed_total", {"reason": "queue_full"}) == 1
    for task in [*waiters, other]:
        task.cancel()
    await asyncio.gather(*waiters, other, return_exceptions=True)


async def test_a_zero_queue_limit_sheds_everything_beyond_the_bound() -> None:
    admission = gate(max_in_flight=1, queue_limit=0)
    await admission.acquire(9)
    with pytest.raises(OverloadedError, match="priority 9 is full"):
        await admission.acquire(9)


async def test_a_request_cancelled_while_queued_leaves_nothing_behind() -> None:
    admission = gate(max_in_flight=1)
    await admission.acquire(0)
    leaving = asyncio.create_task(admission.acquire(2))
    staying = asyncio.create_task(admission.acquire(2))
    await settle()
    assert admission.waiting(2) == 2
    leaving.cancel()
    await settle()
    assert leaving.cancelled()
    assert admission.waiting(2) == 1
    assert depth(admission, 2) == 1
    admission.release()  # goes to the one still waiting
    assert await staying is True
    admission.release()
    assert (admission.in_flight, admission.waiting()) == (0, 0)


async def test_a_slot_handed_to_a_request_cancelled_at_that_moment_passes_on() -> None:
    admission = gate(max_in_flight=1)
    await admission.acquire(0)
    first = asyncio.create_task(admission.acquire(0))
    second = asyncio.create_task(admission.acquire(0))
    await settle()
    admission.release()  # the slot is the first waiter's now...
    first.cancel()  # ...but it leaves before it runs again
    await settle()
    assert first.cancelled()
    assert second.done()
    assert second.result() is True
    assert admission.in_flight == 1
    admission.release()
    assert admission.in_flight == 0


async def test_the_retry_hint_follows_how_fast_slots_free_within_bounds() -> None:
    clock = Clock()
    admission = gate(max_in_flight=1, queue_limit=10, clock=clock)
    # Ten requests of 0.5 s each, one at a time: a slot frees every 0.5 s.
    for _ in range(10):
        await admission.acquire(0)
        clock.now += 0.5
        admission.release()
    await admission.acquire(0)
    waiters = [asyncio.create_task(admission.acquire(4)) for _ in range(3)]
    await settle()
    # Three waiting ahead at priority 4 or above, plus the newcomer: 4 releases, 0.5 s each.
    assert admission.retry_after_s(4) == pytest.approx(2.0)
    assert admission.retry_after_s(5) == pytest.approx(0.5)  # nothing ahead of priority 5
    assert admission.retry_after_s(0) == pytest.approx(2.0)
    clock.now += 1000  # the queue stopped moving: the hint grows, and is capped
    assert admission.retry_after_s(0) == RETRY_AFTER_MAX_S
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    admission.release()
    for _ in range(64):  # requests that take no time at all: the hint's floor
        await admission.acquire(0)
        admission.release()
    await admission.acquire(0)
    assert admission.retry_after_s(9) == RETRY_AFTER_MIN_S


async def test_admitted_holds_a_slot_for_the_block_whatever_ends_it() -> None:
    admission = gate(max_in_flight=1)
    held: list[int] = []

    async def failing() -> None:
        async with admission.admitted(0) as queued:
            assert queued is False
            held.append(admission.in_flight)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await failing()
    assert held == [1]
    assert admission.in_flight == 0


async def test_an_out_of_range_priority_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="between 0 and 9"):
        await gate().acquire(10)
