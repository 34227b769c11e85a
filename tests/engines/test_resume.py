"""A stream broken after k tokens and resumed through the vllm adapter is the whole answer.

Greedy decoding on the real engine: a run interrupted after k tokens (its connection
closed: vLLM's abort), then resumed with the k token ids the client had and the
tokens still to come, gives exactly the uninterrupted run's text and token ids. The
adapter talks to the session's decode engine straight (plain completions; the router's
own migration is tested with the mock devices).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import ChatMessage, GenerationRequest, SamplingParams
from backends.vllm import VllmBackend
from bench.engines.servers import SERVED_MODEL, VllmServer
from tests.engines.conftest import Engines, direct

PROMPT = "def parse_header(line):\n    "
MAX_TOKENS = 24
INTERRUPTED_AFTER = 9


@pytest.fixture
async def adapter(engines: Engines) -> AsyncIterator[VllmBackend]:
    backend = VllmBackend("decode-0", engines.decode.address, {"model": SERVED_MODEL})
    await backend.start()
    assert (await backend.check_health(timeout_s=30)).serving
    yield backend
    await backend.close()


def greedy(request_id: str, *, chat: bool = False, stop: tuple[str, ...] = ()) -> GenerationRequest:
    sampling = SamplingParams(MAX_TOKENS, temperature=0.0, top_p=1.0, seed=0, stop=stop)
    messages = (ChatMessage("user", PROMPT),) if chat else ()
    return GenerationRequest(request_id, SERVED_MODEL, PROMPT, sampling, 16, messages)


async def run(
    adapter: VllmBackend, request: GenerationRequest, *, until_tokens: int | None = None
) -> list[router_pb2.GenerateResponse]:
    """The frames of one stream; with ``until_tokens`` the stream is left (its connection
    closed) once that many token ids have arrived."""
    frames: list[router_pb2.GenerateResponse] = []
    async with contextlib.aclosing(adapter.generate(request, timeout_s=300)) as stream:
        async for raw in stream:
            frames.append(router_pb2.GenerateResponse.FromString(raw))
            if until_tokens is not None and len(ids_of(frames)) >= until_tokens:
                break
    return frames


def ids_of(frames: list[router_pb2.GenerateResponse]) -> list[int]:
    return [token for frame in frames for token in frame.token_ids]


def text_of(frames: list[router_pb2.GenerateResponse]) -> str:
    return "".join(frame.text for frame in frames)


def resumed(request: GenerationRequest, delivered: list[int]) -> GenerationRequest:
    return replace(
        request.resumed_after(delivered),
        request_id=f"{request.request_id}-resumed",
    )


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
async def test_a_resumed_greedy_stream_is_the_uninterrupted_one(
    chat: bool, adapter: VllmBackend, engines: Engines, report: Callable[[str], None]
) -> None:
    whole = await run(adapter, greedy("whole", chat=chat))
    assert text_of(whole) == await direct(engines.decode, PROMPT, MAX_TOKENS, chat=chat)
    assert len(ids_of(whole)) == whole[-1].usage.completion_tokens == MAX_TOKENS

    delivered = await run(adapter, greedy("broken", chat=chat), until_tokens=INTERRUPTED_AFTER)
    assert not delivered[-1].finish_reason
    k = len(ids_of(delivered))
    rest = await run(adapter, resumed(greedy("broken", chat=chat), ids_of(delivered)))

    assert ids_of(delivered) + ids_of(rest) == ids_of(whole)
    assert text_of(delivered) + text_of(rest) == text_of(whole)
    assert rest[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH
    assert rest[-1].usage.completion_tokens == MAX_TOKENS - k
    # The engine counts the resumed ids as prompt; the router moves them to completion.
    assert rest[-1].usage.prompt_tokens == whole[-1].usage.prompt_tokens + k
    report(
        f"resumed after {k} of {MAX_TOKENS} tokens ({'chat' if chat else 'completions'}): identical"
    )


async def test_a_stop_string_across_the_resume_ends_it_as_the_uninterrupted_run(
    adapter: VllmBackend, report: Callable[[str], None]
) -> None:
    """The stop string is 4 characters around the boundary between the last token the
    interrupted stream delivered and the next: the engine resumed from token ids never
    sees its first half, the adapter does."""
    whole = await run(adapter, greedy("plain"))
    answer, stop, k = text_of(whole), "", 0
    for frame in range(1, len(whole) - 1):
        boundary = len(text_of(whole[:frame]))
        candidate = answer[boundary - 2 : boundary + 2]
        k = len(ids_of(whole[:frame]))
        if (
            k >= INTERRUPTED_AFTER
            and len(candidate) == 4
            and answer.find(candidate) == boundary - 2
        ):
            stop = candidate
            break
    assert stop, "no stop string spans a token boundary in the greedy answer"
    stopped = await run(adapter, greedy("stopped", stop=(stop,)))
    assert stopped[-1].finish_reason == router_pb2.FINISH_REASON_STOP

    # The adapter merges the events of one read into a frame, so a cut can land past k
    # (and past the stop) when the engine's events arrive together: cut again then.
    for attempt in range(5):
        request = greedy(f"cut-{attempt}", stop=(stop,))
        delivered = await run(adapter, request, until_tokens=k)
        if len(ids_of(delivered)) == k and not delivered[-1].finish_reason:
            break
    else:
        pytest.fail(f"five cuts after {k} tokens all ran past it: the events came together")
    rest = await run(adapter, resumed(request, ids_of(delivered)))

    assert text_of(delivered) + text_of(rest) == text_of(stopped)
    assert ids_of(delivered) + ids_of(rest) == ids_of(stopped)
    assert rest[-1].finish_reason == router_pb2.FINISH_REASON_STOP
    report(f"stop {stop!r} across a resume after {k} tokens: identical to the uninterrupted run")


async def test_a_resume_after_a_split_character_sends_only_the_text_after_the_cut(
    adapter: VllmBackend, engines: Engines, report: Callable[[str], None]
) -> None:
    """The cut falls after a token that leaves a character incomplete (the tiny model's
    greedy answer has stray bytes): vLLM 0.32 then sends the whole sequence's text, the
    prompt's included, with its first new token; the adapter sends the text after it."""
    whole = await run(adapter, greedy("whole-bytes"))
    generated = ids_of(whole)
    prompt_ids = await engine_call(engines.decode, "/tokenize", {"prompt": PROMPT})
    cuts = [
        k
        for k in range(1, len(generated) - 1)
        if (await detokenized(engines.decode, prompt_ids["tokens"] + generated[:k])).endswith(
            "\ufffd"
        )
    ]
    assert cuts, f"no token of the greedy answer leaves a character incomplete: {generated}"
    k = cuts[0]
    prompt_text = await detokenized(engines.decode, prompt_ids["tokens"])
    before = await detokenized(engines.decode, prompt_ids["tokens"] + generated[:k])
    delivered_text = before[len(prompt_text) :].rstrip("\ufffd")

    rest = await run(adapter, resumed(greedy("bytes"), generated[:k]))

    assert generated[:k] + ids_of(rest) == generated
    assert delivered_text + text_of(rest) == text_of(whole)
    report(f"resumed after {k} tokens, inside a character: identical to the uninterrupted run")


async def engine_call(server: VllmServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.post(server.url + path, json={"model": SERVED_MODEL, **body}) as answer,
    ):
        assert answer.status == 200, await answer.text()
        reply: dict[str, Any] = await answer.json()
    return reply


async def detokenized(server: VllmServer, tokens: list[int]) -> str:
    return str((await engine_call(server, "/detokenize", {"tokens": tokens}))["prompt"])
