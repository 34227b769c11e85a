"""A client that goes away mid-stream frees the engines: nothing runs on after it.

The evidence is the engines' own token count, not a race against the clock: a
request the router did not abort runs to its ``LONG`` tokens (one more in a split:
the prefill's), one it aborted stops short of them. How soon the abort lands depends
on the machine's load (on a loaded 2-core machine an engine made over a thousand
tokens first), so the request is as long as the context allows and the wait for idle
is generous. (vLLM does not count a client's abort under ``finished_reason="abort"``,
so that counter cannot tell.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from bench.engines.servers import SERVED_MODEL, VllmServer
from tests.engines.conftest import Engines, StartRouter, backend, pd_backends

RUNNING = "vllm:num_requests_running"
GENERATED = "vllm:generation_tokens_total"
IDLE_WITHIN_S = 60.0  # a loaded CI machine; an unaborted LONG request ends sooner
LONG = 2000  # tokens: far more than a test waits for (max_model_len is 2048)


def samples(server: VllmServer) -> tuple[float, float]:
    metrics = server.metrics()
    return metrics.get(RUNNING, 0.0), metrics.get(GENERATED, 0.0)


async def generated(servers: list[VllmServer]) -> float:
    """Tokens the engines have generated so far, summed over them."""
    pairs = await asyncio.gather(*(asyncio.to_thread(samples, s) for s in servers))
    return sum(made for _running, made in pairs)


async def generated_until_idle(servers: list[VllmServer]) -> float:
    """Waits until no engine runs a request, then returns their generated-token total."""
    deadline = time.monotonic() + IDLE_WITHIN_S
    while True:
        pairs = await asyncio.gather(*(asyncio.to_thread(samples, s) for s in servers))
        if not any(running for running, _made in pairs):
            return sum(made for _running, made in pairs)
        assert time.monotonic() < deadline, f"engines still running after {IDLE_WITHIN_S} s"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("mode", ["split", "colocated"])
async def test_grpc_cancel_aborts_the_engine(
    mode: str, engines: Engines, router_for: StartRouter, report: Callable[[str], None]
) -> None:
    router = await router_for(pd_backends(engines))
    servers = [engines.prefill, engines.decode]
    before = await generated(servers)
    frames = router.client.generate(
        "def main():", max_tokens=LONG, temperature=0.0, disaggregation=mode
    )
    received = 0
    async for _message in frames:
        received += 1
        if received == 3:
            break
    await frames.aclose()  # cancels the call
    made = await generated_until_idle(servers) - before
    report(f"cancelled {mode} call after 3 frames: the engines generated {made:.0f} tokens")
    assert 0 < made < LONG, f"{made} tokens generated for a cancelled request: not aborted"


async def test_http_disconnect_aborts_the_engine(
    engines: Engines, router_for: StartRouter, report: Callable[[str], None]
) -> None:
    router = await router_for([backend("lone", engines.decode, "both")])
    before = await generated([engines.decode])
    body = {"model": SERVED_MODEL, "prompt": "def main():", "max_tokens": LONG, "stream": True}
    answer = await router.http.post(router.http_url + "/v1/completions", json=body)
    assert answer.status == 200
    chunks = 0
    async for _line in answer.content:
        chunks += 1
        if chunks == 6:
            break
    answer.close()  # drops the connection mid-stream
    made = await generated_until_idle([engines.decode]) - before
    report(f"dropped HTTP stream after 6 chunks: the engine generated {made:.0f} tokens")
    assert 0 < made < LONG, f"{made} tokens generated for a dropped stream: not aborted"
