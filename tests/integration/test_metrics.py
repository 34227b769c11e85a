"""What /metrics and the request log say about requests served on a mock cluster."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import structlog
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from router.metrics import (
    BACKEND_LABEL_CAP,
    LATENCY_BUCKETS,
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
    VLLM_LATENCY_BUCKETS,
    VLLM_TOKEN_BUCKETS,
    VLLM_TTFT_BUCKETS,
    LabelledHistogram,
    RouterMetrics,
)
from router.record import RequestRecord
from tests.conftest import Cluster
from tests.helpers import sample_total

MODEL = "llama-3.1-8b"
SPLIT = {"model": MODEL, "mode": "split", "prefill_kind": "h100", "decode_kind": "groq-lpu"}


def value(cluster: Cluster, name: str, **labels: str) -> float:
    return sample_total(cluster.daemon.registry, name, **labels)


def has_series(cluster: Cluster, name: str, **labels: str) -> bool:
    return any(
        sample.name == name and labels.items() <= sample.labels.items()
        for metric in cluster.daemon.registry.collect()
        for sample in metric.samples
    )


async def generate(cluster: Cluster, prompt: str, **options: Any) -> tuple[int, int, int]:
    """Token frames, tokens and prompt tokens (usage) of one request."""
    frames = tokens = prompt_tokens = 0
    async for response in cluster.client.generate(prompt, **options):
        if response.token_ids:
            frames += 1
            tokens += len(response.token_ids)
        if response.finish_reason:
            prompt_tokens = response.usage.prompt_tokens
    return frames, tokens, prompt_tokens


async def test_counters_exist_at_zero_before_any_request(cluster: Cluster) -> None:
    for reason in ("queue_full", "queue_time", "queue_expired", "client_rate", "client_cap", "slo"):
        assert has_series(cluster, "hetero_router_shed_total", reason=reason)
    for kind in ("retry", "migration", "colocated"):
        assert has_series(cluster, "hetero_router_retries_total", kind=kind)
    met = {**SPLIT, "outcome": "met", "slo_class": "default"}
    assert has_series(cluster, "hetero_router_slo_requests_total", **met)
    assert has_series(cluster, "hetero_router_slo_ttft_requests_total", **met)
    assert has_series(
        cluster,
        "hetero_router_slo_requests_total",
        model=MODEL,
        mode="colocated",
        prefill_kind="groq-lpu",
        decode_kind="groq-lpu",
        outcome="missed",
    )
    assert has_series(
        cluster, "hetero_router_requests_total", model=MODEL, mode="split", outcome="ok"
    )
    assert has_series(cluster, "hetero_router_kv_handoff_bytes_total", **{
        k: SPLIT[k] for k in ("model", "prefill_kind", "decode_kind")
    })  # fmt: skip
    assert has_series(
        cluster, "hetero_router_backend_failures_total", backend="groq-1", phase="decode"
    )
    # ... and every one of them at zero.
    assert value(cluster, "hetero_router_shed_total") == 0
    assert value(cluster, "hetero_router_slo_requests_total") == 0
    assert value(cluster, "hetero_router_requests_total") == 0


async def test_a_split_request_is_measured_per_phase_with_its_device_kinds(
    cluster: Cluster,
) -> None:
    frames, tokens, prompt_tokens = await generate(
        cluster, "measure me", max_tokens=6, disaggregation="split"
    )
    assert tokens == 6
    ok = {**SPLIT, "slo_class": "default"}
    requests = {"model": MODEL, "mode": "split", "outcome": "ok"}
    assert value(cluster, "hetero_router_requests_total", **requests) == 1
    assert value(cluster, "hetero_router_time_to_first_token_seconds_count", **ok) == 1
    # One gap per token frame after the first, each in the histogram.
    assert value(cluster, "hetero_router_inter_token_latency_seconds_count", **ok) == frames - 1
    for phase in ("e2e_request_latency", "request_queue_time", "request_prefill_time"):
        assert value(cluster, f"hetero_router_{phase}_seconds_count", **ok) == 1
    assert value(cluster, "hetero_router_request_decode_time_seconds_count", **ok) == 1
    assert value(cluster, "hetero_router_request_time_per_output_token_seconds_count", **ok) == 1
    assert value(cluster, "hetero_router_generation_tokens_total", **ok) == tokens
    assert value(cluster, "hetero_router_prompt_tokens_total", **ok) == prompt_tokens > 0
    kinds = {"model": MODEL, "prefill_kind": "h100", "decode_kind": "groq-lpu"}
    assert value(cluster, "hetero_router_kv_handoff_seconds_count", **kinds) == 1
    # The bytes the prefill device said it holds for the request's KV.
    assert value(cluster, "hetero_router_kv_handoff_bytes_total", **kinds) > 0
    # One leg on an H100, one on a Groq device, each timed.
    legs = "hetero_router_backend_request_latency_seconds_count"
    assert value(cluster, legs, phase="prefill") == 1
    assert value(cluster, legs, phase="decode") == 1
    prefill_leg = [b for b in ("h100-0", "h100-1") if value(cluster, legs, backend=b) == 1]
    assert len(prefill_leg) == 1
    assert value(cluster, "hetero_router_num_requests_running", model=MODEL) == 0
    assert value(cluster, "hetero_router_num_requests_waiting", model=MODEL) == 0


async def test_a_colocated_request_has_one_kind_and_no_handoff(cluster: Cluster) -> None:
    await generate(cluster, "alone", max_tokens=4, disaggregation="colocated")
    colocated = {"model": MODEL, "mode": "colocated", "outcome": "ok"}
    assert value(cluster, "hetero_router_requests_total", **colocated) == 1
    samples = [
        sample.labels
        for metric in cluster.daemon.registry.collect()
        for sample in metric.samples
        if sample.name == "hetero_router_time_to_first_token_seconds_count" and sample.value
    ]
    assert len(samples) == 1
    assert samples[0]["prefill_kind"] == samples[0]["decode_kind"]
    assert value(cluster, "hetero_router_kv_handoff_seconds_count") == 0
    assert value(cluster, "hetero_router_kv_handoff_bytes_total") == 0


async def test_slo_outcomes_are_counted_per_target(cluster: Cluster) -> None:
    hour = 3_600_000
    await generate(cluster, "on time", max_tokens=4, disaggregation="split", slo_ttft_ms=hour)
    labels = {**SPLIT, "slo_class": "default", "outcome": "met"}
    assert value(cluster, "hetero_router_slo_requests_total", **labels) == 1
    assert value(cluster, "hetero_router_slo_ttft_requests_total", **labels) == 1
    # Its TPOT target is the class default's.
    assert value(cluster, "hetero_router_slo_tpot_requests_total") == 1


async def test_every_finished_request_logs_one_line(cluster: Cluster) -> None:
    with structlog.testing.capture_logs() as logs:
        await generate(cluster, "log me", max_tokens=3, disaggregation="split")
    finished = [line for line in logs if line["event"] == "request finished"]
    assert len(finished) == 1
    line = finished[0]
    assert line["model"] == MODEL
    assert line["mode"] == "split"
    assert line["outcome"] == "ok"
    assert line["completion_tokens"] == 3
    assert line["prefill"].startswith("h100-")
    assert line["decode"].startswith("groq-")
    assert line["ttft_ms"] >= 0
    assert line["handoff_bytes"] > 0
    assert line["attempts"] == 1


async def test_a_sample_rate_of_zero_logs_failures_only(cluster: Cluster) -> None:
    settings = cluster.daemon.settings
    object.__setattr__(settings, "request_log_sample_rate", 0.0)
    with structlog.testing.capture_logs() as logs:
        await generate(cluster, "quiet", max_tokens=2)
        await cluster.daemon.health.stop()  # health changes only as the test says
        for name in ("groq-0", "groq-1", "h100-0", "h100-1"):
            cluster.daemon.pool.set_health(name, False, "down for the test", None)
        with pytest.raises(grpc.aio.AioRpcError):
            await generate(cluster, "fails")
    finished = [line for line in logs if line["event"] == "request finished"]
    # (The client tries an UNAVAILABLE request again: one line per attempt it made.)
    assert finished
    assert {line["outcome"] for line in finished} == {"nohealthybackend"}
    assert "no healthy" in finished[0]["error"]


def test_buckets_hold_every_vllm_boundary() -> None:
    assert set(VLLM_TTFT_BUCKETS) <= set(TTFT_BUCKETS)
    assert set(VLLM_TOKEN_BUCKETS) <= set(TOKEN_BUCKETS)
    assert set(VLLM_LATENCY_BUCKETS) <= set(LATENCY_BUCKETS)
    # Finer where SLOs sit: a 1.68 s TTFT p99 is not read as 2.5 s, a 3 ms TPOT not as 10 ms.
    assert {1.5, 1.75, 2.0} <= set(TTFT_BUCKETS)
    assert {0.002, 0.003, 0.005} <= set(TOKEN_BUCKETS)


def test_the_per_backend_label_is_capped() -> None:
    metrics = RouterMetrics(CollectorRegistry())
    labels = [metrics.backend_label(f"b{i}") for i in range(BACKEND_LABEL_CAP + 6)]
    assert labels[:BACKEND_LABEL_CAP] == [f"b{i}" for i in range(BACKEND_LABEL_CAP)]
    assert set(labels[BACKEND_LABEL_CAP:]) == {"other"}
    assert metrics.backend_label("b3") == "b3"  # stable for a backend seen before


class Broken:
    def started(self, record: RequestRecord) -> str:
        raise RuntimeError("observer bug")

    def finished(self, record: RequestRecord) -> None:
        raise RuntimeError("observer bug")


class Seen:
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def started(self, record: RequestRecord) -> str:
        assert record.first_token_at is None  # told before anything ran
        return "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    def finished(self, record: RequestRecord) -> None:
        self.records.append(record)


async def test_observers_see_each_request_and_their_faults_fail_none(cluster: Cluster) -> None:
    seen = Seen()
    cluster.daemon.dispatcher._observers = (Broken(), seen)  # a spy on the hook
    frames, tokens, _ = await generate(cluster, "observed", max_tokens=5, disaggregation="split")
    assert tokens == 5
    [record] = seen.records
    assert record.outcome == "ok"
    assert record.mode == "split"
    assert record.completion_tokens == 5
    assert len(record.frame_gaps) == frames - 1
    assert [leg.phase for leg in record.legs] == ["prefill", "decode"]
    assert record.admitted is not None
    assert record.prefill_done_at is not None
    assert record.decode_first_at is not None
    assert record.first_token_at is not None
    assert record.arrived <= record.admitted <= record.prefill_done_at <= record.decode_first_at
    assert record.first_token_at <= record.last_token_at


def test_the_request_path_histogram_writes_what_prometheus_client_writes() -> None:
    RouterMetrics(CollectorRegistry())  # as the router runs: no _created series
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bounds = (0.001, 0.01, 0.1, 1.0, 2.5)
    mine = LabelledHistogram("h_seconds", "a histogram", ["mode"], bounds, ours)
    reference = Histogram("h_seconds", "a histogram", ["mode"], buckets=bounds, registry=theirs)
    # On a bound, between bounds, past the last, zero, and a second label set.
    for mode, value in [("a", 0.01), ("a", 0.05), ("a", 9.0), ("a", 0.0), ("b", 1.0)]:
        mine.labels(mode).observe(value)
        reference.labels(mode).observe(value)
    assert generate_latest(ours) == generate_latest(theirs)
    mine.remove("b")
    assert 'mode="b"' not in generate_latest(ours).decode()
