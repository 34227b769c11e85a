"""Fidelity: the simulator against the live mock cluster, on the same requests.

A live cluster of real processes (2 prefill + 2 decode mock H100 devices serving
Llama-3.1-70B at time scale 1, and a router) takes an open-loop chatbot workload.
The simulator then replays what the live run actually did: each request at the
offset it was really sent, with its prompt length and the number of tokens it
really delivered, through the same cluster and the same policy. The figures are
the relative errors of the simulated mean and p99 TTFT and TPOT against the live
ones, ``|sim - live| / live``, the worse of the two metrics for each statistic.
Both sides define TPOT alike: (last token - first token) / (tokens - 1), over
requests with at least two tokens.

Choices that keep the comparison about the simulator rather than this machine:

- The policy is deterministic given the arrival order: decider ``always`` (every
  request splits, so prefill, KV handoff and decode are all exercised), picker
  ``round-robin`` (by the router's arrival sequence, no load input) and admission
  ``admit-all``. The packaged policy decides from load reports and predicted
  latency, so a millisecond of jitter could send a request to another device live
  than in the simulation, and the comparison would measure that divergence rather
  than the timing. The router's routes are recorded and checked against the
  simulated ones (``decisions_matched``).
- Llama-3.1-70B rather than 8B: a mock device computes every token with a tiny
  numpy model and sleeps out the rest of the modelled time, so where the numpy
  work outlasts the modelled iteration the live run follows this machine's CPU.
  70B on H100 keeps the modelled prefill several times above the numpy prefill,
  and prompts are capped at ``PROMPT_CAP`` tokens (numpy prefill time grows
  quadratically: an 8192-token prompt takes most of its modelled 0.56 s on an idle
  core, more on a busy one).
- The rate, 6 requests/s, keeps the decode devices batching (``sim_mean_decode_batch``
  sequences a step on average) while about a quarter of the two cores is busy; at
  8/s half of them is, and every hop of the live path slows with it. The machine's
  CPU use over the timed run (``cpu_busy_fraction``) and how late the load
  generator sent requests (``send_lag_p99_ms``) are reported with the figures.
- The serving path's latency outside the devices is measured, never fitted to the
  result. Before the timed run the same cluster serves split requests one at a
  time (``PathOverhead``), each with 2 output tokens and a prompt drawn from the
  workload: alone on idle devices the device model of each is exact, so its TTFT
  beyond the modelled prefill is path latency (``overhead_s``), and its gap between
  first and second token beyond the modelled KV wire time and decode step is the
  decode leg's hop (``handoff_s``); the medians go to the simulator. They are
  measured at time scale 1 because there the path includes what a mock device adds
  to its model: its timers fire on a millisecond clock, and it encodes a prefilled
  KV for the pull after the modelled prefill ends (one to two microseconds per
  prompt token). The same probes with 4-token prompts at time scale 0 give the
  software path alone (``software_path_ms``), and the errors of a replay with only
  that (``software_path_mean_error``), for comparison. The per-token part of the
  KV encoding is what a single overhead cannot carry: a long prompt's first token
  comes later live than simulated (about 6 ms at the cap), most of what remains of
  the TTFT error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import uvloop
import yaml

from backends._gen.hetero.router.v1 import router_pb2
from bench.loadgen import open_loop, send
from bench.processes import cluster
from bench.progress import Progress
from router.client import GENERATE_METHOD
from router.scheduling.perf import DevicePerf
from router.sim import Cluster, Simulator, parse_cluster, resolve_policy
from router.sim.metrics import Distribution, RequestRecord
from router.sim.results import Outcome, SimResult
from router.sim.workload import RequestSpec, generate

MODEL = "llama-3.1-70b"
PROFILE = "h100"
WORKLOAD = "chatbot"
SEED = 11
# Longest prompt sent. Llama-3.1-70B on 4 H100s prefills 4096 tokens in 0.28 s of
# modelled time; the tiny numpy model computes them in about 0.1 s on an idle core.
PROMPT_CAP = 4096
PROBE_WARMUP = 4
# Prompt of the time-scale-0 probes: the numpy prefill of a long one would count too.
SOFTWARE_PROBE_TOKENS = 4
# Prefill (and decode) devices: the period of the round-robin picker.
ROTATION = 2
TIMEOUT_S = 60.0

POLICY: dict[str, Any] = {
    "profiles": {
        "default": {
            "slo": {"ttft_ms": 1000, "tpot_ms": 50},
            "decider": "always",
            "picker": "round-robin",
            "admission": "admit-all",
        }
    }
}
POLICY_DESCRIPTION = "decider always (split), picker round-robin, admission admit-all"

_OPTIONS = [("grpc.max_receive_message_length", 16 << 20)]


@dataclass(frozen=True)
class Sizes:
    requests: int
    rate_per_s: float
    probes: int


QUICK = Sizes(requests=120, rate_per_s=6.0, probes=24)
FULL = Sizes(requests=600, rate_per_s=6.0, probes=50)


def pool(time_scale: float) -> list[dict[str, object]]:
    """The cluster as pool-file entries: 2 prefill + 2 decode devices."""
    common = {
        "kind": "mock",
        "address": "127.0.0.1:0",
        "model": MODEL,
        "profile": PROFILE,
        "time_scale": time_scale,
    }
    return [
        {**common, "id": f"{role[0]}{n}", "role": role}
        for role in ("prefill", "decode")
        for n in range(2)
    ]


def sim_cluster() -> Cluster:
    """The same devices, as the simulator reads them."""
    return parse_cluster({"backends": pool(1.0)}, source="fidelity pool")


def workload(sizes: Sizes) -> tuple[list[RequestSpec], int]:
    """Chatbot lengths, Poisson arrivals at ``sizes.rate_per_s``, prompts capped at
    ``PROMPT_CAP``; and how many prompts the cap shortened."""
    drawn = generate(WORKLOAD, sizes.requests, rate_per_s=sizes.rate_per_s, seed=SEED)
    specs = [
        RequestSpec(s.arrival_s, min(s.prompt_tokens, PROMPT_CAP), s.output_tokens) for s in drawn
    ]
    return specs, sum(1 for s in drawn if s.prompt_tokens > PROMPT_CAP)


# ---------------------------------------------------------------- the live side


@dataclass
class Served:
    """What the router's responses said about one request."""

    prefill: str = ""
    decode: str = ""
    finish_reason: int = 0
    completion_tokens: int = 0


@dataclass
class RoutedTarget:
    """The router's gRPC front door (as bench.loadgen.RouterTarget), remembering each
    request's route and how it ended, by seed (the load generator's request index)."""

    address: str
    name: str = "router"
    served: dict[int, Served] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.address, options=_OPTIONS)
        self._call = self._channel.unary_stream(
            GENERATE_METHOD,
            request_serializer=router_pb2.GenerateRequest.SerializeToString,
            response_deserializer=router_pb2.GenerateResponse.FromString,
        )

    async def stream(self, prompt: str, max_tokens: int, seed: int) -> AsyncIterator[int]:
        request = router_pb2.GenerateRequest(
            prompt=prompt,
            sampling=router_pb2.SamplingParams(max_tokens=max_tokens, seed=seed),
            disaggregation=router_pb2.DISAGGREGATION_AUTO,
        )
        served = self.served[seed] = Served()
        async for response in self._call(request):
            if response.HasField("route"):
                served.prefill = response.route.prefill_backend
                served.decode = response.route.decode_backend
            if response.finish_reason:
                served.finish_reason = response.finish_reason
                served.completion_tokens = response.usage.completion_tokens
            yield len(response.token_ids)

    async def close(self) -> None:
        await self._channel.close()


@dataclass(frozen=True)
class PathOverhead:
    """The serving path's own latency: medians over requests served one at a time."""

    overhead_s: float  # TTFT beyond the modelled prefill: client, router, RPCs, and back
    handoff_s: float  # first-to-second token gap beyond the modelled KV wire time and step
    probes: int
    failures: int


def probe_specs(count: int) -> list[RequestSpec]:
    """Prompts of the workload's lengths (a seed of their own), 2 output tokens each."""
    drawn = generate(WORKLOAD, count, rate_per_s=None, seed=SEED + 1)
    return [RequestSpec(0.0, min(s.prompt_tokens, PROMPT_CAP), 2) for s in drawn]


def path_overhead(records: Sequence[RequestRecord], perf: DevicePerf | None) -> PathOverhead:
    """What split requests served one at a time took beyond what ``perf`` models of
    them (None: devices at time scale 0, which take no modelled time).

    Alone on idle devices, a request's model is exact: one prefill of its prompt, the
    KV's wire time, one decode step of one sequence. The rest is the path's.
    """
    overheads, handoffs = [], []
    for record in records:
        ttft, times = record.ttft_s, record.token_times_s
        if record.outcome != "ok" or ttft is None:
            continue
        prompt = record.prompt_tokens
        prefill = step = wire = 0.0
        if perf is not None:
            prefill = perf.timing.prefill_seconds([prompt])
            step = perf.timing.decode_step_seconds([prompt + 1])
            wire = perf.transfer_s(prompt, perf)
        overheads.append(ttft - prefill)
        if len(times) == 2:  # not one that the mock ended on EOS after its first token
            handoffs.append(times[1] - times[0] - wire - step)
    return PathOverhead(
        overhead_s=max(0.0, float(np.median(overheads))) if overheads else math.nan,
        handoff_s=max(0.0, float(np.median(handoffs))) if handoffs else math.nan,
        probes=len(records),
        failures=sum(1 for r in records if r.outcome != "ok"),
    )


async def probe(address: str, specs: Sequence[RequestSpec]) -> list[RequestRecord]:
    """Sends ``specs`` one after another through the router, after a few to warm up.

    Requests in all are a multiple of ``ROTATION``: the router's round-robin then
    starts the next run on the devices the simulation starts on.
    """
    target = RoutedTarget(address, "probe")
    warmup = PROBE_WARMUP + (-(PROBE_WARMUP + len(specs)) % ROTATION)
    try:
        for index in range(warmup):
            await send(target, specs[index % len(specs)], index, TIMEOUT_S)
        return [await send(target, spec, index, TIMEOUT_S) for index, spec in enumerate(specs)]
    finally:
        await target.close()


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot; zeros where unknown."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = sum(values[3:5])  # idle and iowait
    return sum(values) - idle, sum(values)


@contextmanager
def cpu_busy() -> Iterator[list[float]]:
    """Yields a list that holds, on exit, the busy share of the machine's cores."""
    share: list[float] = []
    busy_before, total_before = _cpu_ticks()
    try:
        yield share
    finally:
        busy, total = _cpu_ticks()
        elapsed = total - total_before
        share.append((busy - busy_before) / elapsed if elapsed > 0 else math.nan)


# ---------------------------------------------------------------- replay and comparison


@dataclass(frozen=True)
class Replay:
    """The live run as the simulator's input: what was sent, when, and how long."""

    specs: list[RequestSpec]
    indices: list[int]  # the live request each spec replays
    failed: int  # live requests that did not complete: left out of the replay


def replay_specs(records: Sequence[RequestRecord]) -> Replay:
    """The completed requests at their actual send offsets, with their actual lengths.

    Offsets count from the first request sent. A request gets as many output tokens
    as it delivered (the mock may end one early on EOS), so both sides generate the
    same lengths; one that delivered none gets one, and has a TTFT on neither side.
    """
    if not records:
        return Replay([], [], 0)
    origin = min(r.start_s for r in records)
    kept = sorted(
        (i for i, r in enumerate(records) if r.outcome == "ok"), key=lambda i: records[i].start_s
    )
    specs = [
        RequestSpec(
            records[i].start_s - origin, records[i].prompt_tokens, max(1, records[i].output_tokens)
        )
        for i in kept
    ]
    return Replay(specs, kept, len(records) - len(kept))


def simulate(replay: Replay, path: PathOverhead, policy_file: Path) -> SimResult:
    """The replay through the simulated cluster, the policy and the measured path."""
    simulator = Simulator(
        sim_cluster(),
        resolve_policy(policy_file),
        overhead_s=path.overhead_s,
        handoff_s=path.handoff_s,
    )
    return simulator.run(replay.specs)


def relative_error(sim: float, live: float) -> float:
    return abs(sim - live) / live if live > 0 else math.nan


def compare(live: Sequence[RequestRecord], sim: SimResult) -> dict[str, Any]:
    """Mean and p99 TTFT and TPOT of both sides (ms) and their relative errors.

    ``live[i]`` and row ``i`` of ``sim`` are the same request. A request counts for a
    metric where both sides have it: a TTFT where a first token came, a TPOT where at
    least two tokens did (``RequestRecord.tpot_s`` live, ``SimResult.tpot_s`` simulated,
    both (last - first) / (n - 1)).
    """
    if len(live) != sim.requests:
        raise ValueError(f"{len(live)} live requests against {sim.requests} simulated")
    served = sim.outcome == Outcome.OK.value
    figures: dict[str, Any] = {}
    errors: dict[str, dict[str, float]] = {"mean": {}, "p99": {}}
    for metric in ("ttft", "tpot"):
        simulated = getattr(sim, f"{metric}_s")
        pairs = [
            (value, float(simulated[row]))
            for row, record in enumerate(live)
            if (value := getattr(record, f"{metric}_s")) is not None
            and served[row]
            and not math.isnan(simulated[row])
        ]
        live_d = Distribution.of_values(a for a, _ in pairs)
        sim_d = Distribution.of_values(b for _, b in pairs)
        for stat in ("mean", "p99"):
            live_v, sim_v = getattr(live_d, stat), getattr(sim_d, stat)
            figures[f"live_{metric}_{stat}_ms"] = live_v * 1000
            figures[f"sim_{metric}_{stat}_ms"] = sim_v * 1000
            errors[stat][metric] = relative_error(sim_v, live_v)
        figures[f"{metric}_requests"] = live_d.count
    for stat, by_metric in errors.items():
        for metric, error in by_metric.items():
            figures[f"{metric}_{stat}_error"] = error
        figures[f"sim_vs_live_{stat}_error"] = max(by_metric.values())
    return figures


def decisions_matched(sim: SimResult, replay: Replay, served: dict[int, Served]) -> int:
    """Requests the simulation sent to the same prefill and decode devices as the router."""
    ids = [device.id for device in sim.cluster.devices]
    matched = 0
    for row, index in enumerate(replay.indices):
        live = served.get(index)
        prefill, decode = int(sim.prefill_device[row]), int(sim.decode_device[row])
        if live is not None and prefill >= 0 and decode >= 0:
            matched += (live.prefill, live.decode) == (ids[prefill], ids[decode])
    return matched


# ---------------------------------------------------------------- the run


async def fidelity(quick: bool) -> dict[str, Any]:
    """Runs the live cluster and the simulator on the same requests; returns the figures."""
    return await run(QUICK if quick else FULL, mode="quick" if quick else "full")


async def run(sizes: Sizes, *, mode: str) -> dict[str, Any]:
    started = time.monotonic()
    specs, capped = workload(sizes)
    probes = probe_specs(sizes.probes)
    perf = sim_cluster().devices[0].perf
    with tempfile.TemporaryDirectory() as scratch:
        policy_file = Path(scratch) / "policy.yaml"
        policy_file.write_text(yaml.safe_dump(POLICY))
        env = {"HETERO_ROUTER_POLICY_FILE": str(policy_file)}

        async with cluster(pool(0.0), router_env=env) as running:
            tiny = [RequestSpec(0.0, SOFTWARE_PROBE_TOKENS, 2)] * sizes.probes
            software = path_overhead(await probe(running.router_address, tiny), None)

        async with cluster(pool(1.0), router_env=env) as running:
            path = path_overhead(await probe(running.router_address, probes), perf)
            target = RoutedTarget(running.router_address)
            progress = Progress("fidelity live run", len(specs))
            try:
                with cpu_busy() as cpu:
                    records, duration = await open_loop(
                        target, specs, timeout_s=TIMEOUT_S, on_done=progress.advance
                    )
            finally:
                progress.close()
                await target.close()

        replay = replay_specs(records)
        result = simulate(replay, path, policy_file)
        # For comparison only: the same replay with the software path alone.
        bare = simulate(replay, software, policy_file)

    live = [records[i] for i in replay.indices]
    figures = compare(live, result)
    bare_figures = compare(live, bare)
    origin = min(r.start_s for r in records)
    lags = [r.start_s - origin - s.arrival_s for r, s in zip(records, specs, strict=True)]
    outcomes: dict[str, int] = {}
    for record in records:
        outcomes[record.outcome] = outcomes.get(record.outcome, 0) + 1
    return {
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()},
        "overhead_ms": round(path.overhead_s * 1000, 3),
        "handoff_ms": round(path.handoff_s * 1000, 3),
        "software_path_ms": round(software.overhead_s * 1000, 3),
        "software_handoff_ms": round(software.handoff_s * 1000, 3),
        "software_path_mean_error": round(bare_figures["sim_vs_live_mean_error"], 4),
        "software_path_p99_error": round(bare_figures["sim_vs_live_p99_error"], 4),
        "probes": path.probes,
        "probe_failures": path.failures + software.failures,
        "requests": len(records),
        "rate_per_s": sizes.rate_per_s,
        "capped_prompts": capped,
        "failures": replay.failed,
        "outcomes": outcomes,
        "ended_by_eos": sum(
            1 for s in target.served.values() if s.finish_reason == router_pb2.FINISH_REASON_STOP
        ),
        "decisions_matched": decisions_matched(result, replay, target.served),
        "cpu_busy_fraction": round(cpu[0], 3),
        "send_lag_p99_ms": round(float(np.percentile(lags, 99) - min(lags)) * 1000, 3),
        "sim_mean_decode_batch": round(_mean_decode_batch(result), 2),
        "live_duration_s": round(duration, 2),
        "sim_makespan_s": round(result.makespan_s, 2),
        "cluster": f"{result.cluster.describe()}, {MODEL}, time scale 1",
        "workload": f"{WORKLOAD}, prompts capped at {PROMPT_CAP} tokens, Poisson, seed {SEED}",
        "policy": POLICY_DESCRIPTION,
        "mode": mode,
        "wall_s": round(time.monotonic() - started, 1),
    }


def _mean_decode_batch(sim: SimResult) -> float:
    steps = sum(d.decode_iterations for d in sim.devices)
    return sum(d.decode_tokens for d in sim.devices) / steps if steps else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--requests", type=int, help="requests in the timed run")
    parser.add_argument("--rate", type=float, help="requests per second")
    options = parser.parse_args()
    base = QUICK if options.quick else FULL
    sizes = Sizes(
        requests=options.requests or base.requests,
        rate_per_s=options.rate or base.rate_per_s,
        probes=base.probes,
    )
    result = uvloop.run(run(sizes, mode="quick" if options.quick else "full"))
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
