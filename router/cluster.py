"""The embedded cluster of ``hetero-router up``: mock devices as child processes, then the router.

Each mock backend of the pool file becomes a ``hetero-router device`` child. A
child prints ``READY host:port`` once it serves (port 0 in the pool file picks a
free port), and exits when its stdin closes, so no device outlives the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from backends.registry import DEVICE_READY_PREFIX
from router.errors import ConfigError
from router.logging import get_logger
from router.settings import BackendConfig, PoolConfig

log = get_logger(__name__)


@dataclass
class DeviceProcess:
    config: BackendConfig
    process: asyncio.subprocess.Process
    address: str = ""


def device_command(
    config: BackendConfig,
    time_scale: float | None,
    extra_args: Sequence[str] = (),
    *,
    log_level: str = "info",
    log_format: str = "json",
) -> list[str]:
    """The device's command line; it logs at the router's level in the router's format."""
    roles = {"prefill": "prefill", "decode": "decode", "both": "prefill,decode"}[config.role]
    return [
        sys.executable,
        "-m",
        "router.cli",
        "device",
        "--id",
        config.id,
        "--profile",
        config.profile,
        "--model",
        config.model,
        "--roles",
        roles,
        "--listen",
        config.address,
        "--time-scale",
        str(config.time_scale if time_scale is None else time_scale),
        "--announce",
        "--exit-with-stdin",
        "--log-level",
        log_level,
        "--log-format",
        log_format,
        *(("--chips", str(config.chips)) if config.chips else ()),
        *_option_args(config),
        *extra_args,
    ]


def _option_args(config: BackendConfig) -> list[str]:
    """A mock entry's ``options``: its KV layout (tensor_parallel, block_size),
    prefix_cache_blocks and emulate_kv_size."""
    flags = {
        "tensor_parallel": "--tensor-parallel",
        "block_size": "--block-size",
        "prefix_cache_blocks": "--prefix-cache-blocks",
    }
    args = [
        arg
        for key, flag in flags.items()
        if key in config.options
        for arg in (flag, str(int(config.options[key])))
    ]
    if config.options.get("emulate_kv_size"):
        args.append("--emulate-kv-size")
    return args


def device_environment() -> dict[str, str]:
    """One BLAS thread per device: several devices share the machine's cores, and every
    device then computes bit-identical KV, so a split request matches a colocated one."""
    env = dict(os.environ)
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[variable] = "1"
    return env


@contextlib.asynccontextmanager
async def embedded_devices(
    pool: PoolConfig,
    *,
    ready_timeout_s: float,
    time_scale: float | None = None,
    extra_args: Sequence[str] = (),
    pids: dict[str, int] | None = None,
    log_level: str = "info",
    log_format: str = "json",
) -> AsyncIterator[PoolConfig]:
    """Starts the pool's mock devices; yields the pool with their real addresses.
    They log to the router's stderr, at ``log_level`` in ``log_format``.

    ``pids``, when given, receives each device's process id by backend id (fault
    tests signal them)."""
    mocks = [b for b in pool.backends if b.kind == "mock"]
    for backend in mocks:
        if not backend.profile:
            raise ConfigError(f"backend {backend.id}: a mock device needs a 'profile'")
    devices: list[DeviceProcess] = []
    try:
        for backend in mocks:
            process = await asyncio.create_subprocess_exec(
                *device_command(
                    backend, time_scale, extra_args, log_level=log_level, log_format=log_format
                ),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=device_environment(),
                # Ctrl-C reaches the router alone: devices keep serving while it drains,
                # then it stops them.
                start_new_session=True,
            )
            devices.append(DeviceProcess(backend, process))
            if pids is not None:
                pids[backend.id] = process.pid
        await asyncio.wait_for(
            asyncio.gather(*(_await_ready(d) for d in devices)), timeout=ready_timeout_s
        )
        addresses = {d.config.id: d.address for d in devices}
        resolved = [
            e.model_copy(update={"address": addresses.get(e.id, e.address)})
            if isinstance(e, BackendConfig)
            else e
            for e in pool.entries
        ]
        log.info("devices ready", devices={d.config.id: d.address for d in devices})
        yield pool.model_copy(update={"entries": tuple(resolved)})
    except TimeoutError:
        raise ConfigError(f"mock devices were not ready within {ready_timeout_s:.0f} s") from None
    finally:
        await asyncio.gather(*(_stop(d) for d in devices))


async def _await_ready(device: DeviceProcess) -> None:
    stdout = device.process.stdout
    if stdout is None:
        raise RuntimeError(f"device {device.config.id} was started without stdout=PIPE")
    line = (await stdout.readline()).decode().strip()
    if not line.startswith(DEVICE_READY_PREFIX):
        code = await device.process.wait()
        raise ConfigError(
            f"device {device.config.id} exited (code {code}) before serving; see its log above"
        )
    device.address = line.removeprefix(DEVICE_READY_PREFIX)


async def _stop(device: DeviceProcess) -> None:
    process = device.process
    if process.returncode is not None:
        return
    if process.stdin is not None:
        process.stdin.close()  # the device exits on stdin EOF
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), timeout=5.0)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
