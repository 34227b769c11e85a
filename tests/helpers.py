"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import Role
from backends.mock.clock import LoopClock
from bench.fake_vllm import FakeVllm
from router.daemon import Daemon
from router.settings import BackendConfig, PoolConfig, Settings


def sample_total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (a
    subset: the route labels a test does not care about are summed over)."""
    return sum(
        sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Waits for an asynchronous effect (an abort landing, a lease expiring) with a bound."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within timeout")
        await asyncio.sleep(0.005)


class GatedClock(LoopClock):
    """Device time that advances one iteration per step the test lets through, until
    opened: the test knows exactly how many tokens a stream has made."""

    def __init__(self) -> None:
        self._steps = asyncio.Semaphore(0)
        self._open = False
        self._waiting = 0

    def step(self, count: int = 1) -> None:
        for _ in range(count):
            self._steps.release()

    def open(self) -> None:
        self._open = True
        self.step(self._waiting)

    async def sleep_until(self, deadline: float) -> None:
        if self._open:
            return
        self._waiting += 1
        try:
            await self._steps.acquire()
        finally:
            self._waiting -= 1


@dataclass
class Stream:
    """What one client got: every message, in order."""

    messages: list[router_pb2.GenerateResponse] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return [t for m in self.messages for t in m.token_ids]

    @property
    def text(self) -> str:
        return "".join(m.text for m in self.messages)

    @property
    def route(self) -> router_pb2.Route:
        return self.messages[0].route

    @property
    def last(self) -> router_pb2.GenerateResponse:
        return self.messages[-1]


@contextlib.asynccontextmanager
async def vllm_split_router(
    model: str, served_model: str
) -> AsyncIterator[tuple[Daemon, FakeVllm, FakeVllm]]:
    """A router on port 0 over a prefill (``p``) and a decode (``d``) fake vLLM engine
    serving ``served_model`` as the pool's ``model``; the decode one also serves
    colocated requests. Yields the router and the two engines."""
    issued: dict[str, dict[str, object]] = {}  # the decode engine reads the prefill's KV
    prefill, decode = FakeVllm(issued=issued), FakeVllm(issued=issued)
    async with contextlib.AsyncExitStack() as stack:
        for engine in (prefill, decode):
            await engine.start()
            stack.push_async_callback(engine.stop)
        daemon = await _started(model, served_model, prefill, decode)
        stack.push_async_callback(daemon.stop)
        yield daemon, prefill, decode


async def _started(model: str, served_model: str, prefill: FakeVllm, decode: FakeVllm) -> Daemon:
    backends = tuple(
        BackendConfig(
            id=backend_id,
            kind="vllm",
            address=engine.address,
            role=role,
            model=model,
            options={"model": served_model},
        )
        for backend_id, role, engine in (("p", Role.PREFILL, prefill), ("d", Role.DECODE, decode))
    )
    settings = Settings(grpc_address="127.0.0.1:0", http_address="127.0.0.1:0", drain_grace_s=0)
    daemon = Daemon(settings, PoolConfig(backends=backends))
    await daemon.start()
    return daemon
