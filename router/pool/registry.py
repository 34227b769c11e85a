"""The endpoint registry: one entry per backend of the pool file, with live state."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType

from backends import registry as adapters
from backends.base import Backend, BackendLoad, KVLayout
from router.errors import ConfigError
from router.logging import get_logger
from router.metrics import RouterMetrics
from router.pool.kv_block_map import block_map_for
from router.pool.kv_events import KVEventFeed
from router.pool.outlier import OutlierDetector
from router.scheduling.perf import DevicePerf, perf_for
from router.scheduling.prefix import DEFAULT_BLOCKS_PER_BACKEND, PrefixIndex
from router.scheduling.snapshot import BackendView, PoolSnapshot
from router.settings import BackendConfig, PoolConfig

log = get_logger(__name__)


@dataclass
class Endpoint:
    config: BackendConfig
    backend: Backend
    healthy: bool = False  # as the health checks say
    detail: str = "not checked yet"
    # Out of service for failing requests in a row (passive outlier detection), whatever
    # the health checks say, until its ejection is over.
    ejected: bool = False
    outstanding: int = 0
    layout: KVLayout | None = None
    # Load as this router sees it (see BackendView).
    queued_prefill_tokens: int = 0
    running: int = 0
    context_tokens: int = 0
    # As the backend last reported it (0: not reported).
    kv_tokens_used: int = 0
    kv_tokens_capacity: int = 0
    perf: DevicePerf | None = None

    @property
    def in_service(self) -> bool:
        return self.healthy and not self.ejected

    def view(self) -> BackendView:
        return BackendView(
            id=self.config.id,
            kind=self.config.kind,
            address=self.config.address,
            role=self.config.role,
            model=self.config.model,
            profile=self.config.profile,
            healthy=self.in_service,
            outstanding=self.outstanding,
            detail=f"ejected: failed requests in a row ({self.detail})"
            if self.ejected
            else self.detail,
            handoff=self.backend.capabilities.handoff_modes,
            wants_relay=self.config.handoff == "relay",
            kv_shape=(
                (self.layout.layers, self.layout.kv_heads, self.layout.head_dim, self.layout.dtype)
                if self.layout is not None
                else None
            ),
            queued_prefill_tokens=self.queued_prefill_tokens,
            running=self.running,
            context_tokens=self.context_tokens,
            kv_tokens_used=self.kv_tokens_used,
            kv_tokens_capacity=self.kv_tokens_capacity,
            perf=self.perf,
        )


def _perf(config: BackendConfig) -> DevicePerf | None:
    """The performance model of the backend's hardware (``chips`` of ``profile``)."""
    try:
        return perf_for(config.profile, config.model, config.chips)
    except ValueError as error:
        raise ConfigError(f"backend {config.id}: {error}") from error


# (backend id, prefill tokens, running sequences, context tokens) added to its load
AddLoad = Callable[[str, int, int, int], None]


class LoadCharge:
    """One request's share of a backend's load: added on entry, removed once.

    ``release()`` removes it early (a prefill whose first token is out); leaving the
    ``with`` block removes it otherwise, whatever ended the block.
    """

    def __init__(
        self, add: AddLoad, backend_id: str, prefill_tokens: int, running: int, context_tokens: int
    ) -> None:
        self._add = add
        self._backend_id = backend_id
        self._amounts = (prefill_tokens, running, context_tokens)
        self._held = False

    def __enter__(self) -> LoadCharge:
        self._add(self._backend_id, *self._amounts)
        self._held = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        if self._held:
            self._held = False
            prefill_tokens, running, context_tokens = self._amounts
            self._add(self._backend_id, -prefill_tokens, -running, -context_tokens)


class Pool:
    def __init__(
        self,
        config: PoolConfig,
        metrics: RouterMetrics,
        *,
        prefix_index_blocks_per_backend: int = DEFAULT_BLOCKS_PER_BACKEND,
        outliers: Callable[[Iterable[tuple[str, tuple[str, str]]]], OutlierDetector] | None = None,
    ) -> None:
        """``outliers`` builds the outlier detector from (backend id, (role, model)) pairs;
        None: Envoy's defaults."""
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
            self.endpoints[backend_config.id] = Endpoint(
                backend_config, backend, perf=_perf(backend_config)
            )
        # Block hashes each backend was sent or reports cached, shared with every snapshot.
        self.prefix_index = PrefixIndex(prefix_index_blocks_per_backend)
        # The backends' own KV cache events feed the index too (those that publish them).
        self.kv_events = KVEventFeed(self.prefix_index)
        for backend_config in config.backends:
            if backend_config.kv_events is not None:  # a bad tokenizer file fails here
                try:
                    block_map_for(backend_config.kv_events.tokenizer)
                except ConfigError as error:
                    raise ConfigError(f"backend {backend_config.id}: {error}") from None
        # Views are rebuilt one backend at a time, only for backends whose state changed.
        self._views = {backend_id: e.view() for backend_id, e in self.endpoints.items()}
        self._stale: set[str] = set()
        self._snapshot: PoolSnapshot | None = None
        groups = [(b.id, (b.role.value, b.model)) for b in config.backends]
        self.outliers = (outliers or OutlierDetector)(groups)
        # Called when a backend leaves service (a failed health check, an ejection): the
        # legs in flight on it fail over at once instead of waiting for a deadline.
        self._leaving: dict[str, set[Callable[[], None]]] = {b.id: set() for b in config.backends}
        self._health_listeners: list[Callable[[], None]] = []

    @property
    def models(self) -> list[str]:
        return self.config.models

    async def start(self) -> None:
        for endpoint in self.endpoints.values():
            await endpoint.backend.start()
            self._follow_kv_events(endpoint.config)

    async def close(self) -> None:
        await self.kv_events.close()
        for endpoint in self.endpoints.values():
            await endpoint.backend.close()

    def _follow_kv_events(self, config: BackendConfig) -> None:
        """Subscribes to the backend's KV cache events, if its entry names them (a
        backend that joins later calls this too; one that leaves, ``kv_events.unsubscribe``)."""
        if config.kv_events is not None:
            self.kv_events.subscribe(config.id, config.kv_events)

    def backend(self, backend_id: str) -> Backend:
        return self.endpoints[backend_id].backend

    def snapshot(self) -> PoolSnapshot:
        """The current view; only the backends that changed since the last call are rebuilt."""
        if self._snapshot is None:
            for backend_id in self._stale:
                self._views[backend_id] = self.endpoints[backend_id].view()
            self._stale.clear()
            self._snapshot = PoolSnapshot(tuple(self._views.values()), self.prefix_index)
        return self._snapshot

    def on_health_change(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs after each change of a backend's health (detail and KV
        layout included) or ejection."""
        self._health_listeners.append(listener)

    def _health_changed(self) -> None:
        for listener in self._health_listeners:
            listener()

    def _changed(self, backend_id: str) -> None:
        self._stale.add(backend_id)
        self._snapshot = None

    def set_health(
        self, backend_id: str, healthy: bool, detail: str, layout: KVLayout | None
    ) -> None:
        endpoint = self.endpoints[backend_id]
        leaving = endpoint.healthy and not healthy
        if leaving:
            # Whatever it cached may be gone when it comes back (a restart).
            self.prefix_index.forget(backend_id)
        if (endpoint.healthy, endpoint.detail, endpoint.layout) != (healthy, detail, layout):
            endpoint.healthy, endpoint.detail, endpoint.layout = healthy, detail, layout
            self._changed(backend_id)
            self._health_changed()
        self._metrics.backend_healthy.labels(backend_id, endpoint.config.role.value).set(healthy)
        if leaving and not endpoint.ejected:
            self._left_service(backend_id)

    # -- passive outlier detection ---------------------------------------------------

    def record_success(self, backend_id: str) -> None:
        """A leg on the backend served its request."""
        self.outliers.succeeded(backend_id)

    def record_failure(self, backend_id: str) -> None:
        """A leg on the backend failed (an error, a stall): enough in a row eject it."""
        duration = self.outliers.failed(backend_id)
        if duration is None:
            return
        endpoint = self.endpoints[backend_id]
        log.warning(
            "backend ejected: requests failed in a row",
            backend=backend_id,
            failures=self.outliers.consecutive_failures,
            ejection_s=duration,
        )
        self._metrics.outlier_ejections.labels(backend_id).inc()
        self._metrics.backend_ejected.labels(backend_id).set(1)
        endpoint.ejected = True  # (it was not: the detector never ejects twice)
        self._changed(backend_id)
        self._health_changed()
        if endpoint.healthy:
            self._left_service(backend_id)

    def end_ejections(self) -> None:
        """Returns the backends whose ejection is over to service (the health checker
        calls it on every round)."""
        for backend_id in self.outliers.returning():
            log.info("backend ejection over", backend=backend_id)
            self.endpoints[backend_id].ejected = False
            self._metrics.backend_ejected.labels(backend_id).set(0)
            self._changed(backend_id)
            self._health_changed()

    @contextlib.contextmanager
    def watching(self, backend_id: str, on_leave: Callable[[], None]) -> Iterator[None]:
        """Calls ``on_leave`` if the backend leaves service while the block runs."""
        callbacks = self._leaving[backend_id]
        callbacks.add(on_leave)
        try:
            yield
        finally:
            callbacks.discard(on_leave)

    def in_service(self, backend_id: str) -> bool:
        return self.endpoints[backend_id].in_service

    def _left_service(self, backend_id: str) -> None:
        for callback in list(self._leaving[backend_id]):
            callback()

    def device_kind(self, backend_id: str) -> str:
        """What the backend runs on, for metrics: its profile (``h100``), else its
        adapter's kind (``vllm``)."""
        config = self.endpoints[backend_id].config
        return config.profile or config.kind

    def set_load(self, backend_id: str, load: BackendLoad) -> None:
        """What the backend reports: KV use, and the prefix blocks it holds cached."""
        endpoint = self.endpoints[backend_id]
        metrics = self._metrics
        if load.kv_tokens_capacity > 0:
            metrics.backend_kv_cache_usage.labels(backend_id, self.device_kind(backend_id)).set(
                load.kv_tokens_used / load.kv_tokens_capacity
            )
        metrics.backend_running.labels(backend_id).set(load.running)
        metrics.backend_waiting.labels(backend_id).set(load.waiting)
        reported = (load.kv_tokens_used, load.kv_tokens_capacity)
        if (endpoint.kv_tokens_used, endpoint.kv_tokens_capacity) != reported:
            endpoint.kv_tokens_used, endpoint.kv_tokens_capacity = reported
            self._changed(backend_id)
        if load.cached_prefix_hashes:
            self.prefix_index.record(backend_id, load.cached_prefix_hashes)

    def record_prefix(self, backend_id: str, hashes: Iterable[int]) -> None:
        """The backend was sent a prompt with these block hashes: it holds their KV now."""
        self.prefix_index.record(backend_id, hashes)

    @contextlib.contextmanager
    def outstanding(self, backend_id: str) -> Iterator[Backend]:
        """Counts a request as in flight on the backend while the block runs."""
        endpoint = self.endpoints[backend_id]
        gauge = self._metrics.backend_outstanding.labels(backend_id)
        endpoint.outstanding += 1
        self._changed(backend_id)
        gauge.inc()
        try:
            yield endpoint.backend
        finally:
            endpoint.outstanding -= 1
            self._changed(backend_id)
            gauge.dec()

    def prefilling(self, backend_id: str, prompt_tokens: int) -> LoadCharge:
        """``prompt_tokens`` queued for prefill on the backend until released."""
        return LoadCharge(self._add_load, backend_id, prompt_tokens, 0, 0)

    def decoding(self, backend_id: str, context_tokens: int) -> LoadCharge:
        """One sequence decoding on the backend, reserving ``context_tokens`` of KV."""
        return LoadCharge(self._add_load, backend_id, 0, 1, context_tokens)

    def _add_load(
        self, backend_id: str, prefill_tokens: int, running: int, context_tokens: int
    ) -> None:
        endpoint = self.endpoints[backend_id]
        endpoint.queued_prefill_tokens += prefill_tokens
        endpoint.running += running
        endpoint.context_tokens += context_tokens
        self._changed(backend_id)

    def layouts_compatible(self, prefill_id: str, decode_id: str) -> bool:
        """False only when both layouts are known and differ."""
        prefill = self.endpoints[prefill_id].layout
        decode = self.endpoints[decode_id].layout
        return prefill is None or decode is None or prefill == decode
