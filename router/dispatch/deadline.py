"""Deadlines on one task's awaits, with one lazy timer rather than one per await.

A stream waits for many things in turn (the backend's next frame, the reader taking
the last one), each under a limit. ``asyncio.timeout`` around each would push and
pop a timer for every token (tens of microseconds); here each wait only moves the
deadline, and a timer that fires early (the deadline moved on since) re-arms itself.
``interrupt`` cuts the current wait short, and every later one.

On expiry the task is cancelled at the await it waits on, and the cancel becomes
:class:`DeadlineExpiredError`, also when the awaited code turned it into its own
error or swallowed it: no cancel is left pending on the task. A cancel from
elsewhere (the client went away) passes through untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import TypeVar

_T = TypeVar("_T")


class DeadlineExpiredError(Exception):
    """A wait outlasted its limit, or was interrupted (``Deadline.interrupted``)."""


class Deadline:
    """Bounds the awaits of the task that creates it, one at a time."""

    __slots__ = (
        "_armed_for",
        "_deadline",
        "_expired",
        "_handle",
        "_loop",
        "_task",
        "_waiting",
        "interrupted",
    )

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._deadline = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0.0  # when the timer fires
        self._waiting = False
        self._expired = False
        self.interrupted = False

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """No wait expires after this. The task is let go: it often holds what holds
        this deadline (its result, a response that guards its writes), and the cycle
        would otherwise wait for the garbage collector."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._waiting:  # (a wait still under way keeps it: its expiry is its own)
            self._task = None

    def interrupt(self) -> None:
        """Ends the current wait at once, and every later one before it starts."""
        self.interrupted = True
        self._expire()

    async def wait(self, work: Awaitable[_T], limit_s: float) -> _T:
        """Awaits ``work``; DeadlineExpiredError when it takes over ``limit_s``."""
        if self.interrupted:
            if isinstance(work, Coroutine):
                work.close()
            raise DeadlineExpiredError
        self._deadline = self._loop.time() + limit_s
        if self._handle is None:
            self._arm()
        elif self._armed_for > self._deadline:  # a shorter limit than the last one
            self._handle.cancel()
            self._arm()
        self._waiting, self._expired = True, False
        try:
            result = await work
        except asyncio.CancelledError:
            if not self._expired or self._task is None or self._task.uncancel() > 0:
                raise  # cancelled from elsewhere
            raise DeadlineExpiredError from None
        except BaseException as error:
            if self._expired and self._task is not None:
                # The awaited code turned the cancel into its own error.
                self._task.uncancel()
                raise DeadlineExpiredError from error
            raise
        finally:
            self._waiting = False
        if self._expired and self._task is not None:
            # The awaited code swallowed the cancel and answered.
            self._task.uncancel()
            raise DeadlineExpiredError
        return result

    def _expire(self) -> None:
        if self._waiting and not self._expired and self._task is not None:
            self._expired = True
            self._task.cancel()  # delivered at the await in ``wait``: the task waits there

    def _on_timer(self) -> None:
        self._handle = None
        if not self._waiting:
            return  # between waits: the next one arms the timer again
        if self._loop.time() >= self._deadline:
            self._expire()
        else:
            self._arm()

    def _arm(self) -> None:
        self._armed_for = self._deadline
        self._handle = self._loop.call_at(self._deadline, self._on_timer)
