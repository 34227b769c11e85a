"""Membership: the pool file's fixed backends plus what each discovery source finds.

Each discovered entry of the pool file runs one source (DNS or EndpointSlices) in a
task of its own; a source publishes the whole set of backends it sees whenever it
changes, and every publication, like every reloaded pool file, ends in one call of
``Pool.apply`` with the union. A source that fails (a DNS timeout, an API server
away) publishes nothing: its backends stay as they were until it answers again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from router.logging import get_logger
from router.pool.dns import DnsSource
from router.pool.endpointslices import EndpointSliceSource
from router.pool.registry import Pool, build_endpoint
from router.settings import BackendConfig, DiscoveredEntry, PoolConfig

log = get_logger(__name__)

Publish = Callable[[Sequence[BackendConfig]], Awaitable[None]]
RESTART_PAUSE_S = 5.0


class Source(Protocol):
    """One discovered entry's source: finds its backends, publishes each new set."""

    @property
    def failing(self) -> bool:
        """Whether its last look failed (its backends are kept as they were)."""

    async def first(self, publish: Publish) -> None:
        """One look, published when it succeeds (start-up waits for it)."""

    async def run(self, publish: Publish) -> None:
        """Looks again and again, publishing each change, until cancelled."""


def source_for(entry: DiscoveredEntry) -> Source:
    if entry.discovery.dns is not None:
        return DnsSource(entry, entry.discovery.dns)
    slices = entry.discovery.endpointslices
    if slices is None:  # the schema wants one of the two
        raise ValueError(f"entry {entry.id}: no discovery source")
    return EndpointSliceSource(entry, slices)


class Membership:
    def __init__(
        self, pool: Pool, source: Callable[[DiscoveredEntry], Source] = source_for
    ) -> None:
        self._pool = pool
        self._make_source = source
        self._config = pool.config
        self._found: dict[str, tuple[BackendConfig, ...]] = {}  # by entry id
        self._tasks: dict[str, tuple[DiscoveredEntry, asyncio.Task[None]]] = {}
        self._sources: dict[str, Source] = {}
        self._collisions: frozenset[str] = frozenset()

    async def start(self) -> None:
        """Starts every source, after its first look (so that start-up's health checks
        see what it found)."""
        await self._start_sources(self._config.discovered)

    def failing(self, entry_id: str) -> bool:
        """Whether the entry's source failed its last look."""
        source = self._sources.get(entry_id)
        return source is not None and source.failing

    async def stop(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def check(self, config: PoolConfig) -> None:
        """ConfigError when a fixed backend of ``config`` that is not a member yet cannot
        be made (an unknown kind, a role its adapter cannot take)."""
        for backend in config.backends:
            endpoint = self._pool.endpoints.get(backend.id)
            if endpoint is None or endpoint.config != backend:
                build_endpoint(backend)

    async def reconfigure(self, config: PoolConfig) -> None:
        """Applies a new pool file (checked): its fixed backends, and its discovered
        entries (a source whose entry changed or went starts again, or stops)."""
        self._config = config
        self._pool.set_config(config)
        wanted = {entry.id: entry for entry in config.discovered}
        for entry_id, (entry, task) in list(self._tasks.items()):
            if wanted.get(entry_id) != entry:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                del self._tasks[entry_id]
                self._sources.pop(entry_id, None)
                self._found.pop(entry_id, None)
        await self._start_sources([e for e in wanted.values() if e.id not in self._tasks])
        await self._reconcile()

    async def _start_sources(self, entries: Sequence[DiscoveredEntry]) -> None:
        sources = [(entry, self._make_source(entry)) for entry in entries]
        await asyncio.gather(*(s.first(self._publisher(e.id)) for e, s in sources))
        for entry, source in sources:
            task = asyncio.create_task(
                self._supervised(entry.id, source), name=f"discovery-{entry.id}"
            )
            self._tasks[entry.id] = (entry, task)
            self._sources[entry.id] = source

    async def _supervised(self, entry_id: str, source: Source) -> None:
        """Runs the source; a fault of its own (not a failed look, which it handles)
        is logged and the source started again after a pause, never left dead."""
        while True:
            try:
                await source.run(self._publisher(entry_id))
            except Exception:  # discovery must outlive any bug of one source
                log.exception("discovery source failed: starting it again", entry=entry_id)
            await asyncio.sleep(RESTART_PAUSE_S)

    def _publisher(self, entry_id: str) -> Publish:
        async def publish(backends: Sequence[BackendConfig]) -> None:
            found = tuple(backends)
            if self._found.get(entry_id) == found:
                return
            self._found[entry_id] = found
            await self._reconcile()

        return publish

    async def _reconcile(self) -> None:
        desired: dict[str, BackendConfig] = {b.id: b for b in self._config.backends}
        collisions: set[str] = set()
        for entry in self._config.discovered:
            for backend in self._found.get(entry.id, ()):
                if backend.id in desired:
                    collisions.add(backend.id)
                    continue
                desired[backend.id] = backend
        if collisions and collisions != self._collisions:
            log.warning(
                "discovered backends left out: their ids are taken",
                backends=sorted(collisions),
            )
        self._collisions = frozenset(collisions)
        await self._pool.apply(list(desired.values()))
