"""Mixed traffic in the simulator: requests of several SLO classes, each planned and judged
against its own class, and the per-request decision against always and never splitting."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench.auto_split import CLASS_SLOS, DECIDERS, fleet, mixed_policy, policy_of
from router.cli import main
from router.scheduling.registry import load_policy
from router.scheduling.slo import Slo
from router.sim.simulator import SimulationError, Simulator
from router.sim.workload import MIXES, WORKLOADS, MixPart, generate

HEADLINE = "2 H100 prefill + 2 H100 decode"


def test_a_mix_draws_each_kind_by_its_share_with_its_class() -> None:
    specs = generate("mixed", 4000, rate_per_s=10.0, seed=1)
    counts = Counter(spec.slo_class for spec in specs)
    for part in MIXES["mixed"]:
        assert counts[part.slo_class] / len(specs) == pytest.approx(part.share, abs=0.03)
        lengths = WORKLOADS[part.workload]
        mine = [spec for spec in specs if spec.slo_class == part.slo_class]
        assert all(lengths.prompt_min <= s.prompt_tokens <= lengths.prompt_max for s in mine)
        assert all(lengths.output_min <= s.output_tokens <= lengths.output_max for s in mine)
    # The same seed sends the same requests of the same classes whatever the rate.
    faster = generate("mixed", 4000, rate_per_s=40.0, seed=1)
    assert [(s.prompt_tokens, s.output_tokens, s.slo_class) for s in faster] == [
        (s.prompt_tokens, s.output_tokens, s.slo_class) for s in specs
    ]
    assert generate("mixed", 50, rate_per_s=5.0, seed=2) == generate(
        "mixed", 50, rate_per_s=5.0, seed=2
    )


def test_bad_mixes_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown workload 'chat'; known: .*mixed"):
        generate("chat", 1, rate_per_s=1.0, seed=0)
    with pytest.raises(ValueError, match="unknown workload 'poetry' in a mix"):
        MixPart("poetry", 1.0, "default")
    with pytest.raises(ValueError, match="share must be finite and > 0"):
        MixPart("code", 0.0, "code")


def test_each_request_is_planned_and_judged_by_its_class() -> None:
    specs = generate("mixed", 300, rate_per_s=30.0, seed=4)
    result = Simulator(fleet(HEADLINE), policy_of(None)()).run(specs)
    good = result.good(CLASS_SLOS)
    for name, slo in CLASS_SLOS.items():
        mine = result.slo_class == name
        assert mine.any()
        alone = result.ok & slo.met_by_arrays(
            result.ttft_s, result.tpot_s, result.max_itl_s, result.e2e_s
        )
        assert np.array_equal(good[mine], alone[mine])
    by_class = result.attainment_by_class(CLASS_SLOS)
    assert set(by_class) == set(CLASS_SLOS)
    # A TTFT of 15 s is easier than one of 125 ms: summarization misses least.
    assert by_class["summarization"] >= by_class["code"]
    with pytest.raises(ValueError, match="no SLO given for class 'code'"):
        result.good({"chatbot": CLASS_SLOS["chatbot"]})
    summary = result.summary(CLASS_SLOS).to_dict()
    assert summary["slo"] == "per class (chatbot, code, summarization)"
    assert summary["slo_attainment_by_class"] == pytest.approx(by_class)


def test_a_class_the_policy_lacks_stops_the_run_before_it_starts() -> None:
    specs = generate("mixed", 10, rate_per_s=10.0, seed=0)
    with pytest.raises(SimulationError, match="SLO class 'chatbot', which the policy has no"):
        Simulator(fleet(HEADLINE), load_policy()).run(specs)


def test_auto_serves_a_mix_at_least_as_well_per_dollar_as_either_fixed_mode() -> None:
    # 2 H100 prefill + 2 H100 decode at 50 requests/s of the mix: always splitting queues
    # code's 125 ms first tokens behind summaries on the prefill devices, never splitting
    # stalls every decode batch with prefills; auto splits what the prefill devices have
    # room for.
    specs = generate("mixed", 400, rate_per_s=50.0, seed=3)
    cluster = fleet(HEADLINE)
    per_dollar: dict[str, float] = {}
    for decider in ("auto", "always", "never"):
        result = Simulator(cluster, policy_of(DECIDERS[decider])()).run(specs)
        figure = result.summary(CLASS_SLOS).goodput_per_usd_hour
        assert figure is not None
        per_dollar[decider] = figure
        assert result.split.any() == (decider != "never")
    assert per_dollar["auto"] >= 1.2 * per_dollar["always"]
    assert per_dollar["auto"] >= 1.2 * per_dollar["never"]


def test_simulate_judges_a_mix_by_the_policys_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "model: llama-3.1-8b\ngroups:\n"
        "  - {name: p, profile: h100, role: prefill, count: 1}\n"
        "  - {name: d, profile: h100, role: decode, count: 1}\n"
    )
    flags = ["simulate", "--cluster", str(cluster), "--workload", "mixed", "--quiet"]
    flags += ["--rate", "5", "--requests", "40", "--seed", "1"]
    assert main(flags) == 2
    error = capsys.readouterr().err
    assert "SLO class 'chatbot', which the policy has no profile" in error
    assert "--policy" in error
    assert len(error.strip().splitlines()) == 1
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(mixed_policy()))
    out = tmp_path / "out"
    assert main([*flags, "--policy", str(policy), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "by class" in printed
    assert "chatbot" in printed
    document = json.loads((out / "results.json").read_text())
    targets = document["slo"]["by_class"]
    assert targets["code"]["ttft_s"] == CLASS_SLOS["code"].ttft_s
    assert set(document["summary"]["slo_attainment_by_class"]) == set(CLASS_SLOS)


def test_one_slo_for_all_still_judges_a_mix() -> None:
    specs = generate("mixed", 100, rate_per_s=10.0, seed=5)
    loose = Slo(ttft_s=60.0, tpot_s=1.0)
    result = Simulator(fleet(HEADLINE), policy_of(None)()).run(
        specs, slo=loose, stop_after_misses=len(specs)
    )
    assert result.attainment(loose) == 1.0
