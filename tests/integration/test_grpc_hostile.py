"""The gRPC door against hostile input: raw bytes that are no request, numbers too wide
for their field, deadlines already gone and huge values to echo. Each is refused with a
status and one line that says why, never UNKNOWN or INTERNAL, never with a traceback in
the log, and no backend hears of it.

"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import structlog
from hypothesis import HealthCheck, given, settings

from backends._gen.hetero.router.v1 import router_pb2
from router.api import grpc_server
from router.client import GENERATE_METHOD, ROUTER_SERVICE, build_request
from router.daemon import Daemon
from router.errors import InvalidRequestError
from tests.grpc_messages import generate_requests, request_bytes
from tests.recording import MODEL, Recorder, outcomes, recording_router

REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.fixture
async def router(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Daemon]:
    async with recording_router(monkeypatch) as daemon:
        yield daemon


@pytest.fixture
async def channel(router: Daemon) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.grpc_port}") as opened:
        yield opened


async def call(
    channel: grpc.aio.Channel, data: bytes, timeout_s: float | None = 10.0
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Sends ``data`` as the request, byte for byte: the status, its message and the
    frames received."""
    generate = channel.unary_stream(GENERATE_METHOD, request_serializer=None)
    frames: list[bytes] = []
    try:
        async for frame in generate(data, timeout=timeout_s):
            frames.append(frame)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or "", frames
    return grpc.StatusCode.OK, "", frames


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, value: int) -> bytes:
    """A varint field, however wide the value."""
    return varint(number << 3) + varint(value)


def nested(number: int, data: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(data)) + data


PROMPT = nested(3, b"hi")


def rejected(daemon: Daemon, outcome: str) -> float:
    return outcomes(daemon).get(outcome, 0.0)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (nested(3, b"\xff\xfe"), "String field had bad UTF-8"),
        (PROMPT + nested(2, b"\xc3"), "String field had bad UTF-8"),  # model, cut mid-character
        (PROMPT + nested(4, nested(5, b"\xed\xa0\x80")), "String field had bad UTF-8"),  # stop
        (PROMPT + b"\x38\xff", "Wire format was corrupt"),  # a varint cut short
        (PROMPT + b"\x38" + b"\xff" * 11, "Wire format was corrupt"),  # a varint of 11 bytes
        (nested(3, b"hi")[:-1], "Wire format was corrupt"),  # shorter than its length
        (PROMPT + b"\x3f", "Wire format was corrupt"),  # wire type 7
        (PROMPT + b"\x4c", "Wire format was corrupt"),  # the end of a group never begun
    ],
    ids=[
        "prompt-utf8",
        "model-utf8",
        "stop-surrogate",
        "truncated-varint",
        "long-varint",
        "truncated-string",
        "wire-type",
        "end-group",
    ],
)
async def test_bytes_that_are_no_request_are_invalid_argument_with_one_line(
    router: Daemon,
    channel: grpc.aio.Channel,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    reason: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        code, message, _ = await call(channel, data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message == f"the request is not a valid hetero.router.v1.GenerateRequest: {reason}"
    assert Recorder.served == []
    assert rejected(router, "invalid") == 1
    assert "Traceback" not in caplog.text
    assert not [record for record in caplog.records if record.exc_info]
    assert not [entry for entry in logs if "exc_info" in entry or "exception" in entry]


async def test_list_backends_with_bytes_that_are_no_request_is_invalid_argument(
    channel: grpc.aio.Channel,
) -> None:
    list_backends = channel.unary_unary(f"/{ROUTER_SERVICE}/ListBackends")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await list_backends(b"\x08\xff", timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid hetero.router.v1.ListBackendsRequest" in (raised.value.details() or "")


@pytest.mark.parametrize(
    ("data", "path", "bits"),
    [
        (PROMPT + nested(4, field(1, 2**32 + 4)), "sampling.max_tokens", 32),
        (PROMPT + nested(6, field(1, 2**32 + 100)), "slo.ttft_ms", 32),
        (PROMPT + nested(6, field(2, 2**40)), "slo.tpot_ms", 32),
        (PROMPT + field(7, 2**32 + 1), "priority", 32),
        (PROMPT + field(5, 2**32 + 1), "disaggregation", 32),  # an enum: int32 on the wire
        (PROMPT + nested(4, field(4, 2**64 + 5)), "sampling.seed", 64),  # 10 bytes of 70 bits
    ],
    ids=["max_tokens", "ttft_ms", "tpot_ms", "priority", "disaggregation", "seed"],
)
async def test_a_number_too_wide_for_its_field_is_refused_not_cut(
    router: Daemon, channel: grpc.aio.Channel, data: bytes, path: str, bits: int
) -> None:
    # A parser keeps the low bits: 2**32 + 4 would be served as max_tokens 4.
    code, message, _ = await call(channel, data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"{path} is ")
    assert message.endswith(f"which does not fit its {bits}-bit field")
    assert Recorder.served == []
    assert rejected(router, "invalid") == 1


async def test_the_widest_values_that_fit_are_taken(channel: grpc.aio.Channel) -> None:
    # Sign-extended negatives fit an int32 (the enum is then unknown); the seed takes 64 bits.
    code, message, _ = await call(channel, PROMPT + field(5, 2**64 - 1))
    assert (code, message) == (grpc.StatusCode.INVALID_ARGUMENT, "unknown disaggregation value -1")
    code, _, _ = await call(channel, PROMPT + nested(4, field(4, 2**64 - 1)))
    assert code == grpc.StatusCode.OK
    assert Recorder.served[0].sampling.seed == 2**64 - 1


@pytest.mark.parametrize("timeout_s", [1e-6, 1e-4, 5e-4], ids=["1us", "100us", "500us"])
async def test_a_deadline_already_gone_reaches_no_backend(
    router: Daemon, channel: grpc.aio.Channel, timeout_s: float
) -> None:
    # A call of 100 us reaches the router with its deadline (nearly) gone.
    code, _, frames = await call(channel, build_request("late").SerializeToString(), timeout_s)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert frames == []
    # Refused at the door, or never handed to the router by grpc: not admitted, not cancelled.
    assert set(outcomes(router)) <= {"deadline"}
    code, _, _ = await call(channel, build_request("in time").SerializeToString(), None)
    assert code == grpc.StatusCode.OK
    assert [request.prompt for request in Recorder.served] == ["in time"]


async def test_a_deadline_too_close_is_refused_by_the_router_before_admission(
    router: Daemon, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any deadline nearer than the minimum: here 10 s under a minimum of an hour, so the
    # router's refusal, not the client's own timer, ends the call.
    monkeypatch.setattr(grpc_server, "MIN_TIME_LEFT_S", 3600.0)
    code, message, _ = await call(channel, build_request("soon").SerializeToString(), 10.0)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "less than the 3.6e+06 ms a request needs to be scheduled" in message
    assert Recorder.served == []
    assert rejected(router, "deadline") == 1
    assert router.dispatcher.admission.in_flight == 0


HUGE = "x" * 20_000


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"model": HUGE}, "unknown model"),
        ({"slo_class": HUGE}, "unknown slo_class"),
        ({"request_id": HUGE}, "request_id must be at most 128"),
        ({"stop": ["a", HUGE]}, "sampling.stop[1] has 20000"),
        ({"prompt": HUGE * 60}, "limit is"),
    ],
    ids=["model", "slo_class", "request_id", "stop", "prompt"],
)
async def test_a_huge_value_is_refused_with_a_short_message(
    channel: grpc.aio.Channel, options: dict[str, Any], param: str
) -> None:
    # Echoed in full, a 20 KB value would overflow the status header: RESOURCE_EXHAUSTED.
    prompt = options.pop("prompt", "hi")
    code, message, _ = await call(channel, build_request(prompt, **options).SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert param in message
    assert len(message) < 300
    assert Recorder.served == []


async def test_an_overlong_error_message_is_cut(
    channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever an error says (an engine may quote the prompt), the status stays small.
    def refuse(*args: object, **kwargs: object) -> object:
        raise InvalidRequestError("y" * 50_000, param="prompt")

    monkeypatch.setattr(grpc_server, "validate_generate", refuse)
    code, message, _ = await call(channel, build_request("hi").SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message == "y" * 1024 + "..."


# -- properties -------------------------------------------------------------------------

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


async def assert_served_or_refused(
    channel: grpc.aio.Channel, data: bytes, timeout_s: float | None = 10.0
) -> None:
    before = len(Recorder.served)
    code, message, frames = await call(channel, data, timeout_s)
    if code == grpc.StatusCode.OK:
        assert len(Recorder.served) == before + 1
        assert frames
        return
    assert code in REFUSALS, (code, message)
    assert message
    assert "\n" not in message
    assert len(Recorder.served) == before


@PROPERTY
@given(data=request_bytes([MODEL]))
async def test_any_bytes_are_served_or_refused_with_a_message(
    channel: grpc.aio.Channel, data: bytes
) -> None:
    await assert_served_or_refused(channel, data)


@PROPERTY
@given(message=generate_requests([MODEL]))
async def test_any_well_formed_request_is_served_or_refused_with_a_message(
    channel: grpc.aio.Channel, message: router_pb2.GenerateRequest
) -> None:
    await assert_served_or_refused(channel, message.SerializeToString())
