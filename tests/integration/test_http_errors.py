"""The HTTP door's catch-all: an unexpected error is a bare 500 (an error event once a stream
has begun), logged once, never a trace."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import pytest
import structlog

from router.scheduling.snapshot import PoolSnapshot
from tests.conftest import Cluster

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
