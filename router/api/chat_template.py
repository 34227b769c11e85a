"""The router's chat template: how chat messages become one prompt for mock devices.

    <|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>

Each message is ``<|role|>``, a newline, its content and a newline; the prompt
ends with ``<|assistant|>`` and a newline, where generation continues. Engine
adapters (vLLM, SGLang, OpenAI-compatible) send the messages themselves and
the engine applies its model's own template.
"""

from __future__ import annotations

from collections.abc import Sequence

from backends.base import ChatMessage

ROLES = ("system", "user", "assistant")


def render(messages: Sequence[ChatMessage]) -> str:
    turns = "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages)
    return f"{turns}<|assistant|>\n"
