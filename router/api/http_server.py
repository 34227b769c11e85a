"""The HTTP door: Prometheus /metrics, liveness /healthz, readiness /readyz, and the
OpenAI-compatible API when one is given."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from router.api.openai_http import OpenAIRoutes, error_response
from router.errors import ConfigError
from router.logging import get_logger

log = get_logger(__name__)


class AdminServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Callable[[], tuple[bool, str]],
        address: str,
        openai: OpenAIRoutes | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self._openai = openai
        self._ssl_context = _ssl_context(tls)
        self._registry = registry
        self._readiness = readiness
        self._host, _, port = address.rpartition(":")
        self._port = int(port)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._catch_all])  # outermost: sees auth's errors too
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        if self._openai is not None:
            self._openai.register(app)
        return app

    async def start(self) -> int:
        # handler_cancellation: a client that disconnects cancels its handler, which
        # aborts the request on the backends.
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl_context)
        await site.start()
        server = site._server  # the bound socket tells the port when 0 was asked
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _catch_all(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Anything unexpected: logged once here, a bare 500 to the client, never a trace."""
        try:
            return await handler(request)
        except web.HTTPException:
            raise  # aiohttp's own way to answer (404, 405, ...)
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
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, detail = self._readiness()
        return web.json_response(
            {"status": "ready" if ready else "not ready", "detail": detail},
            status=200 if ready else 503,
        )


def _error(request: web.Request, status: int, message: str) -> web.Response:
    """OpenAI's error JSON on the OpenAI routes, the probes' shape elsewhere."""
    if request.path.startswith("/v1/"):
        return error_response(status, message)
    return web.json_response({"status": "error", "detail": message}, status=status)


def _ssl_context(tls: tuple[Path, Path] | None) -> ssl.SSLContext | None:
    if tls is None:
        return None
    cert_file, key_file = tls
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
    except OSError as error:  # ssl.SSLError is one too
        raise ConfigError(f"cannot load TLS pair {cert_file}, {key_file}: {error}") from error
    return context
