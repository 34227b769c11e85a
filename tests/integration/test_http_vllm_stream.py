"""What an HTTP client sees of a split stream through the vllm adapter, whether the
engine writes its events one at a time or all in one write (one read for the router,
whose events then go out together): the same OpenAI events, in order, one ``data:``
line each, with the stream's id and model, the finish reason on the last chunk, the
usage chunk when asked for, and ``[DONE]``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from backends.base import Role
from bench.fake_vllm import FakeVllm
from router.daemon import Daemon
from router.settings import BackendConfig, PoolConfig, Settings

MODEL = "llama-3.1-8b"
TOKENS = 4


@pytest.fixture(params=["one write per event", "all events in one write"])
async def door(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, FakeVllm]]:
    issued: dict[str, dict[str, Any]] = {}
    engines = FakeVllm(issued=issued), FakeVllm(issued=issued)
    if request.param == "all events in one write":
        engines[1].runaway_chunks = TOKENS
    for engine in engines:
        await engine.start()
    backends = tuple(
        BackendConfig(id=name, kind="vllm", address=engine.address, role=role, model=MODEL,
                      options={"model": "meta-llama/Llama-3.1-8B-Instruct"})
        for name, role, engine in zip(("p", "d"), (Role.PREFILL, Role.DECODE), engines, strict=True)
    )  # fmt: skip
    settings = Settings(grpc_address="127.0.0.1:0", http_address="127.0.0.1:0", drain_grace_s=0)
    daemon = Daemon(settings, PoolConfig(backends=backends))
    await daemon.start()
    try:
        yield f"http://127.0.0.1:{daemon.http_port}", engines[1]
    finally:
        await daemon.stop()
        for engine in engines:
            await engine.stop()


async def stream(url: str, path: str, body: dict[str, Any]) -> list[bytes]:
    """The body's events, each as the bytes after ``data: ``."""
    async with aiohttp.ClientSession() as session, session.post(url + path, json=body) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "text/event-stream"
        raw = await reply.read()
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    for event in events:
        assert event.startswith(b"data: ")
        assert b"\n" not in event  # one data line each
    return [event.removeprefix(b"data: ") for event in events]


@pytest.mark.parametrize("chat", [False, True])
async def test_the_client_sees_one_stream_of_openai_events(
    door: tuple[str, FakeVllm], chat: bool
) -> None:
    url, decode_engine = door
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
        "disaggregation": "split",
    }
    if chat:
        body["messages"] = [{"role": "user", "content": "one two three"}]
    else:
        body["prompt"] = "one two three"
    path = "/v1/chat/completions" if chat else "/v1/completions"

    events = await stream(url, path, body)

    assert events[-1] == b"[DONE]"
    payloads = [json.loads(event) for event in events[:-1]]
    heads = {(p["id"], p["object"], p["created"], p["model"]) for p in payloads}
    assert len(heads) == 1
    chunk_id, kind, _, model = heads.pop()
    assert chunk_id.startswith("chatcmpl-" if chat else "cmpl-")
    assert kind == ("chat.completion.chunk" if chat else "text_completion")
    assert model == MODEL
    *chunks, usage = payloads
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == TOKENS
    total = usage["usage"]["prompt_tokens"] + TOKENS
    assert usage["usage"]["total_tokens"] == total
    choices = [chunk["choices"][0] for chunk in chunks]
    assert [c["finish_reason"] for c in choices[:-1]] == [None] * (len(choices) - 1)
    assert choices[-1]["finish_reason"] == "length"
    key = "delta" if chat else "text"
    texts = [c["delta"]["content"] if chat else c["text"] for c in choices]
    if chat:
        assert choices[0]["delta"]["role"] == "assistant"
        assert all("role" not in c["delta"] for c in choices[1:])
    else:
        assert all(c["logprobs"] is None for c in choices)
    assert key in choices[0]
    expected = " x" * TOKENS if decode_engine.runaway_chunks else "".join(decode_engine.tokens)
    assert "".join(texts) == expected
