"""The real-engine tier: vLLM's CPU build behind the router, on 127.0.0.1.

``make test-engines`` installs the engine environment (bench/engines/env.py) and runs
these tests; ``make test`` leaves them out (they carry the ``engines`` marker). One
prefill (``kv_producer``) and one decode (``kv_consumer``) server serve the whole
session; a test that kills or restarts one gets it back through ``engines`` before
the next test runs. Tests compare outputs and the engines' own counters, never
timings: on a busy 2-core machine tokens/s swings tenfold.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest

from bench.engines import env, servers
from bench.engines.servers import SERVED_MODEL, VllmServer
from router.client import AsyncRouterClient
from router.daemon import Daemon
from router.settings import BackendConfig, PoolConfig, Settings

ENGINE_TEST_TIMEOUT_S = 900  # the first test also waits for both engines to start


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks every test here ``engines``; the fault tests, which kill engines, go last."""
    here = Path(__file__).parent
    ours = [item for item in items if here in Path(str(item.fspath)).parents]
    for item in ours:
        item.add_marker(pytest.mark.engines)
        item.add_marker(pytest.mark.timeout(ENGINE_TEST_TIMEOUT_S))
    faults = [item for item in ours if "test_faults" in str(item.fspath)]
    for item in faults:
        items.remove(item)
    items.extend(faults)


@dataclass
class Engines:
    """The session's P/D pair; ``ensure`` restarts whatever a test killed."""

    prefill: VllmServer
    decode: VllmServer

    def ensure(self) -> None:
        """Restarts a dead engine and opens every gate a test left held."""
        for server in (self.prefill, self.decode):
            server.release()
        dead = [
            s
            for s in (self.prefill, self.decode)
            if s.process is None or s.process.poll() is not None
        ]
        for server in dead:
            server.stop()
            server.start()
        for server in dead:
            server.wait_ready()

    def restart(self, server: VllmServer) -> None:
        server.stop()
        server.start()
        server.wait_ready()


@pytest.fixture(scope="session")
def engine_logs() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hetero-router-engines-") as folder:
        yield Path(folder)


@pytest.fixture(scope="session")
def _engine_pair(engine_logs: Path) -> Iterator[Engines]:
    try:
        model = env.ensure_model()
    except env.EngineEnvMissingError as missing:
        pytest.fail(str(missing), pytrace=False)
    # gated: a test holds an engine still mid-request (VllmServer.hold_after) while a
    # client goes away or before it kills the engine.
    prefill = servers.vllm_server("prefill", model, engine_logs, kv_role="kv_producer", gated=True)
    decode = servers.vllm_server("decode", model, engine_logs, kv_role="kv_consumer", gated=True)
    with servers.running(prefill, decode):
        yield Engines(prefill, decode)


@pytest.fixture
def engines(_engine_pair: Engines) -> Engines:
    _engine_pair.ensure()
    return _engine_pair


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """``report(line)``: prints a measured figure into the run's output, uncaptured."""

    def write(line: str) -> None:
        with capsys.disabled():
            print(f"\n  [figure] {line}", flush=True)

    return write


@dataclass
class Router:
    daemon: Daemon
    client: AsyncRouterClient
    http: aiohttp.ClientSession

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.http_port}"


def backend(
    backend_id: str, server: VllmServer, role: str, kind: str = "vllm", **options: Any
) -> BackendConfig:
    return BackendConfig(
        id=backend_id,
        kind=kind,
        address=server.address,
        role=role,  # type: ignore[arg-type]  # validated by pydantic
        model=SERVED_MODEL,
        profile="h100",
        options=options,
    )


class StartRouter(Protocol):
    async def __call__(self, backends: Sequence[BackendConfig], **settings: Any) -> Router: ...


@pytest.fixture
async def router_for() -> AsyncIterator[StartRouter]:
    """``await router_for(backends, **settings)``: an in-process router in front of them."""
    started: list[Router] = []

    async def start(backends: Sequence[BackendConfig], **settings: Any) -> Router:
        config = Settings(
            grpc_address="127.0.0.1:0",
            http_address="127.0.0.1:0",
            drain_grace_s=0.5,
            # A busy CPU engine answers /health late; one slow answer is not a failure.
            health_timeout_s=10.0,
            health_unhealthy_threshold=5,
            # The split tests check that the KV moved: a slow first token on a busy
            # machine must not turn a split colocated, nor a CPU engine busy with
            # another prompt's prefill count as stalled. Fault tests set their own.
            **{"handoff_timeout_s": 300.0, "stall_timeout_s": 120.0, **settings},
        )
        daemon = Daemon(config, PoolConfig(backends=tuple(backends), default_model=SERVED_MODEL))
        await daemon.start()
        router = Router(
            daemon,
            AsyncRouterClient(f"127.0.0.1:{daemon.grpc_port}", timeout_s=300),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)),
        )
        started.append(router)
        return router

    yield start
    for router in started:
        await router.client.close()
        await router.http.close()
        await router.daemon.stop()


def pd_backends(engines: Engines) -> list[BackendConfig]:
    """The session's pair as the router's prefill and decode backends."""
    return [
        backend("prefill-0", engines.prefill, "prefill"),
        backend("decode-0", engines.decode, "decode"),
    ]


def long_prompt(tag: str, lines: int = 60) -> str:
    """About 15 tokens a line; ``tag`` makes it unlike any prompt cached before."""
    return "\n".join(f"def handler_{tag}_{i}(request): return request.json()" for i in range(lines))


async def prompt_tokens(server: VllmServer, prompt: str) -> int:
    """The prompt's tokens, counted by the engine's own tokenizer."""
    reply = await asyncio.to_thread(
        server.post_json, "/tokenize", {"model": SERVED_MODEL, "prompt": prompt}
    )
    return int(reply["count"])


async def direct(server: VllmServer, prompt: str, max_tokens: int, *, chat: bool = False) -> str:
    """The engine's own greedy answer, asked straight, without the router."""
    body: dict[str, Any] = {"model": SERVED_MODEL, "max_tokens": max_tokens, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session,
        session.post(server.url + path, json=body) as answer,
    ):
        assert answer.status == 200, await answer.text()
        reply = await answer.json()
    choice = reply["choices"][0]
    return str(choice["message"]["content"] if chat else choice["text"])


async def via_grpc(router: Router, prompt: str, max_tokens: int, mode: str) -> tuple[str, Any]:
    """The router's answer over gRPC: (text, route of the first message)."""
    text, route = [], None
    async for message in router.client.generate(
        prompt, max_tokens=max_tokens, temperature=0.0, disaggregation=mode
    ):
        if route is None and message.HasField("route"):
            route = message.route
        text.append(message.text)
    return "".join(text), route


async def via_http(
    router: Router, prompt: str, max_tokens: int, *, chat: bool, stream: bool, mode: str = "auto"
) -> str:
    """The router's answer over its OpenAI-compatible door."""
    body: dict[str, Any] = {
        "model": SERVED_MODEL,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "disaggregation": mode,
    }
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with router.http.post(router.http_url + path, json=body) as answer:
        assert answer.status == 200, await answer.text()
        if not stream:
            choice = (await answer.json())["choices"][0]
            return str(choice["message"]["content"] if chat else choice["text"])
        parts = []
        async for line in answer.content:
            data = line.decode().strip().removeprefix("data: ")
            if not data or data == "[DONE]":
                continue
            for choice in json.loads(data).get("choices", []):
                piece = choice.get("delta", {}).get("content") if chat else choice.get("text")
                parts.append(piece or "")
        return "".join(parts)
