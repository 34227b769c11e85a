"""What a run sends: request lengths, arrival times, shared prefixes and traces.

Everything here is pure and seeded, so two runs with the same seed send the same
requests at the same offsets; only the system under test differs. The load
generator (bench/) and the simulator draw from the same functions, so a simulated
run and a live one of the same seed see the very same requests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from backends.config_files import load_json
from backends.errors import shown
from router.scheduling.service_level import DEFAULT_SLO_CLASS

__all__ = [
    "MIXES",
    "WORKLOADS",
    "Arrivals",
    "Bursts",
    "LengthDistribution",
    "MixPart",
    "PrefixSharing",
    "RequestSpec",
    "bursty_arrivals",
    "fixed",
    "generate",
    "generate_for_duration",
    "integer_list",
    "load_trace",
    "parse_trace_line",
    "poisson_arrivals",
    "save_trace",
]

Arrivals = Literal["poisson", "bursty"]


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: when (offset from the run's start) and how long each side is.

    ``prefix_group`` names the shared prefix the prompt starts with (-1: none), and
    ``prefix_tokens`` how many of its leading tokens that prefix covers: requests of one
    group share those tokens exactly, as a system prompt or a few-shot preamble does.

    ``block_hashes`` is the prompt's block hash chain as a trace records it (Mooncake's
    ``hash_ids``): id *i* names tokens ``[i * block_tokens, (i + 1) * block_tokens)``
    together with every token before them, so two prompts with equal ids at *i* are
    equal up to there; the last block may be cut short by the prompt's end. A prefix
    group is the one-block chain ``(prefix_group,)`` of ``prefix_tokens`` tokens
    (:meth:`prefix_chain`); a request has one or the other, or neither.

    ``slo_class`` is the policy profile it asks for, as a request's ``slo_class`` does.
    """

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_group: int = -1
    prefix_tokens: int = 0
    block_hashes: tuple[int, ...] = ()
    block_tokens: int = 0
    slo_class: str = DEFAULT_SLO_CLASS

    def __post_init__(self) -> None:
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"arrival_s must be finite and >= 0, got {self.arrival_s!r}")
        if self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.output_tokens < 1:
            raise ValueError(f"output_tokens must be >= 1, got {self.output_tokens}")
        if self.prefix_group < -1:
            raise ValueError(f"prefix_group must be >= -1, got {self.prefix_group}")
        if not 0 <= self.prefix_tokens <= self.prompt_tokens:
            raise ValueError(
                f"prefix_tokens must lie within [0, prompt_tokens], got {self.prefix_tokens}"
            )
        if (self.prefix_group < 0) != (self.prefix_tokens == 0):
            raise ValueError("prefix_group and prefix_tokens are set together or not at all")
        if self.block_hashes or self.block_tokens:
            self._check_chain()
        if not self.slo_class:
            raise ValueError("slo_class must not be empty")

    def _check_chain(self) -> None:
        if not self.block_hashes or self.block_tokens < 1:
            raise ValueError("block_hashes and block_tokens >= 1 are set together or not at all")
        if self.prefix_group >= 0:
            raise ValueError("a request has a prefix group or a block hash chain, not both")
        if min(self.block_hashes) < 0:
            raise ValueError("block_hashes must be >= 0")
        if (len(self.block_hashes) - 1) * self.block_tokens >= self.prompt_tokens:
            raise ValueError(
                f"{len(self.block_hashes)} blocks of {self.block_tokens} tokens are more than "
                f"a prompt of {self.prompt_tokens} tokens holds"
            )

    def prefix_chain(self) -> tuple[tuple[int, ...], int]:
        """The prompt's shareable head: (block ids, tokens per block); ``((), 0)`` for none.

        Tokens past the chain (and every token of a request without one) are the
        request's own, shared with no other request.
        """
        if self.block_hashes:
            return self.block_hashes, self.block_tokens
        if self.prefix_group >= 0:
            return (self.prefix_group,), self.prefix_tokens
        return (), 0


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _clipped_lognormal_mean(mu: float, sigma: float, low: float, high: float) -> float:
    """E[clip(exp(N(mu, sigma^2)), low, high)], in closed form."""
    alpha = (math.log(low) - mu) / sigma
    beta = (math.log(high) - mu) / sigma
    inside = math.exp(mu + sigma * sigma / 2) * (
        _normal_cdf(beta - sigma) - _normal_cdf(alpha - sigma)
    )
    return low * _normal_cdf(alpha) + high * (1.0 - _normal_cdf(beta)) + inside


def _mu_for_clipped_mean(mean: float, sigma: float, low: float, high: float) -> float:
    """The lognormal location whose samples, once clipped, average ``mean``.

    The textbook ``ln(mean) - sigma^2 / 2`` hits the target only without clipping;
    cutting a heavy right tail at ``high`` would pull the average below the cited
    figure. The clipped mean rises monotonically with mu, so bisection is exact enough.
    """
    lo = math.log(low) - 10.0 * sigma - 1.0
    hi = math.log(high) + 10.0 * sigma + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if _clipped_lognormal_mean(mid, sigma, low, high) < mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _sample_lengths(
    rng: np.random.Generator, n: int, *, mean: float, sigma: float, low: int, high: int
) -> npt.NDArray[np.int64]:
    if sigma == 0:
        return np.full(n, min(max(round(mean), low), high), dtype=np.int64)
    mu = _mu_for_clipped_mean(mean, sigma, float(low), float(high))
    raw = rng.lognormal(mu, sigma, n)
    return np.clip(np.rint(raw), low, high).astype(np.int64)


@dataclass(frozen=True)
class LengthDistribution:
    """Seeded, clipped lognormal prompt and output lengths.

    The lognormal is placed so that the arithmetic mean of the *clipped, rounded*
    samples is ``*_mean``: the means are what the cited papers report, so they are
    what a comparable run has to reproduce.
    """

    name: str
    prompt_mean: float
    prompt_sigma: float
    prompt_min: int
    prompt_max: int
    output_mean: float
    output_sigma: float
    output_min: int
    output_max: int
    source: str

    def __post_init__(self) -> None:
        for side in ("prompt", "output"):
            mean: float = getattr(self, f"{side}_mean")
            sigma: float = getattr(self, f"{side}_sigma")
            low: int = getattr(self, f"{side}_min")
            high: int = getattr(self, f"{side}_max")
            if not 1 <= low <= high:
                raise ValueError(f"{self.name}: need 1 <= {side}_min <= {side}_max")
            if not low <= mean <= high:
                raise ValueError(f"{self.name}: {side}_mean must lie within [min, max]")
            if not (math.isfinite(sigma) and sigma >= 0):
                raise ValueError(f"{self.name}: {side}_sigma must be finite and >= 0")
            if sigma > 0 and not low < mean < high:
                # A spread-out distribution cannot average exactly at one of its bounds.
                raise ValueError(f"{self.name}: {side}_mean must lie strictly inside (min, max)")

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
        """``n`` independent (prompt_tokens, output_tokens) pairs."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        prompts = _sample_lengths(
            rng,
            n,
            mean=self.prompt_mean,
            sigma=self.prompt_sigma,
            low=self.prompt_min,
            high=self.prompt_max,
        )
        outputs = _sample_lengths(
            rng,
            n,
            mean=self.output_mean,
            sigma=self.output_sigma,
            low=self.output_min,
            high=self.output_max,
        )
        return [(int(p), int(o)) for p, o in zip(prompts.tolist(), outputs.tolist(), strict=True)]


# Means are the dataset averages DistServe reports for the workloads it evaluates
# (its SLO table is mirrored in router.scheduling.slo.SLO_PRESETS). Sigmas and bounds are
# ours: ShareGPT is long-tailed, HumanEval prompts are narrow, LongBench is all long
# inputs. Maxima stay within an 8192-token context and 2048 output tokens.
WORKLOADS: dict[str, LengthDistribution] = {
    "chatbot": LengthDistribution(
        name="chatbot",
        prompt_mean=755.0,
        prompt_sigma=1.0,
        prompt_min=4,
        prompt_max=8192,
        output_mean=200.0,
        output_sigma=1.0,
        output_min=4,
        output_max=2048,
        source=(
            "ShareGPT-like chat: mean input ~755 tokens, mean output ~200 tokens, the ShareGPT "
            "statistics reported by DistServe (Zhong et al., OSDI'24) and used by vLLM's "
            "benchmark_serving; lognormal spread and bounds are this project's choice"
        ),
    ),
    "code": LengthDistribution(
        name="code",
        prompt_mean=171.0,
        prompt_sigma=0.5,
        prompt_min=32,
        prompt_max=1024,
        output_mean=98.0,
        output_sigma=0.6,
        output_min=8,
        output_max=512,
        source=(
            "HumanEval-like code completion: mean input ~171 tokens, mean output ~98 tokens, "
            "as reported for HumanEval by DistServe (Zhong et al., OSDI'24); spread and bounds "
            "are this project's choice"
        ),
    ),
    "summarization": LengthDistribution(
        name="summarization",
        prompt_mean=1738.0,
        prompt_sigma=0.5,
        prompt_min=256,
        prompt_max=8192,
        output_mean=90.0,
        output_sigma=0.5,
        output_min=16,
        output_max=512,
        source=(
            "LongBench-like summarization: mean input ~1738 tokens, mean output ~90 tokens, "
            "as reported for LongBench by DistServe (Zhong et al., OSDI'24); spread and bounds "
            "are this project's choice"
        ),
    ),
}


def _check_rate(rate_per_s: float, n: int) -> None:
    if not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"rate_per_s must be finite and > 0, got {rate_per_s!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


def poisson_arrivals(rate_per_s: float, n: int, rng: np.random.Generator) -> list[float]:
    """Arrival offsets of a Poisson process: the first at 0.0, then exponential gaps.

    Starting at exactly 0 keeps the run's clock honest: the first request is not
    delayed by a random gap that the duration would then count as idle time.
    """
    _check_rate(rate_per_s, n)
    if n == 0:
        return []
    gaps = rng.exponential(1.0 / rate_per_s, n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


@dataclass(frozen=True)
class Bursts:
    """A two-state Markov-modulated Poisson process: calm periods and bursts.

    Bursts arrive ``multiplier`` times faster than calm periods and take
    ``burst_fraction`` of the time on average; both periods last exponentially long,
    a full calm-plus-burst cycle ``cycle_s`` on average. The calm rate is set so that
    the long-run mean rate is the one asked for: bursty and Poisson runs of one rate
    carry the same load, only its spread in time differs.
    """

    multiplier: float = 4.0
    burst_fraction: float = 0.2
    cycle_s: float = 10.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ValueError(f"multiplier must be finite and >= 1, got {self.multiplier!r}")
        if not 0 < self.burst_fraction < 1:
            raise ValueError(f"burst_fraction must lie in (0, 1), got {self.burst_fraction!r}")
        if not (math.isfinite(self.cycle_s) and self.cycle_s > 0):
            raise ValueError(f"cycle_s must be finite and > 0, got {self.cycle_s!r}")

    def rates(self, mean_rate_per_s: float) -> tuple[float, float]:
        """(calm, burst) rates whose time-weighted mean is ``mean_rate_per_s``."""
        f = self.burst_fraction
        calm = mean_rate_per_s / (f * self.multiplier + 1.0 - f)
        return calm, calm * self.multiplier


def bursty_arrivals(
    rate_per_s: float, n: int, rng: np.random.Generator, bursts: Bursts | None = None
) -> list[float]:
    """Arrival offsets of :class:`Bursts` at mean rate ``rate_per_s``; the first at 0.0.

    Drawn by time change: unit-rate Poisson points are mapped through the inverse of the
    process's cumulative intensity, which is piecewise linear over the calm and burst
    periods. Exact, and vectorised whatever the number of periods.
    """
    _check_rate(rate_per_s, n)
    if n == 0:
        return []
    shape = bursts or Bursts()
    calm, burst = shape.rates(rate_per_s)
    # Periods come from a stream of their own, so more requests extend the same run.
    periods = np.random.default_rng(int(rng.integers(0, 2**63)))
    unit_points = np.cumsum(rng.exponential(1.0, n - 1))
    needed = float(unit_points[-1]) if n > 1 else 0.0
    mean_burst_s = shape.burst_fraction * shape.cycle_s
    mean_calm_s = shape.cycle_s - mean_burst_s
    in_burst = bool(periods.random() < shape.burst_fraction)
    starts: list[float] = [0.0]  # period start times
    intensity: list[float] = [0.0]  # cumulative intensity at each start
    rates: list[float] = []
    while intensity[-1] <= needed:
        rate = burst if in_burst else calm
        length = float(periods.exponential(mean_burst_s if in_burst else mean_calm_s))
        rates.append(rate)
        starts.append(starts[-1] + length)
        intensity.append(intensity[-1] + rate * length)
        in_burst = not in_burst
    bounds = np.asarray(intensity)
    period = np.searchsorted(bounds, unit_points, side="right") - 1
    offsets = (
        np.asarray(starts)[period] + (unit_points - bounds[period]) / np.asarray(rates)[period]
    )
    return [0.0, *offsets.tolist()]


@dataclass(frozen=True)
class PrefixSharing:
    """A share of requests whose prompts start with one of ``groups`` shared prefixes.

    Each shared request gets a prefix of ``prefix_tokens`` tokens, picked uniformly
    among the groups, in front of its sampled prompt: a system prompt or few-shot
    preamble ahead of the user's own text. The others share nothing.
    """

    fraction: float
    groups: int
    prefix_tokens: int

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"fraction must lie in [0, 1], got {self.fraction!r}")
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        if self.prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be >= 1, got {self.prefix_tokens}")


@dataclass(frozen=True)
class MixPart:
    """One kind of request in a mix: its lengths, its share of arrivals, its SLO class."""

    workload: str  # a name in WORKLOADS
    share: float
    slo_class: str

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r} in a mix")
        if not (math.isfinite(self.share) and self.share > 0):
            raise ValueError(f"a mix's share must be finite and > 0, got {self.share!r}")


Mix = tuple[MixPart, ...]

# Traffic of several kinds at once, each held to its own SLO class: what one fleet serves
# in production. A policy that judges them needs a profile per class (bench/auto_split.py
# makes one from the packaged default profile, with the DistServe SLOs of slo.py).
MIXES: dict[str, Mix] = {
    "mixed": (
        MixPart("code", 0.4, "code"),
        MixPart("chatbot", 0.4, "chatbot"),
        MixPart("summarization", 0.2, "summarization"),
    ),
}


def _resolve(workload: str | LengthDistribution | Mix) -> LengthDistribution | Mix:
    if isinstance(workload, LengthDistribution | tuple):
        return workload
    found = WORKLOADS.get(workload) or MIXES.get(workload)
    if found is None:
        known = ", ".join(sorted([*WORKLOADS, *MIXES]))
        raise ValueError(f"unknown workload {workload!r}; known: {known}")
    return found


def _sample_mix(mix: Mix, rng: np.random.Generator, n: int) -> list[tuple[int, int, str]]:
    """``n`` (prompt, output, SLO class) triples: each request's kind drawn by its share,
    then each kind's lengths from a stream of its own."""
    shares = np.array([part.share for part in mix])
    kinds = rng.choice(len(mix), size=n, p=shares / shares.sum())
    drawn: list[tuple[int, int, str]] = [(0, 0, "")] * n
    for kind, part in enumerate(mix):
        where = np.flatnonzero(kinds == kind).tolist()
        lengths = WORKLOADS[part.workload].sample(
            np.random.default_rng(rng.integers(2**63)), len(where)
        )
        for at, (prompt, output) in zip(where, lengths, strict=True):
            drawn[at] = (prompt, output, part.slo_class)
    return drawn


def generate(
    workload: str | LengthDistribution | Mix,
    n: int,
    *,
    rate_per_s: float | None,
    seed: int,
    arrivals: Arrivals = "poisson",
    bursts: Bursts | None = None,
    prefix: PrefixSharing | None = None,
) -> list[RequestSpec]:
    """``n`` requests drawn from ``workload``; open loop at ``rate_per_s``, closed loop if None.

    Lengths, arrivals and prefix groups come from independent child streams of ``seed``,
    so the same seed sends the same lengths whatever the rate or arrival process: a rate
    sweep varies load only. A mix's requests carry their part's SLO class.
    """
    dist = _resolve(workload)
    length_seed, arrival_seed, prefix_seed = np.random.SeedSequence(seed).spawn(3)
    length_rng = np.random.default_rng(length_seed)
    if isinstance(dist, LengthDistribution):
        drawn = [(p, o, DEFAULT_SLO_CLASS) for p, o in dist.sample(length_rng, n)]
    else:
        drawn = _sample_mix(dist, length_rng, n)
    times: list[float]
    if rate_per_s is None:
        times = [0.0] * n
    elif arrivals == "bursty":
        times = bursty_arrivals(rate_per_s, n, np.random.default_rng(arrival_seed), bursts)
    elif arrivals == "poisson":
        times = poisson_arrivals(rate_per_s, n, np.random.default_rng(arrival_seed))
    else:
        raise ValueError(f"unknown arrival process {arrivals!r}; known: poisson, bursty")
    if prefix is None or prefix.fraction == 0:
        return [
            RequestSpec(t, p, o, slo_class=c) for t, (p, o, c) in zip(times, drawn, strict=True)
        ]
    rng = np.random.default_rng(prefix_seed)
    shared = (rng.random(n) < prefix.fraction).tolist()
    groups = rng.integers(0, prefix.groups, n).tolist()
    tokens = prefix.prefix_tokens
    return [
        RequestSpec(t, p + tokens, o, g, tokens, slo_class=c)
        if s
        else RequestSpec(t, p, o, slo_class=c)
        for t, (p, o, c), s, g in zip(times, drawn, shared, groups, strict=True)
    ]


def generate_for_duration(
    workload: str | LengthDistribution | Mix,
    duration_s: float,
    *,
    rate_per_s: float,
    seed: int,
    arrivals: Arrivals = "poisson",
    bursts: Bursts | None = None,
    prefix: PrefixSharing | None = None,
) -> list[RequestSpec]:
    """The requests of :func:`generate` that arrive within ``duration_s`` seconds.

    Draws a count comfortably above the expected one and cuts at the duration, drawing
    twice as many whenever the last arrival still falls short (bursts can stretch it).
    """
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be finite and > 0, got {duration_s!r}")
    expected = rate_per_s * duration_s
    n = int(expected + 6.0 * math.sqrt(expected) + 16)
    while True:
        specs = generate(
            workload,
            n,
            rate_per_s=rate_per_s,
            seed=seed,
            arrivals=arrivals,
            bursts=bursts,
            prefix=prefix,
        )
        if specs[-1].arrival_s >= duration_s:
            return [spec for spec in specs if spec.arrival_s < duration_s]
        n *= 2


def fixed(n: int, prompt_tokens: int, output_tokens: int) -> list[RequestSpec]:
    """``n`` identical closed-loop requests: isolates the system from length variance."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    spec = RequestSpec(0.0, prompt_tokens, output_tokens)
    return [spec] * n


_TRACE_KEYS = ("arrival_s", "prompt_tokens", "output_tokens")
_PREFIX_KEYS = ("prefix_group", "prefix_tokens")
_CHAIN_KEYS = ("block_hashes", "block_tokens")


def _integer(obj: dict[str, object], key: str) -> int:
    value = obj[key]
    # bool is an int subclass; a stray true/false is a broken trace, not 1 or 0.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {shown(value)}")
    return value


def integer_list(value: object, key: str) -> tuple[int, ...]:
    """A JSON list of integers (a block hash chain), or a ValueError naming ``key``."""
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    ):
        raise ValueError(f"{key} must be a list of integers, got {shown(value)}")
    return tuple(value)


def _both_or_neither(obj: dict[str, object], keys: tuple[str, str]) -> bool:
    present = [key in obj for key in keys]
    if present[0] != present[1]:
        missing = keys[present.index(False)]
        raise ValueError(f"{keys[0]} and {keys[1]} go together; missing {missing}")
    return present[0]


def parse_trace_line(line: str) -> RequestSpec:
    """One line of the project's own JSONL trace (what :func:`save_trace` writes)."""
    obj = load_json(line)  # DocumentError (a ValueError): "is not valid JSON (...)"
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in _TRACE_KEYS if key not in obj]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    arrival = obj["arrival_s"]
    if isinstance(arrival, bool) or not isinstance(arrival, int | float):
        raise ValueError(f"arrival_s must be a number, got {shown(arrival)}")
    prompt, output = _integer(obj, "prompt_tokens"), _integer(obj, "output_tokens")
    if _both_or_neither(obj, _CHAIN_KEYS):
        chain = integer_list(obj["block_hashes"], "block_hashes")
        return RequestSpec(
            float(arrival),
            prompt,
            output,
            block_hashes=chain,
            block_tokens=_integer(obj, "block_tokens") if chain else 0,
        )
    if not _both_or_neither(obj, _PREFIX_KEYS):
        return RequestSpec(float(arrival), prompt, output)
    return RequestSpec(
        float(arrival),
        prompt,
        output,
        _integer(obj, "prefix_group"),
        _integer(obj, "prefix_tokens"),
    )


def load_trace(path: Path, trace_format: str = "auto") -> list[RequestSpec]:
    """Requests from a trace file, sorted by arrival (stable for ties).

    The project's own JSONL, or a public trace as published (Mooncake, Azure,
    BurstGPT): ``router.sim.traces`` reads them all and says what each holds.
    Extra keys are ignored so traces exported by other tools (ids, timestamps) load as
    is; ``prefix_group`` and ``prefix_tokens``, or ``block_hashes`` and
    ``block_tokens``, when present, mark a shared prefix.
    """
    # Imported here: the readers build on this module's RequestSpec.
    from router.sim.traces import read_trace  # noqa: PLC0415 (a cycle at module level)

    return read_trace(path, trace_format).requests


def save_trace(path: Path, requests: Sequence[RequestSpec]) -> None:
    """Writes ``requests`` as JSONL that :func:`load_trace` reads back identically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for spec in requests:
            record: dict[str, float | int | list[int]] = {
                "arrival_s": float(spec.arrival_s),
                "prompt_tokens": int(spec.prompt_tokens),
                "output_tokens": int(spec.output_tokens),
            }
            if spec.prefix_group >= 0:
                record["prefix_group"] = int(spec.prefix_group)
                record["prefix_tokens"] = int(spec.prefix_tokens)
            if spec.block_hashes:
                record["block_hashes"] = list(spec.block_hashes)
                record["block_tokens"] = int(spec.block_tokens)
            out.write(json.dumps(record) + "\n")
