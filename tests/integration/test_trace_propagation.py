"""A client's W3C trace context reaches the backends through either door, unchanged, with
tracing off; one that is not valid is ignored, never refused. Tracing off loads nothing of
OpenTelemetry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import aiohttp
import grpc
import pytest

from backends._gen.hetero.router.v1 import router_pb2
from router.client import GENERATE_METHOD, build_request
from router.daemon import Daemon
from router.settings import ENV_PREFIX
from tests.recording import MODEL, Recorder, recording_router

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


async def grpc_generate(
    daemon: Daemon, metadata: tuple[tuple[str, str], ...]
) -> list[router_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as channel:
        generate = channel.unary_stream(
            GENERATE_METHOD,
            request_serializer=router_pb2.GenerateRequest.SerializeToString,
            response_deserializer=router_pb2.GenerateResponse.FromString,
        )
        call = generate(build_request("hello", model=MODEL), metadata=metadata, timeout=30)
        return [response async for response in call]


async def http_complete(daemon: Daemon, headers: dict[str, str]) -> int:
    url = f"http://127.0.0.1:{daemon.http_port}/v1/completions"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json={"model": MODEL, "prompt": "hello"}, headers=headers) as reply,
    ):
        await reply.read()
        return reply.status


async def test_the_clients_trace_context_reaches_the_backend_unchanged_over_grpc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with recording_router(monkeypatch) as daemon:
        await grpc_generate(daemon, (("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)))

    (served,) = Recorder.served
    assert (served.traceparent, served.tracestate) == (TRACEPARENT, TRACESTATE)


async def test_the_clients_trace_context_reaches_the_backend_unchanged_over_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with recording_router(monkeypatch) as daemon:
        status = await http_complete(daemon, {"traceparent": TRACEPARENT, "tracestate": TRACESTATE})

    assert status == 200
    (served,) = Recorder.served
    assert (served.traceparent, served.tracestate) == (TRACEPARENT, TRACESTATE)


async def test_no_trace_context_sends_none(monkeypatch: pytest.MonkeyPatch) -> None:
    async with recording_router(monkeypatch) as daemon:
        await grpc_generate(daemon, ())
        assert await http_complete(daemon, {}) == 200

    assert [(r.traceparent, r.tracestate) for r in Recorder.served] == [("", "")] * 2
    assert Recorder.served[0].trace_headers() == {}


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "not a trace context",
        "00-" + "a" * 4000,
    ],
)
async def test_an_invalid_traceparent_is_ignored_and_the_request_served(
    monkeypatch: pytest.MonkeyPatch, traceparent: str
) -> None:
    async with recording_router(monkeypatch) as daemon:
        responses = await grpc_generate(
            daemon, (("traceparent", traceparent), ("tracestate", TRACESTATE))
        )
        status = await http_complete(daemon, {"traceparent": traceparent, "tracestate": TRACESTATE})

    assert responses[-1].finish_reason == router_pb2.FINISH_REASON_STOP
    assert status == 200
    assert [(r.traceparent, r.tracestate) for r in Recorder.served] == [("", "")] * 2


@pytest.mark.slow
def test_without_an_endpoint_the_daemon_loads_nothing_of_opentelemetry() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        from router.daemon import Daemon
        from router.settings import BackendConfig, PoolConfig, Settings
        from backends.base import Role

        pool = PoolConfig(backends=(
            BackendConfig(id="a", kind="mock", address="127.0.0.1:1", role=Role.BOTH, model="m"),
        ))
        daemon = Daemon(Settings(), pool)
        loaded = sorted(
            name for name in sys.modules
            if name == "router.tracing" or name.split(".")[0] == "opentelemetry"
        )
        print(json.dumps({"tracing": daemon.tracing is None, "loaded": loaded}))
        """
    )
    environment = {
        **{key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)},
        "HETERO_ROUTER_OTLP_TRACES_ENDPOINT": "",  # empty is unset
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=environment,
    )
    assert json.loads(result.stdout.splitlines()[-1]) == {"tracing": True, "loaded": []}


@pytest.mark.slow
def test_an_endpoint_without_the_extra_stops_start_up_with_one_line() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if the tracing extra were not installed
        from router.cli import main
        sys.exit(main(["serve", "--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0"]))
        """
    )
    environment = {
        **{key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)},
        "HETERO_ROUTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:19401",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment,
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("hetero-router: HETERO_ROUTER_OTLP_TRACES_ENDPOINT is set but")
    assert line.endswith("pip install 'hetero-router[tracing]'")
