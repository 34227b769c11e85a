"""Scorers: rate each candidate of a leg in [0, 1], higher is better.

A profile weighs them (``weight`` in the policy file) and the max-score picker takes the
best weighted sum, as llm-d's scheduler does. Each scorer sees all candidates of the
leg at once, so it can normalise against the best and worst of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

from router.scheduling.context import Context
from router.scheduling.legs import Leg
from router.scheduling.snapshot import BackendView


class Scorer(Protocol):
    name: ClassVar[str]

    def scores(self, candidates: Sequence[BackendView], leg: Leg, ctx: Context) -> list[float]:
        """One score in [0, 1] per candidate, in order."""
        ...


def _lower_is_better(values: Sequence[float]) -> list[float]:
    """Min-max normalisation: the lowest value scores 1, the highest 0, all equal 1."""
    low = min(values)
    spread = max(values) - low
    if spread <= 0:
        return [1.0] * len(values)
    return [1.0 - (v - low) / spread for v in values]


def _ratio_to_best(values: Sequence[float | None]) -> list[float]:
    """best / value for positive values (the best scores 1); unknown values score 0.5."""
    known = [v for v in values if v is not None and v > 0]
    if known and len(known) == len(values):  # the common case: every candidate has a model
        best = min(known)
        return [best / v for v in known]
    if not known:
        return [0.5 if v is None else 1.0 for v in values]
    best = min(known)
    return [0.5 if v is None else (1.0 if v <= 0 else best / v) for v in values]


class PrefixAffinityScorer:
    """Share of the prompt's leading blocks the backend already holds.

    Blocks it holds are ones the router sent it (or it reported cached): a prefill there
    computes only the rest. Only legs that prefill care; on a decode leg every candidate
    scores the same.
    """

    name: ClassVar[str] = "prefix-affinity"

    def scores(self, candidates: Sequence[BackendView], leg: Leg, ctx: Context) -> list[float]:
        total = len(ctx.features.prefix_hashes)
        matched = ctx.matched_blocks
        if not leg.prefills or not total or not matched:
            return [0.0] * len(candidates)
        return [matched.get(c.id, 0) / total for c in candidates]


class QueueDepthScorer:
    """Fewer prompt tokens waiting for prefill (prefill legs) or fewer requests in flight."""

    name: ClassVar[str] = "queue-depth"

    def scores(self, candidates: Sequence[BackendView], leg: Leg, ctx: Context) -> list[float]:
        if leg.prefills:
            return _lower_is_better([c.queued_prefill_tokens for c in candidates])
        return _lower_is_better([c.outstanding for c in candidates])


class RunningRequestsScorer:
    """Fewer sequences decoding: a smaller batch, a shorter decode iteration."""

    name: ClassVar[str] = "running-requests"

    def scores(self, candidates: Sequence[BackendView], leg: Leg, ctx: Context) -> list[float]:
        return _lower_is_better([c.running for c in candidates])


class KvUtilizationScorer:
    """More free KV memory: less risk of waiting for memory or of preemption."""

    name: ClassVar[str] = "kv-utilization"

    def scores(self, candidates: Sequence[BackendView], leg: Leg, ctx: Context) -> list[float]:
        return [c.kv_free_fraction for c in candidates]


class PredictedLatencyScorer:
    """The performance model's TTFT (prefill legs) or TPOT (decode legs): a decode
    iteration, stretched by the prefills queued on that backend (a backend that also
    prefills runs them ahead of decoding)."""

    name: ClassVar[str] = "predicted-latency"

    def scores(self, candidates: Sequence[BackendView], leg: Leg, ctx: Context) -> list[float]:
        if leg is Leg.PREFILL:
            return _ratio_to_best([ctx.ttft_s(c) for c in candidates])
        if leg is Leg.DECODE:
            gaps = max(ctx.features.max_tokens - 1, 1)
            values: list[float | None] = []
            for c in candidates:
                step = ctx.step_s(c)
                values.append(None if step is None else step + c.queue_wait_s / gaps)
            return _ratio_to_best(values)
        # Colocated: the request's whole expected duration.
        tokens = ctx.features.max_tokens
        values = []
        for c in candidates:
            ttft, step = ctx.ttft_s(c), ctx.step_s(c)
            values.append(None if ttft is None or step is None else ttft + tokens * step)
        return _ratio_to_best(values)


class CostScorer:
    """Dollars per token of the leg on this device: its cost per second times the device
    time the leg takes (a decode iteration shared by its batch).

    The cost per second is the profile's price per hour (a cloud rental, power
    included); for hardware one owns, ``usd_per_kwh`` adds the energy the profile's
    power draw costs at that tariff.
    """

    name: ClassVar[str] = "cost"

    def __init__(self, usd_per_kwh: float = 0.0) -> None:
        if not usd_per_kwh >= 0:
            raise ValueError(f"usd_per_kwh must be >= 0, got {usd_per_kwh}")
        # Dollars per second per watt drawn.
        self._usd_per_watt_second = usd_per_kwh / 3.6e6

    def scores(self, candidates: Sequence[BackendView], leg: Leg, ctx: Context) -> list[float]:
        values: list[float | None] = []
        for c in candidates:
            perf = c.perf
            if perf is None:
                values.append(None)
                continue
            seconds = 0.0
            if leg.prefills:
                seconds += ctx.prefill_s(c) or 0.0
            if leg.decodes:
                seconds += ctx.decode_share_s(c) or 0.0
            per_second = perf.price_per_second_usd + perf.power_watts * self._usd_per_watt_second
            values.append(per_second * seconds)
        return _ratio_to_best(values)
