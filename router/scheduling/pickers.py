"""Pickers: one backend out of the candidates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from router.pool.snapshot import BackendView


class Picker(Protocol):
    def pick(self, candidates: Sequence[BackendView], sequence: int) -> BackendView: ...


class LeastOutstandingPicker:
    """Fewest requests in flight from this router; ties rotate with the arrival sequence."""

    name = "least-outstanding"

    def pick(self, candidates: Sequence[BackendView], sequence: int) -> BackendView:
        if not candidates:
            raise ValueError("no candidates to pick from")
        fewest = min(c.outstanding for c in candidates)
        tied = [c for c in candidates if c.outstanding == fewest]
        return tied[sequence % len(tied)]
