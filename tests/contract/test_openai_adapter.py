"""The OpenAI-compatible adapter against a fake provider: streaming, keys, health, aborts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import structlog

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import (
    BackendLoad,
    ChatMessage,
    GenerationRequest,
    HandoffMode,
    KVHandle,
    Role,
    SamplingParams,
)
from backends.errors import BackendError, BackendRejectedError
from backends.openai import OpenAIBackend
from tests.contract.fake_openai import MODEL, PROMPT_TOKENS, FakeOpenAI
from tests.helpers import eventually

KEY = "gsk_test_0123456789abcdef"
KEY_ENV = "HETERO_ROUTER_TEST_OPENAI_KEY"


def request(*, chat: bool = True, stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest(
        request_id="req-1",
        model="llama-3.1-8b",
        prompt="Say hello",
        sampling=SamplingParams(max_tokens=32, temperature=0.5, top_p=0.9, seed=11, stop=stop),
        prompt_tokens=6,
        messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Say hello"))
        if chat
        else (),
    )


@pytest.fixture
async def provider() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(api_key=KEY, prefix="/openai/v1")
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def backend(
    provider: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[OpenAIBackend]:
    monkeypatch.setenv(KEY_ENV, KEY)
    adapter = OpenAIBackend(
        "groq-0",
        "api.groq.example:443",
        {"base_url": provider.base_url, "model": MODEL, "api_key_env": KEY_ENV},
    )
    await adapter.start()
    yield adapter
    await adapter.close()


def parse(frames: list[bytes]) -> list[router_pb2.GenerateResponse]:
    return [router_pb2.GenerateResponse.FromString(frame) for frame in frames]


async def test_streams_chat_with_usage_on_the_last_frame(
    provider: FakeOpenAI, backend: OpenAIBackend
) -> None:
    frames = [f async for f in backend.generate(request(stop=("\n",)), 5.0)]

    messages = parse(frames)
    assert "".join(m.text for m in messages) == "Hello world"
    assert all(not m.HasField("usage") for m in messages[:-1])
    assert messages[-1].finish_reason == router_pb2.FINISH_REASON_STOP
    assert messages[-1].usage.prompt_tokens == PROMPT_TOKENS
    assert messages[-1].usage.completion_tokens == 3
    (sent,) = provider.received
    assert sent.path == "/openai/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.body == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello"},
        ],
        "max_tokens": 32,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 11,
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": ["\n"],
    }


async def test_streams_text_completions_and_maps_length(
    provider: FakeOpenAI, backend: OpenAIBackend
) -> None:
    provider.finish_reason = "length"
    frames = [f async for f in backend.generate(request(chat=False), 5.0)]

    messages = parse(frames)
    assert "".join(m.text for m in messages) == "Hello world"
    assert messages[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH
    assert messages[-1].usage.completion_tokens == 3
    (sent,) = provider.received
    assert sent.path == "/openai/v1/completions"
    assert sent.body["prompt"] == "Say hello"
    assert "messages" not in sent.body


async def test_the_requests_trace_context_is_sent_with_it(
    provider: FakeOpenAI, backend: OpenAIBackend
) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    traced = replace(request(), traceparent=traceparent, tracestate="rojo=1")
    frames = [f async for f in backend.generate(traced, 5.0)]

    assert parse(frames)[-1].finish_reason == router_pb2.FINISH_REASON_STOP
    (sent,) = provider.received
    assert (sent.headers["traceparent"], sent.headers["tracestate"]) == (traceparent, "rojo=1")
    assert sent.headers["Authorization"] == f"Bearer {KEY}"  # the session's headers stay


async def test_other_finish_reasons_are_aborts(
    provider: FakeOpenAI, backend: OpenAIBackend
) -> None:
    provider.finish_reason = "content_filter"
    frames = [f async for f in backend.generate(request(), 5.0)]
    assert parse(frames)[-1].finish_reason == router_pb2.FINISH_REASON_ABORT


async def test_key_from_a_file(provider: FakeOpenAI, tmp_path: Path) -> None:
    key_file = tmp_path / "groq.key"
    key_file.write_text(KEY + "\n")
    adapter = OpenAIBackend(
        "groq-0", "unused:1", {"base_url": provider.base_url, "api_key_file": str(key_file)}
    )
    await adapter.start()
    try:
        assert (await adapter.check_health(1.0)).serving
    finally:
        await adapter.close()
    assert provider.received[0].headers["Authorization"] == f"Bearer {KEY}"


async def test_a_refused_key_never_shows_in_errors_reprs_or_logs(
    provider: FakeOpenAI, backend: OpenAIBackend
) -> None:
    provider.api_key = "the-provider-wants-another-key"  # it quotes the key it refused

    with structlog.testing.capture_logs() as logs:
        with pytest.raises(BackendError) as caught:
            [f async for f in backend.generate(request(), 5.0)]
        health = await backend.check_health(1.0)

    assert "HTTP 401" in caught.value.message
    assert not caught.value.retryable
    assert not health.serving
    shown = [str(caught.value), repr(caught.value), health.detail, repr(backend), str(logs)]
    shown += [repr(vars(backend)), str(backend.options)]
    assert all(KEY not in text for text in shown)
    assert provider.received[0].headers["Authorization"] == f"Bearer {KEY}"  # it was sent


async def test_keys_come_from_the_environment_or_a_file_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=KEY_ENV):
        OpenAIBackend("o", "h:1", {"api_key_env": KEY_ENV})
    with pytest.raises(ValueError, match="api_key_env or api_key_file") as inline:
        OpenAIBackend("o", "h:1", {"api_key": KEY})
    assert KEY not in str(inline.value)


async def test_health_is_the_models_listing(provider: FakeOpenAI, backend: OpenAIBackend) -> None:
    assert (await backend.check_health(1.0)).serving
    assert provider.received[-1].path == "/openai/v1/models"
    provider.models = ("some-other-model",)
    status = await backend.check_health(1.0)
    assert not status.serving
    assert MODEL in status.detail
    await provider.stop()
    assert not (await backend.check_health(1.0)).serving


async def test_default_base_url_is_the_address(
    provider: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = FakeOpenAI(api_key=KEY)  # a plain vLLM: /v1 on the backend's address
    await plain.start()
    monkeypatch.setenv(KEY_ENV, KEY)
    adapter = OpenAIBackend("vllm-0", plain.address, {"api_key_env": KEY_ENV})
    await adapter.start()
    try:
        frames = [f async for f in adapter.generate(request(), 5.0)]
    finally:
        await adapter.close()
        await plain.stop()
    assert "".join(m.text for m in parse(frames)) == "Hello world"
    assert plain.received[0].path == "/v1/chat/completions"
    assert plain.received[0].body["model"] == "llama-3.1-8b"  # no model option: the request's


async def test_server_errors_are_retryable(provider: FakeOpenAI, backend: OpenAIBackend) -> None:
    provider.status = 503
    with pytest.raises(BackendError) as caught:
        [f async for f in backend.generate(request(), 5.0)]
    assert caught.value.retryable
    assert caught.value.backend_id == "groq-0"
    assert not isinstance(caught.value, BackendRejectedError)


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_a_request_the_provider_refuses_as_invalid_is_the_clients_fault(
    provider: FakeOpenAI, backend: OpenAIBackend, status: int
) -> None:
    provider.status = status
    provider.error_message = "This model's maximum context length is 8192 tokens."
    with pytest.raises(BackendRejectedError) as caught:
        [f async for f in backend.generate(request(), 5.0)]
    assert (caught.value.grpc_status, caught.value.http_status) == ("INVALID_ARGUMENT", 400)
    assert not caught.value.retryable
    assert f"HTTP {status}: This model's maximum context length is 8192" in caught.value.message


@pytest.mark.parametrize(("code", "rejected"), [(400, True), (500, False)])
async def test_an_error_event_says_whose_fault_it_was_by_its_code(
    provider: FakeOpenAI, backend: OpenAIBackend, code: int, rejected: bool
) -> None:
    provider.error_after_chunks, provider.error_event_code = 0, code
    with pytest.raises(BackendError) as caught:
        [f async for f in backend.generate(request(), 5.0)]
    assert isinstance(caught.value, BackendRejectedError) is rejected
    assert caught.value.retryable is not rejected


async def test_an_error_event_mid_stream_raises(
    provider: FakeOpenAI, backend: OpenAIBackend
) -> None:
    provider.error_after_chunks = 1
    frames: list[bytes] = []
    with pytest.raises(BackendError) as caught:
        await collect_into(frames, backend.generate(request(), 5.0))
    assert [m.text for m in parse(frames)] == ["Hel"]
    assert "internal error" in caught.value.message


async def test_abort_closes_the_stream(provider: FakeOpenAI, backend: OpenAIBackend) -> None:
    provider.hold_after_chunks = 1
    stream = backend.generate(request(), 5.0)
    first = await anext(stream)
    assert router_pb2.GenerateResponse.FromString(first).text == "Hel"

    await backend.abort("req-1", 1.0)

    await eventually(lambda: provider.disconnected == 1, 1.0)
    with pytest.raises(BackendError):
        await asyncio.wait_for(anext(stream), 1.0)
    await backend.abort("never-seen", 1.0)  # unknown ids are not an error


async def test_leaving_the_stream_early_closes_it(
    provider: FakeOpenAI, backend: OpenAIBackend
) -> None:
    provider.hold_after_chunks = 2
    stream = backend.generate(request(), 5.0)
    await anext(stream)
    await stream.aclose()
    await eventually(lambda: provider.disconnected == 1, 1.0)


async def test_colocated_only(backend: OpenAIBackend) -> None:
    assert backend.capabilities.roles == {Role.DECODE, Role.BOTH}
    assert backend.capabilities.handoff_modes == {HandoffMode.NONE}
    assert await backend.load(1.0) == BackendLoad()
    with pytest.raises(BackendError) as prefill:
        await backend.prefill(request(), 1.0)
    assert not prefill.value.retryable
    with pytest.raises(BackendError) as decode:
        backend.decode(request(), KVHandle(backend_id="x", request_id="req-1"), 5, 1.0)
    assert not decode.value.retryable
    assert "colocated only" in prefill.value.message
    assert "colocated only" in decode.value.message


async def collect_into(frames: list[bytes], stream: AsyncIterator[bytes]) -> None:
    """Keeps the frames that arrived before a stream failed."""
    async for frame in stream:
        frames.append(frame)
