"""An adaptive concurrency limit: a gradient controller fed by the time to first token.

The shape is Envoy's adaptive concurrency filter (its gradient controller), with
two lessons from Netflix concurrency-limits' Gradient2. Latency samples are
collected over a window (``interval_s``, and at least ``min_samples``); at its
end the window's ``percentile`` is the *sample* latency, compared with the
*baseline*, the latency when nothing queues::

    gradient  = clamp((baseline * (1 + buffer) + tolerance_s) / sample, 0.5, 2.0)
    new limit = limit * gradient + sqrt(limit * gradient)      # the burst headroom

clamped to ``[minimum, maximum]``. Latency near the baseline lets the limit grow
by its headroom (and up to twice as much when latency falls); a queue building in
the backends makes samples exceed the buffered baseline and the limit falls, at
most by half per window.

The signal is the time from admission to the first frame, for these reasons:

- whole-request latency is mostly decode and scales with the answer's length (1 to
  4096 tokens): a window of long answers would read as congestion, one of short
  answers as spare capacity. The first token does not depend on the answer.
- From admission on, it holds all that concurrency does to a request in the
  backends: their prefill queues, waiting for KV memory, prefills interleaved with
  a growing decode batch. It leaves out the wait in the router's own queue, which
  the limit causes rather than suffers: fed back, a low limit would lengthen the
  queue and so lower itself.
- It is not divided by the prompt's length: the congestion signal, queueing delay,
  does not depend on a request's own prompt (dividing would inflate the queueing
  of short prompts), and the window's percentile averages over the prompt mix.
  Prefill itself is a small part of the first token once backends queue.

Where this departs from the models, and why:

- Envoy measures its baseline (minRTT) every minute by dropping the limit to 3
  until 50 requests complete. An LLM request holds its slot for a whole generation
  (seconds to minutes), so that window would drain the cluster and last as long.
  Here the baseline is the lowest window sample of the last ``baseline_window_s``
  (a windowed minimum, as TCP BBR keeps its minimum RTT): it falls at once when
  latency does and rises as old windows age out, following a change of workload
  (longer prompts, another model) within the window.
- ``tolerance_s`` adds an absolute allowance to Envoy's relative ``buffer``:
  backends that answer in a millisecond would otherwise read a few milliseconds of
  scheduling noise as a doubling of latency, and TTFT targets are hundreds of
  milliseconds.
- From Gradient2: the limit does not grow while fewer than half its slots were
  used in the window (a limit grown while idle would admit a burst the backends
  cannot take), and it does not fall while more requests are in flight than the
  limit: those were admitted under a higher limit, and the latency they report
  is already acted on.

Pure: the time is an argument, so tests and simulations drive it with any clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

# The gradient's bounds: the limit at most halves or doubles per window (Envoy's).
MIN_GRADIENT = 0.5
MAX_GRADIENT = 2.0
# Samples one window holds at most: it closes early when full, so memory is bounded.
MAX_WINDOW_SAMPLES = 4096
# Window samples the baseline is the minimum of, at most.
MAX_BASELINE_WINDOWS = 1024


@dataclass(frozen=True)
class LimitConfig:
    initial: int = 32
    minimum: int = 4
    maximum: int = 1024
    interval_s: float = 1.0
    min_samples: int = 8
    percentile: float = 50.0
    buffer: float = 0.25
    tolerance_s: float = 0.05
    baseline_window_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum:
            raise ValueError("the limit needs 1 <= minimum <= maximum")
        if not 0 < self.percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")
        if self.interval_s <= 0 or self.baseline_window_s <= 0 or self.min_samples < 1:
            raise ValueError("interval_s, baseline_window_s and min_samples must be positive")
        if self.buffer < 0 or self.tolerance_s < 0:
            raise ValueError("buffer and tolerance_s must be >= 0")


class GradientLimit:
    """The current limit, moved once per window of first-token latencies."""

    def __init__(self, config: LimitConfig, now: float) -> None:
        self.config = config
        self._limit = min(max(config.initial, config.minimum), config.maximum)
        self._window: list[float] = []
        self._window_started = now
        self._peak_in_flight = 0
        self._windows: deque[tuple[float, float]] = deque(maxlen=MAX_BASELINE_WINDOWS)
        self.sample_s: float | None = None  # the last window's latency
        self.baseline_s: float | None = None

    @property
    def limit(self) -> int:
        return self._limit

    def admitted(self, in_flight: int) -> None:
        """A request took a slot; ``in_flight`` counts it."""
        self._peak_in_flight = max(self._peak_in_flight, in_flight)

    def observe(self, latency_s: float, now: float, in_flight: int) -> bool:
        """One first-token latency; True when it closed a window and the limit moved."""
        self._window.append(latency_s)
        self._peak_in_flight = max(self._peak_in_flight, in_flight)
        full = len(self._window) >= MAX_WINDOW_SAMPLES
        if not full and (
            len(self._window) < self.config.min_samples
            or now - self._window_started < self.config.interval_s
        ):
            return False
        before = self._limit
        self._close_window(now, in_flight)
        return self._limit != before

    def _close_window(self, now: float, in_flight: int) -> None:
        sample = _percentile(self._window, self.config.percentile)
        peak = self._peak_in_flight
        self._window = []
        self._window_started = now
        self._peak_in_flight = in_flight
        self._windows.append((now, sample))
        while self._windows[0][0] < now - self.config.baseline_window_s:
            self._windows.popleft()
        baseline = min(latency for _, latency in self._windows)
        self.sample_s, self.baseline_s = sample, baseline
        self._limit = self.next_limit(self._limit, baseline, sample, peak, in_flight)

    def next_limit(
        self, limit: int, baseline_s: float, sample_s: float, peak_in_flight: int, in_flight: int
    ) -> int:
        """The limit after a window whose latency was ``sample_s``."""
        config = self.config
        target = baseline_s * (1 + config.buffer) + config.tolerance_s
        gradient = MAX_GRADIENT if sample_s <= 0 else target / sample_s
        gradient = min(max(gradient, MIN_GRADIENT), MAX_GRADIENT)
        scaled = limit * gradient
        proposed = math.floor(scaled + math.sqrt(scaled))
        if proposed > limit and peak_in_flight < limit / 2:
            return limit  # not using what it has: no evidence more would do
        if proposed < limit and in_flight > limit:
            return limit  # still draining the excess of an earlier cut
        return min(max(proposed, config.minimum), config.maximum)


def _percentile(values: list[float], percentile: float) -> float:
    """Nearest rank: the smallest value with at least ``percentile`` % at or below it."""
    ordered = sorted(values)
    rank = math.ceil(percentile / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]
