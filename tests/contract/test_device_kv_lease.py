"""A leased KV is served only to the holder of its lease token, never to a request id alone.

Over every way in: FetchKV and ReleaseKV, the data plane's ``G`` request, a Decode
naming the KV in a forged handle, and the router-side transfer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import zlib
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from backends._gen.hetero.device.v1 import device_pb2
from backends.base import Role
from backends.errors import BackendError
from backends.mock import dataplane
from backends.mock.adapter import MockBackend
from backends.mock.server import DeviceServer
from backends.mock.transfer import LEASE_TOKEN, handle_from_proto
from tests.contract.test_device_protocol import GREEDY, DeviceStub, start_device

# (the victim's token, another lease's token) -> the token a reader shows
Forgery = Callable[[str, str], str]
FORGERIES: dict[str, Forgery] = {
    "missing": lambda own, other: "",
    "wrong": lambda own, other: "0" * len(own),
    "another-lease": lambda own, other: other,
    "prefix": lambda own, other: own[:-1],
    "longer": lambda own, other: own + "0",
    "other-case": lambda own, other: own.upper(),
}


@pytest.fixture
async def holder() -> AsyncIterator[tuple[DeviceServer, DeviceStub]]:
    device = await start_device("p0", (Role.PREFILL,))
    async with grpc.aio.insecure_channel(device.address) as channel:
        yield device, DeviceStub(channel)
    await device.stop(0)


async def _prefill(stub: DeviceStub, request_id: str) -> device_pb2.KVHandle:
    reply = await stub.prefill(
        device_pb2.PrefillRequest(request_id=request_id, prompt="a secret prompt", sampling=GREEDY)
    )
    handle: device_pb2.KVHandle = reply.handle
    return handle


async def _fetch(stub: DeviceStub, request_id: str, token: str) -> bytes:
    layout = (await stub.health(device_pb2.HealthRequest())).layout
    request = device_pb2.FetchKVRequest(
        request_id=request_id, lease_token=token, expected_layout=layout
    )
    return b"".join([chunk.data async for chunk in stub.fetch(request)])


async def _fetch_refusal(stub: DeviceStub, request_id: str, token: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _fetch(stub, request_id, token)
    return raised.value


async def test_each_lease_has_its_own_random_token(holder: tuple[DeviceServer, DeviceStub]) -> None:
    _, stub = holder
    tokens = [(await _prefill(stub, f"t{i}")).lease_token for i in range(8)]
    assert len(set(tokens)) == len(tokens)
    assert all(len(token) == 32 and int(token, 16) >= 0 for token in tokens)


async def test_fetch_with_the_handle_reads_the_kv(holder: tuple[DeviceServer, DeviceStub]) -> None:
    _, stub = holder
    handle = await _prefill(stub, "r1")
    payload = await _fetch(stub, "r1", handle.lease_token)
    assert zlib.crc32(payload) == handle.checksum


@pytest.mark.parametrize("forge", FORGERIES.values(), ids=FORGERIES.keys())
async def test_fetch_and_release_without_the_token_find_nothing(
    holder: tuple[DeviceServer, DeviceStub], forge: Forgery
) -> None:
    device, stub = holder
    victim = await _prefill(stub, "victim")
    other = await _prefill(stub, "other")
    token = forge(victim.lease_token, other.lease_token)

    refused = await _fetch_refusal(stub, "victim", token)
    assert refused.code() == grpc.StatusCode.NOT_FOUND
    release = device_pb2.ReleaseKVRequest(request_id="victim", lease_token=token)
    assert not (await stub.release(release)).released
    assert device.engine.load().kv_leases == 2  # untouched

    # The rightful reader still has it all; once it is gone, the answer is the same
    # word for word as the forger's: a wrong token tells nothing about the id.
    assert zlib.crc32(await _fetch(stub, "victim", victim.lease_token)) == victim.checksum
    rightful = device_pb2.ReleaseKVRequest(request_id="victim", lease_token=victim.lease_token)
    assert (await stub.release(rightful)).released
    gone = await _fetch_refusal(stub, "victim", victim.lease_token)
    assert (gone.code(), gone.details()) == (refused.code(), refused.details())


@pytest.mark.parametrize("forge", FORGERIES.values(), ids=FORGERIES.keys())
async def test_the_data_plane_serves_a_kv_only_with_its_token(
    holder: tuple[DeviceServer, DeviceStub], forge: Forgery
) -> None:
    _, stub = holder
    victim = await _prefill(stub, "victim")
    other = await _prefill(stub, "other")
    buffer = bytearray(victim.byte_length)
    with pytest.raises(dataplane.DataPlaneError) as refused:
        await dataplane.fetch(
            victim.data_address, "victim", forge(victim.lease_token, other.lease_token), buffer
        )
    assert refused.value.code == "NOT_FOUND"
    assert buffer == bytearray(victim.byte_length)  # not a byte of it
    with pytest.raises(dataplane.DataPlaneError) as unknown:
        await dataplane.fetch(victim.data_address, "nobody", victim.lease_token, buffer)
    assert (unknown.value.code, unknown.value.message) == ("NOT_FOUND", refused.value.message)

    whole, _ = await dataplane.fetch(victim.data_address, "victim", victim.lease_token, buffer)
    assert whole == victim.checksum == zlib.crc32(buffer)


async def _raw_request(address: str, request: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


async def test_the_data_plane_refuses_garbage_quietly(
    holder: tuple[DeviceServer, DeviceStub],
) -> None:
    _, stub = holder
    handle = await _prefill(stub, "r1")
    # An unknown operation: the connection closes unanswered.
    assert await _raw_request(handle.data_address, b"X" + b"\0" * 40) == b""
    # An id that is not UTF-8: looked up as it is, and not found.
    token = handle.lease_token.encode()
    garbage = b"\xbc\xff"
    request = b"G" + struct.pack(">H", len(garbage)) + garbage
    request += struct.pack(">B", len(token)) + token + struct.pack(">QQ", 0, 0)
    answer = await _raw_request(handle.data_address, request)
    assert answer[0] == 1  # not found
    assert b"\xbc" not in answer


@pytest.mark.parametrize("colocated", [True, False], ids=["on-the-holder", "pulled"])
async def test_a_decode_with_a_forged_handle_gets_not_found(colocated: bool) -> None:
    holder = await start_device("p1", (Role.PREFILL, Role.DECODE), kv_failure_policy="fail")
    reader = (
        holder if colocated else await start_device("d1", (Role.DECODE,), kv_failure_policy="fail")
    )
    try:
        async with (
            grpc.aio.insecure_channel(holder.address) as holder_channel,
            grpc.aio.insecure_channel(reader.address) as reader_channel,
        ):
            victim = await _prefill(DeviceStub(holder_channel), "victim")
            forged = device_pb2.KVHandle()
            forged.CopyFrom(victim)
            forged.lease_token = "0" * len(victim.lease_token)
            decode = device_pb2.DecodeRequest(
                request_id="thief", prompt="a secret prompt", sampling=GREEDY, handle=forged
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in DeviceStub(reader_channel).decode(decode):
                    pass
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert holder.engine.load().kv_leases == 1  # the victim's KV is still there, unread
    finally:
        await holder.stop(0)
        if not colocated:
            await reader.stop(0)


async def test_the_routers_transfer_reads_only_with_the_handles_token(
    holder: tuple[DeviceServer, DeviceStub],
) -> None:
    device, stub = holder
    handle = handle_from_proto(await _prefill(stub, "r1"))
    adapter = MockBackend("p0", device.address)
    await adapter.start()
    try:
        transfer = adapter.kv_transfer
        assert transfer is not None
        chunks = [transfer.decode_chunk(c) async for c in transfer.read(handle, timeout_s=5)]
        assert zlib.crc32(b"".join(chunk.data for chunk in chunks)) == handle.checksum
        params = {**handle.transport_params, LEASE_TOKEN: "0" * 32}
        forged = dataclasses.replace(handle, transport_params=params)
        with pytest.raises(BackendError, match="NOT_FOUND"):
            async for _ in transfer.read(forged, timeout_s=5):
                pass
    finally:
        await adapter.close()
