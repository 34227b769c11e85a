"""``hetero-router plan --frontier``: the cost frontier over a sweep of TPOT targets.

The flags beside ``plan``'s own, and the run: progress on stderr (a line per point of
the frontier, a heartbeat while a search runs), the table on stdout, and with
``--out`` the JSON and the plot.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from router.sim.frontier import (
    DEFAULT_TPOT_SLOS_MS,
    FLEET_TYPES,
    FleetType,
    FrontierPoint,
    sweep_frontier,
)
from router.sim.frontier_report import FRONTIER_FILE, FRONTIER_PLOT, format_frontier, write_frontier
from router.sim.planner import PlanTrial
from router.sim.policy import resolve_policy
from router.sim.workload import RequestSpec

HEARTBEAT_S = 5.0


def add_frontier_flags(plan: argparse.ArgumentParser) -> None:
    plan.add_argument(
        "--frontier",
        action="store_true",
        help="sweep the TPOT target and report the cheapest fleet of each type for each",
    )
    plan.add_argument(
        "--tpot-slos-ms",
        default=",".join(f"{ms:g}" for ms in DEFAULT_TPOT_SLOS_MS),
        help="--frontier: comma list of TPOT targets in ms (default: %(default)s)",
    )
    plan.add_argument(
        "--fleet-types",
        default=",".join(FLEET_TYPES),
        help="--frontier: comma list of fleet types (default: %(default)s)",
    )
    plan.add_argument(
        "--prefix-cache-share",
        type=float,
        default=0.0,
        help="--frontier: each device caches prefixes in this share of its KV memory (0: none)",
    )


def run_frontier(
    options: argparse.Namespace,
    requests: list[RequestSpec],
    ttft_slo_s: float,
    workload_meta: dict[str, Any],
) -> int:
    tpot_slos_s = [ms / 1e3 for ms in _numbers(options.tpot_slos_ms, "--tpot-slos-ms")]
    fleet_types = _names(options.fleet_types)
    profiles = _names(options.profiles) if options.profiles else None
    policy = options.policy
    resolve_policy(policy)  # a bad policy file fails before the first run
    if options.max_price is not None or options.no_colocated or options.no_split:
        raise ValueError("--frontier chooses fleets with --fleet-types and --profiles")
    progress = _Progress()
    result = sweep_frontier(
        options.model,
        requests,
        lambda: resolve_policy(policy),
        ttft_slo_s=ttft_slo_s,
        window_s=window_s(options, requests),
        tpot_slos_s=tpot_slos_s,
        fleet_types=fleet_types,
        profiles=profiles,
        max_devices=options.max_devices,
        target_attainment=options.attainment,
        max_runs=options.max_runs,
        prefix_cache_share=options.prefix_cache_share,
        overhead_s=options.overhead_ms / 1e3,
        handoff_s=options.handoff_ms / 1e3,
        on_point=progress.point,
        on_trial=progress.trial,
    )
    print(format_frontier(result))
    if options.out is not None:
        meta = {
            "command": "plan --frontier",
            "workload": workload_meta,
            "policy": str(policy) if policy else "default",
        }
        notes = write_frontier(
            options.out / FRONTIER_FILE, options.out / FRONTIER_PLOT, result, meta
        )
        for note in notes:
            print(note, file=sys.stderr)
        print(f"frontier in {options.out}", file=sys.stderr)
    return 0


def window_s(options: argparse.Namespace, requests: list[RequestSpec]) -> float:
    """The time the requests arrive over: the asked duration, the count over the rate,
    or a trace's span (its arrivals, plus one mean gap for the last)."""
    if options.trace is None and options.requests is None:
        return float(options.duration or options.default_duration_s)
    if options.trace is None:
        return float(len(requests) / options.rate)
    span = requests[-1].arrival_s - requests[0].arrival_s
    if len(requests) < 2 or span <= 0:
        raise ValueError(f"{options.trace}: the frontier needs arrivals spread over time")
    return span * len(requests) / (len(requests) - 1)


class _Progress:
    """A stderr line per point of the frontier, and one every few seconds in between."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.last = self.started

    def point(self, fleet: FleetType, point: FrontierPoint, runs: int) -> None:
        if point.best is None:
            found = f"unmet ({point.unmet})"
        else:
            candidate = point.best.candidate
            found = (
                f"{candidate.label()}, ${candidate.price_per_hour_usd:,.2f}/h, "
                f"${point.usd_per_million_output_tokens:,.2f}/M output tokens"
            )
        self._say(
            f"{fleet.label}, TPOT {point.tpot_slo_s * 1e3:g} ms: {found} "
            f"({point.runs} runs; {runs} in all)"
        )

    def trial(self, fleet: FleetType, tpot_s: float, runs: int, trial: PlanTrial) -> None:
        if time.monotonic() - self.last >= HEARTBEAT_S:
            self._say(
                f"  {fleet.label}, TPOT {tpot_s * 1e3:g} ms: run {runs}, "
                f"{trial.candidate.label()} {trial.status}"
            )

    def _say(self, line: str) -> None:
        self.last = time.monotonic()
        print(f"{line}  [{self.last - self.started:.0f} s]", file=sys.stderr, flush=True)


def _numbers(text: str, flag: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected a comma list of numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag}: expected at least one number")
    return values


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]
