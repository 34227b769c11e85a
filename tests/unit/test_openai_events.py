"""The HTTP door's stream events: the same JSON as the objects they stand for."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.api.openai_events import DONE_EVENT, StreamEvents, error_event

TEXTS = ["", "hello", ' "quoted" \\ back', "tab\tnew\nline\r\x00\x1f", "héllo wörld", "日本", "🙂"]


def _head(chat: bool) -> dict[str, Any]:
    return {
        "id": "chatcmpl-r1" if chat else "cmpl-r1",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 1700000000,
        "model": "org/model-7b",
    }


def _payload(event: bytes) -> Any:
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    assert b"\n" not in event[:-2]  # one data line: no newline inside the JSON
    return json.loads(event[6:-2])


def _events(chat: bool) -> StreamEvents:
    head = _head(chat)
    return StreamEvents(head["id"], head["model"], head["created"], chat=chat)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish", [None, "stop", "length"])
def test_completion_chunk_is_the_object_it_stands_for(text: str, finish: str | None) -> None:
    event = _events(chat=False).chunk(text, finish)
    expected = {
        **_head(False),
        "choices": [{"index": 0, "finish_reason": finish, "text": text, "logprobs": None}],
    }
    assert _payload(event) == expected
    assert list(_payload(event)) == list(expected)  # the keys in the same order
    if text.isascii():  # byte for byte what the standard library writes
        compact = json.dumps(expected, separators=(",", ":")).encode()
        assert event == b"data: " + compact + b"\n\n"


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("first", [True, False])
def test_chat_chunk_names_the_role_first_only(text: str, first: bool) -> None:
    event = _events(chat=True).chunk(text, "stop" if not first else None, first=first)
    delta: dict[str, str] = {"content": text}
    if first:
        delta["role"] = "assistant"
    choice = {"index": 0, "finish_reason": None if first else "stop", "delta": delta}
    assert _payload(event) == {**_head(True), "choices": [choice]}


@pytest.mark.parametrize("chat", [True, False])
def test_usage_chunk_has_no_choices_and_the_counts(chat: bool) -> None:
    event = _events(chat).usage(12, 5)
    assert _payload(event) == {
        **_head(chat),
        "choices": [],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }


def test_head_escapes_what_json_must() -> None:
    events = StreamEvents('cmpl-a"b\\c\ud800', "m\u00e9", 1, chat=False)
    assert _payload(events.chunk("x", None))["id"] == 'cmpl-a"b\\c\ud800'
    assert _payload(events.chunk("x", None))["model"] == "m\u00e9"


def test_error_and_done_events() -> None:
    body = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    assert _payload(error_event(body)) == body
    assert DONE_EVENT == b"data: [DONE]\n\n"
