"""Shared fixtures: in-process device servers and routers on 127.0.0.1, port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from backends.base import Role
from backends.mock.clock import LoopClock
from backends.mock.config import DeviceConfig
from backends.mock.server import DeviceServer
from router.client import AsyncRouterClient
from router.daemon import Daemon
from router.settings import BackendConfig, PoolConfig, Settings

if TYPE_CHECKING:  # the tracing extra: only its own tests load it
    from router.tracing import Tracing


@dataclass
class Cluster:
    devices: dict[str, DeviceServer]
    daemon: Daemon
    client: AsyncRouterClient

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.daemon.grpc_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.http_port}"

    def kv_in_use(self) -> dict[str, tuple[int, int]]:
        """KV tokens charged and leases held, per device."""
        return {
            name: (device.engine.load().kv_tokens_used, device.engine.load().kv_leases)
            for name, device in self.devices.items()
        }


DEFAULT_LAYOUT: Sequence[tuple[str, Role, str]] = (
    ("h100-0", Role.PREFILL, "h100"),
    ("h100-1", Role.PREFILL, "h100"),
    ("groq-0", Role.DECODE, "groq-lpu"),
    ("groq-1", Role.DECODE, "groq-lpu"),
)

_DEVICE_ROLES = {
    Role.PREFILL: (Role.PREFILL,),
    Role.DECODE: (Role.DECODE,),
    Role.BOTH: (Role.PREFILL, Role.DECODE),
}


async def start_cluster(
    layout: Sequence[tuple[str, Role, str]] = DEFAULT_LAYOUT,
    *,
    time_scale: float = 0.0,
    model: str = "llama-3.1-8b",
    device_options: dict[str, object] | None = None,
    handoff: str = "direct",
    per_device: dict[str, dict[str, object]] | None = None,
    clocks: dict[str, LoopClock] | None = None,
    tracing: Tracing | None = None,
    **settings: object,
) -> Cluster:
    devices: dict[str, DeviceServer] = {}
    backends = []
    for backend_id, role, profile in layout:
        device = DeviceServer(
            DeviceConfig(
                backend_id=backend_id,
                profile=profile,
                model=model,
                roles=_DEVICE_ROLES[role],
                time_scale=time_scale,
                **(device_options or {}),  # type: ignore[arg-type]  # tests pass any field
                **(per_device or {}).get(backend_id, {}),  # type: ignore[arg-type]  # same
            ),
            clock=(clocks or {}).get(backend_id),
        )
        await device.start("127.0.0.1:0")
        devices[backend_id] = device
        backends.append(
            BackendConfig(
                id=backend_id,
                kind="mock",
                address=device.address,
                role=role,
                model=model,
                profile=profile,
                handoff=handoff,  # type: ignore[arg-type]  # validated by pydantic
            )
        )
    # The adaptive limit follows wall-clock latency: on a loaded machine it would shed
    # the concurrent requests a test sends. Tests of the limit turn it on.
    options: dict[str, object] = {"drain_grace_s": 0.5, "adaptive_concurrency": False, **settings}
    config = Settings(
        grpc_address="127.0.0.1:0",
        http_address="127.0.0.1:0",
        **options,  # type: ignore[arg-type]  # validated by pydantic-settings
    )
    daemon = Daemon(config, PoolConfig(backends=tuple(backends)), tracing=tracing)
    await daemon.start()
    client = AsyncRouterClient(f"127.0.0.1:{daemon.grpc_port}", timeout_s=30)
    return Cluster(devices, daemon, client)


async def stop_cluster(cluster: Cluster) -> None:
    await cluster.client.close()
    await cluster.daemon.stop()
    for device in cluster.devices.values():
        await device.stop(grace_s=0)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    running = await start_cluster()
    try:
        yield running
    finally:
        await stop_cluster(running)
