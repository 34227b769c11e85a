"""The retry budget: retries in progress stay a bounded share of the requests in flight.

Envoy's retry budget (``budget_percent`` 20%, ``min_retry_concurrency`` 3): when a
backend fails, every request on it fails over at once, and unbounded retries would
turn one failure into a load spike on the survivors. A retry is allowed while the
retries in progress are fewer than the larger of ``minimum`` and ``percent`` of the
requests in flight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class RetryBudget:
    def __init__(self, percent: float = 20.0, minimum: int = 3) -> None:
        if not 0 <= percent <= 100:
            raise ValueError("percent must be between 0 and 100")
        if minimum < 0:
            raise ValueError("minimum must be >= 0")
        self.percent = percent
        self.minimum = minimum
        self.active = 0  # retries in progress

    def allows(self, in_flight: int) -> bool:
        return self.active < max(self.minimum, self.percent / 100 * in_flight)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Counts one retry in progress while the block runs."""
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
