"""hetero.device.v1 as a client sees it, against a real device server on 127.0.0.1."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from backends._gen.hetero.device.v1 import device_pb2
from backends._gen.hetero.router.v1 import router_pb2
from backends.base import KVHandle, KVLayout, Role
from backends.errors import LayoutMismatchError
from backends.mock.adapter import MockBackend
from backends.mock.config import DeviceConfig
from backends.mock.protocol import SERVICE
from backends.mock.server import DeviceServer
from tests.helpers import eventually

GREEDY = device_pb2.Sampling(max_tokens=12, temperature=0.0, top_p=1.0, seed=7)


class DeviceStub:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        def unary(name: str, response: Any) -> Any:
            return channel.unary_unary(
                f"/{SERVICE}/{name}",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response.FromString,
            )

        def stream(name: str, response: Any) -> Any:
            return channel.unary_stream(
                f"/{SERVICE}/{name}",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response.FromString,
            )

        self.prefill = unary("Prefill", device_pb2.PrefillResponse)
        self.release = unary("ReleaseKV", device_pb2.ReleaseKVResponse)
        self.abort = unary("Abort", device_pb2.AbortResponse)
        self.health = unary("Health", device_pb2.HealthResponse)
        self.load = unary("Load", device_pb2.LoadResponse)
        self.fetch = stream("FetchKV", device_pb2.KVChunk)
        self.decode = stream("Decode", router_pb2.GenerateResponse)
        self.generate = stream("Generate", router_pb2.GenerateResponse)


async def start_device(backend_id: str, roles: tuple[Role, ...], **options: Any) -> DeviceServer:
    device = DeviceServer(
        DeviceConfig(
            backend_id=backend_id,
            profile="h100",
            model="llama-3.1-8b",
            roles=roles,
            time_scale=0.0,
            **options,
        )
    )
    await device.start("127.0.0.1:0")
    return device


@pytest.fixture
async def pair() -> AsyncIterator[tuple[DeviceServer, DeviceServer, DeviceStub, DeviceStub]]:
    prefill = await start_device("p0", (Role.PREFILL,))
    decode = await start_device("d0", (Role.DECODE,))
    async with (
        grpc.aio.insecure_channel(prefill.address) as prefill_channel,
        grpc.aio.insecure_channel(decode.address) as decode_channel,
    ):
        yield prefill, decode, DeviceStub(prefill_channel), DeviceStub(decode_channel)
    await prefill.stop(0)
    await decode.stop(0)


async def test_health_describes_the_device(pair: Any) -> None:
    _, _, prefill, _ = pair
    reply = await prefill.health(device_pb2.HealthRequest())
    assert reply.serving
    assert reply.backend_id == "p0"
    assert reply.profile == "h100"
    assert reply.model == "llama-3.1-8b"
    assert list(reply.roles) == ["prefill"]
    assert reply.layout.dtype == "float32"
    assert reply.layout.layers > 0


async def test_prefill_leases_kv_that_fetch_returns_intact(pair: Any) -> None:
    _, _, prefill, _ = pair
    reply = await prefill.prefill(
        device_pb2.PrefillRequest(request_id="r1", prompt="hello world", sampling=GREEDY)
    )
    handle = reply.handle
    assert not reply.finished
    assert handle.num_tokens == len("hello world") + 1  # BOS + bytes
    layout = handle.layout
    assert (
        handle.byte_length
        == 2 * layout.layers * layout.kv_heads * handle.num_tokens * layout.head_dim * 4
    )
    assert (await prefill.load(device_pb2.LoadRequest())).kv_leases == 1
    first = router_pb2.GenerateResponse.FromString(reply.first_frame)
    assert list(first.token_ids) in ([reply.first_token_id], [])

    payload = bytearray()
    async for chunk in prefill.fetch(
        device_pb2.FetchKVRequest(
            request_id="r1",
            lease_token=handle.lease_token,
            expected_layout=layout,
            chunk_bytes=100,
        )
    ):
        assert chunk.offset == len(payload)
        assert zlib.crc32(chunk.data) == chunk.checksum
        payload += chunk.data
    assert len(payload) == handle.byte_length
    assert zlib.crc32(payload) == handle.checksum
    # Still leased until the reader says it has every byte: a damaged read can be redone.
    load = await prefill.load(device_pb2.LoadRequest())
    assert (load.kv_leases, load.kv_bytes_sent) == (1, handle.byte_length)
    release = device_pb2.ReleaseKVRequest(request_id="r1", lease_token=handle.lease_token)
    assert (await prefill.release(release)).released
    load = await prefill.load(device_pb2.LoadRequest())
    assert (load.kv_leases, load.kv_tokens_used) == (0, 0)


async def test_fetch_of_unknown_kv_is_not_found(pair: Any) -> None:
    _, _, prefill, _ = pair
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in prefill.fetch(device_pb2.FetchKVRequest(request_id="nope")):
            pass
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_layout_mismatch_is_refused_before_any_byte_moves(pair: Any) -> None:
    _, decode_device, prefill, decode = pair
    reply = await prefill.prefill(
        device_pb2.PrefillRequest(request_id="r2", prompt="layouts", sampling=GREEDY)
    )
    wrong = device_pb2.KVHandle()
    wrong.CopyFrom(reply.handle)
    wrong.layout.dtype = "bfloat16"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in decode.decode(
            device_pb2.DecodeRequest(
                request_id="r2",
                prompt="layouts",
                sampling=GREEDY,
                handle=wrong,
                first_token_id=reply.first_token_id,
            )
        ):
            pass
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "layout mismatch" in (raised.value.details() or "")
    # Nothing was fetched: the prefill device still holds the lease.
    assert (await prefill.load(device_pb2.LoadRequest())).kv_leases == 1
    assert decode_device.engine.load().running == 0


async def _decode_with(
    prefill: DeviceStub, decode: DeviceStub, request_id: str, corrupt: bool
) -> list[router_pb2.GenerateResponse]:
    reply = await prefill.prefill(
        device_pb2.PrefillRequest(request_id=request_id, prompt="checksum", sampling=GREEDY)
    )
    handle = device_pb2.KVHandle()
    handle.CopyFrom(reply.handle)
    if corrupt:
        handle.checksum ^= 1
    request = device_pb2.DecodeRequest(
        request_id=request_id,
        prompt="checksum",
        sampling=GREEDY,
        handle=handle,
        first_token_id=reply.first_token_id,
    )
    return [frame async for frame in decode.decode(request)]


async def test_corrupt_kv_is_recomputed_and_gives_the_same_tokens(pair: Any) -> None:
    _, decode_device, prefill, decode = pair
    clean = await _decode_with(prefill, decode, "r3a", corrupt=False)
    recovered = await _decode_with(prefill, decode, "r3b", corrupt=True)
    assert decode_device.kv_recomputes == 1
    assert [list(f.token_ids) for f in recovered] == [list(f.token_ids) for f in clean]
    assert decode_device.engine.load().kv_tokens_used == 0


async def test_corrupt_kv_fails_its_checksum_when_the_policy_is_fail(pair: Any) -> None:
    _, _, prefill, _ = pair
    strict = await start_device("d9", (Role.DECODE,), kv_failure_policy="fail")
    try:
        async with grpc.aio.insecure_channel(strict.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _decode_with(prefill, DeviceStub(channel), "r3c", corrupt=True)
        assert raised.value.code() == grpc.StatusCode.DATA_LOSS
        assert strict.kv_recomputes == 0
    finally:
        await strict.stop(0)


async def test_decode_pulls_kv_and_streams_the_rest(pair: Any) -> None:
    prefill_device, decode_device, prefill, decode = pair
    reply = await prefill.prefill(
        device_pb2.PrefillRequest(request_id="r4", prompt="pull me", sampling=GREEDY)
    )
    frames = [
        frame
        async for frame in decode.decode(
            device_pb2.DecodeRequest(
                request_id="r4",
                prompt="pull me",
                sampling=GREEDY,
                handle=reply.handle,
                first_token_id=reply.first_token_id,
            )
        )
    ]
    assert frames[-1].finish_reason != 0
    assert frames[-1].usage.prompt_tokens == len("pull me") + 1
    await eventually(lambda: prefill_device.engine.load().kv_leases == 0)
    assert decode_device.engine.load().kv_tokens_used == 0
    # Pulled over the holder's data plane: the holder counts every byte it sent, once.
    assert reply.handle.data_address
    assert (await prefill.load(device_pb2.LoadRequest())).kv_bytes_sent == reply.handle.byte_length
    assert (await decode.load(device_pb2.LoadRequest())).kv_bytes_sent == 0


async def test_roles_are_enforced(pair: Any) -> None:
    _, _, prefill, decode = pair
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in prefill.generate(
            device_pb2.DeviceGenerateRequest(request_id="g", prompt="x", sampling=GREEDY)
        ):
            pass
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await decode.prefill(device_pb2.PrefillRequest(request_id="p", prompt="x", sampling=GREEDY))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_unclaimed_kv_lease_expires() -> None:
    device = await start_device("p1", (Role.PREFILL,), kv_lease_s=0.05)
    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            stub = DeviceStub(channel)
            reply = await stub.prefill(
                device_pb2.PrefillRequest(request_id="lease", prompt="expire", sampling=GREEDY)
            )
            assert reply.handle.lease_expires_at > 0
            assert device.engine.load().kv_leases == 1
            await eventually(lambda: device.engine.load().kv_leases == 0)
            assert device.engine.load().kv_tokens_used == 0
    finally:
        await device.stop(0)


async def test_abort_releases_a_lease_and_unknown_ids_are_fine(pair: Any) -> None:
    prefill_device, _, prefill, _ = pair
    await prefill.prefill(
        device_pb2.PrefillRequest(request_id="a1", prompt="abort", sampling=GREEDY)
    )
    assert (await prefill.abort(device_pb2.AbortRequest(request_id="a1"))).found
    assert not (await prefill.abort(device_pb2.AbortRequest(request_id="a1"))).found
    assert prefill_device.engine.load().kv_tokens_used == 0


async def test_generate_streams_frames_that_end_with_usage() -> None:
    device = await start_device("b0", (Role.PREFILL, Role.DECODE))
    try:
        async with grpc.aio.insecure_channel(device.address) as channel:
            frames = [
                frame
                async for frame in DeviceStub(channel).generate(
                    device_pb2.DeviceGenerateRequest(request_id="g1", prompt="hi", sampling=GREEDY)
                )
            ]
        tokens = [t for f in frames for t in f.token_ids]
        assert all(f.finish_reason == 0 for f in frames[:-1])
        assert frames[-1].usage.completion_tokens >= len(tokens)
        assert frames[-1].usage.completion_tokens <= GREEDY.max_tokens
    finally:
        await device.stop(0)


async def test_a_damaged_chunk_is_pulled_again_under_the_retry_policy() -> None:
    prefill_device = await start_device("p7", (Role.PREFILL,), corrupt_kv_chunks=1)
    decode_device = await start_device("d7", (Role.DECODE,), kv_failure_policy="retry")
    try:
        async with (
            grpc.aio.insecure_channel(prefill_device.address) as prefill_channel,
            grpc.aio.insecure_channel(decode_device.address) as decode_channel,
        ):
            frames = await _decode_with(
                DeviceStub(prefill_channel), DeviceStub(decode_channel), "r7", corrupt=False
            )
        assert frames[-1].finish_reason != 0
        assert decode_device.kv_pull_attempts == 2
        assert decode_device.kv_recomputes == 0
        await eventually(lambda: prefill_device.engine.load().kv_leases == 0)
    finally:
        await prefill_device.stop(0)
        await decode_device.stop(0)


async def test_a_damaged_chunk_is_recomputed_under_the_default_policy() -> None:
    prefill_device = await start_device("p8", (Role.PREFILL,), corrupt_kv_chunks=1)
    decode_device = await start_device("d8", (Role.DECODE,))
    try:
        async with (
            grpc.aio.insecure_channel(prefill_device.address) as prefill_channel,
            grpc.aio.insecure_channel(decode_device.address) as decode_channel,
        ):
            frames = await _decode_with(
                DeviceStub(prefill_channel), DeviceStub(decode_channel), "r8", corrupt=False
            )
        assert frames[-1].finish_reason != 0
        assert (decode_device.kv_pull_attempts, decode_device.kv_recomputes) == (1, 1)
        # Given up on, the damaged copy is released rather than left to its lease.
        await eventually(lambda: prefill_device.engine.load().kv_leases == 0)
    finally:
        await prefill_device.stop(0)
        await decode_device.stop(0)


async def test_handles_carry_the_holder_link_and_the_emulated_kv_size(pair: Any) -> None:
    _, _, prefill, _ = pair
    reply = await prefill.prefill(
        device_pb2.PrefillRequest(request_id="w1", prompt="wire", sampling=GREEDY)
    )
    assert reply.handle.link_gbps == 7200.0  # the H100 profile's NVLink
    assert reply.handle.emulated_bytes_per_token == 131072  # Llama-3.1-8B, BF16


async def test_push_refuses_a_layout_it_cannot_convert_before_keeping_a_byte(pair: Any) -> None:
    _, decode_device, _, _ = pair
    adapter = MockBackend("d0", decode_device.address)
    await adapter.start()
    try:
        wrong = KVLayout(2, 4, 16, "bfloat16", 16, 1)
        handle = KVHandle("p0", "push-1", layout=wrong, num_tokens=4, byte_length=2048)

        async def chunks() -> AsyncIterator[bytes]:
            yield device_pb2.KVChunk(offset=0, data=b"\0" * 2048).SerializeToString()

        transfer = adapter.kv_transfer
        assert transfer is not None
        with pytest.raises(LayoutMismatchError, match="dtype bfloat16 cannot become float32"):
            await transfer.write(handle, chunks(), timeout_s=5)
        assert decode_device.engine.load().kv_leases == 0
    finally:
        await adapter.close()


async def test_kv_padded_to_the_emulated_size_moves_and_decodes_the_same() -> None:
    prefill_device = await start_device("p5", (Role.PREFILL,), emulate_kv_size=True)
    decode_device = await start_device("d5", (Role.DECODE,))
    plain_device = await start_device("p6", (Role.PREFILL,))
    try:
        async with (
            grpc.aio.insecure_channel(prefill_device.address) as padded_channel,
            grpc.aio.insecure_channel(plain_device.address) as plain_channel,
            grpc.aio.insecure_channel(decode_device.address) as decode_channel,
        ):
            padded, plain = DeviceStub(padded_channel), DeviceStub(plain_channel)
            decode = DeviceStub(decode_channel)
            reply = await padded.prefill(
                device_pb2.PrefillRequest(request_id="e1", prompt="checksum", sampling=GREEDY)
            )
            # Llama-3.1-8B in BF16: 128 KiB of KV per token.
            assert reply.handle.byte_length == reply.handle.num_tokens * 131072
            with_pad = await _decode_with(padded, decode, "e2", corrupt=False)
            without = await _decode_with(plain, decode, "e3", corrupt=False)
        assert [list(f.token_ids) for f in with_pad] == [list(f.token_ids) for f in without]
        assert decode_device.kv_recomputes == 0
    finally:
        for device in (prefill_device, decode_device, plain_device):
            await device.stop(0)


@pytest.mark.parametrize("data_plane", [True, False], ids=["socket", "grpc"])
async def test_kv_is_pulled_over_the_data_plane_or_grpc_alike(data_plane: bool) -> None:
    prefill_device = await start_device("p9", (Role.PREFILL,), kv_data_plane=data_plane)
    decode_device = await start_device("d9", (Role.DECODE,))
    try:
        async with (
            grpc.aio.insecure_channel(prefill_device.address) as prefill_channel,
            grpc.aio.insecure_channel(decode_device.address) as decode_channel,
        ):
            prefill = DeviceStub(prefill_channel)
            reply = await prefill.prefill(
                device_pb2.PrefillRequest(request_id="dp0", prompt="checksum", sampling=GREEDY)
            )
            assert bool(reply.handle.data_address) is data_plane
            frames = await _decode_with(prefill, DeviceStub(decode_channel), "dp1", corrupt=False)
        assert frames[-1].finish_reason != 0
        assert (decode_device.kv_pull_attempts, decode_device.kv_recomputes) == (1, 0)
    finally:
        await prefill_device.stop(0)
        await decode_device.stop(0)
