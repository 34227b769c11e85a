"""The cheapest cluster that serves a workload within its SLO, found by simulating.

Candidates are device mixes from the catalogue: a prefill profile and a decode
profile with a count of each (one profile on both sides included), and fleets of one
profile serving whole requests. Each is priced from the catalogue and simulated on
the very same requests; the recommendation is the cheapest whose SLO attainment
reaches the target.

The search is bounded by two assumptions that hold for any sane policy: adding a
device never lowers attainment (so a configuration below a failed one of the same
mix is skipped without a run), and a run may stop once more requests have missed
than the target allows (failing configurations are cheap to reject). Candidates are
tried from the cheapest up, first on a coarse grid of counts, then on every count
between the grid points below the coarse winner's price.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from backends.base import Role
from backends.perf.roofline import load_catalog
from router.scheduling.perf import perf_for
from router.scheduling.slo import Slo
from router.sim.cluster import Cluster, uniform_cluster
from router.sim.simulator import SchedulerLike, Simulator
from router.sim.workload import RequestSpec

# Device counts of the coarse pass: dense where a step is a large share of the cost.
COARSE_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)

Status = Literal["met", "missed", "stopped", "skipped"]


@dataclass(frozen=True, order=True)
class Candidate:
    """``prefill_count`` devices of ``prefill_profile`` (None: a colocated fleet, where
    ``decode_profile`` serves whole requests) and ``decode_count`` of ``decode_profile``."""

    price_per_hour_usd: float
    devices: int
    decode_profile: str
    decode_count: int
    prefill_profile: str | None = None
    prefill_count: int = 0

    @property
    def mix(self) -> tuple[str | None, str]:
        return (self.prefill_profile, self.decode_profile)

    def label(self) -> str:
        if self.prefill_profile is None:
            return f"{self.decode_count}x {self.decode_profile} colocated"
        return (
            f"{self.prefill_count}x {self.prefill_profile} prefill + "
            f"{self.decode_count}x {self.decode_profile} decode"
        )

    def cluster(self, model: str, *, prefix_cache_share: float = 0.0) -> Cluster:
        """The devices of this candidate; ``prefix_cache_share``: see ``uniform_cluster``."""
        if self.prefill_profile is None:
            groups = [(self.decode_profile, Role.BOTH, self.decode_count)]
        else:
            groups = [
                (self.prefill_profile, Role.PREFILL, self.prefill_count),
                (self.decode_profile, Role.DECODE, self.decode_count),
            ]
        return uniform_cluster(model, groups, prefix_cache_share=prefix_cache_share)

    def covered_by(self, other: Candidate) -> bool:
        """Whether ``other`` is the same mix with at least as many devices on each side."""
        return (
            self.mix == other.mix
            and self.prefill_count <= other.prefill_count
            and self.decode_count <= other.decode_count
        )


@dataclass(frozen=True)
class PlanTrial:
    candidate: Candidate
    status: Status
    attainment: float | None = None  # None: not simulated, or stopped before the end
    goodput: float | None = None
    ttft_p99_s: float | None = None
    tpot_p99_s: float | None = None
    cpu_s: float = 0.0
    split_fraction: float | None = None  # of the requests served

    def to_dict(self) -> dict[str, object]:
        candidate = self.candidate
        return {
            "configuration": candidate.label(),
            "prefill_profile": candidate.prefill_profile,
            "prefill_count": candidate.prefill_count,
            "decode_profile": candidate.decode_profile,
            "decode_count": candidate.decode_count,
            "price_per_hour_usd": candidate.price_per_hour_usd,
            "status": self.status,
            "attainment": _finite(self.attainment),
            "goodput": _finite(self.goodput),
            "ttft_p99_ms": None if self.ttft_p99_s is None else _finite(self.ttft_p99_s * 1e3),
            "tpot_p99_ms": None if self.tpot_p99_s is None else _finite(self.tpot_p99_s * 1e3),
            "split_fraction": _finite(self.split_fraction),
            "cpu_s": self.cpu_s,
        }


@dataclass(frozen=True)
class PlanResult:
    model: str
    slo: Slo
    target_attainment: float
    best: PlanTrial | None
    trials: tuple[PlanTrial, ...]
    skipped_profiles: tuple[str, ...]  # catalogue profiles that cannot hold the model

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "slo": {"name": self.slo.name, "ttft_s": self.slo.ttft_s, "tpot_s": self.slo.tpot_s},
            "target_attainment": self.target_attainment,
            "recommended": None if self.best is None else self.best.to_dict(),
            "recommended_cluster": (
                None if self.best is None else self.best.candidate.cluster(self.model).to_config()
            ),
            "trials": [trial.to_dict() for trial in self.trials],
            "skipped_profiles": list(self.skipped_profiles),
        }


PolicyFactory = Callable[[], SchedulerLike]
TrialCallback = Callable[[int, PlanTrial], None]  # (runs so far, the trial)


def plan_cluster(
    model: str,
    requests: Sequence[RequestSpec],
    slo: Slo,
    policy: PolicyFactory,
    *,
    profiles: Sequence[str] | None = None,
    max_devices: int = 16,
    max_price_per_hour_usd: float | None = None,
    target_attainment: float = 0.9,
    max_runs: int = 2000,
    include_colocated: bool = True,
    include_split: bool = True,
    overhead_s: float = 0.0,
    handoff_s: float = 0.0,
    on_trial: TrialCallback | None = None,
) -> PlanResult:
    """Searches device mixes for the cheapest that meets ``slo`` on ``target_attainment``.

    ``policy`` makes a fresh scheduler for each run. ``profiles`` limits the catalogue
    (None: every profile that can hold ``model``); ``max_devices`` bounds the devices
    of one configuration and ``max_runs`` the simulations of the whole search;
    ``overhead_s`` and ``handoff_s`` are the simulator's fixed serving-path latencies.
    """
    if not requests:
        raise ValueError("planning needs at least one request")
    if not 0 < target_attainment <= 1:
        raise ValueError(f"target_attainment must lie in (0, 1], got {target_attainment}")
    if max_devices < 1:
        raise ValueError(f"max_devices must be >= 1, got {max_devices}")
    usable, unusable = usable_profiles(model, profiles)
    if not usable:
        raise ValueError(f"no profile can hold {model}; tried {', '.join(unusable)}")
    every = catalogue_candidates(
        model,
        usable,
        max_devices=max_devices,
        colocated=include_colocated,
        split=include_split,
    )
    if max_price_per_hour_usd is not None:
        every = [c for c in every if c.price_per_hour_usd <= max_price_per_hour_usd]
    search = CandidateSearch(
        model=model,
        requests=requests,
        slo=slo,
        policy=policy,
        target=target_attainment,
        overhead_s=overhead_s,
        handoff_s=handoff_s,
        on_trial=on_trial,
    )
    best = search.cheapest_two_pass(every, max_devices=max_devices, max_runs=max_runs)
    return PlanResult(
        model=model,
        slo=slo,
        target_attainment=target_attainment,
        best=best,
        trials=tuple(search.trials),
        skipped_profiles=tuple(unusable),
    )


class CandidateSearch:
    """Runs candidates cheapest first, remembering failures to skip what they cover.

    ``failed`` may be handed over from a search of a looser SLO: what missed it misses
    this one too, so those candidates and every one they cover are skipped here without
    a run (the frontier sweep relies on it). ``request_slo``, when set, is the SLO every
    request carries to the policy (None: its class's default, as ``plan`` runs).
    ``prefix_cache_share`` gives every device a prefix cache (see ``uniform_cluster``).
    """

    def __init__(
        self,
        *,
        model: str,
        requests: Sequence[RequestSpec],
        slo: Slo,
        policy: PolicyFactory,
        target: float,
        overhead_s: float = 0.0,
        handoff_s: float = 0.0,
        on_trial: TrialCallback | None = None,
        request_slo: Slo | None = None,
        prefix_cache_share: float = 0.0,
        failed: list[Candidate] | None = None,
    ) -> None:
        self.model = model
        self.requests = requests
        self.slo = slo
        self.policy = policy
        self.target = target
        self.allowed_misses = len(requests) - math.ceil(target * len(requests) - 1e-9)
        self.overhead_s = overhead_s
        self.handoff_s = handoff_s
        self.on_trial = on_trial
        self.request_slo = request_slo
        self.prefix_cache_share = prefix_cache_share
        self.trials: list[PlanTrial] = []
        self.runs = 0
        self._failed: list[Candidate] = [] if failed is None else failed

    @property
    def failed(self) -> list[Candidate]:
        """Every candidate known to miss this search's SLO (shared, not copied)."""
        return self._failed

    def cheapest_two_pass(
        self, every: Sequence[Candidate], *, max_devices: int, max_runs: int
    ) -> PlanTrial | None:
        """The cheapest of ``every`` that meets the SLO: first on a coarse grid of counts,
        then on every count between the grid points below the coarse winner's price."""
        coarse_counts = {n for n in COARSE_COUNTS if n <= max_devices} | {max_devices}
        coarse = [
            c
            for c in every
            if c.decode_count in coarse_counts and c.prefill_count in coarse_counts | {0}
        ]
        best = self.cheapest(coarse, max_runs)
        if best is None:
            return None
        price = best.candidate.price_per_hour_usd
        tried = set(coarse)
        finer = [c for c in every if c.price_per_hour_usd < price and c not in tried]
        return self.cheapest(finer, max_runs) or best

    def cheapest(self, candidates: Iterable[Candidate], max_runs: int) -> PlanTrial | None:
        for candidate in sorted(candidates):
            if any(candidate.covered_by(failed) for failed in self._failed):
                continue  # a configuration with more devices of this mix failed already
            if self.runs >= max_runs:
                return None
            trial = self._run(candidate)
            self.trials.append(trial)
            if trial.status == "met":
                return trial
            self._failed.append(candidate)
        return None

    def _run(self, candidate: Candidate) -> PlanTrial:
        self.runs += 1
        simulator = Simulator(
            candidate.cluster(self.model, prefix_cache_share=self.prefix_cache_share),
            self.policy(),
            overhead_s=self.overhead_s,
            handoff_s=self.handoff_s,
            request_slo=self.request_slo,
        )
        result = simulator.run(self.requests, slo=self.slo, stop_after_misses=self.allowed_misses)
        if result.stopped_early:
            trial = PlanTrial(candidate, "stopped", cpu_s=result.cpu_s)
        else:
            summary = result.summary(self.slo)
            attainment = summary.slo_attainment
            met = attainment is not None and attainment >= self.target
            trial = PlanTrial(
                candidate,
                "met" if met else "missed",
                attainment=attainment,
                goodput=summary.goodput,
                ttft_p99_s=summary.ttft_s.p99,
                tpot_p99_s=summary.tpot_s.p99,
                cpu_s=result.cpu_s,
                split_fraction=summary.split_fraction,
            )
        if self.on_trial is not None:
            self.on_trial(self.runs, trial)
        return trial


def usable_profiles(model: str, profiles: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The catalogue profiles (all, or ``profiles``) that can hold ``model``, and the rest."""
    catalog = load_catalog()
    if model not in catalog.models:
        known = ", ".join(sorted(catalog.models))
        raise ValueError(f"unknown model {model!r}; known: {known}")
    names = list(profiles) if profiles is not None else sorted(catalog.profiles)
    unknown = [name for name in names if name not in catalog.profiles]
    if unknown:
        known = ", ".join(sorted(catalog.profiles))
        raise ValueError(f"unknown profile(s) {', '.join(unknown)}; known: {known}")
    usable, unusable = [], []
    for name in names:
        try:
            perf_for(name, model)
        except ValueError:
            unusable.append(name)
        else:
            usable.append(name)
    return usable, unusable


def catalogue_candidates(
    model: str,
    profiles: Sequence[str],
    *,
    max_devices: int,
    colocated: bool = True,
    split: bool = True,
) -> list[Candidate]:
    """Colocated fleets of each profile, and prefill:decode pairs of profiles at every
    ratio, of up to ``max_devices`` devices in all."""
    model_price = {name: _price(name, model) for name in profiles}
    sizes = list(range(1, max_devices + 1))
    found: list[Candidate] = []
    for decode in profiles:
        if colocated:
            found.extend(
                Candidate(n * model_price[decode], n, decode, n) for n in sizes if n <= max_devices
            )
        if not split:
            continue
        for prefill in profiles:
            found.extend(
                Candidate(
                    p * model_price[prefill] + d * model_price[decode],
                    p + d,
                    decode,
                    d,
                    prefill,
                    p,
                )
                for p in sizes
                for d in sizes
                if p + d <= max_devices
            )
    return found


def _price(profile: str, model: str) -> float:
    """$/h of one device: ``profile`` chips, as many as ``model`` needs (auto-sized)."""
    perf = perf_for(profile, model)
    if perf is None:
        raise ValueError(f"no performance model of {model} on {profile}")
    return perf.price_per_hour_usd


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value
