"""``--workers N``: one supervising parent, N router processes on the same two ports.

The parent checks both doors' addresses free, binds each with SO_REUSEPORT without
listening (port 0 becomes a concrete port here, once) and keeps it bound for its
whole life: the port stays the router's while a worker restarts, and the workers,
binding it with SO_REUSEPORT too, listen on it and share its connections (the kernel
spreads new connections over the listening sockets; the parent's, never listening,
gets none). Each worker is a full router (router.daemon) with its own backend
connections, health checks and KV event subscriptions: what one knows of the
backends it learns from them, as its siblings do, never from a sibling.

The parent serves nothing. It says ``router serving`` once every worker serves,
restarts a worker that exits (after a backoff that doubles while restarts come
quickly), forwards SIGHUP (reload) to every worker, and on SIGINT/SIGTERM asks every
worker to drain (SIGTERM: each stops gracefully) and exits once all have; a second
signal is forwarded too and cuts their drains short. A worker that fails before the
first ``router serving`` fails the start: the others are stopped and the parent exits
with its status. A worker whose parent is gone drains and exits.

Workers are spawned (not forked: grpc and a running loop do not survive a fork) and
run in their own process group, so that a terminal's Ctrl-C reaches them once,
through the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import uvloop

from router.api.listen import check_can_listen, split_address
from router.daemon import Daemon, Worker, build_tracing
from router.errors import ConfigError
from router.logging import configure, get_logger
from router.settings import PoolConfig, Settings

log = get_logger(__name__)

# A restart within this long of the worker's start counts as one more in a row; the
# backoff before restart n in a row is BASE * 2**(n-1), at most MAX.
STABLE_S = 30.0
BACKOFF_BASE_S = 0.25
BACKOFF_MAX_S = 30.0
# What a worker says once it serves: whether it is ready (its view of the backends).
_SERVING_READY = b"serving ready"
_SERVING_NOT_READY = b"serving not ready"
_EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is started with (pickled to it)."""

    settings: Settings
    pool: PoolConfig
    pool_file: Path | None
    worker: Worker


def hold_port(address: str, door: str) -> tuple[list[socket.socket], str]:
    """Binds every address ``address`` names with SO_REUSEPORT, not listening, all on
    one port (the first free one for port 0); the sockets and ``host:port``."""
    check_can_listen(address, door)  # taken by anything else: refused, never shared
    host, port = split_address(address)
    shown_host = f"[{host}]" if ":" in host else host
    resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for attempt in range(8):  # port 0: another process may take the port between binds
        held: list[socket.socket] = []
        chosen = port
        try:
            for family, kind, protocol, _, where in resolved:
                with contextlib.suppress(OSError):  # an address family missing here
                    held.append(_bound(family, kind, protocol, (where[0], chosen, *where[2:])))
                    chosen = held[-1].getsockname()[1]
            if not held:
                raise OSError(f"cannot listen on {address} for {door}: no address binds")
            if len(held) < len(resolved) and port == 0 and attempt < 7:
                raise BlockingIOError  # one of several missing on the chosen port: again
            return held, f"{shown_host}:{chosen}"
        except BlockingIOError:
            for sock in held:
                sock.close()
    raise OSError(f"cannot listen on {address} for {door}: no port free on all its addresses")


def _bound(family: int, kind: int, protocol: int, where: tuple[object, ...]) -> socket.socket:
    sock = socket.socket(family, kind, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(where)
    except OSError:
        sock.close()
        raise
    return sock


@dataclasses.dataclass
class _Slot:
    """Worker ``index``: its current process, and how its restarts are going."""

    index: int
    process: BaseProcess | None = None
    channel: Connection | None = None
    serving: bool = False
    ready: bool = False
    started_at: float = 0.0
    restarts_in_a_row: int = 0
    restarts: int = 0  # in all, since the parent started
    restart: asyncio.TimerHandle | None = None


class Supervisor:
    """The parent of ``settings.workers`` routers over ``pool``."""

    def __init__(self, settings: Settings, pool: PoolConfig, pool_file: Path | None) -> None:
        self.settings = settings
        self.pool = pool
        self.pool_file = pool_file
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(index) for index in range(settings.workers)]
        self._announced = False
        self._stopping = 0  # exit signals received
        self._exit_signal: int | None = None
        self._failed: int | None = None  # the status of a worker that failed the start
        self._statuses: list[int] = []
        self._all_exited = asyncio.Event()
        self._spec: WorkerSpec | None = None
        self.grpc_address = settings.grpc_address
        self.http_address = settings.http_address

    async def serve(self) -> int:
        held: list[socket.socket] = []
        folder = Path(tempfile.mkdtemp(prefix="hetero-router-workers-"))  # mode 0700
        loop = asyncio.get_running_loop()
        try:
            grpc_held, self.grpc_address = hold_port(self.settings.grpc_address, "gRPC")
            held += grpc_held
            http_held, self.http_address = hold_port(self.settings.http_address, "HTTP")
            held += http_held
            settings = self.settings.model_copy(
                update={"grpc_address": self.grpc_address, "http_address": self.http_address}
            )
            count = len(self._slots)
            self._spec = WorkerSpec(settings, self.pool, self.pool_file, Worker(0, count, folder))
            for signum in _EXIT_SIGNALS:
                loop.add_signal_handler(signum, self._exit_requested, signum)
            loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
            for slot in self._slots:
                self._start(slot)
            await self._all_exited.wait()
        finally:
            for signum in (*_EXIT_SIGNALS, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            for sock in held:
                sock.close()
            shutil.rmtree(folder, ignore_errors=True)
        log.info("stopped", workers=len(self._slots), exits=[_said(s) for s in self._statuses])
        if self._failed is not None:
            return self._failed
        if self._stopping > 1 and self._exit_signal is not None:
            return 128 + self._exit_signal
        return 0 if all(status == 0 for status in self._statuses) else 1

    def _start(self, slot: _Slot) -> None:
        if self._spec is None:  # set before any worker starts; this keeps mypy told
            raise RuntimeError("workers start once the ports are held")
        slot.restart = None
        worker = dataclasses.replace(self._spec.worker, index=slot.index, restarts=slot.restarts)
        spec = dataclasses.replace(self._spec, worker=worker)
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=run_worker, args=(spec, theirs), name=f"hetero-router-worker-{slot.index}"
        )
        process.start()
        theirs.close()
        loop = asyncio.get_running_loop()
        slot.process, slot.channel, slot.serving = process, ours, False
        slot.started_at = loop.time()
        loop.add_reader(process.sentinel, self._exited, slot)
        loop.add_reader(ours.fileno(), self._heard, slot)

    def _heard(self, slot: _Slot) -> None:
        """The worker says it serves (or closed its end: it is exiting)."""
        if slot.channel is None:
            return
        try:
            message = slot.channel.recv_bytes()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(slot.channel.fileno())
            return
        if message in (_SERVING_READY, _SERVING_NOT_READY):
            slot.serving, slot.ready = True, message == _SERVING_READY
            self._announce()

    def _announce(self) -> None:
        if self._announced or self._stopping or not all(s.serving for s in self._slots):
            return
        self._announced = True
        log.info(
            "router serving",
            grpc=self.grpc_address,
            http=self.http_address,
            workers=len(self._slots),
            ready=all(s.ready for s in self._slots),
            pids=[s.process.pid for s in self._slots if s.process is not None],
        )

    def _exited(self, slot: _Slot) -> None:
        process, channel = slot.process, slot.channel
        if process is None or channel is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        with contextlib.suppress(ValueError, OSError):  # its end seen closed already
            loop.remove_reader(channel.fileno())
        process.join()
        channel.close()
        slot.process, slot.channel, slot.serving = None, None, False
        status = process.exitcode if process.exitcode is not None else 1
        if self._stopping:
            # Stopped before it could take the signal itself (still starting): nothing
            # of it to drain, a clean stop.
            self._statuses.append(0 if status == -signal.SIGTERM else status)
        elif not self._announced:
            log.error("worker failed to start: stopping the others", worker=slot.index,
                      pid=process.pid, exit=_said(status))  # fmt: skip
            self._failed = status if status > 0 else 1
            self._stop_all(signal.SIGTERM)
        else:
            uptime = loop.time() - slot.started_at
            slot.restarts_in_a_row = 1 if uptime >= STABLE_S else slot.restarts_in_a_row + 1
            slot.restarts += 1
            delay = restart_delay_s(slot.restarts_in_a_row)
            log.warning("worker exited: restarting", worker=slot.index, pid=process.pid,
                        exit=_said(status), restart_in_s=delay,
                        restarts=slot.restarts)  # fmt: skip
            slot.restart = loop.call_later(delay, self._start, slot)
        if all(s.process is None and s.restart is None for s in self._slots):
            self._all_exited.set()

    def _exit_requested(self, signum: int) -> None:
        self._stopping += 1
        name = signal.Signals(signum).name
        if self._stopping == 1:
            log.info("signal received: draining the workers", signal=name)
        else:
            log.warning("signal received while stopping: workers exit now", signal=name)
            self._exit_signal = signum
        self._stop_all(signal.SIGTERM)

    def _stop_all(self, signum: int) -> None:
        self._stopping = max(self._stopping, 1)
        for slot in self._slots:
            if slot.restart is not None:
                slot.restart.cancel()
                slot.restart = None
        self._forward(signum)
        if all(s.process is None for s in self._slots):
            self._all_exited.set()

    def _forward(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            log.info("signal received: reloading the workers", signal="SIGHUP")
        for slot in self._slots:
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
                    os.kill(slot.process.pid, signum)


def restart_delay_s(restarts_in_a_row: int) -> float:
    """The wait before restart ``restarts_in_a_row`` (1: the first after a stable run)."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** (restarts_in_a_row - 1))


def _said(status: int) -> str:
    """An exit status as a person reads it: ``2``, or ``SIGKILL``."""
    if status < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-status).name
    return str(status)


def run_worker(spec: WorkerSpec, channel: Connection) -> None:
    """A worker process: a router on the shared ports, till it is told to stop."""
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent only, which forwards it
    settings = spec.settings
    configure(settings.log_level, settings.log_format, fields={"worker": spec.worker.index})
    try:
        status = uvloop.run(_serve(spec, channel))
    except (ConfigError, ValueError, OSError) as error:
        print(f"hetero-router: worker {spec.worker.index}: {' '.join(str(error).split())}",
              file=sys.stderr)  # fmt: skip
        status = 2
    sys.exit(status)


async def _serve(spec: WorkerSpec, channel: Connection) -> int:
    daemon = Daemon(spec.settings, spec.pool, tracing=build_tracing(spec.settings),
                    pool_file=spec.pool_file, worker=spec.worker)  # fmt: skip
    loop = asyncio.get_running_loop()

    def parent_gone() -> None:  # the parent never writes after the start: EOF
        loop.remove_reader(channel.fileno())
        log.warning("the parent is gone: draining")
        daemon.handle_exit(signal.SIGTERM)

    loop.add_reader(channel.fileno(), parent_gone)
    serving = asyncio.ensure_future(daemon.serve(own_process=True))
    started = asyncio.ensure_future(daemon.started.wait())
    await asyncio.wait({serving, started}, return_when=asyncio.FIRST_COMPLETED)
    if started.done():
        channel.send_bytes(_SERVING_READY if daemon.readiness()[0] else _SERVING_NOT_READY)
    started.cancel()
    try:
        return await serving
    finally:
        loop.remove_reader(channel.fileno())
        channel.close()
