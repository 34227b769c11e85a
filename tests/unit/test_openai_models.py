"""Reading OpenAI request bodies: strict types, ignored extras, errors that name the parameter."""

from __future__ import annotations

from typing import Any

import pytest

from router.api.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
    parse_body,
    read_json,
)
from router.errors import InvalidRequestError

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def refusal(kind: type[OpenAIRequest], body: dict[str, Any]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as raised:
        parse_body(kind, body)
    return raised.value


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({}, "prompt", "'prompt' must be a string"),
        ({"prompt": ["a", "b"]}, "prompt", "'prompt' must be a string"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "'max_tokens' must be int"),
        ({"prompt": "x", "max_tokens": 5.0}, "max_tokens", "'max_tokens' must be int"),
        ({"prompt": "x", "max_tokens": -5}, "max_tokens", "'max_tokens' must be at least 1"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "'max_tokens' must be at least 1"),
        ({"prompt": "x", "max_tokens": 2**32}, "max_tokens", "too large: it must be below 2**32"),
        ({"prompt": "x", "max_tokens": 2**63}, "max_tokens", "'max_tokens' is too large"),
        ({"prompt": "x", "n": True}, "n", "'n' must be int"),
        ({"prompt": "\ud800"}, "prompt", "'prompt' holds a lone surrogate (character 0)"),
        ({"prompt": "x", "model": "a\udfff"}, "model", "'model' holds a lone surrogate"),
        ({"prompt": "x", "stop": "\ud800"}, "stop", "'stop' holds a lone surrogate"),
        ({"prompt": "x", "stop": ["a", "\ud800"]}, "stop", "'stop' holds a lone surrogate"),
        ({"prompt": "x", "disaggregation": "\ud800"}, "disaggregation", "lone surrogate"),
        ({"prompt": "x", "disaggregation": [0.0]}, "disaggregation", "must be a string"),
        ({"prompt": "x", "disaggregation": {"a": 1}}, "disaggregation", "must be a string"),
        ({"prompt": "x", "disaggregation": {}}, "disaggregation", "must be a string"),
        ({"prompt": "x", "temperature": True}, "temperature", "'temperature' must be a number"),
        ({"prompt": "x", "top_p": "0.9"}, "top_p", "'top_p' must be a number"),
        ({"prompt": "x", "seed": 2**64}, "seed", "'seed' must be between 0 and 2**64 - 1"),
        ({"prompt": "x", "stop": ["a", 5]}, "stop", "'stop' must be a string or a list of"),
        ({"prompt": "x", "n": 2}, "n", "only n=1 is supported"),
        ({"prompt": "x", "stream": "yes"}, "stream", "'stream' must be bool"),
        ({"prompt": "x", "model": 7}, "model", "'model' must be a string"),
        (
            {"prompt": "x", "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
            "must be bool",
        ),
    ],
)
def test_a_completion_problem_names_its_parameter(
    body: dict[str, Any], param: str, message: str
) -> None:
    error = refusal(CompletionRequest, body)
    assert error.param == param
    assert message in error.message


@pytest.mark.parametrize(
    ("messages", "param", "message"),
    [
        ([], "messages", "'messages' must be a non-empty list"),
        (["hi"], "messages[0]", "'messages[0]' must be an object"),
        (
            [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}],
            "messages[1].role",
            "must be one of system, user, assistant",
        ),
        ([{"role": "user"}], "messages[0].content", "must be a string or a list of text parts"),
        (
            [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            "messages[0].content",
            "must be a string or a list of text parts",
        ),
        ([{"role": "user", "content": "\ud800"}], "messages[0].content", "lone surrogate"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "ok\udc00"}]}],
            "messages[0].content",
            "holds a lone surrogate (character 2)",
        ),
        ([{"role": "\ud800", "content": "x"}], "messages[0].role", "must be one of"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content",
            "must be a string or a list of text parts",
        ),
    ],
)
def test_a_chat_problem_names_the_message_and_field(
    messages: list[Any], param: str, message: str
) -> None:
    error = refusal(ChatCompletionRequest, {"messages": messages})
    assert error.param == param
    assert message in error.message


def test_fields_the_router_does_not_use_are_ignored() -> None:
    body = {"prompt": "x", "user": "u-1", "metadata": {"a": "b"}, "name\ud800": "\ud800"}
    assert parse_body(CompletionRequest, body).prompt == "x"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("parallel_tool_calls", True),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("response_format", {"type": "json_object"}),
        ("logprobs", True),
        ("logprobs", 0),  # completions: the sampled tokens' logprobs
        ("top_logprobs", 2),
        ("echo", True),
        ("suffix", "end"),
        ("best_of", 2),
        ("logit_bias", {"50256": -100}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
        ("presence_penalty", False),
    ],
)
def test_a_field_the_door_does_not_implement_is_refused_unless_it_asks_for_nothing(
    field: str, value: Any
) -> None:
    for kind, body in ((CompletionRequest, {"prompt": "x"}), (ChatCompletionRequest, CHAT)):
        error = refusal(kind, {**body, field: value})
        assert (error.param, error.code) == (field, "unsupported_parameter")
        assert f"'{field}' is not supported" in error.message


def test_the_defaults_of_unimplemented_fields_pass() -> None:
    defaults: dict[str, Any] = {"tools": [], "tool_choice": "none", "functions": None,
                "logprobs": False, "top_logprobs": 0, "echo": False, "suffix": "",
                "best_of": 1, "logit_bias": {}, "presence_penalty": 0,
                "frequency_penalty": 0.0, "n": None,
                "response_format": {"type": "text"}, "parallel_tool_calls": None}  # fmt: skip
    assert parse_body(CompletionRequest, {"prompt": "x", **defaults}).prompt == "x"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "missing_required_parameter"),
        ({"prompt": 5}, "invalid_type"),
        ({"prompt": "x", "max_tokens": 0}, "invalid_value"),
        ({"prompt": "x", "tools": [{}]}, "unsupported_parameter"),
    ],
)
def test_every_refusal_carries_an_openai_error_code(body: dict[str, Any], code: str) -> None:
    assert refusal(CompletionRequest, body).code == code


def test_a_body_that_is_no_object_is_refused() -> None:
    error = refusal(CompletionRequest, [1, 2])  # type: ignore[arg-type]  # what a client may send
    assert (error.param, error.code) == (None, "invalid_type")
    assert "JSON object" in error.message


def json_refusal(raw: bytes, charset: str | None = None) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as raised:
        read_json(raw, charset)
    assert raised.value.code == "invalid_json"
    return raised.value


@pytest.mark.parametrize(
    ("raw", "charset", "message"),
    [
        (b'{"prompt": "\xbc"}', None, "not valid UTF-8 (byte 12)"),
        (b'{"prompt": "x"}', "hc", "must be JSON in UTF-8, not charset 'hc'"),
        (b'{"prompt": "x"}', "latin-1", "not charset 'latin-1'"),
        (b"[" * 100_000 + b"]" * 100_000, None, "nests too deeply"),
        (b'{"temperature": NaN}', None, "NaN is not a JSON number"),
        (b'{"top_p": -Infinity}', None, "-Infinity is not a JSON number"),
        (b"{oops", None, "not valid JSON"),
        (b"", None, "not valid JSON"),
    ],
)
def test_a_body_that_is_no_utf8_json_is_refused(
    raw: bytes, charset: str | None, message: str
) -> None:
    assert message in json_refusal(raw, charset).message


def test_the_charset_refused_is_cut_when_echoed() -> None:
    assert len(json_refusal(b"{}", "x" * 10_000).message) < 200


@pytest.mark.parametrize("charset", [None, "utf-8", "UTF-8", "utf8"])
def test_utf8_json_is_read(charset: str | None) -> None:
    assert read_json('{"prompt": "é"}'.encode(), charset) == {"prompt": "é"}


def test_integers_of_any_length_are_read_as_too_large_not_refused_by_the_parser() -> None:
    body = read_json(b'{"a": ' + b"9" * 5000 + b', "b": -' + b"9" * 5000 + b', "c": 12}')
    assert body == {"a": 10**24, "b": -(10**24), "c": 12}
    assert isinstance(body, dict)
    error = refusal(CompletionRequest, {"prompt": "x", "max_tokens": body["a"]})
    assert error.message == "'max_tokens' is too large: it must be below 2**32"


def test_a_number_too_large_for_a_float_is_refused_by_range_not_type() -> None:
    body = read_json(b'{"prompt": "x", "top_p": 1' + b"0" * 400 + b"}")
    assert isinstance(body, dict)
    error = refusal(CompletionRequest, body)
    # The stand-in 10**24 is not quoted: the client sent another number.
    assert (error.param, error.message) == ("top_p", "'top_p' must be in (0, 1]")
    error = refusal(CompletionRequest, {"prompt": "x", "temperature": 1e39})
    assert error.message == "'temperature' must be >= 0 (0 is greedy)"
    error = refusal(CompletionRequest, {"prompt": "x", "top_p": 1.5})
    assert error.message == "'top_p' must be in (0, 1], got 1.5"
    assert parse_body(CompletionRequest, {"prompt": "x", "top_p": 1}).top_p == 1


def test_a_list_of_one_prompt_is_that_prompt() -> None:
    assert parse_body(CompletionRequest, {"prompt": ["only"]}).prompt == "only"


def test_sampling_leaves_unsent_fields_to_the_defaults() -> None:
    sampling = parse_body(CompletionRequest, {"prompt": "x", "temperature": 0}).sampling()
    assert sampling.HasField("temperature")
    assert sampling.temperature == 0.0
    assert not sampling.HasField("max_tokens")
    assert not sampling.HasField("seed")
    assert list(sampling.stop) == []


def test_a_single_stop_string_is_a_list_of_one() -> None:
    sampling = parse_body(CompletionRequest, {"prompt": "x", "stop": "\n"}).sampling()
    assert list(sampling.stop) == ["\n"]


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    body = {**CHAT, "max_tokens": 3, "max_completion_tokens": 7}
    assert parse_body(ChatCompletionRequest, body).sampling().max_tokens == 7
    assert parse_body(ChatCompletionRequest, {**CHAT, "max_tokens": 3}).sampling().max_tokens == 3


def test_text_parts_are_joined_and_extra_message_fields_ignored() -> None:
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    body = {"messages": [{"role": "system", "content": parts, "name": "setup"}]}
    [message] = parse_body(ChatCompletionRequest, body).chat_messages()
    assert (message.role, message.content) == ("system", "Hello")


def test_usage_is_included_only_when_asked() -> None:
    asked = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    assert parse_body(ChatCompletionRequest, asked).include_usage
    assert not parse_body(ChatCompletionRequest, CHAT).include_usage
