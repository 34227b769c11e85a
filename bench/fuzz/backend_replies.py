"""Target ``backend_replies``: what an engine sends back, to each reply parser.

The first byte picks the parser (its low three bits) and, for streams, the size of the
reads the body arrives in (the rest of it); the other bytes are the reply:

0. an OpenAI-compatible SSE stream (vLLM, SGLang's OpenAI paths, hosted APIs) through
   :func:`~backends.http_common.iter_sse` and :class:`~backends.http_common.OpenAIStream`;
1. and 2. SGLang's native ``/generate`` stream, incremental or not;
3. SGLang's prefill reply events (:func:`backends.sglang.prefill_problem`);
4. vLLM's prefill answer (:func:`backends.vllm.prefill_answer`);
5. an error body (:func:`~backends.http_common.status_error`);
6. a ``/v1/models`` listing, as vLLM and the OpenAI adapter read it;
7. a ``/metrics`` page, as vLLM and SGLang read it.

A ServingError (the adapters' BackendError) is the expected refusal. Besides an
exception of another type, a crash is a frame that does not decode as
``GenerateResponse`` or an error message that is not UTF-8 (:class:`PropertyViolationError`):
neither could reach a client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from backends import openai, sglang, vllm
from backends._gen.hetero.router.v1 import router_pb2
from backends.errors import ServingError
from backends.http_common import (
    OpenAIStream,
    ShapeError,
    iter_sse,
    parse_json,
    status_error,
)

REFUSALS: tuple[type[ServingError], ...] = (ServingError,)

_LOOP = asyncio.new_event_loop()


class PropertyViolationError(Exception):
    """A parser returned what no client could be sent."""


def one_input(data: bytes) -> None:
    if not data:
        return
    choice, reply = data[0], data[1:]
    try:
        _PARSERS[choice & 7](reply, (choice >> 3) + 1)
    except REFUSALS as error:
        _check_message(error.message)


def _openai_stream(reply: bytes, read_size: int) -> None:
    _decode_stream(OpenAIStream("fuzz"), reply, read_size)


def _native_stream(reply: bytes, read_size: int) -> None:
    _decode_stream(sglang.NativeStream("fuzz", incremental=True), reply, read_size)


def _native_whole_stream(reply: bytes, read_size: int) -> None:
    _decode_stream(sglang.NativeStream("fuzz", incremental=False), reply, read_size)


def _prefill_events(reply: bytes, read_size: int) -> None:
    for data in _events(reply, read_size):
        problem = sglang.prefill_problem(data)
        if problem is not None:
            _check_message(problem)


def _prefill_answer(reply: bytes, read_size: int) -> None:
    result = vllm.prefill_answer("fuzz", "r0", reply)
    if result.first_frame:
        _check_frames([result.first_frame])


def _error_body(reply: bytes, read_size: int) -> None:
    _check_message(status_error("fuzz", 500, reply).message)


def _models_listing(reply: bytes, read_size: int) -> None:
    try:
        listing = parse_json(reply)
    except ShapeError:
        return
    vllm.listed_max_model_len(listing, "m")
    openai.model_ids(listing)


def _metrics_page(reply: bytes, read_size: int) -> None:
    page = reply.decode("utf-8", errors="replace")
    for read in (vllm.metrics_load, sglang.metrics_load):
        load = read(page)
        figures = (load.waiting, load.running, load.kv_tokens_used, load.kv_tokens_capacity)
        if any(figure < 0 for figure in figures):
            raise PropertyViolationError(f"a negative load figure: {load}")


_PARSERS: Sequence[Callable[[bytes, int], None]] = (
    _openai_stream,
    _native_stream,
    _native_whole_stream,
    _prefill_events,
    _prefill_answer,
    _error_body,
    _models_listing,
    _metrics_page,
)


def _decode_stream(decoder: OpenAIStream | sglang.NativeStream, reply: bytes, size: int) -> None:
    """As an adapter reads a stream: frames until [DONE], then the end of the body."""
    frames: list[bytes] = []
    for data in _events(reply, size):
        frame = decoder.feed(data)
        if frame is not None:
            frames.append(frame)
        if decoder.done:
            break
    else:
        frame = decoder.end()
        if frame is not None:
            frames.append(frame)
    _check_frames(frames)


def _events(reply: bytes, read_size: int) -> list[str]:
    """The data of the SSE events of ``reply``, read ``read_size`` bytes at a time."""

    async def reads() -> AsyncIterator[bytes]:
        for start in range(0, len(reply), read_size):
            yield reply[start : start + read_size]

    async def collect() -> list[str]:
        return [event.data async for event in iter_sse(reads(), "fuzz")]

    return _LOOP.run_until_complete(collect())


def _check_frames(frames: Sequence[bytes]) -> None:
    for frame in frames:
        try:
            router_pb2.GenerateResponse.FromString(frame)
        except Exception as error:
            raise PropertyViolationError(f"a frame that does not decode: {error}") from error


def _check_message(message: str) -> None:
    try:
        message.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PropertyViolationError(f"a message that is not UTF-8: {error}") from None
