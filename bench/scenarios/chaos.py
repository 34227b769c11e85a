"""Scenario `chaos`: Poisson load while mock devices are killed, stopped and restarted.

Two runs of the very same requests (seeded arrivals, lengths, modes and sampling):
first on a fault-free cluster, whose outputs are the reference and whose goodput
the baseline; then on a fresh cluster of the same shape while a seeded fault plan
SIGKILLs devices (restarted on their port after a while), SIGSTOPs them (SIGCONT
later) and restarts them (SIGTERM, then a start). Each request of the chaos run is
judged against its reference: how it ended (a final frame, an error before or after
its first token, nothing within the client deadline), and whether its tokens are
exactly the reference's. Once the load is over, every device's Load report says
what KV leases and sequences are left.

    .venv/bin/python -m bench --scenario chaos [--quick]
    .venv/bin/python -m bench.scenarios.chaos --seed 7 --duration 120 --rate 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench.chaos import plot
from bench.chaos.client import ChaosClient
from bench.chaos.fleet import DeviceStartError, Fleet
from bench.chaos.injector import Injector
from bench.chaos.schedule import FaultMix, FaultPlan, most_out_by_role, plan_faults
from bench.chaos.timeline import PER_SECOND, REQUESTS, timeline_of
from bench.chaos.verdicts import (
    Delivery,
    DeviceLoad,
    compare,
    lease_tally,
    reference_tokens,
    router_saw,
    tally,
    unhealthy_spans,
)
from bench.chaos.workload import ChaosRequest, chaos_requests
from bench.processes import router_addresses
from bench.progress import Progress
from bench.prompts import prompt_text
from bench.report import RESULTS_DIR, check, machine, write_result
from router.scheduling.slo import Slo
from router.settings import PoolConfig, parse_pool
from router.sim.metrics import summarize

MODEL = "llama-3.1-70b"
# The packaged policy's default SLO class (router/defaults/policy.yaml): what the
# router holds these requests to, and what goodput counts.
SLO = Slo(name="default-class", ttft_s=1.0, tpot_s=0.05, source="policy.yaml default")
PROMPT_CAP = 2048  # the tiny model's prefill is numpy work on this machine's cores
OUTPUT_CAP = 256
DEADLINE_S = 60.0  # per request: past it the client cancels, and counts it lost
SETTLE_S = 5.0  # after the load, how long the devices get to free what they hold
LEASE_S = 30.0  # the devices' KV lease (backends/mock/lease.py DEFAULT_KV_LEASE_S)
HEALTH_POLL_S = 0.5
BIN_S = 1.0
MIX = FaultMix(
    mean_gap_s=4.0,
    weights={"kill": 0.4, "stop": 0.35, "restart": 0.25},
    kill_down_s=(1.0, 6.0),
    # Short stops stay under the router's health threshold (3 missed 1 s checks); long
    # ones get the device taken out of service and back.
    stop_s=(0.5, 8.0),
    recovery_s=3.0,
)


@dataclass(frozen=True)
class Sizes:
    duration_s: float  # of arrivals
    rate_per_s: float
    fault_gap_s: float  # mean time between faults
    seed: int
    # Faults fall in [warmup_s, duration_s - cooldown_s]; every device is back by then.
    warmup_s: float = 5.0
    cooldown_s: float = 5.0

    def reproduce(self) -> str:
        return (
            f"python -m bench.scenarios.chaos --seed {self.seed} --duration {self.duration_s:g} "
            f"--rate {self.rate_per_s:g} --fault-gap {self.fault_gap_s:g}"
        )


QUICK = Sizes(duration_s=50.0, rate_per_s=4.0, fault_gap_s=3.5, seed=13)
FULL = Sizes(duration_s=240.0, rate_per_s=4.0, fault_gap_s=4.0, seed=13)


def pool() -> PoolConfig:
    """2 prefill + 3 decode mock H100 deployments (Llama-3.1-70B, time scale 1)."""
    common = {"kind": "mock", "address": "127.0.0.1:0", "model": MODEL, "profile": "h100"}
    entries = [{**common, "id": f"p{n}", "role": "prefill"} for n in range(2)]
    entries += [{**common, "id": f"d{n}", "role": "decode"} for n in range(3)]
    return parse_pool({"backends": entries}, source="chaos pool")


def _command() -> str:
    """This process's command line, as a module run from the repository's root."""
    script = Path(sys.argv[0]).resolve()
    try:
        parts = script.relative_to(Path(__file__).resolve().parents[2]).with_suffix("").parts
    except ValueError:
        return shlex.join(["python", *sys.argv])
    module = ".".join(parts[:-1] if parts[-1] == "__main__" else parts)
    return shlex.join(["python", "-m", module, *sys.argv[1:]])


def _say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


@dataclass
class Phase:
    """One run of the workload on a fresh cluster."""

    name: str
    deliveries: list[Delivery]
    started: float  # monotonic
    leases: dict[str, Any]
    router_outstanding: int | None
    router_unhealthy: dict[str, list[list[float]]]
    injector: Injector | None = None
    load_s: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the machine's, before the run
    counters: dict[str, float] = field(default_factory=dict)  # the router's, after it
    # Fault-free run only: tokens of requests that failed there, sent again alone.
    refilled: dict[int, list[int]] = field(default_factory=dict)
    error: str = ""


async def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    return await run_chaos(QUICK if quick else FULL, out_dir, "quick" if quick else "full")


@dataclass(frozen=True)
class Workload:
    """What both runs send, and to what shape of cluster."""

    sizes: Sizes
    requests: tuple[ChaosRequest, ...]
    prompts: dict[int, str]
    cluster: PoolConfig


async def run_chaos(sizes: Sizes, out_dir: Path, mode: str) -> dict[str, Any]:
    requests = chaos_requests(
        duration_s=sizes.duration_s,
        rate_per_s=sizes.rate_per_s,
        seed=sizes.seed,
        prompt_cap=PROMPT_CAP,
        output_cap=OUTPUT_CAP,
    )
    prompts = {r.index: prompt_text(max(r.prompt_tokens - 1, 1), seed=r.index) for r in requests}
    work = Workload(sizes, tuple(requests), prompts, pool())
    mix = replace(MIX, mean_gap_s=sizes.fault_gap_s)
    plan = plan_faults(
        {b.id: b.role for b in work.cluster.backends},
        start_s=sizes.warmup_s,
        end_s=sizes.duration_s - sizes.cooldown_s,
        mix=mix,
        seed=sizes.seed + 1,
    )
    command = _command()
    _say(f"command: {command}")
    _say(
        f"reproduce: {sizes.reproduce()} (workload seed {sizes.seed}, fault seed {sizes.seed + 1})"
    )
    _say(
        f"{len(requests)} requests over {sizes.duration_s:g} s; {len(plan.faults)} faults planned "
        f"{plan.counts()} ({plan.skipped} slots skipped: a role would have been emptied)"
    )
    _say("fault-free run (the reference)")
    baseline = await _phase("fault-free", work, None)
    _say("chaos run")
    chaos = await _phase("chaos", work, plan)
    result = _result(work, mode, command, plan, mix, baseline=baseline, chaos=chaos)
    timeline = timeline_of(
        baseline.deliveries, baseline.started, chaos.deliveries, chaos.started, BIN_S
    )
    timeline.write(out_dir)
    plot.draw(out_dir / "chaos.png", result, timeline)
    write_result("chaos", result, out_dir)
    return result


async def _phase(name: str, work: Workload, plan: FaultPlan | None) -> Phase:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as logs:
        fleet = Fleet(work.cluster, Path(logs))
        try:
            resolved = await fleet.start_all()
            async with router_addresses(resolved, {}) as (grpc_address, http_address):
                client = ChaosClient(grpc_address)
                try:
                    phase = await _drive(name, work, plan, fleet, client)
                    phase.counters = await _counters(http_address)
                    phase.load_s = load_before
                    return phase
                finally:
                    await client.close()
        except DeviceStartError as error:
            raise RuntimeError(f"{name} run: the cluster did not start: {error}") from None
        finally:
            await fleet.close()


async def _drive(
    name: str, work: Workload, plan: FaultPlan | None, fleet: Fleet, client: ChaosClient
) -> Phase:
    await _until_all_healthy(client, len(fleet.devices), timeout_s=30.0)
    await _warm_up(client)
    started = time.monotonic()
    health: list[tuple[float, dict[str, tuple[bool, int]]]] = []
    polling = asyncio.create_task(_poll_health(client, started, health))

    def routed(device_id: str) -> bool:  # as of the last poll (at most HEALTH_POLL_S old)
        return not health or health[-1][1].get(device_id, (False, 0))[0]

    injector = Injector(fleet, plan, started, routed=routed) if plan is not None else None
    injecting = asyncio.create_task(injector.run()) if injector else None
    progress = Progress(f"{name} requests", len(work.requests))

    async def one(request: ChaosRequest) -> Delivery:
        await asyncio.sleep(max(0.0, started + request.arrival_s - time.monotonic()))
        delivery = await client.send(
            request, work.prompts[request.index], deadline_s=DEADLINE_S,
            request_id=f"{name}-{request.index}",
        )  # fmt: skip
        progress.advance()
        return delivery

    error = ""
    try:
        deliveries = list(await asyncio.gather(*(one(r) for r in work.requests)))
        progress.close()
        if injector is not None and injecting is not None:
            try:
                await asyncio.wait_for(injecting, timeout=30.0)
            except TimeoutError:
                error = "the injector had not applied every fault when the load ended"
            await injector.finish(timeout_s=90.0)
        ended = time.monotonic()
        if not await _until_all_healthy(client, len(fleet.devices), timeout_s=30.0):
            error = f"{error}; not every backend was healthy after the load".strip("; ")
    finally:
        for task in (polling, injecting):
            if task is not None:
                task.cancel()
        await asyncio.gather(polling, *([injecting] if injecting else []), return_exceptions=True)
    leases = await _leases(fleet, ended)
    refilled: dict[int, list[int]] = {}
    if injector is None:  # the fault-free run: what failed there is sent again, alone
        refilled = await _refill(client, deliveries, work, name)
    backends = await client.backends(timeout_s=5.0)
    return Phase(
        name=name,
        deliveries=deliveries,
        started=started,
        leases=leases,
        router_outstanding=None if backends is None else sum(n for _, n in backends.values()),
        router_unhealthy=unhealthy_spans(health, ended - started),
        injector=injector,
        refilled=refilled,
        error=error,
    )


async def _until_all_healthy(client: ChaosClient, count: int, timeout_s: float) -> bool:
    """Waits (bounded) until the router sees every backend healthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        backends = await client.backends(timeout_s=2.0)
        if backends is not None and sum(healthy for healthy, _ in backends.values()) == count:
            return True
        await asyncio.sleep(0.2)
    _say(f"the router did not see all {count} backends healthy within {timeout_s:g} s")
    return False


async def _warm_up(client: ChaosClient) -> None:
    """A few short requests of each mode, so connections are made before the clock runs."""
    for index in range(6):
        warm = ChaosRequest(index, 0.0, 16, 4, "split" if index % 2 else "colocated", 0.0, 1.0, 1)
        await client.send(warm, prompt_text(15, seed=index), deadline_s=30.0, request_id="")


async def _poll_health(
    client: ChaosClient, started: float, into: list[tuple[float, dict[str, tuple[bool, int]]]]
) -> None:
    while True:
        backends = await client.backends(timeout_s=HEALTH_POLL_S)
        if backends is not None:
            into.append((time.monotonic() - started, backends))
        await asyncio.sleep(HEALTH_POLL_S)


async def _leases(fleet: Fleet, ended: float) -> dict[str, Any]:
    """What the devices hold once every request has ended: polled for ``SETTLE_S``; if
    leases remain, once more after the lease time has run out since the load ended."""
    settle_until = time.monotonic() + SETTLE_S
    while True:
        loads = await _loads(fleet)
        idle = lease_tally(loads)
        if _holds_nothing(idle) or time.monotonic() >= settle_until:
            break
        await asyncio.sleep(0.5)
    result: dict[str, Any] = {"at_idle": idle, "idle_after_s": round(time.monotonic() - ended, 2)}
    if idle["kv_leases"]:
        await asyncio.sleep(max(0.0, ended + LEASE_S + 2.0 - time.monotonic()))
        result["after_lease_time"] = lease_tally(await _loads(fleet))
    return result


def _holds_nothing(tallied: dict[str, Any]) -> bool:
    return not (tallied["kv_leases"] or tallied["running"] or tallied["waiting"])


async def _loads(fleet: Fleet) -> dict[str, DeviceLoad | None]:
    ids = sorted(fleet.devices)
    reports = await asyncio.gather(*(fleet.load(device_id) for device_id in ids))
    return dict(zip(ids, reports, strict=True))


async def _refill(
    client: ChaosClient, deliveries: Sequence[Delivery], work: Workload, name: str
) -> dict[int, list[int]]:
    """Sends what the fault-free run did not complete once more, one at a time, so that
    it has a reference too; the tokens of those that now complete."""
    tokens: dict[int, list[int]] = {}
    for delivery in deliveries:
        if delivery.ending == "complete":
            continue
        request = work.requests[delivery.index]
        again = await client.send(
            request, work.prompts[request.index], deadline_s=DEADLINE_S,
            request_id=f"{name}-again-{request.index}",
        )  # fmt: skip
        if again.ending == "complete":
            tokens[request.index] = list(again.token_ids)
    return tokens


async def _counters(http_address: str) -> dict[str, float]:
    """The router's counters (``*_total``) that are not zero, from /metrics."""
    url = f"http://{http_address}/metrics"
    try:
        timeout = aiohttp.ClientTimeout(total=5.0)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as reply:
            text = await reply.text()
    except (aiohttp.ClientError, TimeoutError) as error:
        _say(f"no counters from {url}: {error!r}")
        return {}
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("hetero_router_") and "_total" in line.split("{")[0].split(" ")[0]:
            series, _, value = line.rpartition(" ")
            if float(value):
                counters[series] = float(value)
    return counters


def _result(
    work: Workload,
    mode: str,
    command: str,
    plan: FaultPlan,
    mix: FaultMix,
    *,
    baseline: Phase,
    chaos: Phase,
) -> dict[str, Any]:
    sizes, requests, cluster = work.sizes, work.requests, work.cluster
    reference = {**reference_tokens(baseline.deliveries), **baseline.refilled}
    verdict = tally(chaos.deliveries, reference)
    # Goodput over the window of arrivals, the same for both runs: a request stuck until
    # its deadline must not stretch its own run's denominator.
    summaries = {
        phase.name: summarize([d.record() for d in phase.deliveries], sizes.duration_s, SLO)
        for phase in (baseline, chaos)
    }
    goodput = {name: summary.goodput or 0.0 for name, summary in summaries.items()}
    token_goodput = {
        phase.name: sum(len(d.token_ids) for d in phase.deliveries if d.record().meets(SLO))
        / sizes.duration_s
        for phase in (baseline, chaos)
    }
    injector = chaos.injector
    fault_counts = injector.counts() if injector else {}
    injected = sum(sum(fault_counts.get(o, {}).values()) for o in ("applied", "restart_failed"))
    idle = chaos.leases["at_idle"]
    # Faults that were applied (whether or not the device came back).
    applied = [r for r in injector.records if r.applied_s is not None] if injector else []
    for record in applied:
        if record.applied_s is None:
            continue
        later = [
            other.applied_s
            for other in applied
            if other.fault.device == record.fault.device
            and other.applied_s is not None
            and other.applied_s > record.applied_s
        ]
        record.router_down_after_s, record.router_up_after_s = router_saw(
            chaos.router_unhealthy.get(record.fault.device, []),
            record.applied_s,
            record.back_s,
            HEALTH_POLL_S,
            next_fault_s=min(later, default=math.inf),
        )
    records = [r.to_dict() for r in injector.records] if injector else []
    readmits = [r.router_up_after_s for r in applied if r.router_up_after_s is not None]
    figures: dict[str, Any] = {
        "requests": len(requests),
        "requests_lost": verdict.endings["lost"],
        "tokens_differ": verdict.differing,
        "tokens_duplicated": verdict.tokens_duplicated,
        "tokens_missing": verdict.tokens_missing,
        "errors_before_first_token": verdict.endings["error_before_first_token"],
        "errors_after_first_token": verdict.endings["error_after_first_token"],
        "kv_leases_leaked": idle["kv_leases"],
        "sequences_left_running": idle["running"] + idle["waiting"],
        "router_outstanding_at_idle": chaos.router_outstanding,
        "goodput_fault_free": goodput["fault-free"],
        "goodput_chaos": goodput["chaos"],
        "goodput_drop": 1 - goodput["chaos"] / goodput["fault-free"]
        if goodput["fault-free"]
        else float("nan"),
        "token_goodput_fault_free": token_goodput["fault-free"],
        "token_goodput_chaos": token_goodput["chaos"],
        "faults_injected": injected,
        "faults_unnoticed_by_router": sum(1 for r in applied if r.router_down_after_s is None),
        # From a device serving again to the router counting it healthy.
        "router_readmit_s_median": statistics.median(readmits) if readmits else None,
        "router_readmit_s_max": max(readmits) if readmits else None,
        "restart_failures": sum(fault_counts.get("restart_failed", {}).values()),
        "fault_free_failures": summaries["fault-free"].failed,
        "unverified": verdict.unverified,
    }
    return {
        "scenario": "chaos",
        "mode": mode,
        "command": command,
        "reproduce": sizes.reproduce(),
        "seeds": {"workload": sizes.seed, "faults": sizes.seed + 1},
        "sizes": asdict(sizes),
        "cluster": [
            {"id": b.id, "role": b.role, "profile": b.profile, "model": b.model}
            for b in cluster.backends
        ],
        "workload": {
            "lengths": f"chatbot, prompts capped at {PROMPT_CAP}, outputs at {OUTPUT_CAP}",
            "by_kind": dict(Counter(_kind(r) for r in requests)),
            "deadline_s": DEADLINE_S,
            "slo": {"name": SLO.name, "ttft_s": SLO.ttft_s, "tpot_s": SLO.tpot_s},
        },
        "figures": {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()},
        "verdict": verdict.to_dict(),
        "endings_by_kind": _endings_by_kind(requests, chaos.deliveries),
        "faults": {
            "mix": {**asdict(mix), "weights": dict(mix.weights)},
            "planned": plan.counts(),
            "planned_slots_skipped": plan.skipped,
            "most_out_by_role": most_out_by_role(
                plan.faults, {b.id: b.role for b in cluster.backends}
            ),
            "injected": fault_counts,
            "records": records,
        },
        "leases": {"fault_free": baseline.leases, "chaos": chaos.leases},
        "reference": {
            "fault_free_complete": len(reference) - len(baseline.refilled),
            "completed_when_sent_again": len(baseline.refilled),
        },
        "runs": {name: summary.to_dict() for name, summary in summaries.items()},
        "router_counters": {"fault_free": baseline.counters, "chaos": chaos.counters},
        "incidents": _incidents(requests, chaos, reference),
        "errors": [e for e in (baseline.error, chaos.error) if e],
        "machine_load_average": {
            "fault_free": baseline.load_s,
            "chaos": chaos.load_s,
            "after": os.getloadavg(),
        },
        "timeline": {
            "bin_s": BIN_S,
            "files": [PER_SECOND, REQUESTS],
            "router_unhealthy": chaos.router_unhealthy,
        },
        "targets": {
            "requests_lost": check(figures["requests_lost"], at_most=0),
            "tokens_differ": check(figures["tokens_differ"], at_most=0),
            "errors_before_first_token": check(figures["errors_before_first_token"], at_most=0),
            "kv_leases_leaked": check(figures["kv_leases_leaked"], at_most=0),
        },
        "headline": {
            "faults": injected,
            "lost": figures["requests_lost"],
            "tokens differ": figures["tokens_differ"],
            "errors before/after 1st token": f"{figures['errors_before_first_token']}/"
            f"{figures['errors_after_first_token']}",
            "leases leaked": figures["kv_leases_leaked"],
            "goodput drop": round(figures["goodput_drop"], 3),
        },
        "note": "goodput = requests meeting the SLO (TTFT 1 s, TPOT 50 ms) per second of the "
        "arrival window; a failed request is a miss. A request is lost when its stream closed "
        "without a final frame or gave nothing final within the deadline.",
        "machine": machine(),
    }


def _kind(request: ChaosRequest) -> str:
    return f"{request.mode}-{'sampled' if request.sampled else 'greedy'}"


def _endings_by_kind(
    requests: Sequence[ChaosRequest], deliveries: Sequence[Delivery]
) -> dict[str, dict[str, int]]:
    counted: dict[str, Counter[str]] = {}
    for delivery in deliveries:
        counted.setdefault(_kind(requests[delivery.index]), Counter())[delivery.ending] += 1
    return {kind: dict(sorted(c.items())) for kind, c in sorted(counted.items())}


def _incidents(
    requests: Sequence[ChaosRequest], chaos: Phase, reference: dict[int, list[int]]
) -> list[dict[str, Any]]:
    """Every chaos request that did not end complete with the reference's tokens."""
    found = []
    for delivery in chaos.deliveries:
        expected = reference.get(delivery.index)
        check_kind = None if expected is None else compare(delivery.token_ids, expected).kind
        if delivery.ending == "complete" and check_kind == "exact":
            continue
        found.append(
            {
                "index": delivery.index,
                "kind": _kind(requests[delivery.index]),
                "ending": delivery.ending,
                "status": delivery.status,
                "detail": delivery.detail[:200],
                "tokens": len(delivery.token_ids),
                "reference_tokens": None if expected is None else len(expected),
                "tokens_check": check_kind,
                "prefill": delivery.prefill_backend,
                "decode": delivery.decode_backend,
                "start_s": round(delivery.start_s - chaos.started, 3),
                "end_s": None
                if delivery.end_s is None
                else round(delivery.end_s - chaos.started, 3),
            }
        )
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scenarios.chaos", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="the quick form's sizes")
    parser.add_argument("--seed", type=int, help="workload seed (the fault plan's is seed + 1)")
    parser.add_argument("--duration", type=float, help="seconds of arrivals")
    parser.add_argument("--rate", type=float, help="requests per second (Poisson)")
    parser.add_argument("--fault-gap", type=float, help="mean seconds between faults")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    return parser


def main() -> int:
    options = _parser().parse_args()
    sizes = QUICK if options.quick else FULL
    overrides = {
        "seed": options.seed,
        "duration_s": options.duration,
        "rate_per_s": options.rate,
        "fault_gap_s": options.fault_gap,
    }
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    if sizes.duration_s <= sizes.warmup_s + sizes.cooldown_s:
        print(f"--duration must exceed {sizes.warmup_s + sizes.cooldown_s:g} s", file=sys.stderr)
        return 2
    options.out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if options.quick else "full"
    if any(v is not None for v in overrides.values()):
        mode = "custom"
    result = uvloop.run(run_chaos(sizes, options.out, mode))
    print(json.dumps(result["figures"], indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
