"""Scenario `http_pd`: the router's HTTP door doing a vLLM P/D split, against direct.

Two zero-cost fake vLLM engines (separate processes), sequential streaming
completions: the client straight to the decode engine, and the client through
the router's OpenAI-compatible door with the `vllm` adapter splitting the
request (prefill leg, then the decode leg with its kv_transfer_params).
Interleaved in one run; the figures are differences within it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from bench import plots
from bench.processes import router_process
from bench.progress import Progress
from bench.report import check, machine, write_result
from router.settings import parse_pool
from router.sim.metrics import percentile

QUICK, FULL = 300, 1500
BODY = {"model": "fake", "prompt": "Hello " * 40, "max_tokens": 16, "stream": True}


@contextlib.asynccontextmanager
async def _engine() -> AsyncIterator[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.fake_engine",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        if process.stdout is None:
            raise RuntimeError("the fake engine was started without stdout=PIPE")
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        if not line.startswith("READY "):
            raise RuntimeError("fake engine did not start")
        yield line.removeprefix("READY ")
    finally:
        if process.stdin is not None:
            process.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()


async def _ttft_ms(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    first = None
    # The fake engine insists on vLLM's request id header, as the router sends it.
    headers = {"X-Request-Id": uuid.uuid4().hex}
    async with session.post(url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.content:
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter()
    if first is None:
        raise RuntimeError("the stream carried no data")
    return (first - started) * 1000


async def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    count = QUICK if quick else FULL
    async with _engine() as prefill, _engine() as decode:
        pool = parse_pool(
            {
                "backends": [
                    {"id": "p0", "kind": "vllm", "address": prefill, "role": "prefill",
                     "model": "fake"},
                    {"id": "d0", "kind": "vllm", "address": decode, "role": "decode",
                     "model": "fake"},
                ]
            }
        )  # fmt: skip
        async with (
            router_process(pool, {}, http=True) as router_http,
            aiohttp.ClientSession() as session,
        ):
            direct_url = f"http://{decode}/v1/completions"
            router_url = f"http://{router_http}/v1/completions"
            split_body = {**BODY, "disaggregation": "split"}
            for _ in range(30):  # warm connections on every hop
                await _ttft_ms(session, direct_url, BODY)
                await _ttft_ms(session, router_url, split_body)
            direct, router = [], []
            progress = Progress("http_pd sequential", count)
            for _ in range(count):
                direct.append(await _ttft_ms(session, direct_url, BODY))
                router.append(await _ttft_ms(session, router_url, split_body))
                progress.advance()
            progress.close()
    figures = {
        "direct_ttft_p50_ms": percentile(direct, 50),
        "router_ttft_p50_ms": percentile(router, 50),
        "added_ttft_p50_ms": percentile(router, 50) - percentile(direct, 50),
        "added_ttft_p99_ms": percentile(router, 99) - percentile(direct, 99),
    }
    result: dict[str, Any] = {
        "scenario": "http_pd",
        "mode": "quick" if quick else "full",
        "figures": {k: round(v, 4) for k, v in figures.items()},
        "targets": {
            "added_ttft_p50_ms": check(figures["added_ttft_p50_ms"], at_most=1.5),
            "added_ttft_p99_ms": check(figures["added_ttft_p99_ms"], at_most=3.0),
        },
        "headline": {
            "added TTFT p50 ms": round(figures["added_ttft_p50_ms"], 3),
            "added TTFT p99 ms": round(figures["added_ttft_p99_ms"], 3),
        },
        "requests": count,
        "machine": machine(),
    }
    plots.cdfs(
        out_dir / "http_pd.png",
        {"direct to decode engine": direct, "router split (vllm adapter)": router},
        "TTFT of streamed completions over HTTP (ms)",
    )
    write_result("http_pd", result, out_dir)
    return result
