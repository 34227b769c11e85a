"""`hetero-router up --workers 2`: two router processes on one port each door, under a
supervising parent; real processes, real sockets on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.client import ChannelConfig, RouterClient

POOL = """
default_model: llama-3.1-8b
backends:
  - {id: h100-0, address: "127.0.0.1:0", role: prefill, model: llama-3.1-8b, profile: h100}
  - {id: groq-0, address: "127.0.0.1:0", role: decode, model: llama-3.1-8b, profile: groq-lpu}
"""
# Fresh connections tried before concluding the kernel never hands one to a worker: with
# two listening, all of them landing on one has a chance of 2**-99.
CONNECTIONS = 100
EVENT_TIMEOUT_S = 90.0


class RouterLog:
    """The JSON lines of a router's stderr, read on a thread as they come."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.said: list[str] = []
        threading.Thread(target=self._read, args=(process,), daemon=True).start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.said.append(line)
            if line.startswith("{"):
                self._lines.put(json.loads(line))
        self._lines.put(None)

    def wait_for(self, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The next line ``wanted`` accepts (blocking: no polling, no sleeps)."""
        while (event := self._lines.get(timeout=EVENT_TIMEOUT_S)) is not None:
            if wanted(event):
                return event
        raise AssertionError(f"the router exited before the line was said: {self.said[-5:]}")


def start_workers(tmp_path: Path, time_scale: str = "0",
                  **environment: str) -> subprocess.Popen[str]:  # fmt: skip
    """``up --workers 2`` over the two mock devices of POOL."""
    pool = tmp_path / "pool.yaml"
    pool.write_text(POOL)
    return subprocess.Popen(
        [sys.executable, "-m", "router.cli", "up", "--pool", str(pool), "--workers", "2",
         "--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0",
         "--time-scale", time_scale],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "HETERO_ROUTER_LOG_FORMAT": "json", **environment},
    )  # fmt: skip


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], RouterLog]]:
    policy = tmp_path / "policy.yaml"  # the packaged one, named so that SIGHUP reloads it
    policy.write_bytes(resources.files("router.defaults").joinpath("policy.yaml").read_bytes())
    process = start_workers(tmp_path, HETERO_ROUTER_POLICY_FILE=str(policy))
    try:
        yield process, RouterLog(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def get(address: str, path: str) -> tuple[int, bytes]:
    """One request on a fresh connection (each one a new draw of the kernel's)."""
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def answering_pids(address: str) -> set[int]:
    """The workers whose /healthz answered, over CONNECTIONS fresh connections."""
    pids: set[int] = set()
    for _ in range(CONNECTIONS):
        status, body = get(address, "/healthz")
        assert status == 200
        pids.add(json.loads(body)["pid"])
    return pids


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text().lower()
    except FileNotFoundError:
        return False


def test_two_workers_share_both_ports_reload_on_sighup_restart_when_killed_and_drain(
    workers: tuple[subprocess.Popen[str], RouterLog],
) -> None:
    process, log = workers
    serving = log.wait_for(lambda event: event.get("event") == "router serving")
    assert serving["workers"] == 2
    assert serving["ready"] is True  # both workers see both mock devices healthy
    first, second = serving["pids"]
    http_address, grpc_address = serving["http"], serving["grpc"]
    assert not http_address.endswith(":0")
    assert not grpc_address.endswith(":0")

    # Connections to the one HTTP port land on both workers.
    assert answering_pids(http_address) == {first, second}
    # Whichever worker a scrape reaches, it answers for both.
    status, body = get(http_address, "/metrics")
    assert status == 200
    text = body.decode()
    assert 'worker="0"' in text
    assert 'worker="1"' in text
    assert "hetero_router_workers_scraped 2.0" in text
    types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))  # each family once, both workers' series in it
    # The gRPC door serves on its shared port too.
    with RouterClient(ChannelConfig(address=grpc_address, timeout_s=30)) as client:
        responses = list(client.generate("hello workers", max_tokens=4, temperature=0))
    assert responses[-1].finish_reason

    # SIGHUP to the parent reaches every worker: each reloads the policy file.
    process.send_signal(signal.SIGHUP)
    reloaded = {
        log.wait_for(lambda event: event.get("event") == "policy file reloaded")["worker"]
        for _ in range(2)
    }
    assert reloaded == {0, 1}

    os.kill(first, signal.SIGKILL)
    exited = log.wait_for(lambda event: event.get("event") == "worker exited: restarting")
    assert (exited["pid"], exited["exit"]) == (first, "SIGKILL")
    restarted = log.wait_for(
        lambda event: (
            event.get("event") == "worker serving" and event.get("worker") == exited["worker"]
        )
    )
    assert restarted["http"] == http_address
    pids = answering_pids(http_address)
    assert first not in pids
    assert second in pids
    assert len(pids) == 2  # the restarted worker shares the port again
    # Its restart is counted, carried into the new process; the sibling's count stays 0.
    status, body = get(http_address, "/metrics")
    assert status == 200
    restarts = {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "hetero_router_worker_restarts_total"
    }
    assert restarts == {str(exited["worker"]): 1.0, str(1 - exited["worker"]): 0.0}

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=EVENT_TIMEOUT_S) == 0
    drained = [line for line in log.said if '"draining"' in line and '"worker"' in line]
    assert len(drained) == 2  # each worker ran its own graceful drain
    assert not alive(second)


def test_a_taken_port_is_refused_in_one_line_before_any_worker_starts(
    tmp_path: Path,
) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text(POOL)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "router.cli", "serve", "--pool", str(pool), "--workers", "2",
             "--grpc-address", address, "--http-address", "127.0.0.1:0"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"hetero-router: cannot listen on {address} for gRPC: address in use"
    )


def test_a_second_sigterm_cuts_the_workers_drains_short(tmp_path: Path) -> None:
    # Real-time-ish devices and a long grace: a long stream is still running when the
    # first signal comes, and only the second one ends it.
    process = start_workers(tmp_path, "20", HETERO_ROUTER_DRAIN_GRACE_S="600")
    try:
        log = RouterLog(process)
        serving = log.wait_for(lambda event: event.get("event") == "router serving")
        with RouterClient(ChannelConfig(address=serving["grpc"], timeout_s=120)) as client:
            stream = client.generate("a long answer", max_tokens=4096, temperature=0)
            next(stream)  # in flight on one of the workers
            process.send_signal(signal.SIGTERM)
            draining = {
                log.wait_for(lambda event: event.get("event") == "draining")["worker"]
                for _ in range(2)
            }
            assert draining == {0, 1}
            assert not next(stream).finish_reason  # the drain lets it run on
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=EVENT_TIMEOUT_S) == 128 + signal.SIGTERM
            with pytest.raises(grpc.RpcError):
                for _ in stream:
                    pass
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
