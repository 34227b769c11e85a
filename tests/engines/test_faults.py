"""Engines that restart or die: the client sees a clean, documented outcome.

These run last (conftest orders them): they restart and kill the session's engines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from tests.engines.conftest import Engines, StartRouter, direct, long_prompt, pd_backends, via_grpc

HELD_AFTER = 4  # steps the decode engine makes before it is held, then killed


async def test_split_after_the_prefill_engine_restarted(
    engines: Engines, router_for: StartRouter, report: Callable[[str], None]
) -> None:
    """The decode engine's first KV read from the new prefill engine may wait on a NIXL
    handshake for tens of seconds; past the handoff deadline the router serves the
    request colocated on the decode engine. Either way the client gets its tokens."""
    router = await router_for(pd_backends(engines), handoff_timeout_s=10.0)
    prompt = long_prompt("restart")
    expected = await direct(engines.decode, prompt, 16)
    first, _route = await via_grpc(router, prompt, 16, "split")
    assert first == expected

    await asyncio.to_thread(engines.restart, engines.prefill)
    # Until a health check passes, a forced split is refused (UNAVAILABLE: no healthy
    # prefill backend); the router's checker runs every second, this one at once.
    await router.daemon.health.check_all()
    text, route = await via_grpc(router, long_prompt("restart-2"), 16, "split")
    assert text == await direct(engines.decode, long_prompt("restart-2"), 16)
    assert route.decode_backend == "decode-0"
    report(f"first split after the prefill restart: {route.prefill_backend} -> decode-0")


async def test_decode_engine_killed_mid_stream_ends_the_call_with_unavailable(
    engines: Engines, router_for: StartRouter
) -> None:
    """The decode engine is held after a few steps (engine_site/step_gate.py), so that
    it is killed mid-stream on any machine: left running, a CPU engine on a loaded
    machine made all 800 tokens before its server had sent the first."""
    router = await router_for(pd_backends(engines))
    engines.decode.hold_after(HELD_AFTER)
    frames = router.client.generate(
        long_prompt("kill"), max_tokens=800, temperature=0.0, disaggregation="split"
    )

    async def read_then_kill() -> None:
        async for message in frames:
            assert not message.finish_reason, "finished before the engine was killed"
            if message.token_ids and engines.decode.process is not None:
                engines.decode.kill()

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await read_then_kill()
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "decode-0" in (failed.value.details() or "")
