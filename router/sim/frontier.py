"""The cost frontier: the cheapest fleet of each type for every TPOT SLO of a sweep.

For each fleet type (colocated GPUs, GPU prefill + GPU decode, GPU prefill + SRAM
decode, colocated SRAM parts) and each TPOT target, the planner's own search
(``router.sim.planner.CandidateSearch``) finds the cheapest configuration of the
catalogue that meets the SLO at the target attainment; its price over the output
tokens the workload sends per hour is its cost per million output tokens. Where the
heterogeneous split is the cheapest of all types, the split pays; where no fleet with
GPU decode meets the target but one with SRAM decode does, only SRAM decode serves.

The sweep is affordable because it reuses what it learns. Targets are taken loosest
first, and a configuration that missed a looser TPOT target misses every tighter one
(the same kind of monotonicity the planner assumes in device counts), so each tighter
search starts where the looser one stopped, skipping everything that failed there;
once a fleet type meets no target within the size bound, no tighter one is searched.
Before any run, a lower bound rules out whole mixes: a request can do no better than
its prefill alone on an idle device (with every shareable prefix block cached) and one
decode step per token with nothing else in the batch. A mix on which fewer than the
target share of requests could meet the SLO even so cannot meet it at any size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from backends.perf.roofline import load_catalog
from backends.prefix import BLOCK_BYTES
from router.scheduling.perf import DevicePerf, perf_for
from router.scheduling.slo import Slo
from router.sim.planner import (
    Candidate,
    CandidateSearch,
    PlanTrial,
    PolicyFactory,
    catalogue_candidates,
    usable_profiles,
)
from router.sim.workload import RequestSpec

SECONDS_PER_HOUR = 3600.0

# From "only an SRAM pipeline can do it" to DistServe's chatbot TPOT (100 ms).
DEFAULT_TPOT_SLOS_MS = (2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 70.0, 100.0)
DEFAULT_TPOT_SLOS_S = tuple(ms / 1e3 for ms in DEFAULT_TPOT_SLOS_MS)

Kind = Literal["gpu", "sram"]
Unmet = Literal["any-size", "max-devices", "budget"]
UNMET_MEANING: dict[str, str] = {
    "any-size": "cannot meet it at any size: too few requests could, even alone on its devices",
    "max-devices": "no configuration within the device bound meets it",
    "budget": "the run budget was spent before an answer",
}


@dataclass(frozen=True)
class FleetType:
    """Fleets whose prefill devices are of ``prefill_kind`` (None: colocated, every
    device serves whole requests) and whose decode devices are of ``decode_kind``."""

    name: str
    label: str
    prefill_kind: Kind | None
    decode_kind: Kind
    heterogeneous: bool = False  # the split this frontier is about

    def admits(self, candidate: Candidate, kinds: Mapping[str, str]) -> bool:
        if kinds[candidate.decode_profile] != self.decode_kind:
            return False
        if candidate.prefill_profile is None:
            return self.prefill_kind is None
        return kinds[candidate.prefill_profile] == self.prefill_kind


FLEET_TYPES: dict[str, FleetType] = {
    fleet.name: fleet
    for fleet in (
        FleetType("gpu-colocated", "colocated GPU", None, "gpu"),
        FleetType("gpu-split", "GPU prefill + GPU decode", "gpu", "gpu"),
        FleetType(
            "gpu-prefill-sram-decode",
            "GPU prefill + SRAM decode",
            "gpu",
            "sram",
            heterogeneous=True,
        ),
        FleetType("sram-colocated", "colocated SRAM", None, "sram"),
    )
}


@dataclass(frozen=True)
class FrontierPoint:
    """The cheapest fleet of one type for one TPOT target, or why there is none."""

    tpot_slo_s: float
    best: PlanTrial | None
    usd_per_million_output_tokens: float | None
    unmet: Unmet | None
    runs: int  # simulations this point took
    bound_share: float  # the best mix's share of requests that could meet it at all

    @property
    def met(self) -> bool:
        return self.best is not None

    def to_dict(self) -> dict[str, object]:
        best = self.best
        return {
            "tpot_slo_ms": self.tpot_slo_s * 1e3,
            "status": "met" if best is not None else "unmet",
            "unmet": self.unmet,
            "unmet_meaning": None if self.unmet is None else UNMET_MEANING[self.unmet],
            "usd_per_million_output_tokens": self.usd_per_million_output_tokens,
            "fleet": None if best is None else best.to_dict(),
            "runs": self.runs,
            "bound_share": self.bound_share,
        }


@dataclass(frozen=True)
class FrontierTrial:
    fleet_type: str
    tpot_slo_s: float
    trial: PlanTrial

    def to_dict(self) -> dict[str, object]:
        return {
            "fleet_type": self.fleet_type,
            "tpot_slo_ms": self.tpot_slo_s * 1e3,
            **self.trial.to_dict(),
        }


@dataclass(frozen=True)
class FrontierResult:
    model: str
    ttft_slo_s: float
    target_attainment: float
    tpot_slos_s: tuple[float, ...]  # tightest first
    fleet_types: tuple[FleetType, ...]
    points: Mapping[str, tuple[FrontierPoint, ...]]  # per fleet type, as tpot_slos_s
    requests: int
    window_s: float
    output_tokens_per_hour: float
    max_devices: int
    prefix_cache_share: float
    trials: tuple[FrontierTrial, ...]
    skipped_profiles: tuple[str, ...]
    cpu_s: float
    wall_s: float
    profiles: tuple[str, ...] = field(default=())

    @property
    def runs(self) -> int:
        return len(self.trials)

    def cheapest(self, index: int) -> tuple[FleetType, FrontierPoint] | None:
        """The fleet type that meets the ``index``-th target cheapest (None: none meets it)."""
        met = [
            (point.usd_per_million_output_tokens or math.inf, order, fleet, point)
            for order, fleet in enumerate(self.fleet_types)
            if (point := self.points[fleet.name][index]).met
        ]
        if not met:
            return None
        _, _, fleet, point = min(met, key=lambda item: (item[0], item[1]))
        return fleet, point

    def split_pays_ms(self) -> list[float]:
        """TPOT targets (ms) at which the heterogeneous split is the cheapest fleet."""
        return [
            slo * 1e3
            for index, slo in enumerate(self.tpot_slos_s)
            if (found := self.cheapest(index)) is not None and found[0].heterogeneous
        ]

    def only_sram_decode_ms(self) -> list[float]:
        """TPOT targets (ms) that some fleet with SRAM decode meets and none with GPU decode."""
        only = []
        for index, slo in enumerate(self.tpot_slos_s):
            met = [fleet for fleet in self.fleet_types if self.points[fleet.name][index].met]
            if met and all(fleet.decode_kind == "sram" for fleet in met):
                only.append(slo * 1e3)
        return only

    def to_dict(self) -> dict[str, object]:
        cheapest = []
        for index, slo in enumerate(self.tpot_slos_s):
            found = self.cheapest(index)
            cheapest.append(
                {
                    "tpot_slo_ms": slo * 1e3,
                    "fleet_type": None if found is None else found[0].name,
                    "configuration": None if found is None else _label(found[1]),
                    "usd_per_million_output_tokens": (
                        None if found is None else found[1].usd_per_million_output_tokens
                    ),
                }
            )
        split = self.split_pays_ms()
        return {
            "model": self.model,
            "ttft_slo_ms": self.ttft_slo_s * 1e3,
            "target_attainment": self.target_attainment,
            "tpot_slos_ms": [slo * 1e3 for slo in self.tpot_slos_s],
            "max_devices": self.max_devices,
            "prefix_cache_share": self.prefix_cache_share,
            "profiles": list(self.profiles),
            "skipped_profiles": list(self.skipped_profiles),
            "requests": self.requests,
            "window_s": self.window_s,
            "output_tokens_per_hour": self.output_tokens_per_hour,
            "fleet_types": {
                fleet.name: {
                    "label": fleet.label,
                    "prefill_kind": fleet.prefill_kind,
                    "decode_kind": fleet.decode_kind,
                    "heterogeneous": fleet.heterogeneous,
                    "points": [point.to_dict() for point in self.points[fleet.name]],
                }
                for fleet in self.fleet_types
            },
            "cheapest": cheapest,
            "split_pays_tpot_ms": split,
            "split_pays_ranges_ms": contiguous_ranges(split, [s * 1e3 for s in self.tpot_slos_s]),
            "only_sram_decode_tpot_ms": self.only_sram_decode_ms(),
            "runs": self.runs,
            "cpu_s": self.cpu_s,
            "wall_s": self.wall_s,
            "trials": [trial.to_dict() for trial in self.trials],
        }


PointCallback = Callable[[FleetType, FrontierPoint, int], None]  # (type, point, runs so far)
TrialCallback = Callable[[FleetType, float, int, PlanTrial], None]  # (type, TPOT, runs, trial)


def usd_per_million_output_tokens(price_per_hour_usd: float, tokens_per_hour: float) -> float:
    """What a fleet costs per million output tokens when it serves ``tokens_per_hour``."""
    if not tokens_per_hour > 0:
        raise ValueError(f"tokens_per_hour must be > 0, got {tokens_per_hour!r}")
    return price_per_hour_usd / tokens_per_hour * 1e6


def sweep_frontier(
    model: str,
    requests: Sequence[RequestSpec],
    policy: PolicyFactory,
    *,
    ttft_slo_s: float,
    window_s: float,
    tpot_slos_s: Sequence[float] = DEFAULT_TPOT_SLOS_S,
    fleet_types: Sequence[str] | None = None,
    profiles: Sequence[str] | None = None,
    max_devices: int = 16,
    target_attainment: float = 0.9,
    max_runs: int = 2000,
    prefix_cache_share: float = 0.0,
    overhead_s: float = 0.0,
    handoff_s: float = 0.0,
    on_point: PointCallback | None = None,
    on_trial: TrialCallback | None = None,
) -> FrontierResult:
    """The cheapest fleet of each type for each TPOT target, over one set of requests.

    ``window_s`` is the time over which ``requests`` arrive: their output tokens over it
    are the load each fleet is priced against. Every request carries the target being
    searched to the policy, as a deployment held to it would send it. Other arguments
    are the planner's (``plan_cluster``), but ``max_runs`` bounds each fleet type's
    simulations (a type with many mixes cannot starve the others).
    """
    if not requests:
        raise ValueError("the frontier needs at least one request")
    if not (math.isfinite(window_s) and window_s > 0):
        raise ValueError(f"window_s must be finite and > 0, got {window_s!r}")
    if not 0 < target_attainment <= 1:
        raise ValueError(f"target_attainment must lie in (0, 1], got {target_attainment}")
    if max_devices < 1:
        raise ValueError(f"max_devices must be >= 1, got {max_devices}")
    if not tpot_slos_s or not all(math.isfinite(s) and s > 0 for s in tpot_slos_s):
        raise ValueError("TPOT targets must be one or more positive numbers")
    types = _fleet_types(fleet_types)
    usable, unusable = usable_profiles(model, profiles)
    if not usable:
        raise ValueError(f"no profile can hold {model}; tried {', '.join(unusable)}")
    wall_started, cpu_started = time.monotonic(), time.process_time()
    tokens_per_hour = sum(r.output_tokens for r in requests) / window_s * SECONDS_PER_HOUR
    sweep = _Sweep(
        model=model,
        requests=requests,
        policy=policy,
        ttft_slo_s=ttft_slo_s,
        tokens_per_hour=tokens_per_hour,
        candidates=catalogue_candidates(model, usable, max_devices=max_devices),
        kinds={name: load_catalog().profiles[name].kind for name in usable},
        max_devices=max_devices,
        target=target_attainment,
        max_runs=max_runs,
        prefix_cache_share=prefix_cache_share,
        overhead_s=overhead_s,
        handoff_s=handoff_s,
        on_point=on_point,
        on_trial=on_trial,
    )
    slos = tuple(sorted(set(tpot_slos_s)))
    points = {fleet.name: sweep.fleet_points(fleet, slos) for fleet in types}
    return FrontierResult(
        model=model,
        ttft_slo_s=ttft_slo_s,
        target_attainment=target_attainment,
        tpot_slos_s=slos,
        fleet_types=types,
        points=points,
        requests=len(requests),
        window_s=window_s,
        output_tokens_per_hour=tokens_per_hour,
        max_devices=max_devices,
        prefix_cache_share=prefix_cache_share,
        trials=tuple(sweep.trials),
        skipped_profiles=tuple(unusable),
        cpu_s=time.process_time() - cpu_started,
        wall_s=time.monotonic() - wall_started,
        profiles=tuple(usable),
    )


class _Sweep:
    """The searches of one sweep: what they share (requests, bounds, the run budget)."""

    def __init__(
        self,
        *,
        model: str,
        requests: Sequence[RequestSpec],
        policy: PolicyFactory,
        ttft_slo_s: float,
        tokens_per_hour: float,
        candidates: Sequence[Candidate],
        kinds: Mapping[str, str],
        max_devices: int,
        target: float,
        max_runs: int,
        prefix_cache_share: float,
        overhead_s: float,
        handoff_s: float,
        on_point: PointCallback | None,
        on_trial: TrialCallback | None,
    ) -> None:
        self.model = model
        self.requests = requests
        self.policy = policy
        self.ttft_slo_s = ttft_slo_s
        self.tokens_per_hour = tokens_per_hour
        self.candidates = candidates
        self.kinds = kinds
        self.max_devices = max_devices
        self.target = target
        self.max_runs = max_runs
        self.prefix_cache_share = prefix_cache_share
        self.overhead_s = overhead_s
        self.handoff_s = handoff_s
        self.on_point = on_point
        self.on_trial = on_trial
        self.bounds = _Bounds(
            model, requests, cached=prefix_cache_share > 0, overhead_s=overhead_s, target=target
        )
        self.trials: list[FrontierTrial] = []

    def fleet_points(self, fleet: FleetType, slos: Sequence[float]) -> tuple[FrontierPoint, ...]:
        """One point per target of ``slos`` (ascending), searched loosest first."""
        candidates = [
            c
            for c in self.candidates
            if fleet.admits(c, self.kinds) and self.bounds.prefill_keeps_up(c, self.ttft_slo_s)
        ]
        mixes = {c.mix for c in candidates}
        failed: list[Candidate] = []  # carried from looser targets to tighter ones
        unmet_looser: Unmet | None = None
        found: dict[float, FrontierPoint] = {}
        for tpot in reversed(slos):
            slo = Slo(ttft_s=self.ttft_slo_s, tpot_s=tpot, name=f"tpot-{tpot * 1e3:g}ms")
            shares = {mix: self.bounds.share(mix, slo) for mix in mixes}
            feasible = {mix for mix, share in shares.items() if share >= self.target}
            best_share = max(shares.values(), default=0.0)
            if not feasible:
                point = FrontierPoint(tpot, None, None, "any-size", 0, best_share)
            elif unmet_looser is not None:  # what missed a looser target misses this one
                point = FrontierPoint(tpot, None, None, unmet_looser, 0, best_share)
            else:
                allowed = [c for c in candidates if c.mix in feasible]
                point = self._search(fleet, slo, allowed, failed, best_share)
                unmet_looser = point.unmet
            found[tpot] = point
            if self.on_point is not None:
                self.on_point(fleet, point, len(self.trials))
        return tuple(found[tpot] for tpot in slos)

    def _search(
        self,
        fleet: FleetType,
        slo: Slo,
        candidates: Sequence[Candidate],
        failed: list[Candidate],
        best_share: float,
    ) -> FrontierPoint:
        tpot = slo.tpot_s or math.inf  # every target of the sweep sets one
        budget = self.max_runs - self._runs_of(fleet)
        search = CandidateSearch(
            model=self.model,
            requests=self.requests,
            slo=slo,
            policy=self.policy,
            target=self.target,
            overhead_s=self.overhead_s,
            handoff_s=self.handoff_s,
            on_trial=lambda _runs, trial: self._record(fleet, tpot, trial),
            request_slo=slo,
            prefix_cache_share=self.prefix_cache_share,
            failed=failed,
        )
        best = search.cheapest_two_pass(candidates, max_devices=self.max_devices, max_runs=budget)
        if best is None:
            unmet: Unmet = "budget" if search.runs >= budget else "max-devices"
            return FrontierPoint(tpot, None, None, unmet, search.runs, best_share)
        cost = usd_per_million_output_tokens(
            best.candidate.price_per_hour_usd, self.tokens_per_hour
        )
        return FrontierPoint(tpot, best, cost, None, search.runs, best_share)

    def _runs_of(self, fleet: FleetType) -> int:
        return sum(1 for trial in self.trials if trial.fleet_type == fleet.name)

    def _record(self, fleet: FleetType, tpot: float, trial: PlanTrial) -> None:
        self.trials.append(FrontierTrial(fleet.name, tpot, trial))
        if self.on_trial is not None:
            self.on_trial(fleet, tpot, len(self.trials), trial)


def contiguous_ranges(chosen: Sequence[float], order: Sequence[float]) -> list[list[float]]:
    """``chosen`` values as [first, last] runs of neighbours in ``order``."""
    picked = set(chosen)
    ranges: list[list[float]] = []
    previous_in = False
    for value in order:
        inside = value in picked
        if inside and previous_in:
            ranges[-1][1] = value
        elif inside:
            ranges.append([value, value])
        previous_in = inside
    return ranges


def _fleet_types(names: Sequence[str] | None) -> tuple[FleetType, ...]:
    if names is None:
        return tuple(FLEET_TYPES.values())
    unknown = [name for name in names if name not in FLEET_TYPES]
    if unknown:
        raise ValueError(
            f"unknown fleet type(s) {', '.join(unknown)}; known: {', '.join(FLEET_TYPES)}"
        )
    if not names:
        raise ValueError("name at least one fleet type")
    return tuple(FLEET_TYPES[name] for name in dict.fromkeys(names))


def _label(point: FrontierPoint) -> str | None:
    return None if point.best is None else point.best.candidate.label()


def shareable_tokens(requests: Sequence[RequestSpec]) -> list[int]:
    """Prompt tokens of each request a prefix cache could serve at best: whole blocks,
    but never the prompt's last token (which is always computed).

    A synthetic shared prefix counts whole (every request of the group may find it
    cached); a trace's block hash chain counts its leading blocks seen in an earlier
    request (the chain is prefix-chained: a block repeats only after the same blocks).
    """
    seen: set[int] = set()
    shareable = [0] * len(requests)
    for index in sorted(range(len(requests)), key=lambda i: requests[i].arrival_s):
        request = requests[index]
        tokens = 0
        if request.prefix_group >= 0:
            tokens = request.prefix_tokens
        elif request.block_hashes:
            leading = 0
            for block in request.block_hashes:
                if block not in seen:
                    break
                leading += 1
            tokens = leading * request.block_tokens
            seen.update(request.block_hashes)
        whole = (tokens // BLOCK_BYTES) * BLOCK_BYTES
        shareable[index] = min(whole, request.prompt_tokens - 1)
    return shareable


class _Bounds:
    """What no fleet of a mix can beat, per request: its prefill alone on an idle device
    (every shareable prefix block cached, when devices cache), and a decode step with
    nothing else in the batch for each token after the first."""

    def __init__(
        self,
        model: str,
        requests: Sequence[RequestSpec],
        *,
        cached: bool,
        overhead_s: float,
        target: float,
    ) -> None:
        self.model = model
        self.overhead_s = overhead_s
        self.prompts = [r.prompt_tokens for r in requests]
        self.outputs = np.fromiter((r.output_tokens for r in requests), np.int64, len(requests))
        self.cached = shareable_tokens(requests) if cached else [0] * len(requests)
        self.last_arrival_s = max(r.arrival_s for r in requests)
        self.target = target
        self._needed_flops: float | None = None
        self._ttft: dict[str, npt.NDArray[np.float64]] = {}
        self._tpot: dict[str, npt.NDArray[np.float64]] = {}

    def share(self, mix: tuple[str | None, str], slo: Slo) -> float:
        """Share of requests that could meet ``slo`` on some fleet of ``mix`` at best."""
        prefill, decode = mix
        ttft = self.ttft(decode)  # a decode device may prefill a request itself
        if prefill is not None:
            ttft = np.minimum(ttft, self.ttft(prefill))
        tolerance = 1.0 + 1e-9  # the bound is exact for a lone request: no rounding misses
        ok = np.ones(len(self.prompts), dtype=np.bool_)
        if slo.ttft_s is not None:
            ok &= ttft <= slo.ttft_s * tolerance
        if slo.tpot_s is not None:
            ok &= self.tpot(decode) <= slo.tpot_s * tolerance
        return float(ok.mean())

    def prefill_keeps_up(self, candidate: Candidate, ttft_slo_s: float) -> bool:
        """Whether the fleet's prefill compute, flat out, could prefill the requests that
        must meet the SLO before the last of them is due: the cheapest target share of
        prompts, by the last arrival plus the TTFT target. Batching saves no FLOPs, and
        a split's decode devices may prefill too."""
        if self._needed_flops is None:
            spec = self._perf(candidate.decode_profile).timing.model
            flops = sorted(
                spec.prefill_flops(p) - spec.prefill_flops(c)
                for p, c in zip(self.prompts, self.cached, strict=True)
            )
            must = math.ceil(self.target * len(flops) - 1e-9)
            self._needed_flops = math.fsum(flops[:must])
        capacity = candidate.decode_count * self._flops_rate(candidate.decode_profile)
        if candidate.prefill_profile is not None:
            capacity += candidate.prefill_count * self._flops_rate(candidate.prefill_profile)
        return capacity * (self.last_arrival_s + ttft_slo_s) >= self._needed_flops

    def _flops_rate(self, profile: str) -> float:
        timing = self._perf(profile).timing
        return timing.chips * timing.profile.peak_flops * timing.profile.prefill_mfu

    def ttft(self, profile: str) -> npt.NDArray[np.float64]:
        if profile not in self._ttft:
            timing = self._perf(profile).timing
            self._ttft[profile] = self.overhead_s + np.array(
                [
                    timing.prefill_seconds_one(p, c)
                    for p, c in zip(self.prompts, self.cached, strict=True)
                ],
                dtype=np.float64,
            )
        return self._ttft[profile]

    def tpot(self, profile: str) -> npt.NDArray[np.float64]:
        if profile not in self._tpot:
            timing = self._perf(profile).timing
            steps = np.array(
                [timing.decode_step_seconds_of(1, p, p) for p in self.prompts], dtype=np.float64
            )
            self._tpot[profile] = np.where(self.outputs > 1, steps, 0.0)
        return self._tpot[profile]

    def _perf(self, profile: str) -> DevicePerf:
        perf = perf_for(profile, self.model)
        if perf is None:  # usable_profiles checked every profile of the sweep
            raise ValueError(f"no performance model of {self.model} on {profile}")
        return perf
