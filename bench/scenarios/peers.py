"""Scenario `peers`: this router against the Rust P/D routers, on the same fakes, in one run.

Two zero-cost fake engines (bench/fake_engine.py processes: a prefill one and a decode
one, each speaking vLLM's NIXL sequence and SGLang's bootstrap fields) serve, side by
side and all running at once:

- ``vllm-router`` (PyPI, Rust) in vLLM P/D mode (``--vllm-pd-disaggregation
  --kv-connector nixl``), with its defaults otherwise;
- ``sglang-router`` (SGLang's model gateway, PyPI, Rust) in its P/D mode
  (``--pd-disaggregation``, bootstrap rooms), with its defaults otherwise;
- this router's OpenAI-compatible HTTP door with the ``vllm`` adapter splitting;
- the same HTTP door of a router run with ``--workers 2`` (two processes sharing the
  port, router/workers.py; its CPU is the whole tree's, parent and both workers);
- this router's gRPC door, the same pool, in a second router process;
- a bare grpc.aio relay of the same split (bench/peers/relay.py), the gRPC door's floor:
  the same proto and client, the same two HTTP legs with the adapter's bodies, none of
  the router's own software;
- a bare aiohttp relay of the same split (bench/peers/http_relay.py), the HTTP door's
  floor: the same two legs, the decode engine's SSE bytes forwarded untouched, none of
  the router's own software;
- the client straight to the decode fake (``direct``).

The peers are installed into a cached environment (bench/peers/env.py; the pinned
versions are in bench/peers/requirements.txt); when that fails (no package index) they
are skipped, the reason is in the JSON, and the targets that need them are unmet.
This router runs with its limit fixed (``HETERO_ROUTER_ADAPTIVE_CONCURRENCY=false``), as
in scenario `overhead`: the peers have no adaptive limit, and admission is not the
software path's cost.

Measured, with the systems interleaved in round-robin blocks whose order turns each
round (drift on this shared machine falls on all alike):

- sequential streamed completions of 16 tokens: each system's TTFT p50 and p99 minus
  direct's (``added_ttft_*``);
- 32 concurrent streams for 8 s per system (two windows of 4 s; quick: one of 3 s):
  requests/s, and the CPU time per request of the system's whole process tree from
  /proc (bench/proc_tree.py: utime + stime of the process and all descendants), also the
  engines' and the client's; resident memory after the last window and its peak;
- the ratios of each system's figures to vllm-router's, and the gRPC door's added TTFT
  p50 over the relay's.

Every router must really split: each fake counts the legs it serves by protocol and role
with a fingerprint of the keys that pair them (bench/fake_legs.py), and for each router
the prefill fake's prefill legs and the decode fake's decode legs must both equal the
requests sent through it, with equal fingerprints (``splits``).

sglang-router's ~40 ms of added TTFT is its own, not the fake's: it leaves Nagle's
algorithm on for the client connections it accepts and writes a stream's response head
and its first event separately, so over a kept-alive connection the first event waits
for the client's ACK of the head, which Linux delays by up to 40 ms. The fakes answer
the same with a Content-Length prefill reply as with a chunked one, and their sockets
have TCP_NODELAY already (uvloop sets it); a client that ACKs every segment at once
(TCP_QUICKACK) gets the first event within a millisecond. ``first_event_probe`` shows it
for every HTTP system: the head, the first event, and the first event with quick ACKs.

Last, outside the measured windows, py-spy records each of this router's doors for one
more saturated window (``profile``: the functions with the most own and total time).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import grpc

from backends._gen.hetero.router.v1 import router_pb2
from bench import fake_legs, proc_tree
from bench.engines.servers import EngineStartError, Server
from bench.fake_legs import LegCounts
from bench.peers import env as peers_env
from bench.peers import probe, profile, servers, verdicts
from bench.peers.verdicts import SystemFigures
from bench.processes import FIXED_LIMIT, router_server
from bench.progress import Progress
from bench.report import machine, write_result
from router.client import GENERATE_METHOD
from router.settings import PoolConfig, parse_pool
from router.sim.metrics import percentile

STREAMS = 32
BODY: dict[str, Any] = {"model": "fake", "prompt": "Hello " * 40, "max_tokens": 16, "stream": True}
ANSWER = "".join(f" t{i}" for i in range(16))  # what the fakes answer (bench/fake_engine.py)
REQUEST_TIMEOUT_S = 30.0
NAGLE_FINDING = (
    "sglang-router leaves Nagle's algorithm on for the client connections it accepts and "
    "writes a stream's head and its first event separately: the first event waits for the "
    "client's ACK of the head, which Linux delays by up to 40 ms on a kept-alive connection. "
    "With quick ACKs (first_event_probe) it comes within a millisecond. The fakes are not "
    "at fault: a Content-Length prefill answer changes nothing, and their sockets have "
    "TCP_NODELAY (uvloop's default)."
)
NAGLE_NOTE = (
    "sglang-router's ~40 ms: its first event waits for the client's delayed ACK "
    "(Nagle on its accepted sockets), not the engines; see first_event_probe in peers.json"
)


@dataclass(frozen=True)
class Sizes:
    sequential: int  # requests per system
    block: int  # sequential requests per system per round
    windows: int  # saturated windows per system
    window_s: float
    warm_s: float  # one unmeasured saturated spell per system first
    profile_s: float
    probes: int  # requests per first-event probe, each way


QUICK = Sizes(sequential=200, block=25, windows=1, window_s=3.0, warm_s=0.5, profile_s=3, probes=20)
FULL = Sizes(sequential=1500, block=50, windows=2, window_s=4.0, warm_s=1.0, profile_s=8, probes=50)


class RequestFailedError(Exception):
    """A request through a system did not stream a complete answer."""


class Client(Protocol):
    async def ttft_ms(self) -> float:
        """Sends one request and reads it to its end; the time to its first token."""
        ...

    async def answer(self) -> str:
        """Sends one request; the text it streamed."""
        ...

    async def close(self) -> None: ...


class HttpClient:
    """Streamed /v1/completions over one keep-alive session; the body is encoded once."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self._url = url
        self._payload = json.dumps(body).encode()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
            connector=aiohttp.TCPConnector(limit=STREAMS * 2),
        )

    async def _lines(self) -> AsyncIterator[tuple[float, bytes]]:
        # The fakes insist on vLLM's request id header, so every client sends one.
        headers = {"Content-Type": "application/json", "X-Request-Id": uuid.uuid4().hex}
        async with self._session.post(self._url, data=self._payload, headers=headers) as response:
            if response.status != 200:
                raise RequestFailedError(f"HTTP {response.status}: {(await response.text())[:300]}")
            async for line in response.content:
                yield time.perf_counter(), line

    async def ttft_ms(self) -> float:
        started = time.perf_counter()
        first, done = None, False
        async for at, line in self._lines():
            if first is None and line.startswith(b"data: {"):
                first = at
            elif line.startswith(b"data: [DONE]"):
                done = True
        if first is None or not done:
            raise RequestFailedError("the stream ended without an event or without [DONE]")
        return (first - started) * 1000

    async def answer(self) -> str:
        text = []
        async for _, line in self._lines():
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:]).get("choices") or []:
                    text.append(choice.get("text") or "")
        return "".join(text)

    async def close(self) -> None:
        await self._session.close()


class GrpcClient:
    """The front door's Generate (this router's, or the relay's) with a split asked for."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._call = self._channel.unary_stream(
            GENERATE_METHOD,
            request_serializer=router_pb2.GenerateRequest.SerializeToString,
            response_deserializer=router_pb2.GenerateResponse.FromString,
        )
        self._request = router_pb2.GenerateRequest(
            model=BODY["model"],
            prompt=BODY["prompt"],
            sampling=router_pb2.SamplingParams(max_tokens=BODY["max_tokens"], seed=7),
            disaggregation=router_pb2.DISAGGREGATION_SPLIT,
        )

    async def _responses(self) -> AsyncIterator[tuple[float, router_pb2.GenerateResponse]]:
        finished = False
        async for response in self._call(self._request, timeout=REQUEST_TIMEOUT_S):
            finished = finished or bool(response.finish_reason)
            yield time.perf_counter(), response
        if not finished:
            raise RequestFailedError("the stream ended without a finish reason")

    async def ttft_ms(self) -> float:
        started = time.perf_counter()
        first = None
        async for at, response in self._responses():
            if first is None and (response.token_ids or response.text):
                first = at
        if first is None:
            raise RequestFailedError("the stream carried no token")
        return (first - started) * 1000

    async def answer(self) -> str:
        return "".join([response.text async for _, response in self._responses()])

    async def close(self) -> None:
        await self._channel.close()


@dataclass
class System:
    name: str
    label: str
    client: Client
    pid: int | None  # the root of its process tree; None for direct (no router)
    protocol: str | None  # the split its legs follow ("vllm", "sglang"); None: direct
    http_address: str | None = None  # for the first-event probe
    body: dict[str, Any] = field(default_factory=dict)
    sent: int = 0
    prefill_legs: LegCounts = field(default_factory=LegCounts)
    decode_legs: LegCounts = field(default_factory=LegCounts)
    ttfts_ms: list[float] = field(default_factory=list)
    failures: int = 0
    windows: list[Window] = field(default_factory=list)
    peak_rss_bytes: int | None = None


@dataclass(frozen=True)
class Window:
    ok: int
    failed: int
    elapsed_s: float
    cpu_s: float | None
    engines_cpu_s: float
    client_cpu_s: float
    rss_bytes: int | None
    kernel_cpu_s: float | None = None  # of cpu_s: the system's time in the kernel


_FAILURES = (RequestFailedError, aiohttp.ClientError, grpc.aio.AioRpcError, TimeoutError)


@dataclass(frozen=True)
class Engine:
    address: str
    pid: int


@contextlib.asynccontextmanager
async def ready_process(argv: list[str], log: Path) -> AsyncIterator[tuple[str, int]]:
    """A child that prints ``READY host:port`` and exits when its stdin closes."""
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr
        )
    try:
        if process.stdout is None:
            raise RuntimeError(f"{argv} was started without stdout=PIPE")
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode().strip()
        if not line.startswith("READY "):
            said = await asyncio.to_thread(log.read_text)
            raise RuntimeError(f"{' '.join(argv)} did not start: {said[-800:]}")
        yield line.removeprefix("READY "), process.pid
    finally:
        if process.stdin is not None:
            process.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()


@contextlib.asynccontextmanager
async def fake_engine_process(mode: str, log_dir: Path) -> AsyncIterator[Engine]:
    argv = [sys.executable, "-m", "bench.fake_engine", "--sglang-mode", mode]
    async with ready_process(argv, log_dir / f"fake-{mode}.log") as (address, pid):
        yield Engine(address, pid)


def fake_pool(prefill: Engine, decode: Engine) -> PoolConfig:
    """The router's pool over the two fakes: one prefill and one decode vLLM backend."""
    return parse_pool(
        {
            "backends": [
                {"id": "p0", "kind": "vllm", "address": prefill.address,
                 "role": "prefill", "model": "fake"},
                {"id": "d0", "kind": "vllm", "address": decode.address,
                 "role": "decode", "model": "fake"},
            ]
        },
        source="the peers' fakes",
    )  # fmt: skip


async def _legs(session: aiohttp.ClientSession, engine: Engine) -> LegCounts:
    async with session.get(f"http://{engine.address}/fake/legs") as response:
        response.raise_for_status()
        return LegCounts.from_json(await response.json())


class Bench:
    """The engines' leg counts around every spell of work through one system."""

    def __init__(self, prefill: Engine, decode: Engine) -> None:
        self.prefill, self.decode = prefill, decode
        self._session = aiohttp.ClientSession()

    async def spell(self, system: System, work: Callable[[], Awaitable[int]]) -> None:
        """Runs ``work`` (which returns how many requests it sent) and books the legs the
        engines counted meanwhile to ``system``."""
        prefill_before = await _legs(self._session, self.prefill)
        decode_before = await _legs(self._session, self.decode)
        system.sent += await work()
        prefill_after = await _legs(self._session, self.prefill)
        decode_after = await _legs(self._session, self.decode)
        system.prefill_legs = system.prefill_legs.plus(prefill_after.since(prefill_before))
        system.decode_legs = system.decode_legs.plus(decode_after.since(decode_before))

    async def close(self) -> None:
        await self._session.close()


async def ready(system: System) -> None:
    """Waits until the system answers a request, and checks the answer is the fakes'."""
    last: Exception | None = None
    for _ in range(100):
        try:
            text = await system.client.answer()
        except _FAILURES as failure:
            last = failure
            await asyncio.sleep(0.1)
            continue
        if text != ANSWER:
            raise RuntimeError(f"{system.name} answered {text!r}, not {ANSWER!r}")
        return
    raise RuntimeError(f"{system.name} never answered: {last}")


async def _sequential_block(system: System, count: int, keep: bool) -> int:
    for _ in range(count):
        try:
            ttft = await system.client.ttft_ms()
        except _FAILURES:
            system.failures += 1
            continue
        if keep:
            system.ttfts_ms.append(ttft)
    return count


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


async def saturate(system: System, seconds: float, engines: tuple[Engine, Engine]) -> Window:
    """STREAMS concurrent streams for ``seconds``; the CPU of the system's tree, the
    engines' and the client's over the whole spell (the last requests included)."""
    before = proc_tree.sample(system.pid) if system.pid is not None else None
    engines_before = sum(proc_tree.sample(e.pid).cpu_s for e in engines)
    client_before = _own_cpu_s()
    ok = failed = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def stream() -> None:
        nonlocal ok, failed
        while time.perf_counter() < deadline:
            try:
                await system.client.ttft_ms()
                ok += 1
            except _FAILURES:
                failed += 1

    await asyncio.gather(*(stream() for _ in range(STREAMS)))
    elapsed = time.perf_counter() - started
    after = proc_tree.sample(system.pid) if system.pid is not None else None
    return Window(
        ok=ok,
        failed=failed,
        elapsed_s=elapsed,
        cpu_s=None if before is None or after is None else after.cpu_s - before.cpu_s,
        engines_cpu_s=sum(proc_tree.sample(e.pid).cpu_s for e in engines) - engines_before,
        client_cpu_s=_own_cpu_s() - client_before,
        rss_bytes=None if after is None else after.rss_bytes,
        kernel_cpu_s=None
        if before is None or after is None
        else after.kernel_cpu_s - before.kernel_cpu_s,
    )


def turned(systems: list[System], round_index: int) -> list[System]:
    shift = round_index % len(systems)
    return systems[shift:] + systems[:shift]


async def _measure(bench: Bench, systems: list[System], sizes: Sizes) -> None:
    engines = (bench.prefill, bench.decode)
    for system in systems:
        await bench.spell(system, functools.partial(_ready_then_warm, system))
    rounds = math.ceil(sizes.sequential / sizes.block)
    progress = Progress("peers sequential", rounds * len(systems))
    for round_index in range(rounds):
        for system in turned(systems, round_index):
            await bench.spell(
                system, functools.partial(_sequential_block, system, sizes.block, keep=True)
            )
            progress.advance()
    progress.close()
    for system in systems:
        print(f"  warming {system.name} with {STREAMS} streams", flush=True)
        await bench.spell(system, functools.partial(_saturated, system, sizes.warm_s, engines))
    progress = Progress("peers saturated windows", sizes.windows * len(systems))
    for round_index in range(sizes.windows):
        for system in turned(systems, round_index):
            window = functools.partial(_saturated, system, sizes.window_s, engines, keep=True)
            await bench.spell(system, window)
            progress.advance()
    progress.close()
    for system in systems:
        if system.pid is not None:
            # VmHWM is brought up to date lazily: a later VmRSS reading may exceed it.
            seen = [w.rss_bytes for w in system.windows if w.rss_bytes is not None]
            system.peak_rss_bytes = max([proc_tree.sample(system.pid).peak_rss_bytes, *seen])


async def _ready_then_warm(system: System) -> int:
    before = system.failures
    await ready(system)
    sent = 1 + await _sequential_block(system, 30, keep=False)
    system.failures = before  # failures while it came up are not the run's
    return sent


async def _saturated(
    system: System, seconds: float, engines: tuple[Engine, Engine], *, keep: bool = False
) -> int:
    """One saturated spell; with ``keep`` it is a measured window. Returns the requests sent."""
    window = await saturate(system, seconds, engines)
    if keep:
        system.windows.append(window)
    return window.ok + window.failed


async def _profiles(
    bench: Bench, systems: list[System], seconds: float, scratch: Path
) -> dict[str, Any]:
    """py-spy on each of this router's doors during one more saturated spell."""
    profiles: dict[str, Any] = {}
    engines = (bench.prefill, bench.decode)
    for system in systems:
        if system.pid is None or system.name not in (verdicts.HTTP_DOOR, verdicts.GRPC_DOOR):
            continue
        print(f"  py-spy on {system.name} for {seconds:.0f} s", flush=True)
        output = scratch / f"{system.name}.collapsed"
        recording = asyncio.create_task(profile.record(system.pid, seconds, 200, output))
        await asyncio.sleep(0.5)  # py-spy attaches; the load then outlasts its window
        await bench.spell(system, functools.partial(_saturated, system, seconds + 0.5, engines))
        try:
            profiles[system.name] = profile.top_frames(await recording)
        except RuntimeError as failure:
            profiles[system.name] = {"skipped": str(failure)}
    return profiles


async def _probes(bench: Bench, systems: list[System], count: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for system in systems:
        if system.http_address is None:
            continue
        body = {**BODY, **system.body}

        async def run_probe(s: System = system, b: dict[str, Any] = body) -> int:
            found = await asyncio.to_thread(
                probe.first_event, s.http_address or "", "/v1/completions", b, count
            )
            results[s.name] = found.as_json()
            return 2 * count

        try:
            await bench.spell(system, run_probe)
        except (OSError, ConnectionError) as failure:
            results[system.name] = {"skipped": str(failure)}
    return results


def _figures(system: System, direct: System) -> SystemFigures:
    ok = sum(w.ok for w in system.windows)
    elapsed = sum(w.elapsed_s for w in system.windows)
    cpu = [w.cpu_s for w in system.windows]
    rss_after = system.windows[-1].rss_bytes if system.windows else None
    added = system is not direct and bool(system.ttfts_ms) and bool(direct.ttfts_ms)
    return SystemFigures(
        added_ttft_p50_ms=(
            percentile(system.ttfts_ms, 50) - percentile(direct.ttfts_ms, 50) if added else None
        ),
        added_ttft_p99_ms=(
            percentile(system.ttfts_ms, 99) - percentile(direct.ttfts_ms, 99) if added else None
        ),
        cpu_us_per_request=(
            sum(c for c in cpu if c is not None) / ok * 1e6
            if ok and all(c is not None for c in cpu)
            else None
        ),
        requests_per_s=ok / elapsed if elapsed else None,
        rss_peak_mib=None if system.peak_rss_bytes is None else system.peak_rss_bytes / 2**20,
        rss_after_mib=None if rss_after is None else rss_after / 2**20,
    )


def _details(system: System) -> dict[str, Any]:
    ok = sum(w.ok for w in system.windows)
    engines_cpu = sum(w.engines_cpu_s for w in system.windows)
    client_cpu = sum(w.client_cpu_s for w in system.windows)
    cpu = sum(w.cpu_s for w in system.windows if w.cpu_s is not None)
    kernel = sum(w.kernel_cpu_s for w in system.windows if w.kernel_cpu_s is not None)
    return {
        "label": system.label,
        "ttft_p50_ms": round(percentile(system.ttfts_ms, 50), 4) if system.ttfts_ms else None,
        "ttft_p99_ms": round(percentile(system.ttfts_ms, 99), 4) if system.ttfts_ms else None,
        "sequential_requests": len(system.ttfts_ms),
        "failures": system.failures + sum(w.failed for w in system.windows),
        "saturated_requests": ok,
        "saturated_s": round(sum(w.elapsed_s for w in system.windows), 3),
        "engines_cpu_us_per_request": round(engines_cpu / ok * 1e6, 1) if ok else None,
        "client_cpu_us_per_request": round(client_cpu / ok * 1e6, 1) if ok else None,
        # How much of the system's own CPU was the kernel's (system calls, loopback TCP).
        "kernel_cpu_share": round(kernel / cpu, 3) if cpu else None,
    }


def _split(system: System) -> fake_legs.SplitCheck | None:
    if system.protocol is None:
        return None
    return fake_legs.check_split(
        system.protocol, system.sent, system.prefill_legs, system.decode_legs
    )


def _round(values: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}


def _stop(peers: list[Server]) -> None:
    for server in peers:
        server.stop()


def _start_peers(prefill: str, decode: str, log_dir: Path) -> tuple[list[Server], dict[str, str]]:
    """Starts both peer routers; a peer that does not come up is left out, with why."""
    started, failed = [], {}
    for make in (servers.vllm_router, servers.sglang_router):
        server = make(prefill, decode, log_dir)
        try:
            server.start()
            server.wait_ready(timeout_s=90)
        except (EngineStartError, OSError) as failure:
            server.stop()
            failed[server.name] = str(failure)[-800:]
            continue
        started.append(server)
    return started, failed


async def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    load_before = os.getloadavg()
    peers_missing: str | None = None
    try:
        await asyncio.to_thread(peers_env.install)
    except peers_env.PeerEnvUnavailableError as unavailable:
        peers_missing = f"peer routers not installed: {unavailable}"
        print(f"  skipping the peer routers: {peers_missing}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as scratch:
        log_dir = Path(scratch)
        async with (
            fake_engine_process("prefill", log_dir) as prefill,
            fake_engine_process("decode", log_dir) as decode,
        ):
            pool = fake_pool(prefill, decode)
            legs = ["--prefill", prefill.address, "--decode", decode.address]
            relay_argv = [sys.executable, "-m", "bench.peers.relay", *legs]
            http_relay_argv = [sys.executable, "-m", "bench.peers.http_relay", *legs]
            async with (
                router_server(pool, FIXED_LIMIT) as http_router,
                router_server(
                    pool, {**FIXED_LIMIT, "HETERO_ROUTER_WORKERS": "2"}
                ) as workers_router,
                router_server(pool, FIXED_LIMIT) as grpc_router,
                ready_process(relay_argv, log_dir / "relay.log") as (relay_address, relay_pid),
                ready_process(http_relay_argv, log_dir / "http-relay.log") as (
                    http_relay_address,
                    http_relay_pid,
                ),
            ):
                peers: list[Server] = []
                peer_failures: dict[str, str] = {}
                if peers_missing is None:
                    peers, peer_failures = await asyncio.to_thread(
                        _start_peers, prefill.address, decode.address, log_dir
                    )
                bench = Bench(prefill, decode)
                systems: list[System] = []
                try:
                    for server in peers:
                        systems.append(
                            System(
                                server.name,
                                f"{server.name} (Rust)",
                                HttpClient(f"{server.url}/v1/completions", BODY),
                                server.process.pid if server.process else None,
                                "vllm" if server.name == "vllm-router" else "sglang",
                                http_address=server.address,
                            )
                        )
                    split_body = {"disaggregation": "split"}
                    systems += [
                        System(
                            verdicts.HTTP_DOOR,
                            "hetero-router HTTP",
                            HttpClient(
                                f"http://{http_router.http_address}/v1/completions",
                                {**BODY, **split_body},
                            ),
                            http_router.pid,
                            "vllm",
                            http_address=http_router.http_address,
                            body=split_body,
                        ),
                        System(
                            verdicts.HTTP_DOOR_WORKERS,
                            "hetero-router HTTP, 2 workers",
                            HttpClient(
                                f"http://{workers_router.http_address}/v1/completions",
                                {**BODY, **split_body},
                            ),
                            workers_router.pid,
                            "vllm",
                            http_address=workers_router.http_address,
                            body=split_body,
                        ),
                        System(
                            verdicts.GRPC_DOOR,
                            "hetero-router gRPC",
                            GrpcClient(grpc_router.grpc_address),
                            grpc_router.pid,
                            "vllm",
                        ),
                        System(
                            verdicts.RELAY,
                            "grpc.aio relay",
                            GrpcClient(relay_address),
                            relay_pid,
                            "vllm",
                        ),
                        System(
                            verdicts.HTTP_RELAY,
                            "aiohttp relay",
                            HttpClient(f"http://{http_relay_address}/v1/completions", BODY),
                            http_relay_pid,
                            "vllm",
                            http_address=http_relay_address,
                        ),
                        System(
                            verdicts.DIRECT,
                            "direct to decode",
                            HttpClient(f"http://{decode.address}/v1/completions", BODY),
                            None,
                            None,
                            http_address=decode.address,
                        ),
                    ]
                    await _measure(bench, systems, sizes)
                    profiles = await _profiles(bench, systems, sizes.profile_s, log_dir)
                    print("  first-event probes", flush=True)
                    first_events = await _probes(bench, systems, sizes.probes)
                    peer_argv = {server.name: server.argv[1:] for server in peers}
                finally:
                    for system in systems:
                        await system.client.close()
                    await bench.close()
                    await asyncio.to_thread(_stop, peers)
    load_after = os.getloadavg()

    by_name = {system.name: system for system in systems}
    direct = by_name[verdicts.DIRECT]
    figures = {system.name: _figures(system, direct) for system in systems}
    splits = {name: _split(system) for name, system in by_name.items()}
    split_ok = {name: check.split for name, check in splits.items() if check is not None}
    if peers_missing is None and peer_failures:
        peers_missing = "; ".join(f"{name}: {why}" for name, why in peer_failures.items())
    targets = verdicts.targets(figures, split_ok, peers_missing)
    result: dict[str, Any] = {
        "scenario": "peers",
        "mode": "quick" if quick else "full",
        "figures": {name: _round(f.__dict__) for name, f in figures.items()},
        "systems": {name: _details(system) for name, system in by_name.items()},
        "ratios_to_vllm_router": {
            name: _round(values) for name, values in verdicts.ratios(figures).items()
        },
        "targets": targets,
        "floors": verdicts.floors(figures),
        "splits": {name: check.as_json() for name, check in splits.items() if check},
        "direct_plain_legs": direct.decode_legs.counts[fake_legs.PLAIN],
        "first_event_probe": first_events,
        "first_event_finding": NAGLE_FINDING,
        "profile": profiles,
        "peers": {
            "pinned": peers_env.pins(),
            "environment": str(peers_env.venv_dir()),
            "argv": peer_argv,
            "skipped": peers_missing,
        },
        "headline": _headline(targets),
        "streams": STREAMS,
        "sizes": sizes.__dict__,
        "load_average": {"before": load_before, "after": load_after},
        "machine": machine(),
    }
    _plot(out_dir / "peers.png", figures, by_name)
    write_result("peers", result, out_dir)
    return result


def _headline(targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    names = {
        "cpu_per_request_ratio": "CPU/req vs vllm-router",
        "added_ttft_p50_ratio": "added TTFT p50 vs vllm-router",
        "throughput_ratio": "req/s vs vllm-router",
        "grpc_door_over_relay_added_ttft_p50_ms": "gRPC over relay ms",
    }
    # A target without a figure (the peers skipped) reads "n/a" in SUMMARY.md.
    return {
        label: "n/a" if targets[key]["value"] is None else targets[key]["value"]
        for key, label in names.items()
    }


def _plot(path: Path, figures: dict[str, SystemFigures], systems: dict[str, System]) -> None:
    from bench import plots  # noqa: PLC0415 (matplotlib: the bench extra; bench.door_cost and its tests import this module without it)

    reference = systems[verdicts.REFERENCE].label if verdicts.REFERENCE in systems else None

    def panel(title: str, unit: str, attribute: str) -> plots.BarPanel:
        values = {systems[n].label: getattr(f, attribute) for n, f in figures.items()}
        return plots.BarPanel(title, unit, values, reference=reference)

    plots.bar_panels(
        path,
        [
            panel("added TTFT p50 over direct (sequential)", "ms", "added_ttft_p50_ms"),
            panel("added TTFT p99 over direct (sequential)", "ms", "added_ttft_p99_ms"),
            panel(f"CPU per split request ({STREAMS} streams)", "us", "cpu_us_per_request"),
            panel(f"saturated throughput ({STREAMS} streams)", "requests/s", "requests_per_s"),
            panel("resident memory, peak", "MiB", "rss_peak_mib"),
            panel("resident memory after the load", "MiB", "rss_after_mib"),
        ],
        "P/D routers on the same two fake engines, one run",
        note=NAGLE_NOTE,
    )
