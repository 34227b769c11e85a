"""Scenario `kv`: how fast a KV cache moves, against this machine's own socket limit.

In one run: a plain asyncio socket copy of the same bytes between two processes
on 127.0.0.1 (the machine's limit), a decode device pulling a KV straight from a
prefill device (direct), and the router relaying it between them (relay), with
the router's memory growth while it relays. The KV is padded to the size the
emulated Llama-3.1-70B's would be (320 KiB per token).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path
from typing import Any

from backends.base import GenerationRequest, SamplingParams
from backends.mock.adapter import MockBackend
from bench.prompts import prompt_text
from bench.report import check, machine, write_result
from router.cluster import embedded_devices
from router.handoff.relay import RelayStats, relay
from router.settings import parse_pool

KV_BYTES_PER_TOKEN = 327680  # Llama-3.1-70B, BF16
QUICK_BYTES, FULL_BYTES = 256 << 20, 1 << 30
ROUNDS = 3  # each path's best of three: the machine's noise hits them alike

_SINK = """
import socket, sys
size = int(sys.argv[1])
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
connection, _ = server.accept()
buffer = bytearray(size)
view, got = memoryview(buffer), 0
while got < size:
    got += connection.recv_into(view[got:], min(size - got, 1 << 20))
connection.sendall(b"k")
"""


async def _loopback_gbps(nbytes: int) -> float:
    """A plain socket copy to another process that receives into one buffer."""
    sink = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SINK, str(nbytes), stdout=asyncio.subprocess.PIPE
    )
    if sink.stdout is None:
        raise RuntimeError("the sink was started without stdout=PIPE")
    port = int((await sink.stdout.readline()).decode())
    payload = memoryview(bytearray(nbytes))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    for offset in range(0, nbytes, 1 << 20):
        writer.write(payload[offset : offset + (1 << 20)])
        await writer.drain()
    await reader.readexactly(1)
    seconds = time.perf_counter() - started
    writer.close()
    await sink.wait()
    return nbytes * 8 / seconds / 1e9


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _peak_rss_growth(work: asyncio.Task[Any]) -> int:
    baseline = peak = _rss_bytes()
    while not work.done():
        peak = max(peak, _rss_bytes())
        await asyncio.sleep(0.005)
    return peak - baseline


def _request(request_id: str, prompt: str) -> GenerationRequest:
    return GenerationRequest(
        request_id, "llama-3.1-70b", prompt, SamplingParams(2, 0.0, 1.0, 1), len(prompt) + 1
    )


async def _direct_seconds(
    source: MockBackend, sink: MockBackend, prompt: str, request_id: str, nbytes: int
) -> float:
    """The decode device pulls the KV; its first frame comes once every byte is in and checked."""
    request = _request(request_id, prompt)
    prefilled = await source.prefill(request, timeout_s=120)
    if prefilled.handle is None or prefilled.handle.byte_length != nbytes:
        raise RuntimeError(f"prefill leased no KV of {nbytes} bytes: {prefilled.handle}")
    started = time.perf_counter()
    frames = sink.decode(request, prefilled.handle, prefilled.first_token_id, 120)
    async for _ in frames:
        break
    seconds = time.perf_counter() - started
    await frames.aclose()
    return seconds


async def _relay_seconds(
    source: MockBackend, sink: MockBackend, prompt: str, request_id: str
) -> tuple[float, int, RelayStats]:
    """The router (this process) relays the KV; returns the time and its memory growth."""
    prefilled = await source.prefill(_request(request_id, prompt), timeout_s=120)
    if prefilled.handle is None:
        raise RuntimeError("prefill leased no KV")
    stats = RelayStats()
    started = time.perf_counter()
    moving = asyncio.create_task(relay(source, sink, prefilled.handle, timeout_s=120, stats=stats))
    growth = await _peak_rss_growth(moving)
    await moving
    seconds = time.perf_counter() - started
    await sink.abort(request_id, timeout_s=5)  # frees the relayed copy
    await source.abort(request_id, timeout_s=5)
    return seconds, growth, stats


async def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    target = QUICK_BYTES if quick else FULL_BYTES
    tokens = math.ceil(target / KV_BYTES_PER_TOKEN)
    prompt = prompt_text(tokens - 1, seed=5)
    nbytes = tokens * KV_BYTES_PER_TOKEN
    print(f"  loopback copy of {nbytes >> 20} MiB", file=sys.stderr, flush=True)
    loopback = max([await _loopback_gbps(nbytes) for _ in range(ROUNDS)])
    common = {"kind": "mock", "address": "127.0.0.1:0", "model": "llama-3.1-70b",
              "time_scale": 0.0, "options": {"emulate_kv_size": True}}  # fmt: skip
    pool = parse_pool(
        {
            "backends": [
                {**common, "id": "p0", "role": "prefill", "profile": "h100"},
                {**common, "id": "d0", "role": "decode", "profile": "groq-lpu"},
            ]
        }
    )
    async with embedded_devices(pool, ready_timeout_s=60) as devices:
        address = {b.id: b.address for b in devices.backends}
        source, sink = MockBackend("p0", address["p0"]), MockBackend("d0", address["d0"])
        await source.start()
        await sink.start()
        for backend in (source, sink):  # as the router's health checks would
            await backend.check_health(5.0)
        try:
            print("  direct pull", file=sys.stderr, flush=True)
            direct_seconds = min(
                [
                    await _direct_seconds(source, sink, prompt, f"d{i}", nbytes)
                    for i in range(ROUNDS)
                ]
            )
            print("  relay", file=sys.stderr, flush=True)
            relays = [await _relay_seconds(source, sink, prompt, f"r{i}") for i in range(ROUNDS)]
            relay_seconds = min(seconds for seconds, _, _ in relays)
            rss_growth = max(growth for _, growth, _ in relays)
            most_in_flight = max(stats.most_in_flight for _, _, stats in relays)
        finally:
            await source.close()
            await sink.close()

    direct_gbps = nbytes * 8 / direct_seconds / 1e9
    relay_gbps = nbytes * 8 / relay_seconds / 1e9
    figures = {
        "bytes": nbytes,
        "loopback_gbps": loopback,
        "direct_gbps": direct_gbps,
        "relay_gbps": relay_gbps,
        "direct_ratio": direct_gbps / loopback,
        "relay_ratio": relay_gbps / loopback,
        "relay_peak_rss_mib": rss_growth / (1 << 20),
        "relay_most_chunks_in_flight": most_in_flight,
    }
    result: dict[str, Any] = {
        "scenario": "kv",
        "mode": "quick" if quick else "full",
        "figures": {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()},
        "targets": {
            "direct_ratio": check(figures["direct_ratio"], at_least=0.5),
            "relay_ratio": check(figures["relay_ratio"], at_least=0.4),
            "relay_peak_rss_mib": check(figures["relay_peak_rss_mib"], at_most=64.0),
        },
        "headline": {
            "loopback Gbps": round(loopback, 2),
            "direct ratio": round(figures["direct_ratio"], 3),
            "relay ratio": round(figures["relay_ratio"], 3),
            "relay RSS MiB": round(figures["relay_peak_rss_mib"], 1),
        },
        "transport": "plain-socket data plane (1 MiB segments, CRC-32 each); gRPC for control",
        "machine": machine(),
    }
    write_result("kv", result, out_dir)
    return result
