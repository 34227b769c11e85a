"""Prefix affinity with real engines: a repeated long prefix goes where it is cached.

Two lone engines, traffic of a few long shared prefixes, sequential so that load
plays no part. The engines' own prefix-cache counters give the hit rate: through the
router's default policy (prefix-affinity scoring) it must beat round robin.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.engines.servers import VllmServer
from tests.engines.conftest import Engines, Router, StartRouter, backend, long_prompt, via_grpc

HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"
PREFIXES = 3
ROUNDS = 3


def cache_counters(servers: list[VllmServer]) -> tuple[float, float]:
    samples = [s.metrics() for s in servers]
    return sum(m.get(HITS, 0.0) for m in samples), sum(m.get(QUERIES, 0.0) for m in samples)


async def hit_rate(router: Router, engines: Engines, tag: str) -> float:
    servers = [engines.prefill, engines.decode]
    prefixes = [long_prompt(f"{tag}{k}", lines=40) for k in range(PREFIXES)]
    hits_before, queries_before = cache_counters(servers)
    for turn in range(ROUNDS):
        for prefix in prefixes:
            await via_grpc(router, f"{prefix}\n# turn {turn}\n", 2, "colocated")
    hits_after, queries_after = cache_counters(servers)
    return (hits_after - hits_before) / (queries_after - queries_before)


async def test_prefix_affinity_beats_round_robin_on_the_engines_counters(
    engines: Engines, router_for: StartRouter, report: Callable[[str], None]
) -> None:
    lone = [backend("lone-a", engines.prefill, "both"), backend("lone-b", engines.decode, "both")]
    affinity = await hit_rate(await router_for(lone), engines, "affinity")
    round_robin = await hit_rate(await router_for(lone, picker="round-robin"), engines, "rr")
    report(f"prefix-cache hit rate: router {affinity:.3f}, round robin {round_robin:.3f}")
    # Affinity misses each prefix once; round robin once per engine it lands on.
    assert affinity > round_robin
    assert affinity >= 0.5
