"""Benchmark clusters as real processes: mock devices and a router, each on its own port.

Benchmarks measure across process boundaries, as production runs: the client
(this process), the router and the devices compete for the same cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from router.cluster import embedded_devices
from router.settings import PoolConfig, parse_pool

# The router with its admission limit fixed: benchmarks of the software path drive it to
# saturation, which the adaptive limit would rightly hold back (scenario `overload`
# measures admission).
FIXED_LIMIT = {"HETERO_ROUTER_ADAPTIVE_CONCURRENCY": "false"}


def zero_cost_pair(model: str = "llama-3.1-8b", **device: object) -> list[dict[str, object]]:
    """Pool entries of a prefill and a decode mock device at time scale 0 (only software
    is measured), on free ports: what scenario `overhead` and `bench.path_cost` run."""
    common = {"kind": "mock", "address": "127.0.0.1:0", "model": model, "time_scale": 0.0}
    return [
        {**common, "id": "p0", "role": "prefill", "profile": "h100", **device},
        {**common, "id": "d0", "role": "decode", "profile": "h100", **device},
    ]


@dataclass(frozen=True)
class RunningCluster:
    pool: PoolConfig  # with the devices' real addresses
    router_address: str

    def address_of(self, backend_id: str) -> str:
        return next(b.address for b in self.pool.backends if b.id == backend_id)


@contextlib.asynccontextmanager
async def cluster(
    backends: Sequence[dict[str, object]],
    *,
    device_args: Sequence[str] = (),
    router_env: dict[str, str] | None = None,
) -> AsyncIterator[RunningCluster]:
    """Starts the devices of ``backends`` (pool-file entries with port 0), then a router."""
    pool = parse_pool({"backends": list(backends)}, source="benchmark pool")
    async with (
        embedded_devices(pool, ready_timeout_s=60, extra_args=device_args) as resolved,
        router_process(resolved, router_env or {}) as address,
    ):
        yield RunningCluster(resolved, address)


@dataclass(frozen=True)
class RouterProcess:
    grpc_address: str
    http_address: str
    pid: int


@contextlib.asynccontextmanager
async def router_process(
    pool: PoolConfig, env: dict[str, str], *, http: bool = False
) -> AsyncIterator[str]:
    """A router serving ``pool``; yields its gRPC address, or its HTTP one with ``http``."""
    async with router_server(pool, env) as router:
        yield router.http_address if http else router.grpc_address


@contextlib.asynccontextmanager
async def router_addresses(pool: PoolConfig, env: dict[str, str]) -> AsyncIterator[tuple[str, str]]:
    """A router serving ``pool``; yields its gRPC and its HTTP address."""
    async with router_server(pool, env) as router:
        yield router.grpc_address, router.http_address


@contextlib.asynccontextmanager
async def router_server(
    pool: PoolConfig,
    env: dict[str, str],
    *,
    log_path: Path | None = None,
    module: str = "router.cli",
) -> AsyncIterator[RouterProcess]:
    """A router serving ``pool``: both its addresses and its process id. Its JSON log
    lines are appended to ``log_path`` when given. ``module`` is the entry point run
    with ``-m`` (a bench's instrumented one takes ``router.cli``'s arguments)."""
    with tempfile.TemporaryDirectory() as scratch:
        pool_file = Path(scratch) / "pool.yaml"
        pool_file.write_text(yaml.safe_dump(pool.model_dump(mode="json", by_alias=True)))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            "serve",
            "--pool",
            str(pool_file),
            "--grpc-address",
            "127.0.0.1:0",
            "--http-address",
            "127.0.0.1:0",
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "HETERO_ROUTER_LOG_FORMAT": "json", **env},
        )
        try:
            grpc_address, http_address = await asyncio.wait_for(
                _serving_address(process), timeout=60
            )
            drain = asyncio.create_task(_drain(process, log_path))
            try:
                yield RouterProcess(grpc_address, http_address, process.pid)
            finally:
                drain.cancel()
        finally:
            if process.returncode is None:
                process.terminate()
                await process.wait()


async def _serving_address(process: asyncio.subprocess.Process) -> tuple[str, str]:
    if process.stderr is None:
        raise RuntimeError("the router was started without stderr=PIPE")
    said = b""
    while line := await process.stderr.readline():
        if line.startswith(b"{"):
            event = json.loads(line)
            if event.get("event") == "router serving":
                return str(event["grpc"]), str(event["http"])
        else:
            said = (said + line)[-2000:]
    raise RuntimeError(
        f"router exited with {await process.wait()} before serving: {said.decode().strip()}"
    )


async def _drain(process: asyncio.subprocess.Process, log_path: Path | None = None) -> None:
    """Reads the router's log so it never blocks on a full pipe; appends it to
    ``log_path``, or else to the file ``BENCH_ROUTER_LOG`` names, when set, to see what
    the router said during a run."""
    if process.stderr is None:
        raise RuntimeError("the router was started without stderr=PIPE")
    keep = log_path or os.environ.get("BENCH_ROUTER_LOG")
    # Small appends to a local file, unbuffered so a line is there once read: blocking
    # them is harmless in a benchmark.
    with open(keep, "ab", buffering=0) if keep else contextlib.nullcontext() as log:  # noqa: ASYNC230  # opened once at start, before the loop is busy
        while line := await process.stderr.readline():
            if log is not None:
                log.write(line)
