"""Request ids: a client's id names its request to the client and in logs, never to a
backend. A second request that reuses an in-flight request's id, by accident or to
hijack it, is served as a request of its own, and the first is unharmed."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import Role
from tests.conftest import start_cluster, stop_cluster
from tests.helpers import GatedClock, Stream, eventually

PROMPT = "Tell me a long story about a fox. "
ONE_DEVICE = (("h100-0", Role.BOTH, "h100"),)


async def test_a_second_request_with_an_in_flight_id_leaves_the_first_unharmed() -> None:
    clock = GatedClock()
    cluster = await start_cluster(ONE_DEVICE, clocks={"h100-0": clock}, stall_timeout_s=60)
    sampling: dict[str, object] = {"max_tokens": 16, "temperature": 0, "seed": 3}
    try:
        clock.open()
        expected = Stream()
        async for message in cluster.client.generate(PROMPT, **sampling):
            expected.messages.append(message)
        clock = cluster.devices["h100-0"].engine.clock = GatedClock()

        victim = Stream()

        async def consume(stream: Stream, request_id: str, **options: object) -> None:
            async for message in cluster.client.generate(PROMPT, request_id=request_id, **options):
                stream.messages.append(message)

        victim_task = asyncio.create_task(consume(victim, "victim-id", **sampling))
        while len(victim.token_ids) < 3:  # the victim is mid-stream on the device
            clock.step()
            count = len(victim.token_ids)
            await eventually(lambda count=count: len(victim.token_ids) > count)  # type: ignore[misc]  # bound default
        attacker = Stream()
        attack = asyncio.create_task(
            consume(attacker, "victim-id", max_tokens=4, temperature=0, seed=3)
        )
        await eventually(lambda: cluster.devices["h100-0"].service.requests_received >= 3)
        clock.open()
        await asyncio.wait_for(asyncio.gather(victim_task, attack), 30)

        assert victim.token_ids == expected.token_ids  # all 16, none lost
        assert victim.last.finish_reason == router_pb2.FINISH_REASON_LENGTH
        assert attacker.token_ids == expected.token_ids[:4]  # served too, as its own request
        # Both are known to their clients by the id they sent.
        assert victim.route.request_id == attacker.route.request_id == "victim-id"
        await eventually(lambda: cluster.kv_in_use()["h100-0"] == (0, 0))
    finally:
        await stop_cluster(cluster)


async def test_backends_see_the_routers_ids_and_clients_their_own() -> None:
    cluster = await start_cluster(ONE_DEVICE)
    seen: list[str] = []
    device = cluster.devices["h100-0"]
    original = device.engine.generate

    def recording(request_id: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(request_id)
        return original(request_id, *args, **kwargs)

    device.engine.generate = recording  # type: ignore[method-assign]  # spying on the engine
    try:
        url = f"{cluster.admin_url}/v1/completions"
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.post(
                    url,
                    json={"prompt": PROMPT, "max_tokens": 2},
                    headers={"X-Request-Id": "mine"},
                ) as response:
                    assert response.status == 200
                    assert response.headers["X-Request-Id"] == "mine"
                    assert (await response.json())["id"] == "cmpl-mine"
        assert len(seen) == 2
        assert len(set(seen)) == 2
        assert "mine" not in seen
    finally:
        await stop_cluster(cluster)
