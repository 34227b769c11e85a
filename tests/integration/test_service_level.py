"""SLO, priority and SLO class through both doors; admission, load and prefix reports."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest

from router.client import AsyncRouterClient
from tests.conftest import Cluster, start_cluster, stop_cluster
from tests.helpers import sample_total

# A colocated request on these devices streams one token per 20 ms: it stays in flight.
SLOW: dict[str, object] = {"decode_step_s": 0.02}


async def collect(client: AsyncRouterClient, prompt: str, **options: object) -> list[bytes]:
    return [r.SerializeToString() async for r in client.generate(prompt, **options)]


async def metric(cluster: Cluster, name: str, labels: dict[str, str]) -> float:
    return sample_total(cluster.daemon.registry, name, **labels)


async def post(
    cluster: Cluster, body: object, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{cluster.admin_url}/v1/completions", json=body, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.json()


@pytest.fixture
async def slow() -> AsyncIterator[Cluster]:
    running = await start_cluster(device_options=SLOW, max_in_flight=1, queue_limit=0)
    try:
        yield running
    finally:
        await stop_cluster(running)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"slo_ttft_ms": 0}, "slo.ttft_ms must be between 1 and 3600000"),
        ({"slo_tpot_ms": 3_600_001}, "slo.tpot_ms must be between 1 and 3600000"),
        ({"priority": 10}, "priority must be between 0 and 9"),
        ({"slo_class": "platinum"}, "unknown slo_class 'platinum'; known: "),
    ],
)
async def test_bad_service_levels_are_invalid_argument_and_reach_no_backend(
    cluster: Cluster, options: dict[str, object], reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(cluster.client, "hi", **options)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (raised.value.details() or "")
    assert all(device.requests_received == 0 for device in cluster.devices.values())


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"X-Hetero-SLO-TTFT-Ms": "0"}, "X-Hetero-SLO-TTFT-Ms must be between 1 and 3600000"),
        ({"X-Hetero-SLO-TPOT-Ms": "-5"}, "X-Hetero-SLO-TPOT-Ms must be between 1 and 3600000"),
        ({"X-Hetero-SLO-TPOT-Ms": "fast"}, "header X-Hetero-SLO-TPOT-Ms must be a whole number"),
        ({"X-Hetero-Priority": "12"}, "X-Hetero-Priority must be between 0 and 9"),
        ({"X-Hetero-Priority": "1.5"}, "header X-Hetero-Priority must be a whole number"),
        ({"X-Hetero-SLO-Class": "platinum"}, "unknown X-Hetero-SLO-Class 'platinum'"),
    ],
)
async def test_bad_service_level_headers_are_400_in_openai_shape(
    cluster: Cluster, headers: dict[str, str], reason: str
) -> None:
    status, _, body = await post(cluster, {"prompt": "hi", "max_tokens": 2}, headers)
    assert status == 400
    error = body["error"]
    assert isinstance(error, dict)
    assert reason in error["message"]
    assert error["type"] == "invalid_request_error"
    assert all(device.requests_received == 0 for device in cluster.devices.values())


async def test_a_served_request_is_counted_against_its_slo(cluster: Cluster) -> None:
    hour = 3_600_000
    await collect(
        cluster.client, "on time", max_tokens=4, disaggregation="colocated",
        slo_ttft_ms=hour, slo_tpot_ms=hour, priority=9,
    )  # fmt: skip
    status, _, _ = await post(
        cluster,
        {"prompt": "on time", "max_tokens": 4, "disaggregation": "split"},
        {"X-Hetero-SLO-TTFT-Ms": str(hour), "X-Hetero-SLO-TPOT-Ms": str(hour),
         "X-Hetero-Priority": "3", "X-Hetero-SLO-Class": "default"},
    )  # fmt: skip
    assert status == 200
    for mode in ("colocated", "split"):
        labels = {"outcome": "met", "slo_class": "default", "mode": mode}
        assert await metric(cluster, "hetero_router_slo_requests_total", labels) == 1


async def test_a_full_queue_is_resource_exhausted_with_a_retry_hint(slow: Cluster) -> None:
    holder = slow.client.generate("hold", max_tokens=2000, disaggregation="colocated")
    await anext(holder)  # in flight, holding the only slot
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await collect(slow.client, "one too many", max_tokens=2, priority=4)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue for priority 4 is full (0 waiting)" in (raised.value.details() or "")
        trailing = dict(raised.value.trailing_metadata() or ())
        assert 50 <= int(trailing["retry-after-ms"]) <= 30_000

        status, headers, body = await post(slow, {"prompt": "and another", "max_tokens": 2})
        assert status == 429
        assert int(headers["Retry-After"]) >= 1
        assert "queue for priority 0 is full" in str(body)
        shed = await metric(slow, "hetero_router_shed_total", {"reason": "queue_full"})
        assert shed == 2
    finally:
        await holder.aclose()


async def test_load_reports_and_the_routers_own_accounting_reach_the_snapshot(
    slow: Cluster,
) -> None:
    pool = slow.daemon.pool
    assert all(view.kv_tokens_capacity > 0 for view in pool.snapshot().backends)
    holder = slow.client.generate("busy", max_tokens=2000, disaggregation="colocated")
    first = await anext(holder)
    backend = first.route.decode_backend
    try:
        await slow.daemon.health.check_all()
        view = next(v for v in pool.snapshot().backends if v.id == backend)
        assert view.running == 1
        assert view.context_tokens == len("busy") + 2000  # prompt estimate + max_tokens
        assert view.queued_prefill_tokens == 0
        assert view.kv_tokens_used > 0  # the device's own report
    finally:
        await holder.aclose()


async def test_prefix_hashes_a_device_reports_cached_enter_the_index() -> None:
    cluster = await start_cluster(device_options={"prefix_cache_blocks": 64})
    try:
        prompt = "a system prompt shared by many requests. " * 8
        stream = cluster.client.generate(prompt, max_tokens=2, disaggregation="colocated")
        responses = [r async for r in stream]
        backend = responses[0].route.decode_backend
        index = cluster.daemon.pool.prefix_index
        held = index.blocks_held(backend)
        assert held > 0  # recorded when the request was routed
        index.forget(backend)
        await cluster.daemon.health.check_all()  # and reported by the device itself
        assert index.blocks_held(backend) == held
    finally:
        await stop_cluster(cluster)
