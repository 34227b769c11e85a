"""The operational surface: gRPC health and reflection, /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from router.api.grpc_server import LIVENESS_SERVICE
from router.client import ROUTER_SERVICE
from router.daemon import Daemon
from router.settings import Settings
from tests.conftest import Cluster, start_cluster, stop_cluster

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NAMES = ("", ROUTER_SERVICE)


class Health:
    """Check on both names, and one Watch stream per name."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._watches = [
            self._stub.Watch(health_pb2.HealthCheckRequest(service=name)) for name in NAMES
        ]

    async def check(self) -> list[int]:
        replies = [
            await self._stub.Check(health_pb2.HealthCheckRequest(service=name)) for name in NAMES
        ]
        return [reply.status for reply in replies]

    async def next_watched(self) -> list[int]:
        """The next status each Watch stream sends (within a bound, to fail fast)."""
        replies = [await asyncio.wait_for(watch.read(), 5.0) for watch in self._watches]
        return [reply.status for reply in replies]

    async def check_liveness(self) -> int:
        request = health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE)
        reply = await self._stub.Check(request)
        status: int = reply.status
        return status

    def cancel(self) -> None:
        for watch in self._watches:
            watch.cancel()


@contextlib.asynccontextmanager
async def watching(address: str) -> AsyncIterator[Health]:
    async with grpc.aio.insecure_channel(address) as channel:
        health = Health(channel)
        try:
            yield health
        finally:
            health.cancel()


async def readyz(cluster: Cluster) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{cluster.admin_url}/readyz") as reply,
    ):
        return reply.status


async def test_grpc_health_reports_serving_then_not_serving_on_drain(cluster: Cluster) -> None:
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "hetero.router.v1.Router"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await cluster.daemon.front_door.set_serving(False)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_lists_the_router_service(cluster: Cluster) -> None:
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = {service.name for service in reply.list_services_response.service}
            break
    assert "hetero.router.v1.Router" in names
    assert "grpc.health.v1.Health" in names


async def test_healthz_readyz_and_metrics(cluster: Cluster) -> None:
    async for _ in cluster.client.generate("metrics", max_tokens=5, disaggregation="split"):
        pass
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cluster.admin_url}/healthz") as reply:
            assert reply.status == 200
        async with session.get(f"{cluster.admin_url}/readyz") as reply:
            assert reply.status == 200
            assert (await reply.json())["status"] == "ready"
        async with session.get(f"{cluster.admin_url}/metrics") as reply:
            assert reply.status == 200
            body = await reply.text()
    samples = [s for family in text_string_to_metric_families(body) for s in family.samples]

    def total(name: str, **labels: str) -> float:
        return sum(
            s.value for s in samples if s.name == name and labels.items() <= s.labels.items()
        )

    assert total("hetero_router_requests_total", mode="split", outcome="ok") == 1
    assert total("hetero_router_time_to_first_token_seconds_count", mode="split") == 1
    assert total("hetero_router_request_time_per_output_token_seconds_count", mode="split") == 1
    assert total("hetero_router_backend_healthy", backend="groq-0", role="decode") == 1


async def test_readyz_is_503_while_draining(cluster: Cluster) -> None:
    await cluster.daemon.stop()
    ready, detail = cluster.daemon.readiness()
    assert (ready, detail) == (False, "draining")


async def test_grpc_health_follows_readiness_as_decode_backends_go_and_come_back(
    cluster: Cluster,
) -> None:
    pool = cluster.daemon.pool
    await cluster.daemon.health.stop()  # health changes only as the test says
    with structlog.testing.capture_logs() as logs:
        async with watching(cluster.address) as health:
            assert await health.next_watched() == [SERVING, SERVING]
            pool.set_health("groq-0", False, "connection refused", None)
            assert await health.check() == [SERVING, SERVING]  # groq-1 still decodes
            pool.set_health("groq-1", False, "connection refused", None)
            assert await health.next_watched() == [NOT_SERVING, NOT_SERVING]
            assert await health.check() == [NOT_SERVING, NOT_SERVING]
            assert await readyz(cluster) == 503
            await cluster.daemon.health.check_all()  # both devices answer again
            assert await health.next_watched() == [SERVING, SERVING]
            assert await health.check() == [SERVING, SERVING]
            assert await readyz(cluster) == 200
    # Logged once per change: the second decode backend coming back changes nothing.
    changes = [event for event in logs if event["event"] == "readiness changed"]
    assert [event["ready"] for event in changes] == [False, True]
    assert changes[0]["detail"] == "no healthy backends for: llama-3.1-8b"
    assert changes[1]["detail"] == "3/4 backends healthy"


async def test_a_daemon_that_starts_without_decode_backends_is_not_serving(
    cluster: Cluster,
) -> None:
    for name in ("groq-0", "groq-1"):
        await cluster.devices[name].stop(grace_s=0)
    settings = Settings(grpc_address="127.0.0.1:0", http_address="127.0.0.1:0")
    daemon = Daemon(settings, cluster.daemon.pool.config)
    await daemon.start()
    try:
        async with watching(f"127.0.0.1:{daemon.grpc_port}") as health:
            assert await health.check() == [NOT_SERVING, NOT_SERVING]
            assert await health.next_watched() == [NOT_SERVING, NOT_SERVING]
            # Alive all the same: a liveness probe must not restart it for its backends.
            assert await health.check_liveness() == SERVING
    finally:
        await daemon.stop()


async def test_liveness_is_serving_until_the_drain_begins(cluster: Cluster) -> None:
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE)
        assert (await stub.Check(request)).status == SERVING
        # What FrontDoor.stop does first; the server keeps answering while it drains.
        await cluster.daemon.front_door.health.enter_graceful_shutdown()
        assert (await stub.Check(request)).status == NOT_SERVING


async def test_grpc_health_follows_ejections_too() -> None:
    cluster = await start_cluster(outlier_consecutive_failures=1, outlier_base_ejection_s=0.0)
    pool = cluster.daemon.pool
    await cluster.daemon.health.stop()  # health changes only as the test says
    try:
        async with watching(cluster.address) as health:
            assert await health.next_watched() == [SERVING, SERVING]
            pool.record_failure("groq-0")  # ejected: half of the decode backends, the most
            assert not pool.in_service("groq-0")
            pool.set_health("groq-1", False, "connection refused", None)
            assert await health.next_watched() == [NOT_SERVING, NOT_SERVING]
            pool.end_ejections()  # its (zero-length) ejection is over: groq-0 serves again
            assert await health.next_watched() == [SERVING, SERVING]
            assert await health.check() == [SERVING, SERVING]
    finally:
        await stop_cluster(cluster)
