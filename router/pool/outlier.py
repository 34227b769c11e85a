"""Passive outlier detection: backends that fail requests in a row leave service a while.

Envoy's consecutive-errors detection, with its defaults: a backend whose last
``consecutive_failures`` requests (5) failed is ejected for ``base_ejection_s`` (30 s)
times the number of times it was ejected (so a backend that keeps failing stays out
longer, up to ``max_ejection_s``, 300 s); every ``base_ejection_s`` without an
ejection takes one off that count. At most ``max_ejected_fraction`` (half) of the backends of one
role and model are ejected at once, so that a fault everywhere (a bad model push, the
router's own network) degrades service instead of emptying the pool. Health checks
run besides: an ejected backend passing them stays out until its time is up.

Pure bookkeeping over an injected clock: the pool applies the verdicts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass
class _Record:
    group: tuple[str, str]  # (role, model): what "half of a role" counts over
    failures: int = 0  # consecutive
    ejections: int = 0  # the multiplier of the next ejection's length
    ejected_until: float | None = None
    last_change: float = 0.0  # the last ejection or return, for the multiplier's decay


class OutlierDetector:
    def __init__(
        self,
        groups: Iterable[tuple[str, tuple[str, str]]],
        *,
        consecutive_failures: int = 5,
        base_ejection_s: float = 30.0,
        max_ejection_s: float = 300.0,
        max_ejected_fraction: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        self.consecutive_failures = consecutive_failures
        self.base_ejection_s = base_ejection_s
        self.max_ejection_s = max_ejection_s
        self.max_ejected_fraction = max_ejected_fraction
        self._clock = clock
        self._records = {backend_id: _Record(group) for backend_id, group in groups}

    def add(self, backend_id: str, group: tuple[str, str]) -> None:
        """A backend new to the pool, in (role, model) ``group``."""
        self._records.setdefault(backend_id, _Record(group))

    def remove(self, backend_id: str) -> None:
        """A backend that left the pool: forgotten, and no longer counted in its group."""
        self._records.pop(backend_id, None)

    def ejected(self, backend_id: str) -> bool:
        return self._records[backend_id].ejected_until is not None

    def succeeded(self, backend_id: str) -> None:
        record = self._records.get(backend_id)
        if record is not None:
            record.failures = 0

    def failed(self, backend_id: str) -> float | None:
        """Counts a failed request; the ejection's length in seconds when this one ejects it."""
        record = self._records.get(backend_id)
        if record is None:  # it left the pool while the request ran
            return None
        record.failures += 1
        if record.ejected_until is not None or record.failures < self.consecutive_failures:
            return None
        if not self._may_eject(record):
            return None
        now = self._clock()
        # The multiplier decays by one per base period spent without an ejection.
        if self.base_ejection_s > 0:
            quiet = int((now - record.last_change) // self.base_ejection_s)
            record.ejections = max(0, record.ejections - quiet)
        record.ejections += 1
        duration = min(self.base_ejection_s * record.ejections, self.max_ejection_s)
        record.ejected_until = now + duration
        record.last_change = now
        record.failures = 0
        return duration

    def returning(self) -> list[str]:
        """Backends whose ejection is over: back in service from now."""
        now = self._clock()
        back = [
            backend_id
            for backend_id, record in self._records.items()
            if record.ejected_until is not None and record.ejected_until <= now
        ]
        for backend_id in back:
            record = self._records[backend_id]
            record.ejected_until = None
            record.last_change = now
        return back

    def _may_eject(self, record: _Record) -> bool:
        group = [r for r in self._records.values() if r.group == record.group]
        ejected = sum(1 for r in group if r.ejected_until is not None)
        return ejected + 1 <= self.max_ejected_fraction * len(group)
