"""Prefix sharing as block hash chains: cache block names, caches that hold them, and the
unbounded cache that serves exactly the reuse a trace records."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from router.cli import main
from router.sim.blocks import prompt_blocks
from router.sim.device import BLOCK_TOKENS
from router.sim.simulator import Simulator
from router.sim.workload import RequestSpec
from tests.unit.test_sim_engine import FixedScheduler, cluster, device

ONE_DEVICE = "model: llama-3.1-8b\ngroups:\n  - {name: c, profile: h100, role: both, count: 1}\n"
# Every request is served: one shed would never reach the cache the reuse counts it in.
ADMIT_ALL = "profiles:\n  default: {slo: {ttft_ms: 1000, tpot_ms: 50}, admission: admit-all}\n"


def chained(prompt: int, *ids: int, size: int = 512, at: float = 0.0) -> RequestSpec:
    return RequestSpec(at, prompt, 2, block_hashes=ids, block_tokens=size)


# ------------------------------------------------------------------ block names


def test_a_512_token_block_is_eight_cache_blocks_named_by_its_id() -> None:
    assert BLOCK_TOKENS == 64
    first = prompt_blocks(0, chained(1100, 5, 6, 7))
    second = prompt_blocks(1, chained(1100, 5, 6, 8))
    other = prompt_blocks(2, chained(1100, 5, 9, 10))
    assert len(first) == 1100 // 64
    assert first[:16] == second[:16]  # two ids in common: 1024 tokens
    assert first[16] != second[16]
    assert first[:8] == other[:8]
    assert not set(first[8:]) & set(other[8:])  # after a differing id nothing matches
    assert len(set(first)) == len(first)


def test_a_partial_last_block_is_cached_for_its_whole_cache_blocks_only() -> None:
    names = prompt_blocks(0, chained(1000, 5, 6))  # id 6 covers tokens 512..999
    assert len(names) == 1000 // 64
    assert prompt_blocks(1, chained(1000, 5, 6)) == names  # the same prompt again
    assert prompt_blocks(1, chained(1100, 5, 6))[:15] == names


def test_blocks_not_aligned_with_the_cache_share_what_lies_wholly_in_them() -> None:
    first = prompt_blocks(0, chained(1000, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, size=100))
    second = prompt_blocks(1, chained(1000, 1, 2, 30, 40, 50, 60, 70, 80, 90, 99, size=100))
    assert first[:3] == second[:3]  # 200 tokens in common: blocks ending at 64, 128, 192
    assert first[3] != second[3]


def test_tokens_past_the_chain_are_the_requests_own() -> None:
    first = prompt_blocks(0, chained(2000, 5))  # one id: 512 tokens, then its own
    second = prompt_blocks(1, chained(2000, 5))
    assert first[:8] == second[:8]
    assert not set(first[8:]) & set(second[8:])
    group = prompt_blocks(2, RequestSpec(0.0, 2000, 2, 5, 512))  # the same as a group
    assert group[:8] == first[:8]


# ------------------------------------------------------------------ caches


def test_a_prompt_reuses_what_an_earlier_one_of_its_prefill_batch_computes() -> None:
    spec = device("d0", prefix_cache_blocks=1024)
    both = [chained(1100, 5, 6, 7), chained(1100, 5, 6, 8)]  # arrive together: one batch
    result = Simulator(cluster(spec), FixedScheduler(colocated="d0")).run(both)
    assert result.cached_tokens.tolist() == [0, 1024]
    assert result.ttft_s[0] == result.ttft_s[1]
    timing = spec.perf.timing
    assert result.ttft_s[0] == pytest.approx(timing.prefill_seconds([1100, 1100], [0, 1024]))


def test_a_whole_prompt_found_cached_still_computes_its_last_token() -> None:
    spec = device("d0", prefix_cache_blocks=1024)
    again = [chained(1024, 5, 6), chained(1024, 5, 6, at=5.0)]
    result = Simulator(cluster(spec), FixedScheduler(colocated="d0")).run(again)
    assert result.cached_tokens.tolist() == [0, 1024]  # served from the cache
    timing = spec.perf.timing
    assert result.ttft_s[1] == pytest.approx(timing.prefill_seconds([1024], [1023]))
    assert result.summary().prefix_hit_ratio == 0.5


def test_a_bounded_cache_evicts_and_an_unbounded_one_never_does() -> None:
    # 12 prompts of four 512-token blocks each, then the first again: its blocks survive
    # only in a cache that holds all 12 * 32 cache blocks.
    specs = [chained(2048, *range(4 * i, 4 * i + 4), at=float(i)) for i in range(12)]
    specs.append(chained(2048, 0, 1, 2, 3, at=20.0))

    def last_hit(*, unbounded: bool) -> int:
        spec = device("d0", prefix_cache_blocks=64)
        scheduler = FixedScheduler(colocated="d0")
        simulator = Simulator(cluster(spec), scheduler, unbounded_prefix_cache=unbounded)
        return int(simulator.run(specs).cached_tokens[-1])

    assert last_hit(unbounded=False) == 0
    assert last_hit(unbounded=True) == 2048


# ------------------------------------------------------------------ the trace's own reuse


def conversations(
    seed: int, count: int = 10, turns: int = 4, grow: int = 1500
) -> list[dict[str, object]]:
    """A Mooncake-shaped trace: one shared 1024-token system prompt, conversations whose
    turns extend the last prompt (its whole 512-token blocks keep their ids, the rest
    and what is new get fresh ones), some requests sent again as they were, arrivals
    on a coarse clock so that many come at once."""
    rng = np.random.default_rng(seed)
    fresh = itertools.count(2)
    lines: list[dict[str, object]] = []
    for _ in range(count):
        whole, length = [0, 1], 1024  # ids of the last prompt's whole blocks, its length
        clock = int(rng.integers(0, 8)) * 3000
        for _ in range(turns):
            length += int(rng.integers(1, grow))
            ids = whole + [next(fresh) for _ in range(math.ceil(length / 512) - len(whole))]
            line = {
                "timestamp": clock,
                "input_length": length,
                "output_length": int(rng.integers(1, 40)),
                "hash_ids": ids,
            }
            lines.append(line)
            if rng.random() < 0.3:
                lines.append({**line, "timestamp": clock + 3000 * int(rng.integers(0, 2))})
            clock += 6000
            whole = ids[: length // 512]
    return lines


def trace_reuse(lines: list[dict[str, object]], block: int = 64) -> list[int]:
    """Each request's prompt tokens seen before, computed from the trace alone.

    Token *t* of a request is (its ``hash_ids[t // 512]``, ``t % 512``). A block is
    ``block`` whole tokens, named by its tokens and the name of the block before it (so
    a name stands for the whole prefix up to there); a request reuses its leading blocks
    that any earlier request (in arrival order) had, times ``block``, capped at its
    length.
    """
    names: dict[tuple[int, tuple[tuple[int, int], ...]], int] = {}
    seen: set[int] = set()
    hits = []
    for line in sorted(lines, key=lambda line: line["timestamp"]):  # type: ignore[arg-type,return-value]  # ints, from the test's own generator
        length = line["input_length"]
        ids = line["hash_ids"]
        assert isinstance(length, int)
        assert isinstance(ids, list)
        previous, mine = -1, []
        for start in range(0, length - block + 1, block):
            tokens = tuple((ids[t // 512], t % 512) for t in range(start, start + block))
            previous = names.setdefault((previous, tokens), len(names))
            mine.append(previous)
        leading = sum(1 for _ in itertools.takewhile(seen.__contains__, mine))
        hits.append(min(leading * block, length))
        seen.update(mine)
    return hits


def id_reuse(lines: list[dict[str, object]]) -> list[int]:
    """Each request's leading hash ids seen in an earlier request, times 512 tokens,
    capped at its length: the reuse counted in the trace's own blocks."""
    seen: set[object] = set()
    hits = []
    for line in sorted(lines, key=lambda line: line["timestamp"]):  # type: ignore[arg-type,return-value]  # ints, from the test's own generator
        ids, length = line["hash_ids"], line["input_length"]
        assert isinstance(ids, list)
        assert isinstance(length, int)
        leading = sum(1 for _ in itertools.takewhile(seen.__contains__, ids))
        hits.append(min(leading * 512, length))
        seen.update(ids)
    return hits


def test_an_unbounded_cache_on_one_device_serves_exactly_the_traces_own_reuse(
    tmp_path: Path,
) -> None:
    lines = conversations(seed=4)
    stamps = [line["timestamp"] for line in lines]
    assert len(set(stamps)) < len(stamps) / 3  # many arrive together, in one prefill batch
    trace = tmp_path / "conversation_trace.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "one.yaml").write_text(ONE_DEVICE)
    (tmp_path / "policy.yaml").write_text(ADMIT_ALL)
    out = tmp_path / "out"
    flags = ["--trace", str(trace), "--unbounded-prefix-cache", "--quiet", "--out", str(out)]
    flags += ["--policy", str(tmp_path / "policy.yaml")]
    assert main(["simulate", "--cluster", str(tmp_path / "one.yaml"), *flags]) == 0

    expected = trace_reuse(lines)
    with (out / "requests.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["outcome"] for row in rows] == ["ok"] * len(lines)
    assert [int(row["cached_tokens"]) for row in rows] == expected
    total = sum(int(line["input_length"]) for line in lines)  # type: ignore[call-overload]  # ints, as written above
    document = json.loads((out / "results.json").read_text())
    assert document["prefix_hit_ratio"] == sum(expected) / total
    assert 0.3 < document["prefix_hit_ratio"] < 0.9
    # Counted in whole 512-token ids (capped at the prompt), the reuse is at most 63
    # tokens more a request: what a repeated prompt's partial last cache block holds.
    coarse = id_reuse(lines)
    assert all(0 <= c - e < 64 for c, e in zip(coarse, expected, strict=True))


def test_simulate_without_the_flag_uses_the_clusters_caches(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in conversations(seed=5)))
    (tmp_path / "one.yaml").write_text(ONE_DEVICE)
    out = tmp_path / "out"
    flags = ["--trace", str(trace), "--quiet", "--out", str(out)]
    assert main(["simulate", "--cluster", str(tmp_path / "one.yaml"), *flags]) == 0
    document = json.loads((out / "results.json").read_text())
    assert document["prefix_hit_ratio"] == 0.0  # the cluster file gives it no cache
    assert document["unbounded_prefix_cache"] is False
    assert document["workload"]["trace_format"] == "mooncake"
