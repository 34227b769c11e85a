"""The mock devices' KV transport: FetchKV / PushKV over gRPC, or socket to socket.

Handles carry the holder's data plane address, its modelled link and the lease's
token (the secret every read of the KV must show) in ``transport_params``; the
router passes them on and reads none of it (``backends.transfer``).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

import grpc

from backends._gen.hetero.device.v1 import device_pb2
from backends.base import KVHandle
from backends.errors import BackendError, LayoutMismatchError
from backends.mock import dataplane
from backends.mock.protocol import (
    KV_CHUNK_BYTES,
    PUSH_HANDLE_KEY,
    SERVICE,
    layout_from_proto,
    layout_to_proto,
)
from backends.transfer import DirectCopy, KVChunk, KVTransfer

# transport_params keys of a device's handle.
LINK_GBPS = "link_gbps"  # the holder's interconnect, for the modelled wire time
EMULATED_BYTES_PER_TOKEN = "emulated_bytes_per_token"  # the emulated model's KV size
DATA_ADDRESS = "data_address"  # the holder's data plane (empty: over gRPC only)
LEASE_TOKEN = "lease_token"  # the holder's secret for this KV: no read without it


def handle_to_proto(handle: KVHandle) -> device_pb2.KVHandle:
    params = handle.transport_params
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
        link_gbps=float(params.get(LINK_GBPS, 0.0)),
        emulated_bytes_per_token=int(params.get(EMULATED_BYTES_PER_TOKEN, 0)),
        data_address=str(params.get(DATA_ADDRESS, "")),
        lease_token=str(params.get(LEASE_TOKEN, "")),
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
        transport_params={
            LINK_GBPS: message.link_gbps,
            EMULATED_BYTES_PER_TOKEN: message.emulated_bytes_per_token,
            DATA_ADDRESS: message.data_address,
            LEASE_TOKEN: message.lease_token,
        },
    )


Translate = Callable[[grpc.StatusCode, str], Exception]


class DeviceKVTransfer(KVTransfer):
    """The KV of one device, read and written through its channel and data plane."""

    def __init__(
        self,
        backend_id: str,
        channel: grpc.aio.Channel,
        options: Mapping[str, Any],
        data_address: Callable[[], str],
        translate: Translate,
    ) -> None:
        self.backend_id = backend_id
        self._channel = channel
        self._chunk_bytes = int(options.get("relay_chunk_bytes", KV_CHUNK_BYTES))
        self._data_address = data_address  # learned from health checks; empty: none
        self._translate = translate

    @property
    def data_address(self) -> str:
        return self._data_address()

    async def read(
        self, handle: KVHandle, timeout_s: float, offset: int = 0, length: int = 0
    ) -> AsyncGenerator[bytes, None]:
        fetch = self._channel.unary_stream(
            f"/{SERVICE}/FetchKV", request_serializer=_serialize, response_deserializer=None
        )
        request = device_pb2.FetchKVRequest(
            request_id=handle.request_id,
            lease_token=str(handle.transport_params.get(LEASE_TOKEN, "")),
            expected_layout=layout_to_proto(handle.layout) if handle.layout else None,
            chunk_bytes=self._chunk_bytes,
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

    async def write(
        self, handle: KVHandle, chunks: AsyncIterator[bytes], timeout_s: float
    ) -> KVHandle:
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

    def encode_chunk(self, chunk: KVChunk) -> bytes:
        message = device_pb2.KVChunk(
            offset=chunk.offset, data=chunk.data, checksum=zlib.crc32(chunk.data)
        )
        return message.SerializeToString()

    def decode_chunk(self, encoded: bytes) -> KVChunk:
        message = device_pb2.KVChunk.FromString(encoded)
        if zlib.crc32(message.data) != message.checksum:
            raise BackendError(
                self.backend_id, f"KV chunk at byte {message.offset} failed its checksum"
            )
        return KVChunk(message.offset, message.data)

    async def copy(self, handle: KVHandle, sink: KVTransfer, *, depth: int) -> DirectCopy | None:
        """Socket to socket between the two data planes, through ``depth`` reused buffers."""
        source_address = str(handle.transport_params.get(DATA_ADDRESS, ""))
        if not (source_address and isinstance(sink, DeviceKVTransfer) and sink.data_address):
            return None
        try:
            answer = await dataplane.relay(
                source_address,
                handle.request_id,
                sink.data_address,
                handle_to_proto(handle).SerializeToString(),
                handle.byte_length,
                token=str(handle.transport_params.get(LEASE_TOKEN, "")),
                depth=depth,
            )
        except dataplane.DataPlaneError as error:
            if error.code == "FAILED_PRECONDITION" and "layout" in error.message:
                raise LayoutMismatchError(f"backend {sink.backend_id}: {error.message}") from error
            raise BackendError(sink.backend_id, f"{error.code}: {error.message}") from error
        moved = handle_from_proto(device_pb2.KVHandle.FromString(answer))
        return DirectCopy(moved, -(-handle.byte_length // dataplane.SEGMENT_BYTES))


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data
