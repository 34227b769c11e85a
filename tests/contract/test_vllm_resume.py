"""The vLLM adapter resumes a stream from the tokens its client already has.

The fake engine is greedy and exact (bench/fake_vllm.py): a token-id prompt ending
with the first k ids of its answer continues from token k, so a resumed run must
give exactly the rest of the uninterrupted one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import ChatMessage, GenerationRequest, KVHandle, Role, SamplingParams
from backends.errors import BackendError, BackendRejectedError
from backends.vllm import VllmBackend
from bench.fake_vllm import FakeVllm
from router.dispatch.dispatcher import Dispatcher
from router.metrics import RouterMetrics
from router.pool.registry import Pool
from router.scheduling.plan import Disaggregation
from router.scheduling.registry import build_scheduler
from router.settings import BackendConfig, PoolConfig, Settings

SERVED_MODEL = "tiny"
MODEL = "llama-3.1-8b"
PROMPT = "Tell me about Kermit"
SAMPLING = SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0, seed=3)


def completion(
    request_id: str = "r1", *, max_tokens: int = 16, stop: tuple[str, ...] = ()
) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=3, stop=stop)
    return GenerationRequest(request_id, "llama-3.1-8b", PROMPT, sampling, 4)


def chat(request_id: str = "c1") -> GenerationRequest:
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Who is Kermit?"))
    return replace(completion(request_id), prompt="<rendered>", messages=messages)


def resumed(request: GenerationRequest, generated: list[int]) -> GenerationRequest:
    """What the router sends: the ids the client has, and the tokens still to come."""
    return request.resumed_after(generated)


@pytest.fixture
async def fake() -> AsyncIterator[FakeVllm]:
    server = FakeVllm()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def backend(fake: FakeVllm) -> AsyncIterator[VllmBackend]:
    adapter = VllmBackend("vllm-0", fake.address, {"model": SERVED_MODEL})
    await adapter.start()
    yield adapter
    await adapter.close()


async def run(frames: AsyncIterator[bytes]) -> list[router_pb2.GenerateResponse]:
    return [router_pb2.GenerateResponse.FromString(frame) async for frame in frames]


def text_of(frames: list[router_pb2.GenerateResponse]) -> str:
    return "".join(frame.text for frame in frames)


def ids_of(frames: list[router_pb2.GenerateResponse]) -> list[int]:
    return [token for frame in frames for token in frame.token_ids]


def test_resume_is_offered_exactly_when_frames_carry_token_ids() -> None:
    assert VllmBackend("v", "127.0.0.1:1").capabilities.resume
    assert not VllmBackend("v", "127.0.0.1:1", {"return_token_ids": False}).capabilities.resume


@pytest.mark.parametrize("interrupted_after", [1, 2, 3])
async def test_a_resumed_completion_continues_exactly_where_the_stream_broke(
    fake: FakeVllm, backend: VllmBackend, interrupted_after: int
) -> None:
    whole = await run(backend.generate(completion("u1"), timeout_s=5))
    # What a client had when the stream broke after that many tokens, a token a frame
    # (the adapter merges the tokens of one read into one frame, so whole's frames are
    # not cut at each token): the fake's texts beside the ids it sent.
    per_token = [
        router_pb2.GenerateResponse(text=text, token_ids=[token])
        for text, token in zip(fake.tokens, ids_of(whole), strict=True)
    ]
    delivered = per_token[:interrupted_after]

    rest = await run(backend.generate(resumed(completion("r1"), ids_of(delivered)), timeout_s=5))

    assert ids_of(delivered + rest) == ids_of(whole) == [100, 101, 102, 103]
    assert text_of(delivered + rest) == text_of(whole) == "Hello, world!"
    assert rest[-1].finish_reason == whole[-1].finish_reason
    (leg,) = fake.legs("r1")
    (tokenized,) = fake.calls("/tokenize")
    assert tokenized.body == {"model": SERVED_MODEL, "prompt": PROMPT}
    assert leg.path == "/v1/completions"
    assert leg.body is not None
    assert leg.body["prompt"][-interrupted_after:] == ids_of(delivered)
    assert len(leg.body["prompt"]) == 4 + interrupted_after  # 4 words, then the ids
    assert leg.body["max_tokens"] == 16 - interrupted_after
    assert leg.body["return_token_ids"] is True
    assert "stop" not in leg.body
    # Usage as the engine counts it: the resumed ids were prompt, the new ones completion.
    assert (rest[-1].usage.prompt_tokens, rest[-1].usage.completion_tokens) == (
        4 + interrupted_after,
        4 - interrupted_after,
    )


async def test_a_resumed_chat_is_sent_as_the_templated_messages_ids(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    rest = await run(backend.generate(resumed(chat(), [100]), timeout_s=5))

    assert text_of(rest) == ", world!"
    (tokenized,) = fake.calls("/tokenize")
    assert tokenized.body is not None
    assert tokenized.body["messages"][1] == {"role": "user", "content": "Who is Kermit?"}
    assert tokenized.body["add_generation_prompt"] is True
    (leg,) = fake.legs("c1")
    assert leg.path == "/v1/completions"  # token ids go to the completions endpoint
    assert leg.body is not None
    assert "messages" not in leg.body
    assert len(leg.body["prompt"]) == 7 + 1  # 7 words of roles and contents, then the id


async def test_a_resume_takes_only_the_tokens_still_to_come(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    rest = await run(backend.generate(resumed(completion(max_tokens=3), [100, 101]), timeout_s=5))
    assert ids_of(rest) == [102]
    assert rest[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH


@pytest.mark.parametrize(
    ("stop", "expected", "finish"),
    [
        # "Hello," was generated; vLLM held back its last 2 characters ("o,") for ", w",
        # which spans the resume: the client ends with "Hell" + "o".
        ((", w",), "o", router_pb2.FINISH_REASON_STOP),
        # "," was held back for "ld"; the stop lies in the new text.
        (("ld",), ", wor", router_pb2.FINISH_REASON_STOP),
        # Nothing matches: the held-back "," goes out first, then the rest.
        (("zz",), ", world!", router_pb2.FINISH_REASON_LENGTH),
    ],
    ids=["across-the-resume", "after-it", "none"],
)
async def test_stop_strings_see_the_text_before_the_resume(
    fake: FakeVllm,
    backend: VllmBackend,
    stop: tuple[str, ...],
    expected: str,
    finish: int,
) -> None:
    stops_early = finish == router_pb2.FINISH_REASON_STOP
    if stops_early:
        fake.chunk_delay_s = 60  # the engine would go on: the adapter must end its request
    request = resumed(completion("s1", stop=stop), [100, 101])
    rest = await run(backend.generate(request, timeout_s=120))

    assert text_of(rest) == expected
    assert rest[-1].finish_reason == finish
    assert all(frame.finish_reason == 0 for frame in rest[:-1])
    assert rest[-1].usage.prompt_tokens == 4 + 2
    assert rest[-1].usage.completion_tokens == len(ids_of(rest))
    (leg,) = fake.legs("s1")
    assert leg.body is not None
    assert "stop" not in leg.body  # the engine would miss a stop across the resume
    detokenized = [call.body for call in fake.calls("/detokenize")]
    assert len(detokenized) == 2  # the prompt alone, and with the generated ids
    if stops_early:
        await fake.wait_for(lambda: "s1" in fake.disconnected)  # vLLM's abort


async def test_a_stop_across_the_resume_ends_at_its_token_when_the_rest_comes_at_once(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    """The engine's events reach the adapter in one read: the stream still ends at the
    token that completes the stop string (the adapter reads a resumed stream with stop
    strings a token at a time), with no ids or usage past it."""
    fake.one_write = True
    fake.tokens = ["Hello", ",", " world", "!", " Bye", "."]
    request = resumed(completion("s2", stop=(", w",)), [100, 101])
    rest = await run(backend.generate(request, timeout_s=5))

    assert text_of(rest) == "o"
    assert ids_of(rest) == [102]  # " world" completes ", w"; "!" and " Bye" came with it
    assert rest[-1].finish_reason == router_pb2.FINISH_REASON_STOP
    assert rest[-1].usage.completion_tokens == 1


@pytest.mark.parametrize(
    "case",
    [
        # "é" is two bytes, a token each: the cut after the first leaves it incomplete,
        # and the interrupted stream had sent "Hello caf".
        (["Hello", " caf", "\udcc3", "\udca9", "!"], 3, "é!"),
        # A byte that begins no character: the stream held it back as it would an
        # incomplete one, and the text after the resume shows it as U+FFFD.
        (["Hello", "\udca9", "it", "6"], 2, "\ufffdit6"),
    ],
    ids=["split-character", "stray-byte"],
)
@pytest.mark.parametrize("echo", [True, False], ids=["vllm-0.32", "fixed-engine"])
async def test_a_resume_after_a_split_character_sends_only_the_text_after_the_cut(
    fake: FakeVllm, backend: VllmBackend, case: tuple[list[str], int, str], echo: bool
) -> None:
    """vLLM 0.32, resumed from token ids whose text ends in an incomplete character,
    sends the prompt's text and the generated text again with the first new token: the
    adapter sends the text after the cut, as an uninterrupted stream would."""
    tokens, cut, rest_text = case
    fake.tokens, fake.echo_incomplete_prompt = tokens, echo
    whole = await run(backend.generate(completion("u1"), timeout_s=5))
    delivered = [100 + index for index in range(cut)]

    rest = await run(backend.generate(resumed(completion("r1"), delivered), timeout_s=5))

    assert text_of(rest) == rest_text
    assert text_of(whole).endswith(rest_text)
    assert delivered + ids_of(rest) == ids_of(whole)
    assert rest[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH


async def test_a_stop_string_across_a_split_character_ends_the_resumed_stream(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    """The stop "fé" spans the cut, which fell inside "é": the interrupted stream had held
    back "f" (vLLM holds the stop's length less one) and not sent the incomplete "é"."""
    fake.tokens = ["Hello", " caf", "\udcc3", "\udca9", "!"]
    request = resumed(completion("s3", stop=("fé",)), [100, 101, 102])
    rest = await run(backend.generate(request, timeout_s=5))

    assert text_of(rest) == ""
    assert ids_of(rest) == [103]  # the token completing "é", and with it the stop
    assert rest[-1].finish_reason == router_pb2.FINISH_REASON_STOP


async def test_a_resumed_sequence_over_the_context_is_refused_before_any_leg(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    fake.max_model_len = 6
    assert (await backend.check_health(timeout_s=5)).serving
    with pytest.raises(BackendRejectedError, match="prompt and generated tokens are 6"):
        await run(backend.generate(resumed(completion(max_tokens=4), [100, 101]), timeout_s=5))
    assert fake.legs("r1") == []


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        ({"count": 2, "tokens": [1, None]}, "tokens holds None"),
        ({"count": 2, "tokens": "12"}, "tokens is a string"),
        ([1, 2], "an array, not an object"),
    ],
    ids=["id-null", "string", "array"],
)
async def test_a_malformed_tokenize_answer_fails_the_resume(
    fake: FakeVllm, backend: VllmBackend, reply: Any, problem: str
) -> None:
    fake.tokenize_reply = reply
    with pytest.raises(BackendError) as caught:
        await run(backend.generate(resumed(completion(), [100]), timeout_s=5))
    assert caught.value.retryable
    assert "malformed /tokenize answer" in caught.value.message
    assert problem in caught.value.message
    assert fake.legs("r1") == []


async def test_a_failed_tokenize_fails_the_resume_with_the_engines_words(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    fake.tokenize_status = 503
    with pytest.raises(BackendError, match="HTTP 503: tokenizer failed") as caught:
        await run(backend.generate(resumed(completion(), [100]), timeout_s=5))
    assert caught.value.retryable


async def test_abort_during_the_resumes_tokenize_sends_no_leg(
    fake: FakeVllm, backend: VllmBackend
) -> None:
    fake.tokenize_delay_s = 30

    async def resume() -> list[router_pb2.GenerateResponse]:
        return await run(backend.generate(resumed(completion(), [100]), timeout_s=60))

    task = asyncio.create_task(resume())
    await fake.wait_for(lambda: bool(fake.calls("/tokenize")))
    await backend.abort("r1", timeout_s=1)
    with pytest.raises(BackendError, match="aborted"):
        await task
    assert fake.legs("r1") == []


async def test_a_split_takes_no_generated_ids(backend: VllmBackend) -> None:
    request = resumed(completion(), [100])
    with pytest.raises(BackendError, match="runs colocated") as prefill:
        await backend.prefill(request, timeout_s=5)
    handle = KVHandle("vllm-0", "r1")
    with pytest.raises(BackendError, match="runs colocated") as decode:
        await run(backend.decode(request, handle, -1, timeout_s=5))
    assert not prefill.value.retryable
    assert not decode.value.retryable


async def test_the_dispatcher_resumes_a_broken_stream_on_another_vllm_engine() -> None:
    # Both engines break off after two tokens: whichever serves first, the other
    # continues from the two ids the client has, with the two tokens still to come.
    engines = [FakeVllm(drop_after=2), FakeVllm(drop_after=2)]
    for engine in engines:
        await engine.start()
    configs = tuple(
        BackendConfig(id=f"v{i}", kind="vllm", address=e.address, role=Role.BOTH, model=MODEL)
        for i, e in enumerate(engines)
    )
    metrics = RouterMetrics(CollectorRegistry())
    pool = Pool(PoolConfig(backends=configs), metrics)
    await pool.start()
    try:
        for config in configs:
            pool.set_health(config.id, True, "", None)
        settings = Settings()
        dispatcher = Dispatcher(pool, build_scheduler(settings), settings, metrics)
        request = replace(completion("m1"), model=MODEL, sampling=replace(SAMPLING, max_tokens=4))
        got = await run(dispatcher.generate(request, Disaggregation.COLOCATED))
    finally:
        await pool.close()
        for engine in engines:
            await engine.stop()

    assert ids_of(got) == [100, 101, 102, 103]
    assert text_of(got) == "Hello, world!"
    assert got[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH
    assert (got[-1].usage.prompt_tokens, got[-1].usage.completion_tokens) == (4, 4)
    prompts = sorted(
        ((leg.body or {}).get("prompt") for engine in engines for leg in engine.legs("m1")),
        key=lambda prompt: isinstance(prompt, list),
    )
    text, ids = prompts
    assert text == PROMPT  # the first attempt sends the text
    assert isinstance(ids, list)
    assert ids[-2:] == [100, 101]  # the resume: the prompt's ids, then the two sent
