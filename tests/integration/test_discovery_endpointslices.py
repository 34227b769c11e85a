"""EndpointSlice discovery against an in-process fake of the API's list and watch.

There is no Kubernetes API server on these machines: ``tests/fake_kube.py`` answers
the two calls discovery makes (list, watch from a resourceVersion, 410 Gone for a
version older than its history), and the router reaches it through a kubeconfig file,
as it would a real cluster from outside. The backends are real mock devices.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backends.base import Role
from backends.mock.config import DeviceConfig
from backends.mock.server import DeviceServer
from router.daemon import Daemon
from router.settings import PoolConfig, Settings, parse_pool
from tests.fake_kube import FakeKubeApi, endpoint_slice, pod_endpoint
from tests.helpers import eventually

MODEL = "llama-3.1-8b"
LABELS = {"hetero-router.io/role": "decode", "hetero-router.io/profile": "groq-lpu"}
ANNOTATIONS = {"hetero-router.io/model": MODEL}


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeApi]:
    fake = FakeKubeApi()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def _devices(count: int) -> list[DeviceServer]:
    devices: list[DeviceServer] = []
    for index in range(count):
        device = DeviceServer(
            DeviceConfig(backend_id=f"pod-{index}", profile="groq-lpu", model=MODEL,
                         roles=(Role.PREFILL, Role.DECODE), time_scale=0.0)
        )  # fmt: skip
        # Pods of one Service: the same port, each on its own IP.
        port = int(devices[0].address.rpartition(":")[2]) if devices else 0
        await device.start(f"127.0.0.{index + 2}:{port}")
        devices.append(device)
    return devices


def _pool(kubeconfig: Path) -> PoolConfig:
    return parse_pool(
        {"backends": [{"id": "engines", "kind": "mock",
                       "discovery": {"endpointslices": {
                           "service": "decode", "label_selector": "app=engine",
                           "port_name": "grpc", "kubeconfig": str(kubeconfig)}}}]}
    )  # fmt: skip


def _daemon(pool: PoolConfig) -> Daemon:
    settings = Settings(
        grpc_address="127.0.0.1:0", http_address="127.0.0.1:0", drain_grace_s=0.5,
        adaptive_concurrency=False, health_interval_s=0.1,
    )  # fmt: skip
    return Daemon(settings, pool)


def _slice(port: int, *pods: tuple[str, str, dict[str, bool]]) -> dict[str, object]:
    return endpoint_slice(
        "decode-abc", "decode",
        [pod_endpoint(pod, ip, **conditions) for pod, ip, conditions in pods],
        port=port, labels={"app": "engine", **LABELS}, annotations=ANNOTATIONS,
    )  # fmt: skip


async def test_ready_endpoints_join_and_terminating_ones_drain(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    devices = await _devices(2)
    port = int(devices[0].address.rpartition(":")[2])
    api.put(_slice(port, ("decode-0", "127.0.0.2", {})))
    daemon = _daemon(_pool(api.kubeconfig(tmp_path)))
    await daemon.start()
    try:
        # Listed before start-up's health checks: ready at once.
        assert set(daemon.pool.endpoints) == {"engines-decode-0"}
        endpoint = daemon.pool.endpoints["engines-decode-0"]
        assert (endpoint.config.role, endpoint.config.model, endpoint.config.profile) == (
            Role.DECODE,
            MODEL,
            "groq-lpu",
        )
        assert endpoint.config.address == f"127.0.0.2:{port}"
        assert daemon.readiness()[0]
        assert api.selectors[0] == "app=engine,kubernetes.io/service-name=decode"
        # A second pod, not ready yet: not a member; then ready: it joins and serves.
        api.put(
            _slice(port, ("decode-0", "127.0.0.2", {}), ("decode-1", "127.0.0.3", {"ready": False}))
        )
        await eventually(lambda: api.watches >= 1)
        api.put(_slice(port, ("decode-0", "127.0.0.2", {}), ("decode-1", "127.0.0.3", {})))
        await eventually(lambda: daemon.pool.in_service("engines-decode-1"))
        # The first pod terminates: it drains and leaves.
        api.put(_slice(port, ("decode-0", "127.0.0.2", {"terminating": True, "ready": False}),
                       ("decode-1", "127.0.0.3", {})))  # fmt: skip
        await eventually(lambda: "engines-decode-0" not in daemon.pool.endpoints)
        assert (
            daemon.registry.get_sample_value(
                "hetero_router_backend_healthy", {"backend": "engines-decode-0", "role": "decode"}
            )
            is None
        )
        # The slice goes: so do its backends.
        api.delete("decode-abc")
        await eventually(lambda: not daemon.pool.endpoints)
        assert not daemon.readiness()[0]
        assert api.lists == 1  # all of it through one watch
    finally:
        await daemon.stop()
        for device in devices:
            await device.stop(grace_s=0)


async def test_an_expired_watch_lists_again_and_sees_what_changed_meanwhile(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    devices = await _devices(2)
    port = int(devices[0].address.rpartition(":")[2])
    api.put(_slice(port, ("decode-0", "127.0.0.2", {})))
    daemon = _daemon(_pool(api.kubeconfig(tmp_path)))
    await daemon.start()
    try:
        await eventually(lambda: api.watches >= 1)
        # While no watch runs, a pod joins and the history it would have been told
        # from is compacted away: the next watch gets 410 Gone, and a new list.
        api.compact()
        api.cut_watches()
        api.put(_slice(port, ("decode-0", "127.0.0.2", {}), ("decode-1", "127.0.0.3", {})))
        api.compact()
        await eventually(lambda: daemon.pool.in_service("engines-decode-1"))
        assert api.lists == 2
        assert daemon.pool.in_service("engines-decode-0")
    finally:
        await daemon.stop()
        for device in devices:
            await device.stop(grace_s=0)


async def test_an_api_that_refuses_keeps_the_backends_and_is_tried_again(
    api: FakeKubeApi, tmp_path: Path
) -> None:
    devices = await _devices(1)
    port = int(devices[0].address.rpartition(":")[2])
    api.put(_slice(port, ("decode-0", "127.0.0.2", {})))
    daemon = _daemon(_pool(api.kubeconfig(tmp_path)))
    await daemon.start()
    try:
        await eventually(lambda: api.watches >= 1)
        api.refusing = True
        api.cut_watches()
        await eventually(lambda: daemon.membership.failing("engines"))
        assert set(daemon.pool.endpoints) == {"engines-decode-0"}
        assert not daemon.pool.endpoints["engines-decode-0"].draining
        # Back: listed again, and what changed meanwhile applies.
        api.refusing = False
        api.put(_slice(port, ("decode-0", "127.0.0.2", {"ready": False})))
        await eventually(lambda: not daemon.pool.endpoints, timeout_s=10)
        assert not daemon.membership.failing("engines")
    finally:
        await daemon.stop()
        for device in devices:
            await device.stop(grace_s=0)
