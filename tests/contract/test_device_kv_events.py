"""A mock device publishes its prefix cache's changes as vLLM's KV events."""

from __future__ import annotations

import asyncio

import grpc
import zmq
import zmq.asyncio

from backends._gen.hetero.device.v1 import device_pb2
from backends.base import Role
from backends.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    decode_seq,
    encode_seq,
)
from backends.mock.config import DeviceConfig
from backends.mock.protocol import SERVICE
from backends.mock.server import DeviceServer
from backends.prefix import BLOCK_BYTES, block_hashes

SAMPLING = device_pb2.Sampling(max_tokens=2, temperature=0.0, top_p=1.0, seed=1)
PROMPTS = ["first tenant. " * 12, "second tenant. " * 12]


async def generate(device: DeviceServer, request_id: str, prompt: str) -> None:
    async with grpc.aio.insecure_channel(device.address) as channel:
        call = channel.unary_stream(
            f"/{SERVICE}/Generate",
            request_serializer=device_pb2.DeviceGenerateRequest.SerializeToString,
            response_deserializer=bytes,
        )
        request = device_pb2.DeviceGenerateRequest(
            request_id=request_id, prompt=prompt, sampling=SAMPLING
        )
        assert [frame async for frame in call(request)]


async def replayed(endpoint: str, start: int) -> list[tuple[int, KVEventBatch]]:
    dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    dealer.connect(endpoint)
    try:
        await dealer.send_multipart([b"", encode_seq(start)])
        batches: list[tuple[int, KVEventBatch]] = []
        while True:
            # As vLLM 0.32 answers: [b"", topic, seq, payload].
            empty, topic, seq, payload = await asyncio.wait_for(dealer.recv_multipart(), 5)
            assert empty == b""
            assert topic in (b"kv-events", b"")
            if decode_seq(seq) < 0:
                assert payload == b""
                return batches
            batches.append((decode_seq(seq), decode_batch(payload)))
    finally:
        dealer.close(linger=0)


async def test_stored_blocks_then_evictions_in_order_with_the_routers_hashes() -> None:
    first = block_hashes(PROMPTS[0])
    device = DeviceServer(
        DeviceConfig(
            backend_id="d",
            profile="h100",
            model="llama-3.1-8b",
            roles=(Role.PREFILL, Role.DECODE),
            time_scale=0.0,
            prefix_cache_blocks=len(first) + 1,  # the second prompt evicts most of the first
            kv_events_port=0,
        )
    )
    await device.start("127.0.0.1:0")
    try:
        assert device.kv_events is not None
        await generate(device, "r1", PROMPTS[0])
        await generate(device, "r2", PROMPTS[0])  # cached: nothing new to tell
        await generate(device, "r3", PROMPTS[1])
        batches = await replayed(device.kv_events.replay_endpoint, 0)
    finally:
        await device.stop(0)
    assert [seq for seq, _ in batches] == [0, 1]
    (stored_first,) = batches[0][1].events
    assert isinstance(stored_first, BlockStored)
    assert stored_first.block_hashes == list(first)
    assert stored_first.parent_block_hash is None
    assert stored_first.block_size == BLOCK_BYTES
    assert bytes(stored_first.token_ids) == PROMPTS[0].encode()[: len(first) * BLOCK_BYTES]
    stored_second, removed = batches[1][1].events
    assert isinstance(stored_second, BlockStored)
    assert stored_second.block_hashes == list(block_hashes(PROMPTS[1]))
    assert isinstance(removed, BlockRemoved)
    # Tails go first: what is left of the first prompt is its head.
    evicted = len(block_hashes(PROMPTS[1])) - 1
    assert evicted >= 1
    assert removed.block_hashes == list(reversed(first))[:evicted]
    assert not any(isinstance(e, AllBlocksCleared) for _, b in batches for e in b.events)
