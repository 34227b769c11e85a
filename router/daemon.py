"""Lifecycle: start the pool and the servers, serve, drain on a signal, exit.

One path: ``start`` -> serve until SIGINT/SIGTERM -> ``stop``. Stopping first
reports NOT_SERVING (health and /readyz), then lets in-flight streams finish for
``drain_grace_s`` before cancelling the rest. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import os
import signal

from prometheus_client import CollectorRegistry

from router.api.grpc_server import FrontDoor, RouterService
from router.api.http_server import AdminServer
from router.api.openai_http import OpenAIRoutes
from router.dispatch.dispatcher import Dispatcher
from router.logging import get_logger
from router.metrics import RouterMetrics
from router.pool.health import HealthChecker
from router.pool.registry import Pool
from router.scheduling.registry import build_scheduler
from router.settings import PoolConfig, Settings

log = get_logger(__name__)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        pool_config: PoolConfig,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = RouterMetrics(self.registry)
        self.pool = Pool(
            pool_config,
            self.metrics,
            prefix_index_blocks_per_backend=settings.prefix_index_blocks_per_backend,
        )
        self.health = HealthChecker(
            self.pool,
            settings.health_interval_s,
            settings.health_timeout_s,
            settings.health_unhealthy_threshold,
        )
        self.dispatcher = Dispatcher(self.pool, build_scheduler(settings), settings, self.metrics)
        tls = settings.tls_files()
        self.front_door = FrontDoor(
            RouterService(settings, self.pool, self.dispatcher), settings.grpc_address, tls
        )
        self.admin = AdminServer(
            self.registry,
            self.readiness,
            settings.http_address,
            OpenAIRoutes(settings, self.pool, self.dispatcher),
            tls=tls,
        )
        self._draining = False
        self._stop_requested = asyncio.Event()

    @property
    def grpc_port(self) -> int:
        return self.front_door.port

    @property
    def http_port(self) -> int:
        return self.admin.port

    async def start(self) -> None:
        await self.pool.start()
        await self.health.check_all()  # ready as soon as we listen, if the backends are
        self.health.start()
        await self.front_door.start()
        await self.admin.start()
        await self.front_door.set_serving(True)
        ready, detail = self.readiness()
        log.info(
            "router serving",
            grpc=f"{self.settings.grpc_address.rpartition(':')[0]}:{self.grpc_port}",
            http=f"{self.settings.http_address.rpartition(':')[0]}:{self.http_port}",
            backends=len(self.pool.endpoints),
            ready=ready,
            detail=detail,
        )

    def readiness(self) -> tuple[bool, str]:
        """Ready when every model has a way to be served (split or colocated)."""
        if self._draining:
            return False, "draining"
        snapshot = self.pool.snapshot()
        missing = [
            model
            for model in self.pool.models
            if not snapshot.colocated_candidates(model)
            and not (snapshot.prefill_candidates(model) and snapshot.decode_candidates(model))
        ]
        if missing:
            return False, f"no healthy backends for: {', '.join(missing)}"
        healthy = sum(1 for view in snapshot.backends if view.healthy)
        return True, f"{healthy}/{len(snapshot.backends)} backends healthy"

    async def stop(self) -> None:
        if self._draining:
            return
        self._draining = True
        log.info("draining", grace_s=self.settings.drain_grace_s)
        await self.front_door.set_serving(False)
        await self.front_door.stop(self.settings.drain_grace_s)
        await self.dispatcher.drain_background()
        await self.health.stop()
        await self.admin.stop()
        await self.pool.close()
        log.info("stopped")

    async def serve_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for signum in signals:
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            await self._stop_requested.wait()
            await self.stop()
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        if self._stop_requested.is_set():
            log.warning("second signal: exiting now", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("signal received", signal=signal.Signals(signum).name)
        self._stop_requested.set()
