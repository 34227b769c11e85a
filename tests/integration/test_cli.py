"""`hetero-router up` and `generate` as a user runs them: real processes, real ports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from prometheus_client import CollectorRegistry

from router import cli as cli_module
from router.api import grpc_server, http_server
from router.api.grpc_server import FrontDoor, RouterService
from router.api.http_server import AdminServer

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
    name = "gRPC" if door == "--grpc-address" else "HTTP"
    # One line, before the pool starts or anything logs.
    assert result.stderr.splitlines() == [
        f"hetero-router: cannot listen on {addresses[door]} for {name}: address in use"
    ]


# ------------------------------------------------------------------ refused at start


@pytest.fixture
def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, list[str]]]:
    """Runs ``hetero-router ARGS`` in this process: its exit status and stderr lines."""
    # The JSON log would be configured onto pytest's capture for the tests after this one.
    monkeypatch.setattr(cli_module, "configure", lambda *args: None)
    for variable in list(os.environ):
        if variable.startswith("HETERO_ROUTER_"):
            monkeypatch.delenv(variable)

    def run(*args: str, **env: str) -> tuple[int, list[str]]:
        for name, value in env.items():
            monkeypatch.setenv(f"HETERO_ROUTER_{name}", value)
        try:
            code = cli_module.main(list(args))
        except SystemExit as exit_:  # argparse's way out
            code = int(exit_.code or 0)
        return code, capsys.readouterr().err.splitlines()

    return run


@pytest.fixture
def offline_pool(tmp_path: Path) -> Path:
    """A pool file whose one backend is never reached: start-up fails before it would be."""
    pool = tmp_path / "pool.yaml"
    pool.write_text("backends: [{id: a, address: '127.0.0.1:1', role: both, model: m}]")
    return pool


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (
            ("--http-address", "127.0.0.1:99999"),
            {},
            "settings: --http-address: address must be host:port (the port after the last ':' "
            "must be 0..65535), got '127.0.0.1:99999'",
        ),
        (
            (),
            {"GRPC_ADDRESS": "::1:50051"},
            "settings: HETERO_ROUTER_GRPC_ADDRESS: address must be host:port (an IPv6 host goes "
            "in brackets, as in [::1]:50051), got '::1:50051'",
        ),
        (
            (),
            {"HEALTH_TIMEOUT_S": "1e999"},
            "settings: HETERO_ROUTER_HEALTH_TIMEOUT_S: expected a finite number, got '1e999'",
        ),
        (
            (),
            {"DECODE_TIMEOUT_S": "nan"},
            "settings: HETERO_ROUTER_DECODE_TIMEOUT_S: expected a finite number, got 'nan'",
        ),
        (
            (),
            {"LOG_FORMAT": "xml"},
            "settings: HETERO_ROUTER_LOG_FORMAT: expected 'json' or 'console', got 'xml'",
        ),
        (
            ("--pool", "/dev/null"),
            {},
            "/dev/null: the file is empty; expected a mapping with a 'backends' list",
        ),
        (
            ("--pool", "/nonexistent/pool.yaml"),
            {},
            "cannot read pool file /nonexistent/pool.yaml: No such file or directory",
        ),
    ],
)
def test_broken_settings_are_one_line_and_exit_2(
    run_main: Callable[..., tuple[int, list[str]]],
    offline_pool: Path,
    args: tuple[str, ...],
    env: dict[str, str],
    said: str,
) -> None:
    pool = () if "--pool" in args else ("--pool", str(offline_pool))
    code, lines = run_main("serve", *pool, *args, **env)
    assert code == 2
    assert lines == [f"hetero-router: {said}"]


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1e999", "fast"])
def test_a_bad_time_scale_flag_is_one_line_and_exit_2(
    run_main: Callable[..., tuple[int, list[str]]], value: str
) -> None:
    code, lines = run_main("up", "--time-scale", value)
    assert code == 2
    assert lines == [
        f"hetero-router up: argument --time-scale: must be a number from 0 to 1000, got "
        f"{value!r} (see hetero-router up --help)"
    ]


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ("time_scale: -1", "backends[0].time_scale: must be >= 0, got -1"),
        ("time_scale: .nan", "backends[0].time_scale: expected a finite number, got nan"),
        ("address: x", "backends[0].address: address must be host:port"),
    ],
)
def test_a_bad_pool_entry_stops_up_before_any_device_starts(
    run_main: Callable[..., tuple[int, list[str]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    entry: str,
    said: str,
) -> None:
    started: list[object] = []
    monkeypatch.setattr(asyncio, "create_subprocess_exec", lambda *a, **k: started.append(a))
    pool = tmp_path / "pool.yaml"
    pool.write_text(
        "backends: [{id: a, address: '127.0.0.1:0', role: both, model: llama-3.1-8b, "
        f"profile: h100, {entry}}}]"
    )
    code, lines = run_main("up", "--pool", str(pool))
    assert code == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"hetero-router: {pool}: {said}")
    assert started == []


@pytest.mark.parametrize("setting", ["POOL_FILE", "POLICY_FILE"])
def test_yaml_nested_2000_deep_is_one_line_and_exit_2(
    run_main: Callable[..., tuple[int, list[str]]],
    tmp_path: Path,
    offline_pool: Path,
    setting: str,
) -> None:
    nested = tmp_path / "nested.yaml"
    nested.write_text(f"profiles: {deep(2000)}")
    env = {"POOL_FILE": str(offline_pool), setting: str(nested)}
    code, lines = run_main("serve", **env)
    what = setting.removesuffix("_FILE").lower()
    assert code == 2
    assert lines == [
        f"hetero-router: {what} file {nested} is nested too deeply (more than 64 levels)"
    ]


def test_garbage_pem_files_are_one_line_naming_the_file(
    run_main: Callable[..., tuple[int, list[str]]], tmp_path: Path, offline_pool: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"\x00garbage\xff")
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    code, lines = run_main(
        "serve", "--pool", str(offline_pool), TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key)
    )
    assert code == 2
    assert lines == [
        f"hetero-router: HETERO_ROUTER_TLS_CERT_FILE {cert} is not a PEM file with a certificate"
    ]


def test_a_bad_simulate_setting_is_one_line(
    run_main: Callable[..., tuple[int, list[str]]], tmp_path: Path
) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("model: llama-3.1-8b\ngroups: [{name: a, profile: h100, role: both}]\n")
    code, lines = run_main(
        "simulate", "--cluster", str(cluster), "--rate", "1", HEALTH_INTERVAL_S="inf"
    )
    assert code == 2
    assert lines == [
        "hetero-router simulate: settings: HETERO_ROUTER_HEALTH_INTERVAL_S: expected a finite "
        "number, got 'inf'"
    ]


# ------------------------------------------------------------------ a port already taken


@pytest.mark.parametrize(("flag", "door"), [("--grpc-address", "gRPC"), ("--http-address", "HTTP")])
def test_a_taken_port_is_one_line_before_any_device_starts(
    run_main: Callable[..., tuple[int, list[str]]],
    monkeypatch: pytest.MonkeyPatch,
    flag: str,
    door: str,
) -> None:
    started: list[object] = []
    monkeypatch.setattr(asyncio, "create_subprocess_exec", lambda *a, **k: started.append(a))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        other = "--http-address" if flag == "--grpc-address" else "--grpc-address"
        code, lines = run_main("up", flag, address, other, "127.0.0.1:0")
    assert code == 2
    assert lines == [f"hetero-router: cannot listen on {address} for {door}: address in use"]
    assert started == []


def front_door(address: str) -> FrontDoor:
    service = cast(
        RouterService,
        SimpleNamespace(handler=lambda: grpc.method_handlers_generic_handler("test.Nothing", {})),
    )
    return FrontDoor(service, address)


async def test_the_grpc_door_refuses_a_port_another_socket_listens_on() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        door = front_door(address)
        with pytest.raises(OSError, match=f"^cannot listen on {address} for gRPC: address in use$"):
            await door.start()
        await door.stop()


async def test_a_second_grpc_door_on_the_same_port_fails_instead_of_sharing_it() -> None:
    first = front_door("127.0.0.1:0")
    port = await first.start()
    try:
        # grpc's default SO_REUSEPORT would let it bind and take a share of the clients.
        second = front_door(f"127.0.0.1:{port}")
        with pytest.raises(OSError, match="for gRPC: address in use"):
            await second.start()
        await second.stop()
    finally:
        await first.stop()


async def test_the_grpc_server_itself_refuses_a_taken_port_without_the_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = front_door("127.0.0.1:0")
    port = await first.start()
    try:
        monkeypatch.setattr(grpc_server, "check_can_listen", lambda address, door: None)
        second = front_door(f"127.0.0.1:{port}")
        with pytest.raises(OSError, match="for gRPC: grpc could not bind it"):
            await second.start()
        await second.stop()
    finally:
        await first.stop()


def admin_server(address: str) -> AdminServer:
    return AdminServer(CollectorRegistry(), lambda: (True, ""), address)


async def test_a_second_http_door_on_the_same_port_fails_instead_of_sharing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = admin_server("127.0.0.1:0")
    port = await first.start()
    try:
        second = admin_server(f"127.0.0.1:{port}")
        with pytest.raises(
            OSError, match=f"^cannot listen on 127.0.0.1:{port} for HTTP: address in use$"
        ):
            await second.start()
        await second.stop()
        # aiohttp itself does not share the port either (no reuse_port by default).
        monkeypatch.setattr(http_server, "check_can_listen", lambda address, door: None)
        unchecked = admin_server(f"127.0.0.1:{port}")
        with pytest.raises(OSError, match="address already in use"):
            await unchecked.start()
        await unchecked.stop()
    finally:
        await first.stop()


async def test_an_ipv6_http_address_is_bound_without_its_brackets() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    door = admin_server("[::1]:0")
    try:
        port = await door.start()
    except OSError as error:
        pytest.skip(f"::1 cannot be bound here: {error}")
    try:
        with socket.create_connection(("::1", port), timeout=5):
            pass
    finally:
        await door.stop()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--time-scale", "-1"], "time_scale must be a finite number >= 0, got -1.0"),
        (["--kv-lease-s", "nan"], "kv_lease_s must be a finite number >= 0, got nan"),
        (["--listen", "127.0.0.1:99999"], "address must be host:port (the port after the last"),
    ],
)
def test_a_bad_device_flag_is_one_line_and_exit_2(
    run_main: Callable[..., tuple[int, list[str]]], flags: list[str], said: str
) -> None:
    code, lines = run_main("device", "--id", "a", "--profile", "h100", *flags)
    assert code == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"hetero-router: {said}")
