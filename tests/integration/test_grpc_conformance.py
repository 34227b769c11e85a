"""What gRPC tools and SDKs expect of the door: reflection as v1 and v1alpha, rich error
details (``google.rpc.Status`` with BadRequest and RetryInfo) and the published retry
policy, which retries UNAVAILABLE before the first token and nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc.error_details_pb2 import BadRequest, RetryInfo
from google.rpc.status_pb2 import Status
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from backends._gen.hetero.router.v1 import router_pb2
from backends.errors import BackendError, OverloadedError, ServingError
from router.client import (
    GENERATE_METHOD,
    ROUTER_SERVICE,
    AsyncRouterClient,
    ChannelConfig,
    build_request,
)
from router.daemon import Daemon
from router.errors import NoHealthyBackendError
from tests.recording import Recorder, recording_router

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"


@pytest.fixture
async def router(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Daemon]:
    async with recording_router(monkeypatch) as daemon:
        yield daemon


def address(daemon: Daemon) -> str:
    return f"127.0.0.1:{daemon.grpc_port}"


# -- reflection ---------------------------------------------------------------------------


async def reflect(
    daemon: Daemon, service: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    """One reflection request to ``service``; v1 and v1alpha messages are the same bytes."""
    async with grpc.aio.insecure_channel(address(daemon)) as channel:
        info = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = info(iter([request]), timeout=10)
        responses = [response async for response in call]
    assert len(responses) == 1
    return responses[0]


@pytest.mark.parametrize("service", [REFLECTION_V1, REFLECTION_V1ALPHA])
async def test_reflection_lists_the_services_in_both_versions(router: Daemon, service: str) -> None:
    listed = await reflect(
        router, service, reflection_pb2.ServerReflectionRequest(list_services="")
    )
    names = {entry.name for entry in listed.list_services_response.service}
    assert names == {ROUTER_SERVICE, "grpc.health.v1.Health", REFLECTION_V1, REFLECTION_V1ALPHA}


@pytest.mark.parametrize(
    ("symbol", "package"),
    [(ROUTER_SERVICE, "hetero.router.v1"), (REFLECTION_V1, "grpc.reflection.v1")],
)
async def test_v1_reflection_describes_the_router_and_itself(
    router: Daemon, symbol: str, package: str
) -> None:
    found = await reflect(
        router, REFLECTION_V1, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in found.file_descriptor_response.file_descriptor_proto
    ]
    assert files[0].package == package
    service = next(s for s in files[0].service if f"{package}.{s.name}" == symbol)
    if package == "grpc.reflection.v1":  # its messages are its own, not v1alpha's
        assert service.method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"


async def test_v1_reflection_is_guarded_as_v1alpha_when_told(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha\n")
    async with recording_router(
        monkeypatch, auth_token_file=tokens, auth_reflection=True
    ) as daemon:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await reflect(daemon, REFLECTION_V1, reflection_pb2.ServerReflectionRequest())
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- rich error details -------------------------------------------------------------------


async def refusal(daemon: Daemon, request: router_pb2.GenerateRequest | bytes) -> Any:
    """The error of one attempt on a channel with no retry policy."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    async with grpc.aio.insecure_channel(address(daemon)) as channel:
        generate = channel.unary_stream(GENERATE_METHOD, request_serializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in generate(data, timeout=10):
                pass
    return raised.value


def unpacked(status: Status, kind: type[BadRequest] | type[RetryInfo]) -> list[Any]:
    found = []
    for detail in status.details:
        message = kind()
        if detail.Unpack(message):  # False for a detail of another type
            found.append(message)
    return found


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (build_request(""), "prompt"),
        (build_request("hi", model="gpt-17"), "model"),
        (build_request("hi", request_id="x" * 500), "request_id"),
        (build_request("hi", max_tokens=0), "sampling.max_tokens"),
        (build_request("hi", temperature=-1), "sampling.temperature"),
        (build_request("hi", top_p=2), "sampling.top_p"),
        (build_request("hi", stop=["a"] * 20), "sampling.stop"),
        (build_request("hi", stop=["a", "b", ""]), "sampling.stop[2]"),
        (build_request("hi", slo_ttft_ms=0), "slo.ttft_ms"),
        (build_request("hi", slo_tpot_ms=4_000_000), "slo.tpot_ms"),
        (build_request("hi", priority=10), "priority"),
        (build_request("hi", slo_class="gold"), "slo_class"),
        (
            router_pb2.GenerateRequest(
                prompt="hi", disaggregation=router_pb2.Disaggregation.ValueType(9)
            ),
            "disaggregation",
        ),
        (b"\x1a\x02hi\x38\x80\x80\x80\x80\x10", "priority"),  # 2**32: too wide
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
async def test_invalid_argument_carries_a_bad_request_naming_the_field(
    router: Daemon, request_: router_pb2.GenerateRequest | bytes, field: str
) -> None:
    error = await refusal(router, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)  # checks code and message against the call's
    assert status is not None
    (bad_request,) = unpacked(status, BadRequest)
    (violation,) = bad_request.field_violations
    assert (violation.field, violation.description) == (field, error.details())
    assert unpacked(status, RetryInfo) == []
    assert Recorder.served == []


async def test_a_request_that_does_not_parse_carries_a_status_without_a_field(
    router: Daemon,
) -> None:
    error = await refusal(router, b"\x1a\x02\xff\xfe")
    status = rpc_status.from_call(error)
    assert status is not None
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert list(status.details) == []


def failing_first(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, error: ServingError, *, frames: int = 0
) -> list[int]:
    """Makes the first call to the dispatcher fail with ``error`` after ``frames`` frames
    and later calls succeed; returns the list that counts the calls."""
    real = daemon.dispatcher.generate
    calls: list[int] = []

    async def generate(*args: Any, **kwargs: Any) -> AsyncGenerator[bytes, None]:
        calls.append(1)
        async with contextlib.aclosing(real(*args, **kwargs)) as served:
            if len(calls) > 1:
                async for frame in served:
                    yield frame
                return
            for _ in range(frames):
                yield await anext(served)
        raise error

    monkeypatch.setattr(daemon.dispatcher, "generate", generate)
    return calls


@pytest.mark.parametrize(
    ("error", "code", "milliseconds"),
    [
        (OverloadedError("shed", retry_after_s=0.25), "RESOURCE_EXHAUSTED", 250),
        (NoHealthyBackendError("0 healthy decode", retry_after_s=2.0), "UNAVAILABLE", 2000),
    ],
    ids=["resource-exhausted", "unavailable"],
)
async def test_retryable_refusals_carry_retry_info_beside_the_hint_trailers(
    router: Daemon,
    monkeypatch: pytest.MonkeyPatch,
    error: ServingError,
    code: str,
    milliseconds: int,
) -> None:
    failing_first(router, monkeypatch, error)
    refused = await refusal(router, build_request("hi"))
    assert refused.code() == grpc.StatusCode[code]
    trailing = dict(refused.trailing_metadata())
    assert trailing["retry-after-ms"] == trailing["grpc-retry-pushback-ms"] == str(milliseconds)
    status = rpc_status.from_call(refused)
    (retry_info,) = unpacked(status, RetryInfo)
    assert retry_info.retry_delay.ToMilliseconds() == milliseconds
    assert unpacked(status, BadRequest) == []


# -- the published retry policy -------------------------------------------------------------


async def generate_with_sdk(daemon: Daemon) -> list[router_pb2.GenerateResponse]:
    async with AsyncRouterClient(ChannelConfig(address(daemon), timeout_s=10)) as client:
        return [response async for response in client.generate("retry me")]


async def test_the_sdk_retries_unavailable_before_the_first_token(
    router: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pushback of 1 ms: gRPC waits it, not the policy's backoff, before the retry.
    error = NoHealthyBackendError("0 healthy decode", retry_after_s=0.001)
    calls = failing_first(router, monkeypatch, error)
    responses = await generate_with_sdk(router)
    assert responses[-1].finish_reason == router_pb2.FINISH_REASON_STOP
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("error", "frames", "code"),
    [
        (OverloadedError("shed", retry_after_s=0.001), 0, "RESOURCE_EXHAUSTED"),
        (BackendError("r", "connection lost"), 1, "UNAVAILABLE"),
    ],
    ids=["resource-exhausted", "unavailable-after-a-token"],
)
async def test_the_sdk_retries_nothing_else(
    router: Daemon, monkeypatch: pytest.MonkeyPatch, error: ServingError, frames: int, code: str
) -> None:
    # Shed is for the client to decide; a stream that has begun is never replayed.
    calls = failing_first(router, monkeypatch, error, frames=frames)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await generate_with_sdk(router)
    assert raised.value.code() == grpc.StatusCode[code]
    assert len(calls) == 1
