"""A served request leaves no cyclic garbage of the router's own: reference counting
frees all of it, so the garbage collector, set to run rarely once serving
(router/gc_tuning.py), has nothing of the router's to wait for."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from router.client import AsyncRouterClient
from router.daemon import Daemon
from tests.helpers import vllm_split_router

MODEL = "llama-3.1-8b"
SERVED_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    """A router splitting over two fake vLLM engines."""
    async with vllm_split_router(MODEL, SERVED_MODEL) as (daemon, _, _):
        yield daemon


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    """What the collector finds unreachable from here on, kept for the test to read."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def _ours(objects: list[object]) -> list[str]:
    names = (type(o).__module__ + "." + type(o).__qualname__ for o in objects)
    return sorted({name for name in names if name.startswith(("router.", "backends."))})


@pytest.mark.parametrize("stream", [True, False])
async def test_a_split_request_over_http_leaves_no_cycle_of_the_routers(
    daemon: Daemon, saved_garbage: list[object], stream: bool
) -> None:
    http_url = f"http://127.0.0.1:{daemon.http_port}"
    body = {"model": MODEL, "prompt": "one two three", "max_tokens": 4, "stream": stream}
    headers = {"X-Hetero-Disaggregation": "split"}
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(
                f"{http_url}/v1/completions", json=body, headers=headers
            ) as reply:
                assert reply.status == 200
                assert reply.headers["X-Hetero-Route"].startswith("split ")
                await reply.read()
    gc.collect()
    assert _ours(saved_garbage) == []


async def test_a_split_request_over_grpc_leaves_no_cycle_of_the_routers(
    daemon: Daemon, saved_garbage: list[object]
) -> None:
    client = AsyncRouterClient(f"127.0.0.1:{daemon.grpc_port}", timeout_s=30)
    try:
        for _ in range(3):
            frames = [f async for f in client.generate("one two three", disaggregation="split")]
            assert frames[0].route.prefill_backend == "p"
    finally:
        await client.close()
    gc.collect()
    assert _ours(saved_garbage) == []  # (grpc's own server leaves five objects a call)
