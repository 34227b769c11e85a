"""A client that goes away mid-stream frees the engines: nothing runs on after it."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.engines.servers import SERVED_MODEL, VllmServer
from tests.engines.conftest import Engines, StartRouter, backend, pd_backends

RUNNING = "vllm:num_requests_running"
ABORT_WITHIN_S = 2.0
LONG = 1500  # tokens: far more than a test waits for


def running(server: VllmServer) -> float:
    return server.metrics().get(RUNNING, 0.0)


async def idle_within(servers: list[VllmServer], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        counts = await asyncio.gather(*(asyncio.to_thread(running, s) for s in servers))
        if not any(counts):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("mode", ["split", "colocated"])
async def test_grpc_cancel_aborts_the_engine(
    mode: str, engines: Engines, router_for: StartRouter
) -> None:
    router = await router_for(pd_backends(engines))
    frames = router.client.generate(
        "def main():", max_tokens=LONG, temperature=0.0, disaggregation=mode
    )
    received = 0
    async for _message in frames:
        received += 1
        if received == 3:
            break
    await frames.aclose()  # cancels the call
    assert await idle_within([engines.prefill, engines.decode], ABORT_WITHIN_S)


async def test_http_disconnect_aborts_the_engine(engines: Engines, router_for: StartRouter) -> None:
    router = await router_for([backend("lone", engines.decode, "both")])
    body = {"model": SERVED_MODEL, "prompt": "def main():", "max_tokens": LONG, "stream": True}
    answer = await router.http.post(router.http_url + "/v1/completions", json=body)
    assert answer.status == 200
    chunks = 0
    async for _line in answer.content:
        chunks += 1
        if chunks == 6:
            break
    answer.close()  # drops the connection mid-stream
    assert await idle_within([engines.decode], ABORT_WITHIN_S)
