"""The router relays a KV: it reads chunks from one backend and pushes them to another.

Reading and writing overlap (the first chunk reaches the decode backend before the
last leaves the prefill backend), and at most ``depth`` chunks wait in between, so
the router's memory stays a few chunks whatever the size of the KV. Chunks pass
through as the bytes they arrived as: never decoded, never joined.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from backends.base import Backend, KVHandle


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
    depth: int = 4,
    stats: RelayStats | None = None,
) -> KVHandle:
    """Moves the KV of ``handle`` from ``source`` to ``sink``; returns the sink's handle."""
    stats = stats if stats is not None else RelayStats()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=depth)

    async def read() -> None:
        async with contextlib.aclosing(source.fetch_kv(handle, timeout_s)) as chunks:
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
