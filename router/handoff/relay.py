"""The router relays a KV: it reads chunks from one backend and pushes them to another.

Reading and writing overlap (the first chunk reaches the decode backend before the
last leaves the prefill backend), and at most ``depth`` chunks wait in between, so
the router's memory stays a few chunks whatever the size of the KV. When both sides
share a layout, chunks pass through as the bytes they arrived as: never decoded,
never joined. When they do not (other block sizes, other tensor-parallel degrees),
the relay reads every source rank's shard a unit at a time and writes the target's
layout (``backends.kvlayout``), holding one unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import zlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from backends import kvlayout
from backends.base import Backend, KVHandle, KVLayout
from backends.mock import dataplane
from backends.mock.adapter import handle_from_proto, handle_to_proto
from router._gen.hetero.device.v1 import device_pb2
from router.errors import BackendError, LayoutMismatchError


@dataclass
class RelayStats:
    chunks: int = 0
    bytes: int = 0
    most_in_flight: int = 0  # the largest number of chunks held at once


async def relay(
    source: Backend,
    sink: Backend,
    handle: KVHandle,
    *,
    timeout_s: float,
    target_layout: KVLayout | None = None,
    depth: int = 4,
    stats: RelayStats | None = None,
) -> KVHandle:
    """Moves the KV of ``handle`` from ``source`` to ``sink``; returns the sink's handle."""
    stats = stats if stats is not None else RelayStats()
    same_layout = target_layout is None or handle.layout in (None, target_layout)
    if same_layout and handle.data_address and sink.kv_data_address:
        return await _over_sockets(handle, sink, depth, stats)
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=depth)

    def produced() -> AsyncGenerator[bytes, None]:
        if target_layout is None or handle.layout in (None, target_layout):
            return source.fetch_kv(handle, timeout_s)
        return _converted(source, handle, target_layout, timeout_s)

    async def read() -> None:
        async with contextlib.aclosing(produced()) as chunks:
            async for chunk in chunks:
                await queue.put(chunk)  # waits while ``depth`` chunks are in flight
                stats.most_in_flight = max(stats.most_in_flight, queue.qsize())

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            if queue.empty() and reader.done():
                return  # all read, or the read failed: its error is raised below
            take = asyncio.ensure_future(queue.get())
            await asyncio.wait({take, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not take.done():
                take.cancel()
                continue
            chunk = take.result()
            stats.chunks += 1
            stats.bytes += len(chunk)
            yield chunk

    reader = asyncio.create_task(read())
    try:
        pushed = await sink.push_kv(handle, chunks(), timeout_s)
    finally:
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader  # a failed read is the error worth reporting
    return pushed


async def _converted(
    source: Backend, handle: KVHandle, target: KVLayout, timeout_s: float
) -> AsyncGenerator[bytes, None]:
    """Encoded KVChunks of the handle's KV in ``target``'s layout, one unit at a time.

    A pad after the KV (a payload at an emulated model's size) is not KV: it
    follows, byte for byte, where it was.
    """
    assert handle.layout is not None
    reason = kvlayout.incompatibility(handle.layout, target)
    if reason is not None:
        raise LayoutMismatchError(f"KV layout cannot convert: {reason}")
    spans = kvlayout.rank_spans(handle.layout, handle.num_tokens)
    shards = [
        _ShardReader(source.fetch_kv(handle, timeout_s, span.offset, span.length)) for span in spans
    ]
    try:

        async def read(rank: int, count: int) -> bytes:
            return await shards[rank].read(count)

        pieces = kvlayout.translate(read, handle.layout, target, handle.num_tokens)
        async for offset, data in pieces:
            chunk = device_pb2.KVChunk(offset=offset, data=data, checksum=zlib.crc32(data))
            yield chunk.SerializeToString()
    finally:
        for shard in shards:
            await shard.close()
    real = handle.num_tokens * kvlayout.token_bytes(handle.layout)
    if handle.byte_length > real:
        pad = source.fetch_kv(handle, timeout_s, real, handle.byte_length - real)
        async with contextlib.aclosing(pad) as chunks:
            async for encoded in chunks:  # offsets are the same in every layout
                yield encoded


class _ShardReader:
    """Exact-size reads over one rank's chunk stream, holding at most a chunk beyond."""

    def __init__(self, chunks: AsyncGenerator[bytes, None]) -> None:
        self._chunks = chunks
        self._pending = bytearray()

    async def read(self, count: int) -> bytes:
        while len(self._pending) < count:
            chunk = device_pb2.KVChunk.FromString(await anext(self._chunks))
            if zlib.crc32(chunk.data) != chunk.checksum:
                raise BackendError("relay", f"KV chunk at byte {chunk.offset} failed its checksum")
            self._pending += chunk.data
        data = bytes(self._pending[:count])
        del self._pending[:count]
        return data

    async def close(self) -> None:
        await self._chunks.aclose()


async def _over_sockets(handle: KVHandle, sink: Backend, depth: int, stats: RelayStats) -> KVHandle:
    """Socket to socket between the two data planes, through ``depth`` reused buffers."""
    try:
        answer = await dataplane.relay(
            handle.data_address,
            handle.request_id,
            sink.kv_data_address,
            handle_to_proto(handle).SerializeToString(),
            handle.byte_length,
            depth=depth,
        )
    except dataplane.DataPlaneError as error:
        if error.code == "FAILED_PRECONDITION" and "layout" in error.message:
            raise LayoutMismatchError(f"backend {sink.id}: {error.message}") from error
        raise BackendError(sink.id, f"{error.code}: {error.message}") from error
    stats.chunks = math.ceil(handle.byte_length / dataplane.SEGMENT_BYTES)
    stats.bytes = handle.byte_length
    stats.most_in_flight = depth
    return handle_from_proto(device_pb2.KVHandle.FromString(answer))
