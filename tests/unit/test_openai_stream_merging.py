"""The OpenAI stream decoder merges the token events of one read into one frame
(backends/http_common.py, ``openai_frames``): what the client gets is the same text
and ids, in fewer frames, and never a merge that would cost text at a cut."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from backends._gen.hetero.router.v1 import router_pb2
from backends.errors import BackendError
from backends.http_common import openai_frames


def event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return b"data: " + data.encode() + b"\n\n"


def token(text: str, token_id: int) -> bytes:
    return event({"choices": [{"index": 0, "text": text, "token_ids": [token_id]}]})


FINISH = event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
USAGE = event({"usage": {"prompt_tokens": 5, "completion_tokens": 4}})
DONE = event("[DONE]")


class _Content:
    def __init__(self, reads: Sequence[bytes]) -> None:
        self._reads = reads

    async def iter_any(self) -> AsyncIterator[bytes]:
        for read in self._reads:
            yield read

    async def readany(self) -> bytes:
        return b""


class _Response:
    def __init__(self, reads: Sequence[bytes]) -> None:
        self.content = _Content(reads)


def frames(
    reads: Sequence[bytes], max_tokens: int | None = None
) -> list[router_pb2.GenerateResponse]:
    async def collect() -> list[router_pb2.GenerateResponse]:
        stream = openai_frames("vllm-0", _Response(reads), max_tokens=max_tokens)  # type: ignore[arg-type]  # the part it reads
        return [router_pb2.GenerateResponse.FromString(raw) async for raw in stream]

    return asyncio.run(collect())


def test_the_token_events_of_one_read_go_out_as_one_frame() -> None:
    read = token("a", 1) + token("bc", 2) + token(" d", 3) + token("!", 4)
    got = frames([read + FINISH + USAGE + DONE])
    assert [(m.text, list(m.token_ids)) for m in got] == [("abc d!", [1, 2, 3, 4]), ("", [])]
    last = got[-1]
    assert last.finish_reason == router_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 4)


def test_events_read_apart_stay_frames_apart() -> None:
    got = frames([token("a", 1), token("b", 2), token("c", 3) + token("d", 4), FINISH + DONE])
    assert [list(m.token_ids) for m in got] == [[1], [2], [3, 4], []]


def test_tokens_past_the_legs_max_tokens_are_not_merged() -> None:
    # An engine running past the max_tokens it was asked for: the router cuts the stream
    # at max_tokens, and a cut frame loses its text, so nothing past the limit is merged
    # with what comes before it.
    read = b"".join(token(t, i) for i, t in enumerate("abcde", start=1))
    got = frames([read + FINISH + DONE], max_tokens=2)
    assert [(m.text, list(m.token_ids)) for m in got[:-1]] == [
        ("ab", [1, 2]),
        ("c", [3]),
        ("d", [4]),
        ("e", [5]),
    ]


def test_a_failure_in_a_read_comes_after_the_frames_before_it() -> None:
    read = token("a", 1) + token("b", 2) + event({"error": {"message": "engine died"}})
    received: list[router_pb2.GenerateResponse] = []

    async def collect() -> None:
        stream = openai_frames("vllm-0", _Response([read]))  # type: ignore[arg-type]  # the part it reads
        async for raw in stream:
            received.append(router_pb2.GenerateResponse.FromString(raw))

    with pytest.raises(BackendError, match="engine died"):
        asyncio.run(collect())
    assert [(m.text, list(m.token_ids)) for m in received] == [("ab", [1, 2])]
