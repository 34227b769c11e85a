"""What the benchmark sends: request lengths, arrival times, traces and prompt text.

Everything here is pure and seeded, so two runs with the same seed send the same
requests at the same offsets; only the system under test differs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "WORKLOADS",
    "LengthDistribution",
    "RequestSpec",
    "fixed",
    "generate",
    "load_trace",
    "poisson_arrivals",
    "prompt_text",
    "save_trace",
]


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: when (offset from the run's start) and how long each side is."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"arrival_s must be finite and >= 0, got {self.arrival_s!r}")
        if self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.output_tokens < 1:
            raise ValueError(f"output_tokens must be >= 1, got {self.output_tokens}")


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
        return [(int(p), int(o)) for p, o in zip(prompts, outputs, strict=True)]


# Means are the dataset averages DistServe reports for the workloads it evaluates
# (its SLO table is mirrored in bench.stats.SLO_PRESETS). Sigmas and bounds are ours:
# ShareGPT is long-tailed, HumanEval prompts are narrow, LongBench is all long inputs.
# Maxima stay within an 8192-token context and 2048 output tokens.
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


def poisson_arrivals(rate_per_s: float, n: int, rng: np.random.Generator) -> list[float]:
    """Arrival offsets of a Poisson process: the first at 0.0, then exponential gaps.

    Starting at exactly 0 keeps the run's clock honest: the first request is not
    delayed by a random gap that the duration would then count as idle time.
    """
    if not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"rate_per_s must be finite and > 0, got {rate_per_s!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return []
    gaps = rng.exponential(1.0 / rate_per_s, n - 1)
    return [0.0, *(float(t) for t in np.cumsum(gaps))]


def _resolve(workload: str | LengthDistribution) -> LengthDistribution:
    if isinstance(workload, LengthDistribution):
        return workload
    try:
        return WORKLOADS[workload]
    except KeyError:
        known = ", ".join(sorted(WORKLOADS))
        raise ValueError(f"unknown workload {workload!r}; known: {known}") from None


def generate(
    workload: str | LengthDistribution, n: int, *, rate_per_s: float | None, seed: int
) -> list[RequestSpec]:
    """``n`` requests drawn from ``workload``; open loop at ``rate_per_s``, closed loop if None.

    Lengths and arrivals come from independent child streams of ``seed``, so the same
    seed sends the same lengths whatever the rate: a rate sweep varies load only.
    """
    dist = _resolve(workload)
    length_seed, arrival_seed = np.random.SeedSequence(seed).spawn(2)
    lengths = dist.sample(np.random.default_rng(length_seed), n)
    if rate_per_s is None:
        arrivals = [0.0] * n
    else:
        arrivals = poisson_arrivals(rate_per_s, n, np.random.default_rng(arrival_seed))
    return [RequestSpec(t, p, o) for t, (p, o) in zip(arrivals, lengths, strict=True)]


def fixed(n: int, prompt_tokens: int, output_tokens: int) -> list[RequestSpec]:
    """``n`` identical closed-loop requests: isolates the system from length variance."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    spec = RequestSpec(0.0, prompt_tokens, output_tokens)
    return [spec] * n


_TRACE_KEYS = ("arrival_s", "prompt_tokens", "output_tokens")


def _parse_trace_line(line: str) -> RequestSpec:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in _TRACE_KEYS if key not in obj]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    arrival = obj["arrival_s"]
    # bool is an int subclass; a stray true/false is a broken trace, not 1 or 0.
    if isinstance(arrival, bool) or not isinstance(arrival, int | float):
        raise ValueError(f"arrival_s must be a number, got {arrival!r}")
    for key in ("prompt_tokens", "output_tokens"):
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
    return RequestSpec(float(arrival), obj["prompt_tokens"], obj["output_tokens"])


def load_trace(path: Path) -> list[RequestSpec]:
    """Requests from a JSONL trace, sorted by arrival (stable for ties).

    Extra keys are ignored so traces exported by other tools (ids, timestamps) load as is.
    """
    specs: list[RequestSpec] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                specs.append(_parse_trace_line(line))
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
    return sorted(specs, key=lambda spec: spec.arrival_s)


def save_trace(path: Path, requests: Sequence[RequestSpec]) -> None:
    """Writes ``requests`` as JSONL that :func:`load_trace` reads back identically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for spec in requests:
            record = {
                "arrival_s": float(spec.arrival_s),
                "prompt_tokens": int(spec.prompt_tokens),
                "output_tokens": int(spec.output_tokens),
            }
            out.write(json.dumps(record) + "\n")


# Short, common words so the text looks like prose to anything that inspects it, and
# pure lowercase ASCII so one character is one byte is one token for the mock model.
_VOCABULARY = (
    "the of and to in is it that for on was with as at by be this from or an are not but "
    "have one all were they we can there their been has more will would when if no out so "
    "what up about into them some time only other than then its also two new these may "
    "first any like now such most over well made after even where back use way many day "
    "a i go see work long find here thing give part take place year small every good"
)
_WORDS = tuple(_VOCABULARY.split())


def prompt_text(prompt_tokens: int, seed: int) -> str:
    """ASCII prose of exactly ``prompt_tokens`` UTF-8 bytes, the same for the same seed.

    The text never ends in a space: servers that strip trailing whitespace would
    otherwise shorten the prompt by a token and skew the length the run reports.
    """
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    rng = np.random.default_rng(seed)
    # Every word plus its space takes at least 2 bytes, so this many always suffice.
    picks = rng.integers(0, len(_WORDS), prompt_tokens // 2 + 1)
    text = " ".join(_WORDS[i] for i in picks)[:prompt_tokens]
    if text.endswith(" "):
        text = text[:-1] + "s"
    return text
