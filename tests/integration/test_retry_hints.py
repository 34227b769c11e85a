"""Retry hints: every refusal a retry can fix says when to retry, on both doors.

gRPC: RESOURCE_EXHAUSTED and UNAVAILABLE carry trailing ``retry-after-ms`` and
gRPC's own ``grpc-retry-pushback-ms``; HTTP: 429, 502 and 503 carry ``Retry-After``.
Errors a retry cannot fix carry neither.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any, NamedTuple

import aiohttp
import grpc
import pytest

from backends._gen.hetero.router.v1 import router_pb2
from backends.errors import (
    BackendError,
    BackendRejectedError,
    LayoutMismatchError,
    OverloadedError,
    ServingError,
)
from router.client import GENERATE_METHOD, build_request
from router.errors import NoHealthyBackendError
from tests.conftest import Cluster

HINTS = ("retry-after-ms", "grpc-retry-pushback-ms")
COMPLETION = {"prompt": "retry me", "max_tokens": 4, "temperature": 0}


def failing_with(error: ServingError, frames: int = 0) -> Any:
    """A dispatcher's ``generate`` that raises ``error`` after ``frames`` real frames."""

    def install(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
        real = cluster.daemon.dispatcher.generate

        async def generate(*args: Any, **kwargs: Any) -> AsyncGenerator[bytes, None]:
            async with contextlib.aclosing(real(*args, **kwargs)) as served:
                for _ in range(frames):
                    yield await anext(served)
            raise error

        monkeypatch.setattr(cluster.daemon.dispatcher, "generate", generate)

    return install


async def grpc_refusal(
    cluster: Cluster, prompt: str = "retry me"
) -> tuple[int, grpc.aio.AioRpcError]:
    """The responses received and the error one attempt ends with: a plain channel, with
    no retry policy, so that a hint of seconds does not delay the test."""
    received = 0
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        generate = channel.unary_stream(
            GENERATE_METHOD,
            request_serializer=router_pb2.GenerateRequest.SerializeToString,
            response_deserializer=router_pb2.GenerateResponse.FromString,
        )
        try:
            async for _ in generate(build_request(prompt, max_tokens=8, temperature=0)):
                received += 1
        except grpc.aio.AioRpcError as error:
            return received, error
    raise AssertionError("the call succeeded")


def grpc_hints(error: grpc.aio.AioRpcError) -> dict[str, str]:
    trailing = dict(error.trailing_metadata() or ())
    return {key: str(trailing[key]) for key in HINTS if key in trailing}


async def http_refusal(cluster: Cluster, body: dict[str, Any]) -> tuple[int, str | None, Any]:
    """Status, ``Retry-After`` and the JSON body of a completion."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{cluster.admin_url}/v1/completions", json=body) as reply,
    ):
        return reply.status, reply.headers.get("Retry-After"), await reply.json()


class Case(NamedTuple):
    error: ServingError
    code: str
    hint_ms: str | None  # both gRPC hints
    status: int
    retry_after: str | None


@pytest.mark.parametrize(
    "case",
    [
        Case(OverloadedError("shed", retry_after_s=0.25), "RESOURCE_EXHAUSTED", "250", 429, "1"),
        Case(OverloadedError("shed", retry_after_s=2.5), "RESOURCE_EXHAUSTED", "2500", 429, "3"),
        Case(OverloadedError("backend full"), "RESOURCE_EXHAUSTED", "1000", 429, "1"),
        Case(NoHealthyBackendError("0 healthy decode"), "UNAVAILABLE", "1000", 503, "1"),
        Case(BackendError("groq-0", "connection lost"), "UNAVAILABLE", "1000", 502, "1"),
        Case(BackendRejectedError("groq-0", "too long"), "INVALID_ARGUMENT", None, 400, None),
        Case(LayoutMismatchError("layouts differ"), "FAILED_PRECONDITION", None, 409, None),
    ],
    ids=lambda case: f"{type(case.error).__name__}-{case.hint_ms}",
)
async def test_retryable_refusals_carry_a_hint_on_both_doors_and_others_none(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, case: Case
) -> None:
    failing_with(case.error)(cluster, monkeypatch)
    _, refused = await grpc_refusal(cluster)
    assert refused.code() == grpc.StatusCode[case.code]
    assert grpc_hints(refused) == (dict.fromkeys(HINTS, case.hint_ms) if case.hint_ms else {})

    status, retry_after, body = await http_refusal(cluster, COMPLETION)
    assert (status, retry_after) == (case.status, case.retry_after)
    assert body["error"]["message"] == case.error.message


async def test_no_healthy_backend_is_unavailable_with_a_hint(cluster: Cluster) -> None:
    await cluster.daemon.health.stop()  # health changes only as the test says
    for name in ("groq-0", "groq-1"):
        cluster.daemon.pool.set_health(name, False, "connection refused", None)
    _, refused = await grpc_refusal(cluster)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert grpc_hints(refused) == dict.fromkeys(HINTS, "1000")
    status, header, body = await http_refusal(cluster, COMPLETION)
    assert (status, header) == (503, "1")
    assert body["error"]["type"] == "unavailable"


async def test_invalid_input_carries_no_hint(cluster: Cluster) -> None:
    _, refused = await grpc_refusal(cluster, prompt="")
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_hints(refused) == {}
    status, header, _ = await http_refusal(cluster, {**COMPLETION, "prompt": ""})
    assert (status, header) == (400, None)


async def test_a_stream_failing_after_its_first_token_carries_a_hint(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_with(BackendError("groq-0", "connection lost"), frames=1)(cluster, monkeypatch)
    received, refused = await grpc_refusal(cluster)
    assert received == 1
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert grpc_hints(refused) == dict.fromkeys(HINTS, "1000")
