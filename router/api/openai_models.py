"""The request bodies of OpenAI's /v1/completions and /v1/chat/completions, as the door reads them.

:func:`read_json` turns the body's bytes into JSON: UTF-8 only, no ``NaN``, numbers of
any length read without Python's int-from-str limit, nesting too deep refused. Types
are strict: a JSON ``"5"`` is no token count and ``true`` no temperature; a string
holding a lone surrogate (JSON allows ``"\\ud800"``) is refused, since no backend could
be sent it. Fields the router does not use are ignored, as OpenAI-compatible servers
do: the SDK and other clients send many optional ones. Fields of OpenAI's API that ask
for what the door does not do (tools, logprobs, penalties, ...) are refused unless they
hold the value that asks for nothing. Limits that depend on the settings (token counts,
prompt length, models served) are checked after this, with the gRPC door's
(:mod:`router.api.validation`). Every problem is an InvalidRequestError naming the
parameter, with OpenAI's error code; a field's description says what it must be, and
the message quotes it.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, TypeVar, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import ChatMessage
from router.api import chat_template
from router.errors import InvalidRequestError, shown

_Body = TypeVar("_Body", bound="OpenAIRequest")


# JSON integers longer than this are read as +-10**_MAX_DIGITS: every bound of the door is
# far below it, so the verdict is the same, and int() refuses over 4,300 digits anyway.
_MAX_DIGITS = 24


def _bounded_int(text: str) -> int:
    negative = text.startswith("-")
    if len(text) - negative <= _MAX_DIGITS:
        return int(text)
    bound: int = 10**_MAX_DIGITS
    return -bound if negative else bound


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def read_json(raw: bytes, charset: str | None = None) -> object:
    """The JSON document in a request body; InvalidRequestError says why there is none."""
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise InvalidRequestError(
            f"the request body must be JSON in UTF-8, not charset {shown(charset)}",
            code="invalid_json",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequestError(
            f"the request body is not valid UTF-8 (byte {error.start})", code="invalid_json"
        ) from None
    try:
        return json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequestError(
            "the request body nests too deeply", code="invalid_json"
        ) from None
    except ValueError as error:  # json.JSONDecodeError is one, as is _no_constant's refusal
        raise InvalidRequestError(
            f"the request body is not valid JSON: {error}", code="invalid_json"
        ) from None


def _fits_the_wire(value: int) -> int:
    # SamplingParams.max_tokens is 32 bits; the configured limit is checked later.
    if value < 1:
        raise ValueError("must be at least 1")
    if value >= 2**32:
        raise ValueError("is too large: it must be below 2**32")
    return value


def _encodable(value: str) -> str:
    # Only a lone surrogate fails: the body was UTF-8, so it came from a \u escape.
    try:
        value.encode()
    except UnicodeEncodeError as error:
        raise ValueError(
            f"holds a lone surrogate (character {error.start}), which is no Unicode text"
        ) from None
    return value


def _is_seed(value: int) -> int:
    if not 0 <= value < 2**64:
        raise ValueError("must be between 0 and 2**64 - 1")
    return value


# The largest 32-bit float: SamplingParams carries temperature and top_p as floats.
_FLOAT32_MAX = 3.4028234663852886e38


def _said(value: float) -> str:
    """``value`` for a message, unless it is a bounded stand-in for a longer number."""
    return f", got {value}" if abs(value) < 1e15 else ""


def _temperature(value: float | None) -> float | None:
    if value is not None and not 0 <= value <= _FLOAT32_MAX:
        raise ValueError(f"must be >= 0 (0 is greedy){_said(value)}")
    return value


def _probability(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise ValueError(f"must be in (0, 1]{_said(value)}")
    return value


def _only_one(value: int | None) -> int | None:
    # The door streams and answers one choice.
    if value is not None and value != 1:
        raise ValueError("must be 1: only n=1 is supported")
    return value


def _in_roles(value: str) -> str:
    if value not in chat_template.ROLES:
        raise ValueError(f"must be one of {', '.join(chat_template.ROLES)}")
    return value


def _single_prompt(value: object) -> object:
    """A list holding one prompt is that prompt (clients send prompts as lists)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


TokenCount = Annotated[int, AfterValidator(_fits_the_wire)]
# Every string the door passes on: a lone surrogate could not be encoded to a backend.
Text = Annotated[str, AfterValidator(_encodable)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: Text = ""


class Message(_Strict):
    role: Annotated[str, AfterValidator(_in_roles)]
    content: Annotated[Text | list[TextPart], Field(description="a string or a list of text parts")]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class OpenAIRequest(_Strict):
    """What both endpoints read; ``disaggregation`` is the router's own field."""

    model: Text | None = None
    max_tokens: TokenCount | None = None
    temperature: Annotated[float | None, AfterValidator(_temperature)] = None
    top_p: Annotated[float | None, AfterValidator(_probability)] = None
    seed: Annotated[int, AfterValidator(_is_seed)] | None = None
    stop: Text | list[Text] | None = Field(
        default=None, description="a string or a list of strings"
    )
    n: Annotated[int | None, AfterValidator(_only_one)] = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    disaggregation: Text | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def token_limit(self) -> int | None:
        return self.max_tokens

    def sampling(self) -> router_pb2.SamplingParams:
        """The sampling parameters, unset where the body leaves them to the defaults."""
        sampling = router_pb2.SamplingParams(
            max_tokens=self.token_limit(),
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
        )
        sampling.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop or ())
        return sampling


class CompletionRequest(OpenAIRequest):
    prompt: Annotated[Text, BeforeValidator(_single_prompt), Field(description="a string")]


class ChatCompletionRequest(OpenAIRequest):
    messages: Annotated[list[Message], Field(min_length=1, description="a non-empty list")]
    # The newer name of max_tokens; it wins when both are sent.
    max_completion_tokens: TokenCount | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        return tuple(ChatMessage(message.role, message.text) for message in self.messages)


# Fields of OpenAI's API the door does not implement, with the values that ask for
# nothing (what a client sends that leaves them at their defaults); any other is refused.
# A default matches in type too: ``logprobs: 0`` asks completions for logprobs, ``false``
# does not.
_UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}


def parse_body(kind: type[_Body], body: object) -> _Body:
    """The body as ``kind``; InvalidRequestError names the first parameter at fault."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", code="invalid_type")
    for name, defaults in _UNSUPPORTED.items():
        value = body.get(name)
        if not any(type(value) is type(default) and value == default for default in defaults):
            raise InvalidRequestError(
                f"'{name}' is not supported by this server; leave it unset",
                param=name,
                code="unsupported_parameter",
            )
    try:
        return kind.model_validate(body)
    except ValidationError as error:
        issues = error.errors()
        # A value's own complaint says more than a union member's "must be a string".
        issue = next((i for i in issues if i["type"] == "value_error"), issues[0])
        param, message, code = _problem(kind, issue)
        raise InvalidRequestError(message, param=param, code=code) from None


# What a parameter of this type must be, for fields that do not say it themselves.
_EXPECTED = {
    "int_type": "int",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "bool",
    "model_type": "an object",
    "list_type": "a list",
}


def _problem(kind: type[BaseModel], issue: ErrorDetails) -> tuple[str, str, str]:
    """The parameter at fault, as a client writes it (``messages[0].role``), the message,
    and OpenAI's error code."""
    param, field = _locate(kind, issue["loc"])
    if issue["type"] == "value_error":
        reason = issue.get("ctx", {}).get("error", issue["msg"])
        return param, f"'{param}' {reason}", "invalid_value"
    code = "missing_required_parameter" if issue["type"] == "missing" else "invalid_type"
    expected = (field.description if field is not None else None) or _EXPECTED.get(issue["type"])
    if expected is None:
        return param, f"'{param}': {issue['msg']}", code
    return param, f"'{param}' must be {expected}", code


def _locate(kind: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[str, FieldInfo | None]:
    """Walks ``loc`` through the models: the path it names, and the field when it ends on one.

    The walk stops at a part that is no field, such as a union member's name: the problem
    is then the field's own (a ``stop`` that is neither a string nor a list of them).
    """
    path, field = "", None
    model: type[BaseModel] | None = kind
    for part in loc:
        if isinstance(part, int):
            path, field = f"{path}[{part}]", None
            continue
        info = model.model_fields.get(part) if model is not None else None
        if info is None:
            break
        path, field, model = f"{path}.{part}" if path else part, info, _model_in(info.annotation)
    return path, field


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The model a field holds (``list[Message]`` holds Message), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for arg in get_args(annotation) if (m := _model_in(arg)) is not None), None)
