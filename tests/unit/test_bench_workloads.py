"""Benchmark workloads: length distributions, arrivals, traces, prompt text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backends.prefix import block_hashes
from bench.prompts import block_text, chained_prompt, prompt_text
from router.sim.workload import (
    WORKLOADS,
    LengthDistribution,
    RequestSpec,
    fixed,
    generate,
    load_trace,
    poisson_arrivals,
    save_trace,
)

CITED_MEANS = {"chatbot": (755, 200), "code": (171, 98), "summarization": (1738, 90)}


def _narrow(**overrides: float | int | str) -> LengthDistribution:
    fields: dict[str, float | int | str] = {
        "name": "narrow",
        "prompt_mean": 100.0,
        "prompt_sigma": 1.5,
        "prompt_min": 50,
        "prompt_max": 200,
        "output_mean": 20.0,
        "output_sigma": 1.5,
        "output_min": 10,
        "output_max": 40,
        "source": "test",
    }
    fields.update(overrides)
    return LengthDistribution(**fields)  # type: ignore[arg-type]  # any field, to test checks


@pytest.mark.parametrize("name", sorted(CITED_MEANS))
def test_sampled_means_land_on_the_cited_figures(name: str) -> None:
    prompt_mean, output_mean = CITED_MEANS[name]
    pairs = WORKLOADS[name].sample(np.random.default_rng(1234), 20_000)
    prompts = np.array([p for p, _ in pairs])
    outputs = np.array([o for _, o in pairs])
    assert prompts.mean() == pytest.approx(prompt_mean, rel=0.04)
    assert outputs.mean() == pytest.approx(output_mean, rel=0.04)
    # A spread, not a constant: lengths vary like real datasets.
    assert prompts.std() > 0.2 * prompt_mean
    assert outputs.std() > 0.2 * output_mean


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_presets_cite_a_source_and_fit_the_context(name: str) -> None:
    dist = WORKLOADS[name]
    assert dist.name == name
    assert "DistServe" in dist.source
    assert dist.prompt_max <= 8192
    assert dist.output_max <= 2048


def test_heavy_clipping_still_hits_the_mean_and_respects_bounds() -> None:
    # sigma 1.5 inside [50, 200] puts a large share of the mass on each bound; the
    # textbook lognormal location would miss the mean badly here.
    dist = _narrow()
    pairs = dist.sample(np.random.default_rng(5), 20_000)
    prompts = np.array([p for p, _ in pairs])
    outputs = np.array([o for _, o in pairs])
    assert prompts.min() == 50
    assert prompts.max() == 200
    assert outputs.min() == 10
    assert outputs.max() == 40
    assert (prompts == 200).mean() > 0.05
    assert prompts.mean() == pytest.approx(100, rel=0.03)
    assert outputs.mean() == pytest.approx(20, rel=0.03)
    assert all(isinstance(p, int) and isinstance(o, int) for p, o in pairs[:10])


def test_zero_sigma_is_a_constant() -> None:
    dist = _narrow(prompt_sigma=0.0, output_sigma=0.0)
    assert set(dist.sample(np.random.default_rng(0), 50)) == {(100, 20)}


@pytest.mark.parametrize(
    "overrides",
    [
        {"prompt_min": 0},
        {"prompt_min": 300},
        {"output_mean": 50.0},
        {"output_mean": 40.0},
        {"prompt_sigma": -0.1},
    ],
)
def test_inconsistent_distributions_are_rejected(overrides: dict[str, float | int]) -> None:
    with pytest.raises(ValueError, match="narrow"):
        _narrow(**overrides)


def test_poisson_arrivals_start_at_zero_with_mean_gap_one_over_rate() -> None:
    arrivals = poisson_arrivals(50.0, 20_001, np.random.default_rng(9))
    assert len(arrivals) == 20_001
    assert arrivals[0] == 0.0
    gaps = np.diff(arrivals)
    assert (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.03)
    # Exponential gaps: standard deviation equals the mean (a fixed pace would give 0).
    assert gaps.std() == pytest.approx(1 / 50.0, rel=0.05)


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf"), float("nan")])
def test_poisson_arrivals_reject_bad_rates(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(rate, 10, np.random.default_rng(0))


def test_poisson_arrivals_of_nothing() -> None:
    assert poisson_arrivals(1.0, 0, np.random.default_rng(0)) == []


def test_generate_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    first = generate("chatbot", 200, rate_per_s=10.0, seed=3)
    again = generate("chatbot", 200, rate_per_s=10.0, seed=3)
    other = generate("chatbot", 200, rate_per_s=10.0, seed=4)
    assert first == again
    assert first != other
    assert [s.prompt_tokens for s in first] != [s.prompt_tokens for s in other]
    assert [s.arrival_s for s in first] != [s.arrival_s for s in other]


def test_generate_keeps_lengths_fixed_across_rates() -> None:
    slow = generate("code", 100, rate_per_s=1.0, seed=11)
    fast = generate("code", 100, rate_per_s=100.0, seed=11)
    closed = generate("code", 100, rate_per_s=None, seed=11)
    lengths = [(s.prompt_tokens, s.output_tokens) for s in slow]
    assert lengths == [(s.prompt_tokens, s.output_tokens) for s in fast]
    assert lengths == [(s.prompt_tokens, s.output_tokens) for s in closed]
    assert fast[-1].arrival_s < slow[-1].arrival_s
    assert all(s.arrival_s == 0.0 for s in closed)


def test_generate_open_loop_arrivals_are_sorted_and_paced() -> None:
    specs = generate("summarization", 2000, rate_per_s=20.0, seed=2)
    arrivals = [s.arrival_s for s in specs]
    assert arrivals == sorted(arrivals)
    assert arrivals[0] == 0.0
    assert arrivals[-1] / (len(arrivals) - 1) == pytest.approx(1 / 20.0, rel=0.1)


def test_generate_accepts_a_custom_distribution() -> None:
    specs = generate(_narrow(), 500, rate_per_s=None, seed=0)
    assert all(50 <= s.prompt_tokens <= 200 for s in specs)
    assert all(10 <= s.output_tokens <= 40 for s in specs)


def test_generate_rejects_unknown_workloads() -> None:
    with pytest.raises(ValueError, match="chatbot"):
        generate("chitchat", 1, rate_per_s=None, seed=0)


def test_fixed() -> None:
    specs = fixed(3, 128, 16)
    assert specs == [RequestSpec(0.0, 128, 16)] * 3
    assert fixed(0, 1, 1) == []
    with pytest.raises(ValueError, match="prompt_tokens"):
        fixed(1, 0, 16)


@pytest.mark.parametrize(("arrival", "prompt", "output"), [(-0.1, 1, 1), (0.0, 0, 1), (0.0, 1, 0)])
def test_request_spec_rejects_impossible_requests(arrival: float, prompt: int, output: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        RequestSpec(arrival, prompt, output)


def test_trace_round_trip_sorts_by_arrival(tmp_path: Path) -> None:
    specs = generate("chatbot", 50, rate_per_s=5.0, seed=8)
    path = tmp_path / "nested" / "trace.jsonl"
    save_trace(path, list(reversed(specs)))
    lines = path.read_text().splitlines()
    assert len(lines) == 50
    assert set(json.loads(lines[0])) == {"arrival_s", "prompt_tokens", "output_tokens"}
    assert load_trace(path) == specs


def test_trace_skips_blank_lines_and_ignores_extra_keys(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(
        '{"arrival_s": 2, "prompt_tokens": 5, "output_tokens": 6, "id": "b"}\n'
        "\n"
        "   \n"
        '{"arrival_s": 0.5, "prompt_tokens": 7, "output_tokens": 8}\n'
    )
    assert load_trace(path) == [RequestSpec(0.5, 7, 8), RequestSpec(2.0, 5, 6)]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2, 3]", "JSON object"),
        ('{"arrival_s": 1.0, "prompt_tokens": 5}', "missing output_tokens"),
        ('{"arrival_s": "soon", "prompt_tokens": 5, "output_tokens": 6}', "arrival_s"),
        ('{"arrival_s": 1.0, "prompt_tokens": 5.5, "output_tokens": 6}', "prompt_tokens"),
        ('{"arrival_s": 1.0, "prompt_tokens": 5, "output_tokens": true}', "output_tokens"),
        ('{"arrival_s": 1.0, "prompt_tokens": 0, "output_tokens": 6}', "prompt_tokens"),
        ('{"arrival_s": -1.0, "prompt_tokens": 5, "output_tokens": 6}', "arrival_s"),
    ],
)
def test_trace_errors_name_the_line_and_the_problem(
    tmp_path: Path, bad_line: str, problem: str
) -> None:
    path = tmp_path / "trace.jsonl"
    good = '{"arrival_s": 0.0, "prompt_tokens": 5, "output_tokens": 6}'
    # The blank line still counts: the number must match what an editor shows.
    path.write_text(f"{good}\n\n{good}\n{bad_line}\n{good}\n")
    with pytest.raises(ValueError, match=r"trace\.jsonl:4: ") as caught:
        load_trace(path)
    assert problem in str(caught.value)


@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 64, 755, 8191])
def test_prompt_text_is_exactly_that_many_bytes(tokens: int) -> None:
    text = prompt_text(tokens, seed=17)
    assert len(text.encode("utf-8")) == tokens
    assert text.isascii()
    assert text.isprintable()
    assert not text.endswith(" ")
    assert not text.startswith(" ")


def test_prompt_text_is_words_and_spaces() -> None:
    text = prompt_text(2000, seed=1)
    assert set(text) <= set("abcdefghijklmnopqrstuvwxyz ")
    words = text.split(" ")
    assert "" not in words
    assert len(set(words)) > 20


def test_prompt_text_is_deterministic_per_seed() -> None:
    assert prompt_text(500, seed=5) == prompt_text(500, seed=5)
    assert prompt_text(500, seed=5) != prompt_text(500, seed=6)


@pytest.mark.parametrize("tokens", [0, -3])
def test_prompt_text_rejects_empty_prompts(tokens: int) -> None:
    with pytest.raises(ValueError, match="prompt_tokens"):
        prompt_text(tokens, seed=0)


def test_prompts_of_chains_sharing_their_first_ids_share_those_blocks_only() -> None:
    shared = (7, 8, 9)
    first = RequestSpec(0.0, 2000, 4, block_hashes=(*shared, 10), block_tokens=512)
    second = RequestSpec(0.0, 1800, 4, block_hashes=(*shared, 11), block_tokens=512)
    a, b = chained_prompt(first, seed=0), chained_prompt(second, seed=1)
    assert len(a.encode()) == 1999  # one byte short: the mock counts BOS as a token
    assert len(b.encode()) == 1799
    assert a.isascii()
    assert not a.endswith(" ")
    assert a[: 3 * 512] == b[: 3 * 512]
    assert a[3 * 512 : 4 * 512] != b[3 * 512 : 4 * 512]
    # What the mock devices cache: the same 24 leading 64-byte blocks, no more.
    hashes_a, hashes_b = block_hashes(a), block_hashes(b)
    assert hashes_a[:24] == hashes_b[:24]
    assert hashes_a[24] != hashes_b[24]


def test_a_block_has_the_same_text_wherever_it_comes() -> None:
    cache: dict[tuple[int, int], str] = {}
    head = RequestSpec(0.0, 600, 4, block_hashes=(3, 4), block_tokens=512)
    text = chained_prompt(head, seed=0, blocks=cache)
    assert text[:512] == block_text(3, 512)
    assert text[512:-1] == block_text(4, 512)[: 600 - 1 - 512 - 1]  # its last byte may
    assert not text.endswith(" ")  # be a letter instead of a space
    assert set(cache) == {(3, 512), (4, 512)}
    assert block_text(3, 512) != block_text(4, 512)
    assert chained_prompt(head, seed=5) == text  # a chain covering the prompt: no seed


def test_prompts_of_a_prefix_group_share_the_prefix_and_not_their_own_text() -> None:
    one, two = RequestSpec(0.0, 900, 4, 2, 600), RequestSpec(1.0, 900, 4, 2, 600)
    a, b = chained_prompt(one, seed=1), chained_prompt(two, seed=2)
    assert a[:600] == b[:600]
    assert a[600:] != b[600:]
    assert len(a) == len(b) == 899
