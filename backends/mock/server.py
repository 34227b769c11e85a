"""The device server: one mock accelerator behind hetero.device.v1.Device.

Decode and Generate stream frames that the engine already encoded as the front
door's ``GenerateResponse``; they leave this server as bytes, untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import structlog

from backends import kvlayout
from backends._gen.hetero.device.v1 import device_pb2
from backends.base import KVLayout, Role, SamplingParams
from backends.mock import dataplane, wire
from backends.mock.dataplane import DataPlaneServer
from backends.mock.engine import DeviceEngine
from backends.mock.errors import DeviceError
from backends.mock.lease import Lease
from backends.mock.model import KVCache, TinyConfig, TinyTransformer
from backends.perf.batching import LOAD_PREFIX_HASHES
from backends.perf.roofline import TimingModel, load_catalog

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

SERVICE = "hetero.device.v1.Device"
KV_PULL_ATTEMPTS = 3
PUSH_HANDLE_KEY = "x-kv-handle-bin"
# KV failures a local prefill can make good; a wrong layout or role cannot.
_RECOVERABLE = frozenset({"NOT_FOUND", "DATA_LOSS", "UNAVAILABLE", "DEADLINE_EXCEEDED"})
KV_CHUNK_BYTES = 1 << 20
BLOCK_SIZE = 16
# KV chunks of 1 MiB plus protobuf framing must fit a message.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]


@dataclass(frozen=True)
class DeviceConfig:
    backend_id: str
    profile: str
    model: str
    roles: tuple[Role, ...] = (Role.PREFILL, Role.DECODE)
    time_scale: float = 1.0
    kv_lease_s: float = 30.0
    kv_capacity_tokens: int | None = None  # None: what the emulated hardware holds
    decode_step_s: float | None = None  # fixed pace instead of the roofline step
    # Prompt blocks (64 tokens) a prefix cache remembers; a prefill of a cached head is
    # charged for the rest of its prompt only. 0: no prefix cache.
    prefix_cache_blocks: int = 0
    # Chips of the profile the emulated deployment spans; None: the fewest that hold it.
    chips: int | None = None
    # When the KV cannot be had (lease gone, prefill device down, checksum wrong):
    # "retry" pulls it again (up to KV_PULL_ATTEMPTS) then prefills here,
    # "recompute" prefills the prompt here at once, "fail" ends the request.
    kv_failure_policy: Literal["retry", "recompute", "fail"] = "recompute"
    # KV layout: ranks the KV heads split over, and tokens per block.
    tensor_parallel: int = 1
    block_size: int = BLOCK_SIZE
    # Pad leased KV with seeded bytes to the emulated model's size, so transfers
    # move real volumes (benchmarks); the pad is checked, not used.
    emulate_kv_size: bool = False
    # Serve KV bytes on a plain socket beside gRPC (handles name it); off: FetchKV only.
    kv_data_plane: bool = True
    # Fault injection for tests: break the first N data plane transfers midway.
    break_kv_transfers: int = 0
    # Fault injection for tests: flip one bit in each of the first N KV transfers served.
    corrupt_kv_chunks: int = 0
    seed: int = 0


def modelled_wire_s(nbytes: int, *links_gbps: float) -> float:
    """Seconds to move ``nbytes`` over the slowest of the links (Gbit/s; 0 = unknown)."""
    known = [link for link in links_gbps if link > 0]
    return nbytes * 8 / (min(known) * 1e9) if known and nbytes else 0.0


def layout_of(
    config: TinyConfig, tensor_parallel: int = 1, block_size: int = BLOCK_SIZE
) -> KVLayout:
    return KVLayout(
        layers=config.layers,
        kv_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        dtype="float32",
        block_size=block_size,
        tensor_parallel=tensor_parallel,
    )


def layout_to_proto(layout: KVLayout) -> device_pb2.KVLayout:
    return device_pb2.KVLayout(
        layers=layout.layers,
        kv_heads=layout.kv_heads,
        head_dim=layout.head_dim,
        dtype=layout.dtype,
        block_size=layout.block_size,
        tensor_parallel=layout.tensor_parallel,
    )


def layout_from_proto(message: device_pb2.KVLayout) -> KVLayout:
    return KVLayout(
        layers=message.layers,
        kv_heads=message.kv_heads,
        head_dim=message.head_dim,
        dtype=message.dtype,
        block_size=message.block_size,
        tensor_parallel=message.tensor_parallel,
    )


def sampling_from_proto(message: device_pb2.Sampling) -> SamplingParams:
    return SamplingParams(
        max_tokens=message.max_tokens,
        temperature=message.temperature,
        top_p=message.top_p,
        seed=message.seed,
        stop=tuple(message.stop),
    )


async def _receive(chunks: AsyncIterator[device_pb2.KVChunk], byte_length: int) -> bytearray:
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


class _PushedKV:
    """The data plane's sink: a relay's KV, kept like one pushed over gRPC (same layout only)."""

    def __init__(self, device: DeviceServer) -> None:
        self._device = device

    def prepare(self, handle: bytes) -> None:
        message = device_pb2.KVHandle.FromString(handle)
        try:
            self._device._check_role(Role.DECODE)
            self._device._check_layout(layout_from_proto(message.layout))
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
        device = self._device
        try:
            cache = device._cache_from(payload, message.num_tokens)
            # Every segment matched the holder's checksums: the whole is the holder's payload.
            checksums = (message.checksum, segments)
            lease = device.engine.adopt(message.request_id, cache, payload, checksums)
        except DeviceError as error:
            raise dataplane.DataPlaneError(error.code, error.message) from error
        return device._handle(message.request_id, lease).SerializeToString()


class DeviceServer:
    def __init__(self, config: DeviceConfig) -> None:
        catalog = load_catalog()
        if config.profile not in catalog.profiles:
            known = ", ".join(sorted(catalog.profiles))
            raise ValueError(f"unknown device profile {config.profile!r}; known: {known}")
        if config.model not in catalog.models:
            known = ", ".join(sorted(catalog.models))
            raise ValueError(f"unknown model {config.model!r}; known: {known}")
        self.config = config
        self.model = TinyTransformer(TinyConfig(seed=config.seed))
        self.layout = layout_of(self.model.config, config.tensor_parallel, config.block_size)
        reason = kvlayout.incompatibility(self.layout, self.layout)
        if reason is not None:
            raise ValueError(reason)
        self.timing = TimingModel(
            catalog.profiles[config.profile], catalog.models[config.model], config.chips
        )
        self.engine = DeviceEngine(
            self.model,
            self.timing,
            time_scale=config.time_scale,
            kv_lease_s=config.kv_lease_s,
            kv_capacity_tokens=config.kv_capacity_tokens,
            decode_step_s=config.decode_step_s,
            prefix_cache_blocks=config.prefix_cache_blocks,
            kv_layout=self.layout,
            filler_bytes_per_token=(
                max(0, self.timing.model.kv_bytes_per_token - kvlayout.token_bytes(self.layout))
                if config.emulate_kv_size
                else 0
            ),
        )
        self.address = ""
        # Requests that reached this device (Prefill, Decode, Generate): tests use it to
        # prove that bad input never gets this far.
        self.requests_received = 0
        self.kv_recomputes = 0
        self.kv_pull_attempts = 0
        self.kv_fetches_served = 0  # over gRPC FetchKV
        self._corruptions_left = config.corrupt_kv_chunks
        self._breaks_left = config.break_kv_transfers
        self._server: grpc.aio.Server | None = None
        self._peers: dict[str, grpc.aio.Channel] = {}
        self._data_plane = DataPlaneServer(self._wire_payload, _PushedKV(self))
        self._data_address = ""
        self._background: set[asyncio.Task[None]] = set()

    async def start(self, listen: str = "127.0.0.1:0") -> int:
        """Serves on ``listen``; returns the bound port (useful with port 0)."""
        self._server = grpc.aio.server(options=CHANNEL_OPTIONS)
        self._server.add_generic_rpc_handlers((self._handlers(),))
        port: int = self._server.add_insecure_port(listen)
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        host = listen.rpartition(":")[0]
        self.address = f"{host}:{port}"
        if self.config.kv_data_plane:
            data_port = await self._data_plane.start(host)
            self._data_address = f"{host}:{data_port}"
        self.engine.start()
        await self._server.start()
        return port

    async def stop(self, grace_s: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
        await self._data_plane.stop()
        await self.engine.stop()
        for channel in self._peers.values():
            await channel.close()

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    def _handlers(self) -> grpc.GenericRpcHandler:
        def unary(behavior: Callable[..., Any], request_type: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                behavior,
                request_deserializer=request_type.FromString,
                response_serializer=lambda message: message.SerializeToString(),
            )

        def stream(
            behavior: Callable[..., Any], request_type: Any, *, raw: bool = False
        ) -> grpc.RpcMethodHandler:
            return grpc.unary_stream_rpc_method_handler(
                behavior,
                request_deserializer=request_type.FromString,
                # Raw streams yield frames the engine already encoded.
                response_serializer=None if raw else lambda message: message.SerializeToString(),
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Prefill": unary(self._prefill, device_pb2.PrefillRequest),
                "FetchKV": stream(self._fetch_kv, device_pb2.FetchKVRequest),
                "PushKV": grpc.stream_unary_rpc_method_handler(
                    self._push_kv,
                    request_deserializer=device_pb2.KVChunk.FromString,
                    response_serializer=device_pb2.PushKVResponse.SerializeToString,
                ),
                "ReleaseKV": unary(self._release_kv, device_pb2.ReleaseKVRequest),
                "Decode": stream(self._decode, device_pb2.DecodeRequest, raw=True),
                "Generate": stream(self._generate, device_pb2.DeviceGenerateRequest, raw=True),
                "Session": grpc.stream_stream_rpc_method_handler(
                    self._session,
                    request_deserializer=device_pb2.SessionRequest.FromString,
                    response_serializer=None,  # frames are built as bytes
                ),
                "Abort": unary(self._abort, device_pb2.AbortRequest),
                "Health": unary(self._health, device_pb2.HealthRequest),
                "Load": unary(self._load, device_pb2.LoadRequest),
            },
        )

    # -- RPCs ------------------------------------------------------------------

    async def _prefill(
        self, request: device_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.PrefillResponse:
        self.requests_received += 1
        try:
            self._check_role(Role.PREFILL)
            outcome = await self.engine.prefill(
                request.request_id, request.prompt, sampling_from_proto(request.sampling)
            )
        except DeviceError as error:
            await context.abort(grpc.StatusCode[error.code], error.message)
        response = device_pb2.PrefillResponse(
            first_frame=outcome.first_frame,
            first_token_id=outcome.first_token_id,
            finished=outcome.finished,
            prompt_tokens=outcome.prompt_tokens,
        )
        if outcome.lease is not None:
            response.handle.CopyFrom(self._handle(request.request_id, outcome.lease))
        return response

    def _corrupt_next(self) -> bool:
        """Fault injection: whether the transfer starting now gets a flipped bit."""
        if self._corruptions_left <= 0:
            return False
        self._corruptions_left -= 1
        return True

    def _wire_payload(self, request_id: str) -> dataplane.Served | None:
        """What the data plane serves for a request: its leased KV (maybe damaged, in tests)."""
        lease = self.engine.lease(request_id)
        if lease is None:
            return None
        if self._breaks_left > 0:
            self._breaks_left -= 1
            half = len(lease.payload) // 2
            return dataplane.Served(lease.payload, None, lease.checksum, break_after=half)
        if not self._corrupt_next():
            return dataplane.Served(lease.payload, lease.segment_checksums, lease.checksum)
        damaged = bytearray(lease.payload)
        damaged[0] ^= 1
        return dataplane.Served(damaged, lease.segment_checksums, lease.checksum)

    def _handle(self, request_id: str, lease: Lease) -> device_pb2.KVHandle:
        """The handle of a KV this device holds."""
        return device_pb2.KVHandle(
            backend_id=self.config.backend_id,
            address=self.address,
            request_id=request_id,
            block_ids=range(math.ceil(lease.num_tokens / BLOCK_SIZE)),
            layout=layout_to_proto(self.layout),
            num_tokens=lease.num_tokens,
            byte_length=len(lease.payload),
            checksum=lease.checksum,
            lease_expires_at=lease.expires_at,
            link_gbps=self.timing.profile.interconnect_gbps,
            emulated_bytes_per_token=self.timing.model.kv_bytes_per_token,
            data_address=self._data_address,
        )

    async def _push_kv(
        self, chunks: AsyncIterator[device_pb2.KVChunk], context: grpc.aio.ServicerContext
    ) -> device_pb2.PushKVResponse:
        """Keeps a KV a relay pushes, checked chunk by chunk and whole."""
        metadata = dict(context.invocation_metadata() or ())
        try:
            self._check_role(Role.DECODE)
            handle = device_pb2.KVHandle.FromString(metadata[PUSH_HANDLE_KEY])
            source = layout_from_proto(handle.layout)
            reason = kvlayout.incompatibility(source, self.layout)
            if reason is not None:
                raise DeviceError("FAILED_PRECONDITION", f"KV layout cannot convert: {reason}")
            started = time.monotonic()
            buffer = await _receive(chunks, handle.byte_length)
            cache = self._cache_from(buffer, handle.num_tokens)
            # A converted KV is checked as its source laid it out; an unconverted one as is.
            pad = memoryview(buffer)[handle.num_tokens * kvlayout.token_bytes(source) :]
            checksum = (
                zlib.crc32(buffer)
                if source == self.layout
                else self._checksum_as(cache, source, pad)
            )
            if checksum != handle.checksum:
                raise DeviceError("DATA_LOSS", "relayed KV failed its checksum; not used")
            await self._model_wire_time(handle, time.monotonic() - started)
            lease = self.engine.adopt(handle.request_id, cache, buffer)
        except KeyError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{PUSH_HANDLE_KEY} missing")
            raise
        except DeviceError as error:
            await context.abort(grpc.StatusCode[error.code], error.message)
            raise
        return device_pb2.PushKVResponse(handle=self._handle(handle.request_id, lease))

    async def _fetch_kv(
        self, request: device_pb2.FetchKVRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[device_pb2.KVChunk]:
        self.kv_fetches_served += 1
        lease = self.engine.lease(request.request_id)
        if lease is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no KV held for request {request.request_id} (expired, released or never made)",
            )
            return
        try:
            self._check_layout(layout_from_proto(request.expected_layout))
        except DeviceError as error:
            await context.abort(grpc.StatusCode[error.code], error.message)
        chunk = request.chunk_bytes or KV_CHUNK_BYTES
        view = memoryview(lease.payload)
        end = request.offset + request.length if request.length else len(view)
        if not request.offset <= end <= len(view):
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"bytes {request.offset}..{end} of {len(view)}"
            )
        for offset in range(request.offset, end, chunk):
            piece = view[offset : min(offset + chunk, end)]
            data = bytes(piece)
            if offset == request.offset and self._corrupt_next():
                data = bytes([data[0] ^ 1]) + data[1:]
            yield device_pb2.KVChunk(offset=offset, data=data, checksum=zlib.crc32(piece))
        # The lease stays until the reader, having checked every byte, releases it.

    async def _release_kv(
        self, request: device_pb2.ReleaseKVRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.ReleaseKVResponse:
        return device_pb2.ReleaseKVResponse(released=self.engine.release_lease(request.request_id))

    async def _decode(
        self, request: device_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for frame in self._guard(self._decode_frames(request), context):
            yield frame

    async def _generate(
        self, request: device_pb2.DeviceGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for frame in self._guard(self._generate_frames(request), context):
            yield frame

    async def _decode_frames(
        self, request: device_pb2.DecodeRequest
    ) -> AsyncGenerator[bytes, None]:
        self.requests_received += 1
        self._check_role(Role.DECODE)
        handle = request.handle
        self._check_layout(layout_from_proto(handle.layout))
        try:
            cache = await self._obtain_kv(handle)
        except DeviceError as error:
            if self.config.kv_failure_policy == "fail" or error.code not in _RECOVERABLE:
                raise
            log.warning(
                "KV unavailable; prefilling here", request=request.request_id, error=error.message
            )
            cache = await self._recompute_kv(request)
        frames = self.engine.decode(
            request.request_id,
            request.prompt,
            sampling_from_proto(request.sampling),
            cache,
            request.first_token_id,
        )
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame

    async def _generate_frames(
        self, request: device_pb2.DeviceGenerateRequest
    ) -> AsyncGenerator[bytes, None]:
        self.requests_received += 1
        self._check_role(Role.DECODE)
        frames = self.engine.generate(
            request.request_id, request.prompt, sampling_from_proto(request.sampling)
        )
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame

    async def _session(
        self,
        requests: AsyncIterator[device_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        """Serves the requests of one session concurrently; one writer interleaves their frames."""
        outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()
        streams: dict[int, asyncio.Task[None]] = {}

        async def serve(stream_id: int, frames: AsyncGenerator[bytes, None]) -> None:
            code, message = 0, ""
            try:
                async with contextlib.aclosing(frames):
                    async for frame in frames:
                        outgoing.put_nowait(wire.session_frame(stream_id, frame))
            except DeviceError as error:
                code, message = grpc.StatusCode[error.code].value[0], error.message
            except asyncio.CancelledError:
                return  # the caller cancelled: it expects nothing more
            except Exception as error:  # a device bug must end one stream, not the session
                code, message = grpc.StatusCode.INTERNAL.value[0], f"device error: {error}"
            finally:
                streams.pop(stream_id, None)
            outgoing.put_nowait(wire.session_status(stream_id, code, message))

        async def read() -> None:
            async for request in requests:
                body = request.WhichOneof("body")
                if body == "cancel":
                    task = streams.pop(request.stream_id, None)
                    if task is not None:
                        task.cancel()
                    continue
                frames = (
                    self._decode_frames(request.decode)
                    if body == "decode"
                    else self._generate_frames(request.generate)
                )
                streams[request.stream_id] = asyncio.create_task(serve(request.stream_id, frames))
            # The caller closed its side: finish what is running, then end.
            await asyncio.gather(*streams.values(), return_exceptions=True)
            outgoing.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await outgoing.get()) is not None:
                # Everything ready goes in one message: one write per decode step,
                # not one per token.
                ready = [item]
                while not outgoing.empty() and (item := outgoing.get_nowait()) is not None:
                    ready.append(item)
                yield wire.pack(ready)
                if item is None:
                    break
        finally:
            reader.cancel()
            for task in list(streams.values()):
                task.cancel()

    async def _abort(
        self, request: device_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.AbortResponse:
        return device_pb2.AbortResponse(found=self.engine.abort(request.request_id))

    async def _health(
        self, request: device_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.HealthResponse:
        return device_pb2.HealthResponse(
            serving=True,
            backend_id=self.config.backend_id,
            model=self.config.model,
            profile=self.config.profile,
            layout=layout_to_proto(self.layout),
            roles=[role.value for role in self.config.roles],
            data_address=self._data_address,
        )

    async def _load(
        self, request: device_pb2.LoadRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.LoadResponse:
        load = self.engine.load()
        return device_pb2.LoadResponse(
            waiting=load.waiting,
            running=load.running,
            kv_tokens_used=load.kv_tokens_used,
            kv_tokens_capacity=load.kv_tokens_capacity,
            kv_leases=load.kv_leases,
            # The most recently used first, capped: a router matches prompt heads, which
            # a long-idle tail of the cache rarely serves.
            cached_prefix_hashes=self.engine.prefix_cache.recent(LOAD_PREFIX_HASHES),
        )

    # -- helpers ---------------------------------------------------------------

    @staticmethod
    async def _guard(
        frames: AsyncGenerator[bytes, None], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Maps device errors to statuses; closing the stream aborts the sequence."""
        try:
            async for frame in frames:
                yield frame
        except DeviceError as error:
            await context.abort(grpc.StatusCode[error.code], error.message)
        finally:
            await frames.aclose()

    def _check_role(self, role: Role) -> None:
        if role not in self.config.roles:
            raise DeviceError(
                "FAILED_PRECONDITION",
                f"device {self.config.backend_id} does not take the {role.value} role",
            )

    def _check_layout(self, layout: KVLayout) -> None:
        if layout != self.layout:
            raise DeviceError(
                "FAILED_PRECONDITION",
                f"KV layout mismatch: got {layout.describe()}, "
                f"device {self.config.backend_id} uses {self.layout.describe()}",
            )

    async def _recompute_kv(self, request: device_pb2.DecodeRequest) -> KVCache:
        """The prompt's KV computed on this device, through its own engine and timing.

        Bit-identical to the KV the prefill device made (same model, same maths), so
        the request still yields exactly the tokens it would have.
        """
        self.kv_recomputes += 1
        local_id = f"{request.request_id}#recompute"
        outcome = await self.engine.prefill(
            local_id, request.prompt, sampling_from_proto(request.sampling)
        )
        if outcome.lease is None:  # the first token ended it; decode still needs the KV
            raise DeviceError("INTERNAL", "local prefill kept no KV")
        self.engine.release_lease(local_id)
        return outcome.lease.cache

    async def _obtain_kv(self, handle: device_pb2.KVHandle) -> KVCache:
        """The KV of the handle: taken locally, or pulled from the device that holds it."""
        if handle.backend_id == self.config.backend_id:
            lease = self.engine.lease(handle.request_id)
            if lease is None:
                raise DeviceError("NOT_FOUND", f"no KV held for request {handle.request_id}")
            self.engine.release_lease(handle.request_id)
            return lease.cache
        attempts = KV_PULL_ATTEMPTS if self.config.kv_failure_policy == "retry" else 1
        for attempt in range(1, attempts + 1):
            started = time.monotonic()
            try:
                buffer = await self._pull(handle)
                break
            except DeviceError as error:
                # Only a transfer that arrived damaged is worth reading again.
                if error.code != "DATA_LOSS" or attempt == attempts:
                    if error.code != "NOT_FOUND":
                        self._release_remote(handle)  # no one will read this copy again
                    raise
                log.warning("KV transfer damaged; pulling again", attempt=attempt)
        self._release_remote(handle)
        await self._model_wire_time(handle, time.monotonic() - started)
        return self._cache_from(buffer, handle.num_tokens)

    def _cache_from(self, buffer: bytearray, num_tokens: int) -> KVCache:
        """A cache from a payload in this device's layout (any size pad after it ignored)."""
        real = memoryview(buffer)[: num_tokens * kvlayout.token_bytes(self.layout)]
        keys, values = kvlayout.decode(real, self.layout, num_tokens)
        cache = KVCache.allocate(self.model.config, num_tokens)
        cache.keys[:, :, :num_tokens] = keys
        cache.values[:, :, :num_tokens] = values
        cache.length = num_tokens
        return cache

    @staticmethod
    def _checksum_as(cache: KVCache, layout: KVLayout, pad: memoryview) -> int:
        """The CRC-32 the payload has in ``layout`` (the KV, then any pad): checks a
        converted KV against its source's."""
        n = cache.length
        real = kvlayout.encode(cache.keys[:, :, :n], cache.values[:, :, :n], layout)
        return zlib.crc32(pad, zlib.crc32(real))

    async def _pull(self, handle: device_pb2.KVHandle) -> bytearray:
        """Every byte of the handle, each chunk checked as it lands and the whole at the end."""
        self.kv_pull_attempts += 1
        if handle.data_address:
            buffer = bytearray(handle.byte_length)
            try:
                # Checked segment by segment against the holder's own checksums...
                whole, _ = await dataplane.fetch(handle.data_address, handle.request_id, buffer)
            except dataplane.DataPlaneError as error:
                raise DeviceError(
                    error.code, f"KV from {handle.backend_id}: {error.message}"
                ) from error
            if whole != handle.checksum:  # ...and as the KV the handle names
                raise DeviceError(
                    "DATA_LOSS", f"KV from {handle.backend_id} failed its checksum; not used"
                )
            return buffer
        fetch = self._peer(handle.address).unary_stream(
            f"/{SERVICE}/FetchKV",
            request_serializer=device_pb2.FetchKVRequest.SerializeToString,
            response_deserializer=device_pb2.KVChunk.FromString,
        )
        call = fetch(
            device_pb2.FetchKVRequest(
                request_id=handle.request_id,
                expected_layout=handle.layout,
                chunk_bytes=KV_CHUNK_BYTES,
            ),
            timeout=30.0,
        )
        try:
            buffer = await _receive(call, handle.byte_length)
        except grpc.aio.AioRpcError as error:
            raise DeviceError(
                "UNAVAILABLE" if error.code() != grpc.StatusCode.NOT_FOUND else "NOT_FOUND",
                f"KV fetch from {handle.backend_id} failed: {error.details()}",
            ) from error
        finally:
            call.cancel()  # stops the sender at once when a chunk was refused
        if zlib.crc32(buffer) != handle.checksum:
            raise DeviceError(
                "DATA_LOSS", f"KV from {handle.backend_id} failed its checksum; not used"
            )
        return buffer
        if zlib.crc32(buffer) != handle.checksum:
            raise DeviceError(
                "DATA_LOSS", f"KV from {handle.backend_id} failed its checksum; not used"
            )
        return buffer

    def _release_remote(self, handle: device_pb2.KVHandle) -> None:
        """Frees the holder's lease now that every byte is here; its expiry is the backstop."""
        release = self._peer(handle.address).unary_unary(
            f"/{SERVICE}/ReleaseKV",
            request_serializer=device_pb2.ReleaseKVRequest.SerializeToString,
            response_deserializer=device_pb2.ReleaseKVResponse.FromString,
        )

        async def send() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await release(device_pb2.ReleaseKVRequest(request_id=handle.request_id), timeout=5)

        task = asyncio.create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _model_wire_time(self, handle: device_pb2.KVHandle, spent_s: float) -> None:
        """Waits out what moving the emulated model's KV would take over the slower link."""
        if self.engine.time_scale == 0:
            return
        wire_s = modelled_wire_s(
            handle.num_tokens * handle.emulated_bytes_per_token,
            self.timing.profile.interconnect_gbps,
            handle.link_gbps,
        )
        await asyncio.sleep(max(0.0, wire_s * self.engine.time_scale - spent_s))

    def _peer(self, address: str) -> grpc.aio.Channel:
        channel = self._peers.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._peers[address] = channel
        return channel
