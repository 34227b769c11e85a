"""Scenario `overload`: about ten times what the cluster can serve, default settings.

A prefill and a decode mock H100 (Llama-3.1-70B, time scale 1) behind a router
process. First the cluster's capacity: closed loop, 64 streams, through a router
whose limit is fixed (``max_in_flight``, the adaptive limit off), so nothing but
the devices bounds it; the completions per second are the capacity. Then Poisson
arrivals at ten times that, chatbot lengths (answers cut at 256 tokens, the
router's default ``max_tokens``), the default SLO class (TTFT 1 s, TPOT 50 ms) and
a 20 s client deadline, twice: through that fixed-limit router (the baseline) and
through a router with the default settings, warmed by a spell at capacity first
(the baseline's capacity run warmed it). Last, on the default router once it has
drained, 300 streamed HTTP completions sent at once.

Figures: the share of arrivals refused (RESOURCE_EXHAUSTED), the admitted
requests' TTFT p99 against the SLO, requests that hit their deadline, how long a
refusal takes to reach the client (p99), the router's peak RSS, and the burst's
200/429 split.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from bench import plots
from bench.loadgen import HttpTarget, RouterTarget, Target, open_loop, send, warm_prompts
from bench.processes import RouterProcess, router_server
from bench.progress import Progress
from bench.report import check, machine, write_result
from router.cluster import embedded_devices
from router.settings import PoolConfig, parse_pool
from router.sim.metrics import RequestRecord, percentile
from router.sim.workload import RequestSpec, generate, generate_for_duration

SLO_TTFT_S = 1.0  # the packaged policy's default class
DEADLINE_S = 20.0
MAX_TOKENS = 256  # the router's default max_tokens
OVERLOAD = 10.0
CAPACITY_STREAMS = 64
BURST = 300
REFUSED = "RESOURCE_EXHAUSTED"
# The router with its limit fixed at max_in_flight: what admission was without the
# adaptive limit and the door's checks of queue time.
FIXED_LIMIT = {
    "HETERO_ROUTER_ADAPTIVE_CONCURRENCY": "false",
    "HETERO_ROUTER_MAX_STREAMS_PER_CLIENT": "0",
}


@dataclass(frozen=True)
class Sizes:
    capacity_s: float
    warmup_s: float
    overload_s: float
    baseline_s: float


QUICK = Sizes(capacity_s=15.0, warmup_s=8.0, overload_s=30.0, baseline_s=20.0)
FULL = Sizes(capacity_s=30.0, warmup_s=15.0, overload_s=90.0, baseline_s=60.0)


def _pool() -> PoolConfig:
    common = {"kind": "mock", "address": "127.0.0.1:0", "model": "llama-3.1-70b"}
    return parse_pool(
        {
            "backends": [
                {**common, "id": "p0", "role": "prefill", "profile": "h100"},
                {**common, "id": "d0", "role": "decode", "profile": "h100"},
            ]
        },
        source="overload pool",
    )


@contextlib.asynccontextmanager
async def _cluster(env: dict[str, str]) -> AsyncIterator[RouterProcess]:
    async with (
        embedded_devices(_pool(), ready_timeout_s=60, time_scale=1.0) as resolved,
        router_server(resolved, env) as router,
    ):
        yield router


async def _capacity(target: Target, duration_s: float) -> float:
    """Completions per second with CAPACITY_STREAMS requests always in flight."""
    specs = _chat(generate("chatbot", 4096, rate_per_s=None, seed=11))
    warm_prompts(specs[:512])
    pending = itertools.cycle(enumerate(specs))
    done: list[RequestRecord] = []
    deadline = time.monotonic() + duration_s

    async def stream() -> None:
        while time.monotonic() < deadline:
            index, spec = next(pending)
            done.append(await send(target, spec, index, DEADLINE_S))

    started = time.monotonic()
    await asyncio.gather(*(stream() for _ in range(CAPACITY_STREAMS)))
    return sum(1 for r in done if r.outcome == "ok") / (time.monotonic() - started)


def _chat(specs: Sequence[RequestSpec]) -> list[RequestSpec]:
    """Chatbot lengths, answers cut at the router's default max_tokens: at the SLO's
    50 ms per token every answer fits the client's deadline."""
    return [dataclasses.replace(s, output_tokens=min(s.output_tokens, MAX_TOKENS)) for s in specs]


async def _overload(target: Target, rate: float, duration_s: float) -> list[RequestRecord]:
    specs = _chat(generate_for_duration("chatbot", duration_s, rate_per_s=rate, seed=5))
    progress = Progress(f"{target.name} at {rate:.1f} req/s", len(specs))
    records, _ = await open_loop(target, specs, timeout_s=DEADLINE_S, on_done=progress.advance)
    progress.close()
    return records


async def _floor_probe(target: RouterTarget, stop: asyncio.Event) -> list[float]:
    """Requests refused before admission (an empty prompt: INVALID_ARGUMENT), 20 a
    second while the overload runs: what any answer takes to reach the client on this
    machine at this load, the floor under the refusals' latency."""
    latencies_ms: list[float] = []
    while not stop.is_set():
        started = time.monotonic()
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for _ in target.stream("", 1, 0):
                pass
        latencies_ms.append((time.monotonic() - started) * 1000)
        await asyncio.sleep(0.05)
    return latencies_ms


async def _burst(base_url: str) -> list[RequestRecord]:
    """BURST streamed completions at once, over as many connections."""
    target = HttpTarget(base_url, "burst")
    specs = [RequestSpec(0.0, 256, 64)] * BURST
    try:
        records, _ = await open_loop(target, specs, timeout_s=DEADLINE_S)
    finally:
        await target.close()
    return records


async def _metrics(http_address: str) -> dict[str, float]:
    """The router's samples by name and labels, as /metrics writes them."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{http_address}/metrics") as response,
    ):
        text = await response.text()
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in text.splitlines())
        if name and not name.startswith("#")
    }


def _shed(samples: dict[str, float]) -> dict[str, float]:
    shed: dict[str, float] = {}
    for key, count in samples.items():
        if key.startswith("hetero_router_shed_total{"):
            reason = key.partition('reason="')[2].partition('"')[0]
            shed[reason] = shed.get(reason, 0.0) + count
    return shed


async def _idle(http_address: str, timeout_s: float = 60.0) -> None:
    """Waits until the router has nothing in flight (its gauge), so a burst meets it idle."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        samples = await _metrics(http_address)
        running = [
            v for k, v in samples.items() if k.startswith("hetero_router_num_requests_running")
        ]
        if running and sum(running) == 0:
            return
        await asyncio.sleep(0.5)


def _peak_rss_mib(pid: int) -> float:
    """The process's high-water resident set (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _ok_ttfts_ms(records: Sequence[RequestRecord]) -> list[float]:
    return [r.ttft_s * 1000 for r in records if r.outcome == "ok" and r.ttft_s is not None]


def _summary(records: Sequence[RequestRecord], duration_s: float) -> dict[str, float]:
    ok = [r for r in records if r.outcome == "ok"]
    refused = [r for r in records if r.outcome == REFUSED]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpots = [
        (r.token_times_s[-1] - r.token_times_s[0]) / (len(r.token_times_s) - 1)
        for r in ok
        if len(r.token_times_s) > 1
    ]
    refusal_ms = [(r.end_s - r.start_s) * 1000 for r in refused if r.end_s is not None]
    return {
        "sent": len(records),
        "ok": len(ok),
        "refused": len(refused),
        "deadline": sum(1 for r in records if r.outcome in ("timeout", "DEADLINE_EXCEEDED")),
        "other_errors": len(records) - len(ok) - len(refused)
        - sum(1 for r in records if r.outcome in ("timeout", "DEADLINE_EXCEEDED")),
        "shed_share": len(refused) / max(len(records), 1),
        "ok_per_s": len(ok) / duration_s,
        "admitted_ttft_p50_s": percentile(ttfts, 50),
        "admitted_ttft_p99_s": percentile(ttfts, 99),
        "admitted_tpot_p99_ms": percentile(tpots, 99) * 1000,
        "refusal_p50_ms": percentile(refusal_ms, 50),
        "refusal_p99_ms": percentile(refusal_ms, 99),
    }  # fmt: skip


async def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    result: dict[str, Any] = {"scenario": "overload", "mode": "quick" if quick else "full"}

    async with _cluster(FIXED_LIMIT) as router:
        target = RouterTarget(router.grpc_address, "fixed-limit")
        print("  capacity", flush=True)
        capacity = await _capacity(target, sizes.capacity_s)
        rate = OVERLOAD * capacity
        await _idle(router.http_address)
        baseline_records = await _overload(target, rate, sizes.baseline_s)
        await target.close()
        baseline_rss = _peak_rss_mib(router.pid)
        baseline_shed = _shed(await _metrics(router.http_address))

    async with _cluster({}) as router:
        target = RouterTarget(router.grpc_address, "defaults")
        # As the fixed-limit router met its overload after the capacity run: warm.
        await _overload(target, capacity, sizes.warmup_s)
        stop = asyncio.Event()
        probe = asyncio.create_task(_floor_probe(target, stop))
        records = await _overload(target, rate, sizes.overload_s)
        stop.set()
        floor_ms = await probe
        await target.close()
        samples = await _metrics(router.http_address)
        shed, limit = _shed(samples), samples["hetero_router_concurrency_limit"]
        await _idle(router.http_address)
        print("  HTTP burst", flush=True)
        burst = await _burst(f"http://{router.http_address}")
        rss = _peak_rss_mib(router.pid)

    baseline = _summary(baseline_records, sizes.baseline_s)
    defaults = _summary(records, sizes.overload_s)
    burst_ok = [r for r in burst if r.outcome == "ok"]
    burst_ttfts = [r.ttft_s for r in burst_ok if r.ttft_s is not None]
    figures = {
        "capacity_per_s": capacity,
        "offered_per_s": rate,
        "overload_factor": rate / capacity,
        "shed_share": defaults["shed_share"],
        "deadline_share": defaults["deadline"] / max(defaults["sent"], 1),
        "admitted_ttft_p99_s": defaults["admitted_ttft_p99_s"],
        "admitted_ttft_p99_over_slo": defaults["admitted_ttft_p99_s"] / SLO_TTFT_S,
        "admitted_tpot_p99_ms": defaults["admitted_tpot_p99_ms"],
        "served_per_s": defaults["ok_per_s"],
        "refusal_p50_ms": defaults["refusal_p50_ms"],
        "refusal_p99_ms": defaults["refusal_p99_ms"],
        "invalid_request_p50_ms": percentile(floor_ms, 50),
        "invalid_request_p99_ms": percentile(floor_ms, 99),
        "router_peak_rss_mib": rss,
        "burst_200": len(burst_ok),
        "burst_429": sum(1 for r in burst if r.outcome == "HTTP_429"),
        "burst_other": sum(1 for r in burst if r.outcome not in ("ok", "HTTP_429")),
        "burst_ttft_p99_s": percentile(burst_ttfts, 99),
        "fixed_limit_shed_share": baseline["shed_share"],
        "fixed_limit_deadline_share": baseline["deadline"] / max(baseline["sent"], 1),
        "fixed_limit_admitted_ttft_p99_s": baseline["admitted_ttft_p99_s"],
        "fixed_limit_served_per_s": baseline["ok_per_s"],
        "fixed_limit_router_peak_rss_mib": baseline_rss,
    }
    result.update(
        figures={k: round(v, 4) for k, v in figures.items()},
        runs={
            "defaults": {**defaults, "shed_by_reason": shed, "final_limit": limit},
            "fixed_limit": {**baseline, "shed_by_reason": baseline_shed},
        },
        targets={
            "admitted_ttft_p99_over_slo": check(figures["admitted_ttft_p99_over_slo"], at_most=2.0),
            "refusal_p99_ms": check(figures["refusal_p99_ms"], at_most=10.0),
            "deadline_share": check(figures["deadline_share"], at_most=0.0),
            "burst_429": check(figures["burst_429"], at_least=1),
        },
        headline={
            "shed": round(figures["shed_share"], 3),
            "TTFT p99 / SLO": round(figures["admitted_ttft_p99_over_slo"], 2),
            "refusal p99 ms": round(figures["refusal_p99_ms"], 2),
            "RSS MiB": round(rss, 1),
            "burst 200/429": f"{figures['burst_200']:.0f}/{figures['burst_429']:.0f}",
        },
        sizes=sizes.__dict__,
        machine=machine(),
    )
    plots.cdfs(
        out_dir / "overload.png",
        {
            "defaults": _ok_ttfts_ms(records),
            "fixed limit": _ok_ttfts_ms(baseline_records),
        },
        f"TTFT of admitted requests at {rate:.0f} req/s ({OVERLOAD:.0f}x capacity), ms",
    )
    write_result("overload", result, out_dir)
    return result
