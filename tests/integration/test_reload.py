"""Hot reload: a changed pool or policy file, or SIGHUP, applies without dropping a
stream; a bad new file is refused with one log line and the old one stays."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import structlog
import yaml

from backends.base import Role
from backends.mock.config import DeviceConfig
from backends.mock.server import DeviceServer
from router.client import AsyncRouterClient
from router.daemon import Daemon
from router.settings import Settings, load_pool
from tests.helpers import GatedClock, Stream, eventually

MODEL = "llama-3.1-8b"
POLICY = Path(__file__).parents[2] / "router" / "defaults" / "policy.yaml"


async def _device(backend_id: str, clock: GatedClock | None = None) -> DeviceServer:
    device = DeviceServer(
        DeviceConfig(backend_id=backend_id, profile="groq-lpu", model=MODEL,
                     roles=(Role.PREFILL, Role.DECODE), time_scale=0.0),
        clock=clock,
    )  # fmt: skip
    await device.start("127.0.0.1:0")
    return device


def _entry(backend_id: str, device: DeviceServer) -> dict[str, object]:
    # (No publisher listens at the events' endpoint: a ZMQ subscriber just waits.)
    return {"id": backend_id, "address": device.address, "role": "decode", "model": MODEL,
            "profile": "groq-lpu", "kv_events": {"endpoint": "tcp://127.0.0.1:9"}}  # fmt: skip


def _write(path: Path, text: str) -> None:
    """Writes as a ConfigMap volume does: a new folder, then the ``..data`` link swapped."""
    folder = path.parent / f"..2026_{len(list(path.parent.glob('..2026_*')))}"
    folder.mkdir()
    (folder / path.name).write_text(text)
    data = path.parent / "..data"
    temporary = path.parent / "..data_tmp"
    temporary.symlink_to(folder.name)
    temporary.replace(data)
    if not path.is_symlink():
        path.symlink_to(Path("..data") / path.name)


def _pool_text(*entries: dict[str, object]) -> str:
    return yaml.safe_dump({"backends": list(entries)})


async def _consume(client: AsyncRouterClient, stream: Stream, **sampling: object) -> None:
    async for message in client.generate("a prompt", temperature=0, **sampling):
        stream.messages.append(message)


class Running:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.client = AsyncRouterClient(f"127.0.0.1:{daemon.grpc_port}", timeout_s=30)


@pytest.fixture
async def devices() -> AsyncIterator[dict[str, tuple[DeviceServer, GatedClock]]]:
    """Devices a and b; a's clock is held (the test steps it or opens it), b's runs."""
    made = {}
    for name in ("a", "b"):
        clock = GatedClock()
        if name == "b":
            clock.open()
        made[name] = (await _device(f"pod-{name}", clock), clock)
    try:
        yield made
    finally:
        for device, clock in made.values():
            clock.open()
            await device.stop(grace_s=0)


async def _start(folder: Path, pool_text: str, **settings: object) -> Running:
    pool_file = folder / "pool.yaml"
    _write(pool_file, pool_text)
    options: dict[str, object] = {
        "grpc_address": "127.0.0.1:0", "http_address": "127.0.0.1:0", "drain_grace_s": 0.5,
        "adaptive_concurrency": False, "health_interval_s": 0.1,
        "config_reload_interval_s": 0.05, "backend_drain_timeout_s": 60, **settings,
    }  # fmt: skip
    daemon = Daemon(Settings(**options), load_pool(pool_file), pool_file=pool_file)  # type: ignore[arg-type]  # validated
    await daemon.start()
    return Running(daemon)


async def test_a_changed_pool_file_swaps_backends_while_a_stream_runs(
    tmp_path: Path, devices: dict[str, tuple[DeviceServer, GatedClock]]
) -> None:
    (a, a_clock), (b, _) = devices["a"], devices["b"]
    running = await _start(tmp_path, _pool_text(_entry("a", a)))
    daemon = running.daemon
    try:
        await eventually(lambda: daemon.pool.in_service("a"))
        stream = Stream()
        task = asyncio.create_task(_consume(running.client, stream, max_tokens=20))
        a_clock.step(5)
        await eventually(lambda: len(stream.token_ids) >= 2)
        # The ConfigMap now names b instead of a: b joins, a drains.
        _write(tmp_path / "pool.yaml", _pool_text(_entry("b", b)))
        await eventually(lambda: daemon.pool.in_service("b"))
        assert daemon.pool.endpoints["a"].draining
        after = Stream()
        await _consume(running.client, after, max_tokens=3)
        assert after.route.decode_backend == "b"
        a_clock.open()
        await asyncio.wait_for(task, 30)
        assert len(stream.token_ids) == 20
        assert stream.route.decode_backend == "a"
        await eventually(lambda: "a" not in daemon.pool.endpoints)
        # KV cache events follow membership: b's subscribed since it joined, a's gone.
        assert set(daemon.pool.kv_events.subscriptions) == {"b"}
    finally:
        a_clock.open()
        await running.client.close()
        await daemon.stop()


async def test_a_bad_pool_file_is_refused_and_the_old_pool_keeps_serving(
    tmp_path: Path,
    devices: dict[str, tuple[DeviceServer, GatedClock]],
) -> None:
    a, a_clock = devices["a"]
    a_clock.open()
    running = await _start(tmp_path, _pool_text(_entry("a", a)))
    daemon = running.daemon
    try:
        await eventually(lambda: daemon.pool.in_service("a"))
        for bad, said in (
            ("backends: [", "is not valid YAML"),
            (_pool_text({**_entry("a", a), "address": "nowhere"}), "backends[0].address"),
            (_pool_text({**_entry("a", a), "kind": "tpu-magic"}), "unknown backend kind"),
        ):
            _write(tmp_path / "pool.yaml", bad)
            with structlog.testing.capture_logs() as logs:
                assert not await daemon.reload()
            refusals = [e for e in logs if e["event"] == "pool file refused: the old one stays"]
            assert len(refusals) == 1
            assert said in refusals[0]["error"]
            assert set(daemon.pool.endpoints) == {"a"}
            assert daemon.pool.in_service("a")
        stream = Stream()
        await _consume(running.client, stream, max_tokens=3)
        assert stream.route.decode_backend == "a"
    finally:
        await running.client.close()
        await daemon.stop()


async def test_a_changed_policy_file_swaps_the_scheduler(
    tmp_path: Path, devices: dict[str, tuple[DeviceServer, GatedClock]]
) -> None:
    a, a_clock = devices["a"]
    a_clock.open()
    policy = yaml.safe_load(POLICY.read_text())
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump({"profiles": {"default": policy["profiles"]["default"]}}))
    running = await _start(tmp_path, _pool_text(_entry("a", a)), policy_file=policy_file)
    daemon = running.daemon
    try:
        await eventually(lambda: daemon.pool.in_service("a"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _consume(running.client, Stream(), max_tokens=2, slo_class="batch")
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        # A bad policy is refused: the old one stays.
        policy_file.write_text("profiles: {batch: {picker: no-such-picker}}")
        assert not await daemon.reload()
        assert daemon.dispatcher.slo_classes == frozenset({"default"})
        # A good one with a batch class: applies within a poll.
        policy_file.write_text(POLICY.read_text())
        await eventually(lambda: "batch" in daemon.dispatcher.slo_classes)
        stream = Stream()
        await _consume(running.client, stream, max_tokens=2, slo_class="batch")
        assert len(stream.token_ids) == 2
        assert (
            daemon.registry.get_sample_value(
                "hetero_router_shed_total", {"model": MODEL, "slo_class": "batch", "reason": "slo"}
            )
            == 0
        )
    finally:
        await running.client.close()
        await daemon.stop()


async def test_sighup_reloads(
    tmp_path: Path, devices: dict[str, tuple[DeviceServer, GatedClock]]
) -> None:
    (a, a_clock), (b, _) = devices["a"], devices["b"]
    a_clock.open()
    # No polling: only the signal reloads.
    pool_file = tmp_path / "pool.yaml"
    _write(pool_file, _pool_text(_entry("a", a)))
    settings = Settings(
        grpc_address="127.0.0.1:0", http_address="127.0.0.1:0", drain_grace_s=0.5,
        adaptive_concurrency=False, health_interval_s=0.1, config_reload_interval_s=0,
    )  # fmt: skip
    daemon = Daemon(settings, load_pool(pool_file), pool_file=pool_file)
    serving = asyncio.create_task(daemon.serve())
    try:
        await asyncio.wait_for(daemon.started.wait(), 30)
        _write(pool_file, _pool_text(_entry("a", a), _entry("b", b)))
        os.kill(os.getpid(), signal.SIGHUP)  # the handler serve() installed
        await eventually(lambda: daemon.pool.in_service("b"))
        assert daemon.pool.in_service("a")
    finally:
        daemon.handle_exit(signal.SIGTERM)
        assert await asyncio.wait_for(serving, 30) == 0


async def test_a_stream_outlasting_the_drain_timeout_migrates_with_the_same_tokens(
    tmp_path: Path, devices: dict[str, tuple[DeviceServer, GatedClock]]
) -> None:
    (a, a_clock), (b, _) = devices["a"], devices["b"]
    running = await _start(tmp_path, _pool_text(_entry("a", a)), backend_drain_timeout_s=0.3)
    daemon = running.daemon
    try:
        await eventually(lambda: daemon.pool.in_service("a"))
        stream = Stream()
        task = asyncio.create_task(_consume(running.client, stream, max_tokens=16))
        a_clock.step(4)
        await eventually(lambda: len(stream.token_ids) >= 2)
        _write(tmp_path / "pool.yaml", _pool_text(_entry("b", b)))
        # a never moves again: after the drain timeout its stream fails over to b.
        await asyncio.wait_for(task, 30)
        assert stream.route.decode_backend == "a"
        assert (
            daemon.registry.get_sample_value("hetero_router_retries_total", {"kind": "migration"})
            == 1
        )
        await eventually(lambda: "a" not in daemon.pool.endpoints)
        # Greedy: b alone gives the same tokens (every device has the same weights).
        expected = Stream()
        await _consume(running.client, expected, max_tokens=16)
        assert expected.route.decode_backend == "b"
        assert stream.token_ids == expected.token_ids
    finally:
        a_clock.open()
        await running.client.close()
        await daemon.stop()


async def test_a_backend_whose_settings_changed_drains_then_joins_again_with_them(
    tmp_path: Path, devices: dict[str, tuple[DeviceServer, GatedClock]]
) -> None:
    (a, a_clock), (b, _) = devices["a"], devices["b"]
    a_clock.open()
    running = await _start(tmp_path, _pool_text(_entry("x", a)))
    daemon = running.daemon
    try:
        await eventually(lambda: daemon.pool.in_service("x"))
        # The same id at b's address: the old x drains and goes, the new one joins.
        assert await daemon.reload() is True  # unchanged: nothing to do
        _write(tmp_path / "pool.yaml", _pool_text(_entry("x", b)))
        await eventually(
            lambda: (
                "x" in daemon.pool.endpoints
                and daemon.pool.endpoints["x"].config.address == b.address
                and daemon.pool.in_service("x")
            )
        )
        stream = Stream()
        await _consume(running.client, stream, max_tokens=2)
        assert b.requests_received == 1
        assert a.requests_received == 0
    finally:
        await running.client.close()
        await daemon.stop()
