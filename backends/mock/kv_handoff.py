"""A device's side of KV handoffs: the handles it issues, the KV it serves, takes and remakes.

A decode takes its KV from this device's own lease, pulls it from the holder, takes
what a relay pushed, or, when the KV cannot be had, prefills the prompt here: the
same model and maths, so the tokens stay exactly those of one device.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import AsyncIterator, Iterator

import structlog

from backends import kvlayout
from backends._gen.hetero.device.v1 import device_pb2
from backends.base import KVLayout, Role
from backends.mock import dataplane, kv_bytes
from backends.mock.clock import LoopClock
from backends.mock.config import DeviceConfig, check_layout, check_role
from backends.mock.engine import DeviceEngine
from backends.mock.errors import DeviceError
from backends.mock.kv_pull import KVPuller
from backends.mock.lease import Lease
from backends.mock.model import KVCache
from backends.mock.protocol import (
    KV_CHUNK_BYTES,
    layout_from_proto,
    layout_to_proto,
    sampling_from_proto,
)
from backends.perf.roofline import TimingModel, wire_seconds

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

KV_PULL_ATTEMPTS = 3
# KV failures a local prefill can make good; a wrong layout or role cannot.
_RECOVERABLE = frozenset({"NOT_FOUND", "DATA_LOSS", "UNAVAILABLE", "DEADLINE_EXCEEDED"})
# How much of a request id an error quotes: ids come from callers and may be long.
_ECHOED_ID_CHARS = 64


class KVHandoff:
    def __init__(
        self,
        config: DeviceConfig,
        engine: DeviceEngine,
        layout: KVLayout,
        timing: TimingModel,
        *,
        served: kv_bytes.KVBytes,
        clock: LoopClock,
    ) -> None:
        self._config = config
        self._engine = engine
        self._layout = layout
        self._timing = timing
        self._served = served
        self._clock = clock
        self._puller = KVPuller()
        self.address = ""  # this device's, and its data plane's: named in its handles
        self.data_address = ""
        self.recomputes = 0
        self.fetches_served = 0  # over gRPC FetchKV
        self.fetch_bytes_sent = 0  # the bytes of their chunks

    @property
    def pull_attempts(self) -> int:
        return self._puller.attempts

    async def close(self) -> None:
        await self._puller.close()

    def handle(self, request_id: str, lease: Lease) -> device_pb2.KVHandle:
        """The handle of a KV this device holds."""
        return device_pb2.KVHandle(
            backend_id=self._config.backend_id,
            address=self.address,
            request_id=request_id,
            block_ids=range(math.ceil(lease.num_tokens / self._layout.block_size)),
            layout=layout_to_proto(self._layout),
            num_tokens=lease.num_tokens,
            byte_length=len(lease.payload),
            checksum=lease.checksum,
            lease_expires_at=lease.expires_at,
            link_gbps=self._timing.profile.interconnect_gbps,
            emulated_bytes_per_token=self._timing.model.kv_bytes_per_token,
            data_address=self.data_address,
            lease_token=lease.token,
        )

    def fetch(self, request: device_pb2.FetchKVRequest) -> Iterator[device_pb2.KVChunk]:
        """FetchKV's chunks of a lease; the lease stays until its reader releases it."""
        self.fetches_served += 1
        lease = self._held(request.request_id, request.lease_token)
        check_layout(self._config, self._layout, layout_from_proto(request.expected_layout))
        size = len(lease.payload)
        end = request.offset + request.length if request.length else size
        if not request.offset <= end <= size:
            raise DeviceError("OUT_OF_RANGE", f"bytes {request.offset}..{end} of {size}")
        chunk = request.chunk_bytes or KV_CHUNK_BYTES
        return self._counted(self._served.chunks(lease, request.offset, end, chunk))

    def _counted(self, chunks: Iterator[device_pb2.KVChunk]) -> Iterator[device_pb2.KVChunk]:
        for chunk in chunks:
            self.fetch_bytes_sent += len(chunk.data)
            yield chunk

    def release(self, request: device_pb2.ReleaseKVRequest) -> bool:
        """Frees a lease for the holder of its token; False, as for an unknown id, else."""
        if self._engine.lease(request.request_id, request.lease_token) is None:
            return False
        return self._engine.release_lease(request.request_id)

    async def obtain(self, request: device_pb2.DecodeRequest) -> KVCache:
        """The KV a decode continues from, however it can be had."""
        handle = request.handle
        check_layout(self._config, self._layout, layout_from_proto(handle.layout))
        try:
            return await self._take(handle)
        except DeviceError as error:
            if self._config.kv_failure_policy == "fail" or error.code not in _RECOVERABLE:
                raise
            log.warning(
                "KV unavailable; prefilling here", request=request.request_id, error=error.message
            )
            return await self._recompute(request)

    async def push(
        self, handle: device_pb2.KVHandle, chunks: AsyncIterator[device_pb2.KVChunk]
    ) -> device_pb2.KVHandle:
        """Keeps a KV a relay pushes (in any layout it converts from), checked chunk by
        chunk and whole; its handle here."""
        check_role(self._config, Role.DECODE)
        source = layout_from_proto(handle.layout)
        reason = kvlayout.incompatibility(source, self._layout)
        if reason is not None:
            raise DeviceError("FAILED_PRECONDITION", f"KV layout cannot convert: {reason}")
        started = self._clock.time()
        buffer = await kv_bytes.receive(chunks, handle.byte_length)
        cache = self.cache_from(buffer, handle.num_tokens)
        # A converted KV is checked as its source laid it out; an unconverted one as is.
        pad = memoryview(buffer)[handle.num_tokens * kvlayout.token_bytes(source) :]
        checksum = (
            zlib.crc32(buffer) if source == self._layout else _checksum_as(cache, source, pad)
        )
        if checksum != handle.checksum:
            raise DeviceError("DATA_LOSS", "relayed KV failed its checksum; not used")
        await self._model_wire_time(handle, started)
        lease = self._engine.adopt(handle.request_id, cache, buffer)
        return self.handle(handle.request_id, lease)

    def relay_sink(self) -> dataplane.Sink:
        return _RelaySink(self)

    def cache_from(self, buffer: bytearray, num_tokens: int) -> KVCache:
        """A cache from a payload in this device's layout (any size pad after it ignored)."""
        real = memoryview(buffer)[: num_tokens * kvlayout.token_bytes(self._layout)]
        keys, values = kvlayout.decode(real, self._layout, num_tokens)
        cache = KVCache.allocate(self._engine.model.config, num_tokens)
        cache.keys[:, :, :num_tokens] = keys
        cache.values[:, :, :num_tokens] = values
        cache.length = num_tokens
        return cache

    def check_relayed(self, handle: device_pb2.KVHandle) -> None:
        """Refuses, before any byte moves, a relayed KV this device could not use as it is."""
        check_role(self._config, Role.DECODE)
        check_layout(self._config, self._layout, layout_from_proto(handle.layout))

    def take_relayed(
        self, handle: device_pb2.KVHandle, payload: bytearray, segments: tuple[int, ...]
    ) -> device_pb2.KVHandle:
        """Keeps a KV relayed over the data plane whose every segment matched the holder's
        checksums: the whole is then the holder's payload, and ``handle`` names it."""
        cache = self.cache_from(payload, handle.num_tokens)
        lease = self._engine.adopt(handle.request_id, cache, payload, (handle.checksum, segments))
        return self.handle(handle.request_id, lease)

    async def _take(self, handle: device_pb2.KVHandle) -> KVCache:
        """The KV of the handle: taken locally, or pulled from the device that holds it."""
        if handle.backend_id == self._config.backend_id:
            lease = self._held(handle.request_id, handle.lease_token)
            self._engine.release_lease(handle.request_id)
            return lease.cache
        attempts = KV_PULL_ATTEMPTS if self._config.kv_failure_policy == "retry" else 1
        for attempt in range(1, attempts + 1):
            started = self._clock.time()
            try:
                buffer = await self._puller.pull(handle)
                break
            except DeviceError as error:
                # Only a transfer that arrived damaged is worth reading again.
                if error.code != "DATA_LOSS" or attempt == attempts:
                    if error.code != "NOT_FOUND":
                        self._puller.release(handle)  # no one will read this copy again
                    raise
                log.warning("KV transfer damaged; pulling again", attempt=attempt)
        self._puller.release(handle)
        await self._model_wire_time(handle, started)
        return self.cache_from(buffer, handle.num_tokens)

    def _held(self, request_id: str, token: str) -> Lease:
        """The lease of ``request_id``, to the holder of its token; a wrong token is
        refused in the words an unknown id is, so it tells nothing about the id."""
        lease = self._engine.lease(request_id, token)
        if lease is None:
            raise DeviceError(
                "NOT_FOUND",
                f"no KV held for request {request_id[:_ECHOED_ID_CHARS]!r} with this token "
                "(expired, released or never made)",
            )
        return lease

    async def _recompute(self, request: device_pb2.DecodeRequest) -> KVCache:
        """The prompt's KV computed on this device, through its own engine and timing."""
        self.recomputes += 1
        local_id = f"{request.request_id}#recompute"
        outcome = await self._engine.prefill(
            local_id, request.prompt, sampling_from_proto(request.sampling)
        )
        if outcome.lease is None:  # the first token ended it; decode still needs the KV
            raise DeviceError("INTERNAL", "local prefill kept no KV")
        self._engine.release_lease(local_id)
        return outcome.lease.cache

    async def _model_wire_time(self, handle: device_pb2.KVHandle, started: float) -> None:
        """Waits until what moving the emulated model's KV over the slower link would take,
        counted from ``started`` (the transfer's start on this device's clock)."""
        if self._engine.time_scale == 0:
            return
        wire_s = wire_seconds(
            handle.num_tokens * handle.emulated_bytes_per_token,
            self._timing.profile.interconnect_gbps,
            handle.link_gbps,
        )
        await self._clock.sleep_until(started + wire_s * self._engine.time_scale)


def _checksum_as(cache: KVCache, layout: KVLayout, pad: memoryview) -> int:
    """The CRC-32 the payload has in ``layout`` (the KV, then any pad): checks a
    converted KV against its source's."""
    n = cache.length
    real = kvlayout.encode(cache.keys[:, :, :n], cache.values[:, :, :n], layout)
    return zlib.crc32(pad, zlib.crc32(real))


class _RelaySink:
    """The data plane's sink: a relay's KV, kept like one pushed over gRPC (same layout only)."""

    def __init__(self, handoff: KVHandoff) -> None:
        self._handoff = handoff

    def prepare(self, handle: bytes) -> None:
        try:
            self._handoff.check_relayed(device_pb2.KVHandle.FromString(handle))
        except DeviceError as error:
            raise dataplane.DataPlaneError(error.code, error.message) from error

    async def accept(
        self, handle: bytes, payload: bytearray, segments: tuple[int, ...], checksum: int
    ) -> bytes:
        message = device_pb2.KVHandle.FromString(handle)
        if len(payload) != message.byte_length or checksum != message.checksum:
            raise dataplane.DataPlaneError(
                "DATA_LOSS", "relayed KV is not the one its handle names; not used"
            )
        try:
            taken = self._handoff.take_relayed(message, payload, segments)
        except DeviceError as error:
            raise dataplane.DataPlaneError(error.code, error.message) from error
        return taken.SerializeToString()
