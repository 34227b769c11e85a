"""Active health checks: every backend, on an interval, with a deadline.

After each passing check the backend's load report is read too (KV use and the prefix
blocks it holds cached); backends that report none are still served.

A healthy backend whose checks time out is taken out only after ``unhealthy_threshold``
of them in a row (Kubernetes' failureThreshold, Envoy's unhealthy_threshold): a device
saturated by its own streams can miss a health deadline, and ejecting the only decode
backend for it would fail every request for a whole interval. A check that fails
outright (connection refused, an error status, the wrong model) takes it out at once.
One passing check brings it back.

A backend that joins the pool is checked at once, not at the next round: it serves
from its first passing check.
"""

from __future__ import annotations

import asyncio

from router.logging import get_logger
from router.pool.registry import Endpoint, Pool

log = get_logger(__name__)


class HealthChecker:
    def __init__(
        self, pool: Pool, interval_s: float, timeout_s: float, unhealthy_threshold: int = 3
    ) -> None:
        if unhealthy_threshold < 1:
            raise ValueError("unhealthy_threshold must be >= 1")
        self._pool = pool
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._unhealthy_threshold = unhealthy_threshold
        # Failed checks in a row, per backend.
        self._failures: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        # Backends whose load report failed last time (logged once per failing streak).
        self._no_load: set[str] = set()
        self._first_checks: set[asyncio.Task[None]] = set()
        pool.on_backend_added(self._check_new)
        pool.on_backend_removed(self._forget)

    def _check_new(self, endpoint: Endpoint) -> None:
        if self._task is None:  # not started: the first round checks it
            return
        task = asyncio.create_task(self._check(endpoint), name=f"first-check-{endpoint.config.id}")
        self._first_checks.add(task)
        task.add_done_callback(self._first_checks.discard)

    def _forget(self, backend_id: str) -> None:
        self._failures.pop(backend_id, None)
        self._no_load.discard(backend_id)

    async def check_all(self) -> None:
        self._pool.end_ejections()
        await asyncio.gather(*(self._check(e) for e in self._pool.endpoints.values()))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="health-checker")

    async def stop(self) -> None:
        tasks = list(self._first_checks)
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.check_all()

    async def _check(self, endpoint: Endpoint) -> None:
        config = endpoint.config
        try:
            status = await endpoint.backend.check_health(self._timeout_s)
        except Exception as error:  # a broken adapter must not stop the checker
            log.exception("health check raised", backend=config.id)
            status_ok, detail, layout = False, f"health check raised: {error}", None
            timed_out = False
        else:
            status_ok, detail, layout = status.serving, status.detail, status.layout
            timed_out = status.timed_out
            if status_ok and status.model and status.model != config.model:
                status_ok = False
                detail = f"serves model {status.model!r}, pool file says {config.model!r}"
        failures = self._failures.get(config.id, 0) + 1 if timed_out else 0
        self._failures[config.id] = failures
        if endpoint.healthy and 0 < failures < self._unhealthy_threshold:
            log.info(
                "backend health check timed out",
                backend=config.id,
                failures=failures,
                threshold=self._unhealthy_threshold,
                detail=detail,
            )
            return
        if status_ok != endpoint.healthy:
            log.info("backend health changed", backend=config.id, healthy=status_ok, detail=detail)
        self._pool.set_health(config.id, status_ok, detail, layout)
        if status_ok:
            await self._read_load(endpoint)

    async def _read_load(self, endpoint: Endpoint) -> None:
        backend_id = endpoint.config.id
        try:
            load = await endpoint.backend.load(self._timeout_s)
        except Exception as error:  # noqa: BLE001  # no load report: scheduling goes on without one
            if backend_id not in self._no_load:
                self._no_load.add(backend_id)
                log.debug(
                    "backend load not available",
                    backend=backend_id,
                    error=str(error) or type(error).__name__,
                )
            return
        self._no_load.discard(backend_id)
        self._pool.set_load(backend_id, load)
