"""The operational surface: gRPC health and reflection, /healthz, /readyz, /metrics."""

from __future__ import annotations

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import Cluster


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
    assert 'hetero_router_requests_total{mode="split",outcome="ok"} 1.0' in body
    assert 'hetero_router_time_to_first_token_seconds_count{mode="split"} 1.0' in body
    assert 'hetero_router_time_per_output_token_seconds_count{mode="split"} 1.0' in body
    assert 'hetero_router_backend_healthy{backend="groq-0",role="decode"} 1.0' in body


async def test_readyz_is_503_while_draining(cluster: Cluster) -> None:
    await cluster.daemon.stop()
    ready, detail = cluster.daemon.readiness()
    assert (ready, detail) == (False, "draining")
