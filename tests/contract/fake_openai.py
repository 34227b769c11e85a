"""An in-process fake OpenAI-compatible API (Groq, Cerebras, vLLM alike) that records requests.

Bearer authentication like the hosted APIs (a 401 whose message quotes the key it
refused, as some providers do), ``/models``, and streaming chat and text completions
that end with a usage chunk when ``stream_options.include_usage`` is set.
``stream_override`` replaces a stream's events and ``models_reply`` the listing, for
the adapter's checks of what providers send.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TOKENS = ("Hel", "lo", " world")
PROMPT_TOKENS = 7
MODEL = "llama-3.1-8b-instant"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeOpenAI:
    api_key: str
    prefix: str = "/v1"
    models: tuple[str, ...] = (MODEL, "llama-3.3-70b-versatile")
    finish_reason: str = "stop"
    status: int = 200
    error_message: str = "overloaded"  # the message of a non-200 answer
    error_after_chunks: int | None = None  # an error event after this many tokens
    error_event_code: int = 500  # the code of that event
    hold_after_chunks: int | None = None  # stop sending after this many tokens, stay open
    # Each event as it is (bytes) or as JSON data, instead of the stream's own.
    stream_override: list[Any] | None = None
    models_reply: bytes | None = None  # the raw body of /models instead of the listing
    received: list[Received] = field(default_factory=list)
    disconnected: int = 0  # streams whose client left before the end
    first_chunk_sent: asyncio.Event = field(default_factory=asyncio.Event)
    ssl_context: ssl.SSLContext | None = None  # serves HTTPS with it

    def __post_init__(self) -> None:
        app = web.Application()
        app.router.add_get(f"{self.prefix}/models", self._models)
        app.router.add_post(f"{self.prefix}/chat/completions", self._complete)
        app.router.add_post(f"{self.prefix}/completions", self._complete)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.address}{self.prefix}"

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        await self._runner.cleanup()

    def _refusal(self, request: web.Request) -> web.Response | None:
        presented = request.headers.get("Authorization", "")
        if presented == f"Bearer {self.api_key}":
            return None
        token = presented.removeprefix("Bearer ")
        message = f"Invalid API Key: {token}" if token else "Missing API key"
        return web.json_response(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }
            },
            status=401,
        )

    async def _models(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, dict(request.headers), None))
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        if self.models_reply is not None:
            return web.Response(body=self.models_reply, content_type="application/json")
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
        )

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(Received(request.path, dict(request.headers), body))
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        if self.status != 200:
            error = {"message": self.error_message, "code": self.status}
            return web.json_response({"error": error}, status=self.status)
        chat = request.path.endswith("/chat/completions")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.stream_override is not None:
            for event in self.stream_override:
                await (
                    response.write(event) if isinstance(event, bytes) else _send(response, event)
                )
            await response.write_eof()
            return response
        try:
            if chat:  # chat streams open with a role-only delta
                await _send(response, _chunk({"delta": {"role": "assistant", "content": ""}}))
            for index, text in enumerate(TOKENS):
                if index == self.error_after_chunks:
                    error = {"message": "internal error", "code": self.error_event_code}
                    await _send(response, {"error": error})
                    await response.write_eof()
                    return response
                if index == self.hold_after_chunks:
                    await asyncio.Event().wait()
                content = {"delta": {"content": text}} if chat else {"text": text}
                last = index == len(TOKENS) - 1
                await _send(
                    response,
                    _chunk({**content, "finish_reason": self.finish_reason if last else None}),
                )
                self.first_chunk_sent.set()
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {
                    "prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": len(TOKENS),
                    "total_tokens": PROMPT_TOKENS + len(TOKENS),
                }
                await _send(response, {"id": "c", "object": "chunk", "choices": [], "usage": usage})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except asyncio.CancelledError:
            self.disconnected += 1
            raise
        return response


def _chunk(choice: dict[str, Any]) -> dict[str, Any]:
    return {"id": "c", "object": "chunk", "model": MODEL, "choices": [{"index": 0, **choice}]}


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
