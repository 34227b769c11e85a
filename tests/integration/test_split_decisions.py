"""Why a request was split or not, as the request log, /metrics and ListBackends say it.

One H100 prefill and one H100 decode device (Llama-3.1-8B): idle, a split is the lower
marginal cost (the prefill device's time is free, the decode device's is not), unless
the request's TPOT target leaves no room for the KV's hop, which only colocation meets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import Role
from router.api.grpc_server import backend_status
from router.metrics import DECISION_REASONS
from router.scheduling.perf import perf_for
from router.scheduling.snapshot import BackendView
from tests.conftest import Cluster, start_cluster, stop_cluster
from tests.helpers import sample_total

MODEL = "llama-3.1-8b"
PROMPT = "x" * 500
LAYOUT = (("h100-p", Role.PREFILL, "h100"), ("h100-d", Role.DECODE, "h100"))
DECISIONS = "hetero_router_split_decisions_total"


@pytest.fixture
async def pair() -> AsyncIterator[Cluster]:
    running = await start_cluster(LAYOUT)
    try:
        yield running
    finally:
        await stop_cluster(running)


async def generate(cluster: Cluster, **options: Any) -> list[router_pb2.GenerateResponse]:
    return [r async for r in cluster.client.generate(PROMPT, max_tokens=2, **options)]


def decisions(cluster: Cluster, **labels: str) -> float:
    return sample_total(cluster.daemon.registry, DECISIONS, model=MODEL, **labels)


async def test_the_log_line_says_why_a_request_was_split_or_not(pair: Cluster) -> None:
    with structlog.testing.capture_logs() as logs:
        split = await generate(pair)
        # 7 ms per token: the decode step (6.4 ms) fits, the step plus the KV's hop does not.
        colocated = await generate(pair, slo_tpot_ms=7)
    assert split[0].route.mode == router_pb2.ROUTE_MODE_SPLIT
    assert colocated[0].route.mode == router_pb2.ROUTE_MODE_COLOCATED
    first, second = [line for line in logs if line["event"] == "request finished"]

    assert (first["mode"], first["decision"], first["slo_class"]) == ("split", "cheaper", "default")
    assert (first["planned_ttft_ms"], first["planned_tpot_ms"]) == (1000, 50)  # the class's
    both = first["predicted_split"], first["predicted_colocated"]
    assert all(p["ttft_ms"] <= 1000 and p["tpot_ms"] <= 50 for p in both)  # both on time
    assert both[0]["marginal_usd"] < 0.9 * both[1]["marginal_usd"]  # the split by the margin
    assert both[0]["prefill_load"] < both[1]["prefill_load"]  # an idle prefill device

    assert (second["mode"], second["decision"], second["planned_tpot_ms"]) == (
        "colocated",
        "on_time",
        7,
    )
    assert second["predicted_split"]["tpot_ms"] > 7 >= second["predicted_colocated"]["tpot_ms"]
    assert second["prefill"] == second["decode"] == "h100-d"


async def test_decisions_are_counted_by_mode_and_reason_from_zero(pair: Cluster) -> None:
    for mode in ("split", "colocated"):
        for reason in DECISION_REASONS:
            labels = {"slo_class": "default", "decision": mode, "reason": reason}
            assert any(
                sample.name == DECISIONS and labels.items() <= sample.labels.items()
                for metric in pair.daemon.registry.collect()
                for sample in metric.samples
            ), labels
    assert decisions(pair) == 0
    await generate(pair)
    await generate(pair, slo_tpot_ms=7)
    await generate(pair, disaggregation="split")
    assert decisions(pair, decision="split", reason="cheaper") == 1
    assert decisions(pair, decision="colocated", reason="on_time") == 1
    assert decisions(pair, decision="split", reason="requested") == 1
    assert decisions(pair) == 3


async def test_list_backends_shows_what_the_decision_reads(pair: Cluster) -> None:
    await generate(pair)
    listing = {b.id: b for b in (await pair.client.list_backends()).backends}
    prefill, decode = listing["h100-p"], listing["h100-d"]
    assert prefill.price_per_hour_usd == decode.price_per_hour_usd == pytest.approx(6.88)
    # Idle again: nothing queued, no KV reserved, one decode iteration of an empty batch.
    assert prefill.queue_wait_seconds == decode.queue_wait_seconds == 0
    assert decode.context_tokens == 0
    assert decode.kv_free_fraction == 1.0
    assert decode.decode_step_seconds == 0


def test_a_busy_backend_is_listed_with_its_modelled_queue_and_step() -> None:
    perf = perf_for("h100", MODEL)
    assert perf is not None
    view = BackendView(
        id="b",
        kind="mock",
        address="127.0.0.1:1",
        role=Role.BOTH,
        model=MODEL,
        profile="h100",
        healthy=True,
        outstanding=3,
        queued_prefill_tokens=4000,
        running=10,
        context_tokens=20_000,
        perf=perf,
    )
    status = backend_status(view)
    assert status.queue_wait_seconds == pytest.approx(perf.prefill_s(4000))
    assert status.decode_step_seconds == pytest.approx(perf.step_s(10, 20_000))
    assert status.queue_wait_seconds > 0
    assert status.decode_step_seconds > 0
    assert status.context_tokens == 20_000
    assert status.kv_free_fraction == pytest.approx(1 - 20_000 / perf.kv_capacity_tokens)
    assert status.chips == 1
