"""Dispatch with a scripted backend: what reaches the client, in what order."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest
from prometheus_client import CollectorRegistry

from backends import registry
from backends._gen.hetero.router.v1 import router_pb2
from backends.base import (
    GenerationRequest,
    KVHandle,
    KVLayout,
    PrefillResult,
    Role,
    SamplingParams,
)
from backends.errors import BackendError
from backends.mock.transfer import handle_from_proto, handle_to_proto
from router.dispatch.dispatcher import Dispatcher
from router.metrics import RouterMetrics
from router.pool.registry import Pool
from router.scheduling.plan import Disaggregation
from router.scheduling.registry import build_scheduler
from router.settings import BackendConfig, PoolConfig, Settings
from tests.stubs import StubBackend


def frame(*tokens: int, finish: int = 0) -> bytes:
    message = router_pb2.GenerateResponse(token_ids=tokens, text="x" * len(tokens))
    if finish:
        message.finish_reason = router_pb2.FinishReason.ValueType(finish)
        message.usage.completion_tokens = 3
    return message.SerializeToString()


class EngineLike(StubBackend):
    """Prefill shows no token (as engines whose decode recomputes it)."""

    finished_at_prefill = False
    decode_fails_after: int | None = None  # frames sent before the decode leg fails

    async def prefill(self, request: GenerationRequest, timeout_s: float) -> PrefillResult:
        handle = KVHandle(self.id, request.request_id, transport_params={"opaque": 1})
        finished = EngineLike.finished_at_prefill
        return PrefillResult(b"", -1, 3, finished, None if finished else handle)

    async def decode(
        self, request: GenerationRequest, handle: KVHandle, first_token_id: int, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        assert handle.transport_params == {"opaque": 1}
        if EngineLike.decode_fails_after == 0:
            raise BackendError(self.id, "UNAVAILABLE: prefill leg lost")
        yield frame(1)
        if EngineLike.decode_fails_after == 1:
            raise BackendError(self.id, "UNAVAILABLE: connection dropped")
        yield frame(2, 3, finish=router_pb2.FINISH_REASON_LENGTH)

    async def generate(
        self, request: GenerationRequest, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        yield frame(9, finish=router_pb2.FINISH_REASON_STOP)


@pytest.fixture
def dispatcher(monkeypatch: pytest.MonkeyPatch) -> Dispatcher:
    EngineLike.finished_at_prefill = False
    EngineLike.decode_fails_after = None
    monkeypatch.setattr(registry, "_ADAPTERS", {**registry._ADAPTERS, "engine-like": EngineLike})
    pool_config = PoolConfig(
        backends=(
            BackendConfig(id="p", kind="engine-like", address="h:1", role=Role.PREFILL, model="m"),
            BackendConfig(id="d", kind="engine-like", address="h:2", role=Role.DECODE, model="m"),
        )
    )
    metrics = RouterMetrics(CollectorRegistry())
    pool = Pool(pool_config, metrics)
    for backend_id in ("p", "d"):
        pool.set_health(backend_id, True, "", None)
    settings = Settings()
    return Dispatcher(pool, build_scheduler(settings), settings, metrics)


REQUEST = GenerationRequest("r1", "m", "hello", SamplingParams(3, 0.0, 1.0, 1), 6)


async def run(dispatcher: Dispatcher) -> list[router_pb2.GenerateResponse]:
    frames = dispatcher.generate(REQUEST, Disaggregation.SPLIT)
    return [router_pb2.GenerateResponse.FromString(f) async for f in frames]


async def test_route_rides_on_the_first_decode_frame_when_prefill_shows_no_token(
    dispatcher: Dispatcher,
) -> None:
    EngineLike.finished_at_prefill = False
    responses = await run(dispatcher)
    assert len(responses) == 2
    assert responses[0].route.mode == router_pb2.ROUTE_MODE_SPLIT
    assert (responses[0].route.prefill_backend, responses[0].route.decode_backend) == ("p", "d")
    assert list(responses[0].token_ids) == [1]
    assert not responses[1].HasField("route")
    assert responses[1].finish_reason == router_pb2.FINISH_REASON_LENGTH


async def test_a_request_finished_by_prefill_still_gets_its_route(dispatcher: Dispatcher) -> None:
    EngineLike.finished_at_prefill = True
    responses = await run(dispatcher)
    assert len(responses) == 1
    assert responses[0].route.request_id == "r1"


async def test_a_decode_leg_failing_before_any_token_is_served_colocated(
    dispatcher: Dispatcher,
) -> None:
    EngineLike.decode_fails_after = 0
    responses = await run(dispatcher)
    assert responses[0].route.mode == router_pb2.ROUTE_MODE_COLOCATED
    assert responses[0].route.decode_backend == "d"
    assert list(responses[0].token_ids) == [9]


async def test_a_decode_leg_failing_after_a_token_fails_the_request(dispatcher: Dispatcher) -> None:
    EngineLike.decode_fails_after = 1
    received: list[router_pb2.GenerateResponse] = []

    async def consume() -> None:
        async for raw in dispatcher.generate(REQUEST, Disaggregation.SPLIT):
            received.append(router_pb2.GenerateResponse.FromString(raw))

    with pytest.raises(BackendError, match="connection dropped"):
        await consume()
    assert [list(r.token_ids) for r in received] == [[1]]  # nothing repeated, nothing invented


def test_a_handle_survives_the_adapter_round_trip_whole() -> None:
    handle = KVHandle(
        "p0", "r1", address="h:1",
        layout=KVLayout(2, 4, 16, "float32", 16, 2), num_tokens=7, byte_length=7168,
        checksum=99, lease_expires_at=1.5, block_ids=(0,),
        transport_params={"link_gbps": 400.0, "emulated_bytes_per_token": 131072,
                          "data_address": "h:2", "lease_token": "9f" * 16},
    )  # fmt: skip
    assert handle_from_proto(handle_to_proto(handle)) == handle
