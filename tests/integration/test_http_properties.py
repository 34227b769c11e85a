"""A property of the real HTTP door (aiohttp app, middlewares, OpenAI routes) over generated
bodies and headers: every answer is a 2xx, or a 4xx in OpenAI's error shape; never a 5xx
nor an error logged; and nothing refused reaches the dispatcher, a fake that records calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import GenerationRequest
from router.api.http_server import AdminServer
from router.api.openai_http import OpenAIRoutes
from router.dispatch.dispatcher import Dispatcher
from router.pool.registry import Pool
from router.settings import Settings

MODEL = "llama-3.1-8b"


class _Admission:
    def check_door(self, *args: object, **labels: object) -> None: ...

    @contextlib.contextmanager
    def client_stream(self, *args: object) -> Iterator[None]:
        yield

    def count_write_stall(self, door: str) -> None: ...


@dataclass
class RecordingDispatcher:
    """What the door calls on a dispatcher; ``generate`` records the request and answers
    one token."""

    calls: list[GenerationRequest] = field(default_factory=list)
    admission: _Admission = field(default_factory=_Admission)
    slo_classes: frozenset[str] = frozenset({"default", "interactive"})

    def class_slo(self, slo_class: str) -> None:
        return None

    def count_rejected(self, outcome: str, model: str = "") -> None: ...

    async def generate(self, request: GenerationRequest, *args: object) -> AsyncGenerator[bytes]:
        self.calls.append(request)
        yield router_pb2.GenerateResponse(
            text="ok",
            finish_reason=router_pb2.FINISH_REASON_STOP,
            usage=router_pb2.Usage(prompt_tokens=1, completion_tokens=1),
        ).SerializeToString()


@dataclass
class FakePool:
    models: list[str] = field(default_factory=lambda: [MODEL])
    default_model: str = MODEL


@dataclass
class Door:
    port: int
    dispatcher: RecordingDispatcher


@pytest.fixture
async def door() -> AsyncIterator[Door]:
    config = Settings(http_header_timeout_s=5, http_body_timeout_s=5)
    dispatcher = RecordingDispatcher()
    routes = OpenAIRoutes(config, cast(Pool, FakePool()), cast(Dispatcher, dispatcher))
    server = AdminServer(
        CollectorRegistry(), lambda: (True, "ok"), "127.0.0.1:0", routes, settings=config
    )
    port = await server.start()
    yield Door(port, dispatcher)
    await server.stop()


# -- what clients send: mostly well-formed, with hostile values mixed in ------------

# Numbers at the edges (huge, negative, non-finite: NaN and Infinity in the JSON), text
# with lone surrogates, and nesting.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63, 10**30, -(10**30)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", "auto", "split", "colocated", MODEL, "\ud800", "a\udfff", "user"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
# Values that once broke the door, given twice as often as all others together.
EDGES = ["\ud800", "a\udfff", "", 10**30, 2**63, 2**32, -1, 0, True, None, float("nan"),
         float("inf"), [], {}, [0.0], {"a": 1}, ["\udc00"]]  # fmt: skip
hostile = st.one_of(*[st.sampled_from(EDGES)] * 2, json_values)
texts = st.text(min_size=1, max_size=12)
GOOD_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.just(MODEL),
    "max_tokens": st.integers(min_value=1, max_value=16),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.01, max_value=1),
    "seed": st.integers(min_value=0, max_value=2**63),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=3),
    "n": st.just(1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "disaggregation": st.sampled_from(["auto", "split", "colocated"]),
    "user": texts,
    "logprobs": st.sampled_from([None, False]),
    "tools": st.just([]),
    "presence_penalty": st.just(0),
}
# Fields a client may get wrong: those above, the prompt or messages, and ones the door
# does not implement.
MUTABLE = sorted({*GOOD_FIELDS, "prompt", "messages", "echo", "logit_bias", "suffix", "best_of"})
parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=2)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]), "content": texts | parts}
    ),
    min_size=1,
    max_size=3,
)
hostile_messages = st.lists(
    st.fixed_dictionaries({"role": hostile, "content": hostile})
    | st.fixed_dictionaries(
        {
            "role": st.just("user"),
            "content": st.lists(
                st.fixed_dictionaries({"type": st.just("text"), "text": hostile}), max_size=2
            ),
        }
    ),
    max_size=2,
)


@st.composite
def bodies(draw: st.DrawFn, required: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """A valid body, or one with a field or two holding an edge value or any JSON."""
    body: dict[str, Any] = draw(st.fixed_dictionaries(required, optional=GOOD_FIELDS))
    for field_name in draw(st.lists(st.sampled_from(MUTABLE), max_size=2, unique=True)):
        body[field_name] = draw(hostile_messages if field_name == "messages" else hostile)
    return body


completions = st.tuples(st.just("/v1/completions"), bodies({"prompt": texts}))
chats = st.tuples(st.just("/v1/chat/completions"), bodies({"messages": messages}))


def _encoded(body: object) -> bytes:
    # ensure_ascii writes a lone surrogate as the \\ud800 escape a client may send.
    return json.dumps(body).encode()


noise = st.binary(max_size=40) | st.sampled_from(
    [b"", b"{", b"[" * 2000, b'{"prompt": "x"}garbage', b'{"prompt":"\xbc"}', b"[1]"]
)
paths = st.sampled_from(["/v1/completions", "/v1/chat/completions"])
bodies_sent = (completions | chats).map(lambda case: (case[0], _encoded(case[1])))
# Four bodies in five are JSON objects, the others bytes of any kind.
requests = st.one_of(*[bodies_sent] * 4, st.tuples(paths, noise))
# Header values as bytes (aiohttp reads those that are no UTF-8 as lone surrogates); no
# control characters, which aiohttp's parser itself refuses before the door sees the request.
printable = st.binary(max_size=16).map(lambda raw: bytes(b for b in raw if b >= 32 and b != 127))
GOOD_HEADERS: dict[str, st.SearchStrategy[bytes]] = {
    "X-Request-Id": st.just(b"req-1"),
    "X-Hetero-Disaggregation": st.sampled_from([b"auto", b"split", b"colocated"]),
    "X-Hetero-SLO-TTFT-Ms": st.sampled_from([b"100", b"5000"]),
    "X-Hetero-SLO-TPOT-Ms": st.sampled_from([b"20", b"+50"]),
    "X-Hetero-Priority": st.sampled_from([b"0", b"9"]),
    "X-Hetero-SLO-Class": st.sampled_from([b"default", b"interactive"]),
    "Content-Type": st.sampled_from([b"application/json", b"application/json; charset=utf-8"]),
}
headers = st.fixed_dictionaries(
    {},
    optional={
        name: st.one_of(
            good, good, printable, st.sampled_from([b"9" * 30, b"-5", b"x; charset=hc"])
        )
        for name, good in GOOD_HEADERS.items()
    },
)


async def exchange(port: int, path: str, head: dict[str, bytes], body: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" % path.encode()
        request += b"".join(b"%s: %s\r\n" % (name.encode(), value) for name, value in head.items())
        writer.write(request + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        reply = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # the door is stateless
)
@given(request=requests, head=headers)
async def test_every_answer_is_a_success_or_an_openai_client_error(
    door: Door, request: tuple[str, bytes], head: dict[str, bytes]
) -> None:
    path, body = request
    calls_before = len(door.dispatcher.calls)
    with structlog.testing.capture_logs() as logs:
        status, reply = await exchange(door.port, path, head, body)
    assert [event for event in logs if event["log_level"] == "error"] == []
    assert 200 <= status < 500, (status, reply[:200])  # no 5xx, whatever was sent
    if status >= 300:  # a refusal
        error = json.loads(reply)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str)
        assert error["code"] is not None
        assert len(door.dispatcher.calls) == calls_before  # nothing refused was dispatched
    else:
        assert len(door.dispatcher.calls) == calls_before + 1
