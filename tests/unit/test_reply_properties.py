"""Whatever a backend sends, its adapter ends in frames or a ServingError, never another
exception (KeyError, TypeError, UnicodeDecodeError, RecursionError, OverflowError, ...).

Property tests (hypothesis) of the reply parsers, called directly: the SSE reader, the
OpenAI-compatible and SGLang-native stream decoders, SGLang's prefill reply check, vLLM's
prefill answer, error bodies and both engines' ``/metrics`` readers. Inputs are random
bytes and random JSON, and JSON shaped like the real replies with fields of random type,
so that most examples get past the first check. Frames must decode as
``GenerateResponse``; an error's message must be UTF-8 (it travels in a gRPC status and
an HTTP body). Bounded and derandomized: the same examples on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from backends import sglang, vllm
from backends._gen.hetero.router.v1 import router_pb2
from backends.base import BackendLoad, PrefillResult
from backends.errors import BackendError, ServingError
from backends.http_common import (
    OpenAIStream,
    ShapeError,
    SSEEvent,
    field_count,
    field_ids,
    field_list,
    field_object,
    field_text,
    iter_sse,
    json_object,
    openai_frames,
    parse_json,
    status_error,
)
from backends.openai import model_ids
from backends.sglang import NativeStream, prefill_problem

bounded = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- strategies ----------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)  # lone surrogates included: JSON escapes them as "\ud800"
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
token_ids = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=4) | json_values
reasons = st.sampled_from(["stop", "length", "abort", "", "content_filter"]) | json_values
usages = (
    st.fixed_dictionaries(
        {},
        optional={
            "prompt_tokens": st.integers(min_value=-1, max_value=2**33) | json_values,
            "completion_tokens": st.integers(min_value=-1, max_value=2**33) | json_values,
        },
    )
    | json_values
)
choices = st.fixed_dictionaries(
    {},
    optional={
        "index": st.just(0),
        "text": st.text(max_size=10) | json_values,
        "delta": st.fixed_dictionaries({}, optional={"content": st.text() | json_values})
        | json_values,
        "message": st.fixed_dictionaries({}, optional={"content": st.text() | json_values}),
        "token_ids": token_ids,
        "finish_reason": reasons,
    },
)
errors = st.fixed_dictionaries(
    {},
    optional={
        "message": st.text() | json_values,
        "code": st.sampled_from([400, 413, 422, 429, 500, True]) | json_values,
    },
)
# An OpenAI-compatible completion chunk or answer, each field possibly of the wrong type.
openai_chunks = st.fixed_dictionaries(
    {},
    optional={
        "choices": st.lists(choices | json_values, max_size=2) | json_values,
        "usage": usages,
        "error": errors | json_values,
        "kv_transfer_params": st.dictionaries(st.text(max_size=8), json_values) | json_values,
    },
)
# A /v1/models entry.
models = st.fixed_dictionaries(
    {},
    optional={"id": st.sampled_from(["m", "n"]) | json_values, "max_model_len": json_values},
)
meta_infos = st.fixed_dictionaries(
    {},
    optional={
        "finish_reason": st.fixed_dictionaries(
            {}, optional={"type": reasons, "message": st.text() | json_values}
        )
        | reasons,
        "prompt_tokens": st.integers(min_value=-1, max_value=2**33) | json_values,
        "completion_tokens": st.integers(min_value=-1, max_value=2**33) | json_values,
    },
)
# An SGLang /generate event.
native_chunks = st.fixed_dictionaries(
    {},
    optional={
        "text": st.text(max_size=10) | json_values,
        "output_ids": token_ids,
        "meta_info": meta_infos | json_values,
        "error": errors | json_values,
    },
)


def event_data(chunks: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """One event's data: a JSON chunk, [DONE], JSON nested past the parser's depth, or text."""
    return st.one_of(
        chunks.map(json.dumps),
        json_values.map(json.dumps),
        st.just("[DONE]"),
        st.integers(min_value=900, max_value=5000).map(lambda depth: "[" * depth + "]" * depth),
        st.text(max_size=30),
    )


line_ends = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def sse_bodies(draw: st.DrawFn, chunks: st.SearchStrategy[Any]) -> bytes:
    """An SSE body: data (and other) lines with any line ending, or any bytes at all."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    parts: list[bytes] = []
    for data in draw(st.lists(event_data(chunks), max_size=6)):
        field = draw(st.sampled_from([b"data: ", b"data:", b"event: x\ndata: ", b": keep\ndata: "]))
        end = draw(line_ends)
        parts.append(field + data.encode("utf-8", errors="surrogatepass") + end + end)
    return b"".join(parts)


@st.composite
def chunked(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> tuple[bytes, list[bytes]]:
    """A body and the same bytes cut into reads at random places."""
    body = draw(bodies)
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(body)), max_size=8)))
    edges = [0, *cuts, len(body)]
    return body, [body[start:end] for start, end in itertools.pairwise(edges)]


# --- helpers -------------------------------------------------------------------------------


async def _reads(parts: Sequence[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def read_events(parts: Sequence[bytes], max_event_bytes: int = 1 << 20) -> list[SSEEvent]:
    async def collect() -> list[SSEEvent]:
        return [e async for e in iter_sse(_reads(parts), "b0", max_event_bytes=max_event_bytes)]

    return asyncio.run(collect())


def assert_carried(error: ServingError) -> None:
    """An error a client can be told: UTF-8 text in the package's tree."""
    assert isinstance(error, ServingError)
    error.message.encode("utf-8")


def assert_frames(frames: Sequence[bytes]) -> None:
    for frame in frames:
        router_pb2.GenerateResponse.FromString(frame).text.encode("utf-8")


def decode_stream(decoder: OpenAIStream | NativeStream, parts: Sequence[bytes]) -> None:
    """Runs a body through the SSE reader and ``decoder`` as an adapter does: frames, or a
    ServingError; anything else fails the test."""
    frames: list[bytes] = []
    try:
        for event in read_events(parts):
            frame = decoder.feed(event.data)
            if frame is not None:
                frames.append(frame)
            if decoder.done:
                break
        else:
            frame = decoder.end()
            if frame is not None:
                frames.append(frame)
    except ServingError as error:
        assert_carried(error)
    assert_frames(frames)


# --- the SSE reader ------------------------------------------------------------------------


@bounded
@given(chunked(sse_bodies(openai_chunks)))
def test_sse_events_do_not_depend_on_where_reads_cut_the_body(
    cut: tuple[bytes, list[bytes]],
) -> None:
    body, parts = cut
    assert read_events(parts) == read_events([body])


@bounded
@given(chunked(st.binary(max_size=300)), st.integers(min_value=1, max_value=64))
def test_any_bytes_are_events_or_an_oversized_event_error(
    cut: tuple[bytes, list[bytes]], max_event_bytes: int
) -> None:
    _, parts = cut
    events: list[SSEEvent] = []
    try:
        events = read_events(parts, max_event_bytes)
    except BackendError as error:
        failure: BackendError | None = error
    else:
        failure = None
    assert failure is None or "byte limit" in failure.message
    for event in events:
        assert len(event.data.encode()) <= max_event_bytes


# --- stream decoders -----------------------------------------------------------------------


DEEP = b"[" * 5000 + b"]" * 5000


@bounded
@given(chunked(sse_bodies(openai_chunks)))
@example((b"", [b"data: " + DEEP + b"\n\n"]))
@example((b"", [b'data: {"error": ' + DEEP + b"}\n\n"]))
def test_openai_stream_ends_in_frames_or_a_serving_error(cut: tuple[bytes, list[bytes]]) -> None:
    decode_stream(OpenAIStream("b0"), cut[1])


def frames_of(
    parts: Sequence[bytes], max_tokens: int | None, *, merged: bool
) -> tuple[str, list[int], list[tuple[int, int, int]], str | None]:
    """What a client gets from a body: its text, its ids, each frame's (finish reason,
    usage) and the error's message, event by event (``feed``) or read by read, merged
    (``openai_frames``)."""
    frames: list[bytes] = []
    failure: str | None = None

    class Content:
        async def iter_any(self) -> AsyncIterator[bytes]:
            for part in parts:
                yield part

        async def readany(self) -> bytes:  # what is left after [DONE]: nothing
            return b""

    class Response:
        content = Content()

    async def collect() -> None:
        stream = openai_frames("b0", Response(), max_tokens=max_tokens)  # type: ignore[arg-type]  # the part it reads
        async for frame in stream:
            frames.append(frame)

    try:
        if merged:
            asyncio.run(collect())
        else:
            decoder = OpenAIStream("b0")
            for event in read_events(parts):
                frame = decoder.feed(event.data)
                if frame is not None:
                    frames.append(frame)
                if decoder.done:
                    break
            else:
                frame = decoder.end()
                if frame is not None:
                    frames.append(frame)
    except ServingError as error:
        failure = error.message
    messages = [router_pb2.GenerateResponse.FromString(frame) for frame in frames]
    ends = [
        (int(m.finish_reason), m.usage.prompt_tokens, m.usage.completion_tokens)
        for m in messages
        if m.finish_reason or m.HasField("usage")
    ]
    return (
        "".join(m.text for m in messages),
        [t for m in messages for t in m.token_ids],
        ends,
        failure,
    )


_token_chunks = st.fixed_dictionaries(
    {"text": st.sampled_from(["a", "bc", "", " d"])},
    optional={"token_ids": st.lists(st.integers(min_value=0, max_value=9), max_size=2)},
).map(lambda choice: {"choices": [{"index": 0, **choice}]})
_stream_ends: st.SearchStrategy[list[Any]] = st.sampled_from(
    [
        [],  # cut off
        [{"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}],
        [{"choices": [{"index": 0, "text": "!", "finish_reason": "stop"}]}, {"usage": {}}],
        [
            {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]},
            {"usage": {"prompt_tokens": 3, "completion_tokens": 2}},
            "[DONE]",
        ],
        [{"error": {"message": "engine died", "code": 500}}],
        [{"choices": 5}],  # the wrong shape
    ]
)


@st.composite
def token_streams(draw: st.DrawFn) -> bytes:
    """A well-formed streaming completion: token chunks, then an end of any kind."""
    events: list[Any] = [*draw(st.lists(_token_chunks, max_size=8)), *draw(_stream_ends)]
    return b"".join(
        b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events
    )


@bounded
@given(
    chunked(sse_bodies(openai_chunks) | token_streams()),
    st.none() | st.integers(min_value=0, max_value=4),
)
def test_merging_the_events_of_a_read_changes_only_where_frames_are_cut(
    cut: tuple[bytes, list[bytes]], max_tokens: int | None
) -> None:
    # The text, the ids, the last frame and any error are the same as event by event.
    _, parts = cut
    assert frames_of(parts, max_tokens, merged=True) == frames_of(parts, None, merged=False)


@bounded
@given(chunked(sse_bodies(native_chunks)), st.booleans())
def test_sglang_native_stream_ends_in_frames_or_a_serving_error(
    cut: tuple[bytes, list[bytes]], incremental: bool
) -> None:
    decode_stream(NativeStream("b0", incremental), cut[1])


@bounded
@given(st.lists(event_data(openai_chunks | native_chunks), max_size=4))
@example(['{"meta_info": {"finish_reason": {"type": "abort", "message": "\\udfff"}}}'])
def test_sglang_prefill_reply_check_says_why_or_nothing(events: list[str]) -> None:
    for data in events:
        problem = prefill_problem(data)
        assert problem is None or problem.encode("utf-8")


# --- whole answers -------------------------------------------------------------------------


def answer_bytes(shapes: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        shapes.map(lambda value: json.dumps(value).encode()),
        event_data(shapes).map(lambda text: text.encode("utf-8", errors="surrogatepass")),
        st.binary(max_size=100),
    )


@bounded
@given(answer_bytes(openai_chunks))
def test_vllm_prefill_answer_is_a_result_or_a_backend_error(payload: bytes) -> None:
    try:
        result = vllm.prefill_answer("b0", "r1", payload)
    except BackendError as error:
        assert_carried(error)
        return
    assert isinstance(result, PrefillResult)
    assert_frames([result.first_frame] if result.first_frame else [])
    assert result.finished == (result.handle is None)


@bounded
@given(answer_bytes(st.fixed_dictionaries({}, optional={"error": errors}) | json_values))
@example(b'{"error": {"message": "\\ud800"}}')
@example(b'{"detail": ' + DEEP + b"}")
def test_an_error_body_becomes_a_backend_error_with_a_short_utf8_message(payload: bytes) -> None:
    error = status_error("b0", 500, payload)
    assert_carried(error)
    assert len(error.message) < 600


@bounded
@given(
    json_values,
    st.sampled_from(
        [field_count, field_ids, field_list, field_object, field_text]
        # each is given (value, name) and returns the value as its type, or ShapeError
    ),
)
def test_fields_are_their_type_or_a_shape_error(
    value: Any, read: Callable[[Any, str], object]
) -> None:
    with contextlib.suppress(ShapeError):
        read(value, "f")


@bounded
@given(answer_bytes(json_values))
def test_json_replies_are_a_value_or_a_shape_error(payload: bytes) -> None:
    for parse in (parse_json, json_object):
        with contextlib.suppress(ShapeError):
            parse(payload)


@bounded
@given(json_values | st.fixed_dictionaries({"data": st.lists(json_values | models, max_size=3)}))
def test_model_listings_of_any_shape_give_ids_or_none(listing: Any) -> None:
    assert all(isinstance(model, str) for model in model_ids(listing))
    limit = vllm.listed_max_model_len(listing, "m")
    assert limit is None or (isinstance(limit, int) and limit > 0)


# --- /metrics pages ------------------------------------------------------------------------

metric_names = st.sampled_from(
    [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:cache_config_info",
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:num_used_tokens",
        "sglang:max_total_num_tokens",
        "sglang:token_usage",
    ]
)
sample_values = st.sampled_from(["NaN", "+Inf", "-Inf", "1e308", "-3", "0", "1e-320"]) | st.floats(
    allow_nan=True
).map(repr)
label_values = st.sampled_from(["1", "²", "٣", "None", "9" * 5000, "", "x"])


@st.composite
def metrics_pages(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return draw(st.text(max_size=100))
    lines = []
    for name in draw(st.lists(metric_names, max_size=5)):
        labels = draw(
            st.dictionaries(
                st.sampled_from(["engine", "num_gpu_blocks", "block_size", "tp_rank"]),
                label_values,
                max_size=2,
            )
        )
        body = ",".join(f'{key}="{json.dumps(value)[1:-1]}"' for key, value in labels.items())
        lines.append(f"{name}{{{body}}} {draw(sample_values)}")
    return "\n".join(lines)


@bounded
@given(metrics_pages())
@example("vllm:num_requests_running 1e308\nvllm:num_requests_running 1e308")
@example("sglang:num_used_tokens 5\nsglang:token_usage 1e-320")
@example(
    'vllm:kv_cache_usage_perc{engine="0"} 0.5\n'
    'vllm:cache_config_info{engine="0",num_gpu_blocks="²",block_size="16"} 1'
)
def test_a_metrics_page_gives_a_load_of_counts(page: str) -> None:
    for read in (vllm.metrics_load, sglang.metrics_load):
        load = read(page)
        assert isinstance(load, BackendLoad)
        figures = (load.waiting, load.running, load.kv_tokens_used, load.kv_tokens_capacity)
        assert all(isinstance(figure, int) and figure >= 0 for figure in figures)
