"""The simulator replays the mock engine's iterations, the router's accounting and KV moves."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import pytest

from backends.base import Role
from backends.errors import OverloadedError
from router.errors import NoHealthyBackendError
from router.scheduling.perf import DevicePerf, perf_for
from router.scheduling.plan import Mode, Plan, RequestFeatures
from router.scheduling.slo import Slo
from router.scheduling.snapshot import BackendView, PoolSnapshot
from router.sim.cluster import Cluster, DeviceSpec
from router.sim.simulator import SimulationError, Simulator
from router.sim.workload import RequestSpec, generate

MODEL = "llama-3.1-8b"


class FixedScheduler:
    """Colocated on ``colocated``, or split ``prefill`` -> ``decode``; records what it saw."""

    def __init__(
        self,
        *,
        colocated: str | None = None,
        prefill: str | None = None,
        decode: str | None = None,
        relay: bool = False,
    ) -> None:
        self.colocated = colocated
        self.prefill = prefill
        self.decode = decode
        self.relay = relay
        self.seen: list[tuple[float, RequestFeatures, dict[str, BackendView]]] = []

    def schedule(self, features: RequestFeatures, snapshot: PoolSnapshot, now: float) -> Plan:
        self.seen.append((now, features, {view.id: view for view in snapshot.backends}))
        if self.colocated is not None:
            return Plan(Mode.COLOCATED, self.colocated, self.colocated)
        assert self.prefill is not None
        assert self.decode is not None
        return Plan(Mode.SPLIT, self.prefill, self.decode, relay=self.relay)


def perf(
    profile: str = "h100", *, capacity: int | None = None, link_gbps: float | None = None
) -> DevicePerf:
    base = perf_for(profile, MODEL, None, link_gbps)
    assert base is not None
    if capacity is None:
        return base
    return dataclasses.replace(base, kv_capacity_tokens=capacity)


def device(
    device_id: str,
    role: Role = Role.BOTH,
    device_perf: DevicePerf | None = None,
    prefix_cache_blocks: int = 0,
) -> DeviceSpec:
    chosen = device_perf or perf()
    return DeviceSpec(
        id=device_id,
        role=role,
        model=MODEL,
        profile=chosen.timing.profile.name,
        perf=chosen,
        prefix_cache_blocks=prefix_cache_blocks,
    )


def cluster(*devices: DeviceSpec) -> Cluster:
    return Cluster(model=MODEL, devices=devices)


def requests(*specs: tuple[float, int, int]) -> list[RequestSpec]:
    return [RequestSpec(t, prompt, output) for t, prompt, output in specs]


def decode_steps(device_perf: DevicePerf, prompt: int, output: int) -> list[float]:
    """The engine's decode steps of one sequence alone: contexts prompt+1 .. prompt+output-1."""
    timing = device_perf.timing
    return [timing.decode_step_seconds([prompt + k]) for k in range(1, output)]


def end_of(start: float, durations: Sequence[float]) -> float:
    """Adds durations one by one, as back-to-back iterations do."""
    for duration in durations:
        start += duration
    return start


# ------------------------------------------------------------------ one device


@pytest.mark.parametrize("profile", ["h100", "groq-lpu"])
def test_one_request_on_an_idle_device_takes_one_prefill_then_its_decode_steps(
    profile: str,
) -> None:
    spec = device("d0", device_perf=perf(profile))
    result = Simulator(cluster(spec), FixedScheduler(colocated="d0")).run(requests((0.0, 700, 20)))
    prefill = spec.perf.timing.prefill_seconds([700])
    steps = decode_steps(spec.perf, 700, 20)
    assert result.ttft_s[0] == prefill
    assert result.tpot_s[0] == pytest.approx((end_of(prefill, steps) - prefill) / 19, rel=1e-12)
    assert result.e2e_s[0] == pytest.approx(end_of(prefill, steps), rel=1e-12)
    assert result.max_itl_s[0] == pytest.approx(max(steps), rel=1e-12)
    assert result.outcome.tolist() == ["ok"]
    assert not result.split[0]
    assert result.makespan_s == pytest.approx(end_of(prefill, steps), rel=1e-12)


def test_the_serving_path_overhead_delays_the_first_token_only() -> None:
    spec = device("d0")
    plain = Simulator(cluster(spec), FixedScheduler(colocated="d0")).run(
        requests((0.0, 700, 20), (0.0, 300, 20), (5.0, 100, 5))
    )
    slow = Simulator(cluster(spec), FixedScheduler(colocated="d0"), overhead_s=0.004).run(
        requests((0.0, 700, 20), (0.0, 300, 20), (5.0, 100, 5))
    )
    assert slow.ttft_s == pytest.approx(plain.ttft_s + 0.004, rel=1e-9)
    assert slow.tpot_s == pytest.approx(plain.tpot_s, rel=1e-9)


def test_a_single_output_token_ends_at_the_prefill() -> None:
    spec = device("d0")
    result = Simulator(cluster(spec), FixedScheduler(colocated="d0")).run(requests((1.0, 50, 1)))
    assert result.ttft_s[0] == pytest.approx(spec.perf.timing.prefill_seconds([50]), rel=1e-12)
    assert result.e2e_s[0] == result.ttft_s[0]
    assert math.isnan(result.tpot_s[0])


def test_requests_arriving_together_share_a_prefill_and_a_decode_batch() -> None:
    spec = device("d0")
    result = Simulator(cluster(spec), FixedScheduler(colocated="d0")).run(
        requests((0.0, 300, 3), (0.0, 500, 2))
    )
    timing = spec.perf.timing
    prefill = timing.prefill_seconds([300, 500])
    both = timing.decode_step_seconds([301, 501])
    alone = timing.decode_step_seconds([302])
    assert result.ttft_s.tolist() == [prefill, prefill]
    assert result.e2e_s[1] == pytest.approx(prefill + both, rel=1e-12)
    assert result.e2e_s[0] == pytest.approx(prefill + both + alone, rel=1e-12)


def test_prefill_goes_first_and_stalls_running_decodes() -> None:
    spec = device("d0")
    timing = spec.perf.timing
    first_prefill = timing.prefill_seconds([400])
    arrival = first_prefill + 1e-6  # during the first decode step
    result = Simulator(cluster(spec), FixedScheduler(colocated="d0")).run(
        requests((0.0, 400, 4), (arrival, 400, 2))
    )
    step1 = timing.decode_step_seconds([401])
    # The second request waits out the first decode step, then prefills before step 2.
    second_prefill_end = first_prefill + step1 + timing.prefill_seconds([400])
    assert result.ttft_s[1] == pytest.approx(second_prefill_end - arrival, rel=1e-12)
    gap = result.max_itl_s[0]
    assert gap == pytest.approx(
        timing.prefill_seconds([400]) + timing.decode_step_seconds([402, 401])
    )


def test_admission_is_first_come_first_served_without_overtaking() -> None:
    capacity = 2000
    spec = device("d0", device_perf=perf(capacity=capacity))
    timing = spec.perf.timing
    # A holds 1500 tokens (1000 + 500) until it finishes; B needs 1000 and must wait;
    # C needs 100 and would fit at once, but may not overtake B.
    result = Simulator(cluster(spec), FixedScheduler(colocated="d0")).run(
        requests((0.0, 1000, 500), (0.001, 900, 100), (0.002, 50, 50))
    )
    a_end = result.e2e_s[0]
    b_prefill_end = a_end + timing.prefill_seconds([900, 50])
    assert result.arrival_s[1] + result.ttft_s[1] == pytest.approx(b_prefill_end, rel=1e-12)
    assert result.arrival_s[2] + result.ttft_s[2] == pytest.approx(b_prefill_end, rel=1e-12)


def test_a_prefill_batch_holds_at_most_16384_prompt_tokens() -> None:
    spec = device("d0")
    timing = spec.perf.timing
    result = Simulator(cluster(spec), FixedScheduler(colocated="d0")).run(
        requests((0.0, 10000, 2), (0.0, 10000, 2))
    )
    first = timing.prefill_seconds([10000])
    assert result.ttft_s[0] == first
    assert result.ttft_s[1] == pytest.approx(first + timing.prefill_seconds([10000]), rel=1e-12)


def test_a_request_that_could_never_fit_fails_and_others_go_on() -> None:
    spec = device("d0", device_perf=perf(capacity=1000))
    result = Simulator(cluster(spec), FixedScheduler(colocated="d0")).run(
        requests((0.0, 900, 200), (0.0, 100, 10))
    )
    assert result.outcome.tolist() == ["failed", "ok"]


# ------------------------------------------------------------------ split


def test_a_split_request_waits_out_the_modelled_wire_time_before_its_second_token() -> None:
    slow = perf(link_gbps=1.0)  # 1 Gbit/s: 128 KiB per token takes a while
    prefill, decode = device("p0", Role.PREFILL, slow), device("d0", Role.DECODE)
    result = Simulator(cluster(prefill, decode), FixedScheduler(prefill="p0", decode="d0")).run(
        requests((0.0, 1000, 2))
    )
    wire = 1000 * slow.kv_bytes_per_token * 8 / 1e9
    assert wire == slow.transfer_s(1000, decode.perf)
    assert result.ttft_s[0] == slow.timing.prefill_seconds([1000])
    step = decode.perf.timing.decode_step_seconds([1001])
    assert result.tpot_s[0] == pytest.approx(wire + step, rel=1e-12)
    assert result.split[0]
    assert (result.prefill_device[0], result.decode_device[0]) == (0, 1)


def test_the_decode_leg_s_hop_adds_to_the_wire_time_and_holds_the_lease_as_long() -> None:
    slow = perf(capacity=1500, link_gbps=1.0)
    prefill, decode = device("p0", Role.PREFILL, slow), device("d0", Role.DECODE)
    timing = slow.timing
    first_end = timing.prefill_seconds([1000])
    wire = slow.transfer_s(1000, decode.perf)
    hop = 0.003
    # B arrives after A's prefill; A's lease leaves no room for B until A's KV is over.
    arrival = first_end + wire / 4
    result = Simulator(
        cluster(prefill, decode), FixedScheduler(prefill="p0", decode="d0"), handoff_s=hop
    ).run(requests((0.0, 1000, 2), (arrival, 600, 5)))
    assert result.ttft_s[0] == first_end
    step = decode.perf.timing.decode_step_seconds([1001])
    assert result.tpot_s[0] == pytest.approx(hop + wire + step, rel=1e-12)
    b_first = end_of(first_end, [hop + wire, timing.prefill_seconds([600])])
    assert result.arrival_s[1] + result.ttft_s[1] == pytest.approx(b_first, rel=1e-12)
    with pytest.raises(ValueError, match="handoff_s"):
        Simulator(cluster(prefill, decode), FixedScheduler(colocated="p0"), handoff_s=-1.0)


def test_the_lease_holds_prefill_memory_until_the_decode_side_has_the_kv() -> None:
    capacity = 1500
    slow = perf(capacity=capacity, link_gbps=1.0)
    prefill, decode = device("p0", Role.PREFILL, slow), device("d0", Role.DECODE)
    timing = slow.timing
    first_end = timing.prefill_seconds([1000])
    wire = slow.transfer_s(1000, decode.perf)
    # B arrives after A's prefill; A's lease (1000 tokens) leaves no room for B (601).
    arrival = first_end + wire / 4
    result = Simulator(cluster(prefill, decode), FixedScheduler(prefill="p0", decode="d0")).run(
        requests((0.0, 1000, 5), (arrival, 600, 5))
    )
    b_first = end_of(first_end, [wire, timing.prefill_seconds([600])])
    assert result.arrival_s[1] + result.ttft_s[1] == pytest.approx(b_first, rel=1e-12)


def test_a_decode_device_reserves_at_once_even_beyond_its_capacity() -> None:
    prefill = device("p0", Role.PREFILL)
    decode = device("d0", Role.DECODE, perf(capacity=1200))
    result = Simulator(cluster(prefill, decode), FixedScheduler(prefill="p0", decode="d0")).run(
        requests((0.0, 1000, 100), (0.0, 1000, 100), (0.0, 1000, 300))
    )
    assert result.outcome.tolist() == ["ok", "ok", "failed"]
    assert result.devices[1].kv_peak_tokens == 2200  # both decode at once, over-committed


def test_split_onto_one_device_moves_no_bytes() -> None:
    spec = device("d0")
    result = Simulator(cluster(spec), FixedScheduler(prefill="d0", decode="d0")).run(
        requests((0.0, 800, 2))
    )
    timing = spec.perf.timing
    assert result.tpot_s[0] == pytest.approx(timing.decode_step_seconds([801]), rel=1e-12)


# ------------------------------------------------------------------ prefix cache


def test_a_prefix_cache_hit_cuts_the_prefill() -> None:
    spec = device("d0", prefix_cache_blocks=64)
    timing = spec.perf.timing
    shared = [RequestSpec(0.0, 1100, 2, 3, 1000), RequestSpec(5.0, 1100, 2, 3, 1000)]
    result = Simulator(cluster(spec), FixedScheduler(colocated="d0")).run(shared)
    cached = (1000 // 64) * 64
    assert result.ttft_s[0] == timing.prefill_seconds([1100])
    assert result.ttft_s[1] == pytest.approx(timing.prefill_seconds([1100], [cached]), rel=1e-12)
    assert result.ttft_s[1] < result.ttft_s[0]
    assert result.cached_tokens.tolist() == [0, cached]


def test_no_prefix_cache_no_hit() -> None:
    spec = device("d0")
    shared = [RequestSpec(0.0, 1100, 2, 3, 1000), RequestSpec(5.0, 1100, 2, 3, 1000)]
    result = Simulator(cluster(spec), FixedScheduler(colocated="d0")).run(shared)
    assert result.ttft_s[0] == pytest.approx(result.ttft_s[1], rel=1e-12)


def test_the_decode_device_caches_the_prefix_it_received() -> None:
    prefill = device("p0", Role.PREFILL)
    decode = device("d0", Role.DECODE, prefix_cache_blocks=64)
    shared = [RequestSpec(0.0, 640, 2, 0, 640), RequestSpec(5.0, 640, 2, 0, 640)]
    scheduler = FixedScheduler(prefill="p0", decode="d0")
    simulator = Simulator(cluster(prefill, decode), scheduler)
    simulator.run(shared[:1])
    assert simulator.devices[1].cached_tokens(scheduler.seen[0][1].prefix_hashes, 640) == 639


def test_shared_prefixes_reach_the_policy_as_block_hashes_and_the_index_learns_them() -> None:
    spec = device("d0")
    scheduler = FixedScheduler(colocated="d0")
    shared = [
        RequestSpec(0.0, 300, 2, 1, 200),
        RequestSpec(1.0, 300, 2, 1, 200),
        RequestSpec(2.0, 300, 2),
    ]
    simulator = Simulator(cluster(spec), scheduler)
    simulator.run(shared)
    hashes = [features.prefix_hashes for _, features, _ in scheduler.seen]
    assert len(hashes[0]) == 300 // 64
    assert hashes[0][:3] == hashes[1][:3]  # 200 tokens: 3 whole shared blocks
    assert hashes[0][3] != hashes[1][3]
    assert not set(hashes[2]) & set(hashes[0])
    assert simulator.prefix_index.matched_blocks(hashes[1]) == {"d0": len(hashes[1])}


# ------------------------------------------------------------------ the router side


def test_the_policy_sees_the_daemons_load_accounting() -> None:
    prefill, decode = device("p0", Role.PREFILL), device("d0", Role.DECODE)
    scheduler = FixedScheduler(prefill="p0", decode="d0")
    timing = prefill.perf.timing
    first_end = timing.prefill_seconds([1000])
    Simulator(cluster(prefill, decode), scheduler, load_report_interval_s=0).run(
        requests((0.0, 1000, 50), (first_end / 2, 10, 5), (first_end + 1e-4, 10, 5))
    )
    _, _, during_prefill = scheduler.seen[1]
    assert during_prefill["p0"].outstanding == 1
    assert during_prefill["p0"].queued_prefill_tokens == 1000
    assert during_prefill["p0"].kv_tokens_used == 1001
    assert during_prefill["d0"].outstanding == 0
    _, _, during_decode = scheduler.seen[2]
    # The first is decoding (its leg sent at its first token); the second is prefilling.
    assert during_decode["p0"].outstanding == 1
    assert during_decode["p0"].queued_prefill_tokens == 10
    assert during_decode["d0"].outstanding == 1
    assert during_decode["d0"].running == 1
    assert during_decode["d0"].context_tokens == 1050
    assert [features.sequence for _, features, _ in scheduler.seen] == [0, 1, 2]


def test_a_relayed_split_counts_on_the_decode_backend_once_the_kv_is_there() -> None:
    slow = perf(link_gbps=1.0)
    prefill, decode = device("p0", Role.PREFILL, slow), device("d0", Role.DECODE)
    scheduler = FixedScheduler(prefill="p0", decode="d0", relay=True)
    first_end = slow.timing.prefill_seconds([1000])
    wire = slow.transfer_s(1000, decode.perf)
    Simulator(cluster(prefill, decode), scheduler).run(
        requests((0.0, 1000, 50), (first_end + wire / 2, 10, 5), (first_end + wire * 1.01, 10, 5))
    )
    assert scheduler.seen[1][2]["d0"].outstanding == 0
    assert scheduler.seen[2][2]["d0"].outstanding == 1


def test_kv_use_reaches_the_policy_at_the_load_report_interval() -> None:
    spec = device("d0")
    scheduler = FixedScheduler(colocated="d0")
    Simulator(cluster(spec), scheduler, load_report_interval_s=10.0).run(
        requests((0.0, 100, 4000), (1.0, 10, 5), (10.5, 10, 5))
    )
    assert scheduler.seen[1][2]["d0"].kv_tokens_used == 0
    assert scheduler.seen[2][2]["d0"].kv_tokens_used > 0


class Refusing:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def schedule(self, features: RequestFeatures, snapshot: PoolSnapshot, now: float) -> Plan:
        raise self.error


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (OverloadedError("busy", retry_after_s=1.0), "shed"),
        (NoHealthyBackendError("none"), "unavailable"),
    ],
)
def test_refused_requests_are_counted_and_never_served(error: Exception, outcome: str) -> None:
    result = Simulator(cluster(device("d0")), Refusing(error)).run(requests((0.0, 10, 5)))
    assert result.outcome.tolist() == [outcome]
    summary = result.summary(Slo(name="any", ttft_s=1.0))
    assert summary.slo_attainment == 0.0
    assert summary.not_served == 1
    assert summary.shed == (1 if outcome == "shed" else 0)


def test_a_plan_naming_an_unknown_backend_is_an_error() -> None:
    with pytest.raises(SimulationError, match="nowhere"):
        Simulator(cluster(device("d0")), FixedScheduler(colocated="nowhere")).run(
            requests((0.0, 10, 5))
        )


def test_the_admission_gate_queues_then_sheds() -> None:
    spec = device("d0")
    scheduler = FixedScheduler(colocated="d0")
    result = Simulator(cluster(spec), scheduler, max_in_flight=1, queue_limit=1).run(
        requests((0.0, 100, 10), (0.0, 100, 10), (0.0, 100, 10))
    )
    assert result.outcome.tolist() == ["ok", "ok", "shed"]
    # The second is routed only when the first finishes.
    assert scheduler.seen[1][0] == pytest.approx(result.e2e_s[0])
    assert result.ttft_s[1] > result.e2e_s[0]


# ------------------------------------------------------------------ whole runs


def mixed_cluster() -> Cluster:
    return cluster(
        device("p0", Role.PREFILL),
        device("p1", Role.PREFILL, perf("h200")),
        device("d0", Role.DECODE, perf("groq-lpu")),
        device("d1", Role.DECODE, perf(capacity=20000)),
    )


class Alternating:
    """Long prompts split, short ones colocated, round robin: deterministic and busy."""

    def schedule(self, features: RequestFeatures, snapshot: PoolSnapshot, now: float) -> Plan:
        n = features.sequence
        decode = ("d0", "d1")[n % 2]
        if features.prompt_tokens >= 512:
            return Plan(Mode.SPLIT, ("p0", "p1")[n % 2], decode)
        return Plan(Mode.COLOCATED, decode, decode)


def test_every_request_ends_served_or_refused() -> None:
    specs = generate("chatbot", 400, rate_per_s=40.0, seed=3)
    specs.append(RequestSpec(specs[-1].arrival_s, 8000, 10_000_000))  # fits nowhere
    result = Simulator(mixed_cluster(), Alternating()).run(specs)
    assert len(result.outcome) == len(specs)
    assert set(result.outcome.tolist()) == {"ok", "failed"}
    assert (result.outcome == "failed").sum() == 1
    ok = result.ok
    assert np.all(result.ttft_s[ok] > 0)
    assert np.all(result.e2e_s[ok] >= result.ttft_s[ok])
    served_tokens = sum(d.decode_tokens for d in result.devices)
    # Every output token after the first comes from exactly one decode step.
    assert served_tokens == int((result.output_tokens[ok] - 1).sum())


def test_the_same_seed_gives_the_same_run() -> None:
    def run() -> dict[str, list[object]]:
        specs = generate("code", 300, rate_per_s=30.0, seed=11)
        result = Simulator(mixed_cluster(), Alternating()).run(specs)
        return {
            "ttft": result.ttft_s.tolist(),
            "tpot": result.tpot_s.tolist(),
            "gap": result.max_itl_s.tolist(),
            "devices": [(d.busy_s, d.decode_iterations) for d in result.devices],
        }

    assert run() == run()


def test_a_run_stops_early_once_the_slo_cannot_be_met() -> None:
    specs = generate("summarization", 200, rate_per_s=200.0, seed=1)
    slo = Slo(name="tight", ttft_s=0.05, tpot_s=0.05)
    result = Simulator(cluster(device("d0")), FixedScheduler(colocated="d0")).run(
        specs, slo=slo, stop_after_misses=10
    )
    assert result.stopped_early
    assert (result.outcome == "unfinished").sum() > 0


def test_long_runs_report_progress() -> None:
    reports: list[tuple[float, int, int]] = []
    specs = generate("code", 300, rate_per_s=30.0, seed=2)
    Simulator(
        mixed_cluster(),
        Alternating(),
        progress=lambda t, done, total: reports.append((t, done, total)),
        progress_interval_s=0.0,
    ).run(specs)
    assert reports
    assert all(total == 300 for _, _, total in reports)
    assert [done for _, done, _ in reports] == sorted(done for _, done, _ in reports)


def test_a_simulator_runs_once() -> None:
    simulator = Simulator(cluster(device("d0")), FixedScheduler(colocated="d0"))
    simulator.run(requests((0.0, 10, 2)))
    with pytest.raises(RuntimeError):
        simulator.run(requests((0.0, 10, 2)))


def test_unsorted_requests_are_rejected() -> None:
    with pytest.raises(ValueError, match="sorted"):
        Simulator(cluster(device("d0")), FixedScheduler(colocated="d0")).run(
            requests((1.0, 10, 2), (0.0, 10, 2))
        )


def test_summary_figures() -> None:
    spec = device("d0")
    specs = generate("code", 200, rate_per_s=20.0, seed=5)
    result = Simulator(cluster(spec), FixedScheduler(colocated="d0")).run(specs)
    slo = Slo(name="loose", ttft_s=10.0, tpot_s=1.0)
    summary = result.summary(slo)
    assert summary.slo_attainment == 1.0
    assert summary.goodput == pytest.approx(200 / result.makespan_s)
    tokens = int(result.output_tokens.sum())
    assert summary.output_tokens == tokens
    per_hour = tokens / result.makespan_s * 3600
    price = spec.perf.price_per_hour_usd
    assert summary.cost_per_million_output_tokens_usd == pytest.approx(price / per_hour * 1e6)
    assert summary.goodput is not None
    assert summary.goodput_per_usd_hour == pytest.approx(summary.goodput / price)
    document = summary.to_dict()
    assert document["ttft_ms"]["count"] == 200
    assert document["outcomes"] == {"ok": 200}
