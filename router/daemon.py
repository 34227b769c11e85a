"""Lifecycle: one path from configured to stopped, for both doors.

``serve`` installs the SIGINT/SIGTERM handlers first, then starts (a step that
fails stops again what the steps before it started), waits for a stop request
and stops. Stopping marks both doors not ready (gRPC health NOT_SERVING, /readyz
503) and stops them accepting, lets in-flight streams of either door finish for
``drain_grace_s``, cancels the rest, then closes the pool. A second signal cuts
the drain short: whatever still runs is cancelled at once.

While serving, gRPC health follows readiness, as /readyz does: the pool tells the
daemon of every change of a backend's health, and the daemon publishes a changed
readiness to grpc.health.v1 (which streams it to ``Watch`` callers).

SIGHUP, or a change the file watch sees (every ``config_reload_interval_s``), reloads
the pool file and the policy file: a file that reads and validates is applied
without dropping a stream (backends join and drain, the scheduler's policy is
swapped); one that does not is refused with one log line, and the old one stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import Awaitable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from backends.base import Role
from router.api.door import BearerTokens
from router.api.grpc_server import FrontDoor, RouterService
from router.api.http_server import AdminServer
from router.api.openai_http import OpenAIRoutes
from router.api.worker_metrics import WorkerMetrics
from router.dispatch.dispatcher import Dispatcher
from router.errors import ConfigError
from router.gc_tuning import tune_for_serving
from router.logging import get_logger
from router.metrics import Route, RouterMetrics
from router.pool.filewatch import FileWatch
from router.pool.health import HealthChecker
from router.pool.membership import Membership
from router.pool.outlier import OutlierDetector
from router.pool.registry import Endpoint, Pool
from router.scheduling.registry import build_scheduler
from router.settings import PoolConfig, Settings, load_pool

if TYPE_CHECKING:  # loaded only when traces are configured (build_tracing)
    from router.tracing import Tracing

log = get_logger(__name__)

_EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclasses.dataclass(frozen=True)
class Worker:
    """Which of ``count`` routers sharing the ports this one is; ``folder``: the
    workers' private folder (their metrics sockets); ``restarts``: how many times the
    parent restarted this worker's slot before starting this process."""

    index: int
    count: int
    folder: Path
    restarts: int = 0


class Daemon:
    def __init__(
        self,
        settings: Settings,
        pool_config: PoolConfig,
        registry: CollectorRegistry | None = None,
        tracing: Tracing | None = None,
        pool_file: Path | None = None,
        *,
        worker: Worker | None = None,
    ) -> None:
        """``tracing``: where request spans go; by default as the settings say.
        ``pool_file``: the file ``pool_config`` was read from, reloaded on a change (None:
        the pool is not reloaded; the policy file still is). ``worker``: this router is
        one of several sharing the doors' ports (router/workers.py)."""
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.worker = worker
        self.metrics = RouterMetrics(self.registry)
        self.pool = Pool(
            pool_config,
            self.metrics,
            prefix_index_blocks_per_backend=settings.prefix_index_blocks_per_backend,
            outliers=lambda groups: OutlierDetector(
                groups,
                consecutive_failures=settings.outlier_consecutive_failures,
                base_ejection_s=settings.outlier_base_ejection_s,
                max_ejection_s=10 * settings.outlier_base_ejection_s,
                max_ejected_fraction=settings.outlier_max_ejected_percent / 100,
            ),
            drain_timeout_s=settings.backend_drain_timeout_s,
        )
        self.membership = Membership(self.pool)
        self.pool_file = pool_file
        self.health = HealthChecker(
            self.pool,
            settings.health_interval_s,
            settings.health_timeout_s,
            settings.health_unhealthy_threshold,
        )
        self.tracing = tracing if tracing is not None else build_tracing(settings)
        self.dispatcher = Dispatcher(
            self.pool,
            build_scheduler(settings),
            settings,
            self.metrics,
            observers=() if self.tracing is None else (self.tracing.observer,),
        )
        self._initialise_metrics()
        self.pool.on_backend_added(self._route_series, replay=False)
        settings.check_exposure()
        tls = settings.tls_files()
        tokens = BearerTokens(settings.auth_tokens())
        self.front_door = FrontDoor(
            RouterService(settings, self.pool, self.dispatcher),
            settings.grpc_address,
            tls,
            reflection_tokens=tokens if settings.auth_reflection else None,
            share_port=worker is not None,
        )
        self.worker_metrics = (
            None
            if worker is None
            else WorkerMetrics(
                self.registry, worker.index, worker.count, worker.folder, worker.restarts
            )
        )
        self.admin = AdminServer(
            self.registry,
            self.readiness,
            settings.http_address,
            OpenAIRoutes(settings, self.pool, self.dispatcher),
            tls=tls,
            tls_reload_interval_s=settings.tls_reload_interval_s,
            tokens=tokens,
            auth_metrics=settings.auth_metrics,
            settings=settings,
            worker=self.worker_metrics,
        )
        self.started = asyncio.Event()  # set once start-up is complete
        self._draining = False
        # Readiness as gRPC health should report it, and as it last did (None: not yet).
        self._serving: bool | None = None
        self._serving_published: bool | None = None
        self._publisher: asyncio.Task[None] | None = None
        self.pool.on_health_change(self.update_serving)
        self._stop_requested = asyncio.Event()
        self._forced = asyncio.Event()
        self._exit_signal: int | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._reloading = asyncio.Lock()
        self._reloads: set[asyncio.Future[bool]] = set()
        self._watcher: asyncio.Task[None] | None = None
        # Taken now, close to when the files were read: a change after it is seen.
        self._watches = [
            FileWatch(path) for path in (pool_file, settings.policy_file) if path is not None
        ]  # fmt: skip

    def _initialise_metrics(self) -> None:
        self._route_kinds = _route_kinds(self.pool)
        _initialise_metrics(self.metrics, self.pool, self.dispatcher.slo_classes)

    def _route_series(self, endpoint: Endpoint) -> None:
        """A backend joined: its counters are at zero already; routes through a kind of
        device new to its model get theirs."""
        config = endpoint.config
        if (config.model, self.pool.device_kind(config.id), config.role) not in self._route_kinds:
            self._initialise_metrics()

    @property
    def grpc_port(self) -> int:
        return self.front_door.port

    @property
    def http_port(self) -> int:
        return self.admin.port

    async def serve(self, *, own_process: bool = False) -> int:
        """Start-up, main loop, shutdown; the exit status (128 + signal when forced).
        ``own_process``: the process serves this router alone (not a test's), so its
        garbage collector is set for serving once it serves (router/gc_tuning.py)."""
        with self._exit_signals_handled():
            try:
                # A second signal during start-up stops it, as it cuts a drain short.
                await self._unless_forced(self.start())
                if own_process and self.started.is_set():
                    tune_for_serving(self.settings.gc_gen0_threshold)
                await self._stop_requested.wait()
            finally:
                await self.stop()
        if self._forced.is_set() and self._exit_signal is not None:
            return 128 + self._exit_signal
        return 0

    async def start(self) -> None:
        """Starts every part or none: when a step fails, what was started is stopped again."""
        try:
            await self._startup()
        except BaseException as error:
            log.error("start-up failed: stopping what started", error_type=type(error).__name__)
            await self.stop()
            raise
        self.started.set()
        self._warn_if_open()
        ready, detail = self.readiness()
        log.info(
            "router serving" if self.worker is None else "worker serving",
            grpc=f"{self.settings.grpc_address.rpartition(':')[0]}:{self.grpc_port}",
            http=f"{self.settings.http_address.rpartition(':')[0]}:{self.http_port}",
            backends=len(self.pool.endpoints),
            ready=ready,
            detail=detail,
        )

    def _warn_if_open(self) -> None:
        """Logs the doors served beyond loopback to anyone, as ``insecure`` allowed."""
        settings = self.settings
        if settings.auth_token_file is not None or settings.tls_client_ca_file is not None:
            return
        exposed = settings.exposed_doors()
        if exposed:
            log.warning(
                "serving beyond loopback with no client authentication (insecure)",
                doors={name: getattr(settings, name) for name in exposed},
            )

    async def _startup(self) -> None:
        await self.pool.start()
        await self.membership.start()
        await self.health.check_all()  # ready as soon as we listen, if the backends are
        self.health.start()
        # gRPC health tells the truth from the first call on, and follows from here.
        self._serving = self.readiness()[0]
        await self._publish()
        if self.worker_metrics is not None:
            await self.worker_metrics.start()
        await self.front_door.start()
        await self.admin.start()
        if self._watches and self.settings.config_reload_interval_s > 0:
            self._watcher = asyncio.create_task(self._watch_files(), name="config-watch")

    # -- reload ----------------------------------------------------------------------

    async def reload(self, *, pool: bool = True, policy: bool = True) -> bool:
        """Reads the pool file (if one is watched) and the policy file again and applies
        what validates; True when nothing was refused. One at a time."""
        async with self._reloading:
            if self._draining:
                return False
            pool_ok = await self._reload_pool() if pool else True
            policy_ok = self._reload_policy() if policy else True
            return pool_ok and policy_ok

    async def _reload_pool(self) -> bool:
        if self.pool_file is None:
            return True
        try:
            config = load_pool(self.pool_file)
            self.membership.check(config)
        except ConfigError as error:
            log.error("pool file refused: the old one stays", file=str(self.pool_file),
                      error=str(error))  # fmt: skip
            return False
        if config == self.pool.config:
            return True
        await self.membership.reconfigure(config)
        log.info("pool file reloaded", file=str(self.pool_file), entries=len(config.entries))
        return True

    def _reload_policy(self) -> bool:
        try:
            scheduler = build_scheduler(self.settings)
        except ConfigError as error:
            log.error("policy file refused: the old one stays",
                      file=str(self.settings.policy_file), error=str(error))  # fmt: skip
            return False
        self.dispatcher.set_scheduler(scheduler)
        self._initialise_metrics()
        if self.settings.policy_file is not None:
            log.info("policy file reloaded", file=str(self.settings.policy_file),
                     slo_classes=sorted(scheduler.slo_classes))  # fmt: skip
        return True

    def request_reload(self) -> None:
        """SIGHUP: reloads in the background (ignored until start-up is complete)."""
        if not self.started.is_set():
            log.info("signal ignored: not started yet", signal="SIGHUP")
            return
        log.info("signal received: reloading", signal="SIGHUP")
        task = asyncio.ensure_future(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _watch_files(self) -> None:
        while True:
            await asyncio.sleep(self.settings.config_reload_interval_s)
            changed = [w.path for w in self._watches if w.changed()]
            if changed:
                log.info("configuration file changed: reloading", files=[str(p) for p in changed])
                pool = self.pool_file in changed
                await self.reload(pool=pool, policy=self.settings.policy_file in changed)

    def readiness(self) -> tuple[bool, str]:
        """Ready when every model has a way to be served (split or colocated).

        Saturation (every admission slot taken) is said in the detail but leaves the
        router ready: a not-ready pod leaves its Service's endpoints, which for a
        single replica is a total outage and for several moves their load onto the
        others, as saturated as it was; admission already refuses the excess fast,
        with a retry hint, and the saturation metrics are what autoscaling reads."""
        if self._draining:
            return False, "draining"
        snapshot = self.pool.snapshot()
        if not self.pool.models:  # every entry discovered, and none found yet
            return False, "no backends"
        missing = [
            model
            for model in self.pool.models
            if not snapshot.colocated_candidates(model)
            and not (snapshot.prefill_candidates(model) and snapshot.decode_candidates(model))
        ]
        if missing:
            return False, f"no healthy backends for: {', '.join(missing)}"
        healthy = sum(1 for view in snapshot.backends if view.healthy)
        detail = f"{healthy}/{len(snapshot.backends)} backends healthy"
        saturation = self.dispatcher.admission.saturation()
        return True, detail if saturation is None else f"{detail}; {saturation}"

    def update_serving(self) -> None:
        """Recomputes readiness and, when it changed, logs it and has gRPC health follow.

        The pool calls it on every change of a backend's health; any other input of
        readiness calls it when it changes. Nothing happens before start-up has
        published the first status, nor once draining: NOT_SERVING is then final."""
        if self._serving is None or self._draining:
            return
        ready, detail = self.readiness()
        if ready == self._serving:
            return
        self._serving = ready
        log.info("readiness changed", ready=ready, detail=detail)
        self._publish()

    def _publish(self) -> asyncio.Future[None]:
        """Has gRPC health report ``_serving``: one task at a time sets each status in
        turn until the latest is reported (setting one can wait on a Watch stream)."""
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.ensure_future(self._publishing())
        return self._publisher

    async def _publishing(self) -> None:
        while self._serving is not None and self._serving_published != self._serving:
            serving = self._serving
            await self.front_door.set_serving(serving)
            self._serving_published = serving

    async def stop(self) -> None:
        """Drains and stops. Safe to call again, and at any point of start-up: each part
        stops at once when it never started."""
        self._stop_requested.set()
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._shutdown())
        # Shielded: a caller that gives up waiting must not leave the pool half-closed.
        await asyncio.shield(self._stopped)

    async def _shutdown(self) -> None:
        self._draining = True
        log.info("draining", grace_s=self.settings.drain_grace_s)
        # Both doors stop accepting at once and drain against the same grace.
        await self._unless_forced(self._stop_doors(self.settings.drain_grace_s))
        if self._forced.is_set():
            await self._stop_doors(0.0)
        await self._unless_forced(self.dispatcher.drain_background())
        if self.worker_metrics is not None:
            await self.worker_metrics.stop()
        background = [t for t in (self._watcher, *self._reloads) if t is not None]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self.membership.stop()
        if self._publisher is not None:  # done by now but for a Watch that held it up
            self._publisher.cancel()
            await asyncio.wait({self._publisher})
        await self.health.stop()
        await self.pool.close()
        if self.tracing is not None:  # the last spans go out (the exporter blocks)
            await asyncio.to_thread(self.tracing.shutdown)
        log.info("stopped")

    async def _stop_doors(self, grace_s: float) -> None:
        await asyncio.gather(self.front_door.stop(grace_s), self.admin.stop(grace_s))

    async def _unless_forced(self, work: Awaitable[None]) -> None:
        """Awaits ``work``, cancelling it when a second signal asks to exit at once."""
        task = asyncio.ensure_future(work)
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            await asyncio.wait({task, forced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
            task.cancel()  # a no-op when it finished
            await asyncio.wait({task})
        if not task.cancelled():
            task.result()  # its error, if it failed

    def handle_exit(self, signum: int) -> None:
        """SIGINT or SIGTERM: the first stops gracefully, a later one cuts the drain short."""
        name = signal.Signals(signum).name
        if not self._stop_requested.is_set():
            log.info("signal received: draining", signal=name)
            self._stop_requested.set()
            return
        if not self._forced.is_set():
            log.warning("signal received while stopping: exiting now", signal=name)
            self._exit_signal = signum
            self._forced.set()

    @contextlib.contextmanager
    def _exit_signals_handled(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for signum in _EXIT_SIGNALS:
            loop.add_signal_handler(signum, self.handle_exit, signum)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            yield
        finally:
            for signum in (*_EXIT_SIGNALS, signal.SIGHUP):
                loop.remove_signal_handler(signum)


def build_tracing(settings: Settings) -> Tracing | None:
    """Request tracing as configured: None (nothing of OpenTelemetry loaded) without
    ``otlp_traces_endpoint``; ConfigError when it is set but the extra is missing."""
    if settings.otlp_traces_endpoint is None:
        return None
    try:
        from router.tracing import Tracing  # noqa: PLC0415 (the optional extra, loaded only when asked for)
    except ImportError as error:
        raise ConfigError(
            f"HETERO_ROUTER_OTLP_TRACES_ENDPOINT is set but OpenTelemetry is not installed "
            f"({error}): pip install 'hetero-router[tracing]'"
        ) from None
    return Tracing.from_settings(settings)


def _route_kinds(pool: Pool) -> set[tuple[str, str, Role]]:
    return {
        (e.config.model, pool.device_kind(e.config.id), e.config.role)
        for e in pool.endpoints.values()
    }


def _initialise_metrics(metrics: RouterMetrics, pool: Pool, slo_classes: Iterable[str]) -> None:
    """Every route a request may take, for its series to start at zero: per model,
    split over each pair of prefill and decode kinds, colocated on each kind."""
    endpoints = [e.config for e in pool.endpoints.values()]
    backends = [(c.id, c.model, pool.device_kind(c.id)) for c in endpoints]
    routes: list[Route] = []
    for model in sorted({c.model for c in endpoints}):
        kinds = [(pool.device_kind(c.id), c.role) for c in endpoints if c.model == model]
        pairs = {
            ("split", p, d)
            for p, pr in kinds
            if pr.can_prefill()
            for d, dr in kinds
            if dr.can_decode()
        }
        pairs |= {("colocated", k, k) for k, _ in kinds}
        routes.extend(
            Route(model, mode, slo_class, prefill, decode)
            for mode, prefill, decode in sorted(pairs)
            for slo_class in sorted(slo_classes)
        )
    metrics.initialise(backends, routes)
