"""The ``simulate`` and ``plan`` subcommands of ``hetero-router``.

Bad input (a file, a field, a flag) is one line on stderr and exit code 2; no
traceback. The figures are one table on stdout, printed once at the end; progress
goes to stderr (``router.console.Progress``), left out with ``--quiet``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from router.console import Progress
from router.errors import ConfigError
from router.scheduling.service_level import DEFAULT_SLO_CLASS
from router.scheduling.slo import SLO_PRESETS, Slo
from router.settings import settings_from
from router.sim.cluster import load_cluster
from router.sim.frontier_command import add_frontier_flags, run_frontier
from router.sim.planner import PlanTrial, plan_cluster
from router.sim.policy import resolve_policy
from router.sim.report import (
    PLAN_CLUSTER_FILE,
    PLAN_FILE,
    format_plan,
    format_summary,
    format_trial,
    write_results,
)
from router.sim.simulator import SimulationError, Simulator
from router.sim.traces import TRACE_FORMATS, read_trace
from router.sim.workload import (
    MIXES,
    WORKLOADS,
    Bursts,
    PrefixSharing,
    RequestSpec,
    generate,
    generate_for_duration,
)

COMMANDS = ("simulate", "plan")
DEFAULT_SIMULATE_S = 60.0
DEFAULT_PLAN_S = 60.0
PROGRESS_INTERVAL_S = 2.0


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    simulate = commands.add_parser(
        "simulate", help="simulate a cluster serving a workload (TTFT, TPOT, goodput, cost)"
    )
    simulate.add_argument(
        "--cluster", type=Path, required=True, help="cluster file: a pool file or the compact form"
    )
    _workload_flags(simulate, DEFAULT_SIMULATE_S)
    simulate.add_argument("--out", type=Path, help="directory for results.json, CSV and plots")
    simulate.add_argument(
        "--load-report-s",
        type=float,
        help="how often the router learns devices' KV use (default: the health interval)",
    )
    simulate.add_argument(
        "--unbounded-prefix-cache",
        action="store_true",
        help="every device gets a prefix cache that never evicts: the most caching could save",
    )
    simulate.add_argument("--quiet", action="store_true", help="no progress on stderr")

    plan = commands.add_parser(
        "plan", help="find the cheapest device mix that meets an SLO on a workload"
    )
    plan.add_argument("--model", required=True, help="model to serve, e.g. llama-3.1-70b")
    _workload_flags(plan, DEFAULT_PLAN_S)
    plan.add_argument(
        "--profiles", help="comma list of catalogue profiles to consider (default: all)"
    )
    plan.add_argument(
        "--max-devices", type=int, default=16, help="devices per configuration, at most"
    )
    plan.add_argument("--max-price", type=float, help="$/h per configuration, at most")
    plan.add_argument(
        "--attainment", type=float, default=0.9, help="share of requests that must meet the SLO"
    )
    plan.add_argument(
        "--max-runs", type=int, default=2000, help="simulations, at most (default 2000)"
    )
    plan.add_argument(
        "--no-colocated", action="store_true", help="skip fleets that serve whole requests"
    )
    plan.add_argument("--no-split", action="store_true", help="skip prefill/decode mixes")
    plan.add_argument("--out", type=Path, help="directory for plan.json and the cluster file")
    plan.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_frontier_flags(plan)


def _workload_flags(command: argparse.ArgumentParser, default_duration_s: float) -> None:
    source = command.add_mutually_exclusive_group()
    source.add_argument(
        "--workload",
        choices=sorted([*WORKLOADS, *MIXES]),
        default="chatbot",
        help="length distribution, or a mix of them each with its SLO class (mixed)",
    )
    source.add_argument(
        "--trace",
        type=Path,
        help="trace to replay (its own arrivals): the project's JSONL, Mooncake, Azure, BurstGPT",
    )
    command.add_argument(
        "--trace-format",
        choices=TRACE_FORMATS,
        default="auto",
        help="the trace's format (default: told from its extension and first line)",
    )
    command.add_argument("--rate", type=float, help="requests per second (mean)")
    size = command.add_mutually_exclusive_group()
    size.add_argument(
        "--duration",
        type=float,
        help=f"seconds of arrivals (default {default_duration_s:.0f})",
    )
    size.add_argument("--requests", type=int, help="number of requests")
    command.add_argument("--arrivals", choices=["poisson", "bursty"], default="poisson")
    command.add_argument(
        "--burst-multiplier", type=float, default=4.0, help="bursty: burst rate over calm rate"
    )
    command.add_argument(
        "--burst-fraction", type=float, default=0.2, help="bursty: share of time in bursts"
    )
    command.add_argument(
        "--burst-cycle-s", type=float, default=10.0, help="bursty: mean calm+burst period"
    )
    command.add_argument(
        "--prefix-fraction", type=float, default=0.0, help="share of requests with a shared prefix"
    )
    command.add_argument("--prefix-groups", type=int, default=8, help="distinct shared prefixes")
    command.add_argument("--prefix-tokens", type=int, default=1024, help="shared prefix length")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--policy", type=Path, help="policy file (default: the packaged one)")
    command.add_argument(
        "--overhead-ms",
        type=float,
        default=0.0,
        help="fixed latency of the serving path outside the devices (client, router, RPCs)",
    )
    command.add_argument(
        "--handoff-ms",
        type=float,
        default=0.0,
        help="the same for a split's decode leg: prefill answer to router, decode request, "
        "start of the KV pull",
    )
    command.add_argument(
        "--slo",
        choices=sorted(SLO_PRESETS),
        help="SLO preset (default: the workload's, if it has one)",
    )
    command.add_argument("--slo-ttft-ms", type=float, help="TTFT target (overrides --slo)")
    command.add_argument("--slo-tpot-ms", type=float, help="TPOT target (overrides --slo)")
    command.set_defaults(default_duration_s=default_duration_s)


def run_command(options: argparse.Namespace) -> int:
    try:
        if options.command == "simulate":
            return _simulate(options)
        if options.frontier:
            requests = _requests(options)
            meta = _workload_meta(options, requests)
            return run_frontier(options, requests, _frontier_ttft_s(options), meta)
        return _plan(options)
    except (ConfigError, SimulationError, ValueError, OSError) as error:
        print(f"hetero-router {options.command}: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------ simulate


def _simulate(options: argparse.Namespace) -> int:
    cluster = load_cluster(options.cluster)
    requests = _requests(options)
    policy = resolve_policy(options.policy)
    slo = _slo(options) or _class_slos(policy, requests)
    settings = settings_from({})
    interval = options.load_report_s
    if interval is None:
        interval = settings.health_interval_s
    progress = Progress("simulated requests", len(requests), quiet=options.quiet)

    def on_progress(simulated_s: float, done: int, total: int) -> None:
        progress.update(done, note=f"{simulated_s:,.1f} s simulated")

    simulator = Simulator(
        cluster,
        policy,
        load_report_interval_s=interval,
        max_in_flight=settings.max_in_flight,
        queue_limit=settings.queue_limit,
        progress=None if options.quiet else on_progress,
        progress_interval_s=PROGRESS_INTERVAL_S,
        overhead_s=options.overhead_ms / 1e3,
        handoff_s=options.handoff_ms / 1e3,
        unbounded_prefix_cache=options.unbounded_prefix_cache,
    )
    try:
        result = simulator.run(requests)
        progress.update(result.requests)
    finally:
        progress.close()
    summary = result.summary(slo)
    print(format_summary(summary))
    if options.out is not None:
        meta = {
            "command": "simulate",
            "cluster_file": str(options.cluster),
            "cluster": cluster.to_config(),
            "workload": _workload_meta(options, requests),
            "policy": str(options.policy) if options.policy else "default",
            "slo": _slo_meta(slo),
            "load_report_interval_s": interval,
            "overhead_s": options.overhead_ms / 1e3,
            "handoff_s": options.handoff_ms / 1e3,
            "unbounded_prefix_cache": options.unbounded_prefix_cache,
        }
        for note in write_results(options.out, result, summary, meta):
            print(note, file=sys.stderr)
        print(f"results in {options.out}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ plan


def _plan(options: argparse.Namespace) -> int:
    requests = _requests(options)
    slo = _slo(options)
    if slo is None:
        raise ValueError("plan needs an SLO: --slo, or --slo-ttft-ms and --slo-tpot-ms")
    policy = options.policy
    resolve_policy(policy)  # a bad policy file fails before the first run
    profiles = None
    if options.profiles:
        profiles = [name.strip() for name in options.profiles.split(",") if name.strip()]
    # The table comes once, whole, at the end; while the search runs, a count of its runs.
    progress = Progress("plan: configurations simulated", None, quiet=options.quiet)

    def on_trial(runs: int, trial: PlanTrial) -> None:
        progress.update(runs, note=format_trial(runs, trial))

    try:
        result = plan_cluster(
            options.model,
            requests,
            slo,
            lambda: resolve_policy(policy),
            profiles=profiles,
            max_devices=options.max_devices,
            max_price_per_hour_usd=options.max_price,
            target_attainment=options.attainment,
            max_runs=options.max_runs,
            include_colocated=not options.no_colocated,
            include_split=not options.no_split,
            overhead_s=options.overhead_ms / 1e3,
            handoff_s=options.handoff_ms / 1e3,
            on_trial=on_trial,
        )
    finally:
        progress.close()
    print(format_plan(result))
    if options.out is not None:
        options.out.mkdir(parents=True, exist_ok=True)
        document = {
            "command": "plan",
            "workload": _workload_meta(options, requests),
            "policy": str(policy) if policy else "default",
            **result.to_dict(),
        }
        (options.out / PLAN_FILE).write_text(json.dumps(document, indent=2) + "\n")
        if result.best is not None:
            config = result.best.candidate.cluster(options.model).to_config()
            (options.out / PLAN_CLUSTER_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"plan in {options.out}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ shared


def _requests(options: argparse.Namespace) -> list[RequestSpec]:
    if options.requests is not None and options.requests < 1:
        raise ValueError("--requests must be >= 1")
    if options.duration is not None and not options.duration > 0:
        raise ValueError("--duration must be > 0")
    if options.trace is not None:
        if options.rate is not None:
            raise ValueError("--rate does not apply to a trace: it replays its own arrivals")
        trace = read_trace(options.trace, options.trace_format)
        options.trace_read = trace
        if not options.quiet:
            print(trace.describe(), file=sys.stderr)
        specs = trace.requests
        if options.duration is not None:
            specs = [spec for spec in specs if spec.arrival_s < options.duration]
        elif options.requests is not None:
            specs = specs[: options.requests]
        if not specs:
            raise ValueError(f"{options.trace}: no requests to replay")
        return specs
    if options.rate is None:
        raise ValueError("--rate is needed (requests per second), or a --trace")
    bursts = Bursts(options.burst_multiplier, options.burst_fraction, options.burst_cycle_s)
    prefix = None
    if options.prefix_fraction:
        prefix = PrefixSharing(
            options.prefix_fraction, options.prefix_groups, options.prefix_tokens
        )
    if options.requests is not None:
        return generate(
            options.workload,
            options.requests,
            rate_per_s=options.rate,
            seed=options.seed,
            arrivals=options.arrivals,
            bursts=bursts,
            prefix=prefix,
        )
    return generate_for_duration(
        options.workload,
        options.duration or options.default_duration_s,
        rate_per_s=options.rate,
        seed=options.seed,
        arrivals=options.arrivals,
        bursts=bursts,
        prefix=prefix,
    )


def _slo(options: argparse.Namespace) -> Slo | None:
    preset = SLO_PRESETS.get(options.slo or ("" if options.trace else options.workload))
    if options.slo_ttft_ms is None and options.slo_tpot_ms is None:
        return preset
    ttft = options.slo_ttft_ms / 1e3 if options.slo_ttft_ms is not None else None
    tpot = options.slo_tpot_ms / 1e3 if options.slo_tpot_ms is not None else None
    if preset is not None:
        ttft = preset.ttft_s if ttft is None else ttft
        tpot = preset.tpot_s if tpot is None else tpot
    return Slo(ttft, tpot, name="custom")


def _frontier_ttft_s(options: argparse.Namespace) -> float:
    """The TTFT target of a frontier: --slo-ttft-ms, else the preset's (the TPOT is swept)."""
    if options.slo_tpot_ms is not None:
        raise ValueError("--frontier sweeps the TPOT target: use --tpot-slos-ms, not --slo-tpot-ms")
    slo = _slo(options)
    if slo is None or slo.ttft_s is None:
        raise ValueError("--frontier needs a TTFT target: --slo-ttft-ms, or an --slo preset")
    return slo.ttft_s


def _class_slos(policy: object, requests: list[RequestSpec]) -> dict[str, Slo] | None:
    """Each SLO class's targets from the policy, when the requests name more than the
    default class: a mix is judged request by request against its own class."""
    classes = {spec.slo_class for spec in requests}
    default_slo = getattr(policy, "default_slo", None)
    if classes == {DEFAULT_SLO_CLASS} or default_slo is None:
        return None
    known: frozenset[str] = getattr(policy, "slo_classes", frozenset())
    unknown = sorted(classes - known)
    if unknown:
        raise ValueError(
            f"the workload names SLO class {unknown[0]!r}, which the policy has no profile "
            f"for (it has {', '.join(sorted(known))}); pass --policy with one per class"
        )
    return {name: default_slo(name) for name in sorted(classes)}


def _slo_meta(slo: Slo | dict[str, Slo] | None) -> dict[str, Any] | None:
    if slo is None:
        return None
    if isinstance(slo, dict):
        return {"by_class": {name: _slo_meta(each) for name, each in slo.items()}}
    return {"name": slo.name, "ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "itl_s": slo.itl_s}


def _workload_meta(options: argparse.Namespace, requests: list[RequestSpec]) -> dict[str, Any]:
    meta: dict[str, Any] = {"requests": len(requests), "seed": options.seed}
    if options.trace is not None:
        meta.update(options.trace_read.to_dict())
        return meta
    meta.update(workload=options.workload, rate_per_s=options.rate, arrivals=options.arrivals)
    if options.arrivals == "bursty":
        meta["bursts"] = {
            "multiplier": options.burst_multiplier,
            "burst_fraction": options.burst_fraction,
            "cycle_s": options.burst_cycle_s,
        }
    if options.prefix_fraction:
        meta["prefix"] = {
            "fraction": options.prefix_fraction,
            "groups": options.prefix_groups,
            "tokens": options.prefix_tokens,
        }
    return meta
