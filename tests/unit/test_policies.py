"""The scheduling plugins: scorers, pickers, deciders, admission, filters, policy files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from backends.base import Role
from backends.errors import OverloadedError
from backends.prefix import block_hashes
from router.errors import ConfigError, InvalidRequestError
from router.scheduling.perf import perf_for
from router.scheduling.plan import Disaggregation, Mode, RequestFeatures
from router.scheduling.prefix import PrefixIndex
from router.scheduling.registry import load_policy, parse_policy
from router.scheduling.scheduler import Scheduler
from router.scheduling.slo import Slo
from router.scheduling.snapshot import BackendView, PoolSnapshot

MODEL = "llama-3.1-70b"
H100 = perf_for("h100", MODEL)
H100_SLOW_LINK = perf_for("h100", MODEL, link_gbps=100.0)


def view(backend_id: str, role: Role = Role.BOTH, *, perf: Any = H100, **load: Any) -> BackendView:
    return BackendView(
        backend_id, "mock", "127.0.0.1:1", role, MODEL, "h100", True, load.pop("outstanding", 0),
        perf=perf, **load,
    )  # fmt: skip


def request(
    prompt_tokens: int = 1000,
    max_tokens: int = 200,
    *,
    sequence: int = 0,
    mode: Disaggregation = Disaggregation.AUTO,
    **extra: Any,
) -> RequestFeatures:
    return RequestFeatures("r", MODEL, prompt_tokens, max_tokens, mode, sequence, **extra)


def policy(**profile: Any) -> Scheduler:
    body = {"slo": {"ttft_ms": 2000, "tpot_ms": 100}, "admission": "admit-all", **profile}
    return parse_policy({"profiles": {"default": body}})


def test_prefix_affinity_sends_a_prompt_where_its_prefix_is() -> None:
    prompt = "You are a helpful assistant. " * 40 + "Question 1"
    index = PrefixIndex()
    index.record("c", block_hashes(prompt))
    pool = PoolSnapshot(tuple(view(n) for n in "abcd"), index)
    scheduler = policy(
        decider="never", scorers=[{"name": "prefix-affinity", "weight": 1}], picker="max-score"
    )
    for sequence in range(4):
        features = request(sequence=sequence, prefix_hashes=block_hashes(prompt + " more"))
        assert scheduler.schedule(features, pool, 0.0).decode_backend == "c"


def test_queue_depth_prefers_the_shortest_prefill_queue() -> None:
    pool = PoolSnapshot(
        (view("a", queued_prefill_tokens=9000), view("b", queued_prefill_tokens=10),
         view("c", queued_prefill_tokens=4000))
    )  # fmt: skip
    scheduler = policy(decider="never", scorers=["queue-depth"], picker="max-score")
    assert scheduler.schedule(request(), pool, 0.0).decode_backend == "b"


def test_kv_utilization_prefers_free_memory() -> None:
    pool = PoolSnapshot(
        (view("a", kv_tokens_used=90, kv_tokens_capacity=100),
         view("b", kv_tokens_used=10, kv_tokens_capacity=100))
    )  # fmt: skip
    scheduler = policy(decider="never", scorers=["kv-utilization"], picker="max-score")
    assert scheduler.schedule(request(10, 10), pool, 0.0).decode_backend == "b"


def test_cost_scorer_prefers_the_cheaper_device_per_token() -> None:
    b200 = perf_for("b200", MODEL)
    assert H100 is not None
    assert b200 is not None

    def dollars(perf: Any) -> float:
        seconds = perf.prefill_s(1000) + 200 * perf.step_s(1, 1100)
        return float(perf.price_per_second_usd * seconds)

    cheaper = "b200" if dollars(b200) < dollars(H100) else "h100"
    pool = PoolSnapshot((view("b200", perf=b200), view("h100")))
    scheduler = policy(decider="never", scorers=["cost"], picker="max-score")
    assert scheduler.schedule(request(), pool, 0.0).decode_backend == cheaper


def test_energy_counts_in_cost_when_the_hardware_is_owned() -> None:
    # At a tariff that dwarfs any rental price, the device spending fewer joules wins.
    frugal = perf_for("h100", MODEL)
    hungry = perf_for("b200", MODEL)
    assert frugal is not None
    assert hungry is not None
    pool = PoolSnapshot((view("hungry", perf=hungry), view("frugal", perf=frugal)))
    energy = {"name": "cost", "usd_per_kwh": 1000.0}  # energy dominates any rental price

    def joules(perf: Any) -> float:
        return float(perf.power_watts * (perf.prefill_s(1000) + 200 * perf.step_s(1, 1100)))

    greener = "frugal" if joules(frugal) < joules(hungry) else "hungry"
    picked = policy(decider="never", scorers=[energy], picker="max-score")
    assert picked.schedule(request(), pool, 0.0).decode_backend == greener
    with pytest.raises(ConfigError, match="usd_per_kwh must be >= 0"):
        policy(scorers=[{"name": "cost", "usd_per_kwh": -1}])


def test_round_robin_rotates_blind_to_load() -> None:
    pool = PoolSnapshot((view("a", outstanding=50), view("b"), view("c")))
    scheduler = policy(decider="never", picker="round-robin")
    picks = [scheduler.schedule(request(sequence=i), pool, 0.0).decode_backend for i in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_power_of_two_choices_never_picks_the_worse_of_its_pair() -> None:
    loads = {"a": 8000, "b": 6000, "c": 4000, "d": 2000, "e": 0}
    pool = PoolSnapshot(tuple(view(n, queued_prefill_tokens=q) for n, q in loads.items()))
    scheduler = policy(decider="never", scorers=["queue-depth"], picker="power-of-two-choices")
    picks = [scheduler.schedule(request(sequence=i), pool, 0.0).decode_backend for i in range(200)]
    assert "a" not in picks  # the most loaded loses every pair it is drawn in
    assert picks.count("e") > picks.count("b")
    again = [scheduler.schedule(request(sequence=i), pool, 0.0).decode_backend for i in range(200)]
    assert again == picks


def test_sampling_keeps_prefix_holders_in_the_shortlist() -> None:
    prompt = "shared system prompt " * 50
    index = PrefixIndex()
    index.record("b17", block_hashes(prompt))
    pool = PoolSnapshot(tuple(view(f"b{i}") for i in range(32)), index)
    scheduler = policy(decider="never", scorers=["prefix-affinity"], picker="max-score", sample=2)
    for sequence in range(10):
        features = request(sequence=sequence, prefix_hashes=block_hashes(prompt))
        assert scheduler.schedule(features, pool, 0.0).decode_backend == "b17"


def test_predictions_follow_the_device_timing_model() -> None:
    assert H100 is not None
    pool = PoolSnapshot((view("a", queued_prefill_tokens=3000),))
    plan = policy(decider="never").schedule(request(1000, 200), pool, 0.0)
    assert plan.predicted is not None
    expected = H100.timing.prefill_seconds([3000]) + H100.timing.prefill_seconds([1000])
    assert plan.predicted.ttft_s == pytest.approx(expected)
    assert plan.predicted.tpot_s > H100.step_s(1, 1100)


def split_pool(perf: Any = H100, *, busy: int = 0) -> PoolSnapshot:
    return PoolSnapshot(
        (
            view("p", Role.PREFILL, perf=perf),
            view("d", Role.DECODE, perf=perf, queued_prefill_tokens=busy, running=8,
                 context_tokens=8 * 3000),
        )
    )  # fmt: skip


def test_cost_model_splits_long_prompts_off_a_busy_decode_device() -> None:
    # A colocated request waits for the decode device's queued prefills; split, its
    # prefill runs at once on the idle prefill device.
    plan = policy(decider="cost-model").schedule(request(4000, 200), split_pool(busy=60000), 0.0)
    assert plan.mode is Mode.SPLIT


def test_cost_model_colocates_short_prompts_over_a_slow_link() -> None:
    plan = policy(decider="cost-model").schedule(request(64, 200), split_pool(H100_SLOW_LINK), 0.0)
    assert plan.mode is Mode.COLOCATED
    assert plan.predicted is not None


def test_cost_model_colocates_where_the_prefix_is_cached() -> None:
    prompt = "x" * 64 * 60
    index = PrefixIndex()
    index.record("d", block_hashes(prompt))
    base = split_pool(busy=0)
    pool = PoolSnapshot(base.backends, index)
    features = request(64 * 60 + 10, 200, prefix_hashes=block_hashes(prompt))
    assert policy(decider="cost-model").schedule(features, pool, 0.0).mode is Mode.COLOCATED
    cold = request(64 * 60 + 10, 200)
    colocated = policy(decider="never").schedule(cold, pool, 0.0).predicted
    warm = policy(decider="never").schedule(features, pool, 0.0).predicted
    assert colocated is not None
    assert warm is not None
    assert warm.ttft_s < colocated.ttft_s / 10


def test_the_request_slo_replaces_the_profile_default() -> None:
    pool = PoolSnapshot((view("a", queued_prefill_tokens=200000),))
    guard = policy(decider="never", admission={"name": "slo-guard", "slack": 1.0})
    with pytest.raises(OverloadedError) as shed:
        guard.schedule(request(), pool, 0.0)
    assert shed.value.retry_after_s is not None
    assert shed.value.retry_after_s > 0
    assert "retry in" in shed.value.message
    lenient = request(slo=Slo(ttft_s=3600.0, tpot_s=10.0))
    assert guard.schedule(lenient, pool, 0.0).decode_backend == "a"


def test_slo_guard_lets_urgent_requests_through() -> None:
    pool = PoolSnapshot((view("a", queued_prefill_tokens=200000),))
    guard = policy(decider="never", admission={"name": "slo-guard", "exempt_priority": 5})
    assert guard.schedule(request(priority=5), pool, 0.0).decode_backend == "a"
    with pytest.raises(OverloadedError):
        guard.schedule(request(priority=4), pool, 0.0)


def test_kv_fits_skips_devices_too_small_and_says_so_when_none_fit() -> None:
    pool = PoolSnapshot((view("small", kv_tokens_capacity=500), view("big")))
    scheduler = policy(decider="never", filters=["kv-fits"])
    for sequence in range(3):
        plan = scheduler.schedule(request(1000, 100, sequence=sequence), pool, 0.0)
        assert plan.decode_backend == "big"
    only_small = PoolSnapshot(pool.backends[:1])
    with pytest.raises(InvalidRequestError, match=r"needs 1100 KV tokens .* holds 500; lower"):
        scheduler.schedule(request(1000, 100), only_small, 0.0)


def test_unknown_slo_class_is_invalid() -> None:
    with pytest.raises(
        InvalidRequestError, match="unknown slo_class 'gold'; known: batch, default"
    ):
        load_policy().schedule(request(slo_class="gold"), split_pool(), 0.0)


def test_the_packaged_policy_serves_every_class() -> None:
    scheduler = load_policy()
    for slo_class in sorted(scheduler.slo_classes):
        plan = scheduler.schedule(request(slo_class=slo_class), split_pool(), 0.0)
        assert plan.predicted is not None


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ({"slo": {"ttft_ms": 1, "tpot_ms": 1}, "scorers": ["nope"]}, "unknown scorer 'nope'"),
        ({"slo": {"ttft_ms": 1, "tpot_ms": 1}, "picker": {"name": "max-score", "x": 1}},
         "picker max-score: bad option"),
        ({"slo": {"ttft_ms": 1, "tpot_ms": 1}, "scorers": [{"name": "cost", "weight": -1}]},
         "weight must be a number >= 0"),
        ({"slo": {"ttft_ms": 0, "tpot_ms": 1}}, "slo.ttft_ms"),
        ({"slo": {"ttft_ms": 1, "tpot_ms": 1}, "admission": {"name": "slo-guard", "slack": 0}},
         "slack must be > 0"),
        ({"slo": {"ttft_ms": 1, "tpot_ms": 1}, "deciderr": "never"}, "deciderr"),
    ],
)  # fmt: skip
def test_policy_errors_name_the_profile_and_the_fault(profile: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        parse_policy({"profiles": {"default": profile}}, "p.yaml")
    assert "p.yaml" in str(error.value)


def test_a_policy_needs_a_default_profile(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("profiles:\n  gold:\n    slo: {ttft_ms: 100, tpot_ms: 10}\n")
    with pytest.raises(ConfigError, match="needs a profile named 'default'"):
        load_policy(path)
    path.write_text("profiles: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(path)
    with pytest.raises(ConfigError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")


def test_block_hashes_are_shared_exactly_as_far_as_the_prefix() -> None:
    a = block_hashes("a" * 64 * 3 + "b" * 64 * 2 + "tail")
    b = block_hashes("a" * 64 * 3 + "c" * 64 * 2)
    assert len(a) == 5  # the partial last block is not cacheable
    assert a[:3] == b[:3]
    assert a[3] != b[3]
    assert a[4] != b[4]


def test_prefix_index_counts_leading_blocks_and_forgets_least_recent_first() -> None:
    index = PrefixIndex(blocks_per_backend=4)
    hashes = block_hashes("z" * 64 * 4)
    index.record("a", hashes)
    index.record("b", hashes[:2])
    assert index.matched_blocks(hashes) == {"a": 4, "b": 2}
    assert index.matched_blocks(block_hashes("y" + "z" * 64 * 4)) == {}
    index.record("a", block_hashes("q" * 64 * 2))  # evicts a's two oldest blocks
    assert index.blocks_held("a") == 4
    assert index.matched_blocks(hashes) == {"b": 2}
    index.forget("b")
    assert index.matched_blocks(hashes) == {}
