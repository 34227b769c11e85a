"""python -m bench.sim_scale: what the simulator costs per simulated hour as the fleet grows.

Each fleet is simulated with the packaged policy over a window of Poisson arrivals
(chatbot lengths, ``router.sim.workload.WORKLOADS``), run until its last request ends,
and the CPU time of the run (``time.process_time``, the drain included) is scaled from
the window to an hour. The rate grows with the fleet, so every device sees the same
load whatever the fleet's size: a cost that grows faster than the fleet is the
simulator's, not the work's. Every size runs for two windows; the cost per simulated
second of both, and of the difference between them (the steady state, without the
ramp-up and the drain), should agree, which is what makes the scaling to an hour honest.

Fleets (``--fleet``; device kinds of the catalogue, backends/perf/profiles.yaml):

- ``h100-8b``: the scheduling scenario's speed figure grown: Llama-3.1-8B on H100,
  half prefill and half decode, 100 requests/s per 16 devices;
- ``h100-wse3-70b``: Llama-3.1-70B, H100x4 prefill and Cerebras WSE-3 decode
  deployments three to one, 1 request/s per deployment (1,000 at 1,000 devices);
- ``h100-70b``: Llama-3.1-70B, colocated H100x4 deployments, 1 request/s each.

``--profile TOP`` prints cProfile's TOP entries (cumulative) of one run instead: the
first fleet asked for, at the largest size, over the shortest window.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.progress import Progress
from bench.studies import cluster_of, group
from router.console import render, table
from router.sim.cluster import Cluster
from router.sim.policy import resolve_policy
from router.sim.results import SimResult
from router.sim.simulator import Simulator
from router.sim.workload import generate_for_duration

SIZES = (16, 128, 1000)
WINDOWS_S = (180.0, 360.0)  # 3 and 6 simulated minutes of arrivals
TARGET = "h100-wse3-70b", 1000  # one simulated hour of it in at most 10 CPU minutes
TARGET_CPU_S_PER_HOUR = 600.0


@dataclass(frozen=True)
class Fleet:
    name: str
    describe: str
    rate_per_device: float  # requests per second per device
    build: Callable[[int], Cluster]
    workload: str = "chatbot"


def _h100_8b(devices: int) -> Cluster:
    prefill = devices // 2
    return cluster_of(
        "llama-3.1-8b",
        group("p", "h100", "prefill", prefill),
        group("d", "h100", "decode", devices - prefill),
    )


def _h100_wse3_70b(devices: int) -> Cluster:
    decode = max(1, devices // 4)
    return cluster_of(
        "llama-3.1-70b",
        group("p", "h100", "prefill", devices - decode),
        group("d", "cerebras-wse3", "decode", decode),
    )


def _h100_70b(devices: int) -> Cluster:
    return cluster_of("llama-3.1-70b", group("c", "h100", "both", devices))


FLEETS = {
    fleet.name: fleet
    for fleet in (
        Fleet("h100-8b", "8B: H100 prefill + H100 decode, 1:1", 100 / 16, _h100_8b),
        Fleet("h100-wse3-70b", "70B: H100x4 prefill + WSE-3 decode, 3:1", 1.0, _h100_wse3_70b),
        Fleet("h100-70b", "70B: H100x4 colocated", 1.0, _h100_70b),
    )
}


@dataclass(frozen=True)
class Run:
    fleet: str
    devices: int
    rate_per_s: float
    window_s: float
    requests: int
    served: float  # share of requests that completed
    makespan_s: float
    cpu_s: float

    @property
    def cpu_s_per_sim_s(self) -> float:
        return self.cpu_s / self.window_s


def simulate(
    fleet: Fleet, devices: int, window_s: float, *, seed: int = 5, progress: bool = False
) -> SimResult:
    """``window_s`` seconds of arrivals to ``devices`` devices of ``fleet``, run to the end."""
    rate = fleet.rate_per_device * devices
    specs = generate_for_duration(fleet.workload, window_s, rate_per_s=rate, seed=seed)
    if not progress:
        return Simulator(fleet.build(devices), resolve_policy()).run(specs)
    bar = Progress(f"{fleet.name} x{devices}, {window_s:.0f} s", len(specs))
    done = 0

    def advance(_: float, finished: int, __: int) -> None:
        nonlocal done
        bar.advance(finished - done)
        done = finished

    try:
        simulator = Simulator(fleet.build(devices), resolve_policy(), progress=advance)
        result = simulator.run(specs)
        bar.advance(len(specs) - done)
        return result
    finally:
        bar.close()


def measure(fleet: Fleet, devices: int, window_s: float) -> Run:
    result = simulate(fleet, devices, window_s, progress=True)
    return Run(
        fleet=fleet.name,
        devices=devices,
        rate_per_s=fleet.rate_per_device * devices,
        window_s=window_s,
        requests=result.requests,
        served=float(result.ok.mean()) if result.requests else 0.0,
        makespan_s=result.makespan_s,
        cpu_s=result.cpu_s,
    )


def steady_cpu_s_per_sim_s(short: Run, long: Run) -> float:
    """The cost of the simulated seconds the longer window adds: no ramp-up, no drain."""
    return (long.cpu_s - short.cpu_s) / (long.window_s - short.window_s)


_COLUMNS = ("devices", "req/s", "window s", "requests", "served", "CPU s", "CPU ms/sim s")
_HOUR = "CPU s/sim h"


def _fleet_table(fleet: Fleet, runs: Sequence[Run], windows: int) -> str:
    """The runs of one fleet, and after each size's windows the steady cost between them."""
    title = f"{fleet.name}: {fleet.describe}"
    grid = table(*_COLUMNS, _HOUR, numeric=(*_COLUMNS, _HOUR), title=title)
    for start in range(0, len(runs), windows):
        sized = runs[start : start + windows]
        for run in sized:
            per_s = run.cpu_s_per_sim_s
            grid.add_row(
                f"{run.devices}",
                f"{run.rate_per_s:.0f}",
                f"{run.window_s:.0f}",
                f"{run.requests}",
                f"{run.served:.1%}",
                f"{run.cpu_s:.1f}",
                f"{per_s * 1000:.1f}",
                f"{per_s * 3600:.0f}",
            )
        if len(sized) > 1:
            steady = steady_cpu_s_per_sim_s(sized[0], sized[-1])
            steady_ms, steady_h = f"{steady * 1000:.1f}", f"{steady * 3600:.0f}"
            grid.add_row("", "", "steady", "", "", "", steady_ms, steady_h)
    return render(grid)


def _profile(fleet: Fleet, devices: int, window_s: float, top: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    result = simulate(fleet, devices, window_s)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    print(f"{fleet.name}, {devices} devices, {window_s:.0f} s window: {result.requests} requests")
    print(out.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sim_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--fleet", action="append", choices=sorted(FLEETS), help="(all)")
    parser.add_argument("--devices", type=int, action="append", help="fleet size (16 128 1000)")
    parser.add_argument(
        "--window", type=float, action="append", help="simulated seconds of arrivals (180 360)"
    )
    parser.add_argument("--profile", type=int, metavar="TOP", help="profile one run instead")
    parser.add_argument("--json", type=Path, help="also write every run here")
    options = parser.parse_args(argv)
    fleets = [FLEETS[name] for name in options.fleet or FLEETS]
    sizes = sorted(options.devices or SIZES)
    windows = sorted(options.window or WINDOWS_S)
    if any(size < 2 for size in sizes) or any(window <= 0 for window in windows):
        parser.error("fleets need at least 2 devices and windows a positive length")
    if options.profile:
        _profile(fleets[0], sizes[-1], windows[0], options.profile)
        return 0
    runs: list[Run] = []
    steady: dict[str, float] = {}
    for fleet in fleets:
        mine = [measure(fleet, devices, window) for devices in sizes for window in windows]
        print(_fleet_table(fleet, mine, len(windows)) + "\n", flush=True)
        runs.extend(mine)
        if len(windows) > 1:
            for start in range(0, len(mine), len(windows)):
                short, long = mine[start], mine[start + len(windows) - 1]
                steady[f"{fleet.name}/{short.devices}"] = steady_cpu_s_per_sim_s(short, long)
    _print_target(runs)
    if options.json:
        document = {"runs": [asdict(run) for run in runs], "steady_cpu_s_per_sim_s": steady}
        options.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


def _print_target(runs: Sequence[Run]) -> None:
    name, devices = TARGET
    longest = max(
        (run for run in runs if (run.fleet, run.devices) == TARGET),
        key=lambda run: run.window_s,
        default=None,
    )
    if longest is None:
        return
    hour = longest.cpu_s_per_sim_s * 3600
    verdict = "met" if hour <= TARGET_CPU_S_PER_HOUR else "missed"
    print(
        f"{name}, {devices} devices at {longest.rate_per_s:.0f} requests/s: {hour:.0f} CPU s"
        f" per simulated hour (from {longest.window_s:.0f} s), target"
        f" <= {TARGET_CPU_S_PER_HOUR:.0f}: {verdict}"
    )


if __name__ == "__main__":
    sys.exit(main())
