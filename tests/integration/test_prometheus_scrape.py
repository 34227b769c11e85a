"""A real Prometheus scrapes the router: what it stores is what the clients saw.

Needs Prometheus from the Debian package (``/usr/bin/prometheus``); skipped where it
is absent. ``promtool check metrics`` lints the page too when promtool is present.
"""

from __future__ import annotations

import time
from collections import Counter

import aiohttp
import pytest

from bench.prometheus import Prometheus, binary, check_metrics, prometheus
from tests.conftest import Cluster
from tests.integration.test_generate import collect

pytestmark = pytest.mark.skipif(
    binary() is None,
    reason="Prometheus is not installed (/usr/bin/prometheus; Debian: apt-get install prometheus)",
)

SLO_CLASS = "default"
REQUESTS = (("split", "a prompt split over two devices " * 4), ("colocated", "served by one"))
SCRAPE_TIMEOUT_S = 10.0


async def _stored(
    server: Prometheus, expression: str, expected: float, timeout_s: float = SCRAPE_TIMEOUT_S
) -> float | None:
    """The expression's value once a scrape has stored ``expected`` (polled); what it was
    at the timeout otherwise."""
    deadline = time.monotonic() + timeout_s
    value = await server.value(expression)
    while value != expected and time.monotonic() < deadline:
        await server.scraped_after(time.time(), timeout_s)
        value = await server.value(expression)
    return value


async def test_prometheus_stores_the_counts_the_clients_saw(cluster: Cluster) -> None:
    seen: Counter[str] = Counter()
    tokens = 0
    for mode, prompt in REQUESTS * 3:
        frames = await collect(
            cluster.client, prompt, disaggregation=mode, max_tokens=8, slo_class=SLO_CLASS
        )
        seen[mode] += 1
        tokens += frames[-1].usage.completion_tokens
    kv_bytes_sent = sum(device.kv_bytes_sent for device in cluster.devices.values())
    assert kv_bytes_sent > 0

    async with prometheus([f"127.0.0.1:{cluster.daemon.http_port}"]) as server:
        for mode, count in seen.items():
            ok = f'sum(hetero_router_requests_total{{outcome="ok",mode="{mode}"}})'
            assert await _stored(server, ok, count) == count, mode
        # One scrape holds every count: the requests were all recorded before it.
        assert await server.value("sum(hetero_router_generation_tokens_total)") == tokens
        assert await server.value("sum(hetero_router_time_to_first_token_seconds_count)") == sum(
            seen.values()
        )
        slo = f'sum(hetero_router_slo_requests_total{{slo_class="{SLO_CLASS}"}})'
        assert await server.value(slo) == sum(seen.values())
        assert await server.value("sum(hetero_router_kv_handoff_bytes_total)") == kv_bytes_sent

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{cluster.admin_url}/metrics") as response,
    ):
        lint = await check_metrics(await response.text())
    if lint is not None:
        assert lint.ok, lint.output
