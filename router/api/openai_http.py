"""The OpenAI-compatible HTTP door: /v1/completions, /v1/chat/completions, /v1/models.

A request body is read here, at most ``http_max_body_bytes`` within
``http_body_timeout_s`` (else 413 or 408, and the connection is closed), parsed by
:mod:`router.api.openai_models`, then becomes the same validated GenerationRequest as
the gRPC door's and runs through the same dispatcher. Streaming answers are
server-sent events; errors use OpenAI's error JSON with the matching HTTP status,
naming the parameter at fault (a body field, or a header) and OpenAI's error code.
The split can be steered per request with the body field ``disaggregation`` or the header
``X-Hetero-Disaggregation`` (``auto``, ``split``, ``colocated``); the SLO, priority
and SLO class with the headers ``X-Hetero-SLO-TTFT-Ms``, ``X-Hetero-SLO-TPOT-Ms``,
``X-Hetero-Priority`` and ``X-Hetero-SLO-Class``. The W3C ``traceparent`` and
``tracestate`` headers go on to the backends (:mod:`router.api.trace_context`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import ChatMessage, GenerationRequest
from backends.errors import OverloadedError, ServingError
from router.api import chat_template
from router.api.door import http_peer_client, through_the_door, token_client
from router.api.openai_events import DONE_EVENT, StreamEvents, error_event
from router.api.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
    parse_body,
    read_json,
)
from router.api.trace_context import trace_context
from router.api.validation import FIELD_NAMES, service_level, validate_generate
from router.api.write_stall import StallGuard, WriteStalledError
from router.dispatch.dispatcher import Dispatcher
from router.errors import InvalidRequestError, ModelNotFoundError, retry_hint_s, shown
from router.logging import bind_request, get_logger, unbind_request
from router.pool.registry import Pool
from router.scheduling.plan import Disaggregation
from router.scheduling.service_level import ServiceLevel
from router.settings import Settings

log = get_logger(__name__)

_FINISH = {
    router_pb2.FINISH_REASON_STOP: "stop",
    router_pb2.FINISH_REASON_LENGTH: "length",
    router_pb2.FINISH_REASON_ABORT: "abort",
}
_DISAGGREGATION = {
    "auto": router_pb2.DISAGGREGATION_AUTO,
    "split": router_pb2.DISAGGREGATION_SPLIT,
    "colocated": router_pb2.DISAGGREGATION_COLOCATED,
}
# Queued events past this many bytes (aiohttp's own limit for a write's buffer) are
# written at once, and the stream waits for the reader while the socket holds as much.
_QUEUED_LIMIT = 1 << 16
# How refusals name the request's fields: as the body has them, the request id as its header.
_FIELD_NAMES = {**FIELD_NAMES, "request_id": "X-Request-Id"}
# Headers carrying the service level, by the field each sets.
SERVICE_HEADERS = {
    "ttft_ms": "X-Hetero-SLO-TTFT-Ms",
    "tpot_ms": "X-Hetero-SLO-TPOT-Ms",
    "priority": "X-Hetero-Priority",
    "slo_class": "X-Hetero-SLO-Class",
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "unavailable",
}


# What the HTTP door's request log reads: an error answer's code and parameter at fault
# (set on every error answer the door makes), and the id of a request that was parsed.
ERROR_FIELDS = web.ResponseKey[dict[str, str | None]]("error_fields")
REQUEST_ID = web.RequestKey[str]("request_id")


class _BodyNotReadError(InvalidRequestError):
    """The body was not read to its end: the connection cannot carry another request."""


class _BodyTooLargeError(_BodyNotReadError):
    http_status = 413


class _BodyTimedOutError(_BodyNotReadError):
    http_status = 408


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error JSON, as a status answer's body and as a stream's error event."""
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(status: int, message: str, *, param: str | None = None,
                   code: str | None = None, retry_after_s: float | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:  # fmt: skip
    """The error answer, with ``Retry-After`` when there is a retry hint."""
    body = error_body(status, message, param, code)
    headers = {**(headers or {}), **retry_after_header(retry_after_s)}
    response = web.json_response(body, status=status, headers=headers)
    response[ERROR_FIELDS] = {"code": code, "param": param}
    return response


def refusal(error: InvalidRequestError) -> web.Response:
    """The answer to bad input: its status (400, 404 for an unknown model, 408, 413) and
    code; a refusal with no code of its own has an invalid value."""
    response = error_response(
        error.http_status, error.message, param=error.param, code=error.code or "invalid_value"
    )
    if isinstance(error, _BodyNotReadError):
        response.force_close()
    return response


def retry_after_header(retry_after_s: float | None) -> dict[str, str]:
    """``Retry-After`` in whole seconds, at least 1 and rounded up (never earlier than
    the hint); none without a hint."""
    if retry_after_s is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


@dataclasses.dataclass
class _Parsed:
    request: GenerationRequest
    disaggregation: Disaggregation
    service: ServiceLevel
    stream: bool
    include_usage: bool
    chat: bool


class OpenAIRoutes:
    def __init__(self, settings: Settings, pool: Pool, dispatcher: Dispatcher) -> None:
        self._settings = settings
        self._pool = pool
        self._dispatcher = dispatcher

    def register(self, app: web.Application) -> None:
        """Adds the routes; the app's own middleware checks bearer tokens."""
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)

    async def models(self, request: web.Request) -> web.Response:
        data = [_model(name) for name in self._pool.models]
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self._pool.models:
            return refusal(ModelNotFoundError(f"the model {shown(name)} does not exist"))
        return web.json_response(_model(name))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, http: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = read_json(await self._read_body(http), http.charset)
            parsed = self._parse(body, http, chat=chat)
        except InvalidRequestError as error:
            self._dispatcher.count_rejected("invalid")
            return refusal(error)
        bind_request(parsed.request.shown_id, parsed.request.request_id)
        http[REQUEST_ID] = parsed.request.shown_id
        try:
            client = self._client(http)
            door = through_the_door(
                self._dispatcher, self._settings, client, parsed.service, parsed.request.model
            )
            with door:
                # Closing the frames, also when the client went away, aborts the backends.
                generation = self._dispatcher.generate(
                    parsed.request, parsed.disaggregation, parsed.service
                )
                async with contextlib.aclosing(generation) as frames:
                    if parsed.stream:
                        return await self._stream(http, parsed, frames)
                    return await self._complete(parsed, frames)
        except OverloadedError as error:  # refused at the door, before any frame
            return _router_error(error)
        finally:
            unbind_request()

    def _client(self, http: web.Request) -> str:
        """Who the per-client cap counts the request against: its token, else its address."""
        if self._settings.auth_token_file is not None:
            return token_client(http.headers.get("Authorization", ""))
        return http_peer_client(http.remote)

    # -- request -------------------------------------------------------------

    async def _read_body(self, http: web.Request) -> bytes:
        """The whole body: a client that sends less than it announced, or too slowly,
        or more than the cap, is refused rather than waited for."""
        try:
            async with asyncio.timeout(self._settings.http_body_timeout_s):
                return await http.read()  # the application's client_max_size caps it
        except TimeoutError:
            raise _BodyTimedOutError(
                f"the request body did not arrive within {self._settings.http_body_timeout_s} s",
                code="timeout",
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise _BodyTooLargeError(
                f"the request body is over {self._settings.http_max_body_bytes} bytes",
                code="request_too_large",
            ) from None

    def _parse(self, body: object, http: web.Request, *, chat: bool) -> _Parsed:
        fields: OpenAIRequest
        messages: tuple[ChatMessage, ...] = ()
        if chat:
            fields = parse_body(ChatCompletionRequest, body)
            messages = fields.chat_messages()
            prompt = chat_template.render(messages)
        else:
            fields = parse_body(CompletionRequest, body)
            prompt = fields.prompt
        mode = fields.disaggregation or _header(http, "X-Hetero-Disaggregation") or "auto"
        if mode not in _DISAGGREGATION:
            raise InvalidRequestError(
                "disaggregation must be one of auto, split, colocated",
                param="disaggregation" if fields.disaggregation else "X-Hetero-Disaggregation",
                code="invalid_value",
            )
        message = router_pb2.GenerateRequest(
            request_id=_header(http, "X-Request-Id"),
            model=fields.model or "",
            prompt=prompt,
            sampling=fields.sampling(),
            disaggregation=_DISAGGREGATION[mode],
        )
        request, disaggregation = validate_generate(
            message,
            self._settings,
            self._pool.models,
            self._pool.default_model,
            names=_FIELD_NAMES,
            trace=trace_context(
                http.headers.getall("traceparent", ()), http.headers.getall("tracestate", ())
            ),
        )
        service = self._service(http)
        request = dataclasses.replace(request, messages=messages)
        stream = bool(fields.stream)
        return _Parsed(request, disaggregation, service, stream, fields.include_usage, chat)

    def _service(self, http: web.Request) -> ServiceLevel:
        numbers = {
            key: _header_int(http, SERVICE_HEADERS[key])
            for key in ("ttft_ms", "tpot_ms", "priority")
        }
        return service_level(
            ttft_ms=numbers["ttft_ms"],
            tpot_ms=numbers["tpot_ms"],
            priority=numbers["priority"] or 0,
            slo_class=_header(http, SERVICE_HEADERS["slo_class"]).strip(),
            slo_classes=self._dispatcher.slo_classes,
            names=SERVICE_HEADERS,
        )

    # -- response ------------------------------------------------------------

    async def _complete(self, parsed: _Parsed, frames: AsyncIterator[bytes]) -> web.Response:
        text: list[str] = []
        finish, usage, route = "", router_pb2.Usage(), ""
        try:
            async for frame in frames:
                response = router_pb2.GenerateResponse.FromString(frame)
                route = route or _route_header(response)
                text.append(response.text)
                if response.finish_reason:
                    finish, usage = _FINISH[response.finish_reason], response.usage
        except ServingError as error:
            return _router_error(error)
        request = parsed.request
        content = "".join(text)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": content}}
            if parsed.chat
            else {"index": 0, "text": content, "logprobs": None}
        )
        choice["finish_reason"] = finish or None
        return web.json_response(
            {
                "id": f"{'chatcmpl' if parsed.chat else 'cmpl'}-{request.shown_id}",
                "object": "chat.completion" if parsed.chat else "text_completion",
                "created": int(time.time()),
                "model": request.model,
                "choices": [choice],
                "usage": _usage(usage),
            },
            headers={"X-Hetero-Route": route, "X-Request-Id": request.shown_id},
        )

    async def _stream(
        self, http: web.Request, parsed: _Parsed, frames: AsyncIterator[bytes]
    ) -> web.StreamResponse:
        request = parsed.request
        events = StreamEvents(
            f"{'chatcmpl' if parsed.chat else 'cmpl'}-{request.shown_id}",
            request.model,
            int(time.time()),
            chat=parsed.chat,
        )
        response: StallBoundResponse | None = None
        first = True
        try:
            async for frame in frames:
                message = router_pb2.GenerateResponse.FromString(frame)
                finish = _FINISH.get(message.finish_reason)
                if not message.text and finish is None and not first:
                    continue
                event = events.chunk(message.text, finish, first=first)
                first = False
                if finish is not None and parsed.include_usage:
                    usage = message.usage
                    event += events.usage(usage.prompt_tokens, usage.completion_tokens)
                if response is None:
                    # Headers go out with the first token, so an error before it is a real
                    # status; both in one write, at once.
                    response = await self._open_stream(
                        http, request.shown_id, _route_header(message)
                    )
                    await response.write(event)
                else:
                    await response.send(event)
        except ConnectionResetError:
            log.info("client went away mid-stream")  # leaving the loop aborted the backends
            raise
        except Exception as error:  # noqa: BLE001  # the stream's edge: every failure ends it alike
            return await _stream_failed(http, response, error)
        if response is None:
            response = await self._open_stream(http, request.shown_id, "")
        await response.write_eof(DONE_EVENT)  # [DONE] and the body's end in one write
        return response

    async def _open_stream(
        self, http: web.Request, request_id: str, route: str
    ) -> StallBoundResponse:
        response = StallBoundResponse(
            self._settings.write_stall_timeout_s,
            lambda: self._dispatcher.admission.count_write_stall("http"),
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Request-Id": request_id,
                "X-Hetero-Route": route,
            },
        )
        await response.prepare(http)
        return response


class StallBoundResponse(web.StreamResponse):
    """An event stream whose every write is bounded: one the reader holds back (the
    socket's buffer is full) for the write-stall timeout cuts the connection and raises
    WriteStalledError, which ends the request and so aborts its backends.

    :meth:`send` coalesces: the events made before the task next waits (those of one
    read from the engine) go out in one write of the socket, when the event loop next
    turns, instead of one write each. They are written to the transport with the
    chunked framing aiohttp would give them, after aiohttp has sent the head; every
    write through aiohttp (``write``, ``write_eof``) first takes what is queued, so
    the bytes keep their order, and nothing is left queued once the body has ended.
    """

    # The head waits for the first event and goes out with it, in one write (aiohttp's
    # own Response does the same); the door writes that event as soon as it opens.
    _send_headers_immediately = False

    def __init__(
        self, stall_timeout_s: float, on_stall: Callable[[], None], *, headers: dict[str, str]
    ) -> None:
        super().__init__(headers=headers)
        self._stall_timeout_s = stall_timeout_s
        self._on_stall = on_stall
        self._guard: StallGuard | None = None
        self._stream_request: web.BaseRequest | None = None
        self._writer: AbstractStreamWriter | None = None
        self._queued: list[bytes] = []
        self._queued_bytes = 0
        self._flush_due = False
        self._chunked_body = False
        self._sent_directly = 0  # bytes written past aiohttp's writer

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        self._guard = StallGuard(self._stall_timeout_s)
        self._stream_request = request
        self._writer = await super().prepare(request)
        self._chunked_body = self.headers.get(hdrs.TRANSFER_ENCODING) == "chunked"
        return self._writer

    @property
    def body_length(self) -> int:
        return super().body_length + self._sent_directly

    async def send(self, data: bytes) -> None:
        """Queues one event for the write the next turn of the event loop makes; waits
        (bounded) for the reader when the socket's buffer is over its limit."""
        transport = self._stream_request.transport if self._stream_request else None
        if self._writer is None or transport is None or transport.is_closing():
            raise ConnectionResetError("the client's connection is closed")
        self._queued.append(data)
        self._queued_bytes += len(data)
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)
        if self._queued_bytes > _QUEUED_LIMIT or transport.get_write_buffer_size() > _QUEUED_LIMIT:
            self._flush()
            await self._bounded(self._writer.drain())

    def _flush(self) -> None:
        self._flush_due = False
        if not self._queued:
            return
        data = self._take_queued()
        transport = self._stream_request.transport if self._stream_request else None
        if transport is None or transport.is_closing():
            return  # the client went away: the next send or write raises
        if self._chunked_body:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        # else HTTP/1.0: the body ends with the connection, unframed
        self._sent_directly += len(data)  # counted as aiohttp counts, framing included
        transport.write(data)

    def _take_queued(self) -> bytes:
        data = b"".join(self._queued)
        self._queued.clear()
        self._queued_bytes = 0
        return data

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._queued:
            data = self._take_queued() + bytes(data)
        await self._bounded(super().write(data))

    async def write_eof(self, data: bytes = b"") -> None:
        if self._queued:
            data = self._take_queued() + data
        try:
            await self._bounded(super().write_eof(data))
        finally:
            if self._guard is not None:
                self._guard.close()

    async def _bounded(self, write: Awaitable[None]) -> None:
        if self._guard is None:
            await write
            return
        try:
            await self._guard.write(write)
        except WriteStalledError:
            self._guard.close()
            transport = self._stream_request.transport if self._stream_request else None
            if transport is not None:
                transport.close()  # nothing more goes out on it
            log.info("client stopped reading", timeout_s=self._stall_timeout_s)
            self._on_stall()
            raise


async def _stream_failed(
    http: web.Request, response: web.StreamResponse | None, error: Exception
) -> web.StreamResponse:
    """Before the first token, an error is a real status (the catch-all's 500 for an
    unexpected one). Once the headers are out, an error event in OpenAI's shape ends the
    stream, with no ``[DONE]``: the openai SDK raises an APIError on an event with an
    ``error`` key, where ``[DONE]`` would tell it the stream completed. An unexpected
    error is logged, and its event says no more than the catch-all's 500 would."""
    if isinstance(error, ServingError):
        if response is None:
            return _router_error(error)
        log.info("stream failed", status=error.http_status, reason=error.message)
        body = error_body(error.http_status, error.message)
    elif response is None:
        raise error
    else:
        log.error(
            "http request failed unexpectedly",
            path=http.path,
            error_type=type(error).__name__,
            exc_info=error,
        )
        body = error_body(500, "internal error")
    await response.write_eof(error_event(body))  # the event and the body's end in one write
    return response


def _router_error(error: ServingError) -> web.Response:
    """The status answer; 429, 502 and 503 (retryable) carry ``Retry-After``."""
    return error_response(error.http_status, error.message, retry_after_s=retry_hint_s(error))


def _route_header(response: router_pb2.GenerateResponse) -> str:
    """``split prefill=h100-0 decode=groq-1``: which backends served the request."""
    if not response.HasField("route"):
        return ""
    route = response.route
    mode = "split" if route.mode == router_pb2.ROUTE_MODE_SPLIT else "colocated"
    return f"{mode} prefill={route.prefill_backend} decode={route.decode_backend}"


def _usage(usage: router_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "hetero-router"}


def _header(http: web.Request, name: str) -> str:
    """A header's text, empty when absent. aiohttp reads header bytes that are no UTF-8
    as lone surrogates (surrogateescape), which no backend can be sent: refused."""
    value = http.headers.get(name, "")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidRequestError(
                f"header {name} must be UTF-8 text", param=name, code="invalid_value"
            ) from None
    return value


def _header_int(http: web.Request, name: str) -> int | None:
    raw = http.headers.get(name)
    if raw is None:
        return None
    text = raw.strip()
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 18):
        raise InvalidRequestError(
            f"header {name} must be a whole number, got {shown(raw)}",
            param=name,
            code="invalid_value",
        )
    return int(text)
