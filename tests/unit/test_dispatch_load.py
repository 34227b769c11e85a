"""What dispatch feeds scheduling: load on each backend, prefix hashes, SLO outcomes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from backends import registry
from backends._gen.hetero.router.v1 import router_pb2
from backends.base import (
    BackendLoad,
    GenerationRequest,
    HealthStatus,
    KVHandle,
    PrefillResult,
    SamplingParams,
)
from backends.errors import BackendError, OverloadedError
from backends.prefix import block_hashes
from router.dispatch.dispatcher import Dispatcher
from router.errors import ConfigError
from router.metrics import RouterMetrics
from router.pool.health import HealthChecker
from router.pool.registry import Pool
from router.scheduling.plan import Disaggregation, Plan, RequestFeatures
from router.scheduling.registry import build_scheduler
from router.scheduling.service_level import ServiceLevel
from router.scheduling.slo import Slo
from router.scheduling.snapshot import BackendView
from router.settings import BackendConfig, PoolConfig, Settings, parse_pool
from tests.helpers import sample_total
from tests.stubs import StubBackend

PROMPT = "a shared system prompt that is long enough for a few blocks " * 4  # 240 bytes
REQUEST = GenerationRequest("r1", "m", PROMPT, SamplingParams(3, 0.0, 1.0, 1), 240)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def frame(*tokens: int, completion_tokens: int = 0) -> bytes:
    message = router_pb2.GenerateResponse(token_ids=tokens)
    if completion_tokens:
        message.finish_reason = router_pb2.FINISH_REASON_LENGTH
        message.usage.completion_tokens = completion_tokens
    return message.SerializeToString()


class Scripted(StubBackend):
    """A backend whose legs wait for the test, fail when told, and move a fake clock."""

    clock = Clock()
    hold: asyncio.Event | None = None  # every leg waits for it before its first token
    fail: str = ""  # "prefill", "decode" or "generate": that leg fails
    fail_after_first = False  # the failing leg sends a token first
    first_token_s = 0.2  # clock advance before the first token
    token_gap_s = 0.05  # and between the following ones
    load_report = BackendLoad()
    serving = True  # what health checks answer
    slow = True  # a failing check timed out (else it was refused)
    unhealthy = "slow"

    async def check_health(self, timeout_s: float) -> HealthStatus:
        if Scripted.serving:
            return HealthStatus(serving=True)
        return HealthStatus(serving=False, detail=Scripted.unhealthy, timed_out=Scripted.slow)

    async def load(self, timeout_s: float) -> BackendLoad:
        if self.id == "silent":
            raise NotImplementedError
        return Scripted.load_report

    async def _first(self, leg: str) -> None:
        if Scripted.hold is not None:
            await Scripted.hold.wait()
        if Scripted.fail == leg and not Scripted.fail_after_first:
            raise BackendError(self.id, f"{leg} failed")
        Scripted.clock.now += Scripted.first_token_s

    async def _rest(self, leg: str) -> AsyncGenerator[bytes, None]:
        Scripted.clock.now += Scripted.token_gap_s
        yield frame(2)
        if Scripted.fail == leg:
            raise BackendError(self.id, f"{leg} failed after a token")
        Scripted.clock.now += Scripted.token_gap_s
        yield frame(3, completion_tokens=3)

    async def prefill(self, request: GenerationRequest, timeout_s: float) -> PrefillResult:
        await self._first("prefill")
        handle = KVHandle(self.id, request.request_id)
        return PrefillResult(frame(1), 1, request.prompt_tokens, False, handle)

    async def decode(
        self, request: GenerationRequest, handle: KVHandle, first_token_id: int, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        if Scripted.fail == "decode" and not Scripted.fail_after_first:
            raise BackendError(self.id, "decode failed", retryable=False)
        async for item in self._rest("decode"):
            yield item

    async def generate(
        self, request: GenerationRequest, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        await self._first("generate")
        yield frame(1)
        async for item in self._rest("generate"):
            yield item


class Shedding:
    """A scheduler whose admission sheds everything."""

    slo_classes = frozenset({"default"})

    def default_slo(self, slo_class: str) -> Slo:
        return Slo(0.5, 0.05)

    def schedule(self, features: RequestFeatures, snapshot: object, now: float) -> Plan:
        raise OverloadedError("predicted TTFT 3.0 s misses the SLO of 0.5 s")


@pytest.fixture(autouse=True)
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_ADAPTERS", {**registry._ADAPTERS, "scripted": Scripted})
    Scripted.clock = Clock()
    Scripted.hold = None
    Scripted.fail = ""
    Scripted.fail_after_first = False
    Scripted.load_report = BackendLoad()
    Scripted.serving = True
    Scripted.slow = True


SPLIT_PAIR = (("p", "prefill"), ("d", "decode"))


def make(
    scheduler: Any = None, backends: tuple[tuple[str, str], ...] = SPLIT_PAIR, **settings: Any
) -> tuple[Dispatcher, Pool, RouterMetrics]:
    config = PoolConfig(
        backends=tuple(
            BackendConfig(id=i, kind="scripted", address="h:1", role=role, model="m")  # type: ignore[arg-type]  # str roles, validated
            for i, role in backends
        )
    )
    metrics = RouterMetrics(CollectorRegistry())
    options = Settings(**settings)
    pool = Pool(
        config, metrics, prefix_index_blocks_per_backend=options.prefix_index_blocks_per_backend
    )
    for backend_id, _ in backends:
        pool.set_health(backend_id, True, "", None)
    dispatcher = Dispatcher(
        pool, scheduler or build_scheduler(options), options, metrics, clock=Scripted.clock
    )
    return dispatcher, pool, metrics


def view(pool: Pool, backend_id: str) -> BackendView:
    return next(v for v in pool.snapshot().backends if v.id == backend_id)


def load(pool: Pool, backend_id: str) -> tuple[int, int, int]:
    v = view(pool, backend_id)
    return v.queued_prefill_tokens, v.running, v.context_tokens


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def drain(dispatcher: Dispatcher, mode: Disaggregation, **service: Any) -> list[bytes]:
    return [f async for f in dispatcher.generate(REQUEST, mode, ServiceLevel(**service))]


# -- load accounting ---------------------------------------------------------------


async def test_a_split_charges_prefill_then_decode_and_gives_it_all_back() -> None:
    dispatcher, pool, _ = make()
    Scripted.hold = asyncio.Event()
    frames = dispatcher.generate(REQUEST, Disaggregation.SPLIT)
    first = asyncio.ensure_future(frames.__anext__())
    await settle()
    assert load(pool, "p") == (240, 0, 0)  # waiting for its prefill
    assert load(pool, "d") == (0, 0, 0)
    Scripted.hold.set()
    await first  # the prefill's token is out
    assert load(pool, "p") == (0, 0, 0)
    await frames.__anext__()  # the decode leg is streaming
    assert load(pool, "d") == (0, 1, 240 + 3)
    assert [f async for f in frames]
    assert load(pool, "p") == load(pool, "d") == (0, 0, 0)
    assert view(pool, "d").outstanding == 0


async def test_colocated_is_a_prefill_until_its_first_token_then_a_running_sequence() -> None:
    dispatcher, pool, _ = make(backends=(("c", "both"),))
    Scripted.hold = asyncio.Event()
    frames = dispatcher.generate(REQUEST, Disaggregation.COLOCATED)
    first = asyncio.ensure_future(frames.__anext__())
    await settle()
    assert load(pool, "c") == (240, 0, 0)
    Scripted.hold.set()
    await first
    assert load(pool, "c") == (0, 1, 243)
    await frames.aclose()  # the client went away
    assert load(pool, "c") == (0, 0, 0)


@pytest.mark.parametrize(
    ("fail", "after_first", "mode"),
    [
        ("prefill", False, Disaggregation.SPLIT),  # falls back to the decode backend
        ("decode", False, Disaggregation.SPLIT),  # not retryable: the request fails
        ("decode", True, Disaggregation.SPLIT),  # fails after a token
        ("generate", False, Disaggregation.COLOCATED),
        ("generate", True, Disaggregation.COLOCATED),
    ],
)
async def test_load_returns_to_zero_after_a_failure(
    fail: str, after_first: bool, mode: Disaggregation
) -> None:
    dispatcher, pool, _ = make(backends=(("p", "prefill"), ("d", "decode"), ("c", "both")))
    Scripted.fail, Scripted.fail_after_first = fail, after_first
    with contextlib.suppress(BackendError):
        await drain(dispatcher, mode)
    for backend_id in ("p", "d", "c"):
        assert load(pool, backend_id) == (0, 0, 0), backend_id
    assert dispatcher.admission.in_flight == 0


async def test_the_snapshot_rebuilds_only_the_backends_that_changed() -> None:
    _, pool, _ = make()
    before = pool.snapshot()
    assert pool.snapshot() is before  # nothing changed
    with pool.prefilling("p", 10):
        after = pool.snapshot()
    assert after is not before
    assert view(pool, "d") is before.backends[1]  # reused as it was
    assert after.backends[0].queued_prefill_tokens == 10
    assert after.prefix_index is pool.prefix_index


# -- prefix affinity ---------------------------------------------------------------


async def test_both_backends_of_a_split_are_recorded_as_holding_the_prompt() -> None:
    dispatcher, pool, _ = make(backends=(("p", "prefill"), ("d", "decode"), ("x", "decode")))
    await drain(dispatcher, Disaggregation.SPLIT)
    hashes = block_hashes(PROMPT)
    assert len(hashes) == 3
    index = pool.snapshot().prefix_index
    assert index is not None
    matched = index.matched_blocks(hashes)
    decode = next(b for b in matched if b != "p")
    assert matched == {"p": 3, decode: 3}


async def test_a_shed_request_is_not_recorded_and_frees_its_slot() -> None:
    dispatcher, pool, metrics = make(scheduler=Shedding(), max_in_flight=1)
    for _ in range(2):  # the second would wait forever if the first kept its slot
        with pytest.raises(OverloadedError) as raised:
            await drain(dispatcher, Disaggregation.AUTO)
        assert raised.value.retry_after_s is not None  # a hint even when the policy gave none
    assert dispatcher.admission.in_flight == 0
    assert pool.prefix_index.blocks_held("p") == 0
    registry = metrics.registry
    assert sample_total(registry, "hetero_router_shed_total", reason="slo", model="m") == 2
    assert (
        sample_total(registry, "hetero_router_requests_total", outcome="overloaded", mode="none")
        == 2
    )


# -- admission in the dispatcher -----------------------------------------------------


async def test_a_request_queued_then_cancelled_holds_nothing() -> None:
    dispatcher, pool, metrics = make(max_in_flight=1, backends=(("c", "both"),))
    Scripted.hold = asyncio.Event()
    first = asyncio.ensure_future(drain(dispatcher, Disaggregation.COLOCATED))
    await settle()
    second = asyncio.ensure_future(drain(dispatcher, Disaggregation.COLOCATED, priority=5))
    await settle()
    assert dispatcher.admission.waiting(5) == 1
    second.cancel()
    await settle()
    assert dispatcher.admission.waiting() == 0
    Scripted.hold.set()
    assert len(await first) == 3
    assert dispatcher.admission.in_flight == 0
    assert load(pool, "c") == (0, 0, 0)
    cancelled = sample_total(
        metrics.registry, "hetero_router_requests_total", outcome="cancelled", mode="none"
    )
    assert cancelled == 1


async def test_time_queued_counts_toward_the_ttft_the_scheduler_plans_for() -> None:
    seen: list[RequestFeatures] = []
    dispatcher, _, _ = make(max_in_flight=1, backends=(("c", "both"),))
    real = dispatcher._scheduler

    class Recording:
        slo_classes = real.slo_classes

        def default_slo(self, slo_class: str) -> Any:
            return real.default_slo(slo_class)

        def schedule(self, features: RequestFeatures, snapshot: Any, now: float) -> Plan:
            seen.append(features)
            return real.schedule(features, snapshot, now)

    dispatcher._scheduler = Recording()  # type: ignore[assignment]  # a duck-typed spy
    Scripted.hold = asyncio.Event()
    first = asyncio.ensure_future(drain(dispatcher, Disaggregation.COLOCATED))
    await settle()
    second = asyncio.ensure_future(
        drain(dispatcher, Disaggregation.COLOCATED, ttft_ms=1000, tpot_ms=100)
    )
    await settle()
    Scripted.clock.now += 0.4  # the second waits 0.4 s for a slot
    Scripted.hold.set()
    await asyncio.gather(first, second)
    assert seen[0].slo is None  # no targets of its own: the class's apply
    assert seen[1].slo is not None
    # Admitted once the first finished: 0.4 s queued plus the first's 0.3 s of tokens.
    assert seen[1].slo.ttft_s == pytest.approx(1.0 - 0.7)
    assert seen[1].slo.tpot_s == pytest.approx(0.1)


# -- SLO outcomes ------------------------------------------------------------------


def slo_count(metrics: RouterMetrics, outcome: str, slo_class: str = "default") -> float:
    return sample_total(
        metrics.registry,
        "hetero_router_slo_requests_total",
        outcome=outcome,
        slo_class=slo_class,
        mode="colocated",
    )


@pytest.mark.parametrize(
    ("service", "met"),
    [
        ({"ttft_ms": 200, "tpot_ms": 50}, True),  # exactly on target (TTFT 0.2 s, TPOT 0.05 s)
        ({"ttft_ms": 199, "tpot_ms": 50}, False),
        ({"ttft_ms": 200, "tpot_ms": 49}, False),
    ],
)
async def test_a_completed_request_is_counted_against_its_slo(
    service: dict[str, int], met: bool
) -> None:
    dispatcher, _, metrics = make(backends=(("c", "both"),))
    await drain(dispatcher, Disaggregation.COLOCATED, **service)
    assert (slo_count(metrics, "met"), slo_count(metrics, "missed")) == ((1, 0) if met else (0, 1))


async def test_one_target_set_takes_the_other_from_the_class() -> None:
    dispatcher, _, metrics = make(backends=(("c", "both"),))
    class_tpot_s = dispatcher.class_slo("default").tpot_s
    assert class_tpot_s is not None  # a policy file sets both targets of a class
    Scripted.token_gap_s = class_tpot_s * 2  # twice the class's TPOT
    try:
        await drain(dispatcher, Disaggregation.COLOCATED, ttft_ms=3_600_000)
    finally:
        Scripted.token_gap_s = 0.05
    assert slo_count(metrics, "missed") == 1


async def test_a_failed_request_is_not_counted_against_its_slo() -> None:
    dispatcher, _, metrics = make(backends=(("c", "both"),))
    Scripted.fail, Scripted.fail_after_first = "generate", True
    with pytest.raises(BackendError):
        await drain(dispatcher, Disaggregation.COLOCATED, ttft_ms=1000)
    assert slo_count(metrics, "met") == slo_count(metrics, "missed") == 0


# -- the pool: performance model, load reports, health ---------------------------------


def test_each_backend_gets_the_performance_model_of_its_hardware() -> None:
    config = parse_pool(
        {"backends": [
            {"id": "h", "address": "h:1", "role": "prefill", "model": "llama-3.1-8b",
             "profile": "h100", "chips": 2},
            {"id": "g", "address": "h:2", "role": "decode", "model": "llama-3.1-8b",
             "profile": "groq-lpu"},
            {"id": "x", "address": "h:3", "role": "decode", "model": "llama-3.1-8b"},
        ]}
    )  # fmt: skip
    pool = Pool(config, RouterMetrics(CollectorRegistry()))
    views = {v.id: v for v in pool.snapshot().backends}
    assert views["h"].perf is not None
    assert views["h"].perf.timing.chips == 2
    assert views["g"].perf is not None
    assert views["x"].perf is None  # no profile: nothing to predict with


def test_a_model_that_does_not_fit_the_hardware_names_the_backend() -> None:
    config = parse_pool(
        {"backends": [
            {"id": "tiny", "address": "h:1", "role": "decode", "model": "llama-3.1-70b",
             "profile": "h100", "chips": 1},
        ]}
    )  # fmt: skip
    with pytest.raises(ConfigError, match="backend tiny: "):
        Pool(config, RouterMetrics(CollectorRegistry()))


async def test_load_reports_reach_the_snapshot_and_the_prefix_index() -> None:
    _, pool, _ = make(backends=(("p", "prefill"), ("d", "decode"), ("silent", "decode")))
    hashes = block_hashes(PROMPT)
    Scripted.load_report = BackendLoad(
        kv_tokens_used=300, kv_tokens_capacity=4096, cached_prefix_hashes=frozenset(hashes)
    )
    checker = HealthChecker(pool, interval_s=1.0, timeout_s=1.0)
    await checker.check_all()
    assert (view(pool, "d").kv_tokens_used, view(pool, "d").kv_tokens_capacity) == (300, 4096)
    assert view(pool, "silent").kv_tokens_capacity == 0  # reports nothing, still healthy
    assert view(pool, "silent").healthy
    assert pool.prefix_index.matched_blocks(hashes) == {"p": 3, "d": 3}
    # A backend that goes unhealthy forgets what it had cached.
    pool.set_health("d", False, "connection refused", None)
    assert pool.prefix_index.matched_blocks(hashes) == {"p": 3}
    await checker.check_all()  # the silent one is logged once, not again
    assert checker._no_load == {"silent"}


def test_the_prefix_index_is_bounded_per_backend_as_configured() -> None:
    dispatcher, pool, _ = make(prefix_index_blocks_per_backend=2)
    assert pool.prefix_index.blocks_per_backend == 2
    pool.record_prefix("p", block_hashes(PROMPT))
    assert pool.prefix_index.blocks_held("p") == 2
    assert pool.snapshot().prefix_index is pool.prefix_index
    assert dispatcher.slo_classes >= {"default"}


async def test_a_slow_backend_leaves_service_after_three_timeouts_in_a_row() -> None:
    _, pool, _ = make(backends=(("d", "decode"),))
    checker = HealthChecker(pool, interval_s=1.0, timeout_s=1.0, unhealthy_threshold=3)
    Scripted.serving = False
    await checker.check_all()
    await checker.check_all()
    assert view(pool, "d").healthy  # a busy device may miss a deadline or two
    Scripted.serving = True
    await checker.check_all()  # a pass starts the count again
    Scripted.serving = False
    await checker.check_all()
    await checker.check_all()
    assert view(pool, "d").healthy
    await checker.check_all()
    assert not view(pool, "d").healthy
    assert view(pool, "d").detail == "slow"
    Scripted.serving = True
    await checker.check_all()
    assert view(pool, "d").healthy


async def test_a_backend_that_refuses_its_check_leaves_service_at_once() -> None:
    _, pool, _ = make(backends=(("d", "decode"),))
    checker = HealthChecker(pool, interval_s=1.0, timeout_s=1.0, unhealthy_threshold=3)
    Scripted.serving, Scripted.slow, Scripted.unhealthy = False, False, "connection refused"
    await checker.check_all()
    assert not view(pool, "d").healthy
    assert view(pool, "d").detail == "connection refused"


# -- what the metrics measure, on the test's clock ------------------------------------


def histogram(metrics: RouterMetrics, name: str, **labels: str) -> tuple[float, float]:
    """(count, sum) of a histogram's samples whose labels include ``labels``."""
    registry = metrics.registry
    return (
        sample_total(registry, f"hetero_router_{name}_count", **labels),
        sample_total(registry, f"hetero_router_{name}_sum", **labels),
    )


async def test_each_phase_of_a_split_is_measured_on_the_dispatchers_clock() -> None:
    dispatcher, _, metrics = make()
    frames = await drain(dispatcher, Disaggregation.SPLIT)
    assert len(frames) == 3
    # The prefill answers after 0.2 s with the first token; decode's frames follow
    # 0.05 s apart: the first of them is the end of the KV handoff.
    assert histogram(metrics, "time_to_first_token_seconds") == pytest.approx((1, 0.2))
    assert histogram(metrics, "request_prefill_time_seconds") == pytest.approx((1, 0.2))
    assert histogram(metrics, "kv_handoff_seconds") == pytest.approx((1, 0.05))
    assert histogram(metrics, "inter_token_latency_seconds") == pytest.approx((2, 0.1))
    assert histogram(metrics, "request_decode_time_seconds") == pytest.approx((1, 0.1))
    assert histogram(metrics, "e2e_request_latency_seconds") == pytest.approx((1, 0.3))
    assert histogram(metrics, "request_queue_time_seconds") == (1, 0.0)
    tpot = histogram(metrics, "request_time_per_output_token_seconds")
    assert tpot == pytest.approx((1, 0.05))
    legs = "backend_request_latency_seconds"
    assert histogram(metrics, legs, backend="p", phase="prefill") == pytest.approx((1, 0.2))
    assert histogram(metrics, legs, backend="d", phase="decode") == pytest.approx((1, 0.1))


class TextFlush(Scripted):
    """Ends with a frame of text alone: the rest of a character split across tokens."""

    async def generate(
        self, request: GenerationRequest, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        yield frame(1)
        yield frame(2)
        last = router_pb2.GenerateResponse(text="\ufffd")
        last.finish_reason = router_pb2.FINISH_REASON_LENGTH
        last.usage.completion_tokens = 2
        yield last.SerializeToString()


class NoTokens(Scripted):
    """Finishes at once without a token."""

    async def generate(
        self, request: GenerationRequest, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        last = router_pb2.GenerateResponse(finish_reason=router_pb2.FINISH_REASON_STOP)
        yield last.SerializeToString()


@pytest.mark.parametrize(("backend", "tokens"), [(TextFlush, 2), (NoTokens, 0)])
async def test_frames_without_tokens_are_not_counted_as_tokens(
    monkeypatch: pytest.MonkeyPatch, backend: type[Scripted], tokens: int
) -> None:
    monkeypatch.setattr(registry, "_ADAPTERS", {**registry._ADAPTERS, "scripted": backend})
    dispatcher, _, metrics = make(backends=(("c", "both"),))
    await drain(dispatcher, Disaggregation.COLOCATED, ttft_ms=1000, tpot_ms=100)
    assert sample_total(metrics.registry, "hetero_router_generation_tokens_total") == tokens
    assert sample_total(metrics.registry, "hetero_router_requests_total", outcome="ok") == 1
    # Completed either way: its prompt and its time are counted.
    assert sample_total(metrics.registry, "hetero_router_prompt_tokens_total") == 240
    assert histogram(metrics, "e2e_request_latency_seconds")[0] == 1
    # A request that streamed no token has no time to first token, and no SLO verdict.
    ttft_count, _ = histogram(metrics, "time_to_first_token_seconds")
    assert ttft_count == (1 if tokens else 0)
    verdicts = sample_total(metrics.registry, "hetero_router_slo_requests_total")
    assert verdicts == (1 if tokens else 0)
