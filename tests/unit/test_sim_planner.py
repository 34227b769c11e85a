"""The planner recommends the cheapest configuration that meets the SLO, and skips wisely."""

from __future__ import annotations

import pytest

from backends.base import Role
from router.scheduling.perf import perf_for
from router.scheduling.plan import Mode, Plan, RequestFeatures
from router.scheduling.slo import Slo
from router.scheduling.snapshot import PoolSnapshot
from router.sim.planner import Candidate, plan_cluster
from router.sim.workload import generate

MODEL = "llama-3.1-8b"


class LeastBusy:
    """Split long prompts, serve short ones whole, on the backend with the least in flight."""

    def schedule(self, features: RequestFeatures, snapshot: PoolSnapshot, now: float) -> Plan:
        views = snapshot.backends

        def least(role: Role) -> str:
            fitting = [v for v in views if v.role in (role, Role.BOTH)] or list(views)
            return min(fitting, key=lambda v: (v.outstanding, v.id)).id

        if any(v.role is Role.BOTH for v in views):
            chosen = least(Role.BOTH)
            return Plan(Mode.COLOCATED, chosen, chosen)
        if features.prompt_tokens >= 512:
            return Plan(Mode.SPLIT, least(Role.PREFILL), least(Role.DECODE))
        chosen = least(Role.DECODE)
        return Plan(Mode.COLOCATED, chosen, chosen)


def price(profile: str) -> float:
    perf = perf_for(profile, MODEL)
    assert perf is not None
    return perf.price_per_hour_usd


def test_the_cheaper_of_two_configurations_that_both_meet_the_slo_wins() -> None:
    requests = generate("code", 60, rate_per_s=2.0, seed=1)
    loose = Slo(name="loose", ttft_s=5.0, tpot_s=1.0)
    result = plan_cluster(
        MODEL,
        requests,
        loose,
        LeastBusy,
        profiles=["h200", "h100"],
        max_devices=1,
        include_split=False,
    )
    assert price("h100") < price("h200")
    assert result.best is not None
    assert result.best.candidate.label() == "1x h100 colocated"
    assert result.best.status == "met"
    assert result.best.attainment == 1.0
    # Cheapest first: the winner was the first tried, the dearer one never needed.
    assert [t.candidate.label() for t in result.trials] == ["1x h100 colocated"]


def test_a_configuration_that_misses_is_passed_over_for_a_larger_one() -> None:
    requests = generate("code", 400, rate_per_s=150.0, seed=2)
    tight = Slo(name="tight", ttft_s=0.1, tpot_s=0.03)
    seen: list[str] = []
    result = plan_cluster(
        MODEL,
        requests,
        tight,
        LeastBusy,
        profiles=["h100"],
        max_devices=4,
        include_split=False,
        on_trial=lambda runs, trial: seen.append(f"{runs}:{trial.status}"),
    )
    assert result.best is not None
    assert result.best.candidate.decode_count > 1
    statuses = [t.status for t in result.trials]
    assert statuses[-1] == "met"
    assert all(status in ("missed", "stopped") for status in statuses[:-1])
    assert len(seen) == len(result.trials)
    counts = [t.candidate.decode_count for t in result.trials]
    assert counts == sorted(counts)


def test_covered_configurations_are_skipped() -> None:
    small = Candidate(10.0, 2, "h100", 1, "h200", 1)
    large = Candidate(30.0, 4, "h100", 2, "h200", 2)
    other_mix = Candidate(5.0, 2, "h100", 1, "h100", 1)
    assert small.covered_by(large)
    assert not large.covered_by(small)
    assert not other_mix.covered_by(large)


def test_nothing_meets_an_impossible_slo() -> None:
    requests = generate("summarization", 30, rate_per_s=5.0, seed=3)
    impossible = Slo(name="impossible", ttft_s=1e-6, tpot_s=1e-6)
    result = plan_cluster(
        MODEL,
        requests,
        impossible,
        LeastBusy,
        profiles=["h100"],
        max_devices=2,
        max_runs=10,
    )
    assert result.best is None
    assert result.trials
    assert all(t.status != "met" for t in result.trials)
    document = result.to_dict()
    assert document["recommended"] is None


def test_unknown_profiles_and_models_are_refused() -> None:
    requests = generate("code", 5, rate_per_s=1.0, seed=0)
    slo = Slo(name="x", ttft_s=1.0)
    with pytest.raises(ValueError, match="unknown profile"):
        plan_cluster(MODEL, requests, slo, LeastBusy, profiles=["nope"])
    with pytest.raises(ValueError, match="unknown model"):
        plan_cluster("gpt-9", requests, slo, LeastBusy)
