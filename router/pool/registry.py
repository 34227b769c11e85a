"""The endpoint registry: one entry per backend of the pool file, with live state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from backends import registry as adapters
from backends.base import Backend, KVLayout
from router.errors import ConfigError
from router.metrics import RouterMetrics
from router.pool.snapshot import BackendView, PoolSnapshot
from router.settings import BackendConfig, PoolConfig


@dataclass
class Endpoint:
    config: BackendConfig
    backend: Backend
    healthy: bool = False
    detail: str = "not checked yet"
    outstanding: int = 0
    layout: KVLayout | None = None

    def view(self) -> BackendView:
        return BackendView(
            id=self.config.id,
            kind=self.config.kind,
            address=self.config.address,
            role=self.config.role,
            model=self.config.model,
            profile=self.config.profile,
            healthy=self.healthy,
            outstanding=self.outstanding,
            detail=self.detail,
            handoff=self.backend.capabilities.handoff_modes,
            wants_relay=self.config.handoff == "relay",
            kv_shape=(
                (self.layout.layers, self.layout.kv_heads, self.layout.head_dim, self.layout.dtype)
                if self.layout is not None
                else None
            ),
        )


class Pool:
    def __init__(self, config: PoolConfig, metrics: RouterMetrics) -> None:
        self.config = config
        self._metrics = metrics
        self.endpoints: dict[str, Endpoint] = {}
        for backend_config in config.backends:
            try:
                backend = adapters.create(
                    backend_config.kind,
                    backend_config.id,
                    backend_config.address,
                    backend_config.options,
                )
            except ValueError as error:
                raise ConfigError(f"backend {backend_config.id}: {error}") from error
            if backend_config.role not in backend.capabilities.roles:
                roles = ", ".join(sorted(role.value for role in backend.capabilities.roles))
                raise ConfigError(
                    f"backend {backend_config.id}: a {backend_config.kind} backend cannot take "
                    f"the role {backend_config.role.value!r} (it can take: {roles})"
                )
            self.endpoints[backend_config.id] = Endpoint(backend_config, backend)
        self._snapshot: PoolSnapshot | None = None

    @property
    def models(self) -> list[str]:
        return self.config.models

    async def start(self) -> None:
        for endpoint in self.endpoints.values():
            await endpoint.backend.start()

    async def close(self) -> None:
        for endpoint in self.endpoints.values():
            await endpoint.backend.close()

    def backend(self, backend_id: str) -> Backend:
        return self.endpoints[backend_id].backend

    def snapshot(self) -> PoolSnapshot:
        """The current view; rebuilt only when something changed since the last call."""
        if self._snapshot is None:
            self._snapshot = PoolSnapshot(tuple(e.view() for e in self.endpoints.values()))
        return self._snapshot

    def set_health(
        self, backend_id: str, healthy: bool, detail: str, layout: KVLayout | None
    ) -> None:
        endpoint = self.endpoints[backend_id]
        if (endpoint.healthy, endpoint.detail, endpoint.layout) != (healthy, detail, layout):
            endpoint.healthy, endpoint.detail, endpoint.layout = healthy, detail, layout
            self._snapshot = None
        self._metrics.backend_healthy.labels(backend_id, endpoint.config.role.value).set(healthy)

    @contextlib.contextmanager
    def outstanding(self, backend_id: str) -> Iterator[Backend]:
        """Counts a request as in flight on the backend while the block runs."""
        endpoint = self.endpoints[backend_id]
        gauge = self._metrics.backend_outstanding.labels(backend_id)
        endpoint.outstanding += 1
        self._snapshot = None
        gauge.inc()
        try:
            yield endpoint.backend
        finally:
            endpoint.outstanding -= 1
            self._snapshot = None
            gauge.dec()

    def layouts_compatible(self, prefill_id: str, decode_id: str) -> bool:
        """False only when both layouts are known and differ."""
        prefill = self.endpoints[prefill_id].layout
        decode = self.endpoints[decode_id].layout
        return prefill is None or decode is None or prefill == decode
