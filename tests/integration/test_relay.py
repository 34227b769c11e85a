"""KV relayed by the router: same tokens, bounded memory, pipelined, and graceful failure."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
import pytest

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import GenerationRequest, KVHandle, KVLayout, Role, SamplingParams
from backends.errors import LayoutMismatchError
from backends.mock.adapter import MockBackend
from backends.mock.clock import LoopClock
from backends.mock.transfer import DeviceKVTransfer
from backends.transfer import DirectCopy, KVTransfer
from router.handoff.relay import RelayStats, relay
from tests.conftest import start_cluster, stop_cluster
from tests.helpers import eventually
from tests.integration.test_generate import collect, token_ids

OPTIONS = {"max_tokens": 16, "temperature": 0.8, "seed": 21}


async def test_relayed_kv_gives_exactly_the_colocated_tokens() -> None:
    cluster = await start_cluster(handoff="relay")
    try:
        for prompt in ("relay", "a longer prompt to relay " * 30):
            split = await collect(cluster.client, prompt, disaggregation="split", **OPTIONS)
            alone = await collect(cluster.client, prompt, disaggregation="colocated", **OPTIONS)
            assert split[0].route.mode == router_pb2.ROUTE_MODE_SPLIT
            assert token_ids(split) == token_ids(alone)
        # Relayed, not pulled: decode devices fetched nothing themselves, and the
        # prefill devices count the bytes they served the relay.
        assert all(d.kv_pull_attempts == 0 for d in cluster.devices.values())
        sent = {name: d.kv_bytes_sent for name, d in cluster.devices.items()}
        assert sent["groq-0"] == sent["groq-1"] == 0
        assert sent["h100-0"] + sent["h100-1"] > 0
        await eventually(lambda: all(v == (0, 0) for v in cluster.kv_in_use().values()))
    finally:
        await stop_cluster(cluster)


async def test_a_failed_relay_falls_back_to_the_decode_side() -> None:
    # Prefill devices drop their KV at once: the relay finds nothing, the decode
    # device then tries to pull, finds nothing either, and prefills locally.
    cluster = await start_cluster(handoff="relay", device_options={"kv_lease_s": 0.0})
    try:
        split = await collect(cluster.client, "no kv", disaggregation="split", **OPTIONS)
        alone = await collect(cluster.client, "no kv", disaggregation="colocated", **OPTIONS)
        assert token_ids(split) == token_ids(alone)
        assert sum(d.kv_recomputes for d in cluster.devices.values()) == 1
    finally:
        await stop_cluster(cluster)


async def test_relay_is_pipelined_and_holds_a_few_chunks_at_most() -> None:
    cluster = await start_cluster(time_scale=0.0)
    devices = cluster.devices
    source = MockBackend("h100-0", devices["h100-0"].address, {"relay_chunk_bytes": 4096})
    sink = MockBackend("groq-0", devices["groq-0"].address)
    await source.start()
    await sink.start()
    try:
        prompt = "pipeline " * 250
        generation = GenerationRequest(
            "pipe-1", "llama-3.1-8b", prompt, SamplingParams(4, 0.0, 1.0, 1), len(prompt) + 1
        )
        prefilled = await source.prefill(generation, timeout_s=10)
        assert prefilled.handle is not None
        handle: KVHandle = prefilled.handle

        read = 0
        read_when_consumed: list[int] = []
        reading, writing = source.kv_transfer, sink.kv_transfer
        assert reading is not None
        assert writing is not None
        fetch, push = reading.read, writing.write

        async def counting_fetch(h: KVHandle, timeout_s: float) -> AsyncGenerator[bytes, None]:
            nonlocal read
            async for chunk in fetch(h, timeout_s):
                read += 1
                yield chunk

        async def recording_push(
            h: KVHandle, chunks: AsyncIterator[bytes], timeout_s: float
        ) -> KVHandle:
            async def watched() -> AsyncIterator[bytes]:
                async for chunk in chunks:
                    read_when_consumed.append(read)
                    yield chunk

            return await push(h, watched(), timeout_s)

        # Over gRPC chunks (no data plane), so the relay's own pipelining is what is seen.
        # Spies in place of the transfer's methods: what a test double is for.
        reading.copy = no_direct_copy  # type: ignore[method-assign]  # a spy
        reading.read = counting_fetch  # type: ignore[method-assign,assignment]  # a spy
        writing.write = recording_push  # type: ignore[method-assign,assignment]  # a spy
        stats = RelayStats()
        moved = await relay(source, sink, handle, timeout_s=10, depth=4, stats=stats)

        total = math.ceil(handle.byte_length / 4096)
        assert stats.chunks == total > 50
        assert stats.bytes >= handle.byte_length
        assert stats.most_in_flight <= 4
        # The first chunk went on while most of the KV had not been read yet.
        assert read_when_consumed[0] <= 6 < total
        assert moved.backend_id == "groq-0"
        assert moved.checksum == handle.checksum
        assert devices["groq-0"].engine.load().kv_leases == 1
    finally:
        await source.close()
        await sink.close()
        await stop_cluster(cluster)


async def test_a_decode_device_gone_before_it_pulls_leaves_nothing_held() -> None:
    cluster = await start_cluster(
        [("h100-0", Role.PREFILL, "h100"), ("groq-0", Role.DECODE, "groq-lpu")]
    )
    try:
        # The decode device dies after the last health check: the router still picks it.
        await cluster.devices["groq-0"].stop(grace_s=0)
        received: list[router_pb2.GenerateResponse] = []

        async def consume() -> None:
            stream = cluster.client.generate("orphan", max_tokens=8, disaggregation="split")
            async for response in stream:
                received.append(response)

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await consume()
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(received) == 1  # the first token, from prefill, and nothing invented after
        prefill = cluster.devices["h100-0"]
        await eventually(lambda: prefill.engine.load().kv_leases == 0)
        assert prefill.engine.load().kv_tokens_used == 0
    finally:
        await stop_cluster(cluster)


class HeldClock(LoopClock):
    """Time that stands still: whatever a device paces or models waits until cancelled."""

    def __init__(self) -> None:
        self.waiting = 0

    def time(self) -> float:
        return 0.0

    async def sleep_until(self, deadline: float) -> None:
        self.waiting += 1
        try:
            await asyncio.Event().wait()
        finally:
            self.waiting -= 1


async def test_cancelling_during_a_relay_frees_both_devices() -> None:
    # The decode devices take relayed KV over PushKV (no data plane) and model its wire
    # time on a clock that never moves: the relay stays in flight until it is cancelled.
    held = HeldClock()
    decode_only: dict[str, object] = {"kv_data_plane": False}
    cluster = await start_cluster(
        handoff="relay",
        time_scale=1.0,
        per_device={"groq-0": decode_only, "groq-1": decode_only},
        clocks={"groq-0": held, "groq-1": held},
    )
    try:
        task = asyncio.create_task(
            collect(cluster.client, "cancel me " * 60, max_tokens=50, disaggregation="split")
        )
        await eventually(lambda: held.waiting == 1)
        in_use = cluster.kv_in_use()
        assert in_use["groq-0"] == in_use["groq-1"] == (0, 0)  # nothing taken yet
        assert sum(leases for _, leases in in_use.values()) == 1  # the prefill's KV, leased
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: all(v == (0, 0) for v in cluster.kv_in_use().values()))
        assert held.waiting == 0  # the relay's push was cancelled with it
    finally:
        await stop_cluster(cluster)


LAYOUT_PAIRS = [
    ({"tensor_parallel": 2, "block_size": 16}, {"tensor_parallel": 1, "block_size": 32}),
    ({"tensor_parallel": 2, "block_size": 16}, {"tensor_parallel": 4, "block_size": 8}),
    ({"tensor_parallel": 1, "block_size": 48}, {"tensor_parallel": 2, "block_size": 16}),
]


@pytest.mark.parametrize(("prefill_layout", "decode_layout"), LAYOUT_PAIRS)
async def test_layouts_that_differ_are_relayed_and_converted_without_loss(
    prefill_layout: dict[str, object], decode_layout: dict[str, object]
) -> None:
    layout = [("h100-0", Role.PREFILL, "h100"), ("groq-0", Role.DECODE, "groq-lpu")]
    cluster = await start_cluster(
        layout, per_device={"h100-0": prefill_layout, "groq-0": decode_layout}
    )
    try:
        for prompt in ("short", "converted across layouts " * 12):
            split = await collect(cluster.client, prompt, disaggregation="split", **OPTIONS)
            alone = await collect(cluster.client, prompt, disaggregation="colocated", **OPTIONS)
            assert token_ids(split) == token_ids(alone)
        decode = cluster.devices["groq-0"]
        assert (decode.kv_pull_attempts, decode.kv_recomputes) == (0, 0)  # relayed, intact
        await eventually(lambda: all(v == (0, 0) for v in cluster.kv_in_use().values()))
    finally:
        await stop_cluster(cluster)


async def test_a_relay_refuses_a_dtype_change_before_reading_anything() -> None:
    class Untouchable(MockBackend):
        @property
        def kv_transfer(self) -> DeviceKVTransfer | None:
            raise AssertionError("no byte may be read or written")

    source = Untouchable("p", "127.0.0.1:1")
    source_layout = KVLayout(2, 4, 16, "float32", 16, 1)
    handle = KVHandle("p", "r", layout=source_layout, num_tokens=10, byte_length=10240)
    target = KVLayout(2, 4, 16, "bfloat16", 16, 1)
    with pytest.raises(LayoutMismatchError, match="dtype float32 cannot become bfloat16"):
        await relay(
            source, Untouchable("d", "127.0.0.1:2"), handle, timeout_s=1, target_layout=target
        )


async def test_relay_goes_socket_to_socket_when_both_devices_have_a_data_plane() -> None:
    cluster = await start_cluster(handoff="relay")
    try:
        split = await collect(cluster.client, "sockets " * 40, disaggregation="split", **OPTIONS)
        alone = await collect(
            cluster.client, "sockets " * 40, disaggregation="colocated", **OPTIONS
        )
        assert token_ids(split) == token_ids(alone)
        decode_backends = [cluster.daemon.pool.backend(i) for i in ("groq-0", "groq-1")]
        assert all(
            isinstance(backend.kv_transfer, DeviceKVTransfer) and backend.kv_transfer.data_address
            for backend in decode_backends
        )
        # Nothing went through gRPC FetchKV, and no decode device pulled on its own.
        assert all(d.kv_fetches_served == 0 for d in cluster.devices.values())
        assert all(d.kv_pull_attempts == 0 for d in cluster.devices.values())
        await eventually(lambda: all(v == (0, 0) for v in cluster.kv_in_use().values()))
    finally:
        await stop_cluster(cluster)


async def test_a_damaged_socket_relay_falls_back_and_still_answers_exactly() -> None:
    cluster = await start_cluster(
        handoff="relay",
        per_device={"h100-0": {"corrupt_kv_chunks": 1}, "h100-1": {"corrupt_kv_chunks": 1}},
    )
    try:
        split = await collect(cluster.client, "damaged " * 30, disaggregation="split", **OPTIONS)
        alone = await collect(
            cluster.client, "damaged " * 30, disaggregation="colocated", **OPTIONS
        )
        assert token_ids(split) == token_ids(alone)
        # The relay was refused by the decode device, which then pulled the KV itself.
        assert sum(d.kv_pull_attempts for d in cluster.devices.values()) == 1
        await eventually(lambda: all(v == (0, 0) for v in cluster.kv_in_use().values()))
    finally:
        await stop_cluster(cluster)


@pytest.mark.parametrize("handoff", ["direct", "relay"])
@pytest.mark.parametrize("layouts", [None, LAYOUT_PAIRS[0]], ids=["same-layout", "tp2b16-tp1b32"])
async def test_kv_at_the_emulated_size_gives_the_colocated_tokens(
    handoff: str, layouts: tuple[dict[str, object], dict[str, object]] | None
) -> None:
    pair = [("h100-0", Role.PREFILL, "h100"), ("groq-0", Role.DECODE, "groq-lpu")]
    per_device = {"h100-0": dict(layouts[0]), "groq-0": dict(layouts[1])} if layouts else {}
    per_device.setdefault("h100-0", {})["emulate_kv_size"] = True
    cluster = await start_cluster(pair, handoff=handoff, per_device=per_device)
    try:
        prompt = "padded to the size of a real KV " * 4
        split = await collect(cluster.client, prompt, disaggregation="split", **OPTIONS)
        alone = await collect(cluster.client, prompt, disaggregation="colocated", **OPTIONS)
        assert token_ids(split) == token_ids(alone)
        decode = cluster.devices["groq-0"]
        assert decode.kv_recomputes == 0  # the KV itself made it, not a local prefill
        await eventually(lambda: all(v == (0, 0) for v in cluster.kv_in_use().values()))
    finally:
        await stop_cluster(cluster)


@pytest.mark.parametrize("policy", ["recompute", "retry"])
async def test_a_transfer_cut_midway_still_answers_exactly(policy: str) -> None:
    # The prefill device's connection dies halfway through the KV, as if killed.
    pair = [("h100-0", Role.PREFILL, "h100"), ("groq-0", Role.DECODE, "groq-lpu")]
    per_device: dict[str, dict[str, object]] = {
        "h100-0": {"break_kv_transfers": 1, "emulate_kv_size": True},
        "groq-0": {"kv_failure_policy": policy},
    }
    cluster = await start_cluster(pair, per_device=per_device)
    try:
        prompt = "cut mid-transfer " * 10
        split = await collect(cluster.client, prompt, disaggregation="split", **OPTIONS)
        alone = await collect(cluster.client, prompt, disaggregation="colocated", **OPTIONS)
        assert token_ids(split) == token_ids(alone)
        decode = cluster.devices["groq-0"]
        if policy == "retry":  # a cut is not damage: it is recomputed, not pulled again
            assert decode.kv_pull_attempts == 1
        assert decode.kv_recomputes == 1
        await eventually(lambda: all(v == (0, 0) for v in cluster.kv_in_use().values()))
    finally:
        await stop_cluster(cluster)


async def no_direct_copy(handle: KVHandle, sink: KVTransfer, *, depth: int) -> DirectCopy | None:
    return None
