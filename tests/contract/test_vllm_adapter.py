"""The vLLM adapter against a fake vLLM server that checks the NixlConnector P/D protocol."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import ChatMessage, GenerationRequest, KVHandle, Role, SamplingParams
from backends.errors import BackendError, BackendRejectedError
from backends.http_common import SSEEvent, iter_sse
from backends.vllm import KV_USAGE_SCALE, VllmBackend, listed_max_model_len
from bench.fake_vllm import PREFILL_KV_REQUEST, FakeVllm
from router.dispatch.dispatcher import Dispatcher
from router.metrics import RouterMetrics
from router.pool.registry import Pool
from router.scheduling.plan import Disaggregation
from router.scheduling.registry import build_scheduler
from router.settings import BackendConfig, PoolConfig, Settings

SERVED_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SAMPLING = SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9, seed=42, stop=("\n\n",))


def completion(request_id: str = "r1", **sampling: Any) -> GenerationRequest:
    params = SamplingParams(**{**SAMPLING.__dict__, **sampling})
    return GenerationRequest(request_id, "llama-3.1-8b", "Tell me about Kermit", params, 6)


def chat(request_id: str = "c1") -> GenerationRequest:
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Who is Kermit?"))
    return GenerationRequest(request_id, "llama-3.1-8b", "<rendered>", SAMPLING, 12, messages)


@pytest.fixture
async def fake() -> AsyncIterator[FakeVllm]:
    server = FakeVllm()
    await server.start()
    yield server
    await server.stop()


async def started(address: str, **options: Any) -> VllmBackend:
    adapter = VllmBackend("vllm-0", address, {"model": SERVED_MODEL, **options})
    await adapter.start()
    return adapter


@pytest.fixture
async def backend(fake: FakeVllm) -> AsyncIterator[VllmBackend]:
    adapter = await started(fake.address)
    yield adapter
    await adapter.close()


async def collect(frames: AsyncIterator[bytes]) -> list[router_pb2.GenerateResponse]:
    return [router_pb2.GenerateResponse.FromString(frame) async for frame in frames]


async def drain(frames: AsyncIterator[bytes], into: list[bytes]) -> None:
    """Reads frames until the stream ends or fails, keeping those that arrived."""
    async for frame in frames:
        into.append(frame)


def base_body(**changes: Any) -> dict[str, Any]:
    body = {
        "model": SERVED_MODEL,
        "prompt": "Tell me about Kermit",
        "max_tokens": 16,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 42,
        "stop": ["\n\n"],
        "return_token_ids": True,
    }
    return {**body, **changes}


async def test_prefill_sends_exactly_vllms_prefill_request(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    result = await backend.prefill(completion(), timeout_s=5)

    (leg,) = fake.legs("r1")
    assert leg.path == "/v1/completions"
    assert leg.headers["X-Request-Id"] == "r1"
    assert leg.body == base_body(kv_transfer_params=PREFILL_KV_REQUEST, stream=False, max_tokens=1)
    assert fake.violations == []
    assert (result.first_frame, result.first_token_id) == (b"", -1)
    assert (result.prompt_tokens, result.finished) == (fake.prompt_tokens, False)
    assert result.handle is not None
    assert (result.handle.backend_id, result.handle.request_id) == ("vllm-0", "r1")
    assert result.handle.transport_params == fake.issued["cmpl-r1-0"]


async def test_both_legs_send_the_requests_trace_context(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    traced = replace(completion(), traceparent=traceparent, tracestate="rojo=1")
    prefill = await backend.prefill(traced, timeout_s=5)
    assert prefill.handle is not None
    await collect(backend.decode(traced, prefill.handle, -1, timeout_s=5))
    await backend.prefill(completion("r2"), timeout_s=5)

    legs = fake.legs("r1")
    assert [leg.headers["traceparent"] for leg in legs] == [traceparent] * 2
    assert [leg.headers["tracestate"] for leg in legs] == ["rojo=1"] * 2
    (untraced,) = fake.legs("r2")
    assert "traceparent" not in untraced.headers
    assert "tracestate" not in untraced.headers


async def test_decode_restores_the_body_and_forwards_the_kv_params_unchanged(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    prefill = await backend.prefill(completion(), timeout_s=5)
    assert prefill.handle is not None

    responses = await collect(backend.decode(completion(), prefill.handle, -1, timeout_s=5))

    decode_leg = fake.legs("r1")[1]
    assert decode_leg.headers["X-Request-Id"] == "r1"
    issued = fake.issued["cmpl-r1-0"]
    assert decode_leg.body == base_body(
        stream=True, stream_options={"include_usage": True}, kv_transfer_params=issued
    )
    assert fake.violations == []
    assert "".join(r.text for r in responses) == "Hello, world!"
    assert [r.finish_reason for r in responses[:-1]] == [0] * (len(responses) - 1)
    assert all(r.text for r in responses)  # empty chunks are not forwarded
    last = responses[-1]
    assert last.finish_reason == router_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, 4)


async def test_chat_sends_messages_to_the_chat_endpoint(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    fake.decode_finish_reason = "stop"
    prefill = await backend.prefill(chat(), timeout_s=5)
    assert prefill.handle is not None
    responses = await collect(backend.decode(chat(), prefill.handle, -1, timeout_s=5))

    prefill_leg, decode_leg = fake.legs("c1")
    assert prefill_leg.path == decode_leg.path == "/v1/chat/completions"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who is Kermit?"},
    ]
    assert prefill_leg.body is not None
    assert prefill_leg.body["messages"] == messages
    assert "prompt" not in prefill_leg.body
    assert (prefill_leg.body["max_tokens"], prefill_leg.body["max_completion_tokens"]) == (1, 1)
    assert decode_leg.body is not None
    assert decode_leg.body["max_tokens"] == 16
    assert "max_completion_tokens" not in decode_leg.body
    assert fake.violations == []
    assert "".join(r.text for r in responses) == "Hello, world!"
    assert responses[-1].finish_reason == router_pb2.FINISH_REASON_STOP


async def test_generate_is_a_plain_streaming_completion(fake: FakeVllm) -> None:
    adapter = VllmBackend("vllm-1", fake.address, {"return_token_ids": True})
    await adapter.start()
    try:
        request = completion("g1", seed=2**64 - 1)
        responses = await collect(adapter.generate(request, timeout_s=5))
    finally:
        await adapter.close()

    (leg,) = fake.legs("g1")
    assert leg.body is not None
    assert leg.body["model"] == "llama-3.1-8b"  # no served name configured: the request's
    assert "kv_transfer_params" not in leg.body
    assert leg.body["seed"] == 2**63 - 1  # vLLM takes signed 64-bit seeds
    assert [token for r in responses for token in r.token_ids] == [100, 101, 102, 103]
    assert responses[-1].usage.completion_tokens == 4


async def test_finished_legs_hand_their_connection_back_to_the_pool(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    # A new connection per leg would add a TCP handshake to every time to first token.
    for request_id in ("k1", "k2"):
        prefill = await backend.prefill(completion(request_id), timeout_s=5)
        assert prefill.handle is not None
        await collect(backend.decode(completion(request_id), prefill.handle, -1, timeout_s=5))
    assert len({leg.client_port for leg in fake.requests}) == 1


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (400, False)])
async def test_a_refused_prefill_says_whether_another_engine_may_serve_it(
    fake: FakeVllm, backend: VllmBackend, status: int, retryable: bool
) -> None:
    fake.prefill_status = status
    with pytest.raises(BackendError) as caught:
        await backend.prefill(completion(), timeout_s=5)
    assert caught.value.retryable is retryable
    assert f"HTTP {status}" in caught.value.message
    assert "prefill engine failed" in caught.value.message
    assert isinstance(caught.value, BackendRejectedError) is (status == 400)


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_a_request_the_engine_refuses_as_invalid_is_the_clients_fault(
    fake: FakeVllm, backend: VllmBackend, status: int
) -> None:
    fake.prefill_status = status
    with pytest.raises(BackendRejectedError) as caught:
        await backend.prefill(completion(), timeout_s=5)
    assert (caught.value.grpc_status, caught.value.http_status) == ("INVALID_ARGUMENT", 400)
    assert not caught.value.retryable
    assert f"HTTP {status}: prefill engine failed" in caught.value.message


async def test_the_engines_own_length_refusal_keeps_its_words(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    # The adapter has not learnt the limit here: the engine's 400 is all there is.
    fake.max_model_len = 16  # the prompt is 4 tokens: 4 + 16 is over, and still served
    await collect(backend.generate(completion("g0"), timeout_s=5))
    fake.max_model_len = 8  # max_tokens 16 is beyond the context
    with pytest.raises(BackendRejectedError, match="max_tokens=16 cannot be greater"):
        await collect(backend.generate(completion("g1"), timeout_s=5))
    fake.max_model_len = 3
    with pytest.raises(BackendRejectedError, match="maximum context length is 3 tokens"):
        await backend.prefill(completion("r2", max_tokens=2), timeout_s=5)


async def test_without_kv_params_the_decode_leg_prefills_locally(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    fake.prefill_kv = False  # an engine started without the NIXL connector
    prefill = await backend.prefill(completion(), timeout_s=5)
    assert not prefill.finished
    assert prefill.handle is not None
    assert prefill.handle.transport_params == {}

    responses = await collect(backend.decode(completion(), prefill.handle, -1, timeout_s=5))

    decode_leg = fake.legs("r1")[1]
    assert decode_leg.body == base_body(stream=True, stream_options={"include_usage": True})
    assert "".join(r.text for r in responses) == "Hello, world!"


async def test_a_prefill_that_stopped_is_the_whole_answer(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    # vLLM keeps no KV for a request that stopped at its first token (EOS, stop string).
    fake.prefill_kv = False
    fake.prefill_finish_reason = "stop"
    prefill = await backend.prefill(completion(), timeout_s=5)

    assert prefill.finished
    assert prefill.handle is None
    answer = router_pb2.GenerateResponse.FromString(prefill.first_frame)
    assert answer.finish_reason == router_pb2.FINISH_REASON_STOP
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 1)


async def test_a_decode_refused_before_streaming_fails_the_leg(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    fake.decode_status = 503
    handle = KVHandle("vllm-0", "r1")
    with pytest.raises(BackendError, match="HTTP 503: decode engine unavailable") as caught:
        await collect(backend.decode(completion(), handle, -1, timeout_s=5))
    assert caught.value.retryable


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("drop_after", "connection failed"),
        ("end_after", "stream ended early"),
        ("error_after", "engine core died"),
    ],
)
async def test_a_stream_broken_mid_way_fails_after_the_frames_it_gave(
    fake: FakeVllm, backend: VllmBackend, mode: str, message: str
) -> None:
    setattr(fake, mode, 2)
    received: list[bytes] = []
    with pytest.raises(BackendError, match=message) as caught:
        await drain(backend.generate(completion(), timeout_s=5), received)
    # The two tokens sent before the failure reach the client, in one frame or two.
    frames = [router_pb2.GenerateResponse.FromString(frame) for frame in received]
    assert [token for frame in frames for token in frame.token_ids] == [100, 101]
    assert "".join(frame.text for frame in frames) == "Hello,"
    assert caught.value.retryable


async def test_a_slow_prefill_times_out_quickly(fake: FakeVllm, backend: VllmBackend) -> None:
    fake.prefill_delay_s = 3600  # it never answers: only the leg's own deadline ends it
    with pytest.raises(BackendError, match=r"no answer within 0\.2 s") as caught:
        await backend.prefill(completion(), timeout_s=0.2)
    assert caught.value.retryable
    await fake.wait_for(lambda: "r1" in fake.disconnected)  # the engine was told


async def test_a_silent_stream_times_out_on_the_idle_limit(fake: FakeVllm) -> None:
    # The engine goes silent for longer than the test may run and the leg's total
    # deadline is as far: only the idle limit can end the stream.
    fake.chunk_delay_s = 3600
    adapter = await started(fake.address, timeout_idle_s=0.2)
    try:
        frames = adapter.generate(completion(), timeout_s=3600)
        assert router_pb2.GenerateResponse.FromString(await anext(frames)).text == "Hello"
        with pytest.raises(BackendError, match="timed out") as caught:
            await anext(frames)
    finally:
        await adapter.close()
    assert "no answer within 3600 s" not in caught.value.message
    assert caught.value.retryable


async def test_an_unreachable_engine_is_a_retryable_failure() -> None:
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    adapter = await started(address)
    try:
        with pytest.raises(BackendError, match="connection failed") as caught:
            await adapter.prefill(completion(), timeout_s=2)
        health = await adapter.check_health(timeout_s=2)
    finally:
        await adapter.close()
    assert caught.value.retryable
    assert not health.serving
    assert "connection failed" in health.detail


async def test_health_follows_the_engines_health_endpoint(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    assert (await backend.check_health(timeout_s=2)).serving
    fake.health_status = 503
    status = await backend.check_health(timeout_s=2)
    assert not status.serving
    assert "HTTP 503" in status.detail
    assert status.model == ""  # vLLM's served name need not be the pool's model name


METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m \\"quoted\\", {odd}"} 3.0
vllm:num_requests_running{engine="1",model_name="m \\"quoted\\", {odd}"} 2.0
vllm:num_requests_running_other_metric{engine="0"} 99.0
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000"} 1.0
vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="1000"} 1.0
vllm:request_prompt_tokens_bucket{engine="0",le="+Inf",model_name="m"} 12.0
"""


async def test_load_reads_queue_depth_and_kv_tokens(fake: FakeVllm, backend: VllmBackend) -> None:
    fake.metrics_text = METRICS
    load = await backend.load(timeout_s=2)
    assert (load.running, load.waiting) == (5, 5)
    # Capacity from cache_config_info: 2 engines x 1000 blocks x 16 tokens.
    assert (load.kv_tokens_used, load.kv_tokens_capacity) == (12000, 32000)


async def test_load_falls_back_to_a_usage_scale_without_capacity(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    fake.metrics_text = 'vllm:gpu_cache_usage_perc{model_name="m"} 0.42\n'  # an older vLLM
    load = await backend.load(timeout_s=2)
    assert (load.running, load.waiting) == (0, 0)
    assert (load.kv_tokens_used, load.kv_tokens_capacity) == (420, KV_USAGE_SCALE)


async def test_abort_closes_the_open_stream_and_the_engine_sees_it(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    fake.tokens = [f"t{i} " for i in range(500)]
    fake.chunk_delay_s = 0.01
    frames = backend.generate(completion("a1"), timeout_s=5)
    await anext(frames)

    await backend.abort("a1", timeout_s=1)

    with pytest.raises(BackendError, match="aborted") as caught:
        await drain(frames, [])
    assert not caught.value.retryable
    await fake.wait_for(lambda: "a1" in fake.disconnected)
    await backend.abort("never-seen", timeout_s=1)  # unknown ids are fine


async def test_abort_stops_a_prefill_in_flight(fake: FakeVllm, backend: VllmBackend) -> None:
    fake.prefill_delay_s = 5
    prefill = asyncio.create_task(backend.prefill(completion("a2"), timeout_s=5))
    await fake.wait_for(lambda: bool(fake.legs("a2")))

    await backend.abort("a2", timeout_s=1)

    with pytest.raises(BackendError, match="aborted"):
        await prefill
    await fake.wait_for(lambda: "a2" in fake.disconnected)


async def test_leaving_a_stream_early_closes_its_connection(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    fake.tokens = [f"t{i} " for i in range(500)]
    fake.chunk_delay_s = 0.01
    frames = backend.generate(completion("e1"), timeout_s=5)
    await anext(frames)
    await frames.aclose()
    await fake.wait_for(lambda: "e1" in fake.disconnected)


async def test_the_api_key_is_sent_as_bearer_and_never_shown(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = "sk-secret-0123456789"
    monkeypatch.setenv("VLLM_TEST_KEY", key)
    server = FakeVllm(api_key=key, prefill_kv=False)
    await server.start()
    adapter = await started(server.address, api_key_env="VLLM_TEST_KEY")
    errors: list[BackendError] = []
    try:
        with structlog.testing.capture_logs() as logs:
            prefill = await adapter.prefill(completion(), timeout_s=5)  # logs: no kv params
            assert prefill.handle is not None
            await collect(adapter.decode(completion(), prefill.handle, -1, timeout_s=5))
            server.prefill_status = 500
            with pytest.raises(BackendError) as failed:
                await adapter.prefill(completion("r2"), timeout_s=5)
            errors.append(failed.value)
            server.api_key = "another-key"
            with pytest.raises(BackendError) as refused:
                await adapter.prefill(completion("r3"), timeout_s=5)
            errors.append(refused.value)
    finally:
        await adapter.close()
        await server.stop()

    assert [leg.headers["Authorization"] for leg in server.legs("r1")] == [f"Bearer {key}"] * 2
    assert not refused.value.retryable  # 401: the key is wrong everywhere
    assert logs  # something was logged, and none of it shows the key
    shown = [str(logs), caplog.text, *capsys.readouterr(), *(str(e) for e in errors)]
    assert all(key not in text for text in shown)


async def test_the_dispatcher_splits_a_request_across_two_vllm_engines() -> None:
    issued: dict[str, dict[str, Any]] = {}  # the decode engine reads the prefill engine's KV
    prefill_engine, decode_engine = FakeVllm(issued=issued), FakeVllm(issued=issued)
    await prefill_engine.start()
    await decode_engine.start()
    engines = (("p", Role.PREFILL, prefill_engine), ("d", Role.DECODE, decode_engine))
    configs = [
        BackendConfig(id=i, kind="vllm", address=e.address, role=r, model="llama-3.1-8b")
        for i, r, e in engines
    ]
    pool_config = PoolConfig(backends=tuple(configs))
    metrics = RouterMetrics(CollectorRegistry())
    pool = Pool(pool_config, metrics)
    await pool.start()
    try:
        for backend_id in ("p", "d"):
            pool.set_health(backend_id, True, "", None)
        settings = Settings()
        dispatcher = Dispatcher(pool, build_scheduler(settings), settings, metrics)
        frames = dispatcher.generate(completion("s1"), Disaggregation.SPLIT)
        responses = await collect(frames)
    finally:
        await pool.close()
        await prefill_engine.stop()
        await decode_engine.stop()

    assert responses[0].route.mode == router_pb2.ROUTE_MODE_SPLIT
    assert (responses[0].route.prefill_backend, responses[0].route.decode_backend) == ("p", "d")
    assert "".join(r.text for r in responses) == "Hello, world!"
    assert responses[-1].usage.completion_tokens == 4
    assert [leg.is_prefill for leg in prefill_engine.legs("s1")] == [True]
    (decode_leg,) = decode_engine.legs("s1")
    assert decode_leg.body is not None
    assert decode_leg.body["kv_transfer_params"] == issued["cmpl-s1-0"]
    assert prefill_engine.violations == decode_engine.violations == []


async def test_a_key_quoted_back_never_shows_in_errors_reprs_or_logs(
    fake: FakeVllm, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-secret-0123456789"
    monkeypatch.setenv("VLLM_TEST_KEY", key)
    fake.api_key, fake.refusal_quotes_key = "another-key", True  # the 401 quotes our key
    adapter = await started(fake.address, api_key_env="VLLM_TEST_KEY")
    try:
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(BackendError) as prefill:
                await adapter.prefill(completion(), timeout_s=5)
            with pytest.raises(BackendError) as stream:
                await collect(adapter.generate(completion("g1"), timeout_s=5))
        shown = [str(prefill.value), repr(prefill.value), str(stream.value), str(logs)]
        shown += [repr(adapter), str(adapter), repr(vars(adapter)), str(adapter.options)]
    finally:
        await adapter.close()

    assert "HTTP 401" in prefill.value.message
    assert "<redacted>" in prefill.value.message  # the quote is kept, the key is not
    assert all(key not in text for text in shown)
    assert fake.legs("r1")[0].headers["Authorization"] == f"Bearer {key}"  # it was sent


def test_options_are_checked_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="use api_key_env or api_key_file") as inline:
        VllmBackend("v", "h:1", {"api_key": "sk-inline-key"})
    assert "sk-inline-key" not in str(inline.value)
    with pytest.raises(ValueError, match="unknown vllm option"):
        VllmBackend("v", "h:1", {"api_key_name": "a typo"})
    monkeypatch.delenv("VLLM_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match="VLLM_MISSING_KEY is not set"):
        VllmBackend("v", "h:1", {"api_key_env": "VLLM_MISSING_KEY"})
    with pytest.raises(ValueError, match="timeout_idle_s must be positive"):
        VllmBackend("v", "h:1", {"timeout_idle_s": 0})


async def knowing_the_limit(fake: FakeVllm, backend: VllmBackend, max_model_len: int) -> None:
    """Sets the engine's context length and lets the adapter read it, as a health check does."""
    fake.max_model_len = max_model_len
    assert (await backend.check_health(timeout_s=30)).serving
    assert backend.max_model_len == max_model_len


async def test_the_context_length_is_read_on_every_passing_health_check(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    assert backend.max_model_len is None  # nothing read yet: nothing is checked
    await knowing_the_limit(fake, backend, 2048)
    await knowing_the_limit(fake, backend, 4096)
    fake.models_status = 500
    assert (await backend.check_health(timeout_s=30)).serving  # a failed read is no illness
    assert backend.max_model_len == 4096  # and keeps what was known
    fake.models_status, fake.list_max_model_len = 200, False  # an engine that does not say
    await backend.check_health(timeout_s=30)
    assert backend.max_model_len is None
    reads = len(fake.calls("/v1/models"))
    fake.health_status = 503
    assert not (await backend.check_health(timeout_s=30)).serving
    assert len(fake.calls("/v1/models")) == reads  # only a passing check reads it


def test_the_listing_names_the_served_models_limit() -> None:
    listing = {
        "object": "list",
        "data": [
            {"id": "base", "max_model_len": 8192},
            {"id": "lora-a", "max_model_len": 4096},
            {"id": "no-limit"},
            "junk",
        ],
    }
    assert listed_max_model_len(listing, "base") == 8192
    assert listed_max_model_len(listing, "") == 4096  # not named: the smallest
    assert listed_max_model_len(listing, "unlisted") == 4096
    assert listed_max_model_len({"data": [{"id": "m", "max_model_len": True}]}, "m") is None
    assert listed_max_model_len({"error": "nope"}, "m") is None


async def test_a_request_well_within_the_limit_costs_no_tokenize(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    await knowing_the_limit(fake, backend, 2048)
    prefill = await backend.prefill(completion(), timeout_s=5)
    assert prefill.handle is not None
    await collect(backend.decode(completion(), prefill.handle, -1, timeout_s=5))
    await backend.prefill(chat(), timeout_s=5)
    await collect(backend.generate(completion("g1"), timeout_s=5))
    assert fake.calls("/tokenize") == []
    assert len(fake.legs("r1") + fake.legs("c1") + fake.legs("g1")) == 4


@pytest.mark.parametrize(
    ("request_", "max_model_len", "counted"),
    [
        # 20 bytes + 8 = 28 may not leave room in 28; 4 tokens do.
        (completion(), 28, {"model": SERVED_MODEL, "prompt": "Tell me about Kermit"}),
        # 2 messages of 15 and 18 bytes + 16 each + 256 = 321 may not fit 300; 7 tokens do.
        (
            chat(),
            300,
            {
                "model": SERVED_MODEL,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Who is Kermit?"},
                ],
                "add_generation_prompt": True,  # what the chat endpoint generates from
            },
        ),
    ],
    ids=["completion", "chat"],
)
async def test_a_request_near_the_limit_is_counted_and_sent_when_it_fits(
    fake: FakeVllm,
    backend: VllmBackend,
    request_: GenerationRequest,
    max_model_len: int,
    counted: dict[str, Any],
) -> None:
    await knowing_the_limit(fake, backend, max_model_len)
    result = await backend.prefill(request_, timeout_s=5)
    assert result.handle is not None
    assert [call.body for call in fake.calls("/tokenize")] == [counted]
    assert len(fake.legs(request_.request_id)) == 1
    assert fake.violations == []


@pytest.mark.parametrize("leg", ["prefill", "generate"])
@pytest.mark.parametrize(
    ("request_", "tokens"),
    [(completion(max_tokens=2), 4), (chat(), 7)],
    ids=["completion", "chat"],
)
async def test_a_prompt_filling_the_context_is_refused_before_any_leg(
    fake: FakeVllm, backend: VllmBackend, leg: str, request_: GenerationRequest, tokens: int
) -> None:
    await knowing_the_limit(fake, backend, tokens)  # no room left for one output token
    request_ = replace(request_, sampling=replace(request_.sampling, max_tokens=2))

    async def send() -> object:
        if leg == "prefill":
            return await backend.prefill(request_, timeout_s=5)
        return await collect(backend.generate(request_, timeout_s=5))

    with pytest.raises(BackendRejectedError) as caught:
        await send()
    message = (
        f"backend vllm-0: prompt is {tokens} tokens, max_model_len is {tokens}: "
        "no room for an output token"
    )
    assert caught.value.message == message
    assert (caught.value.grpc_status, caught.value.http_status) == ("INVALID_ARGUMENT", 400)
    assert len(fake.calls("/tokenize")) == 1
    assert fake.legs(request_.request_id) == []  # the engine never saw it


async def test_max_tokens_beyond_the_context_is_refused_without_a_count(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    await knowing_the_limit(fake, backend, 8)
    with pytest.raises(BackendRejectedError, match="max_tokens 16 > max_model_len 8"):
        await backend.prefill(completion(), timeout_s=5)
    assert fake.calls("/tokenize") == []
    assert fake.legs("r1") == []


async def test_a_prompt_that_fits_is_sent_though_max_tokens_will_not(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    # vLLM serves it and stops at the context length: not the router's to refuse.
    await knowing_the_limit(fake, backend, 16)
    await collect(backend.generate(completion("g1"), timeout_s=5))  # 4 tokens + 16 > 16
    assert len(fake.legs("g1")) == 1


async def test_the_limit_a_count_reports_is_the_one_checked(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    await knowing_the_limit(fake, backend, 28)
    fake.max_model_len = 4  # restarted with a shorter context since the last health check
    with pytest.raises(BackendRejectedError, match="max_model_len is 4"):
        await backend.prefill(completion(max_tokens=2), timeout_s=5)
    assert backend.max_model_len == 4


@pytest.mark.parametrize(
    ("tokenize_status", "tokenize_reply"), [(500, None), (200, {"tokens": []})]
)
async def test_a_failed_count_sends_the_leg_unchecked(
    fake: FakeVllm, backend: VllmBackend, tokenize_status: int, tokenize_reply: Any
) -> None:
    await knowing_the_limit(fake, backend, 3)
    fake.tokenize_status, fake.tokenize_reply = tokenize_status, tokenize_reply
    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(BackendRejectedError, match="maximum context length is 3 tokens"),
    ):
        await collect(backend.generate(completion("g1", max_tokens=2), timeout_s=5))
    assert len(fake.legs("g1")) == 1  # sent: the engine's own 400 was the backstop
    (warning,) = [e for e in logs if e["event"] == "prompt not counted; the leg is sent unchecked"]
    assert warning["log_level"] == "warning"
    assert warning["request"] == "g1"


async def test_decode_is_never_checked(fake: FakeVllm, backend: VllmBackend) -> None:
    # Its prefill passed the check; the decode leg goes out as it is.
    await knowing_the_limit(fake, backend, 3)
    handle = KVHandle("vllm-0", "r1")
    with pytest.raises(BackendRejectedError, match="maximum context length is 3 tokens"):
        await collect(backend.decode(completion(max_tokens=2), handle, -1, timeout_s=5))
    assert fake.calls("/tokenize") == []
    assert len(fake.legs("r1")) == 1


async def test_abort_stops_a_count_in_flight_and_no_leg_follows(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    await knowing_the_limit(fake, backend, 16)
    fake.tokenize_delay_s = 5
    prefill = asyncio.create_task(backend.prefill(completion("a3", max_tokens=2), timeout_s=5))
    await fake.wait_for(lambda: bool(fake.calls("/tokenize")))

    await backend.abort("a3", timeout_s=1)

    with pytest.raises(BackendError, match="aborted"):
        await prefill
    assert fake.legs("a3") == []


async def test_sse_events_survive_any_chunking() -> None:
    body = b': keep-alive\r\ndata: {"a":\r\ndata: 1}\r\n\r\nevent: x\rdata: \xc3\xa9\r\rdata: cut'

    async def one_byte_at_a_time() -> AsyncIterator[bytes]:
        for index in range(len(body)):
            yield body[index : index + 1]

    events = [event async for event in iter_sse(one_byte_at_a_time(), "vllm-0")]
    assert events == [SSEEvent('{"a":\n1}'), SSEEvent("é", "x")]  # the cut-off event is dropped
