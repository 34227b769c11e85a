"""The chaos scenario's pure parts: fault plans, the injector's rules, output verdicts,
lease accounting and the workload."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.chaos.fleet import DeviceStartError
from bench.chaos.injector import Injector
from bench.chaos.schedule import Fault, FaultMix, FaultPlan, most_out_by_role, plan_faults
from bench.chaos.timeline import Timeline, timeline_of
from bench.chaos.verdicts import (
    DEADLINE,
    STREAM_CLOSED,
    Delivery,
    DeviceLoad,
    TokenCheck,
    compare,
    lease_tally,
    per_bin,
    reference_tokens,
    router_saw,
    tally,
    unhealthy_spans,
)
from bench.chaos.workload import chaos_requests

ROLES = {"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode", "d2": "decode"}
MIX = FaultMix(
    mean_gap_s=1.0,
    weights={"kill": 0.4, "stop": 0.35, "restart": 0.25},
    kill_down_s=(1.0, 6.0),
    stop_s=(0.5, 8.0),
    recovery_s=3.0,
)


# ---------------------------------------------------------------- fault plans


def test_a_plan_is_the_same_for_the_same_seed_and_differs_for_another() -> None:
    first = plan_faults(ROLES, start_s=5, end_s=200, mix=MIX, seed=3)
    assert first == plan_faults(ROLES, start_s=5, end_s=200, mix=MIX, seed=3)
    assert first != plan_faults(ROLES, start_s=5, end_s=200, mix=MIX, seed=4)


@pytest.mark.parametrize("seed", range(10))
def test_a_plan_never_takes_a_whole_role_out(seed: int) -> None:
    plan = plan_faults(ROLES, start_s=0, end_s=300, mix=MIX, seed=seed)
    most = most_out_by_role(plan.faults, ROLES, MIX.recovery_s)
    assert most["prefill"] <= 1
    assert most["decode"] <= 2
    # Dense faults must meet the limit, or the check above proves nothing.
    assert plan.skipped > 0


def test_every_fault_falls_in_the_window_and_ends_by_its_close() -> None:
    plan = plan_faults(ROLES, start_s=10, end_s=60, mix=MIX, seed=1)
    assert plan.faults
    for fault in plan.faults:
        assert 10 <= fault.at_s < 60
        assert fault.back_s <= 60 + 1e-3
        if fault.kind == "restart":
            assert fault.hold_s == 0
        elif fault.kind == "kill":
            assert fault.hold_s <= MIX.kill_down_s[1]


def test_a_device_fails_again_only_after_it_is_back_and_recovered() -> None:
    plan = plan_faults(ROLES, start_s=0, end_s=300, mix=MIX, seed=2)
    last_back: dict[str, float] = {}
    for fault in plan.faults:
        if fault.device in last_back:
            assert fault.at_s >= last_back[fault.device] + MIX.recovery_s - 1e-3
        last_back[fault.device] = fault.back_s


def test_a_role_of_one_device_is_never_faulted() -> None:
    plan = plan_faults(
        {"p0": "prefill", "d0": "decode", "d1": "decode"}, start_s=0, end_s=100, mix=MIX, seed=5
    )
    assert plan.faults
    assert {f.device for f in plan.faults} <= {"d0", "d1"}


def test_only_kinds_with_weight_are_planned_and_counted() -> None:
    mix = FaultMix(1.0, {"stop": 1.0}, (1, 2), (1, 2), 0.0)
    plan = plan_faults(ROLES, start_s=0, end_s=50, mix=mix, seed=0)
    assert plan.counts() == {"kill": 0, "stop": len(plan.faults), "restart": 0}


@pytest.mark.parametrize(
    "bad",
    [
        {"mean_gap_s": 0.0},
        {"weights": {}},
        {"weights": {"kill": 0.0}},
        {"weights": {"explode": 1.0}},
        {"kill_down_s": (3.0, 1.0)},
        {"recovery_s": -1.0},
    ],
)
def test_a_mix_that_cannot_be_drawn_from_is_refused(bad: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "mean_gap_s": 1.0,
        "weights": {"kill": 1.0},
        "kill_down_s": (1.0, 2.0),
        "stop_s": (1.0, 2.0),
        "recovery_s": 1.0,
    }
    with pytest.raises(ValueError):  # noqa: PT011  # each field has its own message
        FaultMix(**{**fields, **bad})  # type: ignore[arg-type]  # any field, to test checks


def test_most_out_counts_overlapping_faults_of_a_role() -> None:
    faults = [Fault(0, "d0", "kill", 5), Fault(1, "d1", "stop", 1), Fault(10, "d2", "kill", 1)]
    assert most_out_by_role(faults, ROLES) == {"decode": 2, "prefill": 0}


# ---------------------------------------------------------------- the injector


class FakeFleet:
    """Devices as states, with every call recorded."""

    def __init__(self, roles: dict[str, str], *, failing_starts: int = 0) -> None:
        self._roles = roles
        self.state = dict.fromkeys(roles, "up")
        self.calls: list[tuple[str, str]] = []
        self._failing_starts = failing_starts

    def roles(self) -> dict[str, str]:
        return dict(self._roles)

    def up(self, device_id: str) -> bool:
        return self.state[device_id] == "up"

    async def kill(self, device_id: str) -> None:
        self._do("kill", device_id, "down")

    def stop(self, device_id: str) -> None:
        self._do("stop", device_id, "stopped")

    def resume(self, device_id: str) -> None:
        self._do("resume", device_id, "up")

    async def terminate(self, device_id: str, grace_s: float = 10.0) -> None:
        self._do("terminate", device_id, "down")

    async def start(self, device_id: str, timeout_s: float | None = None) -> None:
        self.calls.append(("start", device_id))
        if self._failing_starts > 0:
            self._failing_starts -= 1
            raise DeviceStartError(f"{device_id} did not serve")
        self.state[device_id] = "up"

    def _do(self, call: str, device_id: str, state: str) -> None:
        self.calls.append((call, device_id))
        self.state[device_id] = state


def _injector(fleet: FakeFleet, *faults: Fault) -> Injector:
    # Started now, faults at 0 s: every fault is due at once, and a hold of 1000 s never
    # comes within a test.
    return Injector(fleet, FaultPlan(tuple(faults), 0), time.monotonic(), restart_backoff_s=0)


async def test_a_fault_that_would_empty_a_role_is_skipped_when_due() -> None:
    fleet = FakeFleet({"p0": "prefill", "p1": "prefill"})
    injector = _injector(fleet, Fault(0, "p0", "stop", 1000), Fault(0, "p1", "kill", 1000))
    await injector.run()
    assert [r.outcome for r in injector.records] == ["applied", "skipped"]
    assert "last prefill device up" in injector.records[1].detail
    assert fleet.calls == [("stop", "p0")]
    await injector.finish(timeout_s=0)  # cancels the pending resume


async def test_a_fault_is_skipped_when_the_router_counts_no_other_device_of_the_role() -> None:
    fleet = FakeFleet({"d0": "decode", "d1": "decode", "d2": "decode"})
    routed = {"d0": True, "d1": False, "d2": False}  # d1, d2 serve but are not taken back
    plan = FaultPlan((Fault(0, "d0", "kill", 1000), Fault(0, "d1", "kill", 1000)), 0)
    injector = Injector(fleet, plan, time.monotonic(), routed=routed.__getitem__)
    await injector.run()
    assert [r.outcome for r in injector.records] == ["skipped", "applied"]
    assert "the router counts healthy" in injector.records[0].detail
    assert fleet.calls == [("kill", "d1")]
    await injector.finish(timeout_s=0)


async def test_a_device_that_is_not_up_is_not_faulted_again() -> None:
    fleet = FakeFleet(ROLES)
    fleet.state["d0"] = "down"
    injector = _injector(fleet, Fault(0, "d0", "kill", 1))
    await injector.run()
    assert injector.records[0].outcome == "skipped"
    assert fleet.calls == []
    assert injector.counts() == {"skipped": {"kill": 1, "stop": 0, "restart": 0}}


async def test_kill_stop_and_restart_each_bring_the_device_back() -> None:
    fleet = FakeFleet(ROLES)
    injector = _injector(
        fleet, Fault(0, "d0", "kill", 0), Fault(0, "d1", "stop", 0), Fault(0, "p0", "restart", 0)
    )
    await injector.run()
    await injector.finish(timeout_s=5)
    assert all(fleet.up(device) for device in ROLES)
    assert sorted(fleet.calls) == sorted(
        [
            ("kill", "d0"),
            ("start", "d0"),
            ("stop", "d1"),
            ("resume", "d1"),
            ("terminate", "p0"),
            ("start", "p0"),
        ]
    )
    assert all(r.outcome == "applied" and r.back_s is not None for r in injector.records)
    assert injector.counts() == {"applied": {"kill": 1, "stop": 1, "restart": 1}}


async def test_a_restart_is_tried_again_and_then_reported_failed() -> None:
    fleet = FakeFleet(ROLES, failing_starts=5)
    injector = _injector(fleet, Fault(0, "d0", "kill", 0))
    await injector.run()
    await injector.finish(timeout_s=5)
    record = injector.records[0]
    assert record.outcome == "restart_failed"
    assert record.restart_attempts == 3
    assert "did not serve" in record.detail
    assert not fleet.up("d0")


async def test_a_restart_that_fails_once_succeeds_on_the_next_attempt() -> None:
    fleet = FakeFleet(ROLES, failing_starts=1)
    injector = _injector(fleet, Fault(0, "d0", "restart", 0))
    await injector.run()
    await injector.finish(timeout_s=5)
    assert injector.records[0].outcome == "applied"
    assert injector.records[0].restart_attempts == 2
    assert fleet.up("d0")


# ---------------------------------------------------------------- token verdicts

REFERENCE = [10, 11, 12, 13, 14, 15]


@pytest.mark.parametrize(
    ("delivered", "expected"),
    [
        (REFERENCE, TokenCheck("exact")),
        ([10, 11, 12], TokenCheck("truncated", missing=3)),
        ([], TokenCheck("truncated", missing=6)),
        # A resume that replayed the last two tokens it had sent.
        ([10, 11, 12, 13, 12, 13, 14, 15], TokenCheck("duplicated", duplicated=2)),
        # A replay from the start, cut short.
        ([10, 11, 12, 10, 11], TokenCheck("duplicated", duplicated=3, missing=4)),
        # A resume that skipped two tokens.
        ([10, 11, 14, 15], TokenCheck("missing", missing=2)),
        ([10, 11, 12, 13, 14, 15, 99], TokenCheck("extra", wrong=1)),
        ([10, 11, 99, 98], TokenCheck("wrong", missing=4, wrong=2)),
    ],
)
def test_delivered_tokens_are_judged_against_the_reference(
    delivered: list[int], expected: TokenCheck
) -> None:
    assert compare(delivered, REFERENCE) == expected


def test_a_repeated_token_run_is_read_as_the_nearest_replay() -> None:
    reference = [1, 2, 1, 2, 3]
    # After [1, 2, 1] the rest [2, 3] matches at 3 only: exact.
    assert compare([1, 2, 1, 2, 3], reference).kind == "exact"
    assert compare([1, 2, 1, 2, 1, 2, 3], reference) == TokenCheck("duplicated", duplicated=2)


def _delivery(index: int, tokens: list[int], **fields: object) -> Delivery:
    delivery = Delivery(index=index, start_s=0.0, end_s=1.0, token_ids=list(tokens))
    delivery.token_times_s = [0.5] * len(tokens)
    delivery.first_token_s = 0.5 if tokens else None
    for name, value in fields.items():
        setattr(delivery, name, value)
    return delivery


def test_how_a_request_ended() -> None:
    assert _delivery(0, [1], finish_reason=1).ending == "complete"
    assert _delivery(0, [1], status=STREAM_CLOSED).ending == "lost"  # closed, no final frame
    assert _delivery(0, [1], status=DEADLINE).ending == "lost"
    assert _delivery(0, [], status="UNAVAILABLE").ending == "error_before_first_token"
    assert _delivery(0, [1], status="UNAVAILABLE").ending == "error_after_first_token"
    assert _delivery(0, [1], status="UNAVAILABLE").record().outcome == "UNAVAILABLE"
    assert _delivery(0, [1], finish_reason=2).record().outcome == "ok"


def test_a_tally_counts_endings_differences_and_errors() -> None:
    reference = {i: list(REFERENCE) for i in range(8)}
    deliveries = [
        _delivery(0, REFERENCE, finish_reason=1, completion_tokens=6),
        _delivery(1, [10, 11, 12, 13, 12, 13, 14, 15], finish_reason=1, completion_tokens=8),
        _delivery(2, [10, 11, 12], finish_reason=2, completion_tokens=3),  # silently cut
        _delivery(3, REFERENCE, finish_reason=1, completion_tokens=5),  # usage off by one
        _delivery(4, [], status="UNAVAILABLE"),
        _delivery(5, [10, 11], status="UNAVAILABLE"),
        _delivery(6, [10, 99], status="INTERNAL"),
        _delivery(7, [10], status=DEADLINE),
        _delivery(8, REFERENCE, finish_reason=1, completion_tokens=6),  # no reference
    ]
    result = tally(deliveries, reference)
    assert result.requests == 9
    assert result.endings == {
        "complete": 5,
        "error_before_first_token": 1,
        "error_after_first_token": 2,
        "lost": 1,
    }
    assert result.complete_tokens == {"exact": 1 + 1, "duplicated": 1, "truncated": 1}
    assert result.differing == 2
    assert (result.tokens_duplicated, result.tokens_missing) == (2, 3)
    assert result.usage_mismatch == 1
    assert result.unverified == 1
    assert sorted(result.tokens_before_error) == [2, 2]
    assert result.errors_with_wrong_tokens == 1
    assert result.lost_by_cause == {"deadline": 1}
    assert result.errors_by_status == {"UNAVAILABLE": 2, "INTERNAL": 1}
    summary = result.to_dict()
    assert summary["lost"] == 1
    assert summary["errors_before_first_token"] == 1


def test_the_reference_holds_only_requests_that_completed() -> None:
    deliveries = [_delivery(0, [1, 2], finish_reason=1), _delivery(1, [3], status="UNAVAILABLE")]
    assert reference_tokens(deliveries) == {0: [1, 2]}


# ---------------------------------------------------------------- leases and timelines


def test_leases_and_sequences_left_are_summed_and_silent_devices_named() -> None:
    loads = {
        "p0": DeviceLoad(kv_leases=2, running=0, waiting=0),
        "d0": DeviceLoad(kv_leases=0, running=1, waiting=3),
        "d1": None,
    }
    tallied = lease_tally(loads)
    assert (tallied["kv_leases"], tallied["running"], tallied["waiting"]) == (2, 1, 3)
    assert tallied["unreachable"] == ["d1"]
    assert tallied["by_device"] == {
        "d0": {"kv_leases": 0, "running": 1, "waiting": 3},
        "p0": {"kv_leases": 2, "running": 0, "waiting": 0},
    }


def test_events_are_binned_by_second_and_strays_dropped() -> None:
    assert per_bin([0.1, 0.9, 1.0, 2.5, -1.0, 7.0], 3.0, 1.0) == [2, 1, 1]
    assert per_bin([], 2.5, 1.0) == [0, 0, 0]


def test_unhealthy_spans_follow_the_polls_and_close_at_the_end() -> None:
    polls = [
        (0.0, {"d0": (True, 0), "d1": (True, 0)}),
        (0.5, {"d0": (False, 0), "d1": (True, 0)}),
        (1.0, {"d0": (False, 0), "d1": (False, 0)}),
        (1.5, {"d0": (True, 0), "d1": (False, 0)}),
    ]
    assert unhealthy_spans(polls, 9.0) == {"d0": [[0.5, 1.5]], "d1": [[1.0, 9.0]]}


def test_a_timeline_bins_both_runs_from_their_own_start_and_survives_its_csv(
    tmp_path: Path,
) -> None:
    fault_free = [_delivery(0, [1, 2], finish_reason=1)]
    fault_free[0].token_times_s = [100.2, 101.5]
    fault_free[0].end_s = 101.6
    chaos = [
        _delivery(0, [1], status="UNAVAILABLE"),
        _delivery(1, [], status=DEADLINE),
    ]
    for delivery, start in zip(chaos, (200.0, 200.5), strict=True):
        delivery.start_s, delivery.end_s = start, start + 2.2
    chaos[0].token_times_s, chaos[0].first_token_s = [200.3], 200.3
    timeline = timeline_of(fault_free, 100.0, chaos, 200.0, 1.0)
    assert timeline.series["tokens_fault_free"] == [1, 1, 0]
    assert timeline.series["completed_fault_free"] == [0, 1, 0]
    assert timeline.series["tokens_chaos"] == [1, 0, 0]
    assert timeline.series["errors_chaos"] == [0, 0, 1]
    assert timeline.series["lost_chaos"] == [0, 0, 1]
    first = timeline.requests[0]
    assert (first.start_s, first.ending) == (0.0, "error_after_first_token")
    assert (first.ttft_s, first.elapsed_s) == pytest.approx((0.3, 2.2))
    assert timeline.requests[1].ttft_s is None
    timeline.write(tmp_path)
    again = Timeline.read(tmp_path)
    assert again.series == timeline.series
    assert again.bin_s == 1.0
    assert [(p.ending, p.ttft_s is None) for p in again.requests] == [
        ("error_after_first_token", False),
        ("lost", True),
    ]


# ---------------------------------------------------------------- the workload


def test_the_workload_is_seeded_capped_and_mixed() -> None:
    requests = chaos_requests(duration_s=100, rate_per_s=4, seed=1, prompt_cap=512, output_cap=64)
    again = chaos_requests(duration_s=100, rate_per_s=4, seed=1, prompt_cap=512, output_cap=64)
    assert requests == again
    assert 300 < len(requests) < 500
    assert all(0 <= r.arrival_s < 100 for r in requests)
    assert max(r.prompt_tokens for r in requests) == 512
    assert max(r.output_tokens for r in requests) == 64
    kinds = {(r.mode, r.sampled) for r in requests}
    assert kinds == {("split", True), ("split", False), ("colocated", True), ("colocated", False)}
    assert all(r.temperature == 0 and r.top_p == 1 for r in requests if not r.sampled)
    assert len({r.seed for r in requests}) > len(requests) * 0.99


def test_what_the_router_saw_of_a_fault() -> None:
    spans = [[10.2, 16.0], [30.5, 31.0]]
    # Killed at 10, serving again at 14: seen down 0.2 s later, up 2 s after it was back.
    assert router_saw(spans, 10.0, 14.0, 0.5) == pytest.approx((0.2, 2.0))
    # A short stop at 20 the router never noticed: the next span is another outage.
    assert router_saw(spans, 20.0, 21.0, 0.5) == (None, None)
    assert router_saw(spans, 30.0, None, 0.5) == pytest.approx((0.5, None))
    assert router_saw([], 1.0, 2.0, 0.5) == (None, None)
    # Stopped again at 15 before the router took it back: no readmission delay to give.
    assert router_saw(spans, 10.0, 14.0, 0.5, next_fault_s=15.0) == pytest.approx((0.2, None))
    # Already counted unhealthy (an earlier fault's outage) when this one came.
    assert router_saw(spans, 12.0, 14.0, 0.5) == pytest.approx((0.0, 2.0))
