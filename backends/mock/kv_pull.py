"""A decode device pulling a KV from the device that holds it, then freeing it there.

Over the holder's data plane when its handle names one (bytes straight into one
buffer), else over FetchKV; either way every byte is checked before it is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib

import grpc

from backends._gen.hetero.device.v1 import device_pb2
from backends.mock import dataplane, kv_bytes
from backends.mock.errors import DeviceError
from backends.mock.protocol import CHANNEL_OPTIONS, KV_CHUNK_BYTES, SERVICE


class KVPuller:
    """Pulls through one channel per peer device, kept open for the next pull."""

    def __init__(self) -> None:
        self._peers: dict[str, grpc.aio.Channel] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.attempts = 0

    async def close(self) -> None:
        # Releases still on their way die with the channels; the holders' leases expire.
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for channel in self._peers.values():
            await channel.close()

    async def pull(self, handle: device_pb2.KVHandle) -> bytearray:
        """Every byte of the handle, each chunk checked as it lands and the whole at the end."""
        self.attempts += 1
        if handle.data_address:
            return await self._over_data_plane(handle)
        return await self._over_grpc(handle)

    def release(self, handle: device_pb2.KVHandle) -> None:
        """Frees the holder's lease now that every byte is here; its expiry is the backstop."""
        release = self._peer(handle.address).unary_unary(
            f"/{SERVICE}/ReleaseKV",
            request_serializer=device_pb2.ReleaseKVRequest.SerializeToString,
            response_deserializer=device_pb2.ReleaseKVResponse.FromString,
        )

        async def send() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                message = device_pb2.ReleaseKVRequest(
                    request_id=handle.request_id, lease_token=handle.lease_token
                )
                await release(message, timeout=5)

        task = asyncio.create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _over_data_plane(self, handle: device_pb2.KVHandle) -> bytearray:
        buffer = bytearray(handle.byte_length)
        try:
            # Checked segment by segment against the holder's own checksums...
            whole, _ = await dataplane.fetch(
                handle.data_address, handle.request_id, handle.lease_token, buffer
            )
        except dataplane.DataPlaneError as error:
            message = f"KV from {handle.backend_id}: {error.message}"
            raise DeviceError(error.code, message) from error
        if whole != handle.checksum:  # ...and as the KV the handle names
            raise DeviceError(
                "DATA_LOSS", f"KV from {handle.backend_id} failed its checksum; not used"
            )
        return buffer

    async def _over_grpc(self, handle: device_pb2.KVHandle) -> bytearray:
        fetch = self._peer(handle.address).unary_stream(
            f"/{SERVICE}/FetchKV",
            request_serializer=device_pb2.FetchKVRequest.SerializeToString,
            response_deserializer=device_pb2.KVChunk.FromString,
        )
        call = fetch(
            device_pb2.FetchKVRequest(
                request_id=handle.request_id,
                lease_token=handle.lease_token,
                expected_layout=handle.layout,
                chunk_bytes=KV_CHUNK_BYTES,
            ),
            timeout=30.0,
        )
        try:
            buffer = await kv_bytes.receive(call, handle.byte_length)
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

    def _peer(self, address: str) -> grpc.aio.Channel:
        channel = self._peers.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._peers[address] = channel
        return channel
