"""The study helpers behind bench/scenarios/scheduling.py, on tiny runs."""

from __future__ import annotations

from bench.decisions import BACKENDS, decision_times_us, pool
from bench.studies import (
    TARGET_ATTAINMENT,
    cluster_of,
    fixed_policy,
    group,
    max_goodput,
    mixed_workload,
    split_vs_colocated,
    workload,
)
from router.scheduling.registry import load_policy
from router.scheduling.slo import Slo
from router.sim.simulator import Simulator
from router.sim.workload import PrefixSharing

LOOSE = Slo(name="loose", ttft_s=2.0, tpot_s=0.05)


def test_max_goodput_is_met_at_the_rate_it_reports_and_missed_well_above() -> None:
    cluster = cluster_of("llama-3.1-8b", group("h", "h100", "both", 1))
    requests = workload("chatbot", 10.0)
    found = max_goodput(cluster, fixed_policy("never"), requests, LOOSE, precision=0.1)
    assert found.rate > 0
    assert found.attainment >= TARGET_ATTAINMENT
    at_rate = Simulator(cluster, fixed_policy("never")()).run(requests(found.rate))
    assert at_rate.attainment(LOOSE) >= TARGET_ATTAINMENT
    above = Simulator(cluster, fixed_policy("never")()).run(requests(found.rate * 2))
    assert above.attainment(LOOSE) < TARGET_ATTAINMENT


def test_split_study_compares_equal_gpu_counts() -> None:
    result = split_vs_colocated("llama-3.1-8b", 2, workload("chatbot", 5.0), LOOSE)
    assert result["gpus"] == 2
    assert set(result["split_by_ratio"]) == {"1P1D"}
    assert result["ratio"] == result["split_per_gpu"] / result["colocated_per_gpu"]


def test_mixed_workload_shares_prefixes_and_keeps_the_rate() -> None:
    specs = mixed_workload(20.0, PrefixSharing(0.8, 4, 256))(10.0)
    arrivals = [s.arrival_s for s in specs]
    assert arrivals == sorted(arrivals)
    assert len(specs) == 200  # 10 req/s over 20 s
    shared = [s for s in specs if s.prefix_group >= 0]
    assert {s.prefix_group for s in shared} <= {0, 1, 2, 3}
    assert 0.5 < len(shared) / len(specs) < 0.8


def test_the_decision_pool_is_64_backends_with_models_and_prefixes() -> None:
    snapshot, prompts = pool()
    assert len(snapshot.backends) == BACKENDS
    assert all(view.perf is not None for view in snapshot.backends)
    assert snapshot.prefix_index is not None
    assert snapshot.prefix_index.blocks_held("b0") > 0
    times = decision_times_us(load_policy(), 50)
    assert len(times) == 50
    assert all(t > 0 for t in times)
    assert len(prompts) == 256
