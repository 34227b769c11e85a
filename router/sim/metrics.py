"""What was measured and what it means: per-request timings, whether they met an SLO, summaries.

Latency distributions describe the requests that completed; SLO attainment and
goodput are over *every* request sent, because a request the system shed or
failed is the worst possible latency, not a missing sample. The load generator
(bench/) and the simulator judge requests by these same definitions, so their
figures compare.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from router.scheduling.slo import Slo

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

__all__ = [
    "Distribution",
    "RequestRecord",
    "RunSummary",
    "percentile",
    "summarize",
]

OK = "ok"


@dataclass
class RequestRecord:
    """One request as the load generator saw it; all times are ``time.monotonic()``."""

    start_s: float
    first_token_s: float | None = None
    end_s: float | None = None
    # One entry per token: tokens that arrive in one message share a time.
    token_times_s: list[float] = field(default_factory=list)
    outcome: str = OK
    prompt_tokens: int = 0

    @property
    def ttft_s(self) -> float | None:
        if self.first_token_s is None:
            return None
        return self.first_token_s - self.start_s

    @property
    def e2e_s(self) -> float | None:
        if self.end_s is None:
            return None
        return self.end_s - self.start_s

    @property
    def output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens.

        Measured between token arrivals rather than from ``end_s`` (as vLLM does) so the
        stream's trailer and teardown do not count as decoding time.
        """
        times = self.token_times_s
        if len(times) < 2:
            return None
        return (times[-1] - times[0]) / (len(times) - 1)

    def itls_s(self) -> list[float]:
        """Gaps between consecutive tokens.

        Tokens delivered together give zero gaps: that is what a reader sees, and it
        keeps the mean ITL equal to the TPOT of the same request.
        """
        return [later - earlier for earlier, later in itertools.pairwise(self.token_times_s)]

    def meets(self, slo: Slo) -> bool:
        """Whether this is a good request: it succeeded and every set limit holds.

        Mirrors vLLM's benchmark_serving ``--goodput ttft:..,tpot:..,e2el:..``: a
        request counts only if it succeeded and meets every limit at once, and a
        request with one output token has no TPOT to violate. The ITL limit, which
        vLLM does not offer, applies to every single gap: one stall a reader notices
        is a miss even when the average pace is fine.
        """
        ttft = self.ttft_s
        if self.outcome != OK or ttft is None:
            return False
        e2e = self.e2e_s
        # Without an end time the request cannot show it finished in time.
        if e2e is None and slo.e2e_s is not None:
            return False
        return slo.met_by(ttft, self.tpot_s, max_itl_s=max(self.itls_s(), default=None), e2e_s=e2e)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linearly interpolated like numpy's default.

    Empty input gives NaN rather than raising: a scenario where nothing succeeded
    should still produce a report that says so.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    if len(values) == 0:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _json_number(value: float, scale: float) -> float | None:
    # JSON has no NaN; null says "no data" to every reader.
    return None if math.isnan(value) else value * scale


@dataclass(frozen=True)
class Distribution:
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    count: int

    @classmethod
    def of_values(cls, values: Iterable[float]) -> Distribution:
        data = np.fromiter(values, dtype=np.float64)
        if data.size == 0:
            nan = math.nan
            return cls(mean=nan, p50=nan, p90=nan, p99=nan, max=nan, count=0)
        p50, p90, p99 = (float(v) for v in np.percentile(data, [50, 90, 99]))
        return cls(
            mean=float(data.mean()),
            p50=p50,
            p90=p90,
            p99=p99,
            max=float(data.max()),
            count=int(data.size),
        )

    def to_dict(self, scale: float = 1.0) -> dict[str, float | int | None]:
        """JSON-ready; ``scale`` converts units (1000 for seconds to milliseconds)."""
        return {
            "mean": _json_number(self.mean, scale),
            "p50": _json_number(self.p50, scale),
            "p90": _json_number(self.p90, scale),
            "p99": _json_number(self.p99, scale),
            "max": _json_number(self.max, scale),
            "count": self.count,
        }


@dataclass(frozen=True)
class RunSummary:
    requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_token_throughput: float
    ttft_s: Distribution
    tpot_s: Distribution
    itl_s: Distribution
    e2e_s: Distribution
    slo: str | None
    slo_attainment: float | None
    goodput: float | None
    # How many requests ended each way ("ok", "timeout", "RESOURCE_EXHAUSTED", ...).
    outcomes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: latencies in milliseconds, NaN as null."""
        return {
            "requests": self.requests,
            "completed": self.completed,
            "failed": self.failed,
            "duration_s": self.duration_s,
            "request_throughput": self.request_throughput,
            "output_token_throughput": self.output_token_throughput,
            "ttft_ms": self.ttft_s.to_dict(1000.0),
            "tpot_ms": self.tpot_s.to_dict(1000.0),
            "itl_ms": self.itl_s.to_dict(1000.0),
            "e2e_ms": self.e2e_s.to_dict(1000.0),
            "slo": self.slo,
            "slo_attainment": (
                None if self.slo_attainment is None else _json_number(self.slo_attainment, 1.0)
            ),
            "goodput": self.goodput,
            "outcomes": dict(sorted(self.outcomes.items())),
        }


def summarize(
    records: Sequence[RequestRecord], duration_s: float, slo: Slo | None = None
) -> RunSummary:
    """One run's figures.

    Latency distributions cover completed (``ok``) requests only: a timeout's partial
    stream would otherwise pass for a fast request. Output token throughput counts
    every token that reached the client, whatever the request's outcome, because the
    system did that work; goodput is the figure that discounts it. Attainment is over
    all requests, so shedding load can never raise it.
    """
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be finite and > 0, got {duration_s!r}")
    done = [r for r in records if r.outcome == OK]
    ttfts = [t for r in done if (t := r.ttft_s) is not None]
    tpots = [t for r in done if (t := r.tpot_s) is not None]
    e2es = [t for r in done if (t := r.e2e_s) is not None]
    itls = [gap for r in done for gap in r.itls_s()]

    attainment: float | None = None
    goodput: float | None = None
    if slo is not None:
        good = sum(1 for r in records if r.meets(slo))
        attainment = good / len(records) if records else math.nan
        goodput = good / duration_s

    return RunSummary(
        requests=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        duration_s=duration_s,
        request_throughput=len(done) / duration_s,
        output_token_throughput=sum(r.output_tokens for r in records) / duration_s,
        ttft_s=Distribution.of_values(ttfts),
        tpot_s=Distribution.of_values(tpots),
        itl_s=Distribution.of_values(itls),
        e2e_s=Distribution.of_values(e2es),
        slo=None if slo is None else slo.name,
        slo_attainment=attainment,
        goodput=goodput,
        outcomes=dict(Counter(r.outcome for r in records)),
    )
