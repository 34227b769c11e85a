"""Reading OpenAI request bodies: strict types, ignored extras, errors that name the parameter."""

from __future__ import annotations

from typing import Any

import pytest

from router.api.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
    parse_body,
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
        ({"prompt": "x", "max_tokens": -5}, "max_tokens", "must be at least 1, got -5"),
        ({"prompt": "x", "max_tokens": 2**32}, "max_tokens", "must be below 2**32"),
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
    body = {"prompt": "x", "logprobs": 2, "user": "u-1", "presence_penalty": 0.5, "echo": False}
    assert parse_body(CompletionRequest, body).prompt == "x"


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
