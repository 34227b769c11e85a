"""Admission: a bound on the requests served at once, and a bounded queue per priority.

Up to ``max_in_flight`` requests are served at once. A request beyond that waits in
the FIFO of its priority (0..9, larger is more urgent); each freed slot goes to the
head of the most urgent non-empty queue, so urgent requests overtake but equals
never do. A request whose queue already holds ``queue_limit`` is shed at once with
``OverloadedError`` (RESOURCE_EXHAUSTED / 429) and a retry hint: how long the
requests ahead of it take to be admitted at the recent completion rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from backends.errors import OverloadedError
from router.metrics import RouterMetrics

PRIORITIES = 10  # priority levels: 0 (least urgent) .. 9 (most urgent)
RETRY_AFTER_MIN_S = 0.05
RETRY_AFTER_MAX_S = 30.0
# The hint when nothing finished recently to measure a rate with.
RETRY_AFTER_UNKNOWN_S = 1.0
# Completions the rate is measured over.
_RATE_WINDOW = 64


class AdmissionGate:
    def __init__(
        self,
        max_in_flight: int,
        queue_limit: int,
        metrics: RouterMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if queue_limit < 0:
            raise ValueError("queue_limit must be >= 0")
        self.max_in_flight = max_in_flight
        self.queue_limit = queue_limit
        self._metrics = metrics
        self._clock = clock
        self._in_flight = 0
        self._queues: tuple[deque[asyncio.Future[None]], ...] = tuple(
            deque() for _ in range(PRIORITIES)
        )
        self._released_at: deque[float] = deque(maxlen=_RATE_WINDOW)
        for priority in range(PRIORITIES):
            self._depth_changed(priority)

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet released."""
        return self._in_flight

    def waiting(self, priority: int | None = None) -> int:
        """Requests queued at ``priority``, or at every priority when None."""
        if priority is None:
            return sum(len(queue) for queue in self._queues)
        return len(self._queues[priority])

    @contextlib.asynccontextmanager
    async def admitted(self, priority: int) -> AsyncIterator[bool]:
        """Holds a slot while the block runs; yields whether the request had to queue."""
        queued = await self.acquire(priority)
        try:
            yield queued
        finally:
            self.release()

    async def acquire(self, priority: int) -> bool:
        """Takes a slot, waiting for one if all are taken; True when it had to wait.

        Raises OverloadedError when the queue of ``priority`` is full. A caller
        cancelled while waiting leaves the queue and holds nothing.
        """
        if not 0 <= priority < PRIORITIES:
            raise ValueError(f"priority must be between 0 and {PRIORITIES - 1}, got {priority}")
        if self._in_flight < self.max_in_flight:
            self._in_flight += 1
            return False
        queue = self._queues[priority]
        if len(queue) >= self.queue_limit:
            self._metrics.shed.labels("queue_full").inc()
            raise OverloadedError(
                f"the router is at capacity ({self.max_in_flight} requests in flight) and "
                f"the queue for priority {priority} is full ({len(queue)} waiting)",
                retry_after_s=self.retry_after_s(priority),
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        self._depth_changed(priority)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived as the caller left: pass it on
            else:
                with contextlib.suppress(ValueError):
                    queue.remove(waiter)
                self._depth_changed(priority)
            raise
        return True

    def release(self) -> None:
        """Frees a slot: to the head of the most urgent queue, else back to the pool."""
        self._released_at.append(self._clock())
        for priority in range(PRIORITIES - 1, -1, -1):
            queue = self._queues[priority]
            if not queue:
                continue
            while queue:
                waiter = queue.popleft()
                if not waiter.done():  # a cancelled waiter's future is done already
                    waiter.set_result(None)
                    self._depth_changed(priority)
                    return  # the slot moves to the waiter: in_flight stays the same
            self._depth_changed(priority)
        self._in_flight -= 1

    def retry_after_s(self, priority: int) -> float:
        """Seconds until a request of ``priority`` arriving now would likely be admitted."""
        ahead = sum(len(queue) for queue in self._queues[priority:]) + 1
        if len(self._released_at) < 2:
            return RETRY_AFTER_UNKNOWN_S
        # Completions since the oldest one remembered, over the time since it: a rate
        # that falls when completions stop.
        span = max(self._clock() - self._released_at[0], 1e-3)
        rate = (len(self._released_at) - 1) / span
        return min(max(ahead / rate, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)

    def _depth_changed(self, priority: int) -> None:
        self._metrics.admission_queue_depth.labels(str(priority)).set(len(self._queues[priority]))
