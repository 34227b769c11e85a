"""A split whose KV handoff stalls is served colocated before any token is lost.

vLLM's decode engine, pulling the KV from a prefill engine that restarted, waits on
the NIXL handshake (tens of seconds) before its first token. Until a token reaches
the client the router can still serve the request elsewhere: past
``handoff_timeout_s`` it closes the decode leg (vLLM's abort) and serves the request
colocated on the decode backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from backends.base import Role
from bench.fake_vllm import FakeVllm
from router.client import AsyncRouterClient
from router.daemon import Daemon
from router.settings import BackendConfig, PoolConfig, Settings
from tests.helpers import eventually

MODEL = "llama-3.1-8b"


@pytest.fixture
async def engines() -> AsyncIterator[tuple[FakeVllm, FakeVllm]]:
    issued: dict[str, dict[str, object]] = {}
    pair = FakeVllm(issued=issued), FakeVllm(issued=issued)
    for engine in pair:
        await engine.start()
    yield pair
    for engine in pair:
        await engine.stop()


async def split_through_router(
    prefill: FakeVllm, decode: FakeVllm, handoff_timeout_s: float
) -> tuple[str, str]:
    """One forced split; (its text, the route's decode backend)."""
    backends = tuple(
        BackendConfig(id=name, kind="vllm", address=engine.address, role=role, model=MODEL)
        for name, role, engine in (("p", Role.PREFILL, prefill), ("d", Role.DECODE, decode))
    )
    settings = Settings(
        grpc_address="127.0.0.1:0",
        http_address="127.0.0.1:0",
        drain_grace_s=0,
        handoff_timeout_s=handoff_timeout_s,
    )
    daemon = Daemon(settings, PoolConfig(backends=backends))
    await daemon.start()
    try:
        async with AsyncRouterClient(f"127.0.0.1:{daemon.grpc_port}", timeout_s=30) as client:
            text, route = [], ""
            async for message in client.generate("Hello there", disaggregation="split"):
                if message.HasField("route"):
                    route = message.route.prefill_backend + "->" + message.route.decode_backend
                text.append(message.text)
        return "".join(text), route
    finally:
        await daemon.stop()


async def test_a_stalled_handoff_is_served_colocated_on_the_decode_backend(
    engines: tuple[FakeVllm, FakeVllm],
) -> None:
    prefill, decode = engines
    decode.handoff_stall_s = 60  # far past the deadline below
    text, route = await split_through_router(prefill, decode, handoff_timeout_s=0.2)

    assert text == "Hello, world!"
    assert route == "d->d"  # served colocated by the decode backend
    stalled, served = [leg for leg in decode.requests if leg.is_generation]
    assert stalled.body is not None
    assert "kv_transfer_params" in stalled.body
    assert served.body is not None
    assert "kv_transfer_params" not in served.body
    await eventually(lambda: stalled.request_id in decode.disconnected)  # vLLM's abort


async def test_a_handoff_within_the_deadline_stays_split(
    engines: tuple[FakeVllm, FakeVllm],
) -> None:
    prefill, decode = engines
    text, route = await split_through_router(prefill, decode, handoff_timeout_s=30)
    assert (text, route) == ("Hello, world!", "p->d")
    assert len([leg for leg in decode.requests if leg.is_generation]) == 1
