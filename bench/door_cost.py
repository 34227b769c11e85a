"""python -m bench.door_cost: the HTTP door's CPU per split request under saturated load,
beside vllm-router's and a bare aiohttp relay's, and what it runs in.

The systems of scenario ``peers`` that matter for the HTTP door, and only those: the two
zero-cost fake engines, this router's HTTP door (``vllm`` adapter, split forced, its
limit fixed as in ``overhead``), vllm-router (when the peers' cached environment can be
installed) and the aiohttp relay of the same split (the Python floor: the same legs,
the engine's SSE bytes forwarded untouched). Each gets 32 concurrent streams of 16
tokens for ``--window-s`` seconds, ``--windows`` times, in round-robin blocks whose
order turns each round; the figure is the median window's CPU of the system's process
tree per completed request, its ratio to vllm-router's in the same run, and how much of
it was the kernel's (system calls; on loopback, the receiving side of each write too).

``--sequential N`` first sends each system N requests one at a time (and N straight to
the decode fake): the time to the first token over direct's (the added TTFT p50) and
the CPU per request, which one at a time is the added latency's source.

``--env KEY=VALUE`` (repeatable) adds a second router, started with those settings
on top: an A/B of a setting in one run (``--env HETERO_ROUTER_GC_GEN0_THRESHOLD=0``:
CPython's collector as it is). ``--profile SECONDS`` then records the first router
with py-spy (native frames) during one more saturated spell and prints its active CPU
by layer and its functions with the most own samples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import proc_tree
from bench.engines.servers import EngineStartError, Server
from bench.peers import env as peers_env
from bench.peers import profile, servers
from bench.processes import FIXED_LIMIT, router_server
from bench.scenarios import peers
from router.console import render, table

VLLM_ROUTER = "vllm-router"


@dataclass(frozen=True)
class Figures:
    name: str
    cpu_us_per_request: float  # the median window's
    requests_per_s: float  # the median window's
    failed: int  # over all windows
    ratio: float | None  # cpu_us_per_request over vllm-router's; None without it
    kernel_share: float | None  # of the CPU over all windows: system calls, loopback TCP


@dataclass(frozen=True)
class Sequential:
    name: str
    added_ttft_p50_ms: float  # over the decode fake's own
    cpu_us_per_request: float | None  # None: direct (no router)


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs as a mapping; ValueError naming the pair that is not one."""
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or key != key.strip():
            raise ValueError(f"--env takes KEY=VALUE, got {pair!r}")
        settings[key] = value
    return settings


def figures(windows: dict[str, list[peers.Window]]) -> list[Figures]:
    """Each system's median window, and its CPU per request over vllm-router's."""
    medians: dict[str, tuple[float, float, int, float | None]] = {}
    for name, spells in windows.items():
        measured = [(w, w.cpu_s) for w in spells if w.cpu_s is not None and w.ok > 0]
        if not measured:
            continue
        cpu = statistics.median(cpu_s / w.ok * 1e6 for w, cpu_s in measured)
        rate = statistics.median(w.ok / w.elapsed_s for w, _ in measured)
        kernel = [w.kernel_cpu_s for w, _ in measured if w.kernel_cpu_s is not None]
        spent = sum(cpu_s for _, cpu_s in measured)
        share = sum(kernel) / spent if kernel and spent else None
        medians[name] = (cpu, rate, sum(w.failed for w in spells), share)
    theirs = medians.get(VLLM_ROUTER)
    return [
        Figures(name, cpu, rate, failed, None if theirs is None else cpu / theirs[0], share)
        for name, (cpu, rate, failed, share) in medians.items()
    ]


@contextlib.asynccontextmanager
async def _vllm_router(prefill: str, decode: str, log_dir: Path) -> AsyncIterator[Server | None]:
    """vllm-router over the fakes; None (said why) when it cannot be installed or started."""
    try:
        await asyncio.to_thread(peers_env.install)
    except peers_env.PeerEnvUnavailableError as unavailable:
        print(f"no vllm-router: {unavailable}", flush=True)
        yield None
        return
    server = servers.vllm_router(prefill, decode, log_dir)
    try:
        await asyncio.to_thread(server.start)
        await asyncio.to_thread(server.wait_ready, timeout_s=90)
    except (EngineStartError, OSError) as failure:
        print(f"no vllm-router: {str(failure)[-400:]}", flush=True)
        await asyncio.to_thread(server.stop)
        yield None
        return
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


def _http(name: str, url: str, pid: int | None, split: bool) -> peers.System:
    body = {**peers.BODY, "disaggregation": "split"} if split else peers.BODY
    return peers.System(name, name, peers.HttpClient(f"{url}/v1/completions", body), pid, "vllm")


async def _sequential(
    systems: list[peers.System], direct: peers.System, count: int
) -> list[Sequential]:
    """``count`` requests one at a time through each system, then straight to the decode
    fake; the added TTFT p50 and the CPU per request of each system's tree."""
    timings: dict[str, tuple[float, float | None]] = {}
    for system in [*systems, direct]:
        await peers.ready(system)
        before = proc_tree.sample(system.pid).cpu_s if system.pid is not None else None
        ttfts = [await system.client.ttft_ms() for _ in range(count)]
        cpu = None
        if system.pid is not None and before is not None:
            cpu = (proc_tree.sample(system.pid).cpu_s - before) / count * 1e6
        timings[system.name] = (statistics.median(ttfts), cpu)
    base = timings.pop(direct.name)[0]
    return [Sequential(name, ttft - base, cpu) for name, (ttft, cpu) in timings.items()]


async def _windows(
    systems: list[peers.System], engines: tuple[peers.Engine, peers.Engine], count: int, s: float
) -> dict[str, list[peers.Window]]:
    for system in systems:
        await peers.ready(system)
        await peers.saturate(system, 1.0, engines)  # warm: connections, caches
    windows: dict[str, list[peers.Window]] = {system.name: [] for system in systems}
    for round_index in range(count):
        for system in peers.turned(systems, round_index):
            windows[system.name].append(await peers.saturate(system, s, engines))
        print(f"  window {round_index + 1}/{count}", flush=True)
    return windows


async def _profile(
    system: peers.System, engines: tuple[peers.Engine, peers.Engine], seconds: float, out: Path
) -> str | None:
    """The router's native collapsed stacks over one more saturated spell; None (said
    why) when py-spy cannot sample it."""
    if system.pid is None:
        return None
    recording = asyncio.create_task(profile.record(system.pid, seconds, 200, out, native=True))
    await asyncio.sleep(0.5)  # py-spy attaches; the load then outlasts its window
    await peers.saturate(system, seconds + 1.0, engines)
    try:
        return await recording
    except RuntimeError as failure:
        print(f"no profile: {failure}", flush=True)
        return None


async def measure(
    windows: int, window_s: float, variant: dict[str, str], profile_s: float, sequential: int = 0
) -> tuple[list[Figures], list[Sequential], str | None]:
    with tempfile.TemporaryDirectory(prefix="bench-door-cost-") as scratch:
        log_dir = Path(scratch)
        async with (
            peers.fake_engine_process("prefill", log_dir) as prefill,
            peers.fake_engine_process("decode", log_dir) as decode,
        ):
            engines = (prefill, decode)
            pool = peers.fake_pool(prefill, decode)
            legs = ["--prefill", prefill.address, "--decode", decode.address]
            relay_argv = [sys.executable, "-m", "bench.peers.http_relay", *legs]
            async with contextlib.AsyncExitStack() as stack:
                router = await stack.enter_async_context(router_server(pool, FIXED_LIMIT))
                systems = [_http("hetero-http", f"http://{router.http_address}", router.pid, True)]
                if variant:
                    shown = " ".join(f"{key}={value}" for key, value in variant.items())
                    other = await stack.enter_async_context(
                        router_server(pool, {**FIXED_LIMIT, **variant})
                    )
                    url = f"http://{other.http_address}"
                    systems.append(_http(f"hetero-http {shown}", url, other.pid, True))
                address, pid = await stack.enter_async_context(
                    peers.ready_process(relay_argv, log_dir / "http-relay.log")
                )
                systems.append(_http("aiohttp relay", f"http://{address}", pid, False))
                peer = await stack.enter_async_context(
                    _vllm_router(prefill.address, decode.address, log_dir)
                )
                if peer is not None and peer.process is not None:
                    systems.append(_http(VLLM_ROUTER, peer.url, peer.process.pid, False))
                direct = _http("direct", f"http://{decode.address}", None, False)
                systems.append(direct)  # closed with the others
                try:
                    in_turn: list[Sequential] = []
                    if sequential:
                        in_turn = await _sequential(systems[:-1], direct, sequential)
                    measured = await _windows(systems[:-1], engines, windows, window_s)
                    collapsed = None
                    if profile_s:
                        out = log_dir / "door.collapsed"
                        collapsed = await _profile(systems[0], engines, profile_s, out)
                finally:
                    for system in systems:
                        await system.client.close()
    return figures(measured), in_turn, collapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.door_cost", description=__doc__)
    parser.add_argument("--windows", type=int, default=3, help="saturated windows per system")
    parser.add_argument("--window-s", type=float, default=4.0, help="seconds per window")
    parser.add_argument(
        "--sequential",
        type=int,
        default=0,
        metavar="N",
        help="first send each system N requests one at a time (added TTFT, CPU); a few "
        "hundred, since /proc counts CPU in 10 ms ticks",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a second router with this setting (repeatable)",
    )
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then record the first router with py-spy this long",
    )
    args = parser.parse_args(argv)
    if args.windows < 1 or args.window_s <= 0:
        parser.error("--windows must be at least 1 and --window-s more than 0")
    if args.sequential < 0:
        parser.error("--sequential takes a number of requests, 0 or more")
    if (refusal := profile.profile_seconds_refusal(args.profile)) is not None:
        parser.error(refusal)
    try:
        variant = parse_env(args.env)
    except ValueError as bad:
        parser.error(str(bad))
    started = time.perf_counter()
    found, in_turn, collapsed = asyncio.run(
        measure(args.windows, args.window_s, variant, args.profile, args.sequential)
    )
    if in_turn:
        heads = ("one at a time", "added TTFT p50 ms", "CPU us / request")
        grid = table(*heads, numeric=heads[1:])
        for one in in_turn:
            cpu = "" if one.cpu_us_per_request is None else f"{one.cpu_us_per_request:,.0f}"
            grid.add_row(one.name, f"{one.added_ttft_p50_ms:.3f}", cpu)
        print(render(grid))
    columns = ("system", "CPU us / request", f"over {VLLM_ROUTER}", "in the kernel", "req/s")
    grid = table(*columns, "failed", numeric=(*columns[1:], "failed"))
    for f in found:
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x"
        kernel = "" if f.kernel_share is None else f"{f.kernel_share:.0%}"
        cpu, rate = f"{f.cpu_us_per_request:,.0f}", f"{f.requests_per_s:,.0f}"
        grid.add_row(f.name, cpu, ratio, kernel, rate, str(f.failed))
    print(render(grid))
    if collapsed is not None:
        grid = table("the first router's active CPU", "share", numeric=("share",))
        for layer, share in profile.by_layer(collapsed).items():
            grid.add_row(layer, f"{share:.1%}")
        print(render(grid))
        top = profile.top_frames(profile.active(collapsed), 15)
        grid = table("most own samples", "share", numeric=("share",))
        for entry in top["own"]:
            grid.add_row(str(entry["function"]), f"{entry['share']:.1%}")
        print(render(grid))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
