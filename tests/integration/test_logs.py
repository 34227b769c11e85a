"""The logs: every line a process writes is JSON (structlog's own, the standard library's,
warnings, an uncaught exception), a device's lines name the device, each error answer of
either door is one line, and the HTTP access log is a setting."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import aiohttp
import grpc
import pytest
import structlog

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import Role
from backends.errors import OverloadedError
from router.cli import build_parser
from router.client import ROUTER_SERVICE
from router.cluster import device_command
from router.errors import NoHealthyBackendError
from router.settings import BackendConfig
from tests.conftest import Cluster, start_cluster, stop_cluster
from tests.helpers import eventually
from tests.integration.test_http_errors import admin_server

COMPLETION = {"model": "llama-3.1-8b", "prompt": "secret prompt", "max_tokens": 4}
LogLines = Sequence[Mapping[str, Any]]


def json_lines(text: str) -> list[dict[str, Any]]:
    """Each line of ``text`` as the JSON object it must be (the test fails on any other)."""
    lines = []
    for line in text.splitlines():
        event = json.loads(line)
        assert isinstance(event, dict), line
        lines.append(event)
    return lines


def named(logs: LogLines, event: str) -> list[Mapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


async def no_backend(*args: Any, **kwargs: Any) -> AsyncGenerator[bytes, None]:
    """The dispatcher's generate when no backend can take the request."""
    raise NoHealthyBackendError("no healthy backend serves llama-3.1-8b")
    yield b""  # an async generator, as the dispatcher's is


async def lines_of(logs: LogLines, event: str) -> list[Mapping[str, Any]]:
    """The lines named ``event``, once there is one: the HTTP door logs an answer once it
    is sent, which may be just after the client has read it."""
    await eventually(lambda: bool(named(logs, event)))
    return named(logs, event)


def test_a_device_process_writes_json_lines_that_name_it() -> None:
    command = [sys.executable, "-m", "router.cli", "device", "--id", "dev-7", "--profile", "h100"]
    command += ["--listen", "127.0.0.1:0", "--time-scale", "0", "--announce", "--exit-with-stdin"]
    # At debug grpc's own (standard library) logger speaks as the server starts.
    command += ["--log-level", "debug"]
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdin is not None
    assert process.stderr is not None
    try:
        assert process.stdout.readline().startswith("READY 127.0.0.1:")
    finally:
        process.stdin.close()  # the device exits when its stdin closes
        stderr = process.stderr.read()
        process.wait(timeout=60)
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == 0
    lines = json_lines(stderr)
    assert {entry["device"] for entry in lines} == {"dev-7"}
    [serving] = named(lines, "device serving")
    assert serving["level"] == "info"
    assert serving["profile"] == "h100"
    assert serving["address"].startswith("127.0.0.1:")
    third_party = [entry for entry in lines if entry.get("logger", "").startswith("grpc")]
    assert third_party
    assert {entry["level"] for entry in third_party} == {"debug"}


def test_up_passes_the_routers_log_level_and_format_to_each_device() -> None:
    backend = BackendConfig(
        id="d0", kind="mock", address="127.0.0.1:0", role=Role.BOTH, model="m", profile="h100"
    )
    command = device_command(backend, time_scale=0.0, log_level="warning", log_format="console")
    options = build_parser().parse_args(command[command.index("device") :])
    assert (options.log_level, options.log_format) == ("warning", "console")
    default = build_parser().parse_args(["device", "--id", "d0", "--profile", "h100"])
    assert (default.log_level, default.log_format) == ("info", "json")


CONFIGURED = textwrap.dedent(
    """
    import logging, warnings
    import structlog
    from backends.logs import configure

    configure("info", "json", fields={"device": "d1"})
    logging.getLogger("aiohttp.server").warning("from %s", "aiohttp")
    logging.getLogger("asyncio").debug("below the level")
    structlog.get_logger("x").debug("below the level too")
    structlog.get_logger("x").info("native", n=1)
    warnings.warn("careful", UserWarning)
    try:
        raise KeyError("inner")
    except KeyError:
        logging.getLogger("grpc").exception("with a traceback")
    raise RuntimeError("uncaught")
    """
)


def test_the_standard_librarys_logs_warnings_and_a_crash_are_json_lines() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CONFIGURED], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1  # the uncaught exception
    assert result.stdout == ""
    lines = json_lines(result.stderr)
    assert [entry["event"] for entry in lines][:2] == ["from aiohttp", "native"]
    assert {entry["device"] for entry in lines} == {"d1"}
    assert not [entry for entry in lines if "below the level" in entry["event"]]
    aiohttp_line, native = lines[0], lines[1]
    assert (aiohttp_line["logger"], aiohttp_line["level"]) == ("aiohttp.server", "warning")
    assert "timestamp" in aiohttp_line
    assert (native["n"], native["level"]) == (1, "info")
    [warned] = [entry for entry in lines if entry.get("logger") == "py.warnings"]
    assert "UserWarning: careful" in warned["event"]
    [traced] = named(lines, "with a traceback")
    assert (traced["logger"], traced["level"]) == ("grpc", "error")
    assert "KeyError: 'inner'" in traced["exception"]
    [crash] = named(lines, "uncaught exception")
    assert crash["level"] == "critical"
    assert "RuntimeError: uncaught" in crash["exception"]


async def test_an_http_4xx_is_one_info_line_with_its_fields(cluster: Cluster) -> None:
    body = {**COMPLETION, "model": "no-such-model"}
    headers = {"X-Request-Id": "req-4xx", "Authorization": "Bearer not-logged"}
    with structlog.testing.capture_logs() as logs:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{cluster.admin_url}/v1/completions?key=hidden", json=body, headers=headers
            ) as reply,
        ):
            assert reply.status == 404
        [line] = await lines_of(logs, "http error")
    assert line["log_level"] == "info"
    assert {key: line[key] for key in ("method", "path", "status", "code", "param")} == {
        "method": "POST",
        "path": "/v1/completions",
        "status": 404,
        "code": "model_not_found",
        "param": "model",
    }
    assert (line["client"], line["request_id"]) == ("127.0.0.1", "req-4xx")
    assert line["duration_s"] >= 0
    assert line["bytes"] > 0
    shown = json.dumps(logs)
    for secret in ("secret prompt", "not-logged", "hidden"):
        assert secret not in shown


async def test_an_http_5xx_is_one_warning_line_with_the_routers_request_id(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster.daemon.dispatcher, "generate", no_backend)
    with structlog.testing.capture_logs() as logs:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{cluster.admin_url}/v1/completions", json=COMPLETION) as reply,
        ):
            assert reply.status == 503
        [line] = await lines_of(logs, "http error")
    assert (line["log_level"], line["status"], line["path"]) == ("warning", 503, "/v1/completions")
    assert line["request_id"]  # the router made one: the client sent none
    assert "secret prompt" not in json.dumps(logs)


async def test_a_long_path_is_cut_in_the_log() -> None:
    async with admin_server() as port:
        with structlog.testing.capture_logs() as logs:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/{'x' * 5000}") as reply,
            ):
                assert reply.status == 404
            [line] = await lines_of(logs, "http error")
    assert line["code"] == "unknown_url"
    assert len(line["path"]) < 300


@pytest.mark.parametrize("access_log", [False, True])
async def test_the_access_log_is_a_line_per_request_when_set(access_log: bool) -> None:
    async with admin_server(http_access_log=access_log) as port:
        with structlog.testing.capture_logs() as logs:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as reply:
                    assert reply.status == 200
                async with session.get(f"http://127.0.0.1:{port}/nowhere") as reply:
                    assert reply.status == 404
            await lines_of(logs, "http error")  # logged after the answer before it
    requests = named(logs, "http request")
    assert len(named(logs, "http error")) == 1  # an error is one line either way
    if not access_log:
        assert requests == []
        return
    [line] = requests
    assert line["log_level"] == "info"
    assert {key: line[key] for key in ("method", "path", "status", "client")} == {
        "method": "GET",
        "path": "/healthz",
        "status": 200,
        "client": "127.0.0.1",
    }
    assert line["duration_s"] >= 0
    assert line["bytes"] > 0


async def call_generate(cluster: Cluster, data: bytes, **metadata: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        generate = channel.unary_stream(f"/{ROUTER_SERVICE}/Generate")
        call = generate(data, timeout=30, metadata=tuple(metadata.items()))
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK


async def test_a_grpc_refusal_is_one_info_line(cluster: Cluster) -> None:
    sampling = router_pb2.SamplingParams(max_tokens=0)
    request = router_pb2.GenerateRequest(
        request_id="req-grpc", prompt="secret prompt", sampling=sampling
    )
    with structlog.testing.capture_logs() as logs:
        code = await call_generate(cluster, request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    [line] = named(logs, "grpc error")
    assert line["log_level"] == "info"
    assert (line["method"], line["status"]) == ("Generate", "INVALID_ARGUMENT")
    assert (line["param"], line["request_id"]) == ("sampling.max_tokens", "req-grpc")
    assert line["client"].startswith("ipv4:127.0.0.1:")
    assert "secret prompt" not in json.dumps(logs)


async def test_a_grpc_error_of_the_servers_side_is_one_warning_line(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster.daemon.dispatcher, "generate", no_backend)
    sampling = router_pb2.SamplingParams(max_tokens=2)
    request = router_pb2.GenerateRequest(prompt="hi", sampling=sampling)
    with structlog.testing.capture_logs() as logs:
        code = await call_generate(cluster, request.SerializeToString())
    assert code == grpc.StatusCode.UNAVAILABLE
    [line] = named(logs, "grpc error")
    assert (line["log_level"], line["status"]) == ("warning", "UNAVAILABLE")
    assert line["request_id"]  # bound for the request's every line
    assert not [entry for entry in logs if entry["event"] == "request failed"]


async def shed(*args: Any, **kwargs: Any) -> AsyncGenerator[bytes, None]:
    """The dispatcher's generate when the request is shed."""
    raise OverloadedError("the router is overloaded", retry_after_s=1.0)
    yield b""  # an async generator, as the dispatcher's is


@pytest.mark.parametrize("rate", [0.0, 1.0])
async def test_shed_requests_are_logged_at_the_request_logs_sample_rate(
    rate: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await start_cluster(request_log_sample_rate=rate)
    try:
        monkeypatch.setattr(cluster.daemon.dispatcher, "generate", shed)
        request = router_pb2.GenerateRequest(prompt="hi")
        with structlog.testing.capture_logs() as logs:
            assert await call_generate(cluster, request.SerializeToString()) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            async with aiohttp.ClientSession() as session:
                url = f"{cluster.admin_url}/v1/completions"
                async with session.post(url, json=COMPLETION) as reply:
                    assert reply.status == 429
                async with session.get(f"{cluster.admin_url}/v1/models/nope") as reply:
                    assert reply.status == 404  # not sampled, and logged after the 429
            await eventually(lambda: any(line.get("status") == 404 for line in logs))
    finally:
        await stop_cluster(cluster)
    statuses = [line["status"] for line in logs if line["event"] in ("http error", "grpc error")]
    assert statuses == ([404] if rate == 0 else ["RESOURCE_EXHAUSTED", 429, 404])
