"""The admission gate: an adaptive bound on requests in flight, a bounded fair queue per
priority, and the door's checks (client caps, queue time)."""

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
    ClientRate,
)
from router.metrics import RouterMetrics
from router.scheduling.concurrency_limit import LimitConfig
from tests.helpers import sample_total


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
    assert sample_total(registry, "hetero_router_shed_total", reason="queue_full") == 1
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


# -- the adaptive limit ----------------------------------------------------------


def adaptive_gate(clock: Clock, **config: object) -> AdmissionGate:
    options: dict[str, object] = {
        "initial": 2,
        "minimum": 1,
        "min_samples": 2,
        **config,
    }
    return AdmissionGate(
        64,
        8,
        RouterMetrics(CollectorRegistry()),
        clock=clock,
        adaptive=LimitConfig(**options),  # type: ignore[arg-type]  # test options
    )


def sample(admission: AdmissionGate, name: str, **labels: str) -> float:
    return sample_total(admission._metrics.registry, name, **labels)


async def test_first_tokens_move_the_limit_and_a_higher_limit_admits_waiters() -> None:
    clock = Clock()
    admission = adaptive_gate(clock)
    assert admission.limit == 2
    assert sample(admission, "hetero_router_concurrency_limit") == 2
    await admission.acquire(0)
    await admission.acquire(0)
    waiters = [asyncio.create_task(admission.acquire(0)) for _ in range(3)]
    await settle()
    assert admission.waiting() == 3
    clock.now += 1.0
    admission.observe_first_token(0.2)
    admission.observe_first_token(0.2)  # a window: latency at its baseline, the limit grows
    assert admission.limit == 4  # floor(2 * 1.25 + sqrt(2.5))
    assert sample(admission, "hetero_router_concurrency_limit") == 4
    assert (
        sample(
            admission,
            "hetero_router_concurrency_latency_seconds",
            signal="first_token",
            window="baseline",
        )
        == 0.2
    )
    await settle()
    assert (admission.in_flight, admission.waiting()) == (4, 1)  # two waiters let in at once
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_a_cut_does_not_strand_the_requests_already_queued() -> None:
    clock = Clock()
    admission = adaptive_gate(clock, initial=8)
    for _ in range(3):
        await admission.acquire(0)
    clock.now += 1.0
    admission.observe_first_token(0.1)
    admission.observe_first_token(0.1)  # the baseline; 3 of 8 in use: no growth
    assert admission.limit == 8
    for _ in range(5):
        await admission.acquire(0)
    queued = asyncio.create_task(admission.acquire(0))  # queued under limit 8
    await settle()
    clock.now += 1.0
    admission.observe_first_token(1.0)
    admission.observe_first_token(1.0)  # congestion: the limit falls
    assert admission.limit == 6  # floor(8 * 0.5 + sqrt(4))
    admission.release()  # 7 in flight: more than the limit, fewer than it queued under
    await settle()
    assert queued.done()
    late = asyncio.create_task(admission.acquire(0))  # queued under the new limit
    await settle()
    admission.release()
    await settle()
    assert not late.done()  # 7 in flight: it waits for the excess to drain
    admission.release()
    admission.release()
    await settle()
    assert late.done()
    assert admission.in_flight == 6


async def test_a_slow_decode_lowers_the_limit() -> None:
    clock = Clock()
    admission = adaptive_gate(clock, initial=8)
    for _ in range(8):
        await admission.acquire(0)
    limits = []
    for latency_per_token in (0.02, 0.08):  # first tokens as fast; each token 4x slower
        clock.now += 1.0
        admission.observe_time_per_token(latency_per_token)
        admission.observe_time_per_token(latency_per_token)
        admission.observe_first_token(0.1)
        admission.observe_first_token(0.1)
        limits.append(admission.limit)
    assert limits[1] < limits[0]


# -- fair turns ---------------------------------------------------------------------


async def test_clients_take_turns_and_each_keeps_its_order() -> None:
    admission = gate(max_in_flight=1, queue_limit=10)
    await admission.acquire(0)
    order: list[str] = []

    async def wait(name: str, client: str) -> None:
        with admission.client_stream(client):
            await admission.acquire(0)
        order.append(name)

    tasks = []
    for name, client in [("a1", "peer:a"), ("a2", "peer:a"), ("a3", "peer:a"), ("b1", "peer:b")]:
        tasks.append(asyncio.create_task(wait(name, client)))
        await settle()
    for _ in tasks:
        admission.release()
        await settle()
    assert order == ["a1", "b1", "a2", "a3"]  # b waits for one of a's, not all three
    await asyncio.gather(*tasks)


# -- the door's checks ---------------------------------------------------------------


async def test_a_client_over_its_cap_is_refused_and_its_count_follows_its_streams() -> None:
    admission = gate(max_in_flight=8)
    with admission.client_stream("peer:10.0.0.7"), admission.client_stream("peer:10.0.0.7"):
        with pytest.raises(OverloadedError) as raised:
            admission.check_door("peer:10.0.0.7", 0, 1.0, client_cap=2)
        assert raised.value.message.startswith("client 10.0.0.7 has 2 streams open")
        assert "max_streams_per_client 2" in raised.value.message
        assert raised.value.retry_after_s == RETRY_AFTER_UNKNOWN_S
        admission.check_door("peer:10.0.0.8", 0, 1.0, client_cap=2)  # another client passes
        admission.check_door("peer:10.0.0.7", 0, 1.0, client_cap=0)  # 0: no cap
    admission.check_door("peer:10.0.0.7", 0, 1.0, client_cap=2)  # its streams ended
    assert admission._client_streams == {}  # nothing kept for clients gone
    with (
        pytest.raises(OverloadedError, match="this token has 1 streams"),
        admission.client_stream("token:abc"),
    ):
        admission.check_door("token:abc", 0, None, client_cap=1)
    shed = sample(admission, "hetero_router_shed_total", reason="client_cap")
    assert shed == 2


def test_a_client_over_its_request_rate_is_refused_until_its_bucket_refills() -> None:
    clock = Clock()
    admission = gate(max_in_flight=8, clock=clock)
    rate = ClientRate(per_s=2.0, burst=3)
    for _ in range(3):  # a burst of three at once
        admission.check_door("peer:10.0.0.7", 0, None, client_cap=0, client_rate=rate)
    with pytest.raises(OverloadedError) as raised:
        admission.check_door("peer:10.0.0.7", 0, None, client_cap=0, client_rate=rate)
    assert raised.value.message.startswith("client 10.0.0.7 is over its request rate")
    assert "max_requests_per_s_per_client 2" in raised.value.message
    assert raised.value.retry_after_s == pytest.approx(0.5)  # one token at 2 a second
    admission.check_door("peer:10.0.0.8", 0, None, client_cap=0, client_rate=rate)  # its own
    clock.now += 0.4  # 0.8 of a token: not yet, and the hint says what is left
    with pytest.raises(OverloadedError) as raised:
        admission.check_door("peer:10.0.0.7", 0, None, client_cap=0, client_rate=rate)
    assert raised.value.retry_after_s == pytest.approx(0.1)
    clock.now += 0.1
    admission.check_door("peer:10.0.0.7", 0, None, client_cap=0, client_rate=rate)
    clock.now += 60.0  # a long pause refills the bucket to its size, not beyond
    for _ in range(3):
        admission.check_door("peer:10.0.0.7", 0, None, client_cap=0, client_rate=rate)
    with pytest.raises(OverloadedError):
        admission.check_door("peer:10.0.0.7", 0, None, client_cap=0, client_rate=rate)
    admission.check_door("peer:10.0.0.7", 0, None, client_cap=0)  # per_s 0: no limit
    assert sample(admission, "hetero_router_shed_total", reason="client_rate") == 3


def test_rate_buckets_are_kept_for_the_clients_still_sending() -> None:
    clock = Clock()
    admission = gate(max_in_flight=8, clock=clock)
    rate = ClientRate(per_s=1.0, burst=1)
    for client in range(1500):
        admission.check_door(f"peer:old-{client}", 0, None, client_cap=0, client_rate=rate)
    assert len(admission._buckets) == 1500  # all drawn down: each one counts
    clock.now += 1.0  # every one has refilled: the next sweep forgets them
    for client in range(600):
        admission.check_door(f"peer:new-{client}", 0, None, client_cap=0, client_rate=rate)
    assert len(admission._buckets) == 600
    assert all(client.startswith("peer:new-") for client in admission._buckets)


async def test_a_request_the_queue_would_make_late_is_refused_at_once() -> None:
    clock = Clock()
    admission = gate(max_in_flight=2, queue_limit=10, clock=clock)
    for _ in range(4):  # slots held 1 s each: with 2 in flight, one frees every 0.5 s
        await admission.acquire(0)
        clock.now += 1.0
        admission.release()
    await admission.acquire(0)
    await admission.acquire(0)
    admission.observe_first_token(0.2)  # what the backends take after admission
    with admission.client_stream("peer:x"):  # two of its requests wait
        queued = [asyncio.create_task(admission.acquire(0)) for _ in range(2)]
    await settle()
    # Behind its own two: 3 releases, 0.5 s apart; another client's turn comes sooner.
    assert admission.expected_wait_s(0, "peer:x") == pytest.approx(1.5)
    assert admission.expected_wait_s(0, "peer:y") == pytest.approx(1.0)
    # Half of what a 4 s target leaves after 0.2 s is 1.9 s: it may queue.
    admission.check_door("peer:x", 0, 4.0, client_cap=0)
    with pytest.raises(OverloadedError) as raised:  # half of 2.8 s is not enough
        admission.check_door("peer:x", 0, 3.0, client_cap=0)
    assert "about 1500 ms, would miss the 3000 ms time to first token" in raised.value.message
    assert raised.value.retry_after_s == pytest.approx(1.5)
    admission.check_door("peer:x", 9, 2.0, client_cap=0)  # nothing queued ahead of it: 0.5 s
    admission.check_door("peer:x", 0, None, client_cap=0)  # no TTFT target: only the queue limit
    clock.now += 10.0  # nothing freed for 10 s: the queue is stuck, every wait is long
    with pytest.raises(OverloadedError):
        admission.check_door("peer:x", 9, 15.0, client_cap=0)
    assert sample(admission, "hetero_router_shed_total", reason="queue_time") == 2
    for task in queued:
        task.cancel()
    await asyncio.gather(*queued, return_exceptions=True)


async def test_before_anything_finished_a_burst_may_queue() -> None:
    clock = Clock()
    admission = gate(max_in_flight=1, clock=clock)
    await admission.acquire(0)
    clock.now += 10.0
    assert admission.expected_wait_s(0) is None  # nothing to tell by
    admission.check_door("peer:x", 0, 1.0, client_cap=0)  # the queue limit bounds it
    assert admission.retry_after_s(0) == RETRY_AFTER_UNKNOWN_S


async def test_saturation_says_limit_in_flight_and_queued() -> None:
    admission = gate(max_in_flight=2)
    await admission.acquire(0)
    assert admission.saturation() is None
    await admission.acquire(0)
    waiter = asyncio.create_task(admission.acquire(3))
    await settle()
    assert admission.saturation() == "saturated: limit 2, 2 in flight, 1 queued"
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)


async def test_a_queued_request_is_refused_once_its_wait_used_up_its_target() -> None:
    admission = gate(max_in_flight=1)
    await admission.acquire(0)
    with admission.client_stream("peer:x", ttft_target_s=0.05):  # 50 ms to its first token
        late = asyncio.create_task(admission.acquire(0))
    with admission.client_stream("peer:y"):  # no target: waits as long as it takes
        patient = asyncio.create_task(admission.acquire(0))
    with pytest.raises(OverloadedError, match="all its time to first token") as raised:
        await asyncio.wait_for(late, timeout=5)
    assert raised.value.retry_after_s is not None
    assert admission.waiting() == 1
    assert sample(admission, "hetero_router_shed_total", reason="queue_expired") == 1
    admission.release()
    assert await asyncio.wait_for(patient, timeout=5) is True
    assert admission.in_flight == 1


async def test_a_free_slot_is_taken_however_slow_the_backends_are() -> None:
    clock = Clock()
    admission = gate(max_in_flight=2, clock=clock)
    for _ in range(3):
        await admission.acquire(0)
        clock.now += 1.0
        admission.release()
    admission.observe_first_token(5.0)  # the backends alone miss a 1 s target
    admission.check_door("peer:x", 0, 1.0, client_cap=0)  # nothing to wait for: it goes
    await admission.acquire(0)
    await admission.acquire(0)
    with pytest.raises(OverloadedError):  # but it may not queue for a first token that late
        admission.check_door("peer:x", 0, 1.0, client_cap=0)
