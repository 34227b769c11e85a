from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import GenerationRequest
from router.api.validation import (
    GRPC_FIELD_NAMES,
    parse_request,
    validate_generate,
    validate_service,
)
from router.errors import InvalidRequestError
from router.scheduling.plan import Disaggregation
from router.settings import Settings
from tests.grpc_messages import generate_requests, request_bytes

SETTINGS = Settings(max_tokens_limit=100, default_max_tokens=10, max_prompt_tokens=50)
MODELS = ["llama-3.1-8b"]


def request(**fields: object) -> router_pb2.GenerateRequest:
    sampling: dict[str, Any] = fields.pop("sampling", {})  # type: ignore[assignment]  # a dict
    fields.setdefault("prompt", "hi")
    message = router_pb2.GenerateRequest(**fields)  # type: ignore[arg-type]  # any field
    for key, value in sampling.items():
        if key == "stop":
            message.sampling.stop.extend(value)
        else:
            setattr(message.sampling, key, value)
    return message


def validate(message: router_pb2.GenerateRequest) -> tuple[GenerationRequest, Disaggregation]:
    return validate_generate(message, SETTINGS, MODELS, "llama-3.1-8b")


def test_defaults_are_filled_in() -> None:
    validated, mode = validate(request())
    assert mode is Disaggregation.AUTO
    assert validated.model == "llama-3.1-8b"
    assert validated.request_id
    assert validated.sampling.max_tokens == 10
    assert validated.sampling.temperature == 1.0
    assert validated.sampling.top_p == 1.0
    assert 0 <= validated.sampling.seed < 2**63
    assert validated.prompt_tokens == 2


def test_router_picks_different_seeds_when_none_given() -> None:
    seeds = {validate(request())[0].sampling.seed for _ in range(5)}
    assert len(seeds) > 1


def test_explicit_values_are_kept() -> None:
    validated, mode = validate(
        request(
            request_id="abc",
            disaggregation=router_pb2.DISAGGREGATION_SPLIT,
            sampling={"max_tokens": 100, "temperature": 0.0, "seed": 2**64 - 1, "stop": ["x"]},
        )
    )
    assert (validated.client_request_id, mode) == ("abc", Disaggregation.SPLIT)
    assert validated.request_id != "abc"  # backends see the router's own id
    assert validated.sampling.max_tokens == 100
    assert validated.sampling.temperature == 0.0
    assert validated.sampling.seed == 2**64 - 1
    assert validated.sampling.stop == ("x",)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (request(prompt=""), "prompt must not be empty"),
        (request(prompt="z" * 51), "limit is 50"),
        (request(model="other"), "unknown model 'other'; served: llama-3.1-8b"),
        (request(sampling={"max_tokens": 0}), "between 1 and 100, got 0"),
        (request(sampling={"max_tokens": 101}), "between 1 and 100, got 101"),
        (request(sampling={"temperature": -1.0}), "temperature must be >= 0"),
        (request(sampling={"temperature": math.nan}), "temperature must be >= 0"),
        (request(sampling={"top_p": 1.5}), "top_p must be in (0, 1]"),
        (request(sampling={"stop": ["a"] * 9}), "at most 8 stop strings"),
        (request(disaggregation=7), "unknown disaggregation value 7"),
    ],
)
def test_bad_input_is_refused_with_a_reason(
    message: router_pb2.GenerateRequest, reason: str
) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        validate(message)
    assert reason in raised.value.message


@pytest.mark.parametrize(
    ("message", "grpc_param", "param"),
    [
        (request(prompt=""), "prompt", "prompt"),
        (request(request_id="\n"), "request_id", "request_id"),
        (request(model="other"), "model", "model"),
        (request(sampling={"max_tokens": 0}), "sampling.max_tokens", "max_tokens"),
        (request(sampling={"temperature": -1.0}), "sampling.temperature", "temperature"),
        (request(sampling={"top_p": 0.0}), "sampling.top_p", "top_p"),
        (request(sampling={"stop": ["a"] * 9}), "sampling.stop", "stop"),
        (request(sampling={"stop": ["a", "b", ""]}), "sampling.stop[2]", "stop[2]"),
        (request(disaggregation=7), "disaggregation", "disaggregation"),
    ],
)
def test_a_refusal_names_the_field_as_each_door_calls_it(
    message: router_pb2.GenerateRequest, grpc_param: str, param: str
) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        validate_generate(message, SETTINGS, MODELS, "llama-3.1-8b", GRPC_FIELD_NAMES)
    assert raised.value.param == grpc_param
    with pytest.raises(InvalidRequestError) as raised:
        validate(message)
    assert raised.value.param == param


@pytest.mark.parametrize(
    ("service", "param"),
    [
        ({"slo": router_pb2.Slo(ttft_ms=0)}, "slo.ttft_ms"),
        ({"slo": router_pb2.Slo(tpot_ms=3_600_001)}, "slo.tpot_ms"),
        ({"priority": 10}, "priority"),
        ({"slo_class": "x" * 10_000}, "slo_class"),
    ],
)
def test_a_service_level_refusal_names_its_field(service: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        validate_service(request(**service), {"default"})
    assert raised.value.param == param
    assert len(raised.value.message) < 200


def test_parse_request_reads_a_valid_message_and_refuses_bytes_that_are_not() -> None:
    sent = request(request_id="r", sampling={"max_tokens": 2**32 - 1, "seed": 2**64 - 1})
    assert parse_request(router_pb2.GenerateRequest, sent.SerializeToString()) == sent
    with pytest.raises(InvalidRequestError) as raised:
        parse_request(router_pb2.GenerateRequest, b"\x0a\x05abc")
    assert raised.value.message == (
        "the request is not a valid hetero.router.v1.GenerateRequest: Wire format was corrupt"
    )
    assert raised.value.param is None


@pytest.mark.parametrize(
    ("data", "path", "value"),
    [
        (b"\x22\x06\x08\x84\x80\x80\x80\x10", "sampling.max_tokens", 2**32 + 4),
        (b"\x28\x81\x80\x80\x80\x10", "disaggregation", 2**32 + 1),
        # An int32 of 2**31 is neither a positive int32 nor a sign-extended negative one.
        (b"\x28\x80\x80\x80\x80\x08", "disaggregation", 2**31),
        # Unknown fields (an unknown group among them) are stepped over, not checked.
        (
            b"\x4b\x08\x01\x4c\xa0\x06\x80\x80\x80\x80\x10\x38\x80\x80\x80\x80\x10",
            "priority",
            2**32,
        ),
    ],
)
def test_parse_request_refuses_a_number_too_wide_for_its_field(
    data: bytes, path: str, value: int
) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse_request(router_pb2.GenerateRequest, data)
    assert raised.value.param == path
    assert raised.value.message.startswith(f"{path} is {value}, ")


# -- properties -------------------------------------------------------------------------

# The door's own properties (tests/integration/test_grpc_hostile.py) run 200 each.
PROPERTY = settings(max_examples=100, deadline=None, derandomize=True)


def refusal(check: Callable[[], object]) -> InvalidRequestError | None:
    """What ``check`` raised, if an InvalidRequestError; anything else fails the test."""
    try:
        check()
    except InvalidRequestError as error:
        return error
    return None


@PROPERTY
@given(message=generate_requests(MODELS))
def test_validation_of_any_message_accepts_it_or_raises_invalid_request(
    message: router_pb2.GenerateRequest,
) -> None:
    def check() -> None:
        validated, _ = validate_generate(message, SETTINGS, MODELS, "llama-3.1-8b")
        validate_service(message, {"default"})
        assert 1 <= validated.sampling.max_tokens <= SETTINGS.max_tokens_limit

    error = refusal(check)
    if error is not None:
        assert error.message
        assert "\n" not in error.message
        assert len(error.message) < 300


@PROPERTY
@given(data=request_bytes(MODELS))
def test_parsing_any_bytes_gives_a_message_or_invalid_request(data: bytes) -> None:
    error = refusal(lambda: parse_request(router_pb2.GenerateRequest, data))
    if error is not None:
        assert error.message.startswith("the request is not a valid ") or error.param
        assert "\n" not in error.message
