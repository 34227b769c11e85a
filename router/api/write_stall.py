"""Write-stall detection: a stream whose reader stopped reading is cut.

Both doors' writes wait on flow control (HTTP/2 windows for gRPC, the socket's
buffer for HTTP), so a write that stays pending means the reader took nothing.
A guard watches one stream's writes; when one has been pending for
``timeout_s`` it cancels the task writing, and the write raises
:class:`WriteStalledError` instead: the door then closes the request's frames, which
aborts its work on the backends and frees its KV.

One lazy timer per stream (``router.dispatch.deadline``) rather than a timeout
around each write, which would cost tens of microseconds a token frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from router.dispatch.deadline import Deadline, DeadlineExpiredError

T = TypeVar("T")


class WriteStalledError(ConnectionResetError):
    """The reader took nothing for the write-stall timeout; the stream was cut."""


class StallGuard:
    """Guards the writes of the task that creates it (call it from that task)."""

    def __init__(self, timeout_s: float) -> None:
        if asyncio.current_task() is None:
            raise RuntimeError("a StallGuard guards a task: create it inside one")
        self.timeout_s = timeout_s
        self._deadline = Deadline()

    async def write(self, write: Awaitable[T]) -> T:
        """Awaits ``write``; raises WriteStalledError when it stays pending past the timeout."""
        try:
            return await self._deadline.wait(write, self.timeout_s)
        except DeadlineExpiredError:
            raise WriteStalledError(
                f"the reader took nothing for {self.timeout_s:g} s: stream cancelled"
            ) from None

    def close(self) -> None:
        self._deadline.close()
