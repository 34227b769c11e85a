"""Mock devices as processes that can be killed, stopped and started again on their port.

The first start binds port 0 and keeps the port the device announces; every restart
listens there again, so the router's pool file stays valid. Each device's stderr goes
to a log file of its own (appended across restarts), whose tail is quoted when a
start fails. Every wait is bounded.

Devices are spawned with ``posix_spawn`` (``subprocess.Popen`` without
``close_fds`` or a new session), never with ``fork``: this process is busy with
gRPC threads while it restarts devices, and a child forked then could crash with
SIGSEGV before it ran the device (gRPC's and the event loop's fork handlers). Its
pipes are read and its exit awaited in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc

from backends._gen.hetero.device.v1 import device_pb2
from backends.registry import DEVICE_READY_PREFIX
from bench.chaos.verdicts import DeviceLoad
from router.cluster import device_command, device_environment
from router.settings import BackendConfig, PoolConfig

State = Literal["up", "stopped", "down"]
_EXIT_WAIT_S = 5.0
_LOAD_METHOD = "/hetero.device.v1.Device/Load"


class DeviceStartError(Exception):
    """A device did not announce itself in time, or exited first."""


@dataclass
class Device:
    config: BackendConfig
    log_path: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    state: State = "down"
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Fleet:
    """The mock devices of a pool, each a child process this object can signal."""

    def __init__(
        self,
        pool: PoolConfig,
        log_dir: Path,
        *,
        extra_args: Sequence[str] = (),
        start_timeout_s: float = 60.0,
    ) -> None:
        self._pool = pool
        self._extra_args = tuple(extra_args)
        self.start_timeout_s = start_timeout_s
        self.devices = {
            b.id: Device(b, log_dir / f"{b.id}.log") for b in pool.backends if b.kind == "mock"
        }

    def roles(self) -> dict[str, str]:
        return {device_id: device.config.role for device_id, device in self.devices.items()}

    def up(self, device_id: str) -> bool:
        """Serving as far as the bench knows: started, not stopped, not exited since."""
        device = self.devices[device_id]
        alive = device.process is not None and device.process.poll() is None
        return device.state == "up" and alive

    async def start_all(self) -> PoolConfig:
        """Starts every device; the pool with their real addresses."""
        await asyncio.gather(*(self.start(device_id) for device_id in self.devices))
        resolved = [
            b.model_copy(update={"address": self.devices[b.id].address})
            if b.id in self.devices
            else b
            for b in self._pool.backends
        ]
        return self._pool.model_copy(update={"entries": tuple(resolved)})

    async def start(self, device_id: str, timeout_s: float | None = None) -> None:
        """Starts the device (on its port, once it has one) and waits for it to serve."""
        device = self.devices[device_id]
        config = device.config.model_copy(update={"address": device.address})
        process = _spawn(device_command(config, None, self._extra_args), device.log_path)
        device.process = process
        device.starts += 1
        try:
            announced = await asyncio.wait_for(
                _announcement(process), timeout_s or self.start_timeout_s
            )
        except (TimeoutError, DeviceStartError) as error:
            if process.poll() is None:
                process.kill()
            await self._reap(device)
            reason = "did not serve in time" if isinstance(error, TimeoutError) else str(error)
            raise DeviceStartError(
                f"device {device_id} {reason}; its log ends: {self.log_tail(device_id, 12)!r}"
            ) from None
        device.port = int(announced.rpartition(":")[2])
        device.state = "up"

    async def kill(self, device_id: str) -> None:
        """SIGKILL; returns once the process is gone."""
        device = self.devices[device_id]
        self._signal(device, signal.SIGKILL)
        await self._reap(device)

    def stop(self, device_id: str) -> None:
        """SIGSTOP: the device keeps its sockets and answers nothing."""
        device = self.devices[device_id]
        self._signal(device, signal.SIGSTOP)
        device.state = "stopped"

    def resume(self, device_id: str) -> None:
        device = self.devices[device_id]
        self._signal(device, signal.SIGCONT)
        if device.state == "stopped":
            device.state = "up"

    async def terminate(self, device_id: str, grace_s: float = 10.0) -> None:
        """SIGTERM with stdin closed, as ``hetero-router up`` stops a device: it drains and
        exits (with stdin held open its stdin watcher would keep the process alive);
        SIGKILL after ``grace_s``."""
        device = self.devices[device_id]
        self._signal(device, signal.SIGTERM)
        if device.process is not None and device.process.stdin is not None:
            device.process.stdin.close()
        await self._reap(device, grace_s)

    async def load(self, device_id: str, timeout_s: float = 2.0) -> DeviceLoad | None:
        """The device's own Load report (None: it did not answer in time)."""
        device = self.devices[device_id]
        if device.state != "up":
            return None
        # A fresh channel: one that saw the device die may still be backing off.
        async with grpc.aio.insecure_channel(device.address) as channel:
            call = channel.unary_unary(
                _LOAD_METHOD,
                request_serializer=device_pb2.LoadRequest.SerializeToString,
                response_deserializer=device_pb2.LoadResponse.FromString,
            )
            try:
                report = await call(device_pb2.LoadRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError:
                return None
        return DeviceLoad(
            kv_leases=report.kv_leases, running=report.running, waiting=report.waiting
        )

    def log_tail(self, device_id: str, lines: int = 5) -> str:
        path = self.devices[device_id].log_path
        if not path.exists():
            return ""
        with path.open(errors="replace") as log:
            return " | ".join(line.rstrip() for line in deque(log, maxlen=lines))

    async def close(self) -> None:
        """Stops every device: resumed first (a stopped process ignores SIGTERM), then
        its stdin closed (it exits on EOF), SIGTERM, and SIGKILL past the grace."""
        for device in self.devices.values():
            if device.state == "stopped":
                self.resume(device.config.id)
        await asyncio.gather(*(self._close_one(d) for d in self.devices.values()))

    async def _close_one(self, device: Device) -> None:
        process = device.process
        if process is None or process.poll() is not None:
            device.state = "down"
            return
        if process.stdin is not None:
            process.stdin.close()
        self._signal(device, signal.SIGTERM)
        await self._reap(device)

    def _signal(self, device: Device, signum: signal.Signals) -> None:
        process = device.process
        if process is None or process.poll() is not None:
            raise ProcessLookupError(f"device {device.config.id} is not running")
        process.send_signal(signum)

    async def _reap(self, device: Device, grace_s: float = _EXIT_WAIT_S) -> None:
        """Waits for the process to exit, killing it past ``grace_s``."""
        process = device.process
        device.state = "down"
        if process is None:
            return
        try:
            await asyncio.to_thread(process.wait, grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)  # a stopped process dies only once resumed
                process.kill()
            await asyncio.to_thread(process.wait, _EXIT_WAIT_S)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def _spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Starts a device (posix_spawn takes a millisecond: no need to leave the loop)."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            # A device that crashes leaves its Python traceback in its log.
            env={**device_environment(), "PYTHONFAULTHANDLER": "1"},
            close_fds=False,  # with the other defaults, posix_spawn (see above)
        )


async def _announcement(process: subprocess.Popen[bytes]) -> str:
    """The address a device prints once it serves (read in a thread: a pipe of Popen)."""
    if process.stdout is None:
        raise RuntimeError("the device was started without stdout=PIPE")
    line = (await asyncio.to_thread(process.stdout.readline)).decode().strip()
    if not line.startswith(DEVICE_READY_PREFIX):
        code = await asyncio.to_thread(process.wait, _EXIT_WAIT_S)
        raise DeviceStartError(f"exited with {code} before serving")
    return line.removeprefix(DEVICE_READY_PREFIX)
