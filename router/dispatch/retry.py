"""The retry budget: retries in progress stay a bounded share of the requests in flight.

Envoy's retry budget (``budget_percent`` 20%, ``min_retry_concurrency`` 3): when a
backend fails, every request on it fails over at once, and unbounded retries would
turn one failure into a load spike on the survivors. A retry may start while the
retries in progress are fewer than the larger of ``minimum`` and ``percent`` of the
requests in flight. A retry is in progress until its new attempt has sent its first
frame: from then on it is a request streaming like any other.

Where Envoy refuses a retry over budget, this budget makes it wait, for at most the
caller's limit, for one in progress to finish: the retries after a backend dies then
start at the pace the survivors take them up, rather than fail.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable


class RetryBudget:
    def __init__(
        self, in_flight: Callable[[], int], percent: float = 20.0, minimum: int = 3
    ) -> None:
        if not 0 <= percent <= 100:
            raise ValueError("percent must be between 0 and 100")
        if minimum < 0:
            raise ValueError("minimum must be >= 0")
        self._in_flight = in_flight
        self.percent = percent
        self.minimum = minimum
        self.active = 0  # retries in progress
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> float:
        return max(self.minimum, self.percent / 100 * self._in_flight())

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    @contextlib.asynccontextmanager
    async def held(self, wait_s: float) -> AsyncIterator[bool]:
        """Holds a retry's share while the block runs; yields False (holding nothing)
        when none came free within ``wait_s``."""
        granted = await self._acquire(wait_s)
        try:
            yield granted
        finally:
            if granted:
                self._release()

    async def _acquire(self, wait_s: float) -> bool:
        if self.active < self.limit and not self.waiting:
            self.active += 1
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait_s):
                await waiter
        except TimeoutError:
            return waiter.done() and not waiter.cancelled()  # (granted as it timed out)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the share arrived as the caller left: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        return True

    def _release(self) -> None:
        self.active -= 1
        # The share goes to the oldest waiter, and more while the limit allows (it grows
        # with the requests in flight).
        while self._waiters and self.active < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)
