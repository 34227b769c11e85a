"""Benchmark statistics: per-request maths, SLOs, percentiles, run summaries."""

from __future__ import annotations

import json
import math

import pytest

from router.scheduling.deciders import lateness
from router.scheduling.plan import Prediction
from router.scheduling.slo import SLO_PRESETS, Slo
from router.sim.metrics import Distribution, RequestRecord, percentile, summarize


def _record(
    start: float,
    token_times: list[float],
    *,
    end: float | None = None,
    outcome: str = "ok",
) -> RequestRecord:
    return RequestRecord(
        start_s=start,
        first_token_s=token_times[0] if token_times else None,
        end_s=end if end is not None else (token_times[-1] if token_times else start),
        token_times_s=list(token_times),
        outcome=outcome,
    )


def test_record_timings_by_hand() -> None:
    # Sent at 10.0; first token 10.2; then 10.3, two tokens in one message at 10.5, 10.8.
    record = _record(10.0, [10.2, 10.3, 10.5, 10.5, 10.8], end=10.9)
    assert record.ttft_s == pytest.approx(0.2)
    assert record.e2e_s == pytest.approx(0.9)
    assert record.output_tokens == 5
    assert record.tpot_s == pytest.approx(0.6 / 4)
    assert record.itls_s() == pytest.approx([0.1, 0.2, 0.0, 0.3])
    # The mean gap is the TPOT by construction: shared message times count as zero gaps.
    assert sum(record.itls_s()) / 4 == pytest.approx(record.tpot_s)


def test_record_without_tokens_or_end() -> None:
    record = RequestRecord(start_s=1.0)
    assert record.ttft_s is None
    assert record.e2e_s is None
    assert record.tpot_s is None
    assert record.output_tokens == 0
    assert record.itls_s() == []


def test_single_token_has_no_tpot_or_gaps() -> None:
    record = _record(0.0, [0.05])
    assert record.tpot_s is None
    assert record.itls_s() == []


def test_default_token_lists_are_not_shared() -> None:
    first, second = RequestRecord(start_s=0.0), RequestRecord(start_s=0.0)
    first.token_times_s.append(1.0)
    assert second.token_times_s == []


@pytest.mark.parametrize(
    ("q", "expected"),
    # [1, 2, 3, 4, 10]: position q/100 * 4, interpolated linearly between neighbours.
    [(0, 1.0), (25, 2.0), (50, 3.0), (62.5, 3.5), (90, 7.6), (99, 9.76), (100, 10.0)],
)
def test_percentile_interpolates_linearly(q: float, expected: float) -> None:
    assert percentile([10.0, 3.0, 1.0, 4.0, 2.0], q) == pytest.approx(expected)


def test_percentile_edge_cases() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match="q"):
        percentile([1.0], 101)
    with pytest.raises(ValueError, match="q"):
        percentile([1.0], -1)


def test_distribution_of_values_by_hand() -> None:
    dist = Distribution.of_values([0.001, 0.002, 0.003, 0.004, 0.010])
    assert dist.count == 5
    assert dist.mean == pytest.approx(0.004)
    assert dist.p50 == pytest.approx(0.003)
    assert dist.p90 == pytest.approx(0.0076)
    assert dist.p99 == pytest.approx(0.00976)
    assert dist.max == pytest.approx(0.010)
    as_ms = dist.to_dict(1000.0)
    assert as_ms["p90"] == pytest.approx(7.6)
    assert as_ms["count"] == 5


def test_empty_distribution_is_nan_in_python_and_null_in_json() -> None:
    dist = Distribution.of_values([])
    assert dist.count == 0
    assert math.isnan(dist.p99)
    assert dist.to_dict() == {
        "mean": None,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
        "count": 0,
    }


# A request that streams 5 tokens: TTFT 0.1 s, gaps 0.02, 0.02, 0.05, 0.01 (TPOT 0.025 s).
GOOD = _record(0.0, [0.1, 0.12, 0.14, 0.19, 0.2], end=0.21)


@pytest.mark.parametrize(
    ("slo", "met"),
    [
        (Slo(name="ttft", ttft_s=0.1), True),  # limits are inclusive
        (Slo(name="ttft", ttft_s=0.099), False),
        (Slo(name="tpot", tpot_s=0.025), True),
        (Slo(name="tpot", tpot_s=0.024), False),
        # The average pace is fine, but the 50 ms stall breaks a 40 ms per-gap limit.
        (Slo(name="itl", itl_s=0.04), False),
        (Slo(name="itl", itl_s=0.05), True),
        (Slo(name="e2e", e2e_s=0.21), True),
        (Slo(name="e2e", e2e_s=0.2), False),
        (Slo(name="all", ttft_s=0.1, tpot_s=0.03, itl_s=0.06, e2e_s=0.3), True),
        (Slo(name="one-miss", ttft_s=0.1, tpot_s=0.02, itl_s=0.06, e2e_s=0.3), False),
        (Slo(name="none"), True),
    ],
)
def test_slo_met_by(slo: Slo, met: bool) -> None:
    assert GOOD.meets(slo) is met


def test_failed_requests_never_meet_an_slo() -> None:
    lenient = Slo(name="lenient", ttft_s=100.0, tpot_s=100.0, itl_s=100.0, e2e_s=100.0)
    failed_fast = _record(0.0, [0.01, 0.02], outcome="UNAVAILABLE")
    no_first_token = RequestRecord(start_s=0.0, end_s=0.01)
    assert not failed_fast.meets(lenient)
    assert not no_first_token.meets(lenient)
    assert not failed_fast.meets(Slo(name="empty"))


def test_single_token_answer_meets_tpot_and_itl_limits() -> None:
    one_token = _record(0.0, [0.05])
    assert one_token.meets(Slo(name="tight", ttft_s=0.1, tpot_s=0.001, itl_s=0.001))


def test_e2e_limit_needs_an_end_time() -> None:
    unfinished = RequestRecord(start_s=0.0, first_token_s=0.01, token_times_s=[0.01])
    assert not unfinished.meets(Slo(name="e2e", e2e_s=10.0))
    assert unfinished.meets(Slo(name="ttft", ttft_s=10.0))


def test_slo_met_by_latencies_as_the_dispatcher_measures_them() -> None:
    slo = Slo(0.5, 0.05)
    assert slo.met_by(0.5, 0.05)  # inclusive
    assert not slo.met_by(0.51, 0.01)
    assert not slo.met_by(0.1, 0.051)
    assert slo.met_by(0.1, None)  # one output token: no TPOT to miss
    assert Slo(ttft_s=0.5).met_by(0.5, 100.0, max_itl_s=100.0, e2e_s=100.0)


def test_unset_limits_are_never_late() -> None:
    predicted = Prediction(ttft_s=1.0, tpot_s=10.0)
    assert lateness(predicted, Slo(ttft_s=0.5)) == 2.0
    assert lateness(predicted, Slo()) == 0.0


@pytest.mark.parametrize("limit", [0.0, -1.0, float("inf"), float("nan")])
def test_slo_rejects_meaningless_limits(limit: float) -> None:
    with pytest.raises(ValueError, match="ttft_s"):
        Slo(name="bad", ttft_s=limit)


@pytest.mark.parametrize(
    ("name", "ttft", "tpot"),
    [("chatbot", 0.25, 0.1), ("code", 0.125, 0.2), ("summarization", 15.0, 0.15)],
)
def test_distserve_presets(name: str, ttft: float, tpot: float) -> None:
    preset = SLO_PRESETS[name]
    assert (preset.name, preset.ttft_s, preset.tpot_s) == (name, ttft, tpot)
    assert "DistServe" in preset.source


def test_project_presets() -> None:
    interactive, sram = SLO_PRESETS["interactive"], SLO_PRESETS["sram-decode"]
    assert (interactive.ttft_s, interactive.itl_s, interactive.tpot_s) == (0.2, 0.025, None)
    assert (sram.ttft_s, sram.tpot_s) == (0.5, 0.005)
    assert all(preset.source for preset in SLO_PRESETS.values())


def _mixed() -> list[RequestRecord]:
    return [
        # ok: TTFT 0.1, 3 tokens, TPOT 0.05, gaps 0.05 0.05, e2e 0.3
        _record(0.0, [0.1, 0.15, 0.2], end=0.3),
        # ok: TTFT 0.4 (misses a 0.25 s TTFT limit), 2 tokens in one message, e2e 0.5
        _record(1.0, [1.4, 1.4], end=1.5),
        # ok: TTFT 0.2, 2 tokens, TPOT 0.2 (misses 0.1 s TPOT), e2e 0.4
        _record(2.0, [2.2, 2.4], end=2.4),
        # timed out mid-stream: its 2 tokens were delivered but it is not a completed request
        _record(3.0, [3.05, 3.1], end=4.0, outcome="timeout"),
        # shed before any token
        RequestRecord(start_s=4.0, end_s=4.001, outcome="RESOURCE_EXHAUSTED"),
    ]


def test_summarize_a_mixed_run() -> None:
    summary = summarize(_mixed(), duration_s=5.0, slo=Slo(name="chat", ttft_s=0.25, tpot_s=0.1))
    assert (summary.requests, summary.completed, summary.failed) == (5, 3, 2)
    assert summary.request_throughput == pytest.approx(3 / 5.0)
    assert summary.output_token_throughput == pytest.approx(9 / 5.0)
    # Latencies are over completed requests only: the timeout's 0.05 s TTFT is left out.
    assert summary.ttft_s.count == 3
    assert summary.ttft_s.mean == pytest.approx((0.1 + 0.4 + 0.2) / 3)
    assert summary.ttft_s.p50 == pytest.approx(0.2)
    assert summary.tpot_s.count == 3
    assert summary.tpot_s.max == pytest.approx(0.2)
    assert summary.tpot_s.p50 == pytest.approx(0.05)
    assert summary.itl_s.count == 4
    assert summary.itl_s.mean == pytest.approx((0.05 + 0.05 + 0.0 + 0.2) / 4)
    assert summary.e2e_s.p50 == pytest.approx(0.4)
    # Only the first request meets both limits; the two failures count against it.
    assert summary.slo == "chat"
    assert summary.slo_attainment == pytest.approx(1 / 5)
    assert summary.goodput == pytest.approx(1 / 5.0)
    assert summary.outcomes == {"ok": 3, "timeout": 1, "RESOURCE_EXHAUSTED": 1}


def test_shedding_load_cannot_raise_attainment() -> None:
    slo = Slo(name="chat", ttft_s=0.25, tpot_s=0.1)
    good = _record(0.0, [0.1, 0.15, 0.2], end=0.3)
    served = summarize([good, good], duration_s=1.0, slo=slo)
    with_shed = summarize(
        [good, good, RequestRecord(start_s=0.0, outcome="RESOURCE_EXHAUSTED")],
        duration_s=1.0,
        slo=slo,
    )
    assert served.slo_attainment == 1.0
    assert with_shed.slo_attainment == pytest.approx(2 / 3)
    assert with_shed.goodput == served.goodput == 2.0


def test_summarize_without_slo() -> None:
    summary = summarize(_mixed(), duration_s=2.0)
    assert summary.slo is None
    assert summary.slo_attainment is None
    assert summary.goodput is None


def test_summarize_an_all_failed_run_is_still_reportable() -> None:
    records = [RequestRecord(start_s=0.0, end_s=0.1, outcome="UNAVAILABLE")] * 3
    summary = summarize(records, duration_s=1.0, slo=SLO_PRESETS["chatbot"])
    assert summary.completed == 0
    assert summary.slo_attainment == 0.0
    assert summary.goodput == 0.0
    assert summary.ttft_s.count == 0
    json.dumps(summary.to_dict(), allow_nan=False)


def test_summarize_rejects_a_non_positive_duration() -> None:
    with pytest.raises(ValueError, match="duration_s"):
        summarize(_mixed(), duration_s=0.0)


def test_to_dict_is_json_in_milliseconds() -> None:
    summary = summarize(_mixed(), duration_s=5.0, slo=Slo(name="chat", ttft_s=0.25, tpot_s=0.1))
    data = summary.to_dict()
    decoded = json.loads(json.dumps(data, allow_nan=False))
    assert decoded["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert decoded["tpot_ms"]["max"] == pytest.approx(200.0)
    assert decoded["e2e_ms"]["count"] == 3
    assert set(decoded["itl_ms"]) == {"mean", "p50", "p90", "p99", "max", "count"}
    assert decoded["slo_attainment"] == pytest.approx(0.2)
    assert decoded["goodput"] == pytest.approx(0.2)
    assert decoded["failed"] == 2
    assert decoded["outcomes"]["timeout"] == 1
    assert decoded["duration_s"] == 5.0


def test_empty_run_with_slo_has_null_attainment_in_json() -> None:
    summary = summarize([], duration_s=1.0, slo=SLO_PRESETS["code"])
    assert summary.requests == 0
    assert summary.slo_attainment is not None
    assert math.isnan(summary.slo_attainment)
    assert summary.to_dict()["slo_attainment"] is None
