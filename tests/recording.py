"""A router in process over one recording backend: what reached a backend is the list of
requests it was given. For tests of the gRPC door that must show a refusal reached none."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from prometheus_client import CollectorRegistry

from backends import registry
from backends._gen.hetero.router.v1 import router_pb2
from backends.base import GenerationRequest, Role
from router.daemon import Daemon
from router.settings import BackendConfig, PoolConfig, Settings
from tests.stubs import StubBackend

if TYPE_CHECKING:  # the tracing extra: only its own tests load it
    from router.tracing import Tracing

MODEL = "m"


class Recorder(StubBackend):
    """Serves every request with one token, and keeps the requests it was given."""

    served: ClassVar[list[GenerationRequest]] = []

    async def generate(
        self, request: GenerationRequest, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        Recorder.served.append(request)
        yield router_pb2.GenerateResponse(token_ids=[7], text="ok").SerializeToString()
        done = router_pb2.GenerateResponse(finish_reason=router_pb2.FINISH_REASON_STOP)
        done.usage.completion_tokens = 1
        yield done.SerializeToString()


@contextlib.asynccontextmanager
async def stub_router(
    monkeypatch: pytest.MonkeyPatch,
    adapter: type[StubBackend],
    tracing: Tracing | None = None,
    **settings: Any,
) -> AsyncIterator[Daemon]:
    """A started router whose one backend, serving MODEL, is an ``adapter``."""
    kind = adapter.__name__.lower()
    monkeypatch.setattr(registry, "_ADAPTERS", {**registry._ADAPTERS, kind: adapter})
    pool = PoolConfig(
        backends=(BackendConfig(id="r", kind=kind, address="h:1", role=Role.BOTH, model=MODEL),)
    )
    config = Settings(
        grpc_address="127.0.0.1:0", http_address="127.0.0.1:0", drain_grace_s=0, **settings
    )
    daemon = Daemon(config, pool, CollectorRegistry(), tracing=tracing)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


@contextlib.asynccontextmanager
async def recording_router(
    monkeypatch: pytest.MonkeyPatch, tracing: Tracing | None = None, **settings: Any
) -> AsyncIterator[Daemon]:
    """A started router whose one backend, serving MODEL, is a Recorder."""
    Recorder.served = []
    async with stub_router(monkeypatch, Recorder, tracing, **settings) as daemon:
        yield daemon


def outcomes(daemon: Daemon) -> dict[str, float]:
    """Generate requests counted, by outcome (any mode)."""
    counted: dict[str, float] = {}
    for metric in daemon.registry.collect():
        for sample in metric.samples:
            if sample.name == "hetero_router_requests_total" and sample.value:
                outcome = sample.labels["outcome"]
                counted[outcome] = counted.get(outcome, 0.0) + sample.value
    return counted
