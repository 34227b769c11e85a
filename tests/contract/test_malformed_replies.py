"""What engines send is checked: a reply of the wrong shape or size is a BackendError.

Each malformed shape goes through each HTTP adapter that reads it (vLLM, SGLang,
OpenAI-compatible) and must come out as a retryable ``BackendError`` that says what
was wrong and quotes the reply, never a ``TypeError``; through the router's doors it
is ``UNAVAILABLE`` on gRPC and a 502 with OpenAI's error JSON over HTTP. A runaway
engine's stream is forwarded as sent, and reading it gives the event loop a turn
every few events.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import ChatMessage, GenerationRequest, Role, SamplingParams
from backends.errors import BackendError
from backends.http_common import (
    MAX_EVENT_BYTES,
    YIELD_EVERY_STEPS,
    iter_sse,
    openai_frames,
    read_body,
)
from backends.openai import OpenAIBackend
from backends.sglang import SglangBackend
from backends.vllm import VllmBackend
from bench.fake_vllm import FakeVllm
from router.client import AsyncRouterClient
from router.daemon import Daemon
from router.settings import BackendConfig, PoolConfig, Settings
from tests.contract.fake_openai import FakeOpenAI
from tests.contract.fake_sglang import FakeSglang, Knobs, Rooms

MODEL = "llama-3.1-8b"
KEY_ENV = "HETERO_ROUTER_TEST_MALFORMED_KEY"


def request(request_id: str = "m1", *, chat: bool = False) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        model=MODEL,
        prompt="Tell me about Kermit",
        sampling=SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0, seed=1),
        prompt_tokens=4,
        messages=(ChatMessage("user", "Who is Kermit?"),) if chat else (),
    )


def choice(**fields: Any) -> dict[str, Any]:
    """A completion chunk whose choice 0 has ``fields`` over a well-formed text chunk."""
    return {
        "id": "x",
        "object": "text_completion",
        "choices": [{"index": 0, "text": "a", **fields}],
    }


# (what the engine sends as one stream event, what the error must say)
MALFORMED_CHUNKS = [
    pytest.param({"choices": 5}, "choices is a number, not an array", id="choices-number"),
    pytest.param({"choices": "abc"}, "choices is a string, not an array", id="choices-string"),
    pytest.param({"choices": [5]}, "choices[0] is a number, not an object", id="choice-number"),
    pytest.param({"choices": [None]}, "choices[0] is null", id="choice-null"),
    pytest.param(choice(text=7), "text is a number, not a string", id="text-number"),
    pytest.param(choice(text="\ud800"), "text is not valid Unicode", id="text-surrogate"),
    pytest.param(choice(token_ids=[None]), "token_ids holds None", id="id-null"),
    pytest.param(choice(token_ids="abc"), "token_ids is a string", id="ids-string"),
    pytest.param(choice(token_ids={"a": 1}), "token_ids is an object", id="ids-object"),
    pytest.param(choice(token_ids=[-1]), "token_ids holds -1", id="id-negative"),
    pytest.param(choice(token_ids=[2**40]), "token_ids holds 1099511627776", id="id-huge"),
    pytest.param(choice(token_ids=[1.5]), "token_ids holds 1.5", id="id-float"),
    pytest.param(choice(token_ids=[True]), "token_ids holds True", id="id-boolean"),
    pytest.param(choice(finish_reason=3), "finish_reason is a number", id="finish-number"),
    pytest.param(
        choice(finish_reason={"type": "stop"}), "finish_reason is an object", id="finish-object"
    ),
    pytest.param(
        {"choices": [{"index": 0, "delta": "hi"}]}, "delta is a string", id="delta-string"
    ),
    pytest.param(
        {"choices": [{"index": 0, "delta": {"content": ["a"]}}]},
        "delta.content is an array",
        id="content-array",
    ),
    pytest.param({"choices": [], "usage": [1, 2]}, "usage is an array", id="usage-list"),
    pytest.param(
        {"choices": [], "usage": {"prompt_tokens": [1]}},
        "usage.prompt_tokens is [1], not a token count",
        id="usage-count-list",
    ),
    pytest.param(
        {"choices": [], "usage": {"completion_tokens": -3}},
        "usage.completion_tokens is -3",
        id="usage-negative",
    ),
    pytest.param(
        {"choices": [], "usage": {"prompt_tokens": "7"}},
        "usage.prompt_tokens is '7'",
        id="usage-string",
    ),
    pytest.param([1, 2, 3], "an array, not an object", id="event-array"),
    pytest.param(b"data: {not json\n\n", "not JSON", id="not-json"),
]

GOOD_CHUNK = choice(text="Hel", token_ids=[100])


def assert_malformed(error: BackendError, what: str, problem: str) -> None:
    assert type(error) is BackendError  # not a refusal: another engine may answer well
    assert error.retryable
    assert (error.grpc_status, error.http_status) == ("UNAVAILABLE", 502)
    assert f"malformed {what}" in error.message
    assert problem in error.message


async def frames_until_failure(stream: AsyncIterator[bytes]) -> tuple[list[bytes], BackendError]:
    frames: list[bytes] = []
    try:
        async for frame in stream:
            frames.append(frame)
    except BackendError as error:
        return frames, error
    raise AssertionError(f"the stream ended without a BackendError after {len(frames)} frames")


# --- vLLM ------------------------------------------------------------------------------


@pytest.fixture
async def vllm() -> AsyncIterator[tuple[FakeVllm, VllmBackend]]:
    engine = FakeVllm()
    await engine.start()
    adapter = VllmBackend("vllm-0", engine.address, {"model": MODEL})
    await adapter.start()
    yield engine, adapter
    await adapter.close()
    await engine.stop()


@pytest.mark.parametrize(("event", "problem"), MALFORMED_CHUNKS)
async def test_vllm_stream_of_the_wrong_shape_fails_after_the_frames_before_it(
    vllm: tuple[FakeVllm, VllmBackend], event: Any, problem: str
) -> None:
    engine, adapter = vllm
    engine.stream_override = [GOOD_CHUNK, event, b"data: [DONE]\n\n"]
    frames, error = await frames_until_failure(adapter.generate(request(), timeout_s=5))
    assert [router_pb2.GenerateResponse.FromString(f).text for f in frames] == ["Hel"]
    assert_malformed(error, "stream chunk", problem)
    assert error.message.startswith("backend vllm-0: ")


MALFORMED_ANSWERS = [
    pytest.param({"choices": 5}, "choices is a number", id="choices-number"),
    pytest.param({"usage": [1]}, "usage is an array", id="usage-list"),
    pytest.param(
        {"usage": {"prompt_tokens": [1]}}, "usage.prompt_tokens is [1]", id="usage-count-list"
    ),
    pytest.param({"kv_transfer_params": [1]}, "kv_transfer_params is an array", id="kv-list"),
    pytest.param(
        {"choices": [{"finish_reason": "stop", "text": 5}]}, "text is a number", id="text-number"
    ),
    pytest.param(
        {"choices": [{"finish_reason": "stop", "token_ids": [None]}]},
        "token_ids holds None",
        id="id-null",
    ),
    pytest.param({"choices": [{"finish_reason": 1}]}, "finish_reason is a number", id="finish"),
    pytest.param([1], "an array, not an object", id="array"),
    pytest.param(b"<html>bad gateway</html>", "not JSON", id="html"),
]


@pytest.mark.parametrize(("answer", "problem"), MALFORMED_ANSWERS)
async def test_vllm_prefill_answer_of_the_wrong_shape_is_a_backend_error(
    vllm: tuple[FakeVllm, VllmBackend], answer: Any, problem: str
) -> None:
    engine, adapter = vllm
    engine.prefill_reply = answer
    with pytest.raises(BackendError) as caught:
        await adapter.prefill(request(), timeout_s=5)
    assert_malformed(caught.value, "prefill answer", problem)


async def test_vllm_stream_event_over_the_size_cap_fails_the_leg(
    vllm: tuple[FakeVllm, VllmBackend],
) -> None:
    engine, adapter = vllm
    engine.stream_override = [GOOD_CHUNK, choice(text="x" * (2 * MAX_EVENT_BYTES))]
    frames, error = await frames_until_failure(adapter.generate(request(), timeout_s=5))
    assert len(frames) == 1
    assert error.retryable
    assert "stream event over the" in error.message


async def test_vllm_unterminated_line_over_the_size_cap_fails_the_leg(
    vllm: tuple[FakeVllm, VllmBackend],
) -> None:
    engine, adapter = vllm
    engine.stream_override = [b"data: " + b"x" * (2 * MAX_EVENT_BYTES)]  # never a newline
    _, error = await frames_until_failure(adapter.generate(request(), timeout_s=5))
    assert "stream event over the" in error.message


async def test_vllm_answer_over_the_size_cap_fails_the_prefill(
    vllm: tuple[FakeVllm, VllmBackend],
) -> None:
    engine, adapter = vllm
    engine.prefill_reply = {"choices": [{"text": "x" * (2 * MAX_EVENT_BYTES)}]}
    with pytest.raises(BackendError, match="byte limit") as caught:
        await adapter.prefill(request(), timeout_s=5)
    assert caught.value.retryable


async def test_vllm_a_prompt_echo_is_allowed_for_in_the_cap(
    vllm: tuple[FakeVllm, VllmBackend],
) -> None:
    # With return_token_ids vLLM's first event repeats the prompt's ids: a long prompt
    # makes that event long, and it is still an answer.
    engine, adapter = vllm
    engine.max_model_len = 1 << 20
    words = MAX_EVENT_BYTES // 4  # about 2 MiB of ids
    long_request = GenerationRequest(
        "long", MODEL, "ab " * words, SamplingParams(4, 0.0, 1.0, 1), words
    )
    frames = [f async for f in adapter.generate(long_request, timeout_s=30)]
    assert engine.legs("long")[0].body is not None
    assert "".join(router_pb2.GenerateResponse.FromString(f).text for f in frames) == (
        "Hello, world!"
    )


async def test_vllm_metrics_page_over_the_cap_fails_the_load_probe(
    vllm: tuple[FakeVllm, VllmBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, adapter = vllm
    monkeypatch.setattr("backends.vllm.MAX_PAGE_BYTES", 1000)
    engine.metrics_text = "vllm:num_requests_running 1\n" * 100
    with pytest.raises(BackendError, match=r"metrics page .*over the 1000 byte limit"):
        await adapter.load(timeout_s=5)


@pytest.mark.parametrize(
    "listing",
    [{"data": 5}, {"data": [5, None, {"id": 3, "max_model_len": [1]}]}, [1], b"not json"],
    ids=["data-number", "entries", "array", "not-json"],
)
async def test_vllm_listing_of_the_wrong_shape_keeps_the_engine_healthy_and_unlimited(
    vllm: tuple[FakeVllm, VllmBackend], listing: Any
) -> None:
    engine, adapter = vllm
    engine.models_reply = listing
    assert (await adapter.check_health(timeout_s=5)).serving
    assert adapter.max_model_len is None


async def test_vllm_count_of_the_wrong_shape_sends_the_leg_unchecked(
    vllm: tuple[FakeVllm, VllmBackend],
) -> None:
    engine, adapter = vllm
    engine.max_model_len = 28
    await adapter.check_health(timeout_s=5)
    engine.tokenize_reply = {"count": [1], "max_model_len": "x"}
    frames = [f async for f in adapter.generate(request(), timeout_s=5)]
    assert frames
    assert len(engine.calls("/tokenize")) == 1


async def test_a_body_without_a_length_is_cut_off_at_the_cap() -> None:
    # A chunked (or compressed) body declares no length: it is counted as it is read.
    class Content:
        def __init__(self) -> None:
            self.reads = 0

        async def readany(self) -> bytes:
            self.reads += 1
            return b"x" * 400  # never ends

    class Response:
        content_length = None
        content = Content()

    with pytest.raises(BackendError, match="answer is over the 1000 byte limit"):
        await read_body("vllm-0", Response(), 1000)  # type: ignore[arg-type]  # what it reads
    assert Response.content.reads == 3


# --- OpenAI-compatible -----------------------------------------------------------------


@pytest.fixture
async def provider(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[FakeOpenAI, OpenAIBackend]]:
    fake = FakeOpenAI(api_key="k-0123")
    await fake.start()
    monkeypatch.setenv(KEY_ENV, "k-0123")
    adapter = OpenAIBackend("groq-0", fake.address, {"api_key_env": KEY_ENV})
    await adapter.start()
    yield fake, adapter
    await adapter.close()
    await fake.stop()


@pytest.mark.parametrize(("event", "problem"), MALFORMED_CHUNKS)
async def test_openai_stream_of_the_wrong_shape_is_a_backend_error(
    provider: tuple[FakeOpenAI, OpenAIBackend], event: Any, problem: str
) -> None:
    fake, adapter = provider
    fake.stream_override = [GOOD_CHUNK, event]
    frames, error = await frames_until_failure(adapter.generate(request(), timeout_s=5))
    assert len(frames) == 1
    assert_malformed(error, "stream chunk", problem)


async def test_openai_stream_event_over_the_size_cap_fails_the_leg(
    provider: tuple[FakeOpenAI, OpenAIBackend],
) -> None:
    fake, adapter = provider
    fake.stream_override = [choice(text="x" * (2 * MAX_EVENT_BYTES))]
    _, error = await frames_until_failure(adapter.generate(request(), timeout_s=5))
    assert error.retryable
    assert "stream event over the" in error.message
    assert "connection failed" not in error.message


async def test_openai_listing_that_is_not_json_is_unhealthy_and_says_why(
    provider: tuple[FakeOpenAI, OpenAIBackend],
) -> None:
    fake, adapter = provider
    fake.models_reply = b"<html>maintenance</html>"
    health = await adapter.check_health(timeout_s=5)
    assert not health.serving
    assert "malformed /models listing (not JSON)" in health.detail
    assert "maintenance" in health.detail


# --- SGLang ----------------------------------------------------------------------------

NATIVE_MALFORMED = [
    pytest.param({"text": 5}, "text is a number", id="text-number"),
    pytest.param({"text": "a", "output_ids": [None]}, "output_ids holds None", id="id-null"),
    pytest.param({"text": "a", "output_ids": 7}, "output_ids is a number", id="ids-number"),
    pytest.param({"text": "a", "meta_info": []}, "meta_info is an array", id="meta-list"),
    pytest.param(
        {"text": "a", "meta_info": {"finish_reason": 5}}, "finish_reason is a number", id="finish"
    ),
    pytest.param(
        {"text": "a", "meta_info": {"finish_reason": {"type": 5}}},
        "finish_reason.type is a number",
        id="finish-type",
    ),
    pytest.param(
        {"text": "a", "meta_info": {"finish_reason": "stop", "prompt_tokens": [1]}},
        "prompt_tokens is [1], not a token count",
        id="usage-list",
    ),
    pytest.param([1], "an array, not an object", id="array"),
]


async def sglang_colocated(knobs: Knobs, **options: Any) -> tuple[FakeSglang, SglangBackend]:
    engine = FakeSglang("null", knobs=knobs)
    await engine.start()
    adapter = SglangBackend("sg-0", engine.address, options)
    await adapter.start()
    return engine, adapter


@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "cumulative"])
@pytest.mark.parametrize(("event", "problem"), NATIVE_MALFORMED)
async def test_sglang_native_stream_of_the_wrong_shape_is_a_backend_error(
    event: Any, problem: str, incremental: bool
) -> None:
    good = {"text": "Hel", "output_ids": [9906], "meta_info": {"finish_reason": None}}
    engine, adapter = await sglang_colocated(
        Knobs(stream_override=[good, event]), incremental_output=incremental
    )
    try:
        frames, error = await frames_until_failure(adapter.generate(request(), timeout_s=5))
    finally:
        await adapter.close()
        await engine.stop()
    assert len(frames) == 1
    assert_malformed(error, "stream event", problem)


@pytest.mark.parametrize(("event", "problem"), MALFORMED_CHUNKS)
async def test_sglang_openai_stream_of_the_wrong_shape_is_a_backend_error(
    event: Any, problem: str
) -> None:
    engine, adapter = await sglang_colocated(Knobs(stream_override=[GOOD_CHUNK, event]))
    try:
        frames, error = await frames_until_failure(
            adapter.generate(request(chat=True), timeout_s=5)
        )
    finally:
        await adapter.close()
        await engine.stop()
    assert len(frames) == 1
    assert_malformed(error, "stream chunk", problem)


@pytest.mark.parametrize(
    ("event", "problem"),
    [
        ({"choices": 5}, "choices is a number"),
        ({"meta_info": {"finish_reason": 5}}, "finish_reason is a number"),
        ({"meta_info": 5}, "meta_info is a number"),
        ({"choices": [{"finish_reason": ["abort"]}]}, "finish_reason is an array"),
    ],
    ids=["choices", "finish", "meta", "choice-finish"],
)
async def test_sglang_prefill_reply_of_the_wrong_shape_fails_the_split(
    event: dict[str, Any], problem: str
) -> None:
    rooms = Rooms()
    prefill_engine = FakeSglang("prefill", rooms, knobs=Knobs(stream_override=[event]))
    decode_engine = FakeSglang("decode", rooms, knobs=Knobs(hold_after_events=1))
    for engine in (prefill_engine, decode_engine):
        await engine.start()
    prefill = SglangBackend("p0", prefill_engine.address)
    decode = SglangBackend("d0", decode_engine.address)
    for adapter in (prefill, decode):
        await adapter.start()
    try:
        result = await prefill.prefill(request(), timeout_s=5)
        assert result.handle is not None
        _, error = await frames_until_failure(
            decode.decode(request(), result.handle, -1, timeout_s=5)
        )
    finally:
        for adapter in (prefill, decode):
            await adapter.close()
        for engine in (prefill_engine, decode_engine):
            await engine.stop()
    assert error.backend_id == "p0"  # charged to the prefill engine that sent it
    assert error.retryable
    assert "malformed prefill event" in error.message
    assert problem in error.message


async def test_sglang_metrics_page_over_the_cap_fails_the_load_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("backends.sglang.MAX_PAGE_BYTES", 1000)
    engine, adapter = await sglang_colocated(Knobs(metrics="sglang:num_running_reqs 1\n" * 100))
    try:
        with pytest.raises(BackendError, match=r"metrics page .*over the 1000 byte limit"):
            await adapter.load(timeout_s=5)
    finally:
        await adapter.close()
        await engine.stop()


# --- a runaway engine ------------------------------------------------------------------


class Ticker:
    """Another task on the loop: counts its turns."""

    def __init__(self) -> None:
        self.turns = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.turns += 1
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


def longest_run_without_a_turn(turns_at_each_event: list[int]) -> int:
    longest = run = 0
    for before, after in itertools.pairwise(turns_at_each_event):
        run = run + 1 if after == before else 0
        longest = max(longest, run)
    return longest


async def test_reading_buffered_events_gives_the_loop_a_turn_every_few_events() -> None:
    # What aiohttp has buffered is handed over without suspending: a body already in
    # memory is read here the same way, so only the reader's own yields let others run.
    event = b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n'

    async def buffered() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield event * 100

    ticker = Ticker()
    await asyncio.sleep(0)
    started = ticker.turns
    turns = [ticker.turns async for _ in iter_sse(buffered(), "vllm-0")]
    await ticker.stop()
    assert len(turns) == 5000
    assert turns[-1] - started >= 5000 // YIELD_EVERY_STEPS
    assert longest_run_without_a_turn(turns) < YIELD_EVERY_STEPS


async def test_a_runaway_stream_is_forwarded_as_sent_and_leaves_the_loop_responsive(
    vllm: tuple[FakeVllm, VllmBackend],
) -> None:
    engine, adapter = vllm
    engine.runaway_chunks = 20_000  # one write, past max_tokens 16
    ticker = Ticker()
    turns, ids = [], 0
    async for raw in adapter.generate(request(), timeout_s=30):
        frame = router_pb2.GenerateResponse.FromString(raw)
        ids += len(frame.token_ids)
        turns.append(ticker.turns)
    await ticker.stop()
    # Every token the engine sent, none added: the router enforces max_tokens.
    assert ids == 20_000
    assert longest_run_without_a_turn(turns) < YIELD_EVERY_STEPS


async def test_openai_frames_need_no_socket_to_yield() -> None:
    # The same through the OpenAI stream decoder, with a body already in memory.
    chunk = b'data: {"choices": [{"index": 0, "text": "x", "token_ids": [5]}]}\n\n'

    class Content:
        async def iter_any(self) -> AsyncIterator[bytes]:
            yield chunk * 1000
            yield b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n'

    class Response:
        content = Content()

    ticker = Ticker()
    turns, ids = [], []
    frames = openai_frames("vllm-0", Response())  # type: ignore[arg-type]  # the part it reads
    async for raw in frames:
        ids.append(len(router_pb2.GenerateResponse.FromString(raw).token_ids))
        turns.append(ticker.turns)
    await ticker.stop()
    # The events of the one read are merged, never more than a turn's worth to a frame,
    # and the loop gets a turn between frames.
    assert sum(ids) == 1000
    assert max(ids) <= YIELD_EVERY_STEPS
    assert len(turns) < 1000
    assert longest_run_without_a_turn(turns) < YIELD_EVERY_STEPS


# --- through the router's doors --------------------------------------------------------


@pytest.fixture
async def router_in_front_of_a_broken_engine() -> AsyncIterator[tuple[FakeVllm, Daemon]]:
    engine = FakeVllm(stream_override=[{"choices": 5}])
    await engine.start()
    backend = BackendConfig(
        id="vllm-0", kind="vllm", address=engine.address, role=Role.BOTH, model=MODEL
    )
    settings = Settings(grpc_address="127.0.0.1:0", http_address="127.0.0.1:0", drain_grace_s=0)
    daemon = Daemon(settings, PoolConfig(backends=(backend,)))
    await daemon.start()
    yield engine, daemon
    await daemon.stop()
    await engine.stop()


async def test_grpc_door_answers_a_malformed_reply_with_unavailable(
    router_in_front_of_a_broken_engine: tuple[FakeVllm, Daemon],
) -> None:
    _, daemon = router_in_front_of_a_broken_engine
    async with AsyncRouterClient(f"127.0.0.1:{daemon.grpc_port}", timeout_s=30) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in client.generate("Hello there", disaggregation="colocated"):
                pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert "malformed stream chunk (choices is a number, not an array)" in details


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_http_door_answers_a_malformed_reply_with_a_502_in_openai_shape(
    router_in_front_of_a_broken_engine: tuple[FakeVllm, Daemon], stream: bool
) -> None:
    _, daemon = router_in_front_of_a_broken_engine
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 8, "stream": stream}
    url = f"http://127.0.0.1:{daemon.http_port}/v1/completions"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as answer:
        status, reply = answer.status, await answer.json()
    assert status == 502
    assert (
        "malformed stream chunk (choices is a number, not an array)" in (reply["error"]["message"])
    )
