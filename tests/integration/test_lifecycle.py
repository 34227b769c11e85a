"""The daemon's one lifecycle: start-up that rolls back, signals, and the drain of both doors.

Streams are held open by a gate on the dispatcher, not by slow devices, so every
step happens in an order the test chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backends._gen.hetero.router.v1 import router_pb2
from router.client import ROUTER_SERVICE, AsyncRouterClient
from router.daemon import Daemon
from router.dispatch.dispatcher import Dispatcher
from router.settings import Settings
from tests.conftest import Cluster, start_cluster, stop_cluster
from tests.helpers import eventually

COMPLETION = {"model": "llama-3.1-8b", "prompt": "drain me", "max_tokens": 8, "temperature": 0}


class Gate:
    """Holds every generation after its first frame until ``opened`` is set."""

    def __init__(self, dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = asyncio.Event()
        real = dispatcher.generate

        async def generate(*args: Any, **kwargs: Any) -> AsyncGenerator[bytes, None]:
            async with contextlib.aclosing(real(*args, **kwargs)) as frames:
                async for frame in frames:
                    yield frame
                    await self.opened.wait()

        monkeypatch.setattr(dispatcher, "generate", generate)


async def open_event_stream(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    """A streamed completion whose first event has arrived."""
    response = await session.post(f"{url}/v1/completions", json={**COMPLETION, "stream": True})
    assert response.status == 200
    assert (await response.content.readline()).startswith(b"data: {")
    return response


async def open_grpc_stream(
    client: AsyncRouterClient,
) -> AsyncIterator[router_pb2.GenerateResponse]:
    """A Generate stream whose first response has arrived."""
    stream = client.generate("drain me too", max_tokens=8, temperature=0)
    first = await anext(stream)
    assert first.route.request_id
    return stream


def doors_closed(daemon: Daemon) -> bool:
    return not daemon.front_door.accepting and not daemon.admin.accepting


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@contextlib.contextmanager
def sigterm_caught_outside_the_daemon() -> Iterator[list[int]]:
    """A SIGTERM the daemon did not handle lands in the list instead of ending pytest."""
    leaked: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: leaked.append(signum))
    try:
        yield leaked
    finally:
        signal.signal(signal.SIGTERM, previous)


async def statuses_until_the_end(
    watch: grpc.aio.UnaryStreamCall[Any, health_pb2.HealthCheckResponse],
) -> tuple[list[int], grpc.StatusCode]:
    """What a Watch stream sends until it ends, and the status it ends with."""
    statuses: list[int] = []
    try:
        while (reply := await watch.read()) is not grpc.aio.EOF:
            statuses.append(reply.status)
    except grpc.aio.AioRpcError as error:
        return statuses, error.code()
    return statuses, await watch.code()


async def serving(daemon: Daemon) -> asyncio.Task[int]:
    """``daemon.serve()`` in a task, once its start-up is complete."""
    task = asyncio.create_task(daemon.serve())
    started = asyncio.ensure_future(daemon.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        raise AssertionError(f"the daemon did not start: {task.exception()!r}")
    return task


def second_daemon(cluster: Cluster, **settings: Any) -> Daemon:
    """A daemon over the cluster's devices, not yet started."""
    options: dict[str, Any] = {
        "grpc_address": "127.0.0.1:0",
        "http_address": "127.0.0.1:0",
        "drain_grace_s": 0.5,
        **settings,
    }
    return Daemon(Settings(**options), cluster.daemon.pool.config)


async def test_streams_in_flight_on_both_doors_finish_while_new_requests_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = await start_cluster(drain_grace_s=60.0)
    gate = Gate(cluster.daemon.dispatcher, monkeypatch)
    one_connection = aiohttp.TCPConnector(limit=1)
    try:
        async with (
            aiohttp.ClientSession() as streaming,
            aiohttp.ClientSession(connector=one_connection) as kept_alive,
        ):
            async with kept_alive.get(f"{cluster.admin_url}/v1/models") as reply:
                assert reply.status == 200
                await reply.read()  # the connection goes back to the pool, open
            event_stream = await open_event_stream(streaming, cluster.admin_url)
            grpc_stream = await open_grpc_stream(cluster.client)

            stopping = asyncio.create_task(cluster.daemon.stop())
            await eventually(lambda: doors_closed(cluster.daemon))

            completions = f"{cluster.admin_url}/v1/completions"
            async with aiohttp.ClientSession() as probe:  # a new connection, as a kubelet
                async with probe.get(f"{cluster.admin_url}/readyz") as reply:
                    assert reply.status == 503
                    assert (await reply.json())["detail"] == "draining"
                async with probe.post(completions, json=COMPLETION) as reply:
                    assert reply.status == 503
                    assert reply.headers["Retry-After"] == "1"
                    assert (await reply.json())["error"]["type"] == "unavailable"
            async with kept_alive.get(f"{cluster.admin_url}/readyz") as reply:
                assert reply.status == 503
                assert (await reply.json())["detail"] == "draining"
            async with kept_alive.post(completions, json=COMPLETION) as reply:
                assert reply.status == 503
                assert (await reply.json())["error"]["type"] == "unavailable"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await cluster.client.list_backends()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not stopping.done()

            gate.opened.set()
            assert (await event_stream.read()).endswith(b"data: [DONE]\n\n")
            rest = [response async for response in grpc_stream]
            assert rest[-1].finish_reason != router_pb2.FINISH_REASON_UNSPECIFIED
            await stopping
    finally:
        await stop_cluster(cluster)


async def test_streams_past_the_grace_are_cancelled_on_both_doors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = await start_cluster(drain_grace_s=0.01)
    Gate(cluster.daemon.dispatcher, monkeypatch)  # never opened
    try:
        async with aiohttp.ClientSession() as session:
            event_stream = await open_event_stream(session, cluster.admin_url)
            grpc_stream = await open_grpc_stream(cluster.client)
            await cluster.daemon.stop()
            with pytest.raises(aiohttp.ClientPayloadError):
                await event_stream.read()
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await anext(grpc_stream)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE  # grpc: "Cancelling all calls"
        await eventually(lambda: all(used == (0, 0) for used in cluster.kv_in_use().values()))
    finally:
        await stop_cluster(cluster)


@pytest.mark.parametrize(
    ("busy", "error"),
    [
        ("grpc", "cannot listen on .* for gRPC: address in use"),
        ("http", "cannot listen on .* for HTTP: address in use"),
    ],
)
async def test_a_start_that_fails_stops_what_it_had_started(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, busy: str, error: str
) -> None:
    stopped: list[str] = []

    def record(name: str, target: object, method: str) -> None:
        real = getattr(target, method)

        async def recorded(*args: Any) -> None:
            stopped.append(name)
            await real(*args)

        monkeypatch.setattr(target, method, recorded)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        daemon = second_daemon(cluster, **{f"{busy}_address": address})
        for name, target, method in [
            ("grpc", daemon.front_door, "stop"),
            ("http", daemon.admin, "stop"),
            ("health checker", daemon.health, "stop"),
            ("pool", daemon.pool, "close"),
        ]:
            record(name, target, method)
        with pytest.raises(OSError, match=error):
            await daemon.start()

    assert sorted(stopped[:2]) == ["grpc", "http"]
    assert stopped[2:] == ["health checker", "pool"]
    assert not daemon.started.is_set()
    assert daemon.health._task is not None
    assert daemon.health._task.done()
    if busy == "http":  # the gRPC door had opened: it is closed again
        assert daemon.grpc_port != 0
        assert refuses_connections(daemon.grpc_port)
    else:
        assert daemon.http_port == 0


async def test_a_signal_during_start_up_stops_the_daemon_once_started(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = second_daemon(cluster)
    start_pool = daemon.pool.start

    async def signalled_start() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await start_pool()

    monkeypatch.setattr(daemon.pool, "start", signalled_start)
    with sigterm_caught_outside_the_daemon() as leaked:
        status = await daemon.serve()
    assert leaked == []
    assert status == 0
    assert daemon.started.is_set()
    assert refuses_connections(daemon.grpc_port)
    assert refuses_connections(daemon.http_port)


async def test_a_second_signal_cancels_the_drain_at_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = second_daemon(cluster, drain_grace_s=600.0)
    Gate(daemon.dispatcher, monkeypatch)  # never opened: only the second signal ends the drain
    with sigterm_caught_outside_the_daemon() as leaked:
        served = await serving(daemon)
        async with (
            aiohttp.ClientSession() as session,
            AsyncRouterClient(f"127.0.0.1:{daemon.grpc_port}", timeout_s=30) as client,
        ):
            event_stream = await open_event_stream(session, f"http://127.0.0.1:{daemon.http_port}")
            grpc_stream = await open_grpc_stream(client)

            os.kill(os.getpid(), signal.SIGTERM)
            await eventually(lambda: doors_closed(daemon))
            assert not served.done()
            os.kill(os.getpid(), signal.SIGTERM)
            assert await served == 128 + signal.SIGTERM

            with pytest.raises(aiohttp.ClientPayloadError):
                await event_stream.read()
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await anext(grpc_stream)
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE  # grpc: "Cancelling all calls"
    assert leaked == []


async def test_sigterm_reports_not_serving_before_the_listener_closes_and_for_good(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = second_daemon(cluster)
    serving_status = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    with sigterm_caught_outside_the_daemon() as leaked:
        served = await serving(daemon)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=ROUTER_SERVICE))
            assert (await watch.read()).status == serving_status
            checked_before_close: list[int] = []
            close = daemon.front_door.server.stop

            async def checked_then_closed(grace_s: float) -> None:
                # The listener still takes calls here: what a probe reads just before it closes.
                for name in ("", ROUTER_SERVICE):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                    checked_before_close.append(reply.status)
                await close(grace_s)

            monkeypatch.setattr(daemon.front_door.server, "stop", checked_then_closed)
            os.kill(os.getpid(), signal.SIGTERM)
            assert (await watch.read()).status == not_serving
            # Draining: neither a backend recovering nor a direct call turns it back.
            daemon.pool.set_health("groq-0", False, "down", None)
            await daemon.health.check_all()
            await daemon.front_door.set_serving(True)
            later, ended = await statuses_until_the_end(watch)
            assert await served == 0
    assert checked_before_close == [not_serving, not_serving]
    assert later == []
    assert ended == grpc.StatusCode.UNAVAILABLE  # cancelled once the grace is over
    assert leaked == []
