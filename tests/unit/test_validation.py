from __future__ import annotations

import math
from typing import Any

import pytest

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import GenerationRequest
from router.api.validation import validate_generate
from router.errors import InvalidRequestError
from router.scheduling.plan import Disaggregation
from router.settings import Settings

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
