"""A real Prometheus scraping the router, and its HTTP API.

Prometheus from the Debian package (``/usr/bin/prometheus``) on 127.0.0.1 with a
1 s scrape interval and a throw-away storage folder. It needs a concrete port: a
free one is found by binding a socket to port 0, and another is tried when
Prometheus finds it taken by the time it binds. ``promtool check metrics`` lints an
exposition page the same way the Debian package's ``promtool`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
JOB = "hetero-router"
_START_ATTEMPTS = 5
_READY_TIMEOUT_S = 30.0
_POLL_S = 0.1


class PrometheusError(Exception):
    """Prometheus did not start, or its API answered with an error."""


def binary(name: str = PROMETHEUS) -> str | None:
    """The binary's path when it is installed here."""
    path = Path(name)
    if path.is_file():
        return str(path)
    return shutil.which(path.name)


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    points: list[tuple[float, float]]  # (unix time, value)


class Prometheus:
    """A running Prometheus's HTTP API (instant and range queries)."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self._session = session

    async def query(self, expression: str, at: float | None = None) -> list[Sample]:
        """``/api/v1/query``: the instant vector of ``expression`` (at ``at``, unix time)."""
        parameters = {"query": expression}
        if at is not None:
            parameters["time"] = f"{at:.3f}"
        data = await self._get("/api/v1/query", parameters)
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        return [Sample(r["metric"], float(r["value"][1])) for r in data["result"]]

    async def value(self, expression: str, at: float | None = None) -> float | None:
        """The one value of an expression that yields at most one sample (None: none)."""
        samples = await self.query(expression, at)
        if len(samples) > 1:
            raise PrometheusError(f"{expression!r} gave {len(samples)} samples, not one")
        return samples[0].value if samples else None

    async def query_range(
        self, expression: str, start: float, end: float, step_s: float
    ) -> list[Series]:
        """``/api/v1/query_range``: ``expression`` every ``step_s`` from ``start`` to ``end``."""
        parameters = {
            "query": expression,
            "start": f"{start:.3f}",
            "end": f"{end:.3f}",
            "step": f"{step_s}",
        }
        data = await self._get("/api/v1/query_range", parameters)
        return [
            Series(r["metric"], [(float(t), float(v)) for t, v in r["values"]])
            for r in data["result"]
        ]

    async def scraped_after(self, moment: float, timeout_s: float = 30.0) -> float:
        """Waits until a scrape of the router began after ``moment`` (unix time), so
        that everything the router counted before then is stored; returns that scrape's
        time. Polls the API; raises PrometheusError past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            scraped = await self.value(f'max(timestamp(up{{job="{JOB}"}} == 1))')
            if scraped is not None and scraped > moment:
                return scraped
            await asyncio.sleep(_POLL_S)
        raise PrometheusError(f"no scrape of the router after {moment:.3f} in {timeout_s} s")

    async def _get(self, path: str, parameters: dict[str, str]) -> dict[str, Any]:
        async with self._session.get(self.url + path, params=parameters) as response:
            body = await response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {parameters['query']!r}: {body.get('error', body)}")
        data: dict[str, Any] = body["data"]
        return data


def free_port() -> int:
    """A port free now on 127.0.0.1 (another process may take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _config(
    targets: Sequence[str], scrape_interval_s: float, rule_files: Sequence[Path]
) -> dict[str, Any]:
    interval = f"{scrape_interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path.resolve()) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": JOB,
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }


@contextlib.asynccontextmanager
async def prometheus(
    targets: Sequence[str],
    *,
    scrape_interval_s: float = 1.0,
    rule_files: Sequence[Path] = (),
    port: int | None = None,
) -> AsyncIterator[Prometheus]:
    """Prometheus scraping ``targets`` (host:port, path /metrics), ready to query;
    ``rule_files`` (recording and alerting rules) are evaluated at the scrape interval.

    ``port`` fixes its listening port; by default a free one is found, and another is
    tried when it is taken by the time Prometheus binds it.
    """
    path = binary()
    if path is None:
        raise PrometheusError(f"{PROMETHEUS} is not installed (Debian: apt-get install prometheus)")
    with tempfile.TemporaryDirectory(prefix="prometheus-") as scratch:
        config = Path(scratch) / "prometheus.yml"
        config.write_text(yaml.safe_dump(_config(targets, scrape_interval_s, rule_files)))
        log = Path(scratch) / "prometheus.log"
        async with aiohttp.ClientSession() as session:
            for _ in range(_START_ATTEMPTS):
                listen = f"127.0.0.1:{port or free_port()}"
                with log.open("wb") as stderr:
                    process = await asyncio.create_subprocess_exec(
                        path,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={Path(scratch) / 'data'}",
                        f"--web.listen-address={listen}",
                        "--log.level=warn",
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=stderr,
                    )
                try:
                    if await _ready(process, session, f"http://{listen}"):
                        yield Prometheus(f"http://{listen}", session)
                        return
                finally:
                    await _stop(process)
                said = log.read_text(errors="replace")
                if "address already in use" not in said:
                    raise PrometheusError(f"Prometheus exited {process.returncode}: {said[-2000:]}")
                if port is not None:
                    break
            raise PrometheusError(f"Prometheus found its port on 127.0.0.1 taken: {listen}")


async def _ready(
    process: asyncio.subprocess.Process, session: aiohttp.ClientSession, url: str
) -> bool:
    """Polls /-/ready until Prometheus serves (True) or exits (False: a taken port)."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.returncode is not None:
            return False
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{url}/-/ready") as response:
                if response.status == 200:
                    return True
        # Not up yet: its exit, if it failed to bind, shows on the next round.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), _POLL_S)
    raise PrometheusError(f"Prometheus at {url} not ready after {_READY_TIMEOUT_S} s")


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


@dataclass(frozen=True)
class Lint:
    ok: bool
    output: str  # what promtool printed: the problems, one a line


async def check_metrics(page: str) -> Lint | None:
    """``promtool check metrics`` of an exposition page; None when promtool is absent."""
    path = binary(PROMTOOL)
    if path is None:
        return None
    process = await asyncio.create_subprocess_exec(
        path,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    said, _ = await asyncio.wait_for(process.communicate(page.encode()), 60)
    output = said.decode(errors="replace").strip()
    return Lint(process.returncode == 0 and not output, output)
