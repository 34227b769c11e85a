"""The endpoint registry: one entry per backend, with live state.

Membership changes through one reconciler, ``Pool.apply(desired backends)``: fixed
entries of the pool file, discovered endpoints and reloaded files all feed it. A
backend added is out of service until its first passing health check; a backend
removed drains: it takes no new request, its streams in flight may finish for
``drain_timeout_s``, then those left fail over (the dispatcher resumes them
elsewhere), its adapter is closed and its state and metric series are dropped. A
backend whose settings changed drains, then comes back under the same id with the
new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from prometheus_client import Gauge

from backends import registry as adapters
from backends.base import Backend, BackendLoad, KVLayout
from backends.errors import BackendError
from router.errors import ConfigError
from router.logging import get_logger
from router.metrics import RouterMetrics
from router.pool.kv_block_map import block_map_for
from router.pool.kv_events import FeedCollector, KVEventFeed
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
    # Leaving the pool: no new requests, those in flight finish (see Pool.apply).
    draining: bool = False
    # Set while nothing is in flight on it (what a drain waits for).
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def in_service(self) -> bool:
        return self.healthy and not self.ejected and not self.draining

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
            detail=self._shown_detail(),
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

    def _shown_detail(self) -> str:
        if self.draining:
            return f"draining: leaving the pool ({self.detail})"
        if self.ejected:
            return f"ejected: failed requests in a row ({self.detail})"
        return self.detail


def build_endpoint(config: BackendConfig) -> Endpoint:
    """The endpoint of one backend, its adapter made but not started; ConfigError names
    the backend when its kind is unknown, its options wrong, or its role one the
    adapter cannot take."""
    try:
        backend = adapters.create(config.kind, config.id, config.address, config.options)
    except ValueError as error:
        raise ConfigError(f"backend {config.id}: {error}") from error
    if config.role not in backend.capabilities.roles:
        roles = ", ".join(sorted(role.value for role in backend.capabilities.roles))
        raise ConfigError(
            f"backend {config.id}: a {config.kind} backend cannot take "
            f"the role {config.role.value!r} (it can take: {roles})"
        )
    if config.kv_events is not None:  # a bad tokenizer file fails here
        try:
            block_map_for(config.kv_events.tokenizer)
        except ConfigError as error:
            raise ConfigError(f"backend {config.id}: {error}") from None
    return Endpoint(config, backend, perf=_perf(config))


def _perf(config: BackendConfig) -> DevicePerf | None:
    """The performance model of the backend's hardware (``chips`` of ``profile``)."""
    try:
        return perf_for(config.profile, config.model, config.chips)
    except ValueError as error:
        raise ConfigError(f"backend {config.id}: {error}") from error


# (backend id, prefill tokens, running sequences, context tokens) added to its load
AddLoad = Callable[[str, int, int, int], None]


class Outstanding:
    """A request in flight on one backend, counted from entry to exit (a plain class,
    not a generator: two a leg, on every request)."""

    __slots__ = ("_backend_id", "_changed", "_endpoint", "_endpoints", "_gauge")

    def __init__(
        self,
        endpoints: Mapping[str, Endpoint],
        backend_id: str,
        gauge: Gauge,
        changed: Callable[[str], None],
    ) -> None:
        self._endpoints = endpoints
        self._endpoint = endpoints[backend_id]
        self._backend_id = backend_id
        self._gauge = gauge
        self._changed = changed

    def __enter__(self) -> Backend:
        endpoint = self._endpoint
        endpoint.outstanding += 1
        endpoint.idle.clear()
        self._changed(self._backend_id)
        self._gauge.inc()
        return endpoint.backend

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        endpoint = self._endpoint
        endpoint.outstanding -= 1
        if endpoint.outstanding == 0:
            endpoint.idle.set()
        if self._backend_id in self._endpoints:
            self._changed(self._backend_id)
            self._gauge.dec()


class Watching:
    """``on_leave`` among a backend's leaving callbacks while the block runs; called at
    once when the backend has none (it has left the pool)."""

    __slots__ = ("_callbacks", "_on_leave")

    def __init__(
        self, callbacks: set[Callable[[], None]] | None, on_leave: Callable[[], None]
    ) -> None:
        self._callbacks = callbacks
        self._on_leave = on_leave

    def __enter__(self) -> None:
        if self._callbacks is None:
            self._on_leave()
        else:
            self._callbacks.add(self._on_leave)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._callbacks is not None:
            self._callbacks.discard(self._on_leave)


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
        drain_timeout_s: float = 30.0,
    ) -> None:
        """``outliers`` builds the outlier detector from (backend id, (role, model)) pairs;
        None: Envoy's defaults. The backends at fixed addresses of ``config`` are members
        from the start (ConfigError for one that cannot be made); others join by
        ``apply``. ``drain_timeout_s``: how long a removed backend's streams may finish."""
        self.config = config
        self._metrics = metrics
        self.drain_timeout_s = drain_timeout_s
        self.endpoints: dict[str, Endpoint] = {c.id: build_endpoint(c) for c in config.backends}
        # Block hashes each backend was sent or reports cached, shared with every snapshot.
        self.prefix_index = PrefixIndex(prefix_index_blocks_per_backend)
        # The backends' own KV cache events feed the index too (those that publish them).
        self.kv_events = KVEventFeed(self.prefix_index)
        metrics.registry.register(FeedCollector(self.kv_events))
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
        self._added_listeners: list[Callable[[Endpoint], None]] = []
        self._removed_listeners: list[Callable[[str], None]] = []
        # What apply() was last asked for (a backend replaced joins once the old one left).
        self._desired: dict[str, BackendConfig] = {c.id: c for c in config.backends}
        self._drains: dict[str, asyncio.Task[None]] = {}
        self._applying = asyncio.Lock()
        self._closed = False

    @property
    def models(self) -> list[str]:
        """The models the pool file names and those its current backends serve."""
        served = {e.config.model for e in self.endpoints.values()}
        return sorted(served.union(self.config.models))

    @property
    def default_model(self) -> str:
        """The model of a request that names none."""
        if self.config.default_model:
            return self.config.default_model
        models = self.models
        return models[0] if models else ""

    async def start(self) -> None:
        for endpoint in self.endpoints.values():
            await endpoint.backend.start()
            self._follow_kv_events(endpoint.config)

    async def close(self) -> None:
        self._closed = True
        drains = list(self._drains.values())
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)
        await self.kv_events.close()
        for endpoint in self.endpoints.values():
            await endpoint.backend.close()

    def _follow_kv_events(self, config: BackendConfig) -> None:
        """Subscribes to the backend's KV cache events, if its entry names them (a
        backend that joins later calls this too; one that leaves, ``kv_events.unsubscribe``)."""
        if config.kv_events is not None:
            self.kv_events.subscribe(config.id, config.kv_events)

    # -- membership ------------------------------------------------------------------

    def on_backend_added(
        self, listener: Callable[[Endpoint], None], *, replay: bool = True
    ) -> None:
        """``listener(endpoint)`` runs for every backend that joins the pool (started,
        not yet health-checked), and, with ``replay``, at once for every backend
        already in it."""
        self._added_listeners.append(listener)
        for endpoint in list(self.endpoints.values()) if replay else ():
            listener(endpoint)

    def on_backend_removed(self, listener: Callable[[str], None]) -> None:
        """``listener(backend_id)`` runs for every backend that left the pool: drained,
        its adapter closed, its state dropped."""
        self._removed_listeners.append(listener)

    def set_config(self, config: PoolConfig) -> None:
        """A new pool file (reloaded): its default model and the models it names. Its
        backends are applied by ``apply``."""
        self.config = config
        self._health_changed()

    async def apply(self, desired: Sequence[BackendConfig]) -> list[str]:
        """Makes the members ``desired``: adds the new backends, drains those not in it
        (and those whose settings changed, which then join again with the new ones).
        A backend that cannot be made is left out, with one log line; the problems are
        returned, one line each."""
        async with self._applying:
            if self._closed:
                return []
            self._desired = {c.id: c for c in desired}
            for backend_id, endpoint in list(self.endpoints.items()):
                wanted = self._desired.get(backend_id)
                if not endpoint.draining and wanted != endpoint.config:
                    self._drain(backend_id)
            problems: list[str] = []
            for config in desired:
                if config.id in self.endpoints:
                    continue  # a member, or draining to be replaced
                try:
                    endpoint = build_endpoint(config)
                except ConfigError as error:
                    log.warning("backend refused", backend=config.id, error=str(error))
                    problems.append(str(error))
                    continue
                await self._add(endpoint)
            return problems

    async def _add(self, endpoint: Endpoint) -> None:
        config = endpoint.config
        try:
            await endpoint.backend.start()
        except Exception as error:  # noqa: BLE001  # a backend that cannot start is left out
            log.warning("backend could not start", backend=config.id, error=str(error))
            return
        backend_id = config.id
        self.endpoints[backend_id] = endpoint
        self._views[backend_id] = endpoint.view()
        self._snapshot = None
        self.outliers.add(backend_id, (config.role.value, config.model))
        self._leaving[backend_id] = set()
        self._metrics.add_backend(backend_id)
        self._metrics.backend_healthy.labels(backend_id, config.role.value).set(0)
        self._follow_kv_events(config)
        log.info("backend added", backend=backend_id, address=config.address, role=config.role)
        for listener in self._added_listeners:
            listener(endpoint)
        self._health_changed()

    def _drain(self, backend_id: str) -> None:
        endpoint = self.endpoints[backend_id]
        endpoint.draining = True
        self._changed(backend_id)
        self._health_changed()
        log.info(
            "backend draining", backend=backend_id, in_flight=endpoint.outstanding,
            timeout_s=self.drain_timeout_s,
        )  # fmt: skip
        task = asyncio.create_task(self._drained(backend_id), name=f"drain-{backend_id}")
        self._drains[backend_id] = task
        task.add_done_callback(lambda _: self._drains.pop(backend_id, None))

    async def _drained(self, backend_id: str) -> None:
        """Waits for the backend's streams, fails over what is left, then removes it."""
        endpoint = self.endpoints[backend_id]
        try:
            await asyncio.wait_for(endpoint.idle.wait(), self.drain_timeout_s)
        except TimeoutError:
            log.info("backend drain timed out: its streams fail over", backend=backend_id,
                     in_flight=endpoint.outstanding)  # fmt: skip
            self._left_service(backend_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(endpoint.idle.wait(), self.drain_timeout_s)
        await self._remove(backend_id)
        if backend_id in self._desired and not self._closed:
            await self.apply(list(self._desired.values()))  # its replacement joins

    async def _remove(self, backend_id: str) -> None:
        endpoint = self.endpoints.pop(backend_id)
        config = endpoint.config
        self._views.pop(backend_id, None)
        self._stale.discard(backend_id)
        self._snapshot = None
        self.prefix_index.forget(backend_id)
        self.outliers.remove(backend_id)
        self._leaving.pop(backend_id, None)
        self._metrics.remove_backend(backend_id, config.role.value, config.profile or config.kind)
        await self.kv_events.unsubscribe(backend_id)
        try:
            await endpoint.backend.close()
        except Exception as error:  # noqa: BLE001  # it is gone either way
            log.warning("backend close failed", backend=backend_id, error=str(error))
        log.info("backend removed", backend=backend_id)
        for listener in self._removed_listeners:
            listener(backend_id)
        self._health_changed()

    def backend(self, backend_id: str) -> Backend:
        return self.endpoints[backend_id].backend

    def snapshot(self) -> PoolSnapshot:
        """The current view; only the backends that changed since the last call are rebuilt."""
        if self._snapshot is None:
            for backend_id in self._stale:
                if backend_id in self.endpoints:
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
        endpoint = self.endpoints.get(backend_id)
        if endpoint is None:  # removed while its check ran
            return
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
        endpoint = self.endpoints.get(backend_id)
        if duration is None or endpoint is None:
            return
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
            if backend_id not in self.endpoints:
                continue
            log.info("backend ejection over", backend=backend_id)
            self.endpoints[backend_id].ejected = False
            self._metrics.backend_ejected.labels(backend_id).set(0)
            self._changed(backend_id)
            self._health_changed()

    def watching(self, backend_id: str, on_leave: Callable[[], None]) -> Watching:
        """Calls ``on_leave`` if the backend leaves service while the block runs (at once
        if it already left the pool)."""
        return Watching(self._leaving.get(backend_id), on_leave)

    def in_service(self, backend_id: str) -> bool:
        endpoint = self.endpoints.get(backend_id)
        return endpoint is not None and endpoint.in_service

    def _left_service(self, backend_id: str) -> None:
        for callback in list(self._leaving.get(backend_id, ())):
            callback()

    def device_kind(self, backend_id: str) -> str:
        """What the backend runs on, for metrics: its profile (``h100``), else its
        adapter's kind (``vllm``)."""
        endpoint = self.endpoints.get(backend_id)
        if endpoint is None:
            return "other"
        return endpoint.config.profile or endpoint.config.kind

    def set_load(self, backend_id: str, load: BackendLoad) -> None:
        """What the backend reports: KV use, and the prefix blocks it holds cached."""
        endpoint = self.endpoints.get(backend_id)
        if endpoint is None:  # removed while its report was read
            return
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

    def outstanding(self, backend_id: str) -> Outstanding:
        """Counts a request as in flight on the backend while the block runs; a
        retryable BackendError when the backend has left the pool."""
        if backend_id not in self.endpoints:
            raise BackendError(backend_id, "left the pool")
        gauge = self._metrics.outstanding_by_backend(backend_id)
        return Outstanding(self.endpoints, backend_id, gauge, self._changed)

    def prefilling(self, backend_id: str, prompt_tokens: int) -> LoadCharge:
        """``prompt_tokens`` queued for prefill on the backend until released."""
        return LoadCharge(self._add_load, backend_id, prompt_tokens, 0, 0)

    def decoding(self, backend_id: str, context_tokens: int) -> LoadCharge:
        """One sequence decoding on the backend, reserving ``context_tokens`` of KV."""
        return LoadCharge(self._add_load, backend_id, 0, 1, context_tokens)

    def _add_load(
        self, backend_id: str, prefill_tokens: int, running: int, context_tokens: int
    ) -> None:
        endpoint = self.endpoints.get(backend_id)
        if endpoint is None:
            return
        endpoint.queued_prefill_tokens += prefill_tokens
        endpoint.running += running
        endpoint.context_tokens += context_tokens
        self._changed(backend_id)

    def layouts_compatible(self, prefill_id: str, decode_id: str) -> bool:
        """False only when both layouts are known and differ."""
        prefill = self.layout(prefill_id)
        decode = self.layout(decode_id)
        return prefill is None or decode is None or prefill == decode

    def layout(self, backend_id: str) -> KVLayout | None:
        """The backend's KV layout, as its health check reported it (None: not known)."""
        endpoint = self.endpoints.get(backend_id)
        return None if endpoint is None else endpoint.layout
