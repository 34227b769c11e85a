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
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from backends import kvlayout
from backends.base import Backend, KVHandle, KVLayout
from backends.errors import BackendError, LayoutMismatchError
from backends.transfer import KVChunk, KVTransfer


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
    if handle.layout is not None and target_layout is not None and not same_layout:
        reason = kvlayout.incompatibility(handle.layout, target_layout)
        if reason is not None:  # refused before a byte is read
            raise LayoutMismatchError(f"KV layout cannot convert: {reason}")
    reader_side, writer_side = _transfer_of(source), _transfer_of(sink)
    if same_layout:
        direct = await reader_side.copy(handle, writer_side, depth=depth)
        if direct is not None:
            stats.chunks, stats.bytes = direct.pieces, handle.byte_length
            stats.most_in_flight = depth
            return direct.handle
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=depth)

    def produced() -> AsyncGenerator[bytes, None]:
        if same_layout or target_layout is None:  # (the second tells the type checker)
            return _for_sink(reader_side.read(handle, timeout_s), reader_side, writer_side)
        return _converted(reader_side, writer_side, handle, target_layout, timeout_s)

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
        pushed = await writer_side.write(handle, chunks(), timeout_s)
    finally:
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader  # a failed read is the error worth reporting
    return pushed


def _transfer_of(backend: Backend) -> KVTransfer:
    transfer = backend.kv_transfer
    if transfer is None:
        raise BackendError(backend.id, "this backend cannot relay KV", retryable=False)
    return transfer


def _for_sink(
    chunks: AsyncGenerator[bytes, None], source: KVTransfer, sink: KVTransfer
) -> AsyncGenerator[bytes, None]:
    """The chunks as ``sink`` reads them: as they are between two ends of one transport."""
    return chunks if type(source) is type(sink) else _recoded(chunks, source, sink)


async def _recoded(
    chunks: AsyncGenerator[bytes, None], source: KVTransfer, sink: KVTransfer
) -> AsyncGenerator[bytes, None]:
    async with contextlib.aclosing(chunks):
        async for encoded in chunks:
            yield sink.encode_chunk(source.decode_chunk(encoded))


async def _converted(
    source: KVTransfer, sink: KVTransfer, handle: KVHandle, target: KVLayout, timeout_s: float
) -> AsyncGenerator[bytes, None]:
    """Chunks of the handle's KV in ``target``'s layout, one unit at a time, encoded for
    ``sink``.

    A pad after the KV (a payload at an emulated model's size) is not KV: it
    follows, byte for byte, where it was.
    """
    if handle.layout is None:
        raise LayoutMismatchError("a KV with no layout cannot be converted")
    spans = kvlayout.rank_spans(handle.layout, handle.num_tokens)
    shards = [
        _ShardReader(source, source.read(handle, timeout_s, span.offset, span.length))
        for span in spans
    ]
    try:

        async def read(rank: int, count: int) -> bytes:
            return await shards[rank].read(count)

        pieces = kvlayout.translate(read, handle.layout, target, handle.num_tokens)
        async for offset, data in pieces:
            yield sink.encode_chunk(KVChunk(offset, data))
    finally:
        for shard in shards:
            await shard.close()
    real = handle.num_tokens * kvlayout.token_bytes(handle.layout)
    if handle.byte_length > real:
        pad = source.read(handle, timeout_s, real, handle.byte_length - real)
        pad = _for_sink(pad, source, sink)
        async with contextlib.aclosing(pad) as chunks:
            async for encoded in chunks:  # offsets are the same in every layout
                yield encoded


class _ShardReader:
    """Exact-size reads over one rank's chunk stream, holding at most a chunk beyond."""

    def __init__(self, transfer: KVTransfer, chunks: AsyncGenerator[bytes, None]) -> None:
        self._transfer = transfer
        self._chunks = chunks
        self._pending = bytearray()

    async def read(self, count: int) -> bytes:
        while len(self._pending) < count:
            self._pending += self._transfer.decode_chunk(await anext(self._chunks)).data
        data = bytes(self._pending[:count])
        del self._pending[:count]
        return data

    async def close(self) -> None:
        await self._chunks.aclose()
