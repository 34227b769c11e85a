"""Scenario `overhead`: what the router itself costs, measured against direct, in one run.

The same mock device (time scale 0: only software is measured) is driven by
the same client straight and through the router, interleaved, so machine noise
falls on both sides alike. Every figure is a difference or ratio within the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import plots
from bench.decisions import decision_times_us
from bench.loadgen import DeviceTarget, RouterTarget, Target, closed_loop, open_loop, send
from bench.processes import FIXED_LIMIT, cluster, zero_cost_pair
from bench.progress import Progress
from bench.report import check, machine, write_result
from router.scheduling.registry import load_policy
from router.sim.metrics import RequestRecord, percentile
from router.sim.workload import RequestSpec, fixed, poisson_arrivals

PROMPT_TOKENS = 64
STREAMS = 100
# The software path is measured, up to saturation, with the limit fixed (FIXED_LIMIT):
# the door's checks and the write guards still run.
PACED_STEP_MS = 10.0  # 100 tokens per second per stream


@dataclass(frozen=True)
class Sizes:
    sequential: int
    load_requests: int
    stream_tokens: int
    saturated_tokens: int
    decisions: int


QUICK = Sizes(
    sequential=150, load_requests=300, stream_tokens=100, saturated_tokens=60, decisions=20000
)
FULL = Sizes(
    sequential=600, load_requests=1500, stream_tokens=300, saturated_tokens=200, decisions=100000
)


def _ttfts(records: Sequence[RequestRecord]) -> list[float]:
    return [r.ttft_s * 1000 for r in records if r.ttft_s is not None and r.outcome == "ok"]


def _itls(records: Sequence[RequestRecord]) -> list[float]:
    return [gap * 1000 for r in records if r.outcome == "ok" for gap in r.itls_s()]


def _tokens_per_s(records: Sequence[RequestRecord], duration_s: float) -> float:
    return sum(r.output_tokens for r in records) / duration_s


def _failures(records: Sequence[RequestRecord]) -> int:
    return sum(1 for r in records if r.outcome != "ok")


async def _sequential(targets: Sequence[Target], count: int) -> dict[str, list[RequestRecord]]:
    spec = RequestSpec(0.0, PROMPT_TOKENS, 8)
    records: dict[str, list[RequestRecord]] = {t.name: [] for t in targets}
    for index in range(20):  # warm up connections, caches and the JIT-free fast paths
        for target in targets:
            await send(target, spec, index, 30.0)
    progress = Progress("sequential requests", count)
    for index in range(count):
        for target in targets:  # interleaved: drift and noise hit every path alike
            records[target.name].append(await send(target, spec, index, 30.0))
        progress.advance()
    progress.close()
    return records


async def _at_load(direct: Target, router: Target, count: int) -> dict[str, Any]:
    # The highest rate the direct path holds: closed loop, enough in flight to saturate it.
    saturating, duration = await closed_loop(direct, fixed(count, PROMPT_TOKENS, 8), 32)
    max_rate = (len(saturating) - _failures(saturating)) / duration
    rate = max_rate / 2
    arrivals = poisson_arrivals(rate, count, np.random.default_rng(7))
    specs = [RequestSpec(t, PROMPT_TOKENS, 8) for t in arrivals]
    results: dict[str, Any] = {"direct_max_rate_per_s": max_rate, "rate_per_s": rate}
    for target in (direct, router):
        progress = Progress(f"open loop {target.name}", count)
        records, _ = await open_loop(target, specs, on_done=progress.advance)
        progress.close()
        results[target.name] = records
    return results


async def _streams(direct: Target, router: Target, tokens: int) -> dict[str, Any]:
    specs = fixed(STREAMS, 16, tokens)
    results: dict[str, Any] = {}
    for target in (direct, router, direct, router):  # twice each, alternating; keep the better
        records, duration = await closed_loop(target, specs, STREAMS)
        rate = _tokens_per_s(records, duration)
        best = results.get(target.name)
        if best is None or rate > best[1]:
            results[target.name] = (records, rate)
    return results


def _decision_p99_us(count: int) -> float:
    """One scheduling decision over 64 backends with the packaged policy (bench/decisions.py)."""
    return percentile(decision_times_us(load_policy(), count), 99)


async def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    result: dict[str, Any] = {"scenario": "overhead", "mode": "quick" if quick else "full"}
    # First, on a quiet machine: the decision is pure CPU, and the clusters below leave
    # processes winding down that would time the machine rather than the code.
    decision_p99_us = _decision_p99_us(sizes.decisions)

    async with cluster(zero_cost_pair(), router_env=FIXED_LIMIT) as running:
        direct = DeviceTarget(running.address_of("d0"), "direct")
        colocated = RouterTarget(running.router_address, "router", "colocated")
        split = RouterTarget(running.router_address, "router-split", "split")
        sequential = await _sequential([direct, colocated, split], sizes.sequential)
        load = await _at_load(direct, colocated, sizes.load_requests)
        print("  saturated streams", flush=True)
        saturated = await _streams(direct, colocated, sizes.saturated_tokens)
        for target in (direct, colocated, split):
            await target.close()

    pacing = ["--decode-step-ms", str(PACED_STEP_MS)]
    async with cluster(zero_cost_pair(), device_args=pacing, router_env=FIXED_LIMIT) as running:
        direct = DeviceTarget(running.address_of("d0"), "direct")
        colocated = RouterTarget(running.router_address, "router", "colocated")
        print("  paced streams", flush=True)
        paced = await _streams(direct, colocated, sizes.stream_tokens)
        for target in (direct, colocated):
            await target.close()

    ttft = {name: _ttfts(records) for name, records in sequential.items()}
    load_ttft = {name: _ttfts(load[name]) for name in ("direct", "router")}
    paced_itl = {name: _itls(paced[name][0]) for name in ("direct", "router")}
    figures = {
        "direct_ttft_p50_ms": percentile(ttft["direct"], 50),
        "router_ttft_p50_ms": percentile(ttft["router"], 50),
        "added_ttft_p50_ms": percentile(ttft["router"], 50) - percentile(ttft["direct"], 50),
        "added_ttft_p99_ms": percentile(ttft["router"], 99) - percentile(ttft["direct"], 99),
        "load_rate_per_s": load["rate_per_s"],
        "direct_max_rate_per_s": load["direct_max_rate_per_s"],
        "added_ttft_p50_ms_at_load": percentile(load_ttft["router"], 50)
        - percentile(load_ttft["direct"], 50),
        "added_ttft_p99_ms_at_load": percentile(load_ttft["router"], 99)
        - percentile(load_ttft["direct"], 99),
        "direct_paced_tokens_per_s": paced["direct"][1],
        "router_paced_tokens_per_s": paced["router"][1],
        "stream_throughput_ratio": paced["router"][1] / paced["direct"][1],
        "added_itl_p50_ms": percentile(paced_itl["router"], 50)
        - percentile(paced_itl["direct"], 50),
        "added_itl_p99_ms": percentile(paced_itl["router"], 99)
        - percentile(paced_itl["direct"], 99),
        "direct_saturated_tokens_per_s": saturated["direct"][1],
        "router_saturated_tokens_per_s": saturated["router"][1],
        "saturated_stream_ratio": saturated["router"][1] / saturated["direct"][1],
        "split_added_ttft_p50_ms": percentile(ttft["router-split"], 50)
        - percentile(ttft["router"], 50),
        "decision_p99_us": decision_p99_us,
    }
    failures = {
        "sequential": sum(_failures(r) for r in sequential.values()),
        "at_load": sum(_failures(load[name]) for name in ("direct", "router")),
        "paced": sum(_failures(paced[name][0]) for name in ("direct", "router")),
        "saturated": sum(_failures(saturated[name][0]) for name in ("direct", "router")),
    }
    result.update(
        figures={k: round(v, 4) for k, v in figures.items()},
        failures=failures,
        targets={
            "added_ttft_p50_ms": check(figures["added_ttft_p50_ms"], at_most=1.0),
            "added_ttft_p99_ms": check(figures["added_ttft_p99_ms"], at_most=3.0),
            "added_ttft_p50_ms_at_load": check(figures["added_ttft_p50_ms_at_load"], at_most=2.0),
            "added_ttft_p99_ms_at_load": check(figures["added_ttft_p99_ms_at_load"], at_most=10.0),
            "stream_throughput_ratio": check(figures["stream_throughput_ratio"], at_least=0.95),
            "added_itl_p50_ms": check(figures["added_itl_p50_ms"], at_most=0.3),
            "added_itl_p99_ms": check(figures["added_itl_p99_ms"], at_most=2.0),
            "saturated_stream_ratio": check(figures["saturated_stream_ratio"], at_least=0.6),
            "split_added_ttft_p50_ms": check(figures["split_added_ttft_p50_ms"], at_most=5.0),
            "decision_p99_us": check(figures["decision_p99_us"], at_most=100.0),
        },
        headline={
            "added TTFT p50 ms": round(figures["added_ttft_p50_ms"], 3),
            "stream ratio": round(figures["stream_throughput_ratio"], 3),
            "saturated ratio": round(figures["saturated_stream_ratio"], 3),
            "split added ms": round(figures["split_added_ttft_p50_ms"], 3),
            "decision p99 us": round(figures["decision_p99_us"], 1),
        },
        sizes=sizes.__dict__,
        machine=machine(),
    )
    plots.overhead(out_dir / "overhead.png", ttft, load_ttft, paced_itl, figures)
    write_result("overhead", result, out_dir)
    return result
