"""Simulator workloads: bursty arrivals, shared prefixes, runs cut at a duration, traces."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from router.sim import workload
from router.sim.workload import (
    Bursts,
    PrefixSharing,
    RequestSpec,
    bursty_arrivals,
    generate,
    generate_for_duration,
    load_trace,
    save_trace,
)


def test_bursty_arrivals_keep_the_mean_rate_and_start_at_zero() -> None:
    rate = 50.0
    times = bursty_arrivals(rate, 100_000, np.random.default_rng(1))
    assert times[0] == 0.0
    assert all(later >= earlier for earlier, later in itertools.pairwise(times))
    assert len(times) / times[-1] == pytest.approx(rate, rel=0.05)


def test_bursty_arrivals_are_burstier_than_poisson() -> None:
    def dispersion(times: list[float]) -> float:
        counts, _ = np.histogram(times, bins=np.arange(0.0, times[-1], 1.0))
        return float(counts.var() / counts.mean())

    rng = np.random.default_rng(2)
    poisson = workload.poisson_arrivals(50.0, 20_000, rng)
    bursty = bursty_arrivals(50.0, 20_000, np.random.default_rng(2), Bursts(multiplier=8.0))
    assert dispersion(poisson) == pytest.approx(1.0, abs=0.3)
    assert dispersion(bursty) > 3 * dispersion(poisson)


def test_bursts_rates_average_to_the_asked_rate() -> None:
    shape = Bursts(multiplier=5.0, burst_fraction=0.25, cycle_s=4.0)
    calm, burst = shape.rates(10.0)
    assert burst == 5 * calm
    assert 0.25 * burst + 0.75 * calm == pytest.approx(10.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"multiplier": 0.5}, {"burst_fraction": 0.0}, {"burst_fraction": 1.0}, {"cycle_s": 0.0}],
)
def test_bad_bursts_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        Bursts(**kwargs)


def test_generate_is_seeded_and_keeps_lengths_across_arrival_processes() -> None:
    poisson = generate("chatbot", 500, rate_per_s=10.0, seed=4)
    bursty = generate("chatbot", 500, rate_per_s=10.0, seed=4, arrivals="bursty")
    assert bursty == generate("chatbot", 500, rate_per_s=10.0, seed=4, arrivals="bursty")
    assert [(s.prompt_tokens, s.output_tokens) for s in poisson] == [
        (s.prompt_tokens, s.output_tokens) for s in bursty
    ]
    assert [s.arrival_s for s in poisson] != [s.arrival_s for s in bursty]


def test_shared_prefixes_go_in_front_of_a_share_of_the_prompts() -> None:
    plain = generate("code", 2000, rate_per_s=10.0, seed=9)
    prefix = PrefixSharing(fraction=0.5, groups=4, prefix_tokens=512)
    shared = generate("code", 2000, rate_per_s=10.0, seed=9, prefix=prefix)
    with_prefix = [s for s in shared if s.prefix_group >= 0]
    assert len(with_prefix) / len(shared) == pytest.approx(0.5, abs=0.05)
    assert {s.prefix_group for s in with_prefix} == {0, 1, 2, 3}
    for before, after in zip(plain, shared, strict=True):
        assert after.arrival_s == before.arrival_s
        assert after.prompt_tokens == before.prompt_tokens + after.prefix_tokens


def test_generate_for_duration_cuts_at_the_duration() -> None:
    specs = generate_for_duration("chatbot", 30.0, rate_per_s=20.0, seed=1)
    assert specs[-1].arrival_s < 30.0
    assert len(specs) == pytest.approx(600, rel=0.15)
    bursty = generate_for_duration("chatbot", 30.0, rate_per_s=20.0, seed=1, arrivals="bursty")
    assert bursty[-1].arrival_s < 30.0


def test_more_bursty_requests_extend_the_same_arrivals() -> None:
    short = bursty_arrivals(20.0, 100, np.random.default_rng(3))
    long = bursty_arrivals(20.0, 1000, np.random.default_rng(3))
    assert long[:100] == pytest.approx(short, rel=1e-12)


@pytest.mark.parametrize(("prefix_group", "prefix_tokens"), [(-2, 0), (0, 0), (-1, 5), (0, 11)])
def test_request_spec_rejects_inconsistent_prefixes(prefix_group: int, prefix_tokens: int) -> None:
    with pytest.raises(ValueError, match="prefix"):
        RequestSpec(0.0, 10, 1, prefix_group, prefix_tokens)


def test_traces_keep_shared_prefixes(tmp_path: Path) -> None:
    specs = [RequestSpec(0.0, 100, 5), RequestSpec(1.0, 300, 5, 2, 200)]
    path = tmp_path / "trace.jsonl"
    save_trace(path, specs)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert "prefix_group" not in lines[0]
    assert lines[1]["prefix_group"] == 2
    assert load_trace(path) == specs


def test_a_trace_with_half_a_prefix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_tokens": 9, "output_tokens": 2, "prefix_group": 1}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:1: .*prefix_tokens"):
        load_trace(path)
