"""Prefix-affinity hit rate of router replicas, with and without the engines' KV events.

Two mock devices (both roles, a prefix cache each, KV events on free ports) behind
one router, or behind two replicas that a round-robin client alternates between.
Traffic: a few long shared prefixes (system prompts) in turn, each request with its
own suffix, one at a time, served colocated. A request *hits* when the device it
reached had its prefix cached: the devices' own ``prefix_hit_tokens`` rose. With
events, each request waits (bounded) for every replica's index to hold its prompt
before the next goes: the events have landed, as they do within milliseconds in
service; without events there is nothing to wait for.

``python -m bench.replicas`` prints the three hit rates; the integration test
``tests/integration/test_kv_events_replicas.py`` asserts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from backends.base import Role
from backends.mock.config import DeviceConfig
from backends.mock.server import DeviceServer
from backends.prefix import block_hashes
from router.client import AsyncRouterClient
from router.console import render, table
from router.daemon import Daemon
from router.settings import BackendConfig, KVEventsConfig, PoolConfig, Settings

MODEL = "llama-3.1-8b"
PREFIXES = 5
ROUNDS = 4
EVENT_WAIT_S = 10.0


def prompts(prefixes: int = PREFIXES, rounds: int = ROUNDS) -> list[str]:
    """``rounds`` turns over ``prefixes`` system prompts (~400 bytes), each its own tail."""
    heads = [
        f"tenant {k}: " + " ".join(f"rule {k}.{i} holds." for i in range(24))
        for k in range(prefixes)
    ]
    return [f"{heads[k]}\nquestion {turn}-{k}?" for turn in range(rounds) for k in range(prefixes)]


@dataclass(frozen=True)
class HitRate:
    label: str
    hits: int
    requests: int

    @property
    def rate(self) -> float:
        return self.hits / self.requests


@contextlib.asynccontextmanager
async def _devices(count: int) -> AsyncIterator[list[DeviceServer]]:
    devices = [
        DeviceServer(
            DeviceConfig(
                backend_id=f"dev-{k}",
                profile="h100",
                model=MODEL,
                roles=(Role.PREFILL, Role.DECODE),
                time_scale=0.0,
                prefix_cache_blocks=4096,
                kv_events_port=0,
                kv_events_topic="kv-events",
            )
        )
        for k in range(count)
    ]
    try:
        for device in devices:
            await device.start("127.0.0.1:0")
        yield devices
    finally:
        for device in devices:
            await device.stop(0)


def _pool(devices: Sequence[DeviceServer], events: bool) -> PoolConfig:
    backends = []
    for device in devices:
        published = device.kv_events
        kv_events = (
            KVEventsConfig(
                endpoint=published.endpoint,
                replay_endpoint=published.replay_endpoint,
                topic="kv-events",
            )
            if events and published is not None
            else None
        )
        backends.append(
            BackendConfig(
                id=device.config.backend_id,
                address=device.address,
                role=Role.BOTH,
                model=MODEL,
                profile="h100",
                kv_events=kv_events,
            )
        )
    return PoolConfig(backends=tuple(backends))


def _settings() -> Settings:
    # One health check at start (empty caches): load reports must not stand in for events.
    return Settings(
        grpc_address="127.0.0.1:0",
        http_address="127.0.0.1:0",
        health_interval_s=3600.0,
        drain_grace_s=0.0,
    )


async def _holds_everywhere(daemons: Sequence[Daemon], prompt: str) -> None:
    """Until every replica's index has the prompt's blocks on some backend."""
    hashes = block_hashes(prompt)
    deadline = time.monotonic() + EVENT_WAIT_S
    while not all(
        max(d.pool.prefix_index.matched_blocks(hashes).values(), default=0) == len(hashes)
        for d in daemons
    ):
        if time.monotonic() > deadline:
            raise TimeoutError("KV events did not reach every replica in time")
        await asyncio.sleep(0.005)


async def measure(label: str, replicas: int, events: bool, rounds: int = ROUNDS) -> HitRate:
    """The hit rate of the traffic through ``replicas`` routers on fresh devices."""
    async with _devices(2) as devices:
        daemons = [Daemon(_settings(), _pool(devices, events)) for _ in range(replicas)]
        clients: list[AsyncRouterClient] = []
        try:
            for daemon in daemons:
                await daemon.start()
                clients.append(AsyncRouterClient(f"127.0.0.1:{daemon.grpc_port}"))
            if events:  # every subscription caught up (so none misses a first batch)
                await _subscribed(daemons)
            hits, traffic = 0, prompts(rounds=rounds)
            for turn, prompt in enumerate(traffic):
                before = sum(d.engine.prefix_hit_tokens for d in devices)
                client = clients[turn % replicas]  # round robin in front of the replicas
                async for _ in client.generate(
                    prompt, max_tokens=2, temperature=0.0, disaggregation="colocated"
                ):
                    pass
                hits += sum(d.engine.prefix_hit_tokens for d in devices) > before
                if events:
                    await _holds_everywhere(daemons, prompt)
            return HitRate(label, hits, len(traffic))
        finally:
            for client in clients:
                await client.close()
            for daemon in daemons:
                await daemon.stop()


async def _subscribed(daemons: Sequence[Daemon]) -> None:
    deadline = time.monotonic() + EVENT_WAIT_S
    subscriptions = [s for d in daemons for s in d.pool.kv_events.subscriptions.values()]
    while not all(s.caught_up for s in subscriptions):
        if time.monotonic() > deadline:
            raise TimeoutError("KV event subscriptions did not catch up in time")
        await asyncio.sleep(0.005)


async def run_all() -> list[HitRate]:
    return [
        await measure("one router", 1, events=False),
        await measure("two replicas, KV events", 2, events=True),
        await measure("two replicas, no events", 2, events=False),
    ]


def main() -> None:
    numbers = ("hit rate", "hits", "requests")
    grid = table("routers", *numbers, numeric=numbers)
    for result in asyncio.run(run_all()):
        grid.add_row(result.label, f"{result.rate:.2f}", str(result.hits), str(result.requests))
    print(render(grid))


if __name__ == "__main__":
    main()
