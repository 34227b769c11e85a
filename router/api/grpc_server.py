"""The gRPC front door: hetero.router.v1.Router, health checking and reflection.

Both methods are registered with an identity request deserializer: the handler
parses the bytes itself, so a request that is not a valid message is INVALID_ARGUMENT
with a reason, not UNKNOWN. Generate's response serializer is the identity too: the
handler writes frames as the backends encoded them, and grpc sends those bytes as they
are. Each write waits on the reader's flow-control window; one that waits longer than
``write_stall_timeout_s`` cancels the call (CANCELLED) and aborts its backends.

Every error carries a ``google.rpc.Status`` in ``grpc-status-details-bin``: with a
``BadRequest`` field violation when one field is at fault, and a ``RetryInfo`` when a
retry can fix it.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc.error_details_pb2 import BadRequest, RetryInfo
from google.rpc.status_pb2 import Status
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from backends._gen.hetero.router.v1 import router_pb2
from backends.errors import ServingError
from router.api import reflection
from router.api.door import BearerTokens, grpc_peer_client, through_the_door, token_client
from router.api.listen import check_can_listen
from router.api.tls import grpc_credentials
from router.api.trace_context import TraceContext, trace_context
from router.api.validation import (
    GRPC_FIELD_NAMES,
    parse_request,
    validate_generate,
    validate_service,
)
from router.api.write_stall import StallGuard, WriteStalledError
from router.client import ROUTER_SERVICE
from router.dispatch.dispatcher import Dispatcher
from router.errors import ECHO_LIMIT, InvalidRequestError, retry_hint_s
from router.logging import bind_request, get_logger, unbind_request
from router.pool.registry import Pool
from router.scheduling.snapshot import BackendView
from router.settings import Settings, TlsFiles

log = get_logger(__name__)

SERVER_OPTIONS = (("grpc.so_reuseport", 0),)
# A worker's door shares its port with its siblings (and its parent's hold on it).
SHARED_PORT_OPTIONS = (("grpc.so_reuseport", 1),)
# The health name for liveness probes: SERVING from listening until the drain begins,
# whatever the backends do ("" and the Router service follow readiness instead, and a
# liveness probe on them would restart every router while its backends are down).
LIVENESS_SERVICE = "liveness"

_ROLES = {
    "prefill": router_pb2.BACKEND_ROLE_PREFILL,
    "decode": router_pb2.BACKEND_ROLE_DECODE,
    "both": router_pb2.BACKEND_ROLE_BOTH,
}
# A call with less time left than this when it arrives cannot be served: it is refused
# DEADLINE_EXCEEDED before admission, and no backend hears of it.
MIN_TIME_LEFT_S = 0.001
# Longer error messages are cut: the message travels in a header (twice, with its
# details), and grpc clients refuse headers of more than 8 KiB.
_MAX_MESSAGE_CHARS = 1024


class RouterService:
    def __init__(self, settings: Settings, pool: Pool, dispatcher: Dispatcher) -> None:
        self._settings = settings
        self._pool = pool
        self._dispatcher = dispatcher
        self._tokens = BearerTokens(settings.auth_tokens())

    async def _authorize(self, context: grpc.aio.ServicerContext, method: str) -> None:
        if self._tokens and not self._tokens.allows(authorization(context.invocation_metadata())):
            await _refuse_unauthenticated(context, method)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            ROUTER_SERVICE,
            {
                "Generate": grpc.unary_stream_rpc_method_handler(
                    self.generate,
                    request_deserializer=None,  # parsed by the handler
                    response_serializer=None,  # frames are already encoded
                ),
                "ListBackends": grpc.unary_unary_rpc_method_handler(
                    self.list_backends,
                    request_deserializer=None,  # parsed by the handler
                    response_serializer=router_pb2.ListBackendsResponse.SerializeToString,
                ),
            },
        )

    async def generate(self, data: bytes, context: grpc.aio.ServicerContext) -> None:
        await self._authorize(context, "Generate")
        message: router_pb2.GenerateRequest | None = None
        try:
            message = parse_request(router_pb2.GenerateRequest, data)
            request, disaggregation = validate_generate(
                message,
                self._settings,
                self._pool.models,
                self._pool.default_model,
                GRPC_FIELD_NAMES,
                trace=_trace(context.invocation_metadata()),
            )
            service = validate_service(message, self._dispatcher.slo_classes)
        except ServingError as error:
            self._dispatcher.count_rejected("invalid")
            await _abort(context, error, "Generate", message.request_id if message else "")
            return
        time_left_s = context.time_remaining()
        if time_left_s is not None and time_left_s < MIN_TIME_LEFT_S:
            self._dispatcher.count_rejected("deadline", request.model)
            reason = (
                f"the call's deadline leaves {max(0.0, time_left_s) * 1000:.3f} ms, "
                f"less than the {MIN_TIME_LEFT_S * 1000:g} ms a request needs to be scheduled"
            )
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            _log_status(context, "Generate", code, reason, request_id=request.shown_id)
            await context.abort(code, reason)
            return
        bind_request(request.shown_id, request.request_id)
        try:
            client = self._client(context)
            with through_the_door(self._dispatcher, self._settings, client, service, request.model):
                frames = self._dispatcher.generate(request, disaggregation, service)
                # Closing the frames (a stalled reader, a cancelled call) aborts the backends.
                async with contextlib.aclosing(frames):
                    await self._write_all(context, frames)
        except WriteStalledError as stall:
            log.info("client stopped reading", reason=str(stall))
            self._dispatcher.admission.count_write_stall("grpc")
            await _cancel(context, str(stall))
        except ServingError as error:  # shed ones, common under load, logged as sampled
            sample_rate = self._settings.request_log_sample_rate
            await _abort(context, error, "Generate", request.shown_id, sample_rate=sample_rate)
        except Exception:
            log.exception("request failed unexpectedly")
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error (request_id {request.shown_id})"
            )
        finally:
            unbind_request()

    def _client(self, context: grpc.aio.ServicerContext) -> str:
        """Who the per-client cap counts the call against: its token, else its address."""
        if self._tokens:  # authorized: exactly one authorization entry
            return token_client(next(iter(authorization(context.invocation_metadata())), ""))
        return grpc_peer_client(context.peer())

    async def _write_all(
        self, context: grpc.aio.ServicerContext, frames: AsyncIterator[bytes]
    ) -> None:
        """Writes each frame as it comes; a write grpc holds back (the reader's flow-control
        window is full) for ``write_stall_timeout_s`` raises WriteStalledError."""
        guard = StallGuard(self._settings.write_stall_timeout_s)
        try:
            async for frame in frames:
                await guard.write(context.write(frame))
        finally:
            guard.close()

    async def list_backends(
        self, data: bytes, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListBackendsResponse:
        await self._authorize(context, "ListBackends")
        try:
            parse_request(router_pb2.ListBackendsRequest, data)
        except InvalidRequestError as error:
            await _abort(context, error, "ListBackends")
        return router_pb2.ListBackendsResponse(
            backends=[backend_status(view) for view in self._pool.snapshot().backends]
        )


def backend_status(view: BackendView) -> router_pb2.BackendStatus:
    """One backend as ListBackends shows it: its identity, its load, and what the split
    decision reads of it."""
    perf = view.perf
    status = router_pb2.BackendStatus(
        id=view.id,
        kind=view.kind,
        address=view.address,
        role=_ROLES[view.role.value],
        model=view.model,
        healthy=view.healthy,
        outstanding=view.outstanding,
        profile=view.profile,
        detail=view.detail,
        queued_prefill_tokens=view.queued_prefill_tokens,
        running=view.running,
        kv_tokens_used=view.kv_tokens_used,
        kv_tokens_capacity=view.kv_capacity,
        context_tokens=view.context_tokens,
    )
    if perf is not None:
        status.chips = perf.timing.chips
        status.queue_wait_seconds = view.queue_wait_s
        status.decode_step_seconds = perf.step_s(view.running, view.context_tokens)
        status.kv_free_fraction = view.kv_free_fraction
        status.price_per_hour_usd = perf.price_per_hour_usd
    return status


def _log_status(
    context: grpc.aio.ServicerContext,
    method: str,
    code: grpc.StatusCode,
    reason: str,
    *,
    server_side: bool = False,
    param: str | None = None,
    request_id: str = "",
    sample_rate: float = 1.0,
) -> None:
    """The one line of a call the router ends with an error status of its own: info for
    the client's fault (bad input, no token, shed), warning for the server's side. A
    cancelled stream and an unexpected failure have their own lines. RESOURCE_EXHAUSTED
    (shed) is logged at ``sample_rate``."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not (
        sample_rate >= 1.0 or (sample_rate > 0.0 and random.random() < sample_rate)
    ):  # sampling, not security
        return
    fields: dict[str, Any] = {
        "method": method,
        "status": code.name,
        "reason": reason[:_MAX_MESSAGE_CHARS],
        "client": context.peer(),
    }
    if param is not None:
        fields["param"] = param
    if request_id:
        fields["request_id"] = request_id[:ECHO_LIMIT]
    if server_side:
        log.warning("grpc error", **fields)
    else:
        log.info("grpc error", **fields)


async def _refuse_unauthenticated(context: grpc.aio.ServicerContext, method: str) -> None:
    code = grpc.StatusCode.UNAUTHENTICATED
    _log_status(context, method, code, UNAUTHENTICATED_MESSAGE)
    await context.abort(code, UNAUTHENTICATED_MESSAGE)


async def _abort(
    context: grpc.aio.ServicerContext,
    error: ServingError,
    method: str,
    request_id: str = "",
    *,
    sample_rate: float = 1.0,
) -> None:
    """Ends the call with the error's status and its ``google.rpc.Status``, logged. A
    retryable one (RESOURCE_EXHAUSTED, UNAVAILABLE) carries its retry hint three times: as
    ``retry-after-ms`` for the router's clients, as ``grpc-retry-pushback-ms``, the delay
    gRPC's own retry policy waits before its next attempt (gRFC A6), and as RetryInfo."""
    code = grpc.StatusCode[error.grpc_status]
    message = error.message
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + "..."
    param = error.param if isinstance(error, InvalidRequestError) else None
    _log_status(
        context,
        method,
        code,
        message,
        server_side=error.http_status >= 500,
        param=param,
        request_id=request_id,
        sample_rate=sample_rate,
    )
    trailing: list[tuple[str, str | bytes]] = []
    details: list[BadRequest | RetryInfo] = []
    if isinstance(error, InvalidRequestError) and error.param is not None:
        violation = BadRequest.FieldViolation(field=error.param, description=message)
        details.append(BadRequest(field_violations=[violation]))
    retry_after_s = retry_hint_s(error)
    if retry_after_s is not None:
        milliseconds = max(1, round(retry_after_s * 1000))
        trailing += [("retry-after-ms", str(milliseconds))]
        trailing += [("grpc-retry-pushback-ms", str(milliseconds))]
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(milliseconds)
        details.append(RetryInfo(retry_delay=delay))
    status = Status(code=code.value[0], message=message, details=map(_packed, details))
    trailing += rpc_status.to_status(status).trailing_metadata
    await context.abort(code, message, trailing_metadata=tuple(trailing))


def _packed(detail: BadRequest | RetryInfo) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


async def _cancel(context: grpc.aio.ServicerContext, reason: str) -> None:
    """Ends a call whose reader stopped reading with CANCELLED. The status goes out
    behind the frames the reader has not taken, so this returns when the reader reads
    or leaves (or the server stops, and then the status is never sent); grpc.aio has
    no way to reset a stream from the server. Its slot, backend work and KV are
    freed already."""
    try:
        await context.abort(grpc.StatusCode.CANCELLED, reason)
    except grpc.aio.AbortError:
        raise
    except Exception as error:  # noqa: BLE001  # grpc's own ExecuteBatchError: nothing to do
        log.info("status of a stalled stream not sent", error_type=type(error).__name__)


def _trace(metadata: Any) -> TraceContext:
    """The client's W3C trace context, from the ``traceparent`` and ``tracestate`` keys."""
    traceparents: list[str] = []
    tracestates: list[str] = []
    for key, value in metadata or ():
        if key == "traceparent":
            traceparents.append(str(value))
        elif key == "tracestate":
            tracestates.append(str(value))
    return trace_context(traceparents, tracestates)


def authorization(metadata: Any) -> list[str]:
    """Every ``authorization`` value of a call's metadata (grpc names keys in lower case)."""
    return [str(value) for key, value in metadata or () if key == "authorization"]


UNAUTHENTICATED_MESSAGE = "exactly one valid 'authorization: Bearer <token>' is required"


class _GuardedReflection(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """Refuses reflection calls without a valid bearer token (UNAUTHENTICATED)."""

    def __init__(self, tokens: BearerTokens) -> None:
        self._tokens = tokens
        self._refused = grpc.stream_stream_rpc_method_handler(self._refuse)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method or ""
        if method.startswith("/grpc.reflection.") and not self._tokens.allows(
            authorization(details.invocation_metadata)
        ):
            return self._refused
        return await continuation(details)

    async def _refuse(self, requests: object, context: grpc.aio.ServicerContext) -> None:
        await _refuse_unauthenticated(context, "ServerReflectionInfo")


class FrontDoor:
    """The gRPC server with the Router service, grpc.health.v1 and reflection.

    Health reports readiness for "" and the Router service, and liveness for
    ``LIVENESS_SERVICE``; all three read NOT_SERVING once ``stop`` has begun.

    ``tls``: serve TLS (mTLS with a client CA), taking changed files up at the next
    handshake. ``reflection_tokens``: tokens reflection calls must carry (none: open).
    ``share_port``: bind with SO_REUSEPORT, as one of several workers on one port whose
    parent checked it free and holds it (router/workers.py).
    """

    def __init__(
        self,
        service: RouterService,
        address: str,
        tls: TlsFiles | None = None,
        reflection_tokens: BearerTokens | None = None,
        *,
        share_port: bool = False,
    ) -> None:
        self._address = address
        self._share_port = share_port
        self._credentials = None if tls is None else grpc_credentials(tls)
        self.health = health.aio.HealthServicer()
        interceptors = [_GuardedReflection(reflection_tokens)] if reflection_tokens else []
        # No SO_REUSEPORT (grpc sets it by default): a second router on a taken port
        # must fail to start, not quietly take a share of the connections.
        options = SHARED_PORT_OPTIONS if share_port else SERVER_OPTIONS
        self.server: Any = grpc.aio.server(interceptors=interceptors, options=options)
        self.server.add_generic_rpc_handlers((service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.serve(self.server, (ROUTER_SERVICE, health.SERVICE_NAME))
        self.port = 0
        self._accepting = False

    async def start(self) -> int:
        # Said in one line here, before grpc fails with its own multi-line log (a
        # shared port is held by the parent, which checked it).
        if not self._share_port:
            check_can_listen(self._address, "gRPC")
        try:
            if self._credentials is None:
                self.port = self.server.add_insecure_port(self._address)
            else:
                self.port = self.server.add_secure_port(self._address, self._credentials)
        except RuntimeError:  # grpc's way to say it could not bind (taken since the check)
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {self._address} for gRPC: grpc could not bind it")
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        self._accepting = True
        return self.port

    @property
    def accepting(self) -> bool:
        """Taking new calls: from start until ``stop`` has reported NOT_SERVING."""
        return self._accepting

    async def set_serving(self, serving: bool) -> None:
        """Reports SERVING or NOT_SERVING for "" and the Router service, to ``Check`` and
        to every ``Watch`` stream; ignored once ``stop`` has begun."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", ROUTER_SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Reports NOT_SERVING, refuses new calls (UNAVAILABLE), lets in-flight streams run
        for up to ``grace_s``, then cancels them. A later call with a smaller grace cuts a
        drain in progress short; a server never started stops at once."""
        # NOT_SERVING for good: a status set later (readiness recovering) is ignored.
        await self.health.enter_graceful_shutdown()
        # grpc refuses new calls before this await first yields, so the flag is exact.
        self._accepting = False
        await self.server.stop(grace_s)
