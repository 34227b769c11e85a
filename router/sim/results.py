"""What a simulation measured, per request and per device, and the figures it adds up to.

Requests are kept as columns (numpy arrays), not objects: a simulated hour holds
hundreds of thousands of them, and every figure is a vector operation over them.
Latencies follow router.sim.metrics (the load generator's definitions): TPOT is the
time from the first to the last token over the tokens after the first, and a request
that was shed or failed misses its SLO rather than dropping out of the count.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from router.scheduling.slo import Slo
from router.sim.cluster import Cluster
from router.sim.metrics import BoolArray, Distribution, FloatArray

IntArray = npt.NDArray[np.int64]

SECONDS_PER_HOUR = 3600.0


class Outcome(enum.Enum):
    PENDING = "unfinished"  # still in the system when a run stopped early
    OK = "ok"
    SHED = "shed"  # admission refused it (policy, or the router's queue was full)
    UNAVAILABLE = "unavailable"  # no backend could take it
    REJECTED = "rejected"  # the policy refused it for another reason
    FAILED = "failed"  # a device could never hold its KV


@dataclass(frozen=True)
class DeviceStats:
    id: str
    profile: str
    role: str
    chips: int
    price_per_hour_usd: float
    busy_s: float
    prefill_iterations: int
    prefill_tokens: int
    decode_iterations: int
    decode_tokens: int
    kv_peak_tokens: int
    kv_capacity_tokens: int

    def to_dict(self, makespan_s: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "profile": self.profile,
            "role": self.role,
            "chips": self.chips,
            "price_per_hour_usd": self.price_per_hour_usd,
            "utilization": self.busy_s / makespan_s if makespan_s > 0 else 0.0,
            "prefill_iterations": self.prefill_iterations,
            "prefill_tokens": self.prefill_tokens,
            "decode_iterations": self.decode_iterations,
            "decode_tokens": self.decode_tokens,
            "mean_decode_batch": (
                self.decode_tokens / self.decode_iterations if self.decode_iterations else 0.0
            ),
            "kv_peak_tokens": self.kv_peak_tokens,
            "kv_capacity_tokens": self.kv_capacity_tokens,
        }


@dataclass(frozen=True, eq=False)
class SimResult:
    """Every request of one run, as columns, and every device's statistics.

    ``prefill_device`` and ``decode_device`` index ``devices`` (-1: none); a colocated
    request has the same index in both. Latencies are NaN where they do not apply.
    ``slo_class`` is each request's SLO class: what it is judged by when every class
    has an SLO of its own.
    """

    cluster: Cluster
    devices: tuple[DeviceStats, ...]
    arrival_s: FloatArray
    prompt_tokens: IntArray
    output_tokens: IntArray
    cached_tokens: IntArray
    outcome: npt.NDArray[np.str_]
    slo_class: npt.NDArray[np.str_]
    split: BoolArray
    prefill_device: IntArray
    decode_device: IntArray
    ttft_s: FloatArray
    tpot_s: FloatArray
    e2e_s: FloatArray
    max_itl_s: FloatArray
    makespan_s: float
    stopped_early: bool
    wall_s: float
    cpu_s: float

    @property
    def requests(self) -> int:
        return len(self.arrival_s)

    @property
    def ok(self) -> BoolArray:
        served: BoolArray = self.outcome == Outcome.OK.value
        return served

    def good(self, slo: Slo | Mapping[str, Slo]) -> BoolArray:
        """:meth:`Slo.met_by` of every request at once; one that did not complete misses.

        ``slo`` is one for every request, or one per SLO class (each request held to its
        class's; a class without one is a ValueError)."""
        if isinstance(slo, Slo):
            met: BoolArray = self.ok & slo.met_by_arrays(
                self.ttft_s, self.tpot_s, self.max_itl_s, self.e2e_s
            )
            return met
        met = np.zeros(self.requests, dtype=np.bool_)
        for slo_class in np.unique(self.slo_class).tolist():
            if slo_class not in slo:
                raise ValueError(f"no SLO given for class {slo_class!r}")
            mine = self.slo_class == slo_class
            met[mine] = self.good(slo[slo_class])[mine]
        return met

    def attainment(self, slo: Slo | Mapping[str, Slo]) -> float:
        """Share of every request sent that met ``slo`` (NaN for an empty run)."""
        return float(self.good(slo).mean()) if self.requests else math.nan

    def attainment_by_class(self, slo: Slo | Mapping[str, Slo]) -> dict[str, float]:
        """:meth:`attainment` of each SLO class's requests alone."""
        good = self.good(slo)
        return {
            slo_class: float(good[self.slo_class == slo_class].mean())
            for slo_class in np.unique(self.slo_class).tolist()
        }

    def summary(self, slo: Slo | Mapping[str, Slo] | None = None) -> SimSummary:
        return SimSummary.of(self, slo)


@dataclass(frozen=True)
class SimSummary:
    """The figures of one run; latencies in seconds, money in USD."""

    cluster: str
    devices: int
    price_per_hour_usd: float
    requests: int
    outcomes: dict[str, int]
    split_fraction: float
    makespan_s: float
    ttft_s: Distribution
    tpot_s: Distribution
    e2e_s: Distribution
    max_itl_s: Distribution
    request_throughput: float
    output_tokens: int
    output_token_throughput: float
    cost_per_million_output_tokens_usd: float
    prefix_cached_fraction: float
    # Of the prompt tokens prefilled, the share whose KV a prefix cache held.
    prefix_hit_ratio: float
    slo: str | None
    slo_attainment: float | None
    goodput: float | None
    goodput_per_device: float | None
    goodput_per_usd_hour: float | None  # good requests per second per dollar-hour of cluster
    stopped_early: bool
    wall_s: float
    cpu_s: float
    device_stats: tuple[dict[str, Any], ...] = field(default=())
    # Attainment of each SLO class alone, when the run has more than one class.
    slo_attainment_by_class: dict[str, float] = field(default_factory=dict)

    @property
    def shed(self) -> int:
        """Requests admission refused (the policy, or a full router queue)."""
        return self.outcomes.get(Outcome.SHED.value, 0)

    @property
    def not_served(self) -> int:
        """Requests that did not complete, whatever the reason."""
        return sum(n for outcome, n in self.outcomes.items() if outcome != Outcome.OK.value)

    @classmethod
    def of(cls, result: SimResult, slo: Slo | Mapping[str, Slo] | None) -> SimSummary:
        ok = result.ok
        duration = result.makespan_s
        rate = (lambda count: count / duration) if duration > 0 else (lambda count: math.nan)
        tokens = int(result.output_tokens[ok].sum())
        price = result.cluster.price_per_hour_usd
        tokens_per_hour = rate(tokens) * SECONDS_PER_HOUR
        served_prompt = int(result.prompt_tokens[ok].sum())
        attainment = goodput = per_device = per_dollar = None
        by_class: dict[str, float] = {}
        if slo is not None:
            if len(np.unique(result.slo_class)) > 1:
                by_class = result.attainment_by_class(slo)
            good = int(result.good(slo).sum())
            attainment = good / result.requests if result.requests else math.nan
            goodput = rate(good)
            per_device = goodput / len(result.devices)
            per_dollar = goodput / price if price > 0 else math.nan
        outcomes, counts = np.unique(result.outcome, return_counts=True)
        return cls(
            cluster=result.cluster.describe(),
            devices=len(result.devices),
            price_per_hour_usd=price,
            requests=result.requests,
            outcomes={str(o): int(n) for o, n in zip(outcomes, counts, strict=True)},
            split_fraction=float(result.split[ok].mean()) if ok.any() else math.nan,
            makespan_s=duration,
            ttft_s=Distribution.of_values(result.ttft_s[ok]),
            tpot_s=Distribution.of_values(_present(result.tpot_s[ok])),
            e2e_s=Distribution.of_values(result.e2e_s[ok]),
            max_itl_s=Distribution.of_values(_present(result.max_itl_s[ok])),
            request_throughput=rate(int(ok.sum())),
            output_tokens=tokens,
            output_token_throughput=rate(tokens),
            cost_per_million_output_tokens_usd=(
                price / tokens_per_hour * 1e6 if tokens_per_hour > 0 else math.inf
            ),
            prefix_cached_fraction=(
                float(result.cached_tokens[ok].sum()) / served_prompt if served_prompt else 0.0
            ),
            prefix_hit_ratio=_prefix_hit_ratio(result),
            slo=_slo_name(slo),
            slo_attainment=attainment,
            goodput=goodput,
            goodput_per_device=per_device,
            goodput_per_usd_hour=per_dollar,
            stopped_early=result.stopped_early,
            wall_s=result.wall_s,
            cpu_s=result.cpu_s,
            device_stats=tuple(d.to_dict(duration) for d in result.devices),
            slo_attainment_by_class=by_class,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: latencies in milliseconds, NaN and infinity as null."""
        by_class = {}
        if self.slo_attainment_by_class:
            by_class = {
                "slo_attainment_by_class": dict(sorted(self.slo_attainment_by_class.items()))
            }
        return {
            "cluster": self.cluster,
            "devices": self.devices,
            "price_per_hour_usd": self.price_per_hour_usd,
            "requests": self.requests,
            "outcomes": dict(sorted(self.outcomes.items())),
            "split_fraction": _finite(self.split_fraction),
            "makespan_s": self.makespan_s,
            "ttft_ms": self.ttft_s.to_dict(1000.0),
            "tpot_ms": self.tpot_s.to_dict(1000.0),
            "e2e_ms": self.e2e_s.to_dict(1000.0),
            "max_itl_ms": self.max_itl_s.to_dict(1000.0),
            "request_throughput": _finite(self.request_throughput),
            "output_tokens": self.output_tokens,
            "output_token_throughput": _finite(self.output_token_throughput),
            "cost_per_million_output_tokens_usd": _finite(self.cost_per_million_output_tokens_usd),
            "prefix_cached_fraction": self.prefix_cached_fraction,
            "prefix_hit_ratio": self.prefix_hit_ratio,
            "slo": self.slo,
            "slo_attainment": _finite(self.slo_attainment),
            "goodput": _finite(self.goodput),
            "goodput_per_device": _finite(self.goodput_per_device),
            "goodput_per_usd_hour": _finite(self.goodput_per_usd_hour),
            **by_class,
            "stopped_early": self.stopped_early,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "device_stats": list(self.device_stats),
        }


def _prefix_hit_ratio(result: SimResult) -> float:
    """Prompt tokens found in a prefix cache over the prompt tokens of every prefill run
    (a request that never reached a device had no lookup)."""
    prefilled = ~np.isnan(result.ttft_s)
    prompt = int(result.prompt_tokens[prefilled].sum())
    return float(result.cached_tokens[prefilled].sum()) / prompt if prompt else 0.0


def _slo_name(slo: Slo | Mapping[str, Slo] | None) -> str | None:
    if slo is None or isinstance(slo, Slo):
        return None if slo is None else slo.name
    return f"per class ({', '.join(sorted(slo))})"


def _present(values: FloatArray) -> FloatArray:
    return values[~np.isnan(values)]


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value
