"""The frontier sweep: the cheapest fleet of each type per TPOT target, on a tiny catalogue."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from router.cli import main
from router.sim.frontier import (
    FLEET_TYPES,
    FrontierResult,
    contiguous_ranges,
    shareable_tokens,
    sweep_frontier,
    usd_per_million_output_tokens,
)
from router.sim.frontier_report import format_frontier, write_frontier
from router.sim.planner import Candidate
from router.sim.policy import resolve_policy
from router.sim.workload import RequestSpec, generate

MODEL = "llama-3.1-8b"
PROFILES = ("h100", "groq-lpu")  # one GPU, one SRAM part
WINDOW_S = 10.0
# 1 ms: faster than Groq's single stream (1.3 ms for 8B); 3 ms: beyond an H100's (6.4 ms).
TPOTS_S = (0.001, 0.003, 0.02, 0.1)


@pytest.fixture(scope="module")
def requests() -> list[RequestSpec]:
    return generate("chatbot", 40, rate_per_s=4.0, seed=1)


@pytest.fixture(scope="module")
def frontier(requests: list[RequestSpec]) -> FrontierResult:
    return sweep_frontier(
        MODEL,
        requests,
        lambda: resolve_policy(None),
        ttft_slo_s=2.0,
        window_s=WINDOW_S,
        tpot_slos_s=TPOTS_S,
        profiles=PROFILES,
        max_devices=3,
    )


def test_the_cheapest_per_target_never_rises_as_the_target_loosens(
    frontier: FrontierResult,
) -> None:
    for fleet in frontier.fleet_types:
        costs = [
            p.usd_per_million_output_tokens or math.inf
            for p in frontier.points[fleet.name]
            if p.met
        ]
        assert costs == sorted(costs, reverse=True), fleet.name
    overall = [frontier.cheapest(i) for i in range(len(frontier.tpot_slos_s))]
    costs = [
        found[1].usd_per_million_output_tokens or math.inf for found in overall if found is not None
    ]
    assert costs
    assert costs == sorted(costs, reverse=True)


def test_a_target_no_fleet_of_a_type_can_meet_is_unmet_without_a_run(
    frontier: FrontierResult,
) -> None:
    for fleet in frontier.fleet_types:
        at_1ms = frontier.points[fleet.name][0]
        assert not at_1ms.met
        assert at_1ms.unmet == "any-size"
        assert at_1ms.runs == 0
    assert all(trial.tpot_slo_s > 0.001 for trial in frontier.trials)
    assert frontier.cheapest(0) is None
    # At 3 ms only the Groq decode fleets can serve; the GPU-decode types cannot.
    index = frontier.tpot_slos_s.index(0.003)
    assert frontier.points["gpu-colocated"][index].unmet == "any-size"
    assert frontier.points["gpu-split"][index].unmet == "any-size"
    assert frontier.only_sram_decode_ms() == [3.0]
    for name in ("gpu-prefill-sram-decode", "sram-colocated"):
        best = frontier.points[name][index].best
        assert best is not None
        assert best.candidate.decode_profile == "groq-lpu"
        assert best.attainment is not None
        assert best.attainment >= 0.9


def test_a_fleet_type_that_misses_within_the_device_bound_is_unmet_so(
    requests: list[RequestSpec],
) -> None:
    crowded = [RequestSpec(r.arrival_s / 20, r.prompt_tokens, r.output_tokens) for r in requests]
    result = sweep_frontier(
        MODEL,
        crowded,
        lambda: resolve_policy(None),
        ttft_slo_s=0.05,
        window_s=WINDOW_S / 20,
        tpot_slos_s=(0.008, 0.05),
        fleet_types=["gpu-colocated"],
        profiles=["h100"],
        max_devices=1,
    )
    tight, loose = result.points["gpu-colocated"]
    assert loose.unmet == "max-devices"
    assert loose.runs == 1
    # What missed the looser target misses the tighter one: no run is spent on it.
    assert tight.unmet == "max-devices"
    assert tight.runs == 0
    assert "unmet within 1 devices" in format_frontier(result)


def test_a_configuration_that_missed_a_looser_target_is_not_run_at_a_tighter_one(
    frontier: FrontierResult,
) -> None:
    failed: dict[str, list[tuple[float, Candidate]]] = {}
    for trial in frontier.trials:
        earlier = failed.setdefault(trial.fleet_type, [])
        for tpot, candidate in earlier:
            assert not (trial.tpot_slo_s < tpot and trial.trial.candidate.covered_by(candidate)), (
                trial.fleet_type,
                trial.trial.candidate.label(),
            )
        if trial.trial.status != "met":
            earlier.append((trial.tpot_slo_s, trial.trial.candidate))
    assert frontier.runs == len(frontier.trials) > 0


def test_cost_per_million_output_tokens_is_price_over_tokens_per_hour(
    frontier: FrontierResult, requests: list[RequestSpec]
) -> None:
    # By hand: a $27.52/h fleet serving 1,000 output tokens/s (3.6 M/h) costs $7.644/M.
    assert usd_per_million_output_tokens(27.52, 3.6e6) == pytest.approx(7.6444, abs=1e-4)
    with pytest.raises(ValueError, match="tokens_per_hour"):
        usd_per_million_output_tokens(1.0, 0.0)
    tokens_per_hour = sum(r.output_tokens for r in requests) / WINDOW_S * 3600
    assert frontier.output_tokens_per_hour == pytest.approx(tokens_per_hour)
    for points in frontier.points.values():
        for point in points:
            if point.best is not None:
                price = point.best.candidate.price_per_hour_usd
                assert point.usd_per_million_output_tokens == pytest.approx(
                    price * 1e6 / tokens_per_hour
                )


def test_fleet_types_sort_candidates_by_the_kinds_of_their_devices() -> None:
    kinds = {"h100": "gpu", "groq-lpu": "sram"}
    colocated_gpu = Candidate(1.0, 1, "h100", 1)
    hetero = Candidate(1.0, 2, "groq-lpu", 1, "h100", 1)
    backwards = Candidate(1.0, 2, "h100", 1, "groq-lpu", 1)  # SRAM prefill for a GPU
    admitted = {
        name: [c for c in (colocated_gpu, hetero, backwards) if fleet.admits(c, kinds)]
        for name, fleet in FLEET_TYPES.items()
    }
    assert admitted == {
        "gpu-colocated": [colocated_gpu],
        "gpu-split": [],
        "gpu-prefill-sram-decode": [hetero],
        "sram-colocated": [],
    }
    assert [fleet.name for fleet in FLEET_TYPES.values() if fleet.heterogeneous] == [
        "gpu-prefill-sram-decode"
    ]


def test_contiguous_ranges_join_neighbouring_targets() -> None:
    order = [2.0, 3.0, 5.0, 10.0, 20.0]
    assert contiguous_ranges([3.0, 5.0, 20.0], order) == [[3.0, 5.0], [20.0, 20.0]]
    assert contiguous_ranges([], order) == []


def test_the_table_and_the_json_say_the_same(frontier: FrontierResult, tmp_path: Path) -> None:
    table = format_frontier(frontier)
    for fleet in frontier.fleet_types:
        assert fleet.label in table
    assert "unmet at any size" in table
    assert "only SRAM decode meets it at: 3 ms" in table
    notes = write_frontier(tmp_path / "f.json", tmp_path / "f.png", frontier, {"command": "x"})
    document = json.loads((tmp_path / "f.json").read_text())
    assert document["command"] == "x"
    assert document["tpot_slos_ms"] == [1.0, 3.0, 20.0, 100.0]
    assert document["only_sram_decode_tpot_ms"] == [3.0]
    for entry, index in zip(document["cheapest"], range(4), strict=True):
        found = frontier.cheapest(index)
        assert entry["fleet_type"] == (None if found is None else found[0].name)
    # Drawn when matplotlib is there (the bench extra), a note saying how otherwise.
    assert (tmp_path / "f.png").exists() != bool(notes)
    assert all("pip install 'hetero-router[plots]'" in note for note in notes)


def test_plan_frontier_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "plan",
            "--frontier",
            "--model",
            MODEL,
            "--profiles",
            ",".join(PROFILES),
            "--rate",
            "4",
            "--requests",
            "30",
            "--slo-ttft-ms",
            "2000",
            "--tpot-slos-ms",
            "1,20",
            "--max-devices",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "TPOT SLO" in captured.out
    assert "TPOT 20 ms" in captured.err  # a progress line per point
    document = json.loads((tmp_path / "frontier.json").read_text())
    assert document["command"] == "plan --frontier"
    assert document["window_s"] == pytest.approx(30 / 4)
    assert not math.isnan(document["cpu_s"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tpot-slos-ms", "5,fast"], "--tpot-slos-ms: expected a comma list of numbers"),
        (["--fleet-types", "gpu-colocated,tpu"], "unknown fleet type(s) tpu"),
        (["--slo-tpot-ms", "5"], "--frontier sweeps the TPOT target"),
    ],
)
def test_bad_frontier_flags_are_one_line_and_exit_code_2(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["plan", "--frontier", "--model", MODEL, "--rate", "4", "--requests", "5"]
    code = main([*args, "--slo-ttft-ms", "1000", *extra])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert message in error
    assert "\n" not in error


def test_the_bound_credits_a_traces_leading_blocks_seen_before_and_a_group_whole() -> None:
    # Mooncake-style chains of 512-token blocks; the second repeats the first's first two
    # blocks, the third arrives first and shares nothing; a synthetic group counts whole.
    first = RequestSpec(1.0, 1500, 10, block_hashes=(1, 2, 3), block_tokens=512)
    second = RequestSpec(2.0, 1300, 10, block_hashes=(1, 2, 9), block_tokens=512)
    earliest = RequestSpec(0.0, 600, 10, block_hashes=(7, 8), block_tokens=512)
    full_repeat = RequestSpec(3.0, 1024, 10, block_hashes=(1, 2), block_tokens=512)
    grouped = RequestSpec(0.5, 300, 10, prefix_group=0, prefix_tokens=200)
    plain = RequestSpec(0.7, 100, 10)
    got = shareable_tokens([first, second, earliest, full_repeat, grouped, plain])
    # full_repeat: all 1,024 tokens seen, but its last token is always computed.
    assert got == [0, 1024, 0, 1023, 192, 0]
