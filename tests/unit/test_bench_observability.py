"""The observability scenario's judgements: buckets, the rank a p99 is read at, SLO
outcomes, and the router's log lines matched with the client's records."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.scenarios.observability import (
    SLO_TPOT_S,
    SLO_TTFT_S,
    Sent,
    Views,
    _bucket,
    _clock_agreement,
    _ranked,
    _router_log,
)
from router.sim.metrics import RequestRecord
from router.sim.workload import RequestSpec

BOUNDS = (0.1, 0.25, 0.5, 1.0)


def test_a_value_on_a_boundary_is_in_the_bucket_it_closes() -> None:
    # Prometheus' buckets are (lower, le]: 0.25 counts in le="0.25".
    assert _bucket(0.25, BOUNDS) == (1, "(0.1, 0.25] s")
    assert _bucket(0.2500001, BOUNDS) == (2, "(0.25, 0.5] s")
    assert _bucket(0.01, BOUNDS) == (0, "(0, 0.1] s")
    assert _bucket(7.0, BOUNDS)[0] == 3  # past the last finite bound: the last one


def test_the_p99_is_read_at_the_rank_histogram_quantile_estimates() -> None:
    values = [float(v) for v in range(1, 101)]
    assert _ranked(values, 0.99) == 99.0  # the 99th of 100
    assert _ranked(values[:88], 0.99) == 88.0  # ceil(0.99 * 88) = 88: the largest
    assert _ranked([3.0], 0.99) == 3.0
    assert math.isnan(_ranked([], 0.99))


def _sent(ttft_s: float, tpot_s: float, tokens: int = 3, request_id: str = "r") -> Sent:
    first = 10.0 + ttft_s
    record = RequestRecord(
        start_s=10.0,
        first_token_s=first,
        end_s=first + tpot_s * (tokens - 1),
        token_times_s=[first + tpot_s * i for i in range(tokens)],
    )
    return Sent(request_id, "split", RequestSpec(0.0, 64, tokens), record)


def test_met_needs_both_targets_and_a_request_of_one_token_has_no_tpot() -> None:
    assert _sent(SLO_TTFT_S, SLO_TPOT_S).met  # inclusive, as the router's
    assert not _sent(SLO_TTFT_S * 1.01, SLO_TPOT_S / 2).met
    assert not _sent(SLO_TTFT_S / 2, SLO_TPOT_S * 1.01).met
    assert _sent(SLO_TTFT_S / 2, 0.0, tokens=1).met


def test_frame_gaps_leave_out_tokens_that_shared_a_message() -> None:
    record = RequestRecord(start_s=0.0, first_token_s=1.0, token_times_s=[1.0, 1.0, 1.5, 2.5])
    assert Sent("r", "colocated", RequestSpec(0.0, 8, 4), record).frame_gaps_s == [0.5, 1.0]


def _line(request_id: str, ttft_ms: float, **fields: object) -> str:
    event: dict[str, object] = {"event": "request finished", "request_id": request_id}
    event |= {"outcome": "ok", "mode": "split", "ttft_ms": ttft_ms}
    event |= {"prompt_tokens": 64, "completion_tokens": 3}
    return json.dumps(event | fields)


def test_the_router_log_is_read_by_request_id_and_other_lines_are_skipped(
    tmp_path: Path,
) -> None:
    log = tmp_path / "router.log"
    lines = [
        _line("obs-0", 12.5, slo_met=True, handoff_bytes=4096),
        '{"event": "router serving"}',
        "not json",
        _line("obs-1", 900.0, slo_met=False, outcome="cancelled"),
    ]
    log.write_text("\n".join(lines) + "\n")
    served = _router_log(log)
    assert set(served) == {"obs-0", "obs-1"}
    assert served["obs-0"].ttft_s == 0.0125
    assert served["obs-0"].handoff_bytes == 4096
    assert served["obs-0"].ok
    assert not served["obs-1"].ok


def test_a_client_ttft_shorter_than_the_router_s_fails_the_clock_check(tmp_path: Path) -> None:
    log = tmp_path / "router.log"
    log.write_text(_line("a", 100.0) + "\n" + _line("b", 100.0) + "\n")
    served = _router_log(log)
    longer = [_sent(0.101, 0.001, request_id="a"), _sent(0.1, 0.001, request_id="b")]
    spans = _clock_agreement(Views(longer, served))
    assert spans["met"]
    assert spans["client_minus_router_ttft_ms_max"] == 1.0
    shorter = Views([_sent(0.099, 0.001, request_id="a")], served)
    assert not _clock_agreement(shorter)["met"]
