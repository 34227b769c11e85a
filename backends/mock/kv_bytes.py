"""A KV's bytes on the wire: served from a lease, or received chunk by chunk into one buffer."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Protocol

from backends._gen.hetero.device.v1 import device_pb2
from backends.mock import dataplane
from backends.mock.errors import DeviceError
from backends.mock.lease import Lease


class KVBytes(Protocol):
    """What serves the bytes of the KV a device holds, to its data plane and to FetchKV."""

    def served(self, request_id: str, token: bytes) -> dataplane.Served | None:
        """A lease's payload for the data plane; None when none is held under the id
        with that token."""
        ...

    def chunks(self, lease: Lease, start: int, end: int, size: int) -> Iterator[device_pb2.KVChunk]:
        """Bytes ``start`` to ``end`` of the lease's payload, ``size`` bytes a chunk."""
        ...


class LeaseBytes:
    """A lease's bytes as they are: memoryview slices of its payload, checksums made ahead."""

    def __init__(self, lease: Callable[[str, bytes], Lease | None]) -> None:
        self._lease = lease

    def served(self, request_id: str, token: bytes) -> dataplane.Served | None:
        lease = self._lease(request_id, token)
        if lease is None:
            return None
        return dataplane.Served(lease.payload, lease.segment_checksums, lease.checksum)

    def chunks(self, lease: Lease, start: int, end: int, size: int) -> Iterator[device_pb2.KVChunk]:
        view = memoryview(lease.payload)
        for offset in range(start, end, size):
            piece = view[offset : min(offset + size, end)]
            yield device_pb2.KVChunk(offset=offset, data=bytes(piece), checksum=zlib.crc32(piece))


async def receive(chunks: AsyncIterator[device_pb2.KVChunk], byte_length: int) -> bytearray:
    """A payload of ``byte_length`` into one buffer, each chunk checked as it lands."""
    buffer = bytearray(byte_length)
    received = 0
    async for chunk in chunks:
        end = chunk.offset + len(chunk.data)
        if end > len(buffer):
            raise DeviceError("DATA_LOSS", "KV chunk past the end of the handle's bytes")
        if zlib.crc32(chunk.data) != chunk.checksum:
            raise DeviceError("DATA_LOSS", f"KV chunk at byte {chunk.offset} failed its checksum")
        buffer[chunk.offset : end] = chunk.data
        received += len(chunk.data)
    if received != byte_length:
        raise DeviceError("DATA_LOSS", f"KV arrived short: {received} of {byte_length} bytes")
    return buffer
