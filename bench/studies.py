"""Scheduling studies on the simulator: when splitting pays, what SRAM decode buys,
what SLO- and prefix-aware scheduling gains over round-robin.

Every figure is a *goodput*: the highest request rate a cluster sustains while at least
90% of requests meet the SLO (DistServe's definition), found by search over the rate
with a fixed set of request lengths. Device timing is the mock devices' roofline as
calibrated in backends/perf/profiles.yaml; no study touches a profile. All figures
are modelled, not measured on hardware.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.scheduling.registry import load_policy, parse_policy
from router.scheduling.slo import Slo
from router.sim.cluster import Cluster, parse_cluster
from router.sim.policy import resolve_policy
from router.sim.simulator import SchedulerLike, Simulator
from router.sim.workload import PrefixSharing, RequestSpec, generate

TARGET_ATTAINMENT = 0.9

# The SLO of the split and hardware studies, fixed before any run: a first token within
# a second and a steady 40 tokens/s (25 ms per token), the pace of the project's
# "interactive" preset, as a mean per request. Tight for Llama-3.1-70B on H100: one
# TP4 deployment's own decode step is 14 ms, so a single 50 ms prefill stall every few
# tokens breaks it.
TIGHT = Slo(
    name="tight-tpot",
    ttft_s=1.0,
    tpot_s=0.025,
    source="TTFT 1 s; TPOT 25 ms = the interactive preset's 40 tokens/s as a mean",
)

Policy = Callable[[], SchedulerLike]


def fixed_policy(decider: str, picker: str = "least-outstanding") -> Policy:
    """A profile that always (or never) splits, picks by load and sheds nothing."""
    raw = {
        "profiles": {
            "default": {
                "slo": {"ttft_ms": 1000, "tpot_ms": 50},
                "decider": decider,
                "picker": picker,
                "admission": "admit-all",
            }
        }
    }
    return lambda: parse_policy(raw)


def packaged_policy() -> SchedulerLike:
    return load_policy()


@dataclass(frozen=True)
class Goodput:
    rate: float  # requests per second at >= 90% attainment
    attainment: float  # at that rate
    runs: int
    cpu_s: float


def max_goodput(
    cluster: Cluster,
    policy: Policy,
    requests: Callable[[float], Sequence[RequestSpec]],
    slo: Slo | Mapping[str, Slo],
    *,
    start_rate: float = 1.0,
    precision: float = 0.03,
    max_runs: int = 24,
) -> Goodput:
    """The highest rate whose run meets ``slo`` (one for all, or one per SLO class) for
    90% of requests (0 if none does).

    Doubles the rate until a run misses, then bisects to ``precision`` (relative).
    Attainment is not strictly monotone in the rate at this sample size; the search
    reports the highest rate it saw met.
    """
    runs = 0
    cpu = 0.0

    def attained(rate: float) -> float:
        nonlocal runs, cpu
        runs += 1
        specs = requests(rate)
        allowed = int(len(specs) * (1 - TARGET_ATTAINMENT))
        result = Simulator(cluster, policy()).run(specs, slo=slo, stop_after_misses=allowed)
        cpu += result.cpu_s
        if result.stopped_early:
            return 0.0
        return result.attainment(slo)

    best, best_attainment = 0.0, math.nan
    low, high = 0.0, start_rate
    while runs < max_runs:
        value = attained(high)
        if value < TARGET_ATTAINMENT:
            break
        best, best_attainment, low, high = high, value, high, high * 2
    while runs < max_runs and high - low > precision * max(low, 1e-9):
        middle = (low + high) / 2
        value = attained(middle)
        if value >= TARGET_ATTAINMENT:
            best, best_attainment, low = middle, value, middle
        else:
            high = middle
    return Goodput(best, best_attainment, runs, cpu)


def chips(cluster: Cluster) -> int:
    return sum(device.perf.timing.chips for device in cluster.devices)


def cluster_of(model: str, *groups: dict[str, Any]) -> Cluster:
    return parse_cluster({"model": model, "groups": list(groups)}, source="study")


def group(name: str, profile: str, role: str, count: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "profile": profile, "role": role, "count": count, **extra}


def workload(
    name: str, duration_s: float, seed: int = 11, prefix: PrefixSharing | None = None
) -> Callable[[float], list[RequestSpec]]:
    """``duration_s`` seconds of Poisson arrivals at the asked rate (at least 200 requests):
    long enough for queues to reach their steady state rather than a transient."""

    def make(rate: float) -> list[RequestSpec]:
        count = max(200, int(rate * duration_s))
        return generate(name, count, rate_per_s=rate, seed=seed, prefix=prefix)

    return make


def fixed_lengths(
    duration_s: float, prompt: int, output: int, seed: int = 11
) -> Callable[[float], list[RequestSpec]]:
    arrivals = workload("chatbot", duration_s, seed)
    return lambda rate: [RequestSpec(r.arrival_s, prompt, output) for r in arrivals(rate)]


# ---------------------------------------------------------------- study 1: split vs colocated


def split_vs_colocated(
    model: str,
    deployments: int,
    requests: Callable[[float], Sequence[RequestSpec]],
    slo: Slo,
    *,
    link_gbps: float | None = None,
) -> dict[str, Any]:
    """Goodput per GPU of ``deployments`` H100 deployments, colocated and split at every
    prefill:decode ratio; the split figure is its best ratio's."""
    link = {} if link_gbps is None else {"link_gbps": link_gbps}
    colocated = cluster_of(model, group("h100", "h100", "both", deployments, **link))
    result: dict[str, Any] = {"deployments": deployments, "gpus": chips(colocated)}
    found = max_goodput(colocated, fixed_policy("never"), requests, slo)
    result["colocated_per_gpu"] = found.rate / chips(colocated)
    ratios = {}
    for prefill in range(1, deployments):
        split = cluster_of(
            model,
            group("p", "h100", "prefill", prefill, **link),
            group("d", "h100", "decode", deployments - prefill, **link),
        )
        ratios[f"{prefill}P{deployments - prefill}D"] = max_goodput(
            split, fixed_policy("always"), requests, slo
        ).rate / chips(split)
    best = max(ratios, key=lambda k: ratios[k])
    result.update(
        split_per_gpu=ratios[best],
        best_split=best,
        split_by_ratio=ratios,
        ratio=ratios[best] / result["colocated_per_gpu"]
        if result["colocated_per_gpu"] > 0
        else math.inf,
    )
    return result


# ---------------------------------------------------------------- study 2: SRAM decode


def hetero_per_dollar(
    model: str,
    decode_profile: str,
    requests: Callable[[float], Sequence[RequestSpec]],
    slo: Slo,
    prefill_counts: Sequence[int] = (1, 2, 4),
) -> dict[str, Any]:
    """Goodput per dollar-hour of H100 prefill + one ``decode_profile`` decode deployment,
    against H100 colocated deployments costing the same per hour."""
    trials = {}
    for prefill in prefill_counts:
        hetero = cluster_of(
            model,
            group("p", "h100", "prefill", prefill),
            group("d", decode_profile, "decode", 1),
        )
        budget = hetero.price_per_hour_usd
        h100 = cluster_of(model, group("h", "h100", "both", 1))
        count = max(1, round(budget / h100.price_per_hour_usd))
        colocated = cluster_of(model, group("h", "h100", "both", count))
        found_hetero = max_goodput(hetero, fixed_policy("always"), requests, slo)
        found_colocated = max_goodput(colocated, fixed_policy("never"), requests, slo)
        hetero_per_usd = found_hetero.rate / budget
        colocated_per_usd = found_colocated.rate / colocated.price_per_hour_usd
        trials[f"{prefill}x h100 + 1x {decode_profile}"] = {
            "price_per_hour_usd": round(budget, 2),
            "hetero_goodput": found_hetero.rate,
            "colocated_h100_deployments": count,
            "colocated_price_per_hour_usd": round(colocated.price_per_hour_usd, 2),
            "colocated_goodput": found_colocated.rate,
            "hetero_per_usd_hour": hetero_per_usd,
            "colocated_per_usd_hour": colocated_per_usd,
            "ratio": hetero_per_usd / colocated_per_usd if colocated_per_usd > 0 else math.inf,
        }
    best = max(trials, key=lambda k: trials[k]["ratio"])
    return {"best": best, "ratio": trials[best]["ratio"], "trials": trials}


# ---------------------------------------------------------------- study 3: policies


def policy_comparison(
    cluster: Cluster,
    requests: Callable[[float], Sequence[RequestSpec]],
    slo: Slo,
    policies: dict[str, Policy],
) -> dict[str, float]:
    return {
        name: max_goodput(cluster, policy, requests, slo).rate for name, policy in policies.items()
    }


def sim_cpu_seconds_per_sim_hour(simulated_s: float) -> dict[str, float]:
    """CPU seconds to simulate an hour of 16 H100 deployments (8 prefill, 8 decode,
    Llama-3.1-8B) at 100 requests per second with the packaged policy; a shorter run
    is scaled to the hour."""
    cluster = cluster_of(
        "llama-3.1-8b",
        group("p", "h100", "prefill", 8),
        group("d", "h100", "decode", 8),
    )
    count = int(100 * simulated_s)
    specs = generate("chatbot", count, rate_per_s=100.0, seed=5)
    result = Simulator(cluster, resolve_policy()).run(specs)
    return {
        "simulated_s": result.makespan_s,
        "requests": float(result.requests),
        "cpu_s": result.cpu_s,
        "cpu_seconds_per_sim_hour": result.cpu_s * 3600.0 / result.makespan_s,
    }


def mixed_workload(
    duration_s: float, prefix: PrefixSharing, seed: int = 11, long_share: float = 0.2
) -> Callable[[float], list[RequestSpec]]:
    """Chat requests behind shared prefixes (system prompts, few-shot templates) mixed with
    ``long_share`` of summarization requests that share nothing, over the same span."""

    def make(rate: float) -> list[RequestSpec]:
        total = max(200, int(rate * duration_s))
        long_count = max(1, round(total * long_share))
        chat = generate(
            "chatbot", total - long_count, rate_per_s=rate * (1 - long_share), seed=seed,
            prefix=prefix,
        )  # fmt: skip
        long = generate("summarization", long_count, rate_per_s=rate * long_share, seed=seed + 1)
        return sorted(chat + long, key=lambda r: r.arrival_s)

    return make
