"""`hetero-router up` and `generate` as a user runs them: real processes, real ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

POOL = """
default_model: llama-3.1-8b
backends:
  - {id: h100-0, address: "127.0.0.1:0", role: prefill, model: llama-3.1-8b, profile: h100,
     options: {tensor_parallel: 2, block_size: 32}}
  - {id: groq-0, address: "127.0.0.1:0", role: decode, model: llama-3.1-8b, profile: groq-lpu}
"""


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "router.cli", *args]


def wait_for_serving(process: subprocess.Popen[str]) -> dict[str, Any]:
    """Reads the router's JSON log until it says where it serves (no polling, no sleeps)."""
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "router serving":
                return event  # type: ignore[no-any-return]  # a JSON object
    raise AssertionError(f"router exited with {process.wait()} before serving")


@pytest.fixture
def router_up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    pool = tmp_path / "pool.yaml"
    pool.write_text(POOL)
    env = {**os.environ, "HETERO_ROUTER_LOG_FORMAT": "json"}
    process = subprocess.Popen(
        cli(
            "up",
            "--pool",
            str(pool),
            "--grpc-address",
            "127.0.0.1:0",
            "--http-address",
            "127.0.0.1:0",
            "--time-scale",
            "0",
        ),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        serving = wait_for_serving(process)
        # Keep reading the log so a chatty router never blocks on a full pipe.
        threading.Thread(target=process.stderr.read, daemon=True).start()  # type: ignore[union-attr]  # stderr=PIPE
        yield process, serving
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def device_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


def test_up_serves_generate_and_stops_cleanly_on_ctrl_c(
    router_up: tuple[subprocess.Popen[str], dict[str, Any]],
) -> None:
    process, serving = router_up
    assert serving["ready"] is True
    devices = device_pids(process.pid)
    assert len(devices) == 2

    result = subprocess.run(
        cli(
            "generate",
            "Hello from the CLI",
            "--address",
            serving["grpc"],
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--mode",
            "split",
            "--show-route",
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The prefill device runs 2 ranks with 32-token blocks, the decode device 1 rank
    # with 16: the router relays the KV and converts it on the way.
    assert "prefill=h100-0 decode=groq-0" in result.stderr
    assert "[finish:" in result.stderr

    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    for pid in devices:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )


def test_generate_reports_bad_input_clearly(
    router_up: tuple[subprocess.Popen[str], dict[str, Any]],
) -> None:
    _, serving = router_up
    result = subprocess.run(
        cli("generate", "hi", "--address", serving["grpc"], "--max-tokens", "0"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr
    assert "max_tokens must be between 1 and 4096" in result.stderr


def test_a_broken_pool_file_is_reported_without_a_traceback(tmp_path: Path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text("backends: [{id: a, address: nowhere, role: decode, model: m}]")
    result = subprocess.run(
        cli("serve", "--pool", str(pool)), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "address must be host:port" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("door", ["--grpc-address", "--http-address"])
def test_a_port_in_use_is_reported_without_a_traceback(tmp_path: Path, door: str) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text("backends: [{id: a, address: '127.0.0.1:1', role: both, model: m}]")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addresses = {"--grpc-address": "127.0.0.1:0", "--http-address": "127.0.0.1:0"}
        addresses[door] = f"127.0.0.1:{taken.getsockname()[1]}"
        result = subprocess.run(
            cli(
                "serve", "--pool", str(pool), *(part for pair in addresses.items() for part in pair)
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert "start-up failed: stopping what started" in result.stderr
    assert "Traceback" not in result.stderr
