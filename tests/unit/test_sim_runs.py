"""Decode runs: the simulator times a batch's steps up to its next change at once.

A run of one step is the engine's loop taken an iteration at a time (an event per
step), so a simulation with runs capped at one step is the straightforward reference:
every figure of a run with long runs must equal it exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import router.sim.simulator as simulator_module
from router.scheduling.registry import parse_policy
from router.scheduling.slo import Slo
from router.sim.cluster import Cluster, parse_cluster
from router.sim.results import SimResult
from router.sim.simulator import Simulator
from router.sim.workload import PrefixSharing, RequestSpec, generate_for_duration

# The simulator's own cap on a run's length (the tests patch it).
LONG_RUNS = simulator_module.RUN_STEPS
# Measured in seconds or CPU: not part of what was simulated.
_NOT_SIMULATED = {"cluster", "wall_s", "cpu_s"}


def _fleet() -> Cluster:
    """Every kind of device loop: GPU prefill with a prefix cache, pipelined SRAM decode,
    colocated GPUs whose KV the router relays."""
    return parse_cluster(
        {
            "model": "llama-3.1-8b",
            "groups": [
                {"name": "p", "profile": "h100", "role": "prefill", "count": 3,
                 "prefix_cache_blocks": 512},
                {"name": "d", "profile": "cerebras-wse3", "role": "decode", "count": 2},
                {"name": "c", "profile": "h100", "role": "both", "count": 2,
                 "prefix_cache_blocks": 256, "handoff": "relay"},
            ],
        }
    )  # fmt: skip


# Long prompts split, short ones stay on one device, each picked by score: every loop busy.
_POLICY = {
    "profiles": {
        "default": {
            "slo": {"ttft_ms": 1000, "tpot_ms": 50},
            "decider": {"name": "prompt-length", "min_prompt_tokens": 600},
            "filters": ["kv-fits"],
            "scorers": [
                {"name": "prefix-affinity", "weight": 2},
                {"name": "predicted-latency", "weight": 2},
                {"name": "queue-depth", "weight": 1},
            ],
            "picker": "max-score",
            "admission": "admit-all",
        }
    }
}


def _requests(rate: float) -> list[RequestSpec]:
    return generate_for_duration(
        "chatbot", 8.0, rate_per_s=rate, seed=7, prefix=PrefixSharing(0.5, 8, 512)
    )


def _simulate(
    monkeypatch: pytest.MonkeyPatch, run_steps: int, rate: float, slo: Slo | None
) -> SimResult:
    monkeypatch.setattr(simulator_module, "RUN_STEPS", run_steps)
    simulator = Simulator(
        _fleet(),
        parse_policy(_POLICY),
        overhead_s=0.002,
        handoff_s=0.001,
        max_in_flight=150,
        queue_limit=40,
    )
    requests = _requests(rate)
    if slo is None:
        return simulator.run(requests)
    return simulator.run(requests, slo=slo, stop_after_misses=len(requests) // 10)


def _assert_same(result: SimResult, reference: SimResult) -> None:
    for column in dataclasses.fields(SimResult):
        if column.name in _NOT_SIMULATED:
            continue
        value, expected = getattr(result, column.name), getattr(reference, column.name)
        if isinstance(expected, np.ndarray):
            np.testing.assert_array_equal(value, expected, err_msg=column.name)
        else:
            assert value == expected, column.name


@pytest.mark.parametrize(
    ("rate", "slo"),
    [
        (40.0, None),  # light: long runs, cut short by arrivals
        (250.0, None),  # heavy: the admission gate queues and sheds, prefills wait
        (250.0, Slo(name="tight", ttft_s=0.2, tpot_s=0.01)),  # stops early
    ],
)
def test_decode_runs_give_exactly_the_step_by_step_simulation(
    monkeypatch: pytest.MonkeyPatch, rate: float, slo: Slo | None
) -> None:
    reference = _simulate(monkeypatch, 1, rate, slo)
    result = _simulate(monkeypatch, LONG_RUNS, rate, slo)
    _assert_same(result, reference)
    assert reference.requests > 300
    assert result.split.any()
    assert not result.split.all()
    assert slo is None or result.stopped_early
    assert sum(d.decode_iterations for d in result.devices) > 3000


def test_long_runs_are_timed_in_few_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """What makes them worth having: far fewer events than decode steps."""
    events = 0
    original = simulator_module.Simulator._run_end

    def counted(self: Simulator, run: tuple[object, int], now: float) -> None:
        nonlocal events
        events += 1
        original(self, run, now)  # type: ignore[arg-type]  # passes the event on as it came

    monkeypatch.setattr(simulator_module.Simulator, "_run_end", counted)
    result = _simulate(monkeypatch, LONG_RUNS, 40.0, None)
    steps = sum(d.decode_iterations for d in result.devices)
    assert events < steps / 5
