"""Load reports the block hashes a device's prefix cache holds, as the router hashes them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from backends._gen.hetero.device.v1 import device_pb2
from backends.base import Role
from backends.mock.config import DeviceConfig
from backends.mock.protocol import SERVICE
from backends.mock.server import DeviceServer
from backends.prefix import block_hashes

PROMPT = "A system prompt every request of this tenant begins with. " * 5
SAMPLING = device_pb2.Sampling(max_tokens=4, temperature=0.0, top_p=1.0, seed=1)


async def start(backend_id: str, roles: tuple[Role, ...], blocks: int) -> DeviceServer:
    device = DeviceServer(
        DeviceConfig(
            backend_id=backend_id,
            profile="h100",
            model="llama-3.1-8b",
            roles=roles,
            time_scale=0.0,
            prefix_cache_blocks=blocks,
        )
    )
    await device.start("127.0.0.1:0")
    return device


@pytest.fixture
async def devices() -> AsyncIterator[dict[str, DeviceServer]]:
    started = {
        "both": await start("both", (Role.PREFILL, Role.DECODE), 64),
        "prefill": await start("prefill", (Role.PREFILL,), 64),
        "decode": await start("decode", (Role.DECODE,), 64),
        "off": await start("off", (Role.PREFILL, Role.DECODE), 0),
    }
    yield started
    for device in started.values():
        await device.stop(0)


async def cached(device: DeviceServer) -> set[int]:
    async with grpc.aio.insecure_channel(device.address) as channel:
        load = channel.unary_unary(
            f"/{SERVICE}/Load",
            request_serializer=device_pb2.LoadRequest.SerializeToString,
            response_deserializer=device_pb2.LoadResponse.FromString,
        )
        reply = await load(device_pb2.LoadRequest())
    return set(reply.cached_prefix_hashes)


async def test_a_colocated_generate_leaves_its_prompt_cached(
    devices: dict[str, DeviceServer],
) -> None:
    for name in ("both", "off"):
        async with grpc.aio.insecure_channel(devices[name].address) as channel:
            generate = channel.unary_stream(
                f"/{SERVICE}/Generate",
                request_serializer=device_pb2.DeviceGenerateRequest.SerializeToString,
                response_deserializer=bytes,
            )
            request = device_pb2.DeviceGenerateRequest(
                request_id="r1", prompt=PROMPT, sampling=SAMPLING
            )
            assert [frame async for frame in generate(request)]
    assert await cached(devices["both"]) == set(block_hashes(PROMPT))
    assert await cached(devices["off"]) == set()


async def test_both_legs_of_a_split_leave_the_prompt_cached(
    devices: dict[str, DeviceServer],
) -> None:
    async with (
        grpc.aio.insecure_channel(devices["prefill"].address) as prefill_channel,
        grpc.aio.insecure_channel(devices["decode"].address) as decode_channel,
    ):
        prefill = prefill_channel.unary_unary(
            f"/{SERVICE}/Prefill",
            request_serializer=device_pb2.PrefillRequest.SerializeToString,
            response_deserializer=device_pb2.PrefillResponse.FromString,
        )
        decode = decode_channel.unary_stream(
            f"/{SERVICE}/Decode",
            request_serializer=device_pb2.DecodeRequest.SerializeToString,
            response_deserializer=bytes,
        )
        leg = await prefill(
            device_pb2.PrefillRequest(request_id="s1", prompt=PROMPT, sampling=SAMPLING)
        )
        assert await cached(devices["decode"]) == set()
        request = device_pb2.DecodeRequest(
            request_id="s1",
            prompt=PROMPT,
            sampling=SAMPLING,
            handle=leg.handle,
            first_token_id=leg.first_token_id,
        )
        assert [frame async for frame in decode(request)]
    expected = set(block_hashes(PROMPT))
    assert await cached(devices["prefill"]) == expected
    assert await cached(devices["decode"]) == expected
