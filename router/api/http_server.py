"""The HTTP door: Prometheus /metrics, liveness /healthz (and its alias /health),
readiness /readyz, and the OpenAI-compatible API when one is given.

Every answer is JSON, also aiohttp's own (404, 405): OpenAI's error shape under /v1/,
the probes' elsewhere. Slow and greedy clients are bounded by the ``http_*`` settings
(:mod:`router.api.connection_guard`; kept-alive connections by aiohttp's keep-alive
timeout).

With bearer tokens configured, every request needs exactly one valid
``Authorization: Bearer <token>`` header (401 otherwise), except the probes
(/healthz, /readyz, /health) and, unless ``auth_metrics``, /metrics.

It stops like the gRPC door: no new connections, requests on kept-alive ones
refused with 503, in-flight requests (server-sent event streams too) given a
grace period, then cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from router.api.connection_guard import ConnectionGuard
from router.api.door import BearerTokens
from router.api.listen import check_can_listen, split_address
from router.api.openai_http import (
    ERROR_FIELDS,
    REQUEST_ID,
    OpenAIRoutes,
    error_response,
    retry_after_header,
)
from router.api.tls import HttpTls
from router.api.worker_metrics import WorkerMetrics
from router.errors import DEFAULT_RETRY_AFTER_S, ECHO_LIMIT, shown
from router.logging import get_logger
from router.settings import Settings, TlsFiles

log = get_logger(__name__)

# Answered while draining too: they are how an orchestrator watches the drain.
_PROBES = frozenset({"/metrics", "/healthz", "/health", "/readyz"})
# Open without a token whatever the settings: an orchestrator's probes carry none.
_OPEN = frozenset({"/healthz", "/readyz", "/health"})
# OpenAI's codes for aiohttp's own answers.
_HTTP_CODES = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}


class AdminServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Callable[[], tuple[bool, str]],
        address: str,
        openai: OpenAIRoutes | None = None,
        tls: TlsFiles | None = None,
        *,
        tls_reload_interval_s: float = 60.0,
        tokens: BearerTokens | None = None,
        auth_metrics: bool = False,
        settings: Settings | None = None,
        worker: WorkerMetrics | None = None,
    ) -> None:
        self._openai = openai
        self._worker = worker
        self._settings = settings or Settings()
        self._guard = ConnectionGuard(
            self._settings.http_header_timeout_s, self._settings.http_max_connections
        )
        self._tls = None if tls is None else HttpTls(tls)
        self._tls_reload_interval_s = tls_reload_interval_s
        self._tls_reloads: asyncio.Task[None] | None = None
        self._tokens = tokens or BearerTokens(())
        self._open = _OPEN if auth_metrics else _OPEN | {"/metrics"}
        self._registry = registry
        self._readiness = readiness
        self._address = address
        self._host, self._port = split_address(address)  # an IPv6 host without brackets
        self._runner: web.AppRunner | None = None
        self._in_flight: set[asyncio.Task[object]] = set()
        self._accepting = False
        self._grace_over = asyncio.Event()
        self._stopped: asyncio.Future[None] | None = None
        self.port = 0

    def app(self) -> web.Application:
        # Outermost first: the catch-all also sees what the drain gate and auth raise.
        app = web.Application(
            middlewares=[self._catch_all, self._drain_gate, self._authorize],
            client_max_size=self._settings.http_max_body_bytes,
        )
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/health", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        if self._openai is not None:
            self._openai.register(app)
        return app

    async def start(self) -> int:
        # handler_cancellation: a client that disconnects cancels its handler, which
        # aborts the request on the backends.
        self._runner = web.AppRunner(
            self.app(),
            # Not aiohttp's text lines: _RequestLog's structlog events, through a logger
            # aiohttp wants but the class never writes to.
            access_log=logging.getLogger("aiohttp.access"),
            access_log_class=_request_log(self._settings),
            handler_cancellation=True,
            keepalive_timeout=self._settings.http_keepalive_timeout_s,
            logger=_ServerLog(logging.getLogger("aiohttp.server"), None),
        )
        await self._runner.setup()
        context = None if self._tls is None else self._tls.context
        shared = self._worker is not None
        if not shared:  # a shared port is held by the parent, which checked it
            check_can_listen(self._address, "HTTP")  # in one line, as the gRPC door says it
        site = _GuardedSite(self._runner, self._host, self._port, self._guard,
                            ssl_context=context, reuse_port=shared)  # fmt: skip
        await site.start()
        self.port = self._runner.addresses[0][1]  # the bound port, also when 0 was asked
        self._accepting = True
        if self._tls is not None:
            self._tls_reloads = asyncio.create_task(self._reload_tls_every_interval())
        return self.port

    def reload_tls(self) -> bool:
        """Loads changed TLS files for the handshakes from now on; whether it did."""
        return self._tls is not None and self._tls.reload_if_changed()

    async def _reload_tls_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._tls_reload_interval_s)
            self.reload_tls()

    @property
    def accepting(self) -> bool:
        """Listening and taking requests: from start until ``stop`` is called."""
        return self._accepting

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stops accepting at once, lets in-flight requests run for up to ``grace_s``,
        then cancels them. As with grpc.aio's ``Server.stop``, a later call with a
        smaller grace cuts a drain in progress short.

        The socket listens until the drain is over: an orchestrator's probes, which
        open a connection each, read 503 "draining" from /readyz meanwhile, and every
        other request gets a 503 and a closed connection."""
        self._accepting = False
        if self._tls_reloads is not None:
            self._tls_reloads.cancel()
        if self._runner is None:
            return
        timer = asyncio.get_running_loop().call_later(grace_s, self._grace_over.set)
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._drain(self._runner))
        try:
            # Shielded: a caller that gives up waiting must not abandon the drain half-way.
            await asyncio.shield(self._stopped)
        finally:
            timer.cancel()

    async def _drain(self, runner: web.AppRunner) -> None:
        in_flight = set(self._in_flight)
        if in_flight:
            log.info("draining http requests", in_flight=len(in_flight))
            finished = asyncio.ensure_future(asyncio.wait(in_flight))
            grace_over = asyncio.ensure_future(self._grace_over.wait())
            await asyncio.wait({finished, grace_over}, return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            grace_over.cancel()
        if self._in_flight:
            log.info("cancelling http requests past the grace", cancelled=len(self._in_flight))
            for task in self._in_flight:
                task.cancel()
            await asyncio.wait(set(self._in_flight))
        await runner.cleanup()

    @web.middleware
    async def _drain_gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Counts requests in flight; refuses new ones once the door is stopping."""
        self._guard.request_arrived(request.transport)
        if not self._accepting and request.path not in _PROBES:
            # Retry soon: behind a load balancer the next try reaches another replica.
            response = _error(
                request, 503, "the router is shutting down", retry_after_s=DEFAULT_RETRY_AFTER_S
            )
            response.force_close()
            return response
        task = asyncio.current_task()
        if task is None:  # aiohttp runs every handler in a task; nothing to track otherwise
            return await handler(request)
        self._in_flight.add(task)
        try:
            return await handler(request)
        finally:
            self._in_flight.discard(task)

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With tokens, everything but the open paths needs exactly one valid one."""
        if not self._tokens or request.path in self._open:
            return await handler(request)
        if self._tokens.allows(request.headers.getall("Authorization", [])):
            return await handler(request)
        response = _error(
            request,
            401,
            "exactly one valid 'Authorization: Bearer <token>' header is required",
            code="invalid_api_key",
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @web.middleware
    async def _catch_all(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Anything unexpected: logged once here, a bare 500 to the client, never a trace."""
        try:
            return await handler(request)
        except web.HTTPException as error:  # aiohttp's own way to answer (404, 405, ...)
            if error.status < 400:
                raise
            return _http_error(request, error)
        except ConnectionResetError:
            raise  # the client left (or stopped reading): logged where it was seen, nothing to send
        except Exception as error:  # the edge: nothing unexpected goes out as it is
            log.error(
                "http request failed unexpectedly",
                path=request.path,
                error_type=type(error).__name__,
                exc_info=error,
            )
            if request.writer.output_size > 0 and request.transport is not None:
                # The status line is out already: all that is left is to cut the stream,
                # which the client sees as a truncated response.
                request.transport.close()
            return _error(request, 500, "internal error")

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._worker is None:
            body = generate_latest(self._registry)
        else:  # whichever worker the scrape reached answers for all of them
            body = await self._worker.metrics()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        if self._worker is None:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "ok", "worker": self._worker.index, "pid": os.getpid()})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, detail = self._readiness() if self._accepting else (False, "draining")
        return web.json_response(
            {"status": "ready" if ready else "not ready", "detail": detail},
            status=200 if ready else 503,
        )


def _error(request: web.Request, status: int, message: str, *,
           retry_after_s: float | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:  # fmt: skip
    """OpenAI's error JSON on the OpenAI routes, the probes' shape elsewhere."""
    if request.path.startswith("/v1/"):
        return error_response(
            status, message, code=code, retry_after_s=retry_after_s, headers=headers
        )
    response = web.json_response(
        {"status": "error", "detail": message},
        status=status,
        headers={**(headers or {}), **retry_after_header(retry_after_s)},
    )
    response[ERROR_FIELDS] = {"code": code, "param": None}
    return response


def _http_error(request: web.Request, error: web.HTTPException) -> web.Response:
    """aiohttp's answer (no route, a method the route has not) as JSON."""
    where = f"{shown(request.method, 16)} {shown(request.path)}"
    if error.status == 404:
        message = f"no such route: {where}"
    elif error.status == 405:
        message = f"method not allowed: {where}; allowed: {error.headers.get('Allow', '')}"
    else:
        message = error.reason
    allow = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
    response = _error(
        request, error.status, message, code=_HTTP_CODES.get(error.status), headers=allow
    )
    if error.status == 413:
        response.force_close()  # the rest of the body was not read
    return response


class _RequestLog(AbstractAccessLogger):
    """What aiohttp calls once an answer is sent: one ``http error`` line for each error
    answer the door made (info for a 4xx, warning for a 5xx), with OpenAI's error code
    and the parameter at fault. Never the body, a header but the request id, or the
    query (which may carry a key); the path and ids are cut. aiohttp's own refusals
    (a request it cannot parse) are _ServerLog's line, /readyz's 503 the daemon's
    ``readiness changed``.

    A shed request (429), common under load, is logged at the request log's sample
    rate, as the dispatcher's lines of shed requests are; every request with the
    access log on."""

    every_request = False  # the access log
    shed_sample_rate = 1.0

    @property
    def enabled(self) -> bool:
        return True  # error answers are logged whatever the access-log setting

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        error = response.get(ERROR_FIELDS)
        if error is None and not self.every_request:
            return
        if response.status == 429 and not (self.every_request or self._shed_sampled()):
            return
        request_id = request.get(REQUEST_ID) or request.headers.get("X-Request-Id")
        fields: dict[str, Any] = {
            "method": _cut(request.method, 16),
            "path": _cut(request.path, 256),
            "status": response.status,
            "duration_s": round(time, 6),
            "bytes": response.body_length,
            "client": request.remote,
        }
        if request_id:
            fields["request_id"] = _cut(request_id, ECHO_LIMIT)
        if error is None:
            log.info("http request", **fields)
        elif response.status >= 500:
            log.warning("http error", **fields, **error)
        else:
            log.info("http error", **fields, **error)

    def _shed_sampled(self) -> bool:
        rate = self.shed_sample_rate
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)  # sampling, not security


def _request_log(settings: Settings) -> type[_RequestLog]:
    """The request log as the settings have it: with ``http_access_log``, a line for
    every request (``http request`` unless an error's)."""

    class Configured(_RequestLog):
        every_request = settings.http_access_log
        shed_sample_rate = settings.request_log_sample_rate

    return Configured


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's per-connection logger. A request it cannot parse (a bad header byte, a
    broken request line, a method that is no HTTP token) is the client's fault: one line
    at info, never a traceback a client could fill the log with; anything else is
    logged as aiohttp logs it."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if not _malformed(exc_info, args):
            super().exception(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg: object, *args: object, exc_info: Any = None, **kwargs: Any) -> None:
        # aiohttp logs a first request with a bad method (TLS to a plain port) at debug.
        if not _malformed(exc_info, args):
            super().debug(msg, *args, exc_info=exc_info, **kwargs)


def _malformed(error: object, args: tuple[object, ...]) -> bool:
    """Logs a refusal of aiohttp's parser as one line; whether ``error`` was one.
    aiohttp's message has the client's address as its one argument."""
    if not (isinstance(error, HttpProcessingError) and 400 <= error.code < 500):
        return False
    reason = error.message.strip().splitlines()
    log.info(
        "malformed http request",
        status=error.code,
        reason=shown(reason[0] if reason else ""),
        client=str(args[0]) if args else None,
    )
    return True


class _GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with each connection's protocol guarded (ConnectionGuard)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard,
                 *, ssl_context: ssl.SSLContext | None,
                 reuse_port: bool = False) -> None:  # fmt: skip
        super().__init__(runner, ssl_context=ssl_context)
        self._reuse_port = reuse_port
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        if server is None:  # BaseSite refuses a runner not set up; this keeps mypy told
            raise RuntimeError("the runner is not set up")
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.wrap(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_port=self._reuse_port or None,
        )
