"""The fidelity check's replay and comparison, on a few requests; its target on a live router."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from backends._gen.hetero.router.v1 import router_pb2
from bench import fidelity
from bench.fidelity import PathOverhead, Replay, RoutedTarget, Served
from bench.loadgen import send
from router.sim.metrics import RequestRecord
from router.sim.results import SimResult
from router.sim.workload import RequestSpec
from tests.conftest import Cluster


def record(
    start: float, prompt: int, token_times: list[float], outcome: str = "ok"
) -> RequestRecord:
    return RequestRecord(
        start_s=start,
        first_token_s=token_times[0] if token_times else None,
        end_s=token_times[-1] if token_times else start,
        token_times_s=token_times,
        outcome=outcome,
        prompt_tokens=prompt,
    )


def paced(start: float, ttft: float, tpot: float, tokens: int) -> list[float]:
    return [start + ttft + tpot * i for i in range(tokens)]


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(fidelity.POLICY))
    return path


def test_a_replay_sends_what_completed_when_it_was_sent_with_the_tokens_it_delivered() -> None:
    records = [
        record(10.30, 500, paced(10.30, 0.05, 0.015, 4)),
        record(10.00, 800, [], outcome="UNAVAILABLE"),  # the first sent, then failed
        record(10.10, 300, paced(10.10, 0.03, 0.015, 7)),
        record(10.20, 50, []),  # ended on EOS at once: no token, yet completed
    ]
    replay = fidelity.replay_specs(records)
    assert replay.indices == [2, 3, 0]
    assert replay.failed == 1
    assert [s.prompt_tokens for s in replay.specs] == [300, 50, 500]
    assert [s.output_tokens for s in replay.specs] == [7, 1, 4]
    assert [s.arrival_s for s in replay.specs] == pytest.approx([0.10, 0.20, 0.30])
    assert fidelity.replay_specs([]) == Replay([], [], 0)


def simulated(policy_file: Path, specs: list[RequestSpec], path: PathOverhead) -> SimResult:
    return fidelity.simulate(Replay(specs, list(range(len(specs))), 0), path, policy_file)


def mirror(sim: SimResult, ttft_scale: float = 1.0, tpot_scale: float = 1.0) -> list[RequestRecord]:
    """Live records that saw exactly what the simulation did, with latencies scaled."""
    return [
        record(
            float(sim.arrival_s[i]),
            int(sim.prompt_tokens[i]),
            paced(
                float(sim.arrival_s[i]),
                float(sim.ttft_s[i]) * ttft_scale,
                float(sim.tpot_s[i]) * tpot_scale if sim.output_tokens[i] > 1 else 0.0,
                int(sim.output_tokens[i]),
            ),
        )
        for i in range(sim.requests)
    ]


def test_the_comparison_gives_each_metric_s_relative_errors_over_the_same_requests(
    policy_file: Path,
) -> None:
    specs = [
        RequestSpec(0.0, 700, 30),
        RequestSpec(0.0, 300, 1),  # one token: a TTFT, but no TPOT on either side
        RequestSpec(0.02, 1200, 12),
        RequestSpec(0.05, 64, 50),
    ]
    sim = simulated(policy_file, specs, PathOverhead(0.004, 0.002, 0, 0))
    assert sim.split.all()

    exact = fidelity.compare(mirror(sim), sim)
    assert exact["ttft_requests"] == 4
    assert exact["tpot_requests"] == 3
    assert exact["sim_vs_live_mean_error"] == pytest.approx(0.0, abs=1e-9)
    assert exact["sim_vs_live_p99_error"] == pytest.approx(0.0, abs=1e-9)
    assert exact["live_ttft_mean_ms"] == pytest.approx(float(sim.ttft_s.mean()) * 1000)

    slow = fidelity.compare(mirror(sim, ttft_scale=1.25, tpot_scale=1.1), sim)
    assert slow["ttft_mean_error"] == pytest.approx(0.2)  # |s - 1.25 s| / 1.25 s
    assert slow["ttft_p99_error"] == pytest.approx(0.2)
    assert slow["tpot_mean_error"] == pytest.approx(0.1 / 1.1)
    assert slow["sim_vs_live_mean_error"] == pytest.approx(0.2)
    assert slow["sim_vs_live_p99_error"] == pytest.approx(0.2)

    with pytest.raises(ValueError, match="live requests"):
        fidelity.compare(mirror(sim)[:2], sim)


def test_the_measured_path_delays_first_tokens_and_the_decode_leg(policy_file: Path) -> None:
    specs = [RequestSpec(0.0, 700, 2)]
    plain = simulated(policy_file, specs, PathOverhead(0.0, 0.0, 0, 0))
    slow = simulated(policy_file, specs, PathOverhead(0.004, 0.002, 0, 0))
    assert slow.ttft_s[0] == pytest.approx(plain.ttft_s[0] + 0.004)
    assert slow.tpot_s[0] == pytest.approx(plain.tpot_s[0] + 0.002)


def test_the_path_overhead_is_what_lone_requests_took_beyond_the_model() -> None:
    perf = fidelity.sim_cluster().devices[0].perf
    timing = perf.timing

    def lone(prompt: int, extra_ttft: float, extra_gap: float, tokens: int = 2) -> RequestRecord:
        first = timing.prefill_seconds([prompt]) + extra_ttft
        gap = perf.transfer_s(prompt, perf) + timing.decode_step_seconds([prompt + 1]) + extra_gap
        return record(0.0, prompt, [first, first + gap][:tokens])

    records = [
        lone(100, 0.003, 0.002),
        lone(900, 0.004, 0.003),
        lone(2000, 0.005, 0.004),
        lone(400, 0.009, 0.0, tokens=1),  # ended on EOS after its first token: no gap
        record(0.0, 300, [], outcome="DEADLINE_EXCEEDED"),
    ]
    path = fidelity.path_overhead(records, perf)
    assert path.overhead_s == pytest.approx(0.0045)  # median of 3, 4, 5, 9 ms
    assert path.handoff_s == pytest.approx(0.003)
    assert (path.probes, path.failures) == (5, 1)

    software = fidelity.path_overhead([record(0.0, 4, [0.002, 0.0035])], None)
    assert software.overhead_s == pytest.approx(0.002)
    assert software.handoff_s == pytest.approx(0.0015)


def test_decisions_match_where_the_router_chose_the_simulated_devices(policy_file: Path) -> None:
    specs = [RequestSpec(0.01 * i, 100, 3) for i in range(4)]
    sim = simulated(policy_file, specs, PathOverhead(0.0, 0.0, 0, 0))
    ids = [device.id for device in sim.cluster.devices]
    pairs = zip(sim.prefill_device, sim.decode_device, strict=True)
    routes = [(ids[int(p)], ids[int(d)]) for p, d in pairs]
    assert routes == [("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1")]  # round-robin
    served = {i: Served(prefill=p, decode=d) for i, (p, d) in enumerate(routes)}
    replay = Replay(specs, [0, 1, 2, 3], 0)
    assert fidelity.decisions_matched(sim, replay, served) == 4
    served[1] = Served(prefill="p0", decode="d0")
    del served[2]
    assert fidelity.decisions_matched(sim, replay, served) == 2


async def test_the_target_records_each_request_s_route_and_ending(cluster: Cluster) -> None:
    target = RoutedTarget(cluster.address)
    try:
        done = await send(target, RequestSpec(0.0, 40, 6), seed=3, timeout_s=10)
    finally:
        await target.close()
    assert done.outcome == "ok"
    served = target.served[3]
    assert served.prefill in cluster.devices
    assert served.decode in cluster.devices
    assert served.finish_reason in (router_pb2.FINISH_REASON_LENGTH, router_pb2.FINISH_REASON_STOP)
    assert served.completion_tokens == done.output_tokens
