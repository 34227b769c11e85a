"""One /metrics answer for several workers sharing the HTTP port.

A scrape of the shared port reaches whichever worker the kernel hands the
connection to. So that every scrape sees the whole router, each worker serves its
own registry on a Unix socket of the workers' private folder (``worker-K.sock``),
and the worker a scrape reached answers with its own series and every sibling's,
each labelled ``worker="K"``. A sibling that does not answer within
``SIBLING_TIMEOUT_S`` (restarting, stuck) is left out of that scrape, and said in
``hetero_router_workers_scraped``; Prometheus reads the counters of a restarted
worker as a reset, as it would a restarted process.

Each worker also says how many times the parent restarted its slot,
``hetero_router_worker_restarts_total{worker="K"}``: the parent passes the count to
the process it starts, so the series goes on from where the last process left it
(one more per restart) instead of resetting, and ``increase()`` over it counts
crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from router.logging import get_logger

log = get_logger(__name__)

SIBLING_TIMEOUT_S = 2.0
WORKER_LABEL = "worker"


def socket_path(folder: Path, index: int) -> Path:
    return folder / f"worker-{index}.sock"


class WorkerMetrics:
    """Worker ``index`` of ``count``: serves ``registry`` on its socket in ``folder``
    and answers a scrape of the shared port for all of them. ``restarts``: how many
    times the parent restarted this worker's slot before this process."""

    def __init__(
        self,
        registry: CollectorRegistry,
        index: int,
        count: int,
        folder: Path,
        restarts: int = 0,
    ) -> None:
        self.registry = registry
        self.index = index
        self.count = count
        self.folder = folder
        self._runner: web.AppRunner | None = None
        Counter(
            "hetero_router_worker_restarts",
            "Times the parent restarted this worker after its process exited, since the "
            "parent started (carried over to each new process, so it rises by one a restart).",
            registry=registry,
        ).inc(restarts)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._own)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        path = socket_path(self.folder, self.index)
        with contextlib.suppress(FileNotFoundError):  # left by this worker's last run
            path.unlink()
        await web.UnixSite(self._runner, str(path)).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _own(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry))

    async def metrics(self) -> bytes:
        """The exposition of every worker that answers, each series labelled."""
        siblings = [k for k in range(self.count) if k != self.index]
        texts = await asyncio.gather(*(self._fetch(k) for k in siblings))
        # Its own read back from text as the siblings' are: the text format splits a
        # counter's _created series into a family of its own, which collect() does not.
        own = generate_latest(self.registry).decode()
        sources: list[tuple[int, Iterable[Metric]]] = [
            (k, text_string_to_metric_families(text))
            for k, text in [(self.index, own), *zip(siblings, texts, strict=True)]
            if text is not None
        ]
        merged = _Merged(sources)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(merged)
        return generate_latest(registry)

    async def _fetch(self, index: int) -> str | None:
        connector = aiohttp.UnixConnector(path=str(socket_path(self.folder, index)))
        timeout = aiohttp.ClientTimeout(total=SIBLING_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.get("http://worker/metrics") as response,
            ):
                response.raise_for_status()
                return await response.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            log.warning("worker metrics left out of a scrape", sibling=index,
                        error=str(error) or type(error).__name__)  # fmt: skip
            return None


class _Merged:
    """A collector of the families of several workers, one family per name."""

    def __init__(self, sources: list[tuple[int, Iterable[Metric]]]) -> None:
        self._families: dict[str, Metric] = {}
        for index, families in sources:
            label = str(index)
            for family in families:
                merged = self._families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    self._families[family.name] = merged
                merged.samples.extend(
                    sample._replace(labels={WORKER_LABEL: label, **sample.labels})
                    for sample in family.samples
                )
        scraped = GaugeMetricFamily(
            "hetero_router_workers_scraped", "Workers whose series this scrape holds."
        )
        scraped.add_metric([], len(sources))
        self._families[scraped.name] = scraped

    def collect(self) -> Iterator[Metric]:
        return iter(self._families.values())
