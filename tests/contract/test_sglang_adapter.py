"""The SGLang adapter against fake SGLang engines: the PD protocol, its failures, aborts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest

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
from backends.sglang import _ROOMS, SglangBackend
from tests.contract.fake_sglang import PROMPT_TOKENS, FakeSglang, Knobs, Rooms
from tests.helpers import eventually

BOOTSTRAP_PORT = 9123
# Far above what a working adapter needs, far below the engines' own 300 s timeouts.
PROMPTLY_S = 1.0


def request(
    request_id: str = "req-1", *, chat: bool = False, stop: tuple[str, ...] = ()
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        model="llama-3.1-8b",
        prompt="Say hello",
        sampling=SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0, seed=7, stop=stop),
        prompt_tokens=4,
        messages=(ChatMessage("user", "Say hello"),) if chat else (),
    )


@dataclass
class Pair:
    prefill_engine: FakeSglang
    decode_engine: FakeSglang
    prefill: SglangBackend
    decode: SglangBackend


async def start_pair(prefill_options: dict[str, object] | None = None) -> Pair:
    rooms = Rooms()
    prefill_engine, decode_engine = FakeSglang("prefill", rooms), FakeSglang("decode", rooms)
    await prefill_engine.start()
    await decode_engine.start()
    options = {"bootstrap_port": BOOTSTRAP_PORT, **(prefill_options or {})}
    pair = Pair(
        prefill_engine,
        decode_engine,
        SglangBackend("p0", prefill_engine.address, options),
        SglangBackend("d0", decode_engine.address, prefill_options),
    )
    await pair.prefill.start()
    await pair.decode.start()
    return pair


async def stop_pair(pair: Pair) -> None:
    await pair.prefill.close()
    await pair.decode.close()
    await pair.prefill_engine.stop()
    await pair.decode_engine.stop()


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    running = await start_pair()
    yield running
    await stop_pair(running)


async def split(
    pair: Pair, req: GenerationRequest, *, prefill_timeout_s: float = 5.0
) -> list[bytes]:
    """What the dispatcher does: prefill, then decode with the handle."""
    result = await pair.prefill.prefill(req, prefill_timeout_s)
    assert result.handle is not None
    return [frame async for frame in pair.decode.decode(req, result.handle, -1, 5.0)]


def parse(frames: list[bytes]) -> list[router_pb2.GenerateResponse]:
    return [router_pb2.GenerateResponse.FromString(frame) for frame in frames]


def assert_complete_answer(frames: list[bytes]) -> None:
    messages = parse(frames)
    assert "".join(m.text for m in messages) == "Hello world"
    assert all(m.finish_reason == router_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert messages[-1].finish_reason == router_pb2.FINISH_REASON_STOP
    assert messages[-1].usage.prompt_tokens == PROMPT_TOKENS
    assert messages[-1].usage.completion_tokens == 3


async def test_capabilities_are_all_roles_with_a_concurrent_handoff() -> None:
    backend = SglangBackend("s", "127.0.0.1:1")
    assert backend.capabilities.roles == {Role.PREFILL, Role.DECODE, Role.BOTH}
    assert backend.capabilities.handoff_modes == {HandoffMode.CONCURRENT}


async def test_both_legs_get_one_body_and_the_decode_leg_streams(pair: Pair) -> None:
    frames = await split(pair, request(stop=("\n",)))

    assert_complete_answer(frames)
    assert [m.token_ids[:] for m in parse(frames)] == [[9906], [385], [1917]]
    (prefill_sent,) = pair.prefill_engine.generation_requests()
    (decode_sent,) = pair.decode_engine.generation_requests()
    assert prefill_sent.path == decode_sent.path == "/generate"
    assert prefill_sent.body == decode_sent.body
    body = decode_sent.body
    room = body["bootstrap_room"]
    assert body == {
        "text": "Say hello",
        "sampling_params": {
            "max_new_tokens": 16,
            "temperature": 0.0,
            "top_p": 1.0,
            "sampling_seed": 7,
            "stop": ["\n"],
        },
        "stream": True,
        "rid": f"req-1-{room:016x}",
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": BOOTSTRAP_PORT,
        "bootstrap_room": room,
    }
    assert 0 <= room <= 2**63 - 1
    await eventually(lambda: pair.prefill_engine.replied == 1)
    assert pair.prefill_engine.aborted == pair.decode_engine.aborted == []


async def test_both_legs_send_the_requests_traceparent(pair: Pair) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert_complete_answer(await split(pair, replace(request(), traceparent=traceparent)))

    (prefill_sent,) = pair.prefill_engine.generation_requests()
    (decode_sent,) = pair.decode_engine.generation_requests()
    assert prefill_sent.headers["traceparent"] == decode_sent.headers["traceparent"] == traceparent
    assert "tracestate" not in decode_sent.headers


async def test_prefill_returns_before_its_leg_is_answered(pair: Pair) -> None:
    # The fake prefill engine cannot answer before the decode leg joins the room, so a
    # prefill() that waited for its reply would never return.
    req = request()
    result = await asyncio.wait_for(pair.prefill.prefill(req, 5.0), PROMPTLY_S)

    assert result.first_frame == b""
    assert result.first_token_id == -1
    assert result.prompt_tokens == req.prompt_tokens
    assert not result.finished
    assert result.handle is not None
    assert result.handle.backend_id == "p0"
    params = result.handle.transport_params
    assert params["bootstrap_host"] == "127.0.0.1"
    assert params["bootstrap_port"] == BOOTSTRAP_PORT
    await asyncio.wait_for(pair.prefill_engine.arrived.wait(), PROMPTLY_S)
    assert pair.prefill_engine.replied == 0

    frames = [f async for f in pair.decode.decode(req, result.handle, -1, 5.0)]
    assert_complete_answer(frames)


async def test_chat_requests_go_to_chat_completions_on_both_legs() -> None:
    pair = await start_pair({"model": "meta-llama/Llama-3.1-8B-Instruct"})
    try:
        frames = await split(pair, request(chat=True))
    finally:
        await stop_pair(pair)

    assert_complete_answer(frames)
    (prefill_sent,) = pair.prefill_engine.generation_requests()
    (decode_sent,) = pair.decode_engine.generation_requests()
    assert prefill_sent.path == decode_sent.path == "/v1/chat/completions"
    assert prefill_sent.body == decode_sent.body
    body = dict(decode_sent.body)
    room = body.pop("bootstrap_room")
    assert body == {
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 16,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
        "rid": f"req-1-{room:016x}",
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": BOOTSTRAP_PORT,
    }


async def test_api_openai_sends_prompts_to_completions() -> None:
    pair = await start_pair({"api": "openai"})
    try:
        frames = await split(pair, request())
    finally:
        await stop_pair(pair)

    assert_complete_answer(frames)
    assert [r.path for r in pair.decode_engine.generation_requests()] == ["/v1/completions"]
    assert pair.decode_engine.generation_requests()[0].body["prompt"] == "Say hello"


@pytest.mark.parametrize("headers_after_kv", [False, True])
async def test_prefill_failure_aborts_the_waiting_decode_leg_promptly(
    pair: Pair, headers_after_kv: bool
) -> None:
    pair.prefill_engine.knobs.status = 500  # answered once the decode engine has joined
    pair.decode_engine.knobs.headers_after_kv = headers_after_kv
    req = request()
    result = await pair.prefill.prefill(req, 5.0)
    assert result.handle is not None

    # The decode engine never sends anything here: only the prefill's failure can end
    # the leg before its own deadline, and the error says which did.
    with pytest.raises(BackendError) as caught:
        await _drain(pair.decode, req, result.handle, timeout_s=3600)

    assert caught.value.backend_id == "p0"
    assert caught.value.retryable
    assert "prefill broke" in caught.value.message
    rid = result.handle.transport_params["rid"]
    # The decode engine, which would wait 300 s for the KV cache, is told twice.
    await eventually(lambda: pair.decode_engine.disconnected == [rid], PROMPTLY_S)
    await eventually(lambda: pair.decode_engine.aborted == [rid], PROMPTLY_S)


async def test_decode_leg_is_not_sent_when_the_prefill_leg_failed_already(pair: Pair) -> None:
    pair.prefill_engine.knobs = Knobs(status=503, fail_at_once=True)
    req = request()
    result = await pair.prefill.prefill(req, 5.0)
    assert result.handle is not None
    leg = _ROOMS[result.handle.transport_params["bootstrap_room"]]
    await eventually(lambda: leg.failure is not None, PROMPTLY_S)

    with pytest.raises(BackendError) as caught:
        await _drain(pair.decode, req, result.handle)

    assert caught.value.backend_id == "p0"
    assert "HTTP 503" in caught.value.message
    assert pair.decode_engine.received == []


async def test_a_prefill_that_finishes_with_abort_fails_the_decode_leg(pair: Pair) -> None:
    pair.prefill_engine.knobs.finish_abort = True
    with pytest.raises(BackendError) as caught:
        await asyncio.wait_for(split(pair, request()), PROMPTLY_S)
    assert caught.value.backend_id == "p0"
    assert "KV transfer failed" in caught.value.message


async def test_prefill_deadline_fails_the_split_promptly(pair: Pair) -> None:
    pair.prefill_engine.knobs.hang = True
    with pytest.raises(BackendError) as caught:
        await asyncio.wait_for(split(pair, request(), prefill_timeout_s=0.2), PROMPTLY_S)
    assert caught.value.backend_id == "p0"
    assert "no answer within 0.2 s" in caught.value.message
    await eventually(lambda: len(pair.decode_engine.aborted) == 1, PROMPTLY_S)


async def test_a_prefill_reply_failing_after_the_kv_arrived_spares_the_decode_leg(
    pair: Pair,
) -> None:
    release, resume = asyncio.Event(), asyncio.Event()
    pair.prefill_engine.knobs.break_reply_on = release
    pair.decode_engine.knobs.resume_on = resume
    req = request()
    result = await pair.prefill.prefill(req, 5.0)
    assert result.handle is not None
    stream = pair.decode.decode(req, result.handle, -1, 5.0)
    frames = [await anext(stream)]  # the decode engine holds the KV cache

    release.set()
    leg = _ROOMS[result.handle.transport_params["bootstrap_room"]]
    await eventually(lambda: leg.failure is not None, PROMPTLY_S)
    resume.set()
    frames += [frame async for frame in stream]

    assert_complete_answer(frames)
    assert pair.decode_engine.aborted == []


async def test_decode_error_event_mid_stream_raises_after_the_frames_before_it(
    pair: Pair,
) -> None:
    pair.decode_engine.knobs.error_after_events = 2
    req = request()
    result = await pair.prefill.prefill(req, 5.0)
    assert result.handle is not None
    frames: list[bytes] = []
    with pytest.raises(BackendError) as caught:
        await collect_into(frames, pair.decode.decode(req, result.handle, -1, 5.0))
    assert "".join(m.text for m in parse(frames)) == "Hello"
    assert caught.value.backend_id == "d0"
    assert caught.value.retryable
    assert "CUDA error" in caught.value.message


async def test_decode_connection_dropped_mid_stream_raises(pair: Pair) -> None:
    pair.decode_engine.knobs.drop_after_events = 1
    with pytest.raises(BackendError) as caught:
        await split(pair, request())
    assert caught.value.backend_id == "d0"
    assert caught.value.retryable


async def test_decode_refused_cancels_the_prefill_leg_waiting_for_it(pair: Pair) -> None:
    # The decode engine refuses before joining the room: the prefill engine would wait
    # for it until its bootstrap timeout unless the adapter cancels the prefill leg.
    pair.decode_engine.knobs.status = 503
    pair.decode_engine.rooms = Rooms()  # the refusal never reaches the prefill engine's room
    req = request()
    result = await pair.prefill.prefill(req, 5.0)
    assert result.handle is not None
    await asyncio.wait_for(pair.prefill_engine.arrived.wait(), PROMPTLY_S)

    with pytest.raises(BackendError) as caught:
        await _drain(pair.decode, req, result.handle)

    assert caught.value.backend_id == "d0"
    assert caught.value.retryable
    rid = result.handle.transport_params["rid"]
    await eventually(lambda: pair.prefill_engine.disconnected == [rid], PROMPTLY_S)
    await eventually(lambda: pair.prefill_engine.aborted == [rid], PROMPTLY_S)


async def test_decode_client_error_is_not_retryable(pair: Pair) -> None:
    pair.decode_engine.knobs.status = 400
    with pytest.raises(BackendRejectedError) as caught:
        await split(pair, request())
    assert caught.value.backend_id == "d0"
    assert not caught.value.retryable
    assert caught.value.grpc_status == "INVALID_ARGUMENT"
    assert "HTTP 400: decode refused" in caught.value.message


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_a_prefill_refused_as_invalid_fails_the_split_as_the_clients_fault(
    pair: Pair, status: int
) -> None:
    pair.prefill_engine.knobs = Knobs(status=status, fail_at_once=True)
    with pytest.raises(BackendRejectedError) as caught:
        await asyncio.wait_for(split(pair, request()), PROMPTLY_S)
    assert caught.value.backend_id == "p0"
    assert (caught.value.grpc_status, caught.value.http_status) == ("INVALID_ARGUMENT", 400)
    assert f"HTTP {status}: prefill broke" in caught.value.message


async def test_colocated_refused_as_invalid_is_the_clients_fault() -> None:
    engine = FakeSglang("null", knobs=Knobs(status=400))
    await engine.start()
    backend = SglangBackend("s0", engine.address)
    await backend.start()
    try:
        with pytest.raises(BackendRejectedError) as caught:
            _ = [frame async for frame in backend.generate(request(), 5.0)]
    finally:
        await backend.close()
        await engine.stop()
    assert not caught.value.retryable
    assert "HTTP 400: request refused" in caught.value.message


async def test_decode_deadline(pair: Pair) -> None:
    pair.decode_engine.knobs.hang = True
    req = request()
    result = await pair.prefill.prefill(req, 5.0)
    assert result.handle is not None
    with pytest.raises(BackendError) as caught:
        await asyncio.wait_for(_drain(pair.decode, req, result.handle, timeout_s=0.2), PROMPTLY_S)
    assert caught.value.backend_id == "d0"
    assert caught.value.retryable
    assert "no answer within 0.2 s" in caught.value.message


async def test_abort_stops_both_legs_on_both_engines(pair: Pair) -> None:
    pair.prefill_engine.knobs.hang = True  # both legs stay in flight
    req = request()
    result = await pair.prefill.prefill(req, 5.0)
    assert result.handle is not None
    decoding = asyncio.create_task(_drain(pair.decode, req, result.handle))
    await asyncio.wait_for(pair.decode_engine.arrived.wait(), PROMPTLY_S)
    rid = result.handle.transport_params["rid"]

    await pair.prefill.abort(req.request_id, 1.0)
    await pair.decode.abort(req.request_id, 1.0)

    assert pair.prefill_engine.aborted == [rid]
    assert pair.decode_engine.aborted == [rid]
    with pytest.raises(BackendError):
        await asyncio.wait_for(decoding, PROMPTLY_S)
    await eventually(lambda: pair.prefill_engine.disconnected == [rid], PROMPTLY_S)
    await eventually(lambda: pair.decode_engine.disconnected == [rid], PROMPTLY_S)
    # Nothing more to stop: unknown ids are not an error, and post nothing.
    await pair.decode.abort(req.request_id, 1.0)
    await pair.decode.abort("never-seen", 1.0)
    assert pair.decode_engine.aborted == [rid]


async def test_abort_right_after_prefill_stops_the_leg_before_it_is_sent(pair: Pair) -> None:
    req = request()
    result = await pair.prefill.prefill(req, 5.0)
    assert result.handle is not None

    await pair.prefill.abort(req.request_id, 1.0)  # before the leg's task had a turn

    with pytest.raises(BackendError) as caught:
        await asyncio.wait_for(_drain(pair.decode, req, result.handle), PROMPTLY_S)
    assert caught.value.backend_id == "p0"
    assert pair.prefill_engine.generation_requests() == []
    assert pair.decode_engine.received == []


async def test_leaving_the_decode_stream_early_ends_the_request_on_the_engine(
    pair: Pair,
) -> None:
    pair.decode_engine.knobs.hold_after_events = 1
    req = request()
    result = await pair.prefill.prefill(req, 5.0)
    assert result.handle is not None
    stream = pair.decode.decode(req, result.handle, -1, 5.0)
    first = await anext(stream)
    assert router_pb2.GenerateResponse.FromString(first).text == "Hel"
    await stream.aclose()

    rid = result.handle.transport_params["rid"]
    await eventually(lambda: pair.decode_engine.disconnected == [rid], PROMPTLY_S)
    await eventually(lambda: pair.decode_engine.aborted == [rid], PROMPTLY_S)


async def test_a_handle_from_another_kind_of_backend_is_refused(pair: Pair) -> None:
    foreign = KVHandle(backend_id="mock-0", request_id="req-1", block_ids=(1, 2))
    with pytest.raises(BackendError) as caught:
        await _drain(pair.decode, request(), foreign)
    assert not caught.value.retryable
    assert pair.decode_engine.received == []


@pytest.mark.parametrize("incremental", [False, True])
async def test_colocated_generate_streams_deltas(incremental: bool) -> None:
    engine = FakeSglang("null", knobs=Knobs(incremental=incremental))
    await engine.start()
    backend = SglangBackend("s0", engine.address, {"incremental_output": incremental})
    await backend.start()
    try:
        frames = [f async for f in backend.generate(request("req-9"), 5.0)]
    finally:
        await backend.close()
        await engine.stop()

    assert_complete_answer(frames)
    assert [m.token_ids[:] for m in parse(frames)] == [[9906], [385], [1917]]
    (sent,) = engine.generation_requests()
    assert sent.path == "/generate"
    assert not {"bootstrap_host", "bootstrap_port", "bootstrap_room"} & set(sent.body)
    assert sent.body["rid"].startswith("req-9-")
    assert len(sent.body["rid"]) == len("req-9-") + 16


async def test_health_follows_the_engine() -> None:
    engine = FakeSglang("decode")
    await engine.start()
    backend = SglangBackend("s0", engine.address)
    await backend.start()
    try:
        assert (await backend.check_health(1.0)).serving
        engine.knobs.health_status = 503
        status = await backend.check_health(1.0)
        assert not status.serving
        assert "503" in status.detail
        await engine.stop()
        assert not (await backend.check_health(1.0)).serving
    finally:
        await backend.close()


SCRAPE = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="llama",dp_rank="0"} 3.0
sglang:num_running_reqs{model_name="llama",dp_rank="1"} 4.0
sglang:num_queue_reqs{model_name="llama",dp_rank="0"} 2.0
sglang:num_queue_reqs{model_name="llama",dp_rank="1"} 0.0
sglang:num_decode_prealloc_queue_reqs{model_name="llama",dp_rank="0"} 1.0
sglang:num_decode_transfer_queue_reqs{model_name="llama",dp_rank="1"} 5.0
sglang:num_used_tokens{model_name="llama",dp_rank="0"} 1000.0
sglang:num_used_tokens{model_name="llama",dp_rank="1"} 3000.0
sglang:token_usage{model_name="llama",dp_rank="0"} 0.05
sglang:token_usage{model_name="llama",dp_rank="1"} 0.15
sglang:gen_throughput{model_name="llama",dp_rank="0"} 512.0
"""


async def test_load_reads_sglang_metrics() -> None:
    engine = FakeSglang("decode", knobs=Knobs(metrics=SCRAPE))
    await engine.start()
    backend = SglangBackend("s0", engine.address)
    await backend.start()
    try:
        load = await backend.load(1.0)
        engine.knobs.metrics = SCRAPE + 'sglang:max_total_num_tokens{dp_rank="0"} 50000\n'
        with_capacity = await backend.load(1.0)
        engine.knobs.metrics = None
        with pytest.raises(BackendError) as caught:
            await backend.load(1.0)
    finally:
        await backend.close()
        await engine.stop()

    # Without max_total_num_tokens, capacity is used / usage per rank: 1000/0.05 + 3000/0.15.
    assert load == BackendLoad(waiting=8, running=7, kv_tokens_used=4000, kv_tokens_capacity=40000)
    assert with_capacity.kv_tokens_capacity == 50000
    assert "HTTP 404" in caught.value.message  # no --enable-metrics
    assert not caught.value.retryable


async def test_api_key_is_sent_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-sglang-0123456789"
    monkeypatch.setenv("SGLANG_TEST_KEY", secret)
    engine = FakeSglang("null", api_key=secret)
    await engine.start()
    backend = SglangBackend("s0", engine.address, {"api_key_env": "SGLANG_TEST_KEY"})
    await backend.start()
    try:
        frames = [f async for f in backend.generate(request(), 5.0)]
    finally:
        await backend.close()
        await engine.stop()
    assert_complete_answer(frames)
    assert engine.received[0].headers["Authorization"] == f"Bearer {secret}"
    assert secret not in repr(backend)
    assert secret not in repr(vars(backend))


async def test_ipv6_hosts_are_bracketed() -> None:
    backend = SglangBackend("p6", "::1:1", {"bootstrap_port": 8998})
    await backend.start()
    try:
        result = await backend.prefill(request(), 1.0)
        assert result.handle is not None
        assert result.handle.transport_params["bootstrap_host"] == "[::1]"
        await backend.abort("req-1", 0.2)
    finally:
        await backend.close()


async def collect_into(frames: list[bytes], stream: AsyncIterator[bytes]) -> None:
    """Keeps the frames that arrived before a stream failed."""
    async for frame in stream:
        frames.append(frame)


async def _drain(
    backend: SglangBackend, req: GenerationRequest, handle: KVHandle, *, timeout_s: float = 5.0
) -> list[bytes]:
    return [frame async for frame in backend.decode(req, handle, -1, timeout_s)]
