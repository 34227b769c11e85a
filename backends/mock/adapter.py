"""The router's adapter for device servers that speak hetero.device.v1 (the mock devices)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import grpc

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
from backends.mock.server import (
    CHANNEL_OPTIONS,
    PUSH_HANDLE_KEY,
    SERVICE,
    layout_from_proto,
    layout_to_proto,
)
from backends.mock.session import DeviceSession, SessionStreamError
from router._gen.hetero.device.v1 import device_pb2
from router.errors import BackendError, LayoutMismatchError, OverloadedError

# Small enough that a relay holds a few in flight, large enough to stream at speed.
RELAY_CHUNK_BYTES = 1 << 20

# Statuses that mean the request itself can never succeed on any device.
_NOT_RETRYABLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}


def _sampling(request: GenerationRequest) -> device_pb2.Sampling:
    sampling = request.sampling
    return device_pb2.Sampling(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop=sampling.stop,
    )


def handle_to_proto(handle: KVHandle) -> device_pb2.KVHandle:
    return device_pb2.KVHandle(
        backend_id=handle.backend_id,
        address=handle.address,
        request_id=handle.request_id,
        block_ids=handle.block_ids,
        layout=layout_to_proto(handle.layout) if handle.layout is not None else None,
        num_tokens=handle.num_tokens,
        byte_length=handle.byte_length,
        checksum=handle.checksum,
        lease_expires_at=handle.lease_expires_at,
        link_gbps=handle.link_gbps,
        emulated_bytes_per_token=handle.emulated_bytes_per_token,
        data_address=handle.data_address,
    )


def handle_from_proto(message: device_pb2.KVHandle) -> KVHandle:
    return KVHandle(
        backend_id=message.backend_id,
        address=message.address,
        request_id=message.request_id,
        block_ids=tuple(message.block_ids),
        layout=layout_from_proto(message.layout),
        num_tokens=message.num_tokens,
        byte_length=message.byte_length,
        checksum=message.checksum,
        lease_expires_at=message.lease_expires_at,
        link_gbps=message.link_gbps,
        emulated_bytes_per_token=message.emulated_bytes_per_token,
        data_address=message.data_address,
    )


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

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            roles=frozenset({Role.PREFILL, Role.DECODE, Role.BOTH}),
            handoff_modes=frozenset({HandoffMode.SEQUENTIAL, HandoffMode.RELAY}),
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
            request_id=request.request_id, prompt=request.prompt, sampling=_sampling(request)
        )
        response = await self._invoke("Prefill", message, timeout_s)
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
            sampling=_sampling(request),
            handle=handle_to_proto(handle),
            first_token_id=first_token_id,
        )
        async for frame in self._stream("decode", message, timeout_s):
            yield frame

    async def generate(
        self, request: GenerationRequest, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        message = device_pb2.DeviceGenerateRequest(
            request_id=request.request_id, prompt=request.prompt, sampling=_sampling(request)
        )
        async for frame in self._stream("generate", message, timeout_s):
            yield frame

    @property
    def kv_data_address(self) -> str:
        return self._data_address

    async def fetch_kv(
        self, handle: KVHandle, timeout_s: float, offset: int = 0, length: int = 0
    ) -> AsyncGenerator[bytes, None]:
        assert self._channel is not None, "start() first"
        fetch = self._channel.unary_stream(
            f"/{SERVICE}/FetchKV", request_serializer=_serialize, response_deserializer=None
        )
        request = device_pb2.FetchKVRequest(
            request_id=handle.request_id,
            expected_layout=handle_to_proto(handle).layout,
            chunk_bytes=int(self.options.get("relay_chunk_bytes", RELAY_CHUNK_BYTES)),
            offset=offset,
            length=length,
        )
        call = fetch(request, timeout=timeout_s)
        try:
            async for chunk in call:  # encoded KVChunks, passed on as they are
                yield chunk
        except grpc.aio.AioRpcError as error:
            raise self._translate(error.code(), error.details() or "") from None
        finally:
            call.cancel()

    async def push_kv(
        self, handle: KVHandle, chunks: AsyncIterator[bytes], timeout_s: float
    ) -> KVHandle:
        assert self._channel is not None, "start() first"
        push = self._channel.stream_unary(
            f"/{SERVICE}/PushKV",
            request_serializer=None,  # the chunks are already encoded
            response_deserializer=device_pb2.PushKVResponse.FromString,
        )
        metadata = ((PUSH_HANDLE_KEY, handle_to_proto(handle).SerializeToString()),)
        try:
            response = await push(chunks, metadata=metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise self._translate(error.code(), error.details() or "") from None
        return handle_from_proto(response.handle)

    async def abort(self, request_id: str, timeout_s: float) -> None:
        await self._invoke("Abort", device_pb2.AbortRequest(request_id=request_id), timeout_s)

    async def _invoke(self, name: str, message: Any, timeout_s: float) -> Any:
        try:
            return await self._calls[name](message, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise self._translate(error.code(), error.details() or "") from None

    async def _stream(
        self, body: str, message: Any, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        assert self._session is not None, "start() first"
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


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data
