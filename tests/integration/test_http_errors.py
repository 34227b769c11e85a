"""The HTTP door's own errors: an unexpected error is a bare 500 (an error event once a stream
has begun), logged once, never a trace; unknown routes and methods are JSON 404 / 405; slow
and greedy clients (slowloris, short bodies, too many connections) are cut off."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import pytest
import structlog
from prometheus_client import CollectorRegistry

from router.api.http_server import AdminServer
from router.scheduling.snapshot import PoolSnapshot
from router.settings import Settings
from tests.conftest import Cluster, start_cluster, stop_cluster

COMPLETION = {"model": "llama-3.1-8b", "prompt": "fail me", "max_tokens": 8, "temperature": 0}
FAILED = "http request failed unexpectedly"


@pytest.fixture
def aiohttp_errors(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """What aiohttp itself logs: nothing, when the catch-all has handled an error."""
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    return caplog


def errors_logged_by_aiohttp(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_an_unexpected_error_on_an_openai_route_is_a_json_500(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, aiohttp_errors: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> AsyncGenerator[bytes, None]:
        raise RuntimeError("internal detail")
        yield b""  # an async generator, as the dispatcher's is

    monkeypatch.setattr(cluster.daemon.dispatcher, "generate", broken)
    with structlog.testing.capture_logs() as logs:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{cluster.admin_url}/v1/completions", json=COMPLETION) as reply,
        ):
            assert reply.status == 500
            assert reply.content_type == "application/json"
            body = await reply.text()
    assert "internal detail" not in body
    assert "Traceback" not in body
    assert json.loads(body) == {
        "error": {"message": "internal error", "type": "server_error", "param": None, "code": None}
    }
    assert [event["error_type"] for event in logs if event["event"] == FAILED] == ["RuntimeError"]
    assert errors_logged_by_aiohttp(aiohttp_errors) == []


async def test_an_unexpected_error_on_a_probe_is_a_json_500(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, aiohttp_errors: pytest.LogCaptureFixture
) -> None:
    def broken() -> PoolSnapshot:
        raise KeyError("internal detail")

    monkeypatch.setattr(cluster.daemon.pool, "snapshot", broken)
    with structlog.testing.capture_logs() as logs:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{cluster.admin_url}/readyz") as reply,
        ):
            assert reply.status == 500
            assert await reply.json() == {"status": "error", "detail": "internal error"}
    assert [event["error_type"] for event in logs if event["event"] == FAILED] == ["KeyError"]
    assert errors_logged_by_aiohttp(aiohttp_errors) == []


async def test_an_unexpected_error_mid_stream_ends_it_with_an_error_event(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, aiohttp_errors: pytest.LogCaptureFixture
) -> None:
    real = cluster.daemon.dispatcher.generate

    async def breaks_after_a_frame(*args: Any, **kwargs: Any) -> AsyncGenerator[bytes, None]:
        async with contextlib.aclosing(real(*args, **kwargs)) as frames:
            yield await anext(frames)
        raise RuntimeError("internal detail")

    monkeypatch.setattr(cluster.daemon.dispatcher, "generate", breaks_after_a_frame)
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            stream = {**COMPLETION, "stream": True}
            async with session.post(f"{cluster.admin_url}/v1/completions", json=stream) as reply:
                assert reply.status == 200
                events = (await reply.text()).split("\n\n")
    assert events[0].startswith("data: {")
    assert json.loads(events[1].removeprefix("data: ")) == {
        "error": {"message": "internal error", "type": "server_error", "param": None, "code": None}
    }
    assert events[2:] == [""]  # the stream ended there: no [DONE]
    assert [event["error_type"] for event in logs if event["event"] == FAILED] == ["RuntimeError"]
    assert errors_logged_by_aiohttp(aiohttp_errors) == []


@pytest.mark.parametrize(
    ("method", "path", "status", "body"),
    [
        ("GET", "/v1/nowhere", 404, {"code": "unknown_url", "param": None}),
        ("GET", "/v1/completions", 405, {"code": "method_not_allowed", "param": None}),
        ("DELETE", "/v1/models", 405, {"code": "method_not_allowed", "param": None}),
    ],
)
async def test_unknown_openai_routes_and_methods_are_openai_errors(
    cluster: Cluster, method: str, path: str, status: int, body: dict[str, Any]
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{cluster.admin_url}{path}") as reply,
    ):
        assert reply.status == status
        error = (await reply.json())["error"]
        allow = reply.headers.get("Allow")
    assert {key: error[key] for key in body} == body
    assert error["type"] == "invalid_request_error"
    assert path in error["message"]
    assert (allow is not None) == (status == 405)


async def test_unknown_routes_elsewhere_are_probe_shaped_json(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cluster.admin_url}/{'x' * 5000}") as reply:
            assert reply.status == 404
            body = await reply.json()
        async with session.post(f"{cluster.admin_url}/healthz") as reply:
            assert reply.status == 405
            assert (await reply.json())["status"] == "error"
    assert body["status"] == "error"
    assert len(body["detail"]) < 120  # the path is cut when echoed


async def test_health_is_an_alias_of_healthz(cluster: Cluster) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{cluster.admin_url}/health") as reply,
    ):
        assert reply.status == 200
        assert await reply.json() == {"status": "ok"}


# Timeouts short enough for a test, a test-side wait long enough for a loaded machine.
SLOW = {"http_header_timeout_s": 0.2, "http_keepalive_timeout_s": 0.2, "http_body_timeout_s": 0.6}
GENEROUS_S = 20.0


@contextlib.asynccontextmanager
async def openai_door(**settings: Any) -> AsyncIterator[int]:
    running = await start_cluster(**settings)
    try:
        yield running.daemon.http_port
    finally:
        await stop_cluster(running)


@contextlib.asynccontextmanager
async def admin_server(**settings: Any) -> AsyncIterator[int]:
    """The HTTP door without the OpenAI routes: enough for what happens per connection."""
    server = AdminServer(
        CollectorRegistry(), lambda: (True, "ok"), "127.0.0.1:0", settings=Settings(**settings)
    )
    port = await server.start()
    try:
        yield port
    finally:
        await server.stop()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def closed_by_the_server(reader: asyncio.StreamReader) -> bytes:
    """All the server sent until it closed the connection (the test fails if it never does)."""
    return await asyncio.wait_for(reader.read(), GENEROUS_S)


HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


async def answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The head and body of the next answer on a connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GENEROUS_S)
    length = next(
        int(line.partition(b":")[2])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await asyncio.wait_for(reader.readexactly(length), GENEROUS_S)


async def served(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Sends a probe on a kept-alive connection and reads its whole answer."""
    writer.write(HEALTH)
    head, body = await answer(reader)
    return head + body


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaa"])
async def test_a_connection_that_never_finishes_its_request_head_is_closed(sent: bytes) -> None:
    # Its own deadline, not the keep-alive timeout's (far longer here).
    async with admin_server(**{**SLOW, "http_keepalive_timeout_s": 600}) as port:
        reader, writer = await connect(port)
        writer.write(sent)
        assert await closed_by_the_server(reader) == b""
        writer.close()


async def test_a_kept_alive_connection_is_closed_when_idle_or_slow_with_its_next_head() -> None:
    async with admin_server(**SLOW) as port:
        reader, writer = await connect(port)
        assert b" 200 OK" in await served(reader, writer)
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # and no more
        assert await closed_by_the_server(reader) == b""
        writer.close()


async def test_a_body_shorter_than_its_content_length_times_out_with_408() -> None:
    # The head completes at once; the body never does. A 408 (not a bare close at the
    # header deadline, which is shorter) also shows the head met its deadline.
    async with openai_door(**SLOW) as port:
        reader, writer = await connect(port)
        writer.write(
            b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"pro'
        )
        head, body = await answer(reader)
        writer.close()
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in head  # aiohttp lingers a while for the rest, then closes
    error = json.loads(body)["error"]
    assert error["code"] == "timeout"
    assert "did not arrive within 0.6 s" in error["message"]


async def test_a_body_over_the_cap_is_413() -> None:
    async with openai_door(http_max_body_bytes=1024) as port:
        reader, writer = await connect(port)
        body = b'{"prompt": "' + b"x" * 2000 + b'"}'
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        reply = await closed_by_the_server(reader)
        writer.close()
    assert reply.startswith(b"HTTP/1.1 413 ")
    error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
    assert (error["code"], error["type"]) == ("request_too_large", "invalid_request_error")


async def test_connections_past_the_cap_get_503_and_are_closed() -> None:
    async with admin_server(http_max_connections=2) as port:
        held = [await connect(port) for _ in range(2)]
        for reader, writer in held:  # admitted: each is served
            assert b" 200 OK" in await served(reader, writer)
        reader, writer = await connect(port)
        reply = await closed_by_the_server(reader)
        writer.close()
        assert reply.startswith(b"HTTP/1.1 503 ")
        assert b"Retry-After: 1" in reply
        error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "too_many_connections"
        assert b" 200 OK" in await served(*held[0])  # those admitted are still served
        held[0][1].close()
        # A closed connection frees its place, once the server has seen it go.
        for _attempt in range(500):
            status = await status_of_one_request(port)
            if status != 503:
                break
            await asyncio.sleep(0.01)
        assert status == 200
        held[1][1].close()


async def status_of_one_request(port: int) -> int:
    reader, writer = await connect(port)
    writer.write(HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    reply = await closed_by_the_server(reader)
    writer.close()
    return int(reply.split()[1])


async def test_a_request_aiohttp_cannot_parse_is_logged_as_one_line(
    aiohttp_errors: pytest.LogCaptureFixture,
) -> None:
    async with admin_server() as port:
        reader, writer = await connect(port)
        with structlog.testing.capture_logs() as logs:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n")
            reply = await closed_by_the_server(reader)
        writer.close()
    assert reply.startswith(b"HTTP/1.0 400 ")  # aiohttp's own answer, before the door
    assert [(event["event"], event["log_level"]) for event in logs] == [
        ("malformed http request", "info")
    ]
    assert errors_logged_by_aiohttp(aiohttp_errors) == []
