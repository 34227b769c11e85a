"""The load generator against an in-process cluster: what it records is what was sent."""

from __future__ import annotations

import json
from pathlib import Path

import grpc

from backends.base import Role
from backends.mock.config import DeviceConfig
from backends.mock.server import DeviceServer
from bench import load
from bench.loadgen import DeviceTarget, HttpTarget, RouterTarget, closed_loop, open_loop, send
from router.sim.metrics import summarize
from router.sim.workload import RequestSpec, fixed, save_trace
from tests.conftest import Cluster
from tests.unit.test_sim_prefix_chains import conversations, trace_reuse


async def test_send_records_every_token_and_the_first_token_time(cluster: Cluster) -> None:
    target = RouterTarget(cluster.address, disaggregation="split")
    try:
        record = await send(target, RequestSpec(0.0, 32, 12), seed=1, timeout_s=10)
    finally:
        await target.close()
    assert record.outcome == "ok"
    assert record.output_tokens == 12
    assert record.first_token_s is not None
    assert record.start_s <= record.first_token_s <= record.token_times_s[-1] <= record.end_s  # type: ignore[operator]  # set once it finished
    assert record.tpot_s is not None


async def test_failures_are_recorded_not_raised(cluster: Cluster) -> None:
    target = RouterTarget(cluster.address)
    try:
        record = await send(target, RequestSpec(0.0, 8, 99_999), seed=1, timeout_s=10)
    finally:
        await target.close()
    assert record.outcome == grpc.StatusCode.INVALID_ARGUMENT.name
    assert record.first_token_s is None


async def test_open_and_closed_loops_send_every_request(cluster: Cluster) -> None:
    direct = DeviceTarget(cluster.devices["groq-0"].address)
    router = RouterTarget(cluster.address)
    try:
        specs = [RequestSpec(i * 0.001, 16, 4) for i in range(20)]
        records, duration = await open_loop(router, specs)
        assert len(records) == 20
        assert all(r.outcome == "ok" and r.output_tokens == 4 for r in records)
        closed, _ = await closed_loop(direct, fixed(15, 16, 3), concurrency=4)
        assert len(closed) == 15
        assert sum(r.output_tokens for r in closed) == 45
        summary = summarize(records, duration)
        assert summary.completed == 20
        assert summary.output_token_throughput > 0
    finally:
        await direct.close()
        await router.close()


async def test_load_cli_replays_a_trace_and_scores_it_against_an_slo(
    cluster: Cluster, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.jsonl"
    save_trace(trace, [RequestSpec(i * 0.002, 20 + i, 5) for i in range(10)])
    options = load._parser().parse_args(
        ["--address", cluster.address, "--trace", str(trace), "--slo", "summarization"]
    )
    summary = await load._run(options)
    assert summary["requests"] == 10
    assert summary["completed"] == 10
    assert summary["slo"] == "summarization"
    # Time scale 0 against limits of seconds: every request meets the SLO.
    assert summary["slo_attainment"] == 1.0
    assert summary["goodput"] == summary["request_throughput"]


async def test_the_http_door_can_be_loaded_too(cluster: Cluster) -> None:
    target = HttpTarget(cluster.admin_url, disaggregation="split")
    try:
        records, _ = await closed_loop(target, fixed(6, 24, 5), concurrency=3)
        bad = await send(target, RequestSpec(0.0, 8, 99_999), seed=1, timeout_s=10)
    finally:
        await target.close()
    assert all(r.outcome == "ok" for r in records)
    assert all(r.output_tokens == 5 for r in records)
    assert all(r.first_token_s is not None for r in records)
    assert bad.outcome == "HTTP_400"


async def test_a_traces_shared_blocks_hit_a_mock_devices_prefix_cache(tmp_path: Path) -> None:
    lines = conversations(seed=2, count=3, turns=2, grow=700)
    trace = tmp_path / "conversation_trace.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines))
    device = DeviceServer(
        DeviceConfig(
            backend_id="d0",
            profile="h100",
            model="llama-3.1-8b",
            roles=(Role.PREFILL, Role.DECODE),
            time_scale=0.0,
            prefix_cache_blocks=1 << 16,
        )
    )
    await device.start("127.0.0.1:0")
    try:
        flags = ["--device", "--address", device.address, "--trace", str(trace)]
        options = load._parser().parse_args([*flags, "--concurrency", "1"])
        summary = await load._run(options)
    finally:
        await device.stop(grace_s=0)
    assert summary["completed"] == len(lines)
    # The prompt's text is one byte short (BOS is a token): the device hashes that many.
    shorter = [{**line, "input_length": int(line["input_length"]) - 1} for line in lines]  # type: ignore[call-overload]  # ints, from the generator
    expected = sum(trace_reuse(shorter))
    assert expected > 0
    assert device.engine.prefix_hit_tokens == expected
