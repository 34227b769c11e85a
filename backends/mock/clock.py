"""The clock a mock device paces its iterations and modelled transfers by.

Servers and engines take it as an argument so that tests put a virtual one in its
place: time that jumps to each deadline, or that stands still until the test lets go.
"""

from __future__ import annotations

import asyncio


class LoopClock:
    """The event loop's clock."""

    def time(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(deadline - self.time(), 0.0))


def next_deadline(previous: float | None, now: float, duration: float) -> float:
    """When an iteration of ``duration`` seconds that starts ``now`` ends.

    ``previous`` is the deadline of the iteration just before, when the engine ran them
    back to back (None after it idled). The new one then ends ``duration`` after that
    deadline, not after now, so a timer that woke late (libuv timers tick in
    milliseconds) makes one step late once rather than every step of a stream late. An
    anchor more than one iteration away from now (compute overran the model) is dropped:
    the iteration starts now rather than bursting to catch up.
    """
    if previous is None or abs(now - previous) > duration:
        return now + duration
    return previous + duration
