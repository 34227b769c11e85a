"""Shared pieces of the HTTP engine adapters (vLLM, SGLang, OpenAI-compatible servers).

Each helper is protocol-level and knows nothing of one engine:

- connection set-up: :func:`reject_inline_key`, :func:`read_api_key` and
  :class:`Secret` (the key, redacted wherever it is shown), :func:`new_session` and
  :func:`connector` (HTTPS with the context ``backends.tls`` builds),
  :func:`client_timeout`;
- errors: :func:`status_error` and :func:`transport_error` turn an HTTP status or an
  aiohttp failure into a :class:`~backends.errors.BackendError`, or a
  :class:`~backends.errors.BackendRejectedError` when the engine refused the request
  as invalid;
- cancellation: :class:`OpenExchanges` closes a request's HTTP exchanges on abort
  (OpenAI-compatible servers abort a request when its connection closes);
- what engines answer: nothing an engine sends is trusted. Bodies are read with
  :func:`read_body`, bounded (:data:`MAX_BODY_BYTES` for an answer,
  :data:`MAX_PAGE_BYTES` for a listing, a metrics page or a token list); every field is
  type-checked (:class:`ShapeError` from :func:`parse_json`, :func:`json_object`,
  :func:`field_list`, :func:`field_object`, :func:`field_text`, :func:`field_count`,
  :func:`field_ids`), and :func:`malformed` turns a bad shape into a retryable
  :class:`~backends.errors.BackendError` quoting the start of the reply; an engine's
  error text is shortened and made fit for a status line (:func:`error_text`);
- streams: :func:`iter_sse` splits a Server-Sent Events body into events (each at most
  :data:`MAX_EVENT_BYTES`, giving the event loop a turn every
  :data:`YIELD_EVERY_STEPS` events or reads), :class:`OpenAIStream` turns the chunks
  of a streaming ``/v1/completions`` or ``/v1/chat/completions`` reply into token
  frames (encoded ``GenerateResponse``), and :func:`openai_frames` does both for an
  aiohttp response, reading the events by the read (:func:`sse_batches`) and merging
  the token events of one read into one frame: the engine's text and ids, in fewer
  frames when the router reads slower than the engine writes (under load), each
  frame paid for once by the dispatcher and the doors (on gRPC, a write per frame);
- load: :func:`parse_prometheus` reads the samples of a ``/metrics`` page with
  prometheus_client's parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from backends._gen.hetero.router.v1 import router_pb2
from backends.errors import BackendError, BackendRejectedError
from backends.tls import ClientTLS

T = TypeVar("T")

# An engine's error text is for an operator's eyes: a few lines, never a whole page.
_MAX_ERROR_CHARS = 500

# The largest SSE event (all its data lines) and JSON answer an adapter reads. A
# completion chunk or a one-token answer is a few hundred bytes: far past that is a
# broken engine, and a reply to refuse rather than to buffer.
MAX_EVENT_BYTES = 1 << 20
MAX_BODY_BYTES = 1 << 20
# Model listings, metrics pages and token lists grow with the deployment or the prompt.
MAX_PAGE_BYTES = 16 << 20
# What one token id takes in a JSON list ("123456, "), generously: a reply that echoes the
# prompt's ids (vLLM's ``return_token_ids``) is allowed this much more per prompt token.
ID_BYTES = 12
# The SSE reader gives the event loop a turn after this many events or reads: data aiohttp
# has buffered is read without suspending, so an engine streaming as fast as it can
# would otherwise keep health checks and every other stream waiting.
YIELD_EVERY_STEPS = 16

# Token ids and counts travel as uint32 in frames.
_MAX_UINT32 = 2**32 - 1
# How much of a malformed reply an error quotes.
_EXCERPT_CHARS = 120

_REDACTED = "<redacted>"


# --- connection set-up -------------------------------------------------------------------


def reject_inline_key(options: Mapping[str, Any]) -> None:
    """A key written into the pool file would end up in version control and config dumps."""
    if "api_key" in options:
        raise ValueError(
            "api_key does not belong in the pool file: use api_key_env or api_key_file"
        )


def read_api_key(options: Mapping[str, Any]) -> str | None:
    """The bearer token named by ``api_key_env`` (a variable) or ``api_key_file`` (a path).

    Read once, at construction, so a missing secret fails at start-up with the option's
    name. Messages name where the key was looked for, never the key itself.
    """
    env_name = options.get("api_key_env")
    file_name = options.get("api_key_file")
    if env_name and file_name:
        raise ValueError("set api_key_env or api_key_file, not both")
    if env_name:
        key = os.environ.get(str(env_name), "").strip()
        if not key:
            raise ValueError(f"api_key_env: environment variable {env_name!s} is not set")
        return key
    if file_name:
        try:
            key = Path(str(file_name)).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ValueError(f"api_key_file {file_name!s}: {error.strerror}") from None
        if not key:
            raise ValueError(f"api_key_file {file_name!s} is empty")
        return key
    return None


def new_session(
    address: str,
    *,
    api_key: str | None,
    max_connections: int,
    tls: ClientTLS | None = None,
) -> aiohttp.ClientSession:
    """A keep-alive session to one ``host:port``, over HTTPS with ``tls`` (see
    ``backends.tls``); creating it opens no connection.

    Every streaming leg holds one connection for its whole length, so the pool is sized
    for hundreds of concurrent streams instead of aiohttp's default of 100, past which
    new legs would queue silently behind old ones.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return aiohttp.ClientSession(
        base_url=f"{'https' if tls else 'http'}://{address}",
        connector=connector(max_connections, tls),
        headers=headers,
        raise_for_status=False,
        json_serialize=json_text,
    )


def json_text(value: Any) -> str:
    """A request body's JSON: orjson's (a few times faster than the standard library's
    on every leg), else the standard library's for what orjson refuses (an integer
    past 64 bits, a lone surrogate), so that no body that was sent before is refused."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError is one
        return json.dumps(value)


def connector(max_connections: int, tls: ClientTLS | None) -> aiohttp.TCPConnector:
    """A connection pool of ``max_connections``; ``tls`` for HTTPS (None: aiohttp's own
    verification, the system's CAs, should a URL say https)."""
    context = tls.context if tls is not None else True
    return aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ssl=context)


def client_timeout(
    total_s: float, connect_s: float, idle_s: float | None = None
) -> aiohttp.ClientTimeout:
    """The deadline of one leg: ``total_s`` for all of it, ``idle_s`` between two reads.

    The idle bound catches an engine that stops sending mid-stream long before a long
    decode deadline would.
    """
    return aiohttp.ClientTimeout(
        total=total_s,
        sock_connect=min(connect_s, total_s),
        sock_read=min(idle_s, total_s) if idle_s is not None else None,
    )


class Secret:
    """An API key that does not show itself: its repr and str are redacted."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value

    def __repr__(self) -> str:
        return f"Secret({_REDACTED if self._value else None})"

    __str__ = __repr__

    def reveal(self) -> str | None:
        """The key itself, for the one place that sends it."""
        return self._value

    def headers(self) -> dict[str, str] | None:
        return {"Authorization": f"Bearer {self._value}"} if self._value else None

    def scrub(self, error: BackendError) -> BackendError:
        """The same error with every occurrence of the key replaced (some engines and
        providers quote the key they refused)."""
        if not self._value or self._value not in error.message:
            return error
        prefix = f"backend {error.backend_id}: "
        detail = error.message.removeprefix(prefix).replace(self._value, _REDACTED)
        if isinstance(error, BackendRejectedError):
            return BackendRejectedError(error.backend_id, detail)
        return BackendError(error.backend_id, detail, retryable=error.retryable)

    def clean(self, text: str) -> str:
        return text.replace(self._value, _REDACTED) if self._value else text


# --- errors ------------------------------------------------------------------------------


def is_retryable_status(status: int) -> bool:
    """Whether another backend might serve what this status refused.

    5xx is the engine's own trouble. 408 and 429 are about this engine's state too
    (slow, or shedding load), not about the request, so they are retryable as well;
    every other 4xx would fail the same way anywhere.
    """
    return status >= 500 or status in (408, 429)


def error_text(body: bytes) -> str:
    """The message of an error body: OpenAI's ``{"error": {"message"}}``, vLLM's older
    ``{"message"}``, FastAPI's ``{"detail"}``, or the raw text, shortened."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        payload = parse_json(text)
    except ShapeError:
        return text[:_MAX_ERROR_CHARS]
    message: Any = payload
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            message = error.get("message", error)
        elif error:
            message = error
        else:
            message = payload.get("message") or payload.get("detail") or payload
    if not isinstance(message, str):
        try:
            message = str(message)
        except RecursionError:  # nested as deep as the JSON parser goes: quote the text
            message = text
    return message_text(message[:_MAX_ERROR_CHARS])


def message_text(text: str) -> str:
    """``text`` as an error message can carry it: a lone surrogate (JSON's ``"\\ud800"``),
    which no UTF-8 header or status line can hold, is escaped."""
    if text.isascii():
        return text
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


# What an engine answers a request it will not take as it is: 400 for a bad parameter or
# a prompt over the context length (vLLM, SGLang), 413 for a body over a size limit (a
# proxy), 422 for a body FastAPI could not validate.
_REJECTED_STATUSES = frozenset({400, 413, 422})


def engine_error(backend_id: str, status: int | None, message: str) -> BackendError:
    """The error for an engine's refusal with an HTTP status (or an error event's ``code``;
    None when it has none): :class:`BackendRejectedError` when the request is at fault."""
    if status in _REJECTED_STATUSES:
        return BackendRejectedError(backend_id, message)
    retryable = status is None or is_retryable_status(status)
    return BackendError(backend_id, message, retryable=retryable)


def error_code(error: object) -> int | None:
    """The HTTP status an error event's ``{"code": ...}`` gives, if it gives one."""
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def status_error(backend_id: str, status: int, body: bytes) -> BackendError:
    return engine_error(backend_id, status, f"HTTP {status}: {error_text(body)}")


def transport_error(
    backend_id: str, error: BaseException, timeout_s: float, tls: ClientTLS | None = None
) -> BackendError:
    """A connection failure or an expired deadline: always retryable. With the
    backend's ``tls``, a disconnect says what TLS may have had to do with it."""
    if isinstance(error, TimeoutError):
        # aiohttp's socket timeouts subclass it and say which one fired; the leg's
        # overall deadline arrives as a bare TimeoutError.
        detail = str(error) or f"no answer within {timeout_s:g} s"
        return BackendError(backend_id, f"timed out: {detail}", retryable=True)
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        reason = getattr(error.certificate_error, "verify_message", "") or error.certificate_error
        return BackendError(
            backend_id,
            f"TLS: the engine's certificate did not verify (tls.ca_file): {reason}",
            retryable=True,
        )
    if isinstance(error, aiohttp.ClientSSLError):
        return BackendError(backend_id, f"TLS handshake failed: {error.os_error}", retryable=True)
    detail = f"connection failed: {str(error) or type(error).__name__}"
    return BackendError(backend_id, tls.explain(error, detail) if tls else detail, retryable=True)


# --- what engines answer -----------------------------------------------------------------


class ShapeError(Exception):
    """A reply is not the shape the adapter reads; :func:`malformed` makes it a BackendError."""


def excerpt(raw: bytes | str) -> str:
    """The start of a reply, quoted, for an error message."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    if len(text) > _EXCERPT_CHARS:
        return f"{text[:_EXCERPT_CHARS]!r}..."
    return repr(text)


def malformed(
    backend_id: str, what: str, problem: ShapeError | str, raw: bytes | str
) -> BackendError:
    """The error for a reply of the wrong shape: retryable, since another engine (or this
    one, restarted) answers properly."""
    return BackendError(backend_id, malformed_detail(what, problem, raw))


def malformed_detail(what: str, problem: ShapeError | str, raw: bytes | str) -> str:
    return f"malformed {what} ({problem}): {excerpt(raw)}"


async def read_body(
    backend_id: str, response: aiohttp.ClientResponse, limit: int, what: str = "answer"
) -> bytes:
    """The whole body, or a BackendError as soon as it outgrows ``limit`` bytes (decoded:
    a compressed body is bounded by what it expands to)."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise BackendError(backend_id, f"{what} of {declared} bytes is over the {limit} byte limit")
    body = bytearray()
    while chunk := await response.content.readany():
        body += chunk
        if len(body) > limit:
            raise BackendError(backend_id, f"{what} is over the {limit} byte limit")
    return bytes(body)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def parse_json(raw: bytes | str) -> Any:
    """A JSON value, or ShapeError: not JSON (bytes that are not UTF-8 included), or nested
    deeper than the parser follows (it raises RecursionError there, not ValueError)."""
    try:
        return json.loads(raw)
    except ValueError:
        raise ShapeError("not JSON") from None
    except RecursionError:
        raise ShapeError("JSON nested too deep") from None


def json_object(raw: bytes | str) -> dict[str, Any]:
    """A JSON object, or ShapeError."""
    value = parse_json(raw)
    if not isinstance(value, dict):
        raise ShapeError(f"{_json_type(value)}, not an object")
    return value


def stream_object(raw: str) -> dict[str, Any]:
    """A stream chunk's JSON object, or ShapeError: :func:`json_object`, read by orjson
    (one parse a token). What orjson refuses (NaN, a lone surrogate escape, nesting past
    its depth) goes to the standard library, which decides as before. orjson reads an
    integer past 64 bits as a float: no count or token id either way."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json_object(raw)
    if not isinstance(value, dict):
        raise ShapeError(f"{_json_type(value)}, not an object")
    return value


def field_list(value: Any, name: str) -> list[Any]:
    """An array field; absent or null is empty."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ShapeError(f"{name} is {_json_type(value)}, not an array")
    return value


def field_object(value: Any, name: str) -> dict[str, Any] | None:
    """An object field; absent or null is None."""
    if value is None or isinstance(value, dict):
        return value
    raise ShapeError(f"{name} is {_json_type(value)}, not an object")


def field_text(value: Any, name: str) -> str:
    """A string field; absent or null is empty."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ShapeError(f"{name} is {_json_type(value)}, not a string")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate escape ("\ud800") frames cannot carry
            raise ShapeError(f"{name} is not valid Unicode") from None
    return value


def field_count(value: Any, name: str) -> int:
    """A token count (a uint32); absent or null is 0."""
    if value is None:
        return 0
    if not _is_uint32(value):
        raise ShapeError(f"{name} is {value!r:.40}, not a token count")
    return int(value)


def field_ids(value: Any, name: str) -> list[int]:
    """Token ids (uint32 each); absent or null is none."""
    ids = field_list(value, name)
    for token in ids:
        if not _is_uint32(token):
            raise ShapeError(f"{name} holds {token!r:.40}, not a token id")
    return ids


def _is_uint32(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_UINT32


# --- cancellation ------------------------------------------------------------------------


# Not an ...Error: a signal between OpenExchanges and its adapter, which turns it into
# a BackendError at once; it never reaches the package's error tree.
class ExchangeAborted(Exception):  # noqa: N818  # a control-flow signal, not an error
    """The exchange was closed by :meth:`OpenExchanges.abort`."""


class OpenExchanges:
    """The HTTP exchanges in flight, by request id, so that ``abort`` can close them.

    OpenAI-compatible engines have no abort endpoint: closing the connection is the
    abort. A streaming leg registers its response's ``close``; a leg still waiting for
    its answer runs in a task of its own (:meth:`run`) so that abort can cancel it
    without cancelling the caller.
    """

    def __init__(self) -> None:
        self._closers: dict[str, set[Callable[[], None]]] = {}

    @contextlib.contextmanager
    def track(self, request_id: str, closer: Callable[[], None]) -> Iterator[None]:
        closers = self._closers.setdefault(request_id, set())
        closers.add(closer)
        try:
            yield
        finally:
            closers.discard(closer)
            if not closers and self._closers.get(request_id) is closers:
                del self._closers[request_id]

    def abort(self, request_id: str) -> int:
        """Closes every exchange of the request; returns how many. Unknown ids close none."""
        closers = self._closers.pop(request_id, set())
        for closer in closers:
            closer()
        return len(closers)

    def abort_all(self) -> None:
        for request_id in list(self._closers):
            self.abort(request_id)

    async def run(
        self,
        request_id: str,
        work: Awaitable[T],
        *,
        discard: Callable[[T], None] | None = None,
    ) -> T:
        """Awaits ``work`` in its own task; raises :class:`ExchangeAborted` if aborted.

        ``discard`` disposes of a result nobody will read: one that arrived just as
        the caller was cancelled (an open response would otherwise leak its connection).
        """
        task = asyncio.ensure_future(work)

        def cancel() -> None:
            task.cancel()

        with self.track(request_id, cancel):
            try:
                return await task
            except asyncio.CancelledError:
                if discard is not None and _succeeded(task):
                    discard(task.result())
                current = asyncio.current_task()
                if task.cancelled() and current is not None and not current.cancelling():
                    raise ExchangeAborted(request_id) from None
                raise


def _succeeded(task: asyncio.Future[Any]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


# --- Server-Sent Events ------------------------------------------------------------------


class SSEEvent(NamedTuple):
    """One event of a stream (a tuple: one is made for every token, and a frozen
    dataclass costs several times as much to make)."""

    data: str
    event: str = "message"


async def iter_sse(
    chunks: AsyncIterable[bytes], backend_id: str, *, max_event_bytes: int = MAX_EVENT_BYTES
) -> AsyncGenerator[SSEEvent, None]:
    """The events of an SSE body, whatever the chunk boundaries.

    Follows the WHATWG rules: lines end in LF, CRLF or CR; ``data`` lines of one event
    join with LF; a line starting with ``:`` is a comment; an event ends at a blank
    line, and one cut off by the end of the body is dropped. aiohttp's own line reader
    is not used because it caps a line at its read buffer size, which one long
    completion chunk can exceed. An event (or a line) over ``max_event_bytes`` is a
    BackendError, before it is buffered any further. Every
    :data:`YIELD_EVERY_STEPS` events or reads it gives the event loop a turn.
    """
    parser = _SSEParser(max_event_bytes)
    steps = 0
    try:
        async for chunk in chunks:
            steps += 1
            for event in parser.feed(chunk):
                yield event
                steps += 1
                if steps >= YIELD_EVERY_STEPS:
                    steps = 0
                    await asyncio.sleep(0)
            if steps >= YIELD_EVERY_STEPS:
                steps = 0
                await asyncio.sleep(0)
        for event in parser.feed(b"", at_end=True):
            yield event
    except _OversizedEventError as error:
        raise BackendError(backend_id, str(error)) from None


async def sse_batches(
    chunks: AsyncIterable[bytes], backend_id: str, *, max_event_bytes: int = MAX_EVENT_BYTES
) -> AsyncGenerator[list[SSEEvent], None]:
    """The events of an SSE body as :func:`iter_sse` reads them, in lists: the events
    that one read completed, cut where :func:`iter_sse` would give the event loop a
    turn (every :data:`YIELD_EVERY_STEPS` events or reads), and that turn given after
    the list. A consumer handles what arrived together at once (the OpenAI stream
    decoder merges it into one frame) instead of paying its per-event costs for each."""
    parser = _SSEParser(max_event_bytes)
    steps = 0
    try:
        async for chunk in chunks:
            steps += 1
            events = parser.feed(chunk)
            start = 0
            while start < len(events):
                # A list fills what is left of the steps before the next turn, so the
                # loop gets its turns exactly as often as iter_sse gives them.
                batch = events[start : start + max(1, YIELD_EVERY_STEPS - steps)]
                start += len(batch)
                yield batch
                steps += len(batch)
                if steps >= YIELD_EVERY_STEPS:
                    steps = 0
                    await asyncio.sleep(0)
            if steps >= YIELD_EVERY_STEPS:
                steps = 0
                await asyncio.sleep(0)
        events = parser.feed(b"", at_end=True)
        if events:
            yield events
    except _OversizedEventError as error:
        raise BackendError(backend_id, str(error)) from None


class _OversizedEventError(Exception):
    pass


class _SSEParser:
    def __init__(self, max_event_bytes: int) -> None:
        self._max_event_bytes = max_event_bytes
        self._buffer = bytearray()
        self._data: list[str] = []
        self._data_bytes = 0  # of the event being read
        self._event = ""

    def feed(self, chunk: bytes, *, at_end: bool = False) -> list[SSEEvent]:
        self._buffer += chunk
        if b"\r" not in self._buffer:
            return self._feed_lf()
        events: list[SSEEvent] = []
        position = 0
        while (line_end := self._line_end(position, at_end)) is not None:
            end, following = line_end
            # Split as bytes, decode per line: no UTF-8 sequence contains a CR or LF byte.
            line = self._buffer[position:end].decode("utf-8", errors="replace")
            size, position = end - position, following
            if line:
                self._apply(line, size)
            elif self._data:
                events.append(SSEEvent("\n".join(self._data), self._event or "message"))
                self._data, self._data_bytes, self._event = [], 0, ""
            else:
                self._event = ""
        del self._buffer[:position]
        if len(self._buffer) + self._data_bytes > self._max_event_bytes:
            raise _OversizedEventError(f"stream event over the {self._max_event_bytes} byte limit")
        return events

    def _feed_lf(self) -> list[SSEEvent]:
        """:meth:`feed` where every line ends in LF alone (how engines send them): the
        buffer is cut into its lines at once rather than searched line by line."""
        lines = self._buffer.split(b"\n")
        rest = lines.pop()  # the line still in flight (empty when the buffer ends in LF)
        events: list[SSEEvent] = []
        for raw in lines:
            if raw.startswith(b"data: "):  # the usual line: no decode of its name
                self._data.append(raw[6:].decode("utf-8", errors="replace"))
                self._data_bytes += len(raw)
                if self._data_bytes > self._max_event_bytes:
                    limit = self._max_event_bytes
                    raise _OversizedEventError(f"stream event over the {limit} byte limit")
            elif raw:
                self._apply(raw.decode("utf-8", errors="replace"), len(raw))
            elif self._data:
                events.append(SSEEvent("\n".join(self._data), self._event or "message"))
                self._data, self._data_bytes, self._event = [], 0, ""
            else:
                self._event = ""
        self._buffer = rest
        if len(rest) + self._data_bytes > self._max_event_bytes:
            raise _OversizedEventError(f"stream event over the {self._max_event_bytes} byte limit")
        return events

    def _line_end(self, position: int, at_end: bool) -> tuple[int, int] | None:
        """Where the line starting at ``position`` ends and the next one starts."""
        lf = self._buffer.find(b"\n", position)
        # Look for a CR only before the LF: engines end lines with LF alone, and a
        # search to the end of the buffer for every line would be quadratic.
        cr = self._buffer.find(b"\r", position, len(self._buffer) if lf == -1 else lf)
        if cr == -1:
            return None if lf == -1 else (lf, lf + 1)
        if cr + 1 < len(self._buffer):
            return cr, cr + 2 if self._buffer[cr + 1] == 0x0A else cr + 1
        # A CR at the very end may be the first half of a CRLF still in flight.
        return (cr, cr + 1) if at_end else None

    def _apply(self, line: str, size: int) -> None:
        if line.startswith(":"):
            return  # a comment (servers send them as keep-alives)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
            self._data_bytes += size
            if self._data_bytes > self._max_event_bytes:
                limit = self._max_event_bytes
                raise _OversizedEventError(f"stream event over the {limit} byte limit")
        elif name == "event":
            self._event = value
        # "id" and "retry" matter only to browsers reconnecting.


# --- OpenAI-compatible streams -> frames -------------------------------------------------

_FINISH_REASONS = {
    "stop": router_pb2.FINISH_REASON_STOP,
    "length": router_pb2.FINISH_REASON_LENGTH,
}


def finish_reason(reason: str) -> router_pb2.FinishReason.ValueType:
    """OpenAI's ``finish_reason``: ``stop`` and ``length`` map across; anything else
    (``abort``, ``content_filter``, ``tool_calls``) ended the request early."""
    return _FINISH_REASONS.get(reason, router_pb2.FINISH_REASON_ABORT)


def choice_content(choice: Mapping[str, Any]) -> tuple[str, list[int]]:
    """Text and token ids of one choice: completions carry ``text``; chat carries
    ``delta.content`` when streamed and ``message.content`` otherwise. Token ids are
    present only when the engine returns them (vLLM: ``return_token_ids``). ShapeError
    for a field of the wrong type."""
    if choice.get("text") is not None:
        text = field_text(choice["text"], "text")
    else:
        key = "delta" if "delta" in choice else "message"
        message = field_object(choice.get(key), key) or {}
        text = field_text(message.get("content"), f"{key}.content")
    return text, field_ids(choice.get("token_ids"), "token_ids")


def choice_finish(choice: Mapping[str, Any]) -> str:
    """A choice's ``finish_reason``, empty while it runs; ShapeError unless a string."""
    return field_text(choice.get("finish_reason"), "finish_reason")


def first_choice(reply: Mapping[str, Any]) -> dict[str, Any] | None:
    """Choice 0 of a completion (the adapters never ask for ``n > 1``); None when the
    reply has none (a usage chunk); ShapeError for choices of the wrong shape."""
    choices = field_list(reply.get("choices"), "choices")
    if not choices:
        return None
    choice = field_object(choices[0], "choices[0]")
    if choice is None:
        raise ShapeError("choices[0] is null, not an object")
    return choice


def usage_message(usage: Any) -> router_pb2.Usage:
    """An OpenAI ``usage`` object (absent or null: zeros); ShapeError for the wrong shape."""
    fields = field_object(usage, "usage") or {}
    return router_pb2.Usage(
        prompt_tokens=field_count(fields.get("prompt_tokens"), "usage.prompt_tokens"),
        completion_tokens=field_count(fields.get("completion_tokens"), "usage.completion_tokens"),
    )


class OpenAIStream:
    """Turns the events of one streaming completion into frames, one per useful chunk.

    The finish frame is held back until the usage chunk (sent after it when
    ``stream_options.include_usage`` is set) or ``[DONE]`` arrives, so that the last
    frame carries both the finish reason and the usage. Only choice 0 is read: the
    adapters never ask for ``n > 1``. An ``{"error": ...}`` event (how vLLM reports a
    failure after the 200 is sent) raises; so do a chunk of the wrong shape (a
    retryable BackendError quoting it) and a stream that ends unfinished. Frames carry
    what the engine sent and nothing else.
    """

    def __init__(self, backend_id: str, max_tokens: int | None = None) -> None:
        """``max_tokens``: the leg's; :meth:`feed_batch` merges no token past it."""
        self._backend_id = backend_id
        self._max_tokens = max_tokens
        self._tokens = 0  # counted as the router counts them: ids, else one per text event
        self._usage: router_pb2.Usage | None = None
        self._final: router_pb2.GenerateResponse | None = None  # the held finish frame
        self._final_sent = False
        self.done = False  # [DONE] seen: nothing more will come

    def feed(self, data: str) -> bytes | None:
        """One event's data in; the frame to send now, if any."""
        token, final = self._step(data)
        if token is None:
            return final
        return router_pb2.GenerateResponse(text=token[0], token_ids=token[1]).SerializeToString()

    def feed_batch(self, data: Iterable[str]) -> tuple[list[bytes], BackendError | None]:
        """The data of events read together in; the frames to send now, and the error
        that ended the stream among them, if one did (raise it once the frames before
        it are sent). The text and token ids of consecutive token events go out as one
        frame, as an engine's own stream interval would send them: what arrived
        together reaches the client together, at no cost in latency, and every layer
        above (the dispatcher, a gRPC write per frame) pays once for it. Tokens past the
        leg's ``max_tokens`` (an engine running on) are not merged: each goes on alone,
        so that the router's cut at ``max_tokens`` keeps the text of every token before
        it. Stops at ``[DONE]``."""
        frames: list[bytes] = []
        texts: list[str] = []  # of the frame being merged; none: no frame pending
        ids: list[int] = []
        limit = self._max_tokens
        failure: BackendError | None = None
        try:
            for one in data:
                before = self._tokens
                token, final = self._step(one)
                if token is not None:
                    if texts and limit is not None and self._tokens > limit:
                        frames.append(_token_frame(texts, ids))
                    texts.append(token[0])
                    ids.extend(token[1])
                    if limit is not None and before >= limit:  # past the limit: alone
                        frames.append(_token_frame(texts, ids))
                elif final is not None:
                    if texts:
                        frames.append(_token_frame(texts, ids))
                    frames.append(final)
                if self.done:
                    break
        except BackendError as error:
            failure = error
        if texts:
            frames.append(_token_frame(texts, ids))
        return frames, failure

    def _step(self, data: str) -> tuple[tuple[str, list[int]] | None, bytes | None]:
        """One event's data in: a token's text and ids to send, or the last frame's
        bytes once it is complete, or neither."""
        if data[:1] != "{" and data.strip() == "[DONE]":
            self.done = True
            return None, self._release_final()
        try:
            chunk = stream_object(data)
            if chunk.get("error"):
                self._raise_engine_error(chunk, data)
            if chunk.get("usage") is not None:
                self._usage = usage_message(chunk["usage"])
            token = self._content(chunk)
        except ShapeError as problem:
            raise malformed(self._backend_id, "stream chunk", problem, data) from None
        if token is not None:
            return token, None
        if self._final is not None and self._usage is not None:
            return None, self._release_final()
        return None, None

    def end(self) -> bytes | None:
        """The body ended: the held frame if the request finished, else an error."""
        return self._release_final()

    def _content(self, chunk: Mapping[str, Any]) -> tuple[str, list[int]] | None:
        choice = first_choice(chunk)
        if choice is None:
            return None
        text, token_ids = choice_content(choice)
        reason = choice_finish(choice)
        if self._final is not None:
            # Content after the finish is not expected; keep it, in order, in the last frame.
            self._final.text += text
            self._final.token_ids.extend(token_ids)
            return None
        if reason:
            self._final = router_pb2.GenerateResponse(
                text=text, token_ids=token_ids, finish_reason=finish_reason(reason)
            )
            return None
        if not text and not token_ids:
            return None  # role-only or empty keep-alive chunks
        self._tokens += len(token_ids) if token_ids else 1
        return text, token_ids

    def _release_final(self) -> bytes | None:
        if self._final_sent:
            return None
        if self._final is None:
            raise BackendError(self._backend_id, "stream ended early", retryable=True)
        if self._usage is not None:
            self._final.usage.CopyFrom(self._usage)
        self._final_sent = True
        return self._final.SerializeToString()

    def _raise_engine_error(self, chunk: Mapping[str, Any], data: str) -> None:
        error = chunk.get("error")
        if error:
            raise engine_error(
                self._backend_id, error_code(error), f"engine error: {error_text(data.encode())}"
            )


def _token_frame(texts: list[str], ids: list[int]) -> bytes:
    """One frame of the merged tokens' text and ids; empties both lists for the next."""
    frame = router_pb2.GenerateResponse(text="".join(texts), token_ids=ids).SerializeToString()
    texts.clear()
    ids.clear()
    return frame


def asked_max_tokens(body: Mapping[str, Any]) -> int | None:
    """The ``max_tokens`` a leg's body asks the engine for, when it names one."""
    value = body.get("max_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def drain_body(response: aiohttp.ClientResponse, timeout_s: float = 0.5) -> bool:
    """Reads the rest of a body the caller is done with; True once at its end.

    A stream's end marker (``data: [DONE]``) comes a moment before the end of the HTTP
    body; a response released before that end closes its connection instead of
    returning it to the pool, and the next leg pays for a new one. An engine that holds
    the body open past the marker only costs that connection: the caller closes it.
    """
    try:
        async with asyncio.timeout(timeout_s):
            while await response.content.readany():
                pass
    except (aiohttp.ClientError, TimeoutError):
        return False
    return True


async def openai_frames(
    backend_id: str,
    response: aiohttp.ClientResponse,
    *,
    max_event_bytes: int = MAX_EVENT_BYTES,
    max_tokens: int | None = None,
    merge: bool = True,
) -> AsyncGenerator[bytes, None]:
    """The frames of a streaming OpenAI-compatible answer (see :class:`OpenAIStream`):
    the token events of one read merged into one frame (:meth:`OpenAIStream.feed_batch`;
    ``max_tokens``, the leg's, bounds the merging), or with ``merge=False`` a frame per
    event, for a consumer that must tell where each token's text ends.

    After ``[DONE]`` it reads the body to its end so that the caller's ``release()``
    returns the connection to the pool. Raises ``BackendError`` for what the engine
    said or sent wrong (an event over ``max_event_bytes`` too), and lets aiohttp's
    errors through for the caller to translate.
    """
    stream = OpenAIStream(backend_id, max_tokens)
    batches = sse_batches(response.content.iter_any(), backend_id, max_event_bytes=max_event_bytes)
    async with contextlib.aclosing(batches):
        async for batch in batches:
            groups = [[event.data for event in batch]] if merge else [[e.data] for e in batch]
            for group in groups:
                frames, failure = stream.feed_batch(group)
                for frame in frames:
                    yield frame
                if failure is not None:
                    raise failure
                if stream.done:
                    break
            if stream.done:
                break
        else:
            last = stream.end()
            if last is not None:
                yield last
    if stream.done:
        await drain_body(response)


# --- Prometheus text format --------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


_METRIC_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def parse_prometheus(text: str, names: Collection[str] | None = None) -> dict[str, list[Sample]]:
    """The samples of a text-format (0.0.4) scrape, by metric name.

    With ``names``, other lines are skipped before they are parsed: engines expose hundreds
    of histogram buckets that a load probe never reads. Lines are parsed one at a time so
    that a malformed one is skipped rather than failing the whole scrape; each sample is
    filed under the name on its own line (``_total`` and ``_bucket`` included).
    """
    samples: dict[str, list[Sample]] = {}
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        match = _METRIC_NAME.match(line)
        if match is None or (names is not None and match.group() not in names):
            continue
        for sample in _line_samples(line):
            samples.setdefault(sample.name, []).append(sample)
    return samples


def _line_samples(line: str) -> list[Sample]:
    """The sample on one line, none if it is malformed."""
    try:
        families = list(text_string_to_metric_families(line))
    except ValueError:
        return []
    return [
        Sample(sample.name, sample.labels, float(sample.value))
        for family in families
        for sample in family.samples
    ]
