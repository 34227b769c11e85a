"""What was measured and what it means: per-request timings, SLOs, run summaries.

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

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

__all__ = [
    "SLO",
    "SLO_PRESETS",
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


@dataclass(frozen=True)
class SLO:
    """Per-request latency limits, in seconds; a limit left at None is not checked."""

    name: str
    ttft_s: float | None = None
    tpot_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            limit: float | None = getattr(self, key)
            if limit is not None and not (math.isfinite(limit) and limit > 0):
                raise ValueError(f"SLO {self.name!r}: {key} must be finite and > 0, got {limit}")

    def met_by(self, record: RequestRecord) -> bool:
        """Whether ``record`` is a good request: every set limit holds, inclusively.

        Mirrors vLLM's benchmark_serving ``--goodput ttft:..,tpot:..,e2el:..``: a
        request counts only if it succeeded and meets every limit at once, and a
        request with one output token has no TPOT to violate. The ITL limit, which
        vLLM does not offer, applies to every single gap: one stall a reader notices
        is a miss even when the average pace is fine.
        """
        ttft = record.ttft_s
        if record.outcome != OK or ttft is None:
            return False
        if self.ttft_s is not None and ttft > self.ttft_s:
            return False
        if self.tpot_s is not None:
            tpot = record.tpot_s
            if tpot is not None and tpot > self.tpot_s:
                return False
        if self.itl_s is not None:
            limit = self.itl_s
            if any(gap > limit for gap in record.itls_s()):
                return False
        if self.e2e_s is not None:
            e2e = record.e2e_s
            # Without an end time the request cannot show it finished in time.
            if e2e is None or e2e > self.e2e_s:
                return False
        return True

    def met_by_arrays(
        self,
        *,
        ok: BoolArray,
        ttft_s: FloatArray,
        tpot_s: FloatArray,
        max_itl_s: FloatArray,
        e2e_s: FloatArray,
    ) -> BoolArray:
        """:meth:`met_by` over many requests at once, one array element per request.

        A NaN TPOT or largest gap means the request had one output token, which has
        none to violate (as in :meth:`met_by`); ``ok`` is False for every request that
        did not complete.
        """
        good = ok.copy()
        with np.errstate(invalid="ignore"):
            if self.ttft_s is not None:
                good &= ttft_s <= self.ttft_s
            if self.tpot_s is not None:
                good &= ~(tpot_s > self.tpot_s)
            if self.itl_s is not None:
                good &= ~(max_itl_s > self.itl_s)
            if self.e2e_s is not None:
                good &= e2e_s <= self.e2e_s
        return good


_DISTSERVE = (
    "DistServe (Zhong et al., OSDI'24), Table 1 SLOs, "
    "set from the vLLM/OPT latency of each workload"
)

SLO_PRESETS: dict[str, SLO] = {
    "chatbot": SLO(
        name="chatbot",
        ttft_s=0.25,
        tpot_s=0.1,
        source=f"{_DISTSERVE}: chatbot, OPT-13B on ShareGPT (TTFT 0.25 s, TPOT 0.1 s)",
    ),
    "code": SLO(
        name="code",
        ttft_s=0.125,
        tpot_s=0.2,
        source=f"{_DISTSERVE}: code completion, OPT-66B on HumanEval (TTFT 0.125 s, TPOT 0.2 s)",
    ),
    "summarization": SLO(
        name="summarization",
        ttft_s=15.0,
        tpot_s=0.15,
        source=f"{_DISTSERVE}: summarization, OPT-66B on LongBench (TTFT 15 s, TPOT 0.15 s)",
    ),
    "interactive": SLO(
        name="interactive",
        ttft_s=0.2,
        itl_s=0.025,
        source=(
            "this project's target for streaming chat: first token within 200 ms (the "
            "DistServe authors' example of a chatbot's fast initial response) and no gap over "
            "25 ms, i.e. a steady 40 tokens/s or better, faster than people read"
        ),
    ),
    "sram-decode": SLO(
        name="sram-decode",
        ttft_s=0.5,
        tpot_s=0.005,
        source=(
            "this project's own target, not from a paper: decode at 200 tokens/s per stream "
            "(5 ms TPOT), the pace that justifies routing decode to SRAM-class devices, with "
            "500 ms allowed for prefill on another device and the KV handoff"
        ),
    ),
}


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
    records: Sequence[RequestRecord], duration_s: float, slo: SLO | None = None
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
        good = sum(1 for r in records if slo.met_by(r))
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
