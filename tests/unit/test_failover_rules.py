"""Failover rules with scripted backends: what is tried again, where, and what is not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any, ClassVar

import pytest
from prometheus_client import CollectorRegistry

from backends import registry
from backends._gen.hetero.router.v1 import router_pb2
from backends.base import (
    Capabilities,
    GenerationRequest,
    HandoffMode,
    Role,
    SamplingParams,
)
from backends.errors import BackendError, BackendRejectedError
from router.dispatch.dispatcher import Dispatcher
from router.dispatch.retry import RetryBudget
from router.metrics import RouterMetrics
from router.pool.outlier import OutlierDetector
from router.pool.registry import Pool
from router.scheduling.plan import Disaggregation
from router.scheduling.registry import build_scheduler
from router.settings import BackendConfig, PoolConfig, Settings
from tests.helpers import eventually
from tests.stubs import StubBackend

# What a scripted backend does with a generate call: an async generator of frames.
Script = Callable[[GenerationRequest], AsyncGenerator[bytes, None]]


def frame(*tokens: int, finish: int = 0, prompt: int = 0, completion: int = 0) -> bytes:
    message = router_pb2.GenerateResponse(token_ids=tokens, text="".join(f"<{t}>" for t in tokens))
    if finish:
        message.finish_reason = router_pb2.FinishReason.ValueType(finish)
        message.usage.prompt_tokens = prompt
        message.usage.completion_tokens = completion
    return message.SerializeToString()


class Scripted(StubBackend):
    """A colocated backend that follows the script the test gives its id."""

    scripts: ClassVar[dict[str, Script]] = {}
    calls: ClassVar[list[tuple[str, GenerationRequest]]] = []
    aborts: ClassVar[list[tuple[str, str]]] = []

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(frozenset(Role), frozenset({HandoffMode.SEQUENTIAL}), resume=True)

    def generate(self, request: GenerationRequest, timeout_s: float) -> AsyncGenerator[bytes, None]:
        Scripted.calls.append((self.id, request))
        return Scripted.scripts[self.id](request)

    async def abort(self, request_id: str, timeout_s: float) -> None:
        Scripted.aborts.append((self.id, request_id))


def counting_up(request: GenerationRequest) -> AsyncGenerator[bytes, None]:
    """Tokens 100, 101, ... at their positions, continuing after ``generated_ids``."""

    async def frames() -> AsyncGenerator[bytes, None]:
        start = len(request.generated_ids)
        count = request.sampling.max_tokens
        for i in range(count):
            last = i == count - 1
            prompt = request.prompt_tokens + start
            yield frame(
                100 + start + i,
                finish=router_pb2.FINISH_REASON_LENGTH if last else 0,
                prompt=prompt,
                completion=count,
            )

    return frames()


def failing_after(k: int, *, retryable: bool = True) -> Script:
    def script(request: GenerationRequest) -> AsyncGenerator[bytes, None]:
        async def frames() -> AsyncGenerator[bytes, None]:
            for i in range(k):
                yield frame(100 + i)
            if retryable:
                raise BackendError("?", "UNAVAILABLE: connection dropped")
            raise BackendRejectedError("?", "prompt too long")

        return frames()

    return script


def hanging_after(k: int) -> Script:
    def script(request: GenerationRequest) -> AsyncGenerator[bytes, None]:
        async def frames() -> AsyncGenerator[bytes, None]:
            for i in range(k):
                yield frame(100 + i)
            await asyncio.Event().wait()

        return frames()

    return script


def build(count: int = 2, **settings: Any) -> tuple[Dispatcher, Pool, CollectorRegistry]:
    backends = tuple(
        BackendConfig(id=f"c{i}", kind="scripted", address=f"h:{i + 1}", role=Role.BOTH, model="m")
        for i in range(count)
    )
    registry_ = CollectorRegistry()
    metrics = RouterMetrics(registry_)
    pool = Pool(PoolConfig(backends=backends), metrics)
    for backend in backends:
        pool.set_health(backend.id, True, "", None)
    config = Settings(**settings)
    return Dispatcher(pool, build_scheduler(config), config, metrics), pool, registry_


@pytest.fixture(autouse=True)
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    Scripted.scripts = {}
    Scripted.calls = []
    Scripted.aborts = []
    monkeypatch.setattr(registry, "_ADAPTERS", {**registry._ADAPTERS, "scripted": Scripted})


def request(max_tokens: int = 6) -> GenerationRequest:
    return GenerationRequest("r1", "m", "hello", SamplingParams(max_tokens, 0.0, 1.0, 1), 5)


async def run(dispatcher: Dispatcher, max_tokens: int = 6) -> list[router_pb2.GenerateResponse]:
    frames = dispatcher.generate(request(max_tokens), Disaggregation.COLOCATED)
    return [router_pb2.GenerateResponse.FromString(f) async for f in frames]


def ids(responses: list[router_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def first_backend() -> str:
    return Scripted.calls[0][0]


def other(backend_id: str) -> str:
    return "c1" if backend_id == "c0" else "c0"


def script_first_call(first: Script, then: Script = counting_up) -> None:
    """The backend called first follows ``first``, every other backend ``then``."""
    chosen: list[str] = []

    def by_order(backend_id: str) -> Script:
        def script(req: GenerationRequest) -> AsyncGenerator[bytes, None]:
            if not chosen:
                chosen.append(backend_id)
            return (first if chosen[0] == backend_id else then)(req)

        return script

    Scripted.scripts = {f"c{i}": by_order(f"c{i}") for i in range(4)}


def value(registry_: CollectorRegistry, name: str, **labels: str) -> float:
    return registry_.get_sample_value(name, labels) or 0.0


async def test_a_failure_after_tokens_resumes_elsewhere_with_what_the_client_has() -> None:
    dispatcher, _, metrics = build()
    script_first_call(failing_after(2))
    responses = await run(dispatcher)
    assert ids(responses) == [100, 101, 102, 103, 104, 105]
    (failed, first), (resumed, second) = Scripted.calls
    assert failed != resumed
    assert second.request_id == first.request_id  # one id across attempts
    assert second.generated_ids == (100, 101)
    assert second.sampling.max_tokens == 4
    usage = responses[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, 6)
    assert value(metrics, "hetero_router_retries_total", kind="migration") == 1


async def test_a_failure_before_any_token_is_planned_again_from_scratch() -> None:
    dispatcher, _, metrics = build()
    script_first_call(failing_after(0))
    responses = await run(dispatcher)
    assert ids(responses) == [100, 101, 102, 103, 104, 105]
    assert Scripted.calls[1][1].generated_ids == ()
    assert responses[0].route.decode_backend == Scripted.calls[1][0]  # the route that served
    assert value(metrics, "hetero_router_retries_total", kind="retry") == 1


async def test_a_rejected_request_is_not_tried_again() -> None:
    dispatcher, _, metrics = build()
    script_first_call(failing_after(0, retryable=False))
    with pytest.raises(BackendRejectedError):
        await run(dispatcher)
    assert len(Scripted.calls) == 1
    assert (
        value(metrics, "hetero_router_backend_failures_total", backend="c0", phase="generate") == 0
    )


async def test_attempts_are_bounded() -> None:
    dispatcher, _, metrics = build(count=4, max_attempts=3)
    Scripted.scripts = {f"c{i}": failing_after(0) for i in range(4)}
    with pytest.raises(BackendError, match="after 3 attempts"):
        await run(dispatcher)
    assert len(Scripted.calls) == 3
    assert len({backend for backend, _ in Scripted.calls}) == 3  # never the same one twice
    assert value(metrics, "hetero_router_retries_refused_total", reason="attempts") == 1


async def test_no_other_backend_says_so() -> None:
    dispatcher, _, metrics = build(count=1)
    Scripted.scripts = {"c0": failing_after(1)}
    with pytest.raises(BackendError, match="no other backend can resume it"):
        await run(dispatcher)
    assert value(metrics, "hetero_router_retries_refused_total", reason="no_backend") == 1


async def test_a_spent_retry_budget_ends_the_request() -> None:
    dispatcher, _, metrics = build(retry_budget_min=0, retry_budget_percent=0, stall_timeout_s=0.05)
    script_first_call(failing_after(0))
    with pytest.raises(BackendError, match="retry budget"):
        await run(dispatcher)
    assert value(metrics, "hetero_router_retries_refused_total", reason="budget") == 1


async def test_the_retry_budget_is_a_share_of_the_requests_in_flight() -> None:
    in_flight = [10]
    budget = RetryBudget(lambda: in_flight[0], percent=20, minimum=3)
    async with contextlib.AsyncExitStack() as held:
        for _ in range(3):  # 20% of 10 is 2, below the minimum 3
            assert await held.enter_async_context(budget.held(1.0))
        assert not await held.enter_async_context(budget.held(0.01))  # waited, none came
        in_flight[0] = 20  # 20% of 20 is 4
        assert await held.enter_async_context(budget.held(1.0))
        assert budget.active == 4

        # Over the limit a retry waits for one in progress to end, then starts.
        async def later() -> bool:
            async with budget.held(5.0) as granted:
                return granted

        waiting = asyncio.create_task(later())
        await eventually(lambda: budget.waiting == 1)
        await held.aclose()
        assert await waiting
    assert budget.active == 0


async def test_a_backend_running_past_max_tokens_is_cut_and_aborted() -> None:
    dispatcher, _, _ = build(count=1)

    def runaway(req: GenerationRequest) -> AsyncGenerator[bytes, None]:
        async def frames() -> AsyncGenerator[bytes, None]:
            for i in range(200_000):  # ignores max_tokens
                yield frame(i)

        return frames()

    Scripted.scripts = {"c0": runaway}
    responses = await run(dispatcher, max_tokens=5)
    assert ids(responses) == [0, 1, 2, 3, 4]
    assert responses[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH
    assert responses[-1].usage.completion_tokens == 5
    await dispatcher.drain_background()
    assert Scripted.aborts == [("c0", "r1")]


async def test_frames_after_the_last_one_are_dropped_and_the_backend_aborted() -> None:
    dispatcher, _, _ = build(count=1)

    def chatty(req: GenerationRequest) -> AsyncGenerator[bytes, None]:
        async def frames() -> AsyncGenerator[bytes, None]:
            yield frame(1, finish=router_pb2.FINISH_REASON_STOP, completion=1)
            yield frame(2)
            yield frame(3)

        return frames()

    Scripted.scripts = {"c0": chatty}
    responses = await run(dispatcher)
    assert ids(responses) == [1]
    await dispatcher.drain_background()
    assert Scripted.aborts == [("c0", "r1")]


async def test_a_malformed_frame_is_a_backend_failure_and_retried() -> None:
    dispatcher, _, _ = build()

    def garbage(req: GenerationRequest) -> AsyncGenerator[bytes, None]:
        async def frames() -> AsyncGenerator[bytes, None]:
            yield b"\xff\xff\xff"

        return frames()

    script_first_call(garbage)
    responses = await run(dispatcher)
    assert ids(responses) == [100, 101, 102, 103, 104, 105]


async def test_a_hung_stream_is_resumed_after_the_idle_limit() -> None:
    dispatcher, _, _ = build(stall_timeout_s=0.05)
    script_first_call(hanging_after(3))
    responses = await run(dispatcher)
    assert ids(responses) == [100, 101, 102, 103, 104, 105]
    assert Scripted.calls[1][1].generated_ids == (100, 101, 102)


async def test_an_ejection_fails_the_streams_on_the_backend_over_at_once() -> None:
    dispatcher, pool, _ = build(count=4, stall_timeout_s=600)
    script_first_call(hanging_after(2))
    received: list[router_pb2.GenerateResponse] = []

    async def consume() -> None:
        async for raw in dispatcher.generate(request(), Disaggregation.COLOCATED):
            received.append(router_pb2.GenerateResponse.FromString(raw))

    task = asyncio.create_task(consume())
    await eventually(lambda: len(ids(received)) >= 2)
    hung = first_backend()
    for _ in range(pool.outliers.consecutive_failures):
        pool.record_failure(hung)
    await asyncio.wait_for(task, 10)
    assert ids(received) == [100, 101, 102, 103, 104, 105]
    assert not pool.snapshot().without(()).backends[int(hung[1])].healthy


def test_consecutive_failures_eject_with_growing_ejections() -> None:
    now = [0.0]
    groups = [(f"d{i}", ("decode", "m")) for i in range(4)]
    detector = OutlierDetector(groups, clock=lambda: now[0])
    for _ in range(4):
        assert detector.failed("d0") is None
    detector.succeeded("d0")  # a success starts the count again
    for _ in range(4):
        assert detector.failed("d0") is None
    assert detector.failed("d0") == 30.0
    assert detector.ejected("d0")
    now[0] = 29.0
    assert detector.returning() == []
    now[0] = 30.0
    assert detector.returning() == ["d0"]
    for _ in range(5):
        duration = detector.failed("d0")
    assert duration == 60.0  # ejected again soon after: twice as long


def test_at_most_half_of_a_role_is_ejected() -> None:
    groups = [("d0", ("decode", "m")), ("d1", ("decode", "m")), ("p0", ("prefill", "m"))]
    detector = OutlierDetector(groups, consecutive_failures=1)
    assert detector.failed("d0") is not None
    assert detector.failed("d1") is None  # the other half of the role stays
    assert detector.failed("p0") is None  # the only one of its role: never ejected
    assert not detector.ejected("d1")
    assert not detector.ejected("p0")


def test_an_ejected_backend_is_out_of_service_until_its_time_is_up() -> None:
    now = [0.0]
    backends = tuple(
        BackendConfig(id=f"d{i}", address=f"h:{i + 1}", role=Role.DECODE, model="m")
        for i in range(2)
    )
    pool = Pool(
        PoolConfig(backends=backends),
        RouterMetrics(CollectorRegistry()),
        outliers=lambda groups: OutlierDetector(
            groups, consecutive_failures=2, clock=lambda: now[0]
        ),
    )
    for backend in backends:
        pool.set_health(backend.id, True, "", None)
    left: list[str] = []
    with pool.watching("d0", lambda: left.append("d0")):
        pool.record_failure("d0")
        pool.record_failure("d0")
    assert left == ["d0"]
    view = pool.snapshot().backends[0]
    assert not view.healthy
    assert "ejected" in view.detail
    pool.set_health("d0", True, "", None)  # passing health checks do not end it
    assert not pool.snapshot().backends[0].healthy
    now[0] = 31.0
    pool.end_ejections()
    assert pool.snapshot().backends[0].healthy


async def test_a_backend_turning_the_stall_cancel_into_its_own_error_leaves_no_cancel_behind() -> (
    None
):
    dispatcher, _, _ = build(stall_timeout_s=0.05)

    def converting(req: GenerationRequest) -> AsyncGenerator[bytes, None]:
        async def frames() -> AsyncGenerator[bytes, None]:
            yield frame(100)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise BackendError("?", "request aborted") from None  # as adapters do
            yield frame(101)

        return frames()

    script_first_call(converting)
    responses = await run(dispatcher)
    assert ids(responses) == [100, 101, 102, 103, 104, 105]
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0  # a later timeout in this task still works
    async with asyncio.timeout(5):
        await asyncio.sleep(0)
