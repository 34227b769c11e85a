"""The events of an OpenAI streaming answer, as the bytes the HTTP door writes.

Every chunk of one stream shares its head (``id``, ``object``, ``created``, ``model``),
so the head is encoded once per stream and each token's chunk is that head, the
choice's fixed fields and the token's text, the only part JSON-encoded per event
(orjson). The bytes are exactly the compact JSON the standard library would write for
the same object, with the same key order, except that text outside ASCII is written
as UTF-8 rather than as ``\\u`` escapes (both are the same JSON string).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# The end of a stream: what the openai SDK and every OpenAI client stop at.
DONE_EVENT = b"data: [DONE]\n\n"


class StreamEvents:
    """Encodes the chunks of one stream (``chat``: ``chat.completion.chunk`` with a
    ``delta``; else ``text_completion`` with ``text`` and ``logprobs``)."""

    __slots__ = ("_chat", "_head")

    def __init__(self, chunk_id: str, model: str, created: int, *, chat: bool) -> None:
        head = {
            "id": chunk_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
        }
        self._head = b"data: " + _compact(head)[:-1] + b',"choices":['
        self._chat = chat

    def chunk(self, text: str, finish_reason: str | None, *, first: bool = False) -> bytes:
        """The chunk of one choice-0 delta; the first chat chunk names the role."""
        finish = b"null" if finish_reason is None else orjson.dumps(finish_reason)
        content = orjson.dumps(text)
        if self._chat:
            role = b',"role":"assistant"' if first else b""
            choice = b'"delta":{"content":' + content + role + b"}}"
        else:
            choice = b'"text":' + content + b',"logprobs":null}'
        return self._head + b'{"index":0,"finish_reason":' + finish + b"," + choice + b"]}\n\n"

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The usage chunk (``stream_options.include_usage``): no choices, the counts."""
        counts = b'"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d' % (
            prompt_tokens,
            completion_tokens,
            prompt_tokens + completion_tokens,
        )
        return self._head + b'],"usage":{' + counts + b"}}\n\n"


def error_event(body: dict[str, Any]) -> bytes:
    """An error event in OpenAI's shape (``{"error": {...}}``), which ends a stream."""
    return b"data: " + _compact(body) + b"\n\n"


def _compact(value: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: a lone surrogate (a request id), escaped
        return json.dumps(value, separators=(",", ":")).encode()
