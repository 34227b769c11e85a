"""Overload at the doors: streams whose reader stopped are cut and their backend work
aborted, one client cannot take every slot, refusals say why, readiness says saturated.

A scripted backend streams large frames for as long as it is read, so a reader that
stops really fills the flow-control windows (gRPC with BDP probing off: 64 KiB per
stream; HTTP: a small socket receive buffer) and the router's writes really block.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import grpc
import pytest

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import (
    GenerationRequest,
)
from router.client import GENERATE_METHOD
from router.daemon import Daemon
from tests.helpers import eventually, sample_total
from tests.recording import stub_router
from tests.stubs import StubBackend

FRAME_TEXT = "x" * 16384
# Without BDP probing a stream's window stays at 64 KiB: the server blocks soon.
SMALL_WINDOWS = [("grpc.http2.bdp_probe", 0)]


class Firehose(StubBackend):
    """Streams 16 KiB frames until aborted; a prompt starting "short" gets three small."""

    aborted: ClassVar[list[str]] = []  # by the ids their clients sent
    client_ids: ClassVar[dict[str, str]] = {}  # the router's id -> the client's
    started = 0  # endless streams begun
    streaming = 0  # endless streams running now
    peak = 0  # the most running at once

    async def generate(
        self, request: GenerationRequest, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        Firehose.client_ids[request.request_id] = request.shown_id
        if request.prompt.startswith("short"):
            for index in range(3):
                yield router_pb2.GenerateResponse(token_ids=[index], text="ok").SerializeToString()
            done = router_pb2.GenerateResponse(finish_reason=router_pb2.FINISH_REASON_STOP)
            done.usage.completion_tokens = 3
            yield done.SerializeToString()
            return
        Firehose.started += 1
        Firehose.streaming += 1
        Firehose.peak = max(Firehose.peak, Firehose.streaming)
        try:
            while True:
                await asyncio.sleep(0)  # as a real backend, it does not own the loop
                frame = router_pb2.GenerateResponse(token_ids=[1], text=FRAME_TEXT)
                yield frame.SerializeToString()
        finally:
            Firehose.streaming -= 1

    async def abort(self, request_id: str, timeout_s: float) -> None:
        Firehose.aborted.append(Firehose.client_ids.get(request_id, request_id))


@contextlib.asynccontextmanager
async def router(monkeypatch: pytest.MonkeyPatch, **settings: Any) -> AsyncIterator[Daemon]:
    Firehose.client_ids = {}
    Firehose.aborted, Firehose.started, Firehose.streaming, Firehose.peak = [], 0, 0, 0
    async with stub_router(monkeypatch, Firehose, **settings) as daemon:
        yield daemon


def generate_call(channel: grpc.aio.Channel) -> Any:
    return channel.unary_stream(
        GENERATE_METHOD,
        request_serializer=router_pb2.GenerateRequest.SerializeToString,
        response_deserializer=router_pb2.GenerateResponse.FromString,
    )


def metric(daemon: Daemon, name: str, **labels: str) -> float:
    return sample_total(daemon.registry, name, **labels)


async def test_a_grpc_stream_nobody_reads_is_cancelled_and_its_backend_aborted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with (
        router(monkeypatch, write_stall_timeout_s=0.2) as daemon,
        grpc.aio.insecure_channel(f"127.0.0.1:{daemon.grpc_port}", options=SMALL_WINDOWS) as ch,
    ):
        call = generate_call(ch)(router_pb2.GenerateRequest(request_id="stalled", prompt="go"))
        await eventually(lambda: Firehose.aborted == ["stalled"])  # its KV is freed
        assert metric(daemon, "hetero_router_write_stalls_total", door="grpc") == 1
        assert daemon.dispatcher.admission.in_flight == 0
        # A reader that reads is never cut, however long its stream.
        reading = generate_call(ch)(router_pb2.GenerateRequest(request_id="read", prompt="go"))
        received = 0
        async for _ in reading:
            received += 1
            if received == 200:  # 3 MiB: far past any window
                break
        reading.cancel()
        await eventually(lambda: "read" in Firehose.aborted)
        assert metric(daemon, "hetero_router_write_stalls_total", door="grpc") == 1
        call.cancel()


async def test_an_http_stream_nobody_reads_is_cut_and_its_backend_aborted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with router(monkeypatch, write_stall_timeout_s=0.2) as daemon:
        loop = asyncio.get_running_loop()
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
        raw.setblocking(False)
        await loop.sock_connect(raw, ("127.0.0.1", daemon.http_port))
        body = json.dumps({"prompt": "go", "stream": True}).encode()
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-Request-Id: stalled\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        await loop.sock_sendall(raw, head.encode() + body)
        try:
            await eventually(lambda: Firehose.aborted == ["stalled"])
            assert metric(daemon, "hetero_router_write_stalls_total", door="http") == 1
            assert daemon.dispatcher.admission.in_flight == 0
        finally:
            raw.close()


@pytest.mark.slow  # 1,100 calls, and the write-stall timeout must outlast their arrival
async def test_a_thousand_abandoned_streams_of_one_client_leave_another_served(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha\nbeta\n")
    settings = {
        "auth_token_file": tokens,
        "max_streams_per_client": 16,
        "concurrency_initial_limit": 32,
        "write_stall_timeout_s": 2.0,  # longer than the calls take to arrive
    }
    async with (
        router(monkeypatch, **settings) as daemon,
        grpc.aio.insecure_channel(f"127.0.0.1:{daemon.grpc_port}", options=SMALL_WINDOWS) as a,
        grpc.aio.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as b,
    ):
        alpha = (("authorization", "Bearer alpha"),)
        abandoned = [
            generate_call(a)(router_pb2.GenerateRequest(prompt="go"), metadata=alpha)
            for _ in range(1100)
        ]  # opened, never read

        def refused() -> float:
            return metric(daemon, "hetero_router_shed_total", reason="client_cap") or 0.0

        # Each call is answered at once (refused) or admitted (and then never read).
        await eventually(
            lambda: sum(call.done() for call in abandoned) + Firehose.started == 1100,
            timeout_s=20,
        )
        assert refused() >= 1000  # at once, not after a deadline
        assert Firehose.peak == 16  # the client never held more
        # Another client is served in full beside the ones that sit unread.
        beta = (("authorization", "Bearer beta"),)
        request = router_pb2.GenerateRequest(prompt="short")
        served = [r async for r in generate_call(b)(request, metadata=beta)]
        assert served[-1].finish_reason == router_pb2.FINISH_REASON_STOP
        # The abandoned streams are cut at the write-stall timeout, their work aborted.
        await eventually(lambda: len(Firehose.aborted) == Firehose.started)
        assert Firehose.streaming == 0
        assert daemon.dispatcher.admission.in_flight == 0
        refusal = next(call for call in abandoned if call.done())
        assert await refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this token has 16 streams open" in (await refusal.details() or "")
        for call in abandoned:
            call.cancel()


async def test_http_refusals_are_429_with_the_cap_and_a_retry_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with (
        router(monkeypatch, max_streams_per_client=1, write_stall_timeout_s=30) as daemon,
        aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}") as session,
        session.post("/v1/completions", json={"prompt": "go", "stream": True}) as first,
    ):
        await first.content.readline()  # streaming: the client's one stream is open
        async with session.post("/v1/completions", json={"prompt": "short"}) as second:
            assert second.status == 429
            assert second.headers["Retry-After"] == "1"
            error = (await second.json())["error"]
            assert error["type"] == "rate_limit_exceeded"
            assert error["message"].startswith("client 127.0.0.1 has 1 streams open")
        readiness = await (await session.get("/readyz")).json()
        assert readiness["status"] == "ready"
        assert "saturated" not in readiness["detail"]


async def test_readiness_says_saturated_and_stays_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"adaptive_concurrency": False, "max_in_flight": 1, "write_stall_timeout_s": 30}
    async with (
        router(monkeypatch, **settings) as daemon,
        aiohttp.ClientSession(f"http://127.0.0.1:{daemon.http_port}") as session,
        session.post("/v1/completions", json={"prompt": "go", "stream": True}) as held,
    ):
        await held.content.readline()
        response = await session.get("/readyz")
        assert response.status == 200
        detail = (await response.json())["detail"]
        assert detail == "1/1 backends healthy; saturated: limit 1, 1 in flight, 0 queued"
