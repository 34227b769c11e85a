"""In-process fake SGLang engines: a PD pair meeting at bootstrap rooms, or a colocated one.

They behave like the real servers where the adapter can tell (the prefill engine
answers only once the decode engine has joined the room; the decode engine waits for
the KV cache as long as it takes, like SGLang's 300 s bootstrap timeout; closing the
connection or ``POST /abort_request`` ends a request) and record everything they are
sent, so tests can check the requests exactly. Knobs make them fail in the ways real
engines do.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

Mode = Literal["prefill", "decode", "null"]

TOKENS = (("Hel", [9906]), ("lo", [385]), (" world", [1917]))
PROMPT_TOKENS = 5


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


class Rooms:
    """The bootstrap rooms of one PD pair: the decode engine joins, the prefill engine fills."""

    def __init__(self) -> None:
        self.joined: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.filled: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)


@dataclass
class Knobs:
    # of generation requests, answered after the room is joined (prefill) or at once
    status: int = 200
    fail_at_once: bool = False  # prefill: answer ``status`` without waiting for the decode
    hang: bool = False  # never answer (until the connection closes)
    finish_abort: bool = False  # prefill: 200, but the request finishes with "abort"
    error_after_events: int | None = None  # decode: an error event after this many tokens
    drop_after_events: int | None = None  # decode: close the connection after this many
    hold_after_events: int | None = None  # decode: stop sending after this many, stay open
    # prefill: once the KV cache is sent, wait for this, then break the reply off
    break_reply_on: asyncio.Event | None = None
    resume_on: asyncio.Event | None = None  # decode: after the first token, wait for this
    headers_after_kv: bool = False  # decode: send no headers until the KV cache is in
    incremental: bool = False  # --incremental-streaming-output
    health_status: int = 200
    metrics: str | None = None  # None: /metrics is 404, as without --enable-metrics
    # Events (bytes as they are, anything else as JSON data) sent instead of the stream's
    # own: by a decode or colocated engine, or by a prefill engine as its reply.
    stream_override: list[Any] | None = None


@dataclass
class FakeSglang:
    mode: Mode
    rooms: Rooms = field(default_factory=Rooms)
    api_key: str | None = None
    knobs: Knobs = field(default_factory=Knobs)
    received: list[Received] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)  # rids sent to /abort_request
    disconnected: list[str] = field(default_factory=list)  # rids whose client left early
    replied: int = 0  # generation replies sent to the end
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        app = web.Application()
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self._generate)
        app.router.add_post("/abort_request", self._abort)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        # Cancelling a handler when its client goes is how SGLang notices a closed stream.
        self._runner = web.AppRunner(app, handler_cancellation=True)
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        await self._runner.cleanup()

    def generation_requests(self) -> list[Received]:
        return [r for r in self.received if r.path != "/abort_request"]

    # --- handlers ---------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == (
            f"Bearer {self.api_key}"
        )

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(Received(request.path, dict(request.headers), body))
        self.arrived.set()
        if not self._authorized(request):
            return web.json_response({"error": {"message": "Unauthorized"}}, status=401)
        problem = self._invalid(body)
        if problem:
            return web.json_response({"error": {"message": problem, "code": 400}}, status=400)
        rid = body["rid"]
        try:
            if self.mode == "prefill":
                return await self._prefill(request, body)
            if self.mode == "decode":
                self.rooms.joined[body["bootstrap_room"]].set()
                if self.knobs.status != 200:
                    return web.json_response(
                        {"error": {"message": "decode refused"}}, status=self.knobs.status
                    )
                if self.knobs.hang:
                    await asyncio.Event().wait()
                # SGLang sends its headers at once, then waits for the KV cache; an engine
                # (or a proxy) may as well hold the headers back until the first token.
                filled = self.rooms.filled[body["bootstrap_room"]]
                if self.knobs.headers_after_kv:
                    await filled.wait()
                response = await self._open_stream(request)
                await filled.wait()
                return await self._stream_tokens(request, response, body)
            if self.knobs.status != 200:
                return web.json_response(
                    {"error": {"message": "request refused"}}, status=self.knobs.status
                )
            return await self._stream_tokens(request, await self._open_stream(request), body)
        except asyncio.CancelledError:
            self.disconnected.append(rid)
            raise

    def _invalid(self, body: dict[str, Any]) -> str | None:
        if not isinstance(body.get("rid"), str):
            return "rid missing"
        pd_fields = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
        if self.mode == "null":
            return None
        if any(name not in body for name in pd_fields):
            return "disaggregated engine needs bootstrap_host, bootstrap_port and bootstrap_room"
        room = body["bootstrap_room"]
        if not isinstance(room, int) or not 0 <= room <= 2**63 - 1:
            return "bootstrap_room out of range"
        return None

    async def _prefill(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        knobs = self.knobs
        if knobs.fail_at_once:
            return web.json_response({"error": {"message": "prefill broke"}}, status=knobs.status)
        # The real prefill engine does nothing until the decode engine joins the room.
        await self.rooms.joined[body["bootstrap_room"]].wait()
        if knobs.hang:
            await asyncio.Event().wait()
        if knobs.status != 200:
            return web.json_response({"error": {"message": "prefill broke"}}, status=knobs.status)
        response = await self._open_stream(request)
        if knobs.stream_override is not None:
            self.rooms.filled[body["bootstrap_room"]].set()
            return await self._send_override(response)
        if knobs.finish_abort:
            finish: dict[str, Any] = {"type": "abort", "message": "KV transfer failed"}
        else:
            self.rooms.filled[body["bootstrap_room"]].set()
            finish = {"type": "length", "length": 0}
        if knobs.break_reply_on is not None:
            await knobs.break_reply_on.wait()
            assert request.transport is not None
            request.transport.close()
            return response
        text, ids = TOKENS[0]
        if request.path == "/generate":
            meta = {"finish_reason": finish, "prompt_tokens": PROMPT_TOKENS, "completion_tokens": 1}
            await _send(response, {"text": text, "output_ids": ids, "meta_info": meta})
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish["type"]}
            await _send(response, {"id": "x", "choices": [choice]})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.replied += 1
        return response

    async def _open_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        return response

    async def _stream_tokens(
        self, request: web.Request, response: web.StreamResponse, body: dict[str, Any]
    ) -> web.StreamResponse:
        knobs = self.knobs
        if knobs.stream_override is not None:
            return await self._send_override(response)
        chat = request.path == "/v1/chat/completions"
        text_so_far, ids_so_far = "", []
        for index, (text, ids) in enumerate(TOKENS):
            if index == knobs.error_after_events:
                await _send(response, {"error": {"message": "CUDA error", "code": 500}})
                await response.write_eof()
                return response
            if index == knobs.drop_after_events:
                assert request.transport is not None
                request.transport.close()
                return response
            if index == knobs.hold_after_events:
                await asyncio.Event().wait()
            if index == 1 and knobs.resume_on is not None:
                await knobs.resume_on.wait()
            last = index == len(TOKENS) - 1
            text_so_far += text
            ids_so_far += ids
            if request.path == "/generate":
                meta = {
                    "finish_reason": {"type": "stop", "matched": 2} if last else None,
                    "prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": index + 1,
                }
                if knobs.incremental:
                    event = {"text": text, "output_ids": ids, "meta_info": meta}
                else:
                    event = {"text": text_so_far, "output_ids": list(ids_so_far), "meta_info": meta}
            else:
                content: dict[str, Any] = {"delta": {"content": text}} if chat else {"text": text}
                choice = {"index": 0, **content, "finish_reason": "stop" if last else None}
                event = {"id": "x", "choices": [choice]}
            await _send(response, event)
        if request.path != "/generate":
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(TOKENS)}
            await _send(response, {"id": "x", "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.replied += 1
        return response

    async def _send_override(self, response: web.StreamResponse) -> web.StreamResponse:
        for event in self.knobs.stream_override or ():
            await (response.write(event) if isinstance(event, bytes) else _send(response, event))
        await response.write_eof()
        return response

    async def _abort(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(Received(request.path, dict(request.headers), body))
        self.aborted.append(body["rid"])
        return web.Response(status=200)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.knobs.health_status)

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.knobs.metrics is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(text=self.knobs.metrics, content_type="text/plain")


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
