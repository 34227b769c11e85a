"""The adaptive limit's arithmetic, on a virtual clock: windows, gradients, baselines."""

from __future__ import annotations

import math

import pytest

from router.scheduling.concurrency_limit import (
    GradientLimit,
    LimitConfig,
    Signal,
    next_limit,
)

FIRST = Signal.FIRST_TOKEN
PER_TOKEN = Signal.PER_TOKEN


def limiter(**config: object) -> GradientLimit:
    options: dict[str, object] = {
        "initial": 16,
        "minimum": 2,
        "maximum": 1000,
        "interval_s": 1.0,
        "min_samples": 2,
        "buffer": 0.25,
        "tpot_buffer": 1.0,
        "baseline_window_s": 10.0,
        **config,
    }
    return GradientLimit(LimitConfig(**options), now=0.0)  # type: ignore[arg-type]  # test options


def window(
    limit: GradientLimit,
    at: float,
    first_token_s: float,
    *,
    per_token_s: float | None = None,
    in_flight: int = 100,
) -> int:
    """A full window of identical samples closing at ``at``; the limit after it."""
    limit.admitted(in_flight)
    if per_token_s is not None:
        for _ in range(2):
            limit.observe(PER_TOKEN, per_token_s, at - 0.5, in_flight)
    limit.observe(FIRST, first_token_s, at - 0.5, in_flight)
    limit.observe(FIRST, first_token_s, at, in_flight)
    return limit.limit


def test_latency_at_its_baseline_grows_the_limit_by_the_buffer_and_headroom() -> None:
    limit = limiter()
    # The first window is its own baseline: gradient 1.25, then sqrt headroom.
    assert window(limit, 1.0, 0.2) == math.floor(16 * 1.25 + math.sqrt(16 * 1.25))  # 24
    assert limit.signals[FIRST].baseline_s == 0.2
    assert limit.gradient == pytest.approx(1.25)


def test_a_window_needs_enough_first_tokens_and_after_slow_start_its_interval() -> None:
    limit = limiter(min_samples=3, initial=100)
    limit.admitted(100)
    assert not limit.observe(FIRST, 0.1, 0.1, 100)
    assert not limit.observe(FIRST, 0.1, 0.2, 100)  # two samples: not enough
    assert limit.observe(FIRST, 0.1, 0.3, 100)  # slow start: enough samples close it
    for at in (0.4, 0.5, 0.6):
        limit.observe(FIRST, 1.0, at, 100)  # congestion: slow start is over
    assert not limit.slow_start
    before = limit.limit
    for at in (0.7, 0.8, 0.9, 1.2):
        limit.observe(FIRST, 0.1, at, 100)  # enough samples, not yet the interval
    assert limit.limit == before
    assert limit.observe(FIRST, 0.1, 1.7, 100)  # 1 s after the last window closed


def test_queueing_cuts_the_limit_at_most_by_half_then_growth_is_additive() -> None:
    limit = limiter(initial=100)
    window(limit, 1.0, 0.1)  # baseline 0.1; target 0.125
    before = limit.limit
    # Four times the baseline: gradient 0.03 clamped to 0.5.
    assert window(limit, 2.0, 0.4) == math.floor(before * 0.5 + math.sqrt(before * 0.5))
    assert limit.gradient == 0.5
    assert not limit.slow_start
    # Latency back at half the baseline's target: slow start is over, the gradient stops at 1.
    cut = limit.limit
    assert window(limit, 3.0, 0.05) == math.floor(cut + math.sqrt(cut))
    assert limit.gradient == 1.0


def test_slow_start_lets_the_limit_double_until_the_first_congestion() -> None:
    limit = limiter(ttft_floor_s=0.25)
    # Latency well within its target (the floor, 0.25): the gradient reaches its bound.
    assert window(limit, 1.0, 0.1) == math.floor(16 * 2 + math.sqrt(16 * 2))
    assert limit.gradient == 2.0
    window(limit, 2.0, 0.5)  # congestion
    assert not limit.slow_start
    cut = limit.limit
    assert window(limit, 3.0, 0.1) == math.floor(cut + math.sqrt(cut))  # gradient 1 at most


def test_an_unused_limit_does_not_grow_and_a_draining_one_does_not_fall() -> None:
    config = LimitConfig(minimum=2, maximum=1000)
    # Fewer than half the slots used: growth would be without evidence.
    assert next_limit(config, 100, 1.0, peak_in_flight=49, in_flight=10) == 100
    assert next_limit(config, 100, 1.0, peak_in_flight=50, in_flight=10) == 110
    # More in flight than the limit: the latency comes from requests of a higher limit.
    assert next_limit(config, 40, 0.5, peak_in_flight=80, in_flight=41) == 40
    assert next_limit(config, 40, 0.5, peak_in_flight=80, in_flight=40) == 24


def test_the_limit_stays_within_its_bounds() -> None:
    config = LimitConfig(minimum=8, maximum=50)
    assert next_limit(config, 10, 0.5, peak_in_flight=10, in_flight=10) == 8
    assert next_limit(config, 45, 2.0, peak_in_flight=45, in_flight=45) == 50
    assert GradientLimit(LimitConfig(initial=500, minimum=8, maximum=50), 0.0).limit == 50


def test_a_slow_decode_cuts_the_limit_although_first_tokens_are_fast() -> None:
    limit = limiter(initial=100)
    window(limit, 1.0, 0.1, per_token_s=0.02)  # both baselines set
    assert limit.signals[PER_TOKEN].baseline_s == 0.02
    before = limit.limit
    # First tokens as fast as ever; each token three times slower (target 2x).
    window(limit, 2.0, 0.1, per_token_s=0.06)
    assert limit.gradient == pytest.approx(0.04 / 0.06)
    cut = limit.limit
    assert cut < before
    # Within the per-token buffer (batching, not congestion): no cut from it.
    assert window(limit, 3.0, 0.1, per_token_s=0.039) > cut
    assert limit.gradient == 1.0


def test_per_token_samples_carry_over_until_a_window_has_enough() -> None:
    limit = limiter(initial=100)
    limit.admitted(100)
    limit.observe(PER_TOKEN, 0.5, 0.1, 100)  # one: too few to count
    window(limit, 1.0, 0.1)
    assert limit.signals[PER_TOKEN].baseline_s is None
    window(limit, 2.0, 0.1, per_token_s=0.5)  # now three
    assert limit.signals[PER_TOKEN].baseline_s == 0.5


def test_the_baseline_is_the_lowest_window_of_its_period_and_follows_a_change() -> None:
    limit = limiter(initial=100, baseline_window_s=10.0)
    window(limit, 1.0, 0.1)
    window(limit, 2.0, 0.3)
    assert limit.signals[FIRST].baseline_s == 0.1
    for at in range(3, 12):  # longer prompts from now on
        window(limit, float(at), 0.3)
    assert limit.signals[FIRST].baseline_s == pytest.approx(0.1)  # 1.0 still within 10 s
    window(limit, 12.0, 0.3)
    assert limit.signals[FIRST].baseline_s == pytest.approx(0.3)  # the 0.1 window aged out
    window(limit, 13.0, 0.05)
    assert limit.signals[FIRST].baseline_s == pytest.approx(0.05)  # falls at once


def test_latency_under_the_floor_is_never_congestion() -> None:
    limit = limiter(initial=100, ttft_floor_s=0.25, tpot_floor_s=0.025)
    window(limit, 1.0, 0.001, per_token_s=0.002, in_flight=1000)
    before = limit.limit
    # Twenty and ten times the baselines, still under the floors: the limit grows.
    window(limit, 2.0, 0.02, per_token_s=0.02, in_flight=1000)
    assert limit.limit > before
    grown = limit.limit
    window(limit, 3.0, 0.02, per_token_s=0.05, in_flight=grown)  # tokens past their floor
    assert limit.limit < grown


def test_the_window_percentile_is_the_nearest_rank() -> None:
    limit = limiter(min_samples=4, initial=100)
    limit.admitted(100)
    for latency in (0.1, 0.4, 0.2, 0.3):
        limit.observe(FIRST, latency, 1.0, 100)
    assert limit.signals[FIRST].sample_s == 0.2  # p50 of four: the second


@pytest.mark.parametrize(
    "bad",
    [
        {"minimum": 0},
        {"minimum": 10, "maximum": 5},
        {"percentile": 0},
        {"interval_s": 0},
        {"buffer": -1},
    ],
)
def test_a_config_that_cannot_work_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must|needs"):
        LimitConfig(**bad)  # type: ignore[arg-type]  # test options
