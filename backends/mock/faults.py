"""Fault injection for tests: KV bytes served broken off midway, or with a bit flipped.

A wrapper around what serves a device's KV bytes (``kv_bytes.KVBytes``), so the
device's own serving path carries no test branches; devices configured without
faults never build one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from backends._gen.hetero.device.v1 import device_pb2
from backends.mock import dataplane
from backends.mock.kv_bytes import KVBytes
from backends.mock.lease import Lease


class FaultyKVBytes:
    """Breaks the first ``breaks`` data plane transfers halfway; flips one bit in each of
    the first ``corruptions`` transfers after those (data plane or FetchKV alike)."""

    def __init__(self, inner: KVBytes, *, breaks: int, corruptions: int) -> None:
        self._inner = inner
        self._breaks_left = breaks
        self._corruptions_left = corruptions

    def served(self, request_id: str, token: bytes) -> dataplane.Served | None:
        served = self._inner.served(request_id, token)
        if served is None:
            return None
        if self._breaks_left > 0:
            self._breaks_left -= 1
            half = len(served.payload) // 2
            return dataclasses.replace(served, segment_checksums=None, break_after=half)
        if not self._corrupt_next():
            return served
        damaged = bytearray(served.payload)
        damaged[0] ^= 1
        return dataclasses.replace(served, payload=damaged)

    def chunks(self, lease: Lease, start: int, end: int, size: int) -> Iterator[device_pb2.KVChunk]:
        chunks = self._inner.chunks(lease, start, end, size)
        if not self._corrupt_next():
            yield from chunks
            return
        for chunk in chunks:
            if chunk.offset == start:  # the checksum stays the one of the intact bytes
                chunk.data = bytes([chunk.data[0] ^ 1]) + chunk.data[1:]
            yield chunk

    def _corrupt_next(self) -> bool:
        if self._corruptions_left <= 0:
            return False
        self._corruptions_left -= 1
        return True
