"""The `peers` scenario's parts that need no peer router: the /proc reader of a process
tree's CPU time, the leg counts' arithmetic, the profile folding and the judgement of
figures against vllm-router's."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest

from bench import fake_legs, proc_tree
from bench.fake_legs import LegCounts, check_split
from bench.peers import profile as profile_module
from bench.peers import verdicts
from bench.peers.profile import active, by_layer, profile_seconds_refusal, top_frames
from bench.peers.verdicts import SystemFigures

# A child that starts a grandchild burning 0.3 s of CPU, says so, and waits for its
# stdin to close; then it reaps the grandchild and exits.
_PARENT = """
import subprocess, sys
burner = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE)
print(burner.pid, burner.stdout.readline().decode().strip(), flush=True)
sys.stdin.read()
burner.stdin.close()
burner.wait()
"""
# /proc counts whole clock ticks; sums of them as floats may land a hair below.
HALF_TICK_S = 0.5 / os.sysconf("SC_CLK_TCK")

_BURNER = """
import sys, time
while time.process_time() < 0.3:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_the_tree_counts_a_grandchild_that_burns_cpu_while_it_runs_and_once_reaped() -> None:
    root = os.getpid()
    before = proc_tree.sample(root)
    child = subprocess.Popen(
        [sys.executable, "-c", _PARENT, _BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        burner_pid, said = child.stdout.readline().decode().split()
        assert said == "burnt"
        during = proc_tree.sample(root)
        assert {child.pid, int(burner_pid)} <= set(during.pids)
        burnt = proc_tree.cpu_seconds(int(burner_pid))
        assert burnt >= 0.2  # 0.3 s by the clock, in /proc's ticks
        assert during.cpu_s - before.cpu_s >= burnt - HALF_TICK_S
        assert during.rss_bytes > before.rss_bytes  # two more Pythons resident
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    after = proc_tree.sample(root)
    assert child.pid not in after.pids
    # Reaped, its time (and its own reaped child's) is in our cutime now.
    assert after.cpu_s - before.cpu_s >= burnt - HALF_TICK_S


def test_the_kernels_share_of_the_cpu_is_read_apart() -> None:
    before = proc_tree.sample(os.getpid())
    started = os.times().system
    while os.times().system - started < 0.05:  # system calls: kernel time
        os.stat("/")
    after = proc_tree.sample(os.getpid())
    assert after.kernel_cpu_s - before.kernel_cpu_s >= 0.05 - HALF_TICK_S
    assert 0 < after.kernel_cpu_s <= after.cpu_s


def test_a_process_that_is_gone_cannot_be_sampled() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(ProcessLookupError):
        proc_tree.sample(child.pid)


def test_leg_counts_add_up_and_subtract_across_readings() -> None:
    first, second = LegCounts(), LegCounts()
    first.add(fake_legs.SGLANG_PREFILL, "11")
    second.add(fake_legs.SGLANG_PREFILL, "22")
    both = first.plus(second)
    assert both.counts[fake_legs.SGLANG_PREFILL] == 2
    later = LegCounts.from_json(both.as_json())
    later.add(fake_legs.SGLANG_PREFILL, "33")
    only_third = LegCounts()
    only_third.add(fake_legs.SGLANG_PREFILL, "33")
    assert later.since(both) == only_third  # wraps modulo 2**64 like the sum


def test_a_split_needs_every_request_paired_and_nothing_plain() -> None:
    prefill, decode = LegCounts(), LegCounts()
    for key in ("cmpl-a-0", "cmpl-b-0"):
        prefill.add(fake_legs.VLLM_PREFILL, key)
        decode.add(fake_legs.VLLM_DECODE, key)
    assert check_split("vllm", 2, prefill, decode).split
    assert not check_split("vllm", 3, prefill, decode).split  # one request was not split
    assert not check_split("sglang", 2, prefill, decode).split  # legs of the other protocol
    crossed = replace(decode, counts=dict(decode.counts), fingerprints=dict(decode.fingerprints))
    crossed.add(fake_legs.VLLM_DECODE, "cmpl-c-0")
    prefill.add(fake_legs.VLLM_PREFILL, "cmpl-d-0")
    assert not check_split("vllm", 3, prefill, crossed).paired


def test_collapsed_stacks_fold_by_function_into_own_and_total_shares() -> None:
    collapsed = "\n".join(
        [
            "main (/x/router/cli.py:10);serve (/x/site-packages/aiohttp/web.py:5);"
            "write (/x/site-packages/aiohttp/http_writer.py:88) 6",
            "main (/x/router/cli.py:10);serve (/x/site-packages/aiohttp/web.py:7);"
            "write (/x/site-packages/aiohttp/http_writer.py:90) 2",
            "main (/x/router/cli.py:10);dumps (/usr/lib/python3.11/json/encoder.py:3) 2",
            "not a stack line",
        ]
    )
    folded = top_frames(collapsed, count=2)
    assert folded["samples"] == 10
    assert folded["own"] == [
        {"function": "write (aiohttp/http_writer.py)", "share": 0.8},
        {"function": "dumps (json/encoder.py)", "share": 0.2},
    ]
    assert folded["total"][0] == {"function": "main (/x/router/cli.py)", "share": 1.0}


def test_native_stacks_fold_by_layer_over_the_active_samples() -> None:
    loop = "main (router/cli.py:96);run_until_complete (loop.c:35410)"
    collapsed = "\n".join(
        [
            f"{loop};epoll_wait (libc.so.6) 50",  # idle: left out
            f"{loop};wait (router/dispatch/deadline.py:82);sendmsg (libc.so.6) 4",
            f"{loop};_read (grpc/aio/_call.py:384);_next (cygrpc.cpython-311.so) 2",
            f"{loop};_finished (router/dispatch/dispatcher.py:372) 3",
            f"{loop};labels (site-packages/prometheus_client/metrics.py:180) 1",
            f"{loop};uuid4 (/usr/lib/python3.11/uuid.py:720) 1",
            f"{loop};write (site-packages/aiohttp/http_writer.py:116) 4",
            f"{loop} 1",
            "Thread.run (threading.py:982);epoll_pwait (libc.so.6) 9",
            "not a stack line",
        ]
    )
    assert by_layer(collapsed) == {
        "system calls and libc": 0.25,
        "aiohttp (and multidict, yarl)": 0.25,
        "the router's own Python": 0.1875,
        "grpc": 0.125,
        "prometheus_client": 0.0625,
        "the standard library and the rest": 0.0625,
        "uvloop": 0.0625,
    }
    assert by_layer("Thread.run (threading.py:982);epoll_wait (libc.so.6) 9\n") == {}


def test_active_stacks_leave_the_waiting_threads_out_of_the_shares() -> None:
    collapsed = "\n".join(
        [
            "Thread.run (threading.py:982);epoll_wait (libc.so.6) 30",
            "main (router/cli.py:96);write (libc.so.6) 3",
            "main (router/cli.py:96);feed (backends/http_common.py:627) 1",
            "not a stack line",
        ]
    )
    folded = top_frames(active(collapsed))
    assert folded["samples"] == 4
    assert folded["own"][0] == {"function": "write (libc.so.6)", "share": 0.75}


# The issue's figures: vllm-router against this router's HTTP door on a quiet machine.
VLLM_ROUTER = SystemFigures(2.15, 3.9, 744.0, 800.0, 80.0, 80.0)
DOOR = SystemFigures(2.5, 4.2, 1812.0, 523.0, 100.0, 99.0)
RELAY = SystemFigures(1.8, 3.1, 1300.0, 600.0)
ALL_SPLIT = {"vllm-router": True, "sglang-router": True, "hetero-http": True}


def figures(**changes: SystemFigures) -> dict[str, SystemFigures]:
    base = {"vllm-router": VLLM_ROUTER, "hetero-http": DOOR, "grpc-relay": RELAY}
    base["hetero-grpc"] = SystemFigures(2.3, 4.0, 2500.0, 370.0)
    return {**base, **{name.replace("_", "-"): value for name, value in changes.items()}}


def test_the_issues_figures_miss_every_target_against_vllm_router() -> None:
    judged = verdicts.targets(figures(), ALL_SPLIT)
    assert judged["cpu_per_request_ratio"]["value"] == pytest.approx(1812 / 744, abs=1e-4)
    assert judged["throughput_ratio"]["value"] == pytest.approx(523 / 800, abs=1e-4)
    for name in ("cpu_per_request_ratio", "added_ttft_p50_ratio", "added_ttft_p99_ratio"):
        assert judged[name]["met"] is False
    assert judged["throughput_ratio"]["met"] is False
    assert judged["grpc_door_over_relay_added_ttft_p50_ms"]["value"] == pytest.approx(0.5)
    assert judged["grpc_door_over_relay_added_ttft_p50_ms"]["met"] is False
    assert judged["routers_split"]["met"] is True


def test_a_door_at_or_below_vllm_routers_figures_meets_them() -> None:
    faster = SystemFigures(2.0, 3.9, 700.0, 800.0)
    grpc = SystemFigures(1.85, 3.5, 900.0, 700.0)
    judged = verdicts.targets(figures(hetero_http=faster, hetero_grpc=grpc), ALL_SPLIT)
    assert all(judged[name]["met"] for name in judged), judged
    assert judged["added_ttft_p99_ratio"]["value"] == 1.0  # equal is within "<= 1.0x"


def test_an_added_ttft_at_or_below_zero_is_no_base_for_a_ratio() -> None:
    noise = replace(VLLM_ROUTER, added_ttft_p50_ms=-0.05)
    judged = verdicts.targets(figures(vllm_router=noise), ALL_SPLIT)["added_ttft_p50_ratio"]
    assert judged["value"] is None
    assert judged["met"] is False  # 2.5 ms is not <= -0.05 ms
    ahead = replace(DOOR, added_ttft_p50_ms=-0.1)
    judged = verdicts.targets(figures(vllm_router=noise, hetero_http=ahead), ALL_SPLIT)
    assert judged["added_ttft_p50_ratio"]["met"] is True


def test_without_the_peers_their_targets_are_unmet_with_the_reason() -> None:
    mine = {k: v for k, v in figures().items() if k != "vllm-router"}
    judged = verdicts.targets(mine, {"hetero-http": True}, "pip install failed: no index")
    for name in ("cpu_per_request_ratio", "added_ttft_p50_ratio", "throughput_ratio"):
        assert judged[name]["met"] is False
        assert judged[name]["skipped"] == "pip install failed: no index"
    assert judged["grpc_door_over_relay_added_ttft_p50_ms"]["value"] == pytest.approx(0.5)
    assert verdicts.ratios(mine) == {}


def test_a_router_that_did_not_split_is_named() -> None:
    judged = verdicts.targets(figures(), {**ALL_SPLIT, "sglang-router": False})
    assert judged["routers_split"]["met"] is False
    assert judged["routers_split"]["not_split"] == ["sglang-router"]


def test_ratios_put_every_system_over_vllm_router() -> None:
    table = verdicts.ratios(figures())
    assert "vllm-router" not in table
    assert table["grpc-relay"]["cpu_per_request_ratio"] == pytest.approx(1300 / 744)
    assert table["hetero-http"]["added_ttft_p99_ratio"] == pytest.approx(4.2 / 3.9)


def test_floors_set_each_relay_against_vllm_router_and_each_door_against_its_relay() -> None:
    http_relay = SystemFigures(1.9, 3.6, 930.0, 640.0)
    floors = verdicts.floors(figures(http_relay=http_relay))
    assert floors["http_relay_cpu_over_vllm_router"] == pytest.approx(930 / 744)
    assert floors["grpc_relay_cpu_over_vllm_router"] == pytest.approx(1300 / 744)
    assert floors["http_door_cpu_over_http_relay"] == pytest.approx(1812 / 930)
    assert floors["grpc_door_cpu_over_grpc_relay"] == pytest.approx(2500 / 1300)
    # A relay that did not run leaves its floors without a figure, not a wrong one.
    assert verdicts.floors(figures())["http_door_cpu_over_http_relay"] is None


def test_a_profile_time_is_refused_when_negative_or_without_py_spy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert profile_seconds_refusal(0.0) is None
    assert "0 or more" in (profile_seconds_refusal(-1.0) or "")
    monkeypatch.setattr(profile_module, "py_spy", lambda: None)
    assert "needs py-spy" in (profile_seconds_refusal(5.0) or "")
    assert profile_seconds_refusal(0.0) is None  # no profile asked: no py-spy needed
