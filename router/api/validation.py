"""Bad input stops here, with a message a person can act on; nothing reaches a backend."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Collection, Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import GenerationRequest, SamplingParams
from router.api import wire
from router.api.trace_context import NO_TRACE, TraceContext
from router.errors import InvalidRequestError, ModelNotFoundError, shown
from router.scheduling.plan import Disaggregation
from router.scheduling.service_level import (
    DEFAULT_SLO_CLASS,
    MAX_PRIORITY,
    MAX_TARGET_MS,
    ServiceLevel,
)
from router.settings import Settings

_MAX_REQUEST_ID = 128
_MAX_STOP_CHARS = 256
_DISAGGREGATION = {
    router_pb2.DISAGGREGATION_AUTO: Disaggregation.AUTO,
    router_pb2.DISAGGREGATION_SPLIT: Disaggregation.SPLIT,
    router_pb2.DISAGGREGATION_COLOCATED: Disaggregation.COLOCATED,
}
# How errors name the service-level fields (the HTTP door names its headers instead).
SERVICE_FIELD_NAMES: Mapping[str, str] = {
    "ttft_ms": "slo.ttft_ms",
    "tpot_ms": "slo.tpot_ms",
    "priority": "priority",
    "slo_class": "slo_class",
}
# How errors (their message and ``param``) name the request's fields: by their own name,
# as the HTTP door's body has them, or by their path in the gRPC message.
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "stop")
FIELD_NAMES: Mapping[str, str] = {
    name: name for name in ("request_id", "model", "prompt", "disaggregation", *_SAMPLING_FIELDS)
}
GRPC_FIELD_NAMES: Mapping[str, str] = {
    **FIELD_NAMES,
    **{name: f"sampling.{name}" for name in _SAMPLING_FIELDS},
}
_Parsed = TypeVar("_Parsed", bound=Message)


def parse_request(kind: type[_Parsed], data: bytes) -> _Parsed:
    """The message a client sent, from its bytes: InvalidRequestError when they are not one
    (corrupt wire format, a string that is not UTF-8) or carry a number too wide for its
    field (``max_tokens`` as 2**32 + 4, which a parser would read as 4)."""
    try:
        message = kind.FromString(data)
    except DecodeError as error:
        # The parser says "Error parsing message with type '...': <why>"; keep the why.
        reason = str(error).rpartition("': ")[2] or "it does not parse"
        raise InvalidRequestError(
            f"the request is not a valid {kind.DESCRIPTOR.full_name}: {reason}"
        ) from None
    too_wide = wire.overflow(data, kind)
    if too_wide is not None:
        raise InvalidRequestError(
            f"{too_wide.path} is {too_wide.value}, which does not fit its "
            f"{too_wide.bits}-bit field",
            param=too_wide.path,
        )
    return message


def estimate_prompt_tokens(prompt: str, settings: Settings) -> int:
    return math.ceil(len(prompt.encode()) / settings.bytes_per_token)


def validate_generate(
    message: router_pb2.GenerateRequest,
    settings: Settings,
    models: list[str],
    default_model: str,
    names: Mapping[str, str] = FIELD_NAMES,
    *,
    trace: TraceContext = NO_TRACE,
) -> tuple[GenerationRequest, Disaggregation]:
    """The request to serve and how to split it; ``names`` are what errors call the fields,
    ``trace`` the client's trace context (already checked, ``router.api.trace_context``)."""
    client_request_id = message.request_id
    if len(client_request_id) > _MAX_REQUEST_ID or not client_request_id.isprintable():
        raise InvalidRequestError(
            f"{names['request_id']} must be at most {_MAX_REQUEST_ID} printable characters",
            param=names["request_id"],
        )
    # Backends see only an id of the router's: a client's id may be anyone's.
    request_id = uuid.uuid4().hex
    model = message.model or default_model
    if model not in models:
        raise ModelNotFoundError(f"unknown model {shown(model)}; served: {', '.join(models)}")
    if not message.prompt:
        raise InvalidRequestError(f"{names['prompt']} must not be empty", param=names["prompt"])
    prompt_tokens = estimate_prompt_tokens(message.prompt, settings)
    if prompt_tokens > settings.max_prompt_tokens:
        raise InvalidRequestError(
            f"{names['prompt']} is about {prompt_tokens} tokens; "
            f"the limit is {settings.max_prompt_tokens}",
            param=names["prompt"],
        )
    if message.disaggregation not in _DISAGGREGATION:
        raise InvalidRequestError(
            f"unknown {names['disaggregation']} value {message.disaggregation}",
            param=names["disaggregation"],
        )
    request = GenerationRequest(
        request_id=request_id,
        client_request_id=client_request_id or request_id,
        model=model,
        prompt=message.prompt,
        sampling=_sampling(message.sampling, settings, names),
        prompt_tokens=prompt_tokens,
        traceparent=trace.traceparent,
        tracestate=trace.tracestate,
    )
    return request, _DISAGGREGATION[message.disaggregation]


def _sampling(
    params: router_pb2.SamplingParams, settings: Settings, names: Mapping[str, str]
) -> SamplingParams:
    max_tokens = params.max_tokens if params.HasField("max_tokens") else settings.default_max_tokens
    if not 1 <= max_tokens <= settings.max_tokens_limit:
        raise InvalidRequestError(
            f"{names['max_tokens']} must be between 1 and {settings.max_tokens_limit}, "
            f"got {max_tokens}",
            param=names["max_tokens"],
        )
    temperature = params.temperature if params.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidRequestError(
            f"{names['temperature']} must be >= 0 (0 is greedy), got {temperature}",
            param=names["temperature"],
        )
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidRequestError(
            f"{names['top_p']} must be in (0, 1], got {top_p}", param=names["top_p"]
        )
    if len(params.stop) > settings.max_stop_strings:
        raise InvalidRequestError(
            f"at most {settings.max_stop_strings} stop strings, got {len(params.stop)}",
            param=names["stop"],
        )
    for index, stop in enumerate(params.stop):
        if not stop or len(stop) > _MAX_STOP_CHARS:
            raise InvalidRequestError(
                f"each stop string must have 1 to {_MAX_STOP_CHARS} characters; "
                f"{names['stop']}[{index}] has {len(stop)}",
                param=f"{names['stop']}[{index}]",
            )
    # A seed the router picks is passed to every backend of the request, so a
    # split request samples exactly as a colocated one would. It is no secret: the
    # process's Mersenne Twister (seeded from the system at start, in each worker of its
    # own) draws it, not the system's entropy (a system call a request).
    seed = params.seed if params.HasField("seed") else random.getrandbits(63)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=tuple(params.stop),
    )


def validate_service(
    message: router_pb2.GenerateRequest, slo_classes: Collection[str]
) -> ServiceLevel:
    """The request's SLO, priority and SLO class; ``slo_classes`` are those the scheduler knows."""
    slo = message.slo
    return service_level(
        ttft_ms=slo.ttft_ms if slo.HasField("ttft_ms") else None,
        tpot_ms=slo.tpot_ms if slo.HasField("tpot_ms") else None,
        priority=message.priority,
        slo_class=message.slo_class,
        slo_classes=slo_classes,
    )


def service_level(
    *,
    ttft_ms: int | None,
    tpot_ms: int | None,
    priority: int,
    slo_class: str,
    slo_classes: Collection[str],
    names: Mapping[str, str] = SERVICE_FIELD_NAMES,
) -> ServiceLevel:
    """Checks service-level values however they arrived; ``names`` are what errors call them."""
    for key, value in (("ttft_ms", ttft_ms), ("tpot_ms", tpot_ms)):
        if value is not None and not 1 <= value <= MAX_TARGET_MS:
            raise InvalidRequestError(
                f"{names[key]} must be between 1 and {MAX_TARGET_MS} milliseconds (one hour), "
                f"got {value}; leave it unset for the SLO class's default",
                param=names[key],
            )
    if not 0 <= priority <= MAX_PRIORITY:
        raise InvalidRequestError(
            f"{names['priority']} must be between 0 and {MAX_PRIORITY} (larger is more urgent), "
            f"got {priority}",
            param=names["priority"],
        )
    slo_class = slo_class or DEFAULT_SLO_CLASS
    if slo_class not in slo_classes:
        raise InvalidRequestError(
            f"unknown {names['slo_class']} {shown(slo_class)}; "
            f"known: {', '.join(sorted(slo_classes))}",
            param=names["slo_class"],
        )
    return ServiceLevel(ttft_ms=ttft_ms, tpot_ms=tpot_ms, priority=priority, slo_class=slo_class)
