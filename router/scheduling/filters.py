"""Filters: drop candidates that cannot serve a leg at all, before anything is scored."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

from router.scheduling.context import Context
from router.scheduling.legs import Leg
from router.scheduling.snapshot import BackendView, Candidates


class Filter(Protocol):
    name: ClassVar[str]

    def apply(
        self, candidates: Sequence[BackendView], leg: Leg, ctx: Context
    ) -> Sequence[BackendView]:
        """The candidates that may serve the leg, in their order."""
        ...


class KvFitsFilter:
    """Drops backends whose whole KV memory is smaller than the leg needs.

    Such a request can never run there; sending it would only come back as
    RESOURCE_EXHAUSTED after a round trip. Backends of unknown capacity are kept.
    """

    name: ClassVar[str] = "kv-fits"

    def apply(
        self, candidates: Sequence[BackendView], leg: Leg, ctx: Context
    ) -> Sequence[BackendView]:
        features = ctx.features
        needed = features.prompt_tokens + (features.max_tokens if leg.decodes else 1)
        if isinstance(candidates, Candidates):  # the snapshot's own list: its minimum is cached
            if needed <= ctx.snapshot.min_kv_capacity(candidates):
                return candidates
        elif all(c.kv_capacity >= needed or not c.kv_capacity for c in candidates):
            return candidates
        return [c for c in candidates if c.kv_capacity >= needed or not c.kv_capacity]
