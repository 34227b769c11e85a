"""KV a device holds for another: leased in wire form until fetched, released or expired.

Each lease has a token, a random secret minted with it and named in its handle: a
reader finds a lease by its request id and token together, so knowing (or guessing)
a request id is not enough to read or release another request's KV. A wrong token
finds nothing, exactly as an unknown id does, and is compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
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

TOKEN_BYTES = 16  # a lease token's entropy; it travels as hex
# Compared against when no lease has the id, so that a miss costs what a wrong token does.
_DECOY_TOKEN = secrets.token_hex(TOKEN_BYTES).encode()


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
    token: str  # the secret a reader must show (hex)

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

    def get(self, request_id: str, token: str | bytes) -> Lease | None:
        """The lease of ``request_id`` if ``token`` is its token; None otherwise."""
        lease = self._held.get(request_id)
        expected = lease.token.encode() if lease is not None else _DECOY_TOKEN
        shown = token if isinstance(token, bytes) else token.encode(errors="replace")
        if not hmac.compare_digest(expected, shown) or lease is None:
            return None
        return lease

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
            token=secrets.token_hex(TOKEN_BYTES),
        )
        self._held[request_id] = lease
        self.tokens += lease.num_tokens
        return lease

    def release(self, request_id: str) -> bool:
        """Frees a lease whatever its token: the device's own path (expiry, abort, a
        decode that took the KV); a reader's release goes through :meth:`get` first."""
        lease = self._held.pop(request_id, None)
        if lease is None:
            return False
        lease.timer.cancel()
        self.tokens -= lease.num_tokens
        self._on_release()
        return True
