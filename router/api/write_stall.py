"""Write-stall detection: a stream whose reader stopped reading is cut.

Both doors' writes wait on flow control (HTTP/2 windows for gRPC, the socket's
buffer for HTTP), so a write that stays pending means the reader took nothing.
A guard watches one stream's writes; when one has been pending for
``timeout_s`` it cancels the task writing, and the write raises
:class:`WriteStalledError` instead: the door then closes the request's frames, which
aborts its work on the backends and frees its KV.

One timer per stream, re-armed at most every ``timeout_s``, rather than a
timeout around each write: a write costs two stores and a clock read, where
``asyncio.timeout`` per token frame would cost tens of microseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class WriteStalledError(ConnectionResetError):
    """The reader took nothing for the write-stall timeout; the stream was cut."""


class StallGuard:
    """Guards the writes of the task that creates it (call it from that task)."""

    def __init__(self, timeout_s: float) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a StallGuard guards a task: create it inside one")
        self.timeout_s = timeout_s
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._pending_since: float | None = None
        self.stalled = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(
            self._loop.time() + timeout_s, self._check
        )

    async def write(self, write: Awaitable[T]) -> T:
        """Awaits ``write``; raises WriteStalledError when it stays pending past the timeout."""
        self._pending_since = self._loop.time()
        try:
            return await write
        except asyncio.CancelledError:
            # Ours alone (no other cancellation pending): the stall becomes an error.
            if self.stalled and self._task.uncancel() == 0:
                raise WriteStalledError(
                    f"the reader took nothing for {self.timeout_s:g} s: stream cancelled"
                ) from None
            raise
        finally:
            self._pending_since = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._task.done():
            return
        now = self._loop.time()
        since = self._pending_since
        if since is not None and now - since >= self.timeout_s:
            self.stalled = True
            self._task.cancel()
            return
        due = now + self.timeout_s if since is None else since + self.timeout_s
        self._timer = self._loop.call_at(due, self._check)
