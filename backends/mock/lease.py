"""KV a device holds for another: leased in wire form until fetched, released or expired."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from backends import kvlayout
from backends.base import KVLayout
from backends.mock.dataplane import segment_checksums
from backends.mock.model import KVCache

# How long a prefilled KV waits for its decode device before it is freed.
DEFAULT_KV_LEASE_S = 30.0

# (CRC-32 of the whole payload, CRC-32 of each data plane segment)
Checksums = tuple[int, tuple[int, ...]]


@dataclass
class Lease:
    """A prefilled KV cache waiting for its decode device, in wire form."""

    cache: KVCache
    payload: bytes | bytearray
    checksum: int
    # CRC-32 of each data plane segment, made with the payload so a transfer
    # sends them without another pass over it.
    segment_checksums: tuple[int, ...]
    expires_at: float  # Unix time
    timer: asyncio.TimerHandle

    @property
    def num_tokens(self) -> int:
        return self.cache.length


def wire_form(cache: KVCache, layout: KVLayout | None, filler_bytes_per_token: int) -> bytes:
    """The bytes a lease serves: the KV in ``layout`` (None: the model's own order), then
    seeded filler so that a transfer moves what the emulated model's KV would weigh."""
    n = cache.length
    payload = (
        kvlayout.encode(cache.keys[:, :, :n], cache.values[:, :, :n], layout)
        if layout is not None
        else cache.to_bytes()
    )
    if filler_bytes_per_token:
        payload += np.random.default_rng(n).bytes(n * filler_bytes_per_token)
    return payload


def checksums_of(payload: bytes | bytearray) -> Checksums:
    return zlib.crc32(payload), segment_checksums(payload)


class Leases:
    """The leases of one device, by request id, and the KV positions they hold."""

    def __init__(self, lease_s: float, on_release: Callable[[], None]) -> None:
        self.lease_s = lease_s
        self._on_release = on_release  # capacity came free: the engine may admit more
        self._held: dict[str, Lease] = {}
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._held

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._held))

    def get(self, request_id: str) -> Lease | None:
        return self._held.get(request_id)

    def hold(
        self, request_id: str, cache: KVCache, payload: bytes | bytearray, checksums: Checksums
    ) -> Lease:
        whole, segments = checksums
        timer = asyncio.get_running_loop().call_later(self.lease_s, self.release, request_id)
        lease = Lease(
            cache=cache,
            payload=payload,
            checksum=whole,
            segment_checksums=segments,
            expires_at=time.time() + self.lease_s,
            timer=timer,
        )
        self._held[request_id] = lease
        self.tokens += lease.num_tokens
        return lease

    def release(self, request_id: str) -> bool:
        lease = self._held.pop(request_id, None)
        if lease is None:
            return False
        lease.timer.cancel()
        self.tokens -= lease.num_tokens
        self._on_release()
        return True
