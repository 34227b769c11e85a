"""python -m bench.path_cost: the router's CPU per sequential request, split into a part
per request and a part per token.

A mock device at time scale 0 (as in scenario ``overhead``) serves sequential requests
through the gRPC door, colocated and split, of 1 and of ``--tokens`` output tokens
(default 64). The router process's CPU over each run (``/proc``, its process tree) per
request is the figure. Of the two lengths: the cost per token is the slope, and the cost
per request is what is left at 0 tokens. The client waits for each request's last token
before it sends the next, so no frames are merged anywhere: every token is one
message in and one out.

``--profile SECONDS`` then records the router with py-spy (native frames: C too) for
that long during more sequential requests of each length, colocated, and prints which
layer its active CPU ran in: the router's own Python, grpc, the system calls, uvloop,
protobuf, metrics, logging (``bench.peers.profile.by_layer``).

This is what to watch when work is added to every request or every token: it moved
from 790 us a request and 93 us a token (the code of 2026-11-27) to 1,120 and 119
(2026-12-03) on the same 2-core machine, colocated. bench/README, scenario
``overhead``, has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import proc_tree
from bench.loadgen import RouterTarget, send
from bench.peers import profile
from bench.processes import FIXED_LIMIT, router_server, zero_cost_pair
from router.cluster import embedded_devices
from router.console import render, table
from router.settings import parse_pool
from router.sim.workload import RequestSpec

WARM_UP = 30
PROMPT_TOKENS = 64  # as in scenario `overhead`


@dataclass(frozen=True)
class Run:
    mode: str
    tokens: int
    requests: int
    cpu_us_per_request: float
    ttft_p50_ms: float


async def _run(target: RouterTarget, mode: str, pid: int, tokens: int, requests: int) -> Run:
    spec = RequestSpec(0.0, PROMPT_TOKENS, tokens)
    for index in range(WARM_UP):
        await send(target, spec, index, 30.0)
    before = proc_tree.sample(pid).cpu_s
    records = [await send(target, spec, index, 30.0) for index in range(requests)]
    cpu_s = proc_tree.sample(pid).cpu_s - before
    ttfts = sorted(r.ttft_s for r in records if r.ttft_s is not None)
    p50 = ttfts[len(ttfts) // 2] * 1000 if ttfts else float("nan")
    return Run(mode, tokens, requests, cpu_s / requests * 1e6, p50)


async def _profile(
    target: RouterTarget, pid: int, tokens: int, seconds: float, scratch: Path
) -> dict[str, float]:
    """The router's active CPU by layer while sequential requests of ``tokens`` run."""
    spec = RequestSpec(0.0, PROMPT_TOKENS, tokens)
    output = scratch / f"path-cost-{tokens}.collapsed"
    recording = asyncio.create_task(profile.record(pid, seconds, 100, output, native=True))
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds + 1.0  # py-spy attaches first; the load outlasts it
    index = 0
    while loop.time() < until or not recording.done():
        await send(target, spec, index, 30.0)
        index += 1
    try:
        return profile.by_layer(await recording)
    except RuntimeError as failure:  # py-spy could not sample: the figures above stand
        print(f"no profile at {tokens} tokens: {failure}", flush=True)
        return {}


async def measure(
    requests: int, tokens: int, profile_s: float = 0.0
) -> tuple[list[Run], dict[int, dict[str, float]]]:
    """The runs of both modes and lengths; with ``profile_s``, the colocated profiles by
    length after them."""
    pool = parse_pool({"backends": zero_cost_pair()}, source="path_cost pool")
    runs = []
    profiles: dict[int, dict[str, float]] = {}
    async with (
        embedded_devices(pool, ready_timeout_s=60) as devices,
        router_server(devices, FIXED_LIMIT) as router,
    ):
        for mode in ("colocated", "split"):
            target = RouterTarget(router.grpc_address, f"router-{mode}", mode)
            for length in (1, tokens):
                runs.append(await _run(target, mode, router.pid, length, requests))
            if profile_s and mode == "colocated":
                with tempfile.TemporaryDirectory() as scratch:
                    for length in (1, tokens):
                        found = await _profile(target, router.pid, length, profile_s, Path(scratch))
                        if found:
                            profiles[length] = found
            await target.close()
    return runs, profiles


def split_costs(runs: list[Run], mode: str) -> tuple[float, float]:
    """(per request, per token) in us from the two lengths of ``mode``."""
    short, long = sorted((r for r in runs if r.mode == mode), key=lambda r: r.tokens)
    per_token = (long.cpu_us_per_request - short.cpu_us_per_request) / (long.tokens - short.tokens)
    return short.cpu_us_per_request - per_token * short.tokens, per_token


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.path_cost", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000, help="per mode and length")
    parser.add_argument("--tokens", type=int, default=64, help="the longer length")
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then record the router with py-spy this long at each length (colocated)",
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.tokens < 2:
        parser.error("--requests must be at least 1 and --tokens at least 2")
    if (refusal := profile.profile_seconds_refusal(args.profile)) is not None:
        parser.error(refusal)
    started = time.perf_counter()
    runs, profiles = asyncio.run(measure(args.requests, args.tokens, args.profile))
    columns = ("mode", "tokens", "router CPU us / request", "TTFT p50 ms")
    grid = table(*columns, numeric=columns[1:])
    for r in runs:
        grid.add_row(r.mode, str(r.tokens), f"{r.cpu_us_per_request:,.0f}", f"{r.ttft_p50_ms:.3f}")
    print(render(grid))
    for mode in ("colocated", "split"):
        fixed, per_token = split_costs(runs, mode)
        print(f"{mode}: {fixed:,.0f} us per request + {per_token:,.1f} us per token")
    if profiles:
        lengths = sorted(profiles)
        names = [f"{length} token{'s' if length > 1 else ''}" for length in lengths]
        grid = table("the router's active CPU (colocated)", *names, numeric=names)
        layers = dict.fromkeys(layer for length in lengths for layer in profiles[length])
        for layer in layers:
            shares = (f"{profiles[length].get(layer, 0.0):.1%}" for length in lengths)
            grid.add_row(layer, *shares)
        print(render(grid))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
