"""Scenario `observability`: a real Prometheus scrapes the router; what it stores is what
the clients measured.

The embedded mock cluster (two H100 prefill and two Groq LPU decode devices, Llama-3.1-8B,
time scale 1) behind a router process, and Prometheus from the Debian package scraping
the router's /metrics every second. Poisson arrivals, each request forced split or
colocated (``disaggregation``) at random, all in one SLO class whose targets sit between
two populations of prompts: short ones (TTFT tens of milliseconds) meet them, long ones
(8,000 tokens, hundreds of milliseconds) miss them. Every request is timed by the client.

Once a scrape has followed the load, Prometheus' HTTP API is asked what it stored and
each figure is held against the client's, request by request where they can differ
(each request carries an id; the router's "request finished" log line gives its own
view of it):

- TTFT (and TPOT, inter-token latency) p99 from ``histogram_quantile`` over the run
  against the client's p99: within one bucket (the buckets holding each are given);
- SLO outcomes (goodput, attainment), requests and tokens per mode, as exact counter
  values: equal to the router's log lines, and to the client's counts once every
  difference is put down to a named request (one the client judged late that the
  router, whose clock starts later and stops sooner, judged on time; one the client
  saw fail after the router had sent its last token);
- the client's TTFT is never shorter than the router's for the same request;
- KV handoff bytes against the bytes the prefill devices report they sent;
- ``promtool check metrics`` of the router's page: no problem.

The dashboard is drawn from ``query_range`` of the same Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import yaml

from backends._gen.hetero.device.v1 import device_pb2
from bench.loadgen import RouterTarget, send, warm_prompts
from bench.processes import RouterProcess, router_server
from bench.progress import Progress
from bench.prometheus import Prometheus, binary, check_metrics, prometheus
from bench.report import check, machine, write_result
from router.cluster import embedded_devices
from router.scheduling.registry import DEFAULT_POLICY_PATH
from router.settings import PoolConfig, load_pool, parse_pool
from router.sim.metrics import RequestRecord, percentile
from router.sim.workload import RequestSpec

SLO_CLASS = "observed"
SLO_TTFT_S = 0.25
SLO_TPOT_S = 0.05
REQUEST_IDS = "obs-"
LONG_PROMPT_TOKENS = 8000
LONG_SHARE = 0.15
SHORT_PROMPT_TOKENS = (64, 768)
OUTPUT_TOKENS = (32, 128)
DEADLINE_S = 60.0
MODES = ("split", "colocated")
# A fixed limit: the adaptive one would shed some of the long prompts' followers, and
# shed requests are no SLO outcome to compare (scenario `overload` measures admission).
ROUTER_ENV = {"HETERO_ROUTER_ADAPTIVE_CONCURRENCY": "false"}
MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
DASHBOARD = MONITORING / "hetero-router.json"
RULES = MONITORING / "rules.yml"
# Grafana's $__rate_interval for a 1 s scrape is 4 s; 10 s draws smoother lines.
DASHBOARD_RATE = "10s"
P = "hetero_router_"


@dataclass(frozen=True)
class Sizes:
    duration_s: float
    rate_per_s: float
    seed: int = 16


QUICK = Sizes(duration_s=30.0, rate_per_s=3.0)
# Past the shipped dashboard's 5 m windows, so that its last minute shows whole-window rates.
FULL = Sizes(duration_s=360.0, rate_per_s=3.0)


@dataclass(frozen=True)
class Sent:
    """One request as the client saw it."""

    request_id: str
    mode: str
    spec: RequestSpec
    record: RequestRecord

    @property
    def ok(self) -> bool:
        """The stream ended with its final message (perhaps with no token at all)."""
        return self.record.outcome == "ok"

    @property
    def met(self) -> bool | None:
        """Both targets held by the client's clock; None for a request with no token,
        which has no TTFT to judge (nor does the router judge it)."""
        ttft, tpot = self.record.ttft_s, self.record.tpot_s
        if ttft is None:
            return None
        return ttft <= SLO_TTFT_S and (tpot is None or tpot <= SLO_TPOT_S)

    @property
    def frame_gaps_s(self) -> list[float]:
        """Gaps between the token messages received (tokens of one message share a time)."""
        times = self.record.token_times_s
        return [b - a for a, b in itertools.pairwise(times) if b > a]


@dataclass(frozen=True)
class Served:
    """One request as the router's "request finished" log line says it ended."""

    outcome: str
    mode: str
    ttft_s: float | None
    slo_met: bool | None
    prompt_tokens: int
    completion_tokens: int
    handoff_bytes: int

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def _router_log(path: Path) -> dict[str, Served]:
    """The router's view of each request, by the id the client gave it."""
    served = {}
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "request finished":
                ttft_ms = event.get("ttft_ms")
                served[str(event.get("request_id"))] = Served(
                    outcome=str(event.get("outcome")),
                    mode=str(event.get("mode")),
                    ttft_s=None if ttft_ms is None else float(ttft_ms) / 1000,
                    slo_met=event.get("slo_met"),
                    prompt_tokens=int(event.get("prompt_tokens") or 0),
                    completion_tokens=int(event.get("completion_tokens") or 0),
                    handoff_bytes=int(event.get("handoff_bytes") or 0),
                )
    return served


def _pool() -> PoolConfig:
    """The embedded default cluster (router/defaults/pool.yaml), on ports of its own."""
    packaged = load_pool(None)
    backends = [
        {**b.model_dump(mode="json", exclude_none=True), "address": "127.0.0.1:0"}
        for b in packaged.backends
    ]
    return parse_pool(
        {"default_model": packaged.default_model, "backends": backends}, source="observability"
    )


def _policy(folder: Path) -> Path:
    """The packaged policy plus the scenario's class: its SLO, everything admitted."""
    policy = yaml.safe_load(DEFAULT_POLICY_PATH.read_text())
    observed = dict(policy["profiles"]["default"])
    observed["slo"] = {"ttft_ms": round(SLO_TTFT_S * 1000), "tpot_ms": round(SLO_TPOT_S * 1000)}
    observed["admission"] = "admit-all"
    policy["profiles"][SLO_CLASS] = observed
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def _workload(sizes: Sizes) -> list[tuple[str, RequestSpec]]:
    rng = np.random.default_rng(sizes.seed)
    count = round(sizes.duration_s * sizes.rate_per_s)
    arrivals = np.cumsum(rng.exponential(1 / sizes.rate_per_s, count))
    work = []
    for arrival in arrivals[arrivals < sizes.duration_s]:
        long = rng.random() < LONG_SHARE
        prompt = LONG_PROMPT_TOKENS if long else int(rng.integers(*SHORT_PROMPT_TOKENS))
        spec = RequestSpec(float(arrival), prompt, int(rng.integers(*OUTPUT_TOKENS)))
        work.append((MODES[int(rng.integers(2))], spec))
    return work


async def _drive(address: str, work: Sequence[tuple[str, RequestSpec]]) -> list[Sent]:
    """Sends each request at its arrival time, forced into its mode, in the SLO class."""
    targets = {
        mode: RouterTarget(address, mode, mode, slo_class=SLO_CLASS, request_ids=REQUEST_IDS)
        for mode in MODES
    }
    warm_prompts([spec for _, spec in work])
    progress = Progress(
        f"{len(work)} requests at {len(work) / work[-1][1].arrival_s:.1f}/s", len(work)
    )
    started = time.monotonic()

    async def one(index: int, mode: str, spec: RequestSpec) -> Sent:
        await asyncio.sleep(max(0.0, started + spec.arrival_s - time.monotonic()))
        record = await send(targets[mode], spec, index, DEADLINE_S)
        progress.advance()
        return Sent(f"{REQUEST_IDS}{index}", mode, spec, record)

    try:
        return list(await asyncio.gather(*(one(i, m, s) for i, (m, s) in enumerate(work))))
    finally:
        progress.close()
        for target in targets.values():
            await target.close()


async def _devices_kv_bytes(pool: PoolConfig) -> dict[str, int]:
    """What each device's Load report says it has sent of KV."""
    sent = {}
    for backend in pool.backends:
        async with grpc.aio.insecure_channel(backend.address) as channel:
            call = channel.unary_unary(
                "/hetero.device.v1.Device/Load",
                request_serializer=device_pb2.LoadRequest.SerializeToString,
                response_deserializer=device_pb2.LoadResponse.FromString,
            )
            report = await call(device_pb2.LoadRequest(), timeout=10)
        sent[backend.id] = int(report.kv_bytes_sent)
    return sent


@contextlib.asynccontextmanager
async def _stack(folder: Path) -> AsyncIterator[tuple[PoolConfig, RouterProcess, Prometheus]]:
    """Devices, the router (its log to ``folder``/router.log) and Prometheus scraping it."""
    env = {**ROUTER_ENV, "HETERO_ROUTER_POLICY_FILE": str(_policy(folder))}
    async with (
        embedded_devices(_pool(), ready_timeout_s=60, time_scale=1.0) as pool,
        router_server(pool, env, log_path=folder / "router.log") as router,
        prometheus([router.http_address], scrape_interval_s=1.0, rule_files=[RULES]) as server,
    ):
        yield pool, router, server


# -- agreements --------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """The run as Prometheus holds it: queried at ``at``, the first scrape to follow the
    load, over a ``window`` reaching back before its ``start`` (unix times)."""

    server: Prometheus
    start: float
    at: float

    @property
    def window(self) -> str:
        return f"{math.ceil(self.at - self.start) + 5}s"

    async def value(self, expression: str, at: float | None = None) -> float:
        """A one-sample expression's value (0 when it has none)."""
        return await self.server.value(expression, self.at if at is None else at) or 0.0


async def _buckets(run: Stored, histogram: str) -> list[float]:
    samples = await run.server.query(f"sum by (le) ({P}{histogram}_bucket)", run.at)
    return sorted(float(s.labels["le"]) for s in samples)


def _bucket(value: float, bounds: Sequence[float]) -> tuple[int, str]:
    """The index and range of the bucket (lower, upper] holding ``value``."""
    index = next((i for i, upper in enumerate(bounds) if value <= upper), len(bounds) - 1)
    lower = bounds[index - 1] if index else 0.0
    return index, f"({lower:g}, {bounds[index]:g}] s"


def _ranked(values: Sequence[float], q: float) -> float:
    """The ``ceil(q * n)``-th smallest value: the observation whose bucket
    histogram_quantile interpolates in (numpy's interpolated percentile sits between
    the two largest values of a hundred, where one of them decides Prometheus')."""
    if not values:
        return math.nan
    return sorted(values)[max(math.ceil(q * len(values)), 1) - 1]


async def _quantile_agreement(
    run: Stored, histogram: str, client: Sequence[float], selector: str = ""
) -> dict[str, Any]:
    """histogram_quantile(0.99) over the run against the client's p99: within one bucket."""
    bounds = await _buckets(run, histogram)
    rate = f"rate({P}{histogram}_bucket{selector}[{run.window}])"
    stored = await run.server.value(f"histogram_quantile(0.99, sum by (le) ({rate}))", run.at)
    measured = _ranked(client, 0.99)
    if stored is None or math.isnan(stored) or math.isnan(measured) or not bounds:
        return {"prometheus_p99_s": stored, "client_p99_s": measured, "met": False}
    stored_index, stored_bucket = _bucket(stored, bounds)
    client_index, client_bucket = _bucket(measured, bounds)
    return {
        "prometheus_p99_s": round(stored, 5),
        "client_p99_s": round(measured, 5),
        "client_p99_interpolated_s": round(percentile(client, 99), 5),
        "prometheus_bucket": stored_bucket,
        "client_bucket": client_bucket,
        "buckets_apart": abs(stored_index - client_index),
        "samples": len(client),
        "met": abs(stored_index - client_index) <= 1,
    }


@dataclass(frozen=True)
class Views:
    """Each request as the client saw it, and as the router's log line says it ended."""

    sent: Sequence[Sent]
    served: dict[str, Served]

    def client_ok(self, mode: str | None) -> list[Sent]:
        return [s for s in self.sent if s.ok and mode in (None, s.mode)]

    def router_ok(self, mode: str | None) -> list[Served]:
        return [v for v in self.served.values() if v.ok and mode in (None, v.mode)]

    def both_ok(self, mode: str | None) -> list[tuple[Sent, Served]]:
        pairs = [(s, self.served.get(s.request_id)) for s in self.client_ok(mode)]
        return [(s, v) for s, v in pairs if v is not None and v.ok]

    def only_router_ok(self, mode: str | None) -> list[tuple[Sent, Served]]:
        """Requests the router finished ok that the client did not see complete."""
        pairs = [(s, self.served.get(s.request_id)) for s in self.sent if not s.ok]
        return [(s, v) for s, v in pairs if v is not None and v.ok and mode in (None, v.mode)]


async def _slo_agreement(run: Stored, views: Views, mode: str | None) -> dict[str, Any]:
    """SLO outcomes the router counted (the counters' rise over the run) against its log
    lines, exactly, and against the client's judgement with every difference named."""
    where = f'slo_class="{SLO_CLASS}"' + (f',mode="{mode}"' if mode else "")
    counted = {}
    for outcome in ("met", "missed"):
        expression = f'sum({P}slo_requests_total{{{where},outcome="{outcome}"}})'
        counted[outcome] = await run.value(expression) - await run.value(expression, run.start)
    logged = [v.slo_met for v in views.router_ok(mode) if v.slo_met is not None]
    client = [s for s in views.client_ok(mode) if s.met is not None]
    client_met = sum(1 for s in client if s.met)
    judged = [(s, v) for s, v in views.both_ok(mode) if s.met is not None]
    router_on_time = [s.request_id for s, v in judged if v.slo_met and not s.met]
    client_on_time = [s.request_id for s, v in judged if s.met and not v.slo_met]
    unseen = [v.slo_met for _, v in views.only_router_ok(mode) if v.slo_met is not None]
    expected_met = client_met + len(router_on_time) - len(client_on_time) + sum(unseen)
    expected_missed = len(client) + len(unseen) - expected_met
    return {
        "prometheus_met": counted["met"],
        "prometheus_missed": counted["missed"],
        "router_log_met": sum(logged),
        "router_log_missed": len(logged) - sum(logged),
        "client_met": client_met,
        "client_missed": len(client) - client_met,
        "met_by_router_missed_by_client": router_on_time,
        "met_by_client_missed_by_router": client_on_time,
        "finished_unseen_by_client": len(unseen),
        "prometheus_attainment": counted["met"] / max(counted["met"] + counted["missed"], 1),
        "client_attainment": client_met / max(len(client), 1),
        "met": (counted["met"], counted["missed"])
        == (sum(logged), len(logged) - sum(logged))
        == (expected_met, expected_missed),
    }


def _clock_agreement(views: Views) -> dict[str, Any]:
    """The client's TTFT spans the router's (it starts before the router sees the request
    and ends after the router sent the token): never shorter, by the log's 1 us."""
    timed = [s for s in views.client_ok(None) if s.record.ttft_s is not None]
    offsets_ms = [
        (s.record.ttft_s - v.ttft_s) * 1000
        for s, v in views.both_ok(None)
        if s.record.ttft_s is not None and v.ttft_s is not None
    ]
    if not offsets_ms:
        return {"requests": 0, "met": False}
    return {
        "requests": len(offsets_ms),
        "client_minus_router_ttft_ms_min": round(min(offsets_ms), 3),
        "client_minus_router_ttft_ms_p50": round(percentile(offsets_ms, 50), 3),
        "client_minus_router_ttft_ms_p99": round(percentile(offsets_ms, 99), 3),
        "client_minus_router_ttft_ms_max": round(max(offsets_ms), 3),
        "met": min(offsets_ms) >= -0.001 and len(offsets_ms) == len(timed),
    }


async def _count_agreements(run: Stored, views: Views) -> dict[str, dict[str, Any]]:
    """Per mode, exact counter values against the router's log lines: requests served,
    prompt and generated tokens; and the log against the client, request by request."""
    checks: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        router, both = views.router_ok(mode), views.both_ok(mode)
        unseen = views.only_router_ok(mode)
        requests = await run.value(f'sum({P}requests_total{{mode="{mode}",outcome="ok"}})')
        checks[f"requests_ok_{mode}"] = {
            "prometheus": requests,
            "router_log": len(router),
            "client": len(views.client_ok(mode)),
            "finished_unseen_by_client": {s.request_id: s.record.outcome for s, _ in unseen},
            "met": requests == len(router) == len(views.client_ok(mode)) + len(unseen)
            and len(both) == len(views.client_ok(mode)),
        }
        tokens = {
            "prompt_tokens": (
                [v.prompt_tokens for v in router],
                {s.request_id: (s.spec.prompt_tokens, v.prompt_tokens) for s, v in both},
            ),
            "generation_tokens": (
                [v.completion_tokens for v in router],
                {s.request_id: (s.record.output_tokens, v.completion_tokens) for s, v in both},
            ),
        }
        for name, (logged, pairs) in tokens.items():
            stored = await run.value(f'sum({P}{name}_total{{mode="{mode}"}})')
            differ = {rid: pair for rid, pair in pairs.items() if pair[0] != pair[1]}
            checks[f"{name}_{mode}"] = {
                "prometheus": stored,
                "router_log": sum(logged),
                "client": sum(seen for seen, _ in pairs.values()),
                "client_and_log_differ": differ,  # request id: (client, log)
                "met": stored == sum(logged) and not differ,
            }
    return checks


async def _agreements(
    run: Stored, views: Views, devices: dict[str, int]
) -> dict[str, dict[str, Any]]:
    ok = views.client_ok(None)
    checks: dict[str, dict[str, Any]] = {}
    for mode in (None, *MODES):
        chosen = [s for s in ok if mode is None or s.mode == mode]
        selector = f'{{mode="{mode}"}}' if mode else ""
        name = mode or "all"
        measured: dict[str, tuple[str, Sequence[float | None]]] = {
            "ttft": ("time_to_first_token_seconds", [s.record.ttft_s for s in chosen]),
            "tpot": ("request_time_per_output_token_seconds", [s.record.tpot_s for s in chosen]),
            "itl": ("inter_token_latency_seconds", [g for s in chosen for g in s.frame_gaps_s]),
        }
        for quantity, (histogram, values) in measured.items():
            client = [v for v in values if v is not None]
            checks[f"{quantity}_p99_{name}"] = await _quantile_agreement(
                run, histogram, client, selector
            )
        checks[f"slo_{name}"] = await _slo_agreement(run, views, mode)
    checks["client_ttft_spans_router"] = _clock_agreement(views)
    checks.update(await _count_agreements(run, views))
    stored = await run.value(f"sum({P}kv_handoff_bytes_total)")
    checks["kv_handoff_bytes"] = {
        "prometheus": stored,
        "devices": sum(devices.values()),
        "router_log": sum(v.handoff_bytes for v in views.served.values()),
        "by_device": devices,
        "met": stored == sum(devices.values()) and stored > 0,
    }
    return checks


async def _metrics_page(http_address: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{http_address}/metrics") as response,
    ):
        return await response.text()


# -- the run -----------------------------------------------------------------------


async def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    from bench import dashboard, plots  # noqa: PLC0415 (matplotlib: the bench extra; the unit tests import this module without it)

    sizes = QUICK if quick else FULL
    result: dict[str, Any] = {"scenario": "observability", "mode": "quick" if quick else "full"}
    if binary() is None:
        print("  skipped: /usr/bin/prometheus is absent (Debian: apt-get install prometheus)")
        result.update(skipped="prometheus not installed", machine=machine())
        return result
    work = _workload(sizes)
    with tempfile.TemporaryDirectory(prefix="observability-") as folder:
        async with _stack(Path(folder)) as (pool, router, server):
            await server.scraped_after(time.time())  # its series exist before the load
            start = time.time()
            sent = await _drive(router.grpc_address, work)
            end = time.time()
            # A scrape that began a second after the last answer holds every count.
            run = Stored(server, start, await server.scraped_after(end + 1.0))
            devices = await _devices_kv_bytes(pool)
            lint = await check_metrics(await _metrics_page(router.http_address))
            panels, empty = await dashboard.drawn(
                server, dashboard.panels(DASHBOARD, DASHBOARD_RATE), start - 5, run.at, start
            )
            up = await run.value('count(up{job="hetero-router"} == 1)')
            # Written unbuffered as it is read, and a scrape after the load has passed:
            # every request's line is in the file.
            served = _router_log(Path(folder) / "router.log")
            agreements = await _agreements(run, Views(sent, served), devices)

    ok = [s for s in sent if s.ok]
    agreements["dashboard_panels_with_data"] = {"empty": empty, "met": not empty}
    agreements["promtool_check_metrics"] = {
        "output": "promtool absent" if lint is None else lint.output,
        "met": lint is not None and lint.ok,
    }
    duration = end - start
    slo = agreements["slo_all"]
    figures = {
        "requests": len(sent),
        "ok": len(ok),
        "split": sum(1 for s in ok if s.mode == "split"),
        "colocated": sum(1 for s in ok if s.mode == "colocated"),
        "duration_s": duration,
        "client_goodput_per_s": slo["client_met"] / duration,
        "prometheus_goodput_per_s": slo["prometheus_met"] / duration,
        "client_attainment": slo["client_attainment"],
        "prometheus_attainment": slo["prometheus_attainment"],
        "ttft_p99_client_s": agreements["ttft_p99_all"]["client_p99_s"],
        "ttft_p99_prometheus_s": agreements["ttft_p99_all"]["prometheus_p99_s"],
        "kv_bytes_router": agreements["kv_handoff_bytes"]["prometheus"],
        "kv_bytes_devices": agreements["kv_handoff_bytes"]["devices"],
        "router_targets_up": up or 0,
    }
    result.update(
        figures={k: round(v, 5) if isinstance(v, float) else v for k, v in figures.items()},
        agreements=agreements,
        targets={name: {"met": bool(a["met"])} for name, a in agreements.items()},
        headline={
            "agreements": f"{sum(1 for a in agreements.values() if a['met'])}/{len(agreements)}",
            "TTFT p99 client/prom s": f"{figures['ttft_p99_client_s']:.3f}/"
            f"{figures['ttft_p99_prometheus_s'] or float('nan'):.3f}",
            "attainment client/prom": f"{figures['client_attainment']:.3f}/"
            f"{figures['prometheus_attainment']:.3f}",
        },
        slo={"class": SLO_CLASS, "ttft_s": SLO_TTFT_S, "tpot_s": SLO_TPOT_S},
        client_failures={s.request_id: s.record.outcome for s in sent if not s.ok},
        sizes=sizes.__dict__,
        machine=machine(),
    )
    result["targets"]["all_requests_ok"] = check(len(ok), at_least=len(sent))
    plots.dashboard(
        out_dir / "observability.png",
        panels,
        f"deploy/monitoring/hetero-router.json drawn from a live Prometheus: {len(ok)} requests "
        f"over {duration:.0f} s, class {SLO_CLASS!r} (TTFT {SLO_TTFT_S * 1000:.0f} ms, "
        f"TPOT {SLO_TPOT_S * 1000:.0f} ms), x: seconds from the load's start",
        columns=3,
    )
    write_result("observability", result, out_dir)
    return result
