"""Two router replicas agree on what the devices cache when the devices' KV events feed
both: their prefix-affinity hit rate equals one router's, and is lower without events.

The traffic and the hit rate (the share of requests whose device had their prefix
cached, from the devices' own counters) are defined in ``bench/replicas.py``.
"""

from __future__ import annotations

import pytest

from bench.replicas import PREFIXES, measure, prompts

ROUNDS = 3


@pytest.mark.slow  # 45 requests on four devices and five routers
async def test_replicas_fed_by_kv_events_hit_as_often_as_one_router() -> None:
    one = await measure("one router", 1, events=False, rounds=ROUNDS)
    with_events = await measure("two replicas, KV events", 2, events=True, rounds=ROUNDS)
    without = await measure("two replicas, no events", 2, events=False, rounds=ROUNDS)
    # One router misses each prefix once, on its first request.
    assert one.hits == len(prompts(rounds=ROUNDS)) - PREFIXES
    assert with_events.hits == one.hits
    # Without events each replica meets each prefix first on its own.
    assert without.hits < one.hits
