"""A client that goes away mid-stream frees the engines: nothing runs on after it.

The evidence is the engines' own: the decode engine logs the request's abort, and the
engines' token count stops within ``STOPS_WITHIN`` of the hold below, far short of the
request's ``LONG`` tokens (an unaborted request makes them all). Left running, a CPU engine can make
those tokens before the abort lands (on a loaded 2-core machine one made all of them
before its own server had sent the first), so the decode engine is held: it may make
``HELD_AFTER`` steps, then its core waits (engine_site/step_gate.py) while its server
streams what was made. The client reads its first frame and goes away; the test waits
for the engine's log to show the abort and only then lets the engine go on, which
carries the abort out before its next step. Nothing here depends on the machine's
speed. (vLLM does not count a client's abort under ``finished_reason="abort"``, so
that counter cannot tell.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from bench.engines.servers import SERVED_MODEL, VllmServer
from tests.engines.conftest import Engines, StartRouter, backend, pd_backends

RUNNING = "vllm:num_requests_running"
GENERATED = "vllm:generation_tokens_total"
IDLE_WITHIN_S = 60.0  # a loaded CI machine; an unaborted LONG request ends sooner
ABORT_LOGGED_WITHIN_S = 30.0  # the router and the engine's server, on a loaded machine
LONG = 2000  # tokens: far more than a test waits for (max_model_len is 2048)
HELD_AFTER = 16  # steps the decode engine makes before it is held
# Tokens past the hold an aborted request may still make: the step the hold stopped, the
# prefill engine's one token in a split, and a few steps more should the engine core take
# the abort from its queue only after the release (a starved machine).
STOPS_WITHIN = 64


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


async def abort_logged(server: VllmServer, offset: int) -> bool:
    """Whether ``server`` logs, past ``offset``, that it aborted a request (the router
    gives the engine an id of its own, so the test's one request in flight is the one)."""
    deadline = time.monotonic() + ABORT_LOGGED_WITHIN_S
    while time.monotonic() < deadline:
        if "aborted" in server.logged_since(offset).lower():
            return True
        await asyncio.sleep(0.1)
    return False


DropMidStream = Callable[[], Awaitable[None]]


async def made_by_a_dropped_request(
    engines: Engines,
    servers: list[VllmServer],
    drop: DropMidStream,
    what: str,
    report: Callable[[str], None],
) -> float:
    """Holds the decode engine after ``HELD_AFTER`` steps, runs ``drop()`` (it starts a
    long request, reads its first frame and leaves), checks that the engine logs the
    abort, lets it go on and returns the tokens the engines made for the request."""
    decode = engines.decode
    before = await generated(servers)
    offset = decode.log_size()
    decode.hold_after(HELD_AFTER)
    try:
        await drop()
        aborted = await abort_logged(decode, offset)
    finally:
        decode.release()
    made = await generated_until_idle(servers) - before
    report(
        f"{what}: the engines generated {made:.0f} token{'' if made == 1 else 's'}, "
        f"the decode engine {'logged' if aborted else 'did not log'} the abort"
    )
    assert aborted, (
        f"{what}: the decode engine never logged the abort. Its log ends:\n{decode.log_tail()}"
    )
    return made


@pytest.mark.parametrize("mode", ["split", "colocated"])
async def test_grpc_cancel_aborts_the_engine(
    mode: str, engines: Engines, router_for: StartRouter, report: Callable[[str], None]
) -> None:
    router = await router_for(pd_backends(engines))

    async def drop() -> None:
        frames = router.client.generate(
            "def main():", max_tokens=LONG, temperature=0.0, disaggregation=mode
        )
        async for message in frames:
            if message.token_ids:
                break
        await frames.aclose()  # cancels the call

    made = await made_by_a_dropped_request(
        engines,
        [engines.prefill, engines.decode],
        drop,
        f"cancelled {mode} call after its first frame",
        report,
    )
    assert made <= HELD_AFTER + STOPS_WITHIN < LONG


async def test_http_disconnect_aborts_the_engine(
    engines: Engines, router_for: StartRouter, report: Callable[[str], None]
) -> None:
    router = await router_for([backend("lone", engines.decode, "both")])

    async def drop() -> None:
        body = {"model": SERVED_MODEL, "prompt": "def main():", "max_tokens": LONG, "stream": True}
        answer = await router.http.post(router.http_url + "/v1/completions", json=body)
        assert answer.status == 200
        async for line in answer.content:
            if line.startswith(b"data: {"):
                break
        answer.close()  # drops the connection mid-stream

    made = await made_by_a_dropped_request(
        engines, [engines.decode], drop, "dropped HTTP stream after its first event", report
    )
    assert made <= HELD_AFTER + STOPS_WITHIN < LONG
