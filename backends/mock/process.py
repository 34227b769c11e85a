"""Running one mock device as a process: serve, announce readiness, stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import structlog

from backends.mock.config import DeviceConfig
from backends.mock.server import DeviceServer

READY_PREFIX = "READY "

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)


async def run_device(
    config: DeviceConfig, listen: str, *, announce: bool = False, exit_with_stdin: bool = False
) -> None:
    """Serves until SIGINT/SIGTERM (or stdin closing, when the parent owns our stdin).

    With ``announce``, prints ``READY host:port`` on stdout once serving, so a
    parent waits for readiness by reading a line instead of polling.
    """
    server = DeviceServer(config)
    await server.start(listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    watcher = asyncio.create_task(_wait_stdin_closed(stop)) if exit_with_stdin else None
    if announce:
        print(f"{READY_PREFIX}{server.address}", flush=True)
    events = server.kv_events
    log.info(
        "device serving",
        profile=config.profile,
        model=config.model,
        address=server.address,
        **(
            {}
            if events is None
            else {"kv_events": events.endpoint, "kv_events_replay": events.replay_endpoint}
        ),
    )
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await server.stop(grace_s=1.0)


async def _wait_stdin_closed(stop: asyncio.Event) -> None:
    """The parent holds our stdin; EOF means it is gone, so we go too (no orphans)."""
    await asyncio.to_thread(sys.stdin.buffer.read)
    stop.set()
