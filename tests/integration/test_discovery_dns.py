"""DNS discovery against a real DNS server: dnsmasq, started by the test on 127.0.0.1.

A and AAAA records of a headless Service give one backend per address at the entry's
port: the mock devices listen on 127.0.0.2 and 127.0.0.3 at the same port, as pods
of one Service do on their own IPs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from backends.base import Role
from backends.mock.config import DeviceConfig
from backends.mock.server import DeviceServer
from router.client import AsyncRouterClient
from router.daemon import Daemon
from router.settings import PoolConfig, Settings, parse_pool
from tests.dnsmasq import dnsmasq
from tests.helpers import GatedClock, Stream, eventually

MODEL = "llama-3.1-8b"


async def _device(
    host: str, port: int, backend_id: str, clock: GatedClock | None = None
) -> DeviceServer:
    device = DeviceServer(
        DeviceConfig(backend_id=backend_id, profile="groq-lpu", model=MODEL,
                     roles=(Role.PREFILL, Role.DECODE), time_scale=0.0),
        clock=clock,
    )  # fmt: skip
    await device.start(f"{host}:{port}")
    return device


def _pool(name: str, nameserver: str, **dns: object) -> PoolConfig:
    return parse_pool(
        {"backends": [{"id": "decode", "role": "decode", "model": MODEL, "profile": "groq-lpu",
                       "discovery": {"dns": {"name": name, "nameserver": nameserver,
                                             "interval_s": 0.1, **dns}}}]}
    )  # fmt: skip


def _daemon(pool: PoolConfig, **settings: object) -> Daemon:
    options: dict[str, object] = {
        "grpc_address": "127.0.0.1:0", "http_address": "127.0.0.1:0", "drain_grace_s": 0.5,
        "adaptive_concurrency": False, "health_interval_s": 0.1, **settings,
    }  # fmt: skip
    return Daemon(Settings(**options), pool)  # type: ignore[arg-type]  # validated by pydantic


async def _pods_on_one_port(clock: GatedClock) -> tuple[DeviceServer, DeviceServer]:
    """Two pods at 127.0.0.2 and 127.0.0.3 on one port, as a headless Service's pods are.

    The port is free on the first address when picked; another process may hold it on
    the second, so a clash there picks again.
    """
    for _attempt in range(5):
        first = await _device("127.0.0.2", 0, "pod-a", clock)
        port = int(first.address.rpartition(":")[2])
        try:
            return first, await _device("127.0.0.3", port, "pod-b")
        except OSError:
            await first.stop(grace_s=0)
    raise OSError("no port free on both 127.0.0.2 and 127.0.0.3 after 5 tries")


async def test_records_added_join_after_their_health_check_and_records_removed_drain(
    tmp_path: Path,
) -> None:
    gated = GatedClock()
    first, second = await _pods_on_one_port(gated)
    port = int(first.address.rpartition(":")[2])
    a, b = f"decode-127.0.0.2-{port}", f"decode-127.0.0.3-{port}"
    try:
        async with dnsmasq(tmp_path, ["127.0.0.2 decode.test"]) as server:
            daemon = _daemon(_pool("decode.test", server.nameserver, port=port),
                             backend_drain_timeout_s=60)  # fmt: skip
            await daemon.start()
            client = AsyncRouterClient(f"127.0.0.1:{daemon.grpc_port}", timeout_s=30)
            try:
                assert set(daemon.pool.endpoints) == {a}
                await eventually(lambda: daemon.pool.in_service(a))
                assert daemon.readiness()[0]
                # A stream on pod-a, held mid-way by its clock.
                stream = Stream()
                task = asyncio.create_task(_consume(client, stream, max_tokens=24))
                gated.step(6)
                await eventually(lambda: len(stream.token_ids) >= 3)
                # pod-a's record goes, pod-b's comes.
                server.set_hosts(["127.0.0.3 decode.test"])
                await eventually(lambda: b in daemon.pool.endpoints)
                await eventually(lambda: daemon.pool.endpoints[a].draining)
                # pod-b serves once checked; pod-a takes nothing new.
                await eventually(lambda: daemon.pool.in_service(b))
                after = Stream()
                await _consume(client, after, max_tokens=4)
                assert after.route.decode_backend == b
                assert a in daemon.pool.endpoints  # still draining its stream
                gated.open()
                await asyncio.wait_for(task, 30)
                assert len(stream.token_ids) == 24
                assert stream.last.finish_reason
                await eventually(lambda: a not in daemon.pool.endpoints)
                registry = daemon.registry
                assert (
                    registry.get_sample_value(
                        "hetero_router_backend_healthy", {"backend": a, "role": "decode"}
                    )
                    is None
                )
                assert (
                    registry.get_sample_value(
                        "hetero_router_backend_failures_total", {"backend": a, "phase": "decode"}
                    )
                    is None
                )
                assert (
                    registry.get_sample_value(
                        "hetero_router_backend_failures_total", {"backend": b, "phase": "decode"}
                    )
                    == 0
                )
                assert (
                    registry.get_sample_value(
                        "hetero_router_backend_healthy", {"backend": b, "role": "decode"}
                    )
                    == 1
                )
                # Every record gone: the pool is empty, the router not ready.
                server.set_hosts([])
                await eventually(lambda: not daemon.pool.endpoints)
                assert daemon.readiness() == (False, f"no healthy backends for: {MODEL}")
            finally:
                gated.open()
                await client.close()
                await daemon.stop()
    finally:
        await first.stop(grace_s=0)
        await second.stop(grace_s=0)


async def test_srv_records_give_targets_and_ports(tmp_path: Path) -> None:
    first = await _device("127.0.0.1", 0, "pod-a")
    second = await _device("127.0.0.1", 0, "pod-b")
    ports = sorted(int(d.address.rpartition(":")[2]) for d in (first, second))
    srv = [f"_grpc._tcp.decode.test,localhost,{port}" for port in ports]
    try:
        async with dnsmasq(tmp_path, [], srv) as server:
            daemon = _daemon(_pool("_grpc._tcp.decode.test", server.nameserver, record="SRV"))
            await daemon.start()
            try:
                ids = {f"decode-localhost-{port}" for port in ports}
                assert set(daemon.pool.endpoints) == ids
                assert {e.config.address for e in daemon.pool.endpoints.values()} == {
                    f"localhost:{port}" for port in ports
                }
                await eventually(lambda: all(daemon.pool.in_service(i) for i in ids))
            finally:
                await daemon.stop()
    finally:
        await first.stop(grace_s=0)
        await second.stop(grace_s=0)


async def test_a_dns_server_that_stops_answering_keeps_the_backends(tmp_path: Path) -> None:
    device = await _device("127.0.0.2", 0, "pod-a")
    port = int(device.address.rpartition(":")[2])
    try:
        async with dnsmasq(tmp_path, ["127.0.0.2 decode.test"]) as server:
            daemon = _daemon(_pool("decode.test", server.nameserver, port=port, timeout_s=0.2))
            await daemon.start()
            try:
                backend = f"decode-127.0.0.2-{port}"
                assert set(daemon.pool.endpoints) == {backend}
                server.process.terminate()
                await server.process.wait()
                # Lookups time out now; several rounds later the backend is still there.
                await eventually(lambda: daemon.membership.failing("decode"), timeout_s=10)
                assert set(daemon.pool.endpoints) == {backend}
                assert not daemon.pool.endpoints[backend].draining
            finally:
                await daemon.stop()
    finally:
        await device.stop(grace_s=0)


async def _consume(client: AsyncRouterClient, stream: Stream, **sampling: object) -> None:
    async for message in client.generate("a prompt", temperature=0, **sampling):
        stream.messages.append(message)
