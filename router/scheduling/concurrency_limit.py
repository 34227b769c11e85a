"""An adaptive concurrency limit: a gradient controller on LLM latency.

The shape is Envoy's adaptive concurrency filter (its gradient controller), with
two lessons from Netflix concurrency-limits' Gradient2. Latencies are collected
over a window (``interval_s``, and at least ``min_samples`` first tokens); at its
end each signal's ``percentile`` over the window is its *sample*, compared with
its *baseline*, the latency when nothing queues::

    target    = max(baseline * (1 + buffer), floor)
    gradient  = clamp(target / sample, 0.5, 2.0)
    new limit = limit * gradient + sqrt(limit * gradient)      # the burst headroom

with the smaller gradient of the two signals, clamped to ``[minimum, maximum]``.
Latency near the baseline lets the limit grow by its headroom; queues building in
the backends push samples past the buffered baseline and the limit falls, at most
by half per window. Until the first window that finds congestion the gradient may
exceed 1 (up to Envoy's bound of 2) and a window closes as soon as it holds
``min_samples`` first tokens, so a router that starts small (``initial``) reaches
what fast backends take within a few rounds of first tokens; after it the gradient
is at most 1 (Gradient2's bound: growth by the headroom alone) and windows last
``interval_s``, as TCP leaves slow start at its first loss. An LLM request holds its
slot for a whole generation, so the limit's effect on latency lags it by seconds; a
limit that kept multiplying into that lag would overshoot and swing.

The two signals, and why these:

- **Time to first token, from admission to the first frame.** It holds what
  concurrency does to a request before it streams: the engines' prefill queues,
  waiting for KV memory, prefills interleaved with a growing decode batch. Unlike
  whole-request latency, which is mostly decode and scales with the answer's
  length (1 to 4096 tokens), it does not depend on the answer. It leaves out the
  wait in the router's own queue, which the limit causes rather than suffers: fed
  back, a low limit would lengthen the queue and so lower itself. It is not
  divided by the prompt's length: the congestion it shows, queueing delay, does
  not depend on a request's own prompt, and the window's percentile averages over
  the prompt mix.
- **Time per output token**, (last frame - first frame) / (tokens - 1) of each
  completed request: whole-request latency normalised by the answer's length. In
  a split, the first token comes from the prefill backend, so a congested decode
  backend (a batch so large each step crawls) never shows in the first token; it
  shows here. It arrives only as requests finish, a request's length late, so it
  joins a window once it has ``min_samples`` of its own (fewer carry over). A
  decode batch slows every sequence as it grows, by design of batching, so its
  buffer is wider: ``tpot_buffer``, the slowdown per token that still counts as
  batching rather than congestion.

Each signal has a *floor* (``ttft_floor_s``, ``tpot_floor_s``): a latency below it
is never congestion. The daemon sets them to a share of the default SLO class's
targets (a quarter of its TTFT, half of its TPOT). Without them, backends that
answer in a millisecond read scheduling noise as a doubling of latency, and a
CPU-bound backend whose tokens slow from 2 to 20 ms under a 50 ms target would be
throttled for nothing: a queue the SLO affords is no reason to cut.

Where this departs from the models, and why:

- Envoy measures its baseline (minRTT) every minute by dropping the limit to 3
  until 50 requests complete. An LLM request holds its slot for a whole
  generation (seconds to minutes), so that window would drain the cluster and last
  as long. Here each baseline is the lowest window sample of the last
  ``baseline_window_s`` (a windowed minimum, as TCP BBR keeps its minimum RTT): it
  falls at once when latency does and rises as old windows age out, following a
  change of workload (longer prompts, another model) within the window.
- The floors anchor the controller to what the traffic asks for, where Envoy's
  buffer is relative only; the gradient still follows the baseline above them.
- From Gradient2: the limit does not grow while fewer than half its slots were used
  in the window (a limit grown while idle would admit a burst the backends cannot
  take), and it does not fall while more requests are in flight than the limit:
  those were admitted under a higher limit, and the latency they report is already
  acted on.

Pure: the time is an argument, so tests and simulations drive it with any clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum

# The gradient's bounds: the limit at most halves or doubles per window (Envoy's).
MIN_GRADIENT = 0.5
MAX_GRADIENT = 2.0
# Samples one signal's window holds at most: it closes early when full (bounded memory).
MAX_WINDOW_SAMPLES = 4096
# Window samples a baseline is the minimum of, at most.
MAX_BASELINE_WINDOWS = 1024


class Signal(Enum):
    FIRST_TOKEN = "first_token"  # admission to first frame, s
    PER_TOKEN = "per_token"  # time per output token after the first, s


@dataclass(frozen=True)
class LimitConfig:
    initial: int = 8
    minimum: int = 4
    maximum: int = 1024
    interval_s: float = 1.0
    min_samples: int = 8
    percentile: float = 50.0
    buffer: float = 0.25
    tpot_buffer: float = 0.5
    ttft_floor_s: float = 0.0
    tpot_floor_s: float = 0.0
    baseline_window_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum:
            raise ValueError("the limit needs 1 <= minimum <= maximum")
        if not 0 < self.percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")
        if self.interval_s <= 0 or self.baseline_window_s <= 0 or self.min_samples < 1:
            raise ValueError("interval_s, baseline_window_s and min_samples must be positive")
        if min(self.buffer, self.tpot_buffer, self.ttft_floor_s, self.tpot_floor_s) < 0:
            raise ValueError("buffers and floors must be >= 0")


class _Latency:
    """One signal: the window's samples and the recent window samples (the baseline)."""

    def __init__(self, buffer: float, floor_s: float) -> None:
        self.buffer = buffer
        self.floor_s = floor_s
        self.window: list[float] = []
        self._windows: deque[tuple[float, float]] = deque(maxlen=MAX_BASELINE_WINDOWS)
        self.sample_s: float | None = None
        self.baseline_s: float | None = None

    def close(self, now: float, percentile: float, horizon_s: float) -> float:
        """Ends the window; its gradient (before clamping)."""
        sample = _percentile(self.window, percentile)
        self.window = []
        self._windows.append((now, sample))
        while self._windows[0][0] < now - horizon_s:
            self._windows.popleft()
        baseline = min(latency for _, latency in self._windows)
        self.sample_s, self.baseline_s = sample, baseline
        target = max(baseline * (1 + self.buffer), self.floor_s)
        return MAX_GRADIENT if sample <= 0 else target / sample


class GradientLimit:
    """The current limit, moved once per window of latencies."""

    def __init__(self, config: LimitConfig, now: float) -> None:
        self.config = config
        self._limit = min(max(config.initial, config.minimum), config.maximum)
        self._window_started = now
        self._peak_in_flight = 0
        self.signals = {
            Signal.FIRST_TOKEN: _Latency(config.buffer, config.ttft_floor_s),
            Signal.PER_TOKEN: _Latency(config.tpot_buffer, config.tpot_floor_s),
        }
        self.gradient: float | None = None  # the last window's, clamped
        self.slow_start = True  # no window has found congestion yet

    @property
    def limit(self) -> int:
        return self._limit

    def admitted(self, in_flight: int) -> None:
        """A request took a slot; ``in_flight`` counts it."""
        self._peak_in_flight = max(self._peak_in_flight, in_flight)

    def observe(self, signal: Signal, latency_s: float, now: float, in_flight: int) -> bool:
        """One latency of ``signal``; True when it closed a window and the limit moved."""
        samples = self.signals[signal].window
        samples.append(latency_s)
        self._peak_in_flight = max(self._peak_in_flight, in_flight)
        first_tokens = len(self.signals[Signal.FIRST_TOKEN].window)
        full = len(samples) >= MAX_WINDOW_SAMPLES
        # In slow start a window closes on its samples alone, as TCP grows per ACK.
        timely = self.slow_start or now - self._window_started >= self.config.interval_s
        if not full and (first_tokens < self.config.min_samples or not timely):
            return False
        before = self._limit
        self._close_window(now, in_flight)
        return self._limit != before

    def _close_window(self, now: float, in_flight: int) -> None:
        config = self.config
        gradients = [
            latency.close(now, config.percentile, config.baseline_window_s)
            for latency in self.signals.values()
            if len(latency.window) >= config.min_samples
            or len(latency.window) >= MAX_WINDOW_SAMPLES
        ]
        peak = self._peak_in_flight
        self._window_started = now
        self._peak_in_flight = in_flight
        if not gradients:
            return
        gradient = min(gradients)
        if gradient < 1:
            self.slow_start = False
        ceiling = MAX_GRADIENT if self.slow_start else 1.0
        self.gradient = min(max(gradient, MIN_GRADIENT), ceiling)
        self._limit = next_limit(config, self._limit, self.gradient, peak, in_flight)


def next_limit(
    config: LimitConfig, limit: int, gradient: float, peak_in_flight: int, in_flight: int
) -> int:
    """The limit after a window whose (clamped) gradient was ``gradient``."""
    scaled = limit * gradient
    proposed = math.floor(scaled + math.sqrt(scaled))
    if proposed > limit and peak_in_flight < limit / 2:
        return limit  # not using what it has: no evidence that more would do
    if proposed < limit and in_flight > limit:
        return limit  # still draining the excess of an earlier cut
    return min(max(proposed, config.minimum), config.maximum)


def _percentile(values: list[float], percentile: float) -> float:
    """Nearest rank: the smallest value with at least ``percentile`` % at or below it."""
    ordered = sorted(values)
    rank = math.ceil(percentile / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]
