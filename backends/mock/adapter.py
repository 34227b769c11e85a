"""The router's adapter for device servers that speak hetero.device.v1 (the mock devices)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Any

import grpc

from backends._gen.hetero.device.v1 import device_pb2
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
from backends.errors import BackendError, LayoutMismatchError, OverloadedError
from backends.mock.protocol import (
    CHANNEL_OPTIONS,
    SERVICE,
    layout_from_proto,
    sampling_to_proto,
)
from backends.mock.session import DeviceSession, SessionStreamError
from backends.mock.transfer import DeviceKVTransfer, handle_from_proto, handle_to_proto

Metadata = tuple[tuple[str, str], ...]
# Statuses that mean the request itself can never succeed on any device.
_NOT_RETRYABLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}


class MockBackend(Backend):
    """A mock device: prefill, decode and colocated generation; the decode side pulls the KV."""

    def __init__(
        self, backend_id: str, address: str, options: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(backend_id, address, options)
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[str, Any] = {}
        self._session: DeviceSession | None = None
        self._data_address = ""  # learned from health checks
        self._transfer: DeviceKVTransfer | None = None  # once started

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            roles=frozenset({Role.PREFILL, Role.DECODE, Role.BOTH}),
            handoff_modes=frozenset({HandoffMode.SEQUENTIAL, HandoffMode.RELAY}),
            resume=True,
        )

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        unary: dict[str, Any] = {
            "Prefill": device_pb2.PrefillResponse,
            "Abort": device_pb2.AbortResponse,
            "Health": device_pb2.HealthResponse,
            "Load": device_pb2.LoadResponse,
        }
        for name, response in unary.items():
            self._calls[name] = self._channel.unary_unary(
                f"/{SERVICE}/{name}",
                request_serializer=_serialize,
                response_deserializer=response.FromString,
            )
        # Decode and Generate share one long-lived stream; frames stay bytes.
        self._session = DeviceSession(self._channel, f"/{SERVICE}/Session")
        self._transfer = DeviceKVTransfer(
            self.id, self._channel, self.options, lambda: self._data_address, self._translate
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._channel is not None:
            await self._channel.close()

    async def check_health(self, timeout_s: float) -> HealthStatus:
        try:
            response = await self._calls["Health"](device_pb2.HealthRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            return HealthStatus(
                serving=False,
                detail=f"{error.code().name}: {error.details()}",
                timed_out=error.code() == grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        self._data_address = response.data_address
        return HealthStatus(
            serving=response.serving,
            model=response.model,
            profile=response.profile,
            layout=layout_from_proto(response.layout),
        )

    async def load(self, timeout_s: float) -> BackendLoad:
        response = await self._invoke("Load", device_pb2.LoadRequest(), timeout_s)
        return BackendLoad(
            waiting=response.waiting,
            running=response.running,
            kv_tokens_used=response.kv_tokens_used,
            kv_tokens_capacity=response.kv_tokens_capacity,
            kv_leases=response.kv_leases,
            cached_prefix_hashes=frozenset(response.cached_prefix_hashes),
        )

    async def prefill(self, request: GenerationRequest, timeout_s: float) -> PrefillResult:
        message = device_pb2.PrefillRequest(
            request_id=request.request_id,
            prompt=request.prompt,
            sampling=sampling_to_proto(request.sampling),
        )
        response = await self._invoke("Prefill", message, timeout_s, _trace_metadata(request))
        return PrefillResult(
            first_frame=response.first_frame,
            first_token_id=response.first_token_id,
            prompt_tokens=response.prompt_tokens,
            finished=response.finished,
            handle=handle_from_proto(response.handle) if response.HasField("handle") else None,
        )

    async def decode(
        self, request: GenerationRequest, handle: KVHandle, first_token_id: int, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        message = device_pb2.DecodeRequest(
            request_id=request.request_id,
            prompt=request.prompt,
            sampling=sampling_to_proto(request.sampling),
            handle=handle_to_proto(handle),
            first_token_id=first_token_id,
            traceparent=request.traceparent,
        )
        async for frame in self._stream("decode", message, timeout_s):
            yield frame

    async def generate(
        self, request: GenerationRequest, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        message = device_pb2.DeviceGenerateRequest(
            request_id=request.request_id,
            prompt=request.prompt,
            sampling=sampling_to_proto(request.sampling),
            generated_ids=request.generated_ids,
            traceparent=request.traceparent,
        )
        async for frame in self._stream("generate", message, timeout_s):
            yield frame

    @property
    def kv_transfer(self) -> DeviceKVTransfer | None:
        return self._transfer

    async def abort(self, request_id: str, timeout_s: float) -> None:
        await self._invoke("Abort", device_pb2.AbortRequest(request_id=request_id), timeout_s)

    async def _invoke(
        self, name: str, message: Any, timeout_s: float, metadata: Metadata = ()
    ) -> Any:
        try:
            return await self._calls[name](message, timeout=timeout_s, metadata=metadata or None)
        except grpc.aio.AioRpcError as error:
            raise self._translate(error.code(), error.details() or "") from None

    async def _stream(
        self, body: str, message: Any, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        if self._session is None:
            raise RuntimeError(f"backend {self.id}: start() first")
        frames = self._session.stream(body, message, timeout_s)
        try:
            async for frame in frames:
                yield frame
        except SessionStreamError as error:
            raise self._translate(error.code, error.details) from None
        finally:
            await frames.aclose()  # an early exit cancels the request on the device

    def _translate(self, code: grpc.StatusCode, details: str) -> Exception:
        details = details or code.name
        if code == grpc.StatusCode.FAILED_PRECONDITION and "layout" in details:
            return LayoutMismatchError(f"backend {self.id}: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return OverloadedError(f"backend {self.id}: {details}", retry_after_s=1.0)
        return BackendError(
            self.id, f"{code.name}: {details}", retryable=code not in _NOT_RETRYABLE
        )


def _trace_metadata(request: GenerationRequest) -> Metadata:
    """The request's W3C trace context as gRPC metadata (what a unary call carries)."""
    return tuple(request.trace_headers().items())


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data
