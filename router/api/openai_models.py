"""The request bodies of OpenAI's /v1/completions and /v1/chat/completions, as the door reads them.

Types are strict: a JSON ``"5"`` is no token count and ``true`` no temperature. Fields the
router does not use are ignored, as OpenAI-compatible servers do: the SDK and other clients
send many optional ones. Limits that depend on the settings (token counts, prompt length,
models served) are checked after this, with the gRPC door's (:mod:`router.api.validation`).
:func:`parse_body` turns any problem into an InvalidRequestError naming the parameter; a
field's description says what it must be, and the message quotes it.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import ChatMessage
from router.api import chat_template
from router.errors import InvalidRequestError

_Body = TypeVar("_Body", bound="OpenAIRequest")


def _fits_the_wire(value: int) -> int:
    # SamplingParams.max_tokens is 32 bits; the configured limit is checked later.
    if value < 0:
        raise ValueError(f"must be at least 1, got {value}")
    if value >= 2**32:
        raise ValueError(f"must be below 2**32, got {value}")
    return value


def _is_seed(value: int) -> int:
    if not 0 <= value < 2**64:
        raise ValueError("must be between 0 and 2**64 - 1")
    return value


def _only_one(value: int) -> int:
    # The door streams and answers one choice.
    if value != 1:
        raise ValueError("must be 1: only n=1 is supported")
    return value


def _in_roles(value: str) -> str:
    # Reported with the field's description, which lists the roles.
    if value not in chat_template.ROLES:
        raise ValueError(f"unknown role {value!r}")
    return value


def _single_prompt(value: object) -> object:
    """A list holding one prompt is that prompt (clients send prompts as lists)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


TokenCount = Annotated[int, AfterValidator(_fits_the_wire)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str = ""


class Message(_Strict):
    role: Annotated[
        str,
        AfterValidator(_in_roles),
        Field(description=f"one of {', '.join(chat_template.ROLES)}"),
    ]
    content: Annotated[str | list[TextPart], Field(description="a string or a list of text parts")]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class OpenAIRequest(_Strict):
    """What both endpoints read; ``disaggregation`` is the router's own field."""

    model: str | None = None
    max_tokens: TokenCount | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Annotated[int, AfterValidator(_is_seed)] | None = None
    stop: str | list[str] | None = Field(default=None, description="a string or a list of strings")
    n: Annotated[int, AfterValidator(_only_one)] = 1
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    disaggregation: str | None = None

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
    prompt: Annotated[str, BeforeValidator(_single_prompt), Field(description="a string")]


class ChatCompletionRequest(OpenAIRequest):
    messages: Annotated[list[Message], Field(min_length=1, description="a non-empty list")]
    # The newer name of max_tokens; it wins when both are sent.
    max_completion_tokens: TokenCount | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        return tuple(ChatMessage(message.role, message.text) for message in self.messages)


def parse_body(kind: type[_Body], body: object) -> _Body:
    """The body as ``kind``; InvalidRequestError names the first parameter at fault."""
    try:
        return kind.model_validate(body)
    except ValidationError as error:
        param, message = _problem(kind, error.errors()[0])
        raise InvalidRequestError(message, param=param) from None


# What a parameter of this type must be, for fields that do not say it themselves.
_EXPECTED = {
    "int_type": "int",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "bool",
    "model_type": "an object",
    "list_type": "a list",
}


def _problem(kind: type[BaseModel], issue: ErrorDetails) -> tuple[str, str]:
    """The parameter at fault, as a client writes it (``messages[0].role``), and the message."""
    param, field = _locate(kind, issue["loc"])
    expected = field.description if field is not None else None
    if expected is None and issue["type"] == "value_error":
        return param, f"'{param}' {issue.get('ctx', {}).get('error', issue['msg'])}"
    expected = expected or _EXPECTED.get(issue["type"])
    if expected is None:
        return param, f"'{param}': {issue['msg']}"
    return param, f"'{param}' must be {expected}"


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
