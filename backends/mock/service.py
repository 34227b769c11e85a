"""The RPCs of hetero.device.v1.Device on one mock device, as the generated servicer.

Decode, Generate and Session stream frames that the engine already encoded as the
front door's ``GenerateResponse``; ``register`` installs them without a response
serializer, so they leave the device as bytes, untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc

from backends._gen.hetero.device.v1 import device_pb2, device_pb2_grpc
from backends.base import KVLayout, Role
from backends.mock.config import DeviceConfig, check_role
from backends.mock.engine import DeviceEngine
from backends.mock.errors import DeviceError
from backends.mock.kv_handoff import KVHandoff
from backends.mock.protocol import PUSH_HANDLE_KEY, SERVICE, layout_to_proto, sampling_from_proto
from backends.mock.session_server import serve_session
from backends.perf.batching import LOAD_PREFIX_HASHES

# Streams whose handlers yield encoded messages.
_RAW_RESPONSES = ("Decode", "Generate", "Session")


class DeviceService(device_pb2_grpc.DeviceServicer):
    def __init__(
        self,
        config: DeviceConfig,
        engine: DeviceEngine,
        layout: KVLayout,
        kv: KVHandoff,
        kv_bytes_sent: Callable[[], int],
    ) -> None:
        self._config = config
        self._engine = engine
        self._layout = layout
        self._kv = kv
        self._kv_bytes_sent = kv_bytes_sent
        # Requests that reached this device (Prefill, Decode, Generate): tests use it to
        # prove that bad input never gets this far.
        self.requests_received = 0

    async def Prefill(  # noqa: N802  # the generated servicer's method names
        self, request: device_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.PrefillResponse:
        self.requests_received += 1
        try:
            check_role(self._config, Role.PREFILL)
            outcome = await self._engine.prefill(
                request.request_id, request.prompt, sampling_from_proto(request.sampling)
            )
        except DeviceError as error:
            await context.abort(grpc.StatusCode[error.code], error.message)
        response = device_pb2.PrefillResponse(
            first_frame=outcome.first_frame,
            first_token_id=outcome.first_token_id,
            finished=outcome.finished,
            prompt_tokens=outcome.prompt_tokens,
        )
        if outcome.lease is not None:
            response.handle.CopyFrom(self._kv.handle(request.request_id, outcome.lease))
        return response

    async def FetchKV(  # noqa: N802  # the generated servicer's method names
        self, request: device_pb2.FetchKVRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[device_pb2.KVChunk]:
        try:
            chunks = self._kv.fetch(request)
        except DeviceError as error:
            await context.abort(grpc.StatusCode[error.code], error.message)
        for chunk in chunks:
            yield chunk

    async def PushKV(  # noqa: N802  # the generated servicer's method names
        self, chunks: AsyncIterator[device_pb2.KVChunk], context: grpc.aio.ServicerContext
    ) -> device_pb2.PushKVResponse:
        metadata = dict(context.invocation_metadata() or ())
        if PUSH_HANDLE_KEY not in metadata:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{PUSH_HANDLE_KEY} missing")
        try:
            handle = device_pb2.KVHandle.FromString(metadata[PUSH_HANDLE_KEY])
            return device_pb2.PushKVResponse(handle=await self._kv.push(handle, chunks))
        except DeviceError as error:
            await context.abort(grpc.StatusCode[error.code], error.message)
            raise

    async def ReleaseKV(  # noqa: N802  # the generated servicer's method names
        self, request: device_pb2.ReleaseKVRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.ReleaseKVResponse:
        return device_pb2.ReleaseKVResponse(released=self._kv.release(request))

    async def Decode(  # noqa: N802  # the generated servicer's method names
        self, request: device_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for frame in _guard(self._decode_frames(request), context):
            yield frame

    async def Generate(  # noqa: N802  # the generated servicer's method names
        self, request: device_pb2.DeviceGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for frame in _guard(self._generate_frames(request), context):
            yield frame

    async def Session(  # noqa: N802  # the generated servicer's method names
        self,
        requests: AsyncIterator[device_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        async for message in serve_session(requests, self._session_stream):
            yield message

    async def Abort(  # noqa: N802  # the generated servicer's method names
        self, request: device_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.AbortResponse:
        return device_pb2.AbortResponse(found=self._engine.abort(request.request_id))

    async def Health(  # noqa: N802  # the generated servicer's method names
        self, request: device_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.HealthResponse:
        return device_pb2.HealthResponse(
            serving=True,
            backend_id=self._config.backend_id,
            model=self._config.model,
            profile=self._config.profile,
            layout=layout_to_proto(self._layout),
            roles=[role.value for role in self._config.roles],
            data_address=self._kv.data_address,
        )

    async def Load(  # noqa: N802  # the generated servicer's method names
        self, request: device_pb2.LoadRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.LoadResponse:
        load = self._engine.load()
        return device_pb2.LoadResponse(
            waiting=load.waiting,
            running=load.running,
            kv_tokens_used=load.kv_tokens_used,
            kv_tokens_capacity=load.kv_tokens_capacity,
            kv_leases=load.kv_leases,
            # The most recently used first, capped: a router matches prompt heads, which
            # a long-idle tail of the cache rarely serves.
            cached_prefix_hashes=self._engine.prefix_cache.recent(LOAD_PREFIX_HASHES),
            kv_bytes_sent=self._kv_bytes_sent(),
        )

    async def _decode_frames(
        self, request: device_pb2.DecodeRequest
    ) -> AsyncGenerator[bytes, None]:
        self.requests_received += 1
        check_role(self._config, Role.DECODE)
        cache = await self._kv.obtain(request)
        frames = self._engine.decode(
            request.request_id,
            request.prompt,
            sampling_from_proto(request.sampling),
            cache,
            request.first_token_id,
        )
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame

    async def _generate_frames(
        self, request: device_pb2.DeviceGenerateRequest
    ) -> AsyncGenerator[bytes, None]:
        self.requests_received += 1
        check_role(self._config, Role.DECODE)
        frames = self._engine.generate(
            request.request_id,
            request.prompt,
            sampling_from_proto(request.sampling),
            tuple(request.generated_ids),
        )
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame

    def _session_stream(self, request: device_pb2.SessionRequest) -> AsyncGenerator[bytes, None]:
        if request.WhichOneof("body") == "decode":
            return self._decode_frames(request.decode)
        return self._generate_frames(request.generate)


async def _guard(
    frames: AsyncGenerator[bytes, None], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    """Maps device errors to statuses; closing the stream aborts the sequence."""
    try:
        async for frame in frames:
            yield frame
    except DeviceError as error:
        await context.abort(grpc.StatusCode[error.code], error.message)
    finally:
        await frames.aclose()


def register(service: DeviceService, server: grpc.aio.Server) -> None:
    """The generated registration, but the raw streams' frames are written as they are."""
    captured = _CapturedHandlers()
    add_to_server = device_pb2_grpc.add_DeviceServicer_to_server
    add_to_server(service, captured)  # type: ignore[no-untyped-call]  # generated, unannotated
    handlers = captured.handlers
    for name in _RAW_RESPONSES:
        handler = handlers[name]
        if handler.unary_stream is not None:
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                handler.unary_stream, request_deserializer=handler.request_deserializer
            )
        else:
            handlers[name] = grpc.stream_stream_rpc_method_handler(
                handler.stream_stream, request_deserializer=handler.request_deserializer
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class _CapturedHandlers:
    """Stands in for a server to receive the generated method handlers before they serve."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers come by name below

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = dict(handlers)
