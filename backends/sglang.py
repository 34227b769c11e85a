"""The adapter for SGLang engines: colocated, or one leg of a prefill/decode split.

SGLang's PD protocol (engines started with ``--disaggregation-mode prefill|decode``)
is concurrent: the router sends one body to both engines at the same time, with
``bootstrap_host`` and ``bootstrap_port`` (where the decode engine finds the prefill
engine's bootstrap server, ``--disaggregation-bootstrap-port``, 8998 by default) and a
random ``bootstrap_room`` in [0, 2**63 - 1] that pairs the two requests. The KV cache
then moves engine to engine and the decode engine streams the whole answer, first
token included. The prefill reply matters only for ``return_logprob``, which the
router never asks for, but it is drained: it is where a prefill failure shows.
(Checked against sglang's ``disaggregation/mini_lb.py``, ``server_args.py``,
``entrypoints/http_server.py``, ``entrypoints/openai/protocol.py`` and
``metrics/collector.py``.)

Mapping the concurrent protocol onto the sequential ABC
-------------------------------------------------------
``prefill()`` picks the room, starts the prefill POST in a background task and returns
at once: an empty first frame and a handle whose ``transport_params`` carry the bootstrap
fields, the ``rid``, the path and the body. Waiting for the prefill reply would cost a
round trip of TTFT, and could not work anyway: the prefill engine answers only after the
decode engine has joined the room. ``decode()`` POSTs the identical body to its engine
and streams it. The prefill leg is bounded by the prefill deadline, the decode leg by
the decode deadline.

How a prefill failure reaches the decode stream
-----------------------------------------------
Both adapters run in the router's one process, so the prefill leg is registered in a
process-wide table keyed by bootstrap room (``_ROOMS``). ``decode()`` looks its room up:
if the leg has failed already, nothing is sent to the decode engine; otherwise it
watches the leg, and a failure (non-2xx, an error event, an ``abort`` finish, a broken
connection, the prefill deadline) interrupts the decode exchange at once. ``decode()``
then raises the prefill's error, and the decode engine frees the slot it would
otherwise hold for its 300 s bootstrap timeout (the connection closes and
``POST /abort_request`` follows). The other way round, a decode leg that ends without
finishing (engine error, client gone) cancels the prefill leg through the same table,
so a prefill engine is never left waiting in its bootstrap queue for a decode that will
not come. A leg that succeeds leaves the table at once; a failed (or aborted) one when
its decode leg has seen the failure, when its adapter closes, or after
``_FAILED_LEG_TTL_S``. Once the decode engine has sent its first event it holds the KV
cache, so from then on the decode leg stops watching: a prefill reply that breaks off
late does not cost a healthy stream.

Aborts: every leg carries ``rid`` = request id, ``-``, 16 hex digits (the room, or a
random nonce for colocated requests). It is unique per request and engine, and fixed
width because SGLang's scheduler matches abort rids by prefix.

What the engine answers is type-checked field by field (a malformed event is a retryable
``BackendError`` quoting it) and size-capped (``MAX_EVENT_BYTES`` an event with
``incremental_output``, ``MAX_PAGE_BYTES`` without it, since each event then repeats the
whole output; see :mod:`backends.http_common`). The adapter does not resume streams
(``Capabilities.resume`` is false): ``/generate`` takes ``input_ids``, but building
them for a chat needs the engine's template applied as its chat endpoint applies it.

Options: ``bootstrap_port`` (8998), ``bootstrap_host`` (default: this backend's host),
``model`` (name sent on the OpenAI paths; default the request's), ``api`` (``native``:
prompts go to ``/generate``; ``openai``: to ``/v1/completions``; chat requests always go
to ``/v1/chat/completions``), ``incremental_output`` (set when the engine runs with
``--incremental-streaming-output``), ``api_key_env`` or ``api_key_file`` (the engine's
``--api-key``), ``health_path`` (``/health``), ``max_connections`` (1024),
``connect_timeout_s`` (5), ``idle_timeout_s`` (none), ``abort_timeout_s`` (2).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import (
    Backend,
    BackendLoad,
    Capabilities,
    GenerationRequest,
    HandoffMode,
    HealthStatus,
    KVHandle,
    PrefillResult,
    Role,
)
from backends.errors import BackendError, BackendRejectedError
from backends.http_common import (
    MAX_EVENT_BYTES,
    MAX_PAGE_BYTES,
    ExchangeAborted,
    OpenAIStream,
    OpenExchanges,
    Secret,
    ShapeError,
    client_timeout,
    drain_body,
    engine_error,
    error_code,
    error_text,
    field_count,
    field_ids,
    field_list,
    field_object,
    field_text,
    finish_reason,
    iter_sse,
    json_object,
    malformed,
    malformed_detail,
    message_text,
    new_session,
    parse_prometheus,
    read_api_key,
    read_body,
    reject_inline_key,
    status_error,
    transport_error,
)
from backends.openai import openai_body
from backends.tls import client_tls

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

DEFAULT_BOOTSTRAP_PORT = 8998  # sglang ServerArgs.disaggregation_bootstrap_port

# How much of an engine's reason for aborting a prefill an error quotes.
_MAX_REASON_CHARS = 500

# How long a failed prefill leg waits for its decode leg to notice before it is forgotten.
_FAILED_LEG_TTL_S = 60.0

_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)

# sglang/srt/metrics/collector.py. Gauges carry one series per scheduler (DP rank), so
# each is summed. The PD queues hold requests that wait for a bootstrap, a KV transfer
# or memory: as good as waiting for the scheduler's purposes.
_RUNNING = ("sglang:num_running_reqs",)
_WAITING = (
    "sglang:num_queue_reqs",
    "sglang:num_prefill_prealloc_queue_reqs",
    "sglang:num_decode_prealloc_queue_reqs",
    "sglang:num_decode_transfer_queue_reqs",
)
_KV_USED = "sglang:num_used_tokens"
_KV_CAPACITY = "sglang:max_total_num_tokens"  # newer builds only
_KV_USAGE = "sglang:token_usage"  # used / capacity, every build
_METRICS = frozenset({*_RUNNING, *_WAITING, _KV_USED, _KV_CAPACITY, _KV_USAGE})


@dataclass(frozen=True)
class _Send:
    """What one leg sends: both legs of a split send the same path and body."""

    request_id: str
    rid: str
    path: str
    body: Mapping[str, Any]
    headers: Mapping[str, str]  # the W3C trace context, when the request has one


class _PrefillLeg:
    """A prefill leg in flight, found by its bootstrap room from whichever adapter decodes it."""

    def __init__(self, room: int, backend_id: str, owner: object) -> None:
        self.room = room
        self.backend_id = backend_id
        self.owner = owner  # the adapter that started it, which forgets it on close
        self.failure: BackendError | None = None
        self.task: asyncio.Task[None] | None = None
        self._watchers: list[Callable[[], None]] = []

    def watch(self, interrupt: Callable[[], None]) -> None:
        self._watchers.append(interrupt)

    def unwatch(self, interrupt: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._watchers.remove(interrupt)

    def succeed(self) -> None:
        self.forget()

    def fail(self, error: BackendError) -> None:
        if self.failure is not None:
            return
        self.failure = error
        watchers, self._watchers = self._watchers, []
        for interrupt in watchers:
            interrupt()
        asyncio.get_running_loop().call_later(_FAILED_LEG_TTL_S, self.forget)

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def forget(self) -> None:
        if _ROOMS.get(self.room) is self:
            del _ROOMS[self.room]


# Prefill legs by bootstrap room, for the whole process: see the module docstring.
_ROOMS: dict[int, _PrefillLeg] = {}


def _new_room() -> int:
    while True:
        room = secrets.randbits(63)  # [0, 2**63 - 1], as SGLang's own router draws it
        if room not in _ROOMS:
            return room


def _url_host(host: str) -> str:
    """A host as it appears in a URL or a bootstrap address: IPv6 in brackets."""
    host = host.strip("[]")
    return f"[{host}]" if ":" in host else host


class SglangBackend(Backend):
    """An SGLang engine: a prefill or decode engine of a PD pair, or a colocated one."""

    def __init__(
        self, backend_id: str, address: str, options: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(backend_id, address, options)
        reject_inline_key(self.options)
        host, _, port = address.rpartition(":")
        self._http_address = f"{_url_host(host)}:{port}"
        self._bootstrap_host = _url_host(str(self.options.get("bootstrap_host") or host))
        self._bootstrap_port = int(self.options.get("bootstrap_port", DEFAULT_BOOTSTRAP_PORT))
        if not 0 < self._bootstrap_port < 65536:
            raise ValueError(f"bootstrap_port {self._bootstrap_port} is not a port")
        self._api = str(self.options.get("api", "native"))
        if self._api not in ("native", "openai"):
            raise ValueError(f"api must be 'native' or 'openai', got {self._api!r}")
        self._model = str(self.options["model"]) if self.options.get("model") else None
        self._incremental = bool(self.options.get("incremental_output", False))
        # Without incremental output every event repeats the whole output so far.
        self._max_event_bytes = MAX_EVENT_BYTES if self._incremental else MAX_PAGE_BYTES
        self._health_path = str(self.options.get("health_path", "/health"))
        self._max_connections = int(self.options.get("max_connections", 1024))
        self._connect_timeout_s = float(self.options.get("connect_timeout_s", 5.0))
        idle = self.options.get("idle_timeout_s")
        self._idle_timeout_s = float(idle) if idle is not None else None
        self._abort_timeout_s = float(self.options.get("abort_timeout_s", 2.0))
        self._key = Secret(read_api_key(self.options))
        self._tls = client_tls(self.options)  # files read now, like the key
        self._session: aiohttp.ClientSession | None = None
        self._exchanges = OpenExchanges()  # closes streams and cancels prefill legs on abort
        self._rids: dict[str, set[str]] = {}  # request id -> rids still live on this engine
        self._legs: set[asyncio.Task[None]] = set()  # prefill legs started here
        self._background: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"SglangBackend(id={self.id!r}, address={self.address!r})"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            roles=frozenset({Role.PREFILL, Role.DECODE, Role.BOTH}),
            handoff_modes=frozenset({HandoffMode.CONCURRENT}),
        )

    async def start(self) -> None:
        self._session = new_session(
            self._http_address,
            api_key=self._key.reveal(),
            max_connections=self._max_connections,
            tls=self._tls,
        )

    async def close(self) -> None:
        self._exchanges.abort_all()
        await asyncio.gather(*self._legs, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        for leg in list(_ROOMS.values()):
            if leg.owner is self:
                leg.forget()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check_health(self, timeout_s: float) -> HealthStatus:
        """``GET /health``: 200 once the engine has started and until it shuts down.

        SGLang's ``/health`` also runs a one-token generation unless the engine runs with
        ``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0``; that probe polls once a second,
        so give the health checker a timeout above 1 s or turn the probe off.
        """
        session = self._require_session()
        try:
            async with session.get(
                self._health_path, timeout=client_timeout(timeout_s, self._connect_timeout_s)
            ) as response:
                if response.status != 200:
                    return HealthStatus(serving=False, detail=f"HTTP {response.status}")
        except _TRANSPORT_ERRORS as error:
            detail = transport_error(self.id, error, timeout_s, self._tls).message
            return HealthStatus(
                serving=False,
                detail=self._key.clean(detail),
                timed_out=isinstance(error, TimeoutError),
            )
        return HealthStatus(serving=True)

    async def load(self, timeout_s: float) -> BackendLoad:
        """From ``/metrics``, which SGLang serves only with ``--enable-metrics``."""
        session = self._require_session()
        try:
            async with session.get(
                "/metrics", timeout=client_timeout(timeout_s, self._connect_timeout_s)
            ) as response:
                if response.status != 200:
                    error = status_error(
                        self.id, response.status, await response.content.read(4096)
                    )
                    raise self._key.scrub(error)
                body = await read_body(self.id, response, MAX_PAGE_BYTES, "metrics page")
        except _TRANSPORT_ERRORS as error:
            raise transport_error(self.id, error, timeout_s) from None
        return metrics_load(body.decode("utf-8", errors="replace"))

    async def prefill(self, request: GenerationRequest, timeout_s: float) -> PrefillResult:
        """Starts the prefill leg and returns before it answers; see the module docstring."""
        self._require_session()
        room = _new_room()
        rid = f"{request.request_id}-{room:016x}"
        path, body = self._body(request, rid)
        body.update(
            bootstrap_host=self._bootstrap_host,
            bootstrap_port=self._bootstrap_port,
            bootstrap_room=room,
        )
        send = _Send(request.request_id, rid, path, body, request.trace_headers())
        leg = _PrefillLeg(room, self.id, self)
        _ROOMS[room] = leg
        self._rids.setdefault(request.request_id, set()).add(rid)
        leg.task = asyncio.create_task(
            self._run_prefill_leg(send, leg, timeout_s), name=f"sglang-prefill-{rid}"
        )
        self._legs.add(leg.task)
        # Abortable from now on, not from the task's first step: an abort that came before
        # it would otherwise miss the leg, which would then wait for a decode leg that
        # never comes.
        tracking = contextlib.ExitStack()
        tracking.enter_context(self._exchanges.track(request.request_id, leg.cancel))
        leg.task.add_done_callback(functools.partial(self._prefill_leg_done, send, leg, tracking))
        handle = KVHandle(
            backend_id=self.id,
            request_id=request.request_id,
            address=self.address,
            transport_params={
                "bootstrap_host": self._bootstrap_host,
                "bootstrap_port": self._bootstrap_port,
                "bootstrap_room": room,  # also the key of the leg in _ROOMS
                "rid": rid,
                "path": path,
                "body": body,
            },
        )
        return PrefillResult(
            first_frame=b"",
            first_token_id=-1,
            prompt_tokens=request.prompt_tokens,
            finished=False,
            handle=handle,
        )

    async def decode(
        self, request: GenerationRequest, handle: KVHandle, first_token_id: int, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        """Sends the prefill leg's body to this engine and streams every frame, the first too."""
        params = handle.transport_params
        try:
            room = int(params["bootstrap_room"])
            rid = str(params["rid"])
            path = str(params["path"])
            body: Mapping[str, Any] = params["body"]
        except (KeyError, TypeError, ValueError):
            raise BackendError(
                self.id, "the handle carries no SGLang bootstrap room", retryable=False
            ) from None
        leg = _ROOMS.get(room)
        if leg is not None and leg.failure is not None:
            leg.forget()
            raise _prefill_failed(leg)  # nothing was sent: no decode slot to free
        async for frame in self._stream(
            _Send(request.request_id, rid, path, body, request.trace_headers()), timeout_s, leg
        ):
            yield frame

    async def generate(
        self, request: GenerationRequest, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        """A whole request on an engine that runs without ``--disaggregation-mode``."""
        rid = f"{request.request_id}-{secrets.randbits(64):016x}"
        path, body = self._body(request, rid)
        async for frame in self._stream(
            _Send(request.request_id, rid, path, body, request.trace_headers()), timeout_s, None
        ):
            yield frame

    async def abort(self, request_id: str, timeout_s: float) -> None:
        """Stops both legs this adapter knows of: closes them and asks the engine to abort.

        Closing alone is not enough: SGLang notices a closed connection only at its next
        poll, and a request still in its bootstrap queue not at all.
        """
        rids = self._rids.pop(request_id, set())
        self._exchanges.abort(request_id)
        await asyncio.gather(*(self._post_abort(rid, timeout_s) for rid in rids))

    # --- legs ---------------------------------------------------------------------------

    async def _run_prefill_leg(self, send: _Send, leg: _PrefillLeg, timeout_s: float) -> None:
        """Sends the prefill leg and drains its reply. A failure ends in ``leg.fail``; so does a
        cancellation, in ``_prefill_leg_done``, which also sees a task cancelled before it ran."""
        session = self._require_session()
        timeout = client_timeout(timeout_s, self._connect_timeout_s)
        try:
            async with session.post(
                send.path, json=send.body, headers=send.headers, timeout=timeout
            ) as response:
                if response.status >= 300:
                    raw = await response.content.read(4096)
                    raise status_error(self.id, response.status, raw)
                events = iter_sse(response.content.iter_any(), self.id)
                async with contextlib.aclosing(events):
                    async for event in events:
                        problem = prefill_problem(event.data)
                        if problem is not None:
                            raise BackendError(self.id, problem, retryable=True)
        except BackendError as error:
            self._fail_leg(leg, send, self._key.scrub(error))
        except _TRANSPORT_ERRORS as error:
            self._fail_leg(leg, send, transport_error(self.id, error, timeout_s))
        else:
            self._forget_rid(send.request_id, send.rid)
            leg.succeed()

    def _prefill_leg_done(
        self,
        send: _Send,
        leg: _PrefillLeg,
        tracking: contextlib.ExitStack,
        task: asyncio.Task[None],
    ) -> None:
        tracking.close()
        self._legs.discard(task)
        if task.cancelled():
            if self._forget_rid(send.request_id, send.rid):
                self._abort_later(send.rid)
            leg.fail(BackendError(self.id, "prefill leg cancelled", retryable=True))

    def _fail_leg(self, leg: _PrefillLeg, send: _Send, error: BackendError) -> None:
        log.warning(
            "sglang prefill leg failed",
            backend=self.id,
            request=send.request_id,
            bootstrap_room=leg.room,
            error=error.message,
        )
        if self._forget_rid(send.request_id, send.rid):
            self._abort_later(send.rid)  # after a timeout the engine may still hold the request
        leg.fail(error)

    async def _stream(
        self, send: _Send, timeout_s: float, leg: _PrefillLeg | None
    ) -> AsyncGenerator[bytes, None]:
        """Streams one leg; interrupted at once if the prefill leg it depends on fails first."""
        decoder: NativeStream | OpenAIStream = (
            NativeStream(self.id, self._incremental)
            if send.path == "/generate"
            else OpenAIStream(self.id)
        )
        self._rids.setdefault(send.request_id, set()).add(send.rid)

        def interrupt() -> None:
            self._exchanges.abort(send.request_id)

        # No await between watching the leg and the exchange becoming interruptible (in
        # _open), so a prefill failure cannot slip in unnoticed between the two.
        watched = leg
        if watched is not None:
            watched.watch(interrupt)
        finished = False
        try:
            async with (
                self._open(send, timeout_s) as response,
                contextlib.aclosing(
                    iter_sse(
                        response.content.iter_any(), self.id, max_event_bytes=self._max_event_bytes
                    )
                ) as events,
            ):
                async for event in events:
                    if watched is not None:
                        # The decode engine answers only once it holds the KV cache: from
                        # here on the prefill reply no longer matters, even if it fails.
                        watched.unwatch(interrupt)
                        watched = None
                    frame = decoder.feed(event.data)
                    if frame is not None:
                        yield frame
                    if decoder.done:
                        break
                frame = decoder.end()
                if frame is not None:
                    yield frame
                if decoder.done:
                    await drain_body(response)  # so that the connection goes back to the pool
            finished = True
        except (ExchangeAborted, BackendError, *_TRANSPORT_ERRORS) as error:
            raise self._leg_error(error, watched, timeout_s) from None
        finally:
            if watched is not None:
                watched.unwatch(interrupt)
            if self._forget_rid(send.request_id, send.rid) and not finished:
                self._abort_later(send.rid)
            if not finished and leg is not None:
                leg.cancel()  # a prefill for a decode that will not read it only strands KV

    @contextlib.asynccontextmanager
    async def _open(self, send: _Send, timeout_s: float) -> AsyncIterator[aiohttp.ClientResponse]:
        """The 2xx streaming response of one leg, closed on exit and on abort."""
        session = self._require_session()
        timeout = client_timeout(timeout_s, self._connect_timeout_s, self._idle_timeout_s)
        request = session.post(send.path, json=send.body, headers=send.headers, timeout=timeout)
        response = await self._exchanges.run(send.request_id, _response_of(request), discard=_close)
        with self._exchanges.track(send.request_id, response.close):
            try:
                if response.status >= 300:
                    raw = await response.content.read(4096)
                    raise status_error(self.id, response.status, raw)
                yield response
            except BaseException:
                response.close()  # SGLang aborts a request whose connection closes
                raise
            else:
                response.release()

    def _leg_error(
        self, error: BaseException, leg: _PrefillLeg | None, timeout_s: float
    ) -> BackendError:
        """What the router sees when a streamed leg fails: the prefill's failure comes first,
        since a closed decode exchange is then only its consequence."""
        if leg is not None and leg.failure is not None:
            leg.forget()
            return _prefill_failed(leg)
        if isinstance(error, ExchangeAborted):
            return BackendError(self.id, "aborted", retryable=False)
        if isinstance(error, BackendError):
            return self._key.scrub(error)
        return transport_error(self.id, error, timeout_s)

    # --- aborts -------------------------------------------------------------------------

    def _forget_rid(self, request_id: str, rid: str) -> bool:
        """Drops a finished leg's rid; False if ``abort`` already took it (and posts it)."""
        rids = self._rids.get(request_id)
        if rids is None or rid not in rids:
            return False
        rids.discard(rid)
        if not rids:
            del self._rids[request_id]
        return True

    def _abort_later(self, rid: str) -> None:
        if self._session is None or self._session.closed:
            return
        task = asyncio.create_task(self._post_abort(rid, self._abort_timeout_s))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _post_abort(self, rid: str, timeout_s: float) -> None:
        """Best effort: an unknown rid is a no-op for SGLang, and the engine's own timeouts
        are the backstop if this fails."""
        session = self._session
        if session is None or session.closed:
            return
        try:
            async with session.post(
                "/abort_request",
                json={"rid": rid},
                timeout=client_timeout(timeout_s, self._connect_timeout_s),
            ) as response:
                if response.status >= 300:
                    log.warning(
                        "sglang abort refused", backend=self.id, rid=rid, status=response.status
                    )
        except _TRANSPORT_ERRORS as error:
            log.warning("sglang abort failed", backend=self.id, rid=rid, error=type(error).__name__)

    # --- bodies -------------------------------------------------------------------------

    def _body(self, request: GenerationRequest, rid: str) -> tuple[str, dict[str, Any]]:
        """The path and streaming body of a request; both legs of a split send these as they are."""
        if request.messages or self._api == "openai":
            path, body = openai_body(request, self._model or request.model)
            path = f"/v1{path}"
        else:
            sampling = request.sampling
            params: dict[str, Any] = {
                "max_new_tokens": sampling.max_tokens,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "sampling_seed": sampling.seed,
            }
            if sampling.stop:
                params["stop"] = list(sampling.stop)
            path, body = (
                "/generate",
                {"text": request.prompt, "sampling_params": params, "stream": True},
            )
        body["rid"] = rid
        return path, body

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise BackendError(self.id, "adapter not started", retryable=True)
        return self._session


class NativeStream:
    """Frames from SGLang's native ``/generate`` stream.

    Each event carries ``text``, ``output_ids`` and ``meta_info`` (``finish_reason`` a dict
    whose ``type`` is ``stop``, ``length`` or ``abort``; token counts). Unless the engine
    runs with ``--incremental-streaming-output``, text and ids are the whole output so far,
    so the new part is what follows what was already seen. Ids that arrive without text
    (a character still incomplete) wait for the next frame with text.
    """

    def __init__(self, backend_id: str, incremental: bool) -> None:
        self._backend_id = backend_id
        self._incremental = incremental
        self._text_seen = 0
        self._ids_seen = 0
        self._pending_ids: list[int] = []
        self._finished = False
        self.done = False

    def feed(self, data: str) -> bytes | None:
        if data.strip() == "[DONE]":
            self.done = True
            return None
        try:
            return self._frame(_parse_event(self._backend_id, data))
        except ShapeError as problem:
            raise malformed(self._backend_id, "stream event", problem, data) from None

    def _frame(self, chunk: Mapping[str, Any]) -> bytes | None:
        if self._finished:
            return None
        text = field_text(chunk.get("text"), "text")
        ids = field_ids(chunk.get("output_ids"), "output_ids")
        if not self._incremental:
            text, self._text_seen = text[self._text_seen :], max(self._text_seen, len(text))
            ids, self._ids_seen = ids[self._ids_seen :], max(self._ids_seen, len(ids))
        self._pending_ids.extend(ids)
        meta = field_object(chunk.get("meta_info"), "meta_info") or {}
        reason = _finish_type(meta.get("finish_reason"))
        if reason is None and not text:
            return None
        frame = router_pb2.GenerateResponse(text=text, token_ids=self._pending_ids)
        self._pending_ids = []
        if reason is not None:
            self._finished = True
            frame.finish_reason = finish_reason(reason)
            frame.usage.prompt_tokens = field_count(meta.get("prompt_tokens"), "prompt_tokens")
            frame.usage.completion_tokens = field_count(
                meta.get("completion_tokens"), "completion_tokens"
            )
        return frame.SerializeToString()

    def end(self) -> bytes | None:
        if not self._finished:
            raise BackendError(self._backend_id, "stream ended early", retryable=True)
        return None


def metrics_load(page: str) -> BackendLoad:
    """The load a ``/metrics`` page shows. A sample that is not a finite number >= 0 (``NaN``,
    ``+Inf``, a negative gauge) counts as absent, and so does a figure that sums to no finite
    number."""
    samples = {
        name: [s for s in found if math.isfinite(s.value) and s.value >= 0]
        for name, found in parse_prometheus(page, _METRICS).items()
    }

    def total(*names: str) -> float:
        value = sum(sample.value for name in names for sample in samples.get(name, ()))
        return value if math.isfinite(value) else 0.0

    used = total(_KV_USED)
    capacity = total(_KV_CAPACITY)
    if not capacity:
        # Older builds export only the ratio: each scheduler's capacity is its used
        # tokens over its usage, matched series by series (one per DP rank).
        used_by_series = {
            frozenset(sample.labels.items()): sample.value for sample in samples.get(_KV_USED, ())
        }
        capacity = sum(
            used_by_series.get(frozenset(sample.labels.items()), 0.0) / sample.value
            for sample in samples.get(_KV_USAGE, ())
            if sample.value > 0
        )
        capacity = capacity if math.isfinite(capacity) else 0.0
    return BackendLoad(
        waiting=int(total(*_WAITING)),
        running=int(total(*_RUNNING)),
        kv_tokens_used=int(used),
        kv_tokens_capacity=round(capacity),
    )


def _finish_type(reason: Any) -> str | None:
    """``{"type": "stop", "matched": ...}`` in current builds, a bare string in old ones;
    ShapeError for anything else."""
    if isinstance(reason, Mapping):
        kind = field_text(reason.get("type"), "finish_reason.type")
        return kind or None
    return field_text(reason, "finish_reason") or None


def _parse_event(backend_id: str, data: str) -> dict[str, Any]:
    """One event as a dict; an ``{"error": ...}`` event (SGLang's failure after the 200)
    raises; ShapeError for an event that is not a JSON object."""
    chunk = json_object(data)
    error = chunk.get("error")
    if error:
        status = error_code(error)
        raise engine_error(backend_id, status, f"engine error: {error_text(data.encode())}")
    return chunk


def prefill_problem(data: str) -> str | None:
    """Why a prefill reply event means the prefill failed, if it does.

    A prefill engine ends a good request with finish ``length`` (its one token); an
    error event, an ``abort`` finish or an event of the wrong shape means no KV cache
    will reach the decode engine.
    """
    if data.strip() == "[DONE]":
        return None
    try:
        chunk = json_object(data)
        if chunk.get("error"):
            return f"engine error: {error_text(data.encode())}"
        meta = field_object(chunk.get("meta_info"), "meta_info") or {}
        reason = meta.get("finish_reason")
        if _finish_type(reason) == "abort":
            message = reason.get("message") if isinstance(reason, Mapping) else None
            if not isinstance(message, str) or not message:
                return "prefill aborted: no reason given"
            return f"prefill aborted: {message_text(message[:_MAX_REASON_CHARS])}"
        for index, choice in enumerate(field_list(chunk.get("choices"), "choices")):
            fields = field_object(choice, f"choices[{index}]") or {}
            if field_text(fields.get("finish_reason"), "finish_reason") == "abort":
                return "prefill aborted"
    except ShapeError as problem:
        return malformed_detail("prefill event", problem, data)
    return None


def _prefill_failed(leg: _PrefillLeg) -> BackendError:
    """The decode side's error when its prefill leg failed: charged to the prefill backend."""
    failure = leg.failure
    if failure is None:
        raise RuntimeError(f"backend {leg.backend_id}: the prefill leg has not failed")
    detail = failure.message.removeprefix(f"backend {leg.backend_id}: ")
    message = f"prefill leg failed, decode leg aborted: {detail}"
    if isinstance(failure, BackendRejectedError):  # the request's fault, on either engine
        return BackendRejectedError(leg.backend_id, message)
    return BackendError(leg.backend_id, message, retryable=failure.retryable)


async def _response_of(request: Any) -> aiohttp.ClientResponse:
    """Awaits aiohttp's request context manager (awaitable, but not a coroutine)."""
    response: aiohttp.ClientResponse = await request
    return response


def _close(response: aiohttp.ClientResponse) -> None:
    response.close()
