"""Failures on real mock devices: a device that dies mid-stream, before the first token,
or leaves service; the client's stream goes on with no token lost or repeated."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import Role
from router.client import AsyncRouterClient
from router.cluster import embedded_devices
from router.daemon import Daemon
from router.settings import BackendConfig, PoolConfig, Settings
from tests.conftest import Cluster, start_cluster, stop_cluster
from tests.helpers import GatedClock, Stream, eventually

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


async def reference(client: AsyncRouterClient, **sampling: object) -> Stream:
    stream = Stream()
    async for message in client.generate(PROMPT, **sampling):
        stream.messages.append(message)
    return stream


async def consume(client: AsyncRouterClient, stream: Stream, **sampling: object) -> None:
    async for message in client.generate(PROMPT, **sampling):
        stream.messages.append(message)


async def interrupted(
    cluster: Cluster, clocks: dict[str, GatedClock], after: int, **sampling: object
) -> tuple[Stream, str]:
    """A request whose decode device is stopped once the client has ``after`` tokens;
    (what the client got, the stopped device)."""
    stream = Stream()
    task = asyncio.create_task(consume(cluster.client, stream, **sampling))
    for clock in clocks.values():
        clock.step()  # the prefill (a split's first token comes from the prefill device)
    await eventually(lambda: bool(stream.messages))
    victim = stream.route.decode_backend
    while len(stream.token_ids) < after:
        clocks[victim].step()
        count = len(stream.token_ids)
        await eventually(lambda count=count: len(stream.token_ids) > count)  # type: ignore[misc]  # bound default
    await cluster.devices[victim].stop(grace_s=0)
    for clock in clocks.values():
        clock.open()
    await asyncio.wait_for(task, 30)
    return stream, victim


def migrations(cluster: Cluster) -> float:
    value = cluster.daemon.registry.get_sample_value(
        "hetero_router_retries_total", {"kind": "migration"}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("disaggregation", "temperature"),
    [("colocated", 0.0), ("colocated", 0.9), ("split", 0.0), ("split", 0.9)],
)
async def test_a_decode_device_dying_mid_stream_is_resumed_with_the_same_tokens(
    disaggregation: str, temperature: float
) -> None:
    decode_clocks = {"groq-0": GatedClock(), "groq-1": GatedClock()}
    cluster = await start_cluster(clocks=dict(decode_clocks), stall_timeout_s=60)
    sampling: dict[str, object] = {
        "max_tokens": 24,
        "temperature": temperature,
        "seed": 7,
        "disaggregation": disaggregation,
    }
    try:
        for clock in decode_clocks.values():
            clock.open()
        expected = await reference(cluster.client, **sampling)
        for name, clock in list(decode_clocks.items()):
            clock.open()
            decode_clocks[name] = cluster.devices[name].engine.clock = GatedClock()
        got, victim = await interrupted(cluster, decode_clocks, after=9, **sampling)

        assert got.token_ids == expected.token_ids  # none lost, none repeated
        assert got.text == expected.text
        assert got.last.finish_reason == expected.last.finish_reason
        assert got.last.usage == expected.last.usage  # counted as one request
        assert sum(m.HasField("route") for m in got.messages) == 1
        assert migrations(cluster) == 1
        survivor = next(name for name in decode_clocks if name != victim)
        assert cluster.devices[survivor].service.requests_received >= 1
        # Nothing is left held on the devices still up.
        await eventually(
            lambda: all(
                used == (0, 0) for name, used in cluster.kv_in_use().items() if name != victim
            )
        )
    finally:
        await stop_cluster(cluster)


async def test_with_migration_off_a_mid_stream_failure_is_an_error_not_a_short_answer() -> None:
    decode_clocks = {"groq-0": GatedClock(), "groq-1": GatedClock()}
    cluster = await start_cluster(clocks=dict(decode_clocks), migration=False)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await interrupted(
                cluster, decode_clocks, after=5, max_tokens=24, disaggregation="colocated"
            )
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "migration is off" in (failure.value.details() or "")
        assert migrations(cluster) == 0
    finally:
        await stop_cluster(cluster)


async def test_a_device_dead_before_the_first_token_is_retried_on_another() -> None:
    layout = [
        ("h100-0", Role.PREFILL, "h100"),
        ("h100-1", Role.PREFILL, "h100"),
        ("groq-0", Role.DECODE, "groq-lpu"),
        ("groq-1", Role.DECODE, "groq-lpu"),
    ]
    # No health check after the first, and each backend in turn: the router keeps
    # picking the dead devices, and each request must get past them unnoticed.
    cluster = await start_cluster(layout, health_interval_s=3600, picker="round-robin")
    try:
        expected = await reference(cluster.client, max_tokens=12, temperature=0)
        await cluster.devices["h100-0"].stop(grace_s=0)
        await cluster.devices["groq-0"].stop(grace_s=0)
        for mode in ("split", "colocated", "auto"):
            for _ in range(3):
                got = await reference(
                    cluster.client, max_tokens=12, temperature=0, disaggregation=mode
                )
                assert got.token_ids == expected.token_ids, mode
                assert got.last.finish_reason == router_pb2.FINISH_REASON_LENGTH
        retries = cluster.daemon.registry.get_sample_value(
            "hetero_router_retries_total", {"kind": "retry"}
        )
        assert retries is not None
        assert retries >= 1
    finally:
        await stop_cluster(cluster)


async def test_a_device_leaving_service_fails_its_streams_over_at_once() -> None:
    # The decode devices never finish an iteration on their own and the stall limit is
    # far away: only the device leaving service can move the stream on.
    decode_clocks = {"groq-0": GatedClock(), "groq-1": GatedClock()}
    cluster = await start_cluster(clocks=dict(decode_clocks), stall_timeout_s=600)
    try:
        stream = Stream()
        task = asyncio.create_task(
            consume(cluster.client, stream, max_tokens=8, temperature=0, disaggregation="split")
        )
        await eventually(lambda: bool(stream.messages))  # the prefill's first token
        victim = stream.route.decode_backend
        decode_clocks[victim].step(2)
        await eventually(lambda: len(stream.token_ids) >= 3)
        # A failed health check (the device hangs: nothing errors, nothing times out).
        cluster.daemon.pool.set_health(victim, False, "health check timed out", None)
        survivor = next(name for name in decode_clocks if name != victim)
        decode_clocks[survivor].open()
        await asyncio.wait_for(task, 30)
        assert len(stream.token_ids) == 8
        assert stream.last.finish_reason == router_pb2.FINISH_REASON_LENGTH
        assert migrations(cluster) == 1
        await eventually(lambda: cluster.devices[victim].engine.load().running == 0)  # aborted
    finally:
        for clock in decode_clocks.values():
            clock.open()
        await stop_cluster(cluster)


async def test_a_stalled_stream_is_resumed_after_the_idle_limit() -> None:
    decode_clocks = {"groq-0": GatedClock(), "groq-1": GatedClock()}
    cluster = await start_cluster(clocks=dict(decode_clocks), stall_timeout_s=0.2)
    try:
        stream = Stream()
        task = asyncio.create_task(
            consume(cluster.client, stream, max_tokens=8, temperature=0, disaggregation="split")
        )
        await eventually(lambda: bool(stream.messages))
        victim = stream.route.decode_backend
        survivor = next(name for name in decode_clocks if name != victim)
        decode_clocks[survivor].open()  # the victim's clock never moves again: it hangs
        await asyncio.wait_for(task, 30)
        assert len(stream.token_ids) == 8
        # (A loaded machine may miss the short limit elsewhere too: at least this one.)
        assert migrations(cluster) >= 1
        failures = cluster.daemon.registry.get_sample_value(
            "hetero_router_backend_failures_total", {"backend": victim, "phase": "decode"}
        )
        assert failures == 1  # then it was left out
    finally:
        for clock in decode_clocks.values():
            clock.open()
        await stop_cluster(cluster)


async def test_a_hung_prefill_is_left_after_its_predicted_deadline_not_a_flat_30_s() -> None:
    # Both prefill devices hang (their clocks never move); the first one picked is let go
    # only if the request comes back to it. The deadline is derived from the prediction
    # for the plan (milliseconds for an H100), so the floor applies: well under 30 s.
    prefill_clocks = {"h100-0": GatedClock(), "h100-1": GatedClock()}
    cluster = await start_cluster(
        clocks=dict(prefill_clocks), stall_timeout_s=0.3, picker="round-robin"
    )
    try:
        stream = Stream()
        task = asyncio.create_task(
            consume(cluster.client, stream, max_tokens=4, temperature=0, disaggregation="split")
        )
        await eventually(lambda: sum(d.requests_received for d in cluster.devices.values()) >= 1)
        hung = next(n for n in prefill_clocks if cluster.devices[n].requests_received)
        other = next(n for n in prefill_clocks if n != hung)
        prefill_clocks[other].open()
        await asyncio.wait_for(task, 30)
        assert len(stream.token_ids) == 4
        assert stream.route.prefill_backend == other
        failures = cluster.daemon.registry.get_sample_value(
            "hetero_router_backend_failures_total", {"backend": hung, "phase": "prefill"}
        )
        assert failures == 1
        # The hung device was told to drop the request.
        await eventually(lambda: cluster.kv_in_use()[hung] == (0, 0))
    finally:
        for clock in prefill_clocks.values():
            clock.open()
        await stop_cluster(cluster)


async def test_a_device_process_killed_mid_stream_is_resumed_on_another() -> None:
    # Real processes and a real SIGKILL: the device's sockets close under the stream.
    pool = PoolConfig(
        backends=tuple(
            BackendConfig(
                id=f"groq-{i}", address="127.0.0.1:0", role=Role.DECODE,
                model="llama-3.1-8b", profile="groq-lpu",
            )
            for i in range(2)
        )
    )  # fmt: skip
    pids: dict[str, int] = {}
    # 25 ms a token: the stream outlasts the kill by far.
    pace = ["--decode-step-ms", "25"]
    async with embedded_devices(pool, ready_timeout_s=60, extra_args=pace, pids=pids) as live:
        settings = Settings(grpc_address="127.0.0.1:0", http_address="127.0.0.1:0")
        daemon = Daemon(settings, live)
        await daemon.start()
        try:
            async with AsyncRouterClient(f"127.0.0.1:{daemon.grpc_port}") as client:
                sampling: dict[str, object] = {"max_tokens": 60, "temperature": 0.7, "seed": 3}
                expected = await reference(client, **sampling)
                stream = Stream()
                task = asyncio.create_task(consume(client, stream, **sampling))
                await eventually(lambda: len(stream.token_ids) >= 10, timeout_s=30)
                os.kill(pids[stream.route.decode_backend], signal.SIGKILL)
                await asyncio.wait_for(task, 60)
            assert stream.token_ids == expected.token_ids
            assert stream.text == expected.text
            assert stream.last.usage == expected.last.usage
            migrated = daemon.registry.get_sample_value(
                "hetero_router_retries_total", {"kind": "migration"}
            )
            assert migrated == 1
        finally:
            await daemon.stop()
