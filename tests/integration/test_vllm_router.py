"""The router's two doors in front of fake vLLM engines: a request over an engine's
context length is refused before any leg is sent, and what an engine refuses as invalid
anyway reaches the client as the client's fault, once, with the engine's own words."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest

from bench.fake_vllm import FakeVllm, Recorded
from router.client import AsyncRouterClient
from router.daemon import Daemon
from tests.helpers import vllm_split_router

MODEL = "llama-3.1-8b"
SERVED_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SIX_WORDS = "one two three four five six"  # six tokens to the fake's tokenizer


@dataclass
class Router:
    daemon: Daemon
    client: AsyncRouterClient
    prefill_engine: FakeVllm
    decode_engine: FakeVllm

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.http_port}"


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    """A prefill and a decode engine; the decode one also serves colocated requests."""
    async with vllm_split_router(MODEL, SERVED_MODEL) as (daemon, prefill, decode):
        client = AsyncRouterClient(f"127.0.0.1:{daemon.grpc_port}", timeout_s=30)  # retries on
        try:
            yield Router(daemon, client, prefill, decode)
        finally:
            await client.close()


def generation_legs(engine: FakeVllm) -> list[Recorded]:
    return [r for r in engine.requests if r.path.endswith("/completions")]


async def grpc_failure(router: Router, prompt: str, **options: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        _ = [response async for response in router.client.generate(prompt, **options)]
    return raised.value


async def http_failure(router: Router, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{router.http_url}/v1/completions", json={"model": MODEL, **body}) as reply,
    ):
        error: dict[str, Any] = (await reply.json())["error"]
        return reply.status, error


def shrink_context(router: Router, max_model_len: int) -> None:
    """Engines restarted with a shorter context. The adapters read 131072 at the router's
    start-up and learn the new value only at the next health check: until then only the
    engines know."""
    for engine in (router.prefill_engine, router.decode_engine):
        engine.max_model_len = max_model_len


def serving_engines(router: Router, disaggregation: str) -> tuple[FakeVllm, FakeVllm]:
    """The engine a request's first leg goes to, and the other one."""
    if disaggregation == "split":
        return router.prefill_engine, router.decode_engine
    return router.decode_engine, router.prefill_engine  # the decode backend colocates


@pytest.mark.parametrize("disaggregation", ["split", "colocated"])
async def test_a_prompt_over_the_context_is_refused_before_any_leg_over_grpc(
    router: Router, disaggregation: str
) -> None:
    shrink_context(router, 6)  # the prompt leaves no room for an output token
    await router.daemon.health.check_all()  # the adapters read the new limit

    error = await grpc_failure(router, SIX_WORDS, max_tokens=4, disaggregation=disaggregation)

    first, other = serving_engines(router, disaggregation)
    backend_id = "p" if first is router.prefill_engine else "d"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"backend {backend_id}: prompt is 6 tokens, max_model_len is 6: no room for an output token"
    )
    assert len(first.calls("/tokenize")) == 1  # counted once: the client did not retry
    assert generation_legs(first) == generation_legs(other) == []


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("disaggregation", ["split", "colocated"])
async def test_a_prompt_over_the_context_is_refused_before_any_leg_over_http(
    router: Router, disaggregation: str, stream: bool
) -> None:
    shrink_context(router, 6)
    await router.daemon.health.check_all()
    body = {"prompt": SIX_WORDS, "max_tokens": 4, "stream": stream}

    status, error = await http_failure(router, {**body, "disaggregation": disaggregation})

    assert status == 400
    assert error["type"] == "invalid_request_error"
    assert error["message"].endswith(
        "prompt is 6 tokens, max_model_len is 6: no room for an output token"
    )
    legs = generation_legs(router.prefill_engine) + generation_legs(router.decode_engine)
    assert legs == []


async def test_a_prompt_that_fits_is_served_without_a_count(router: Router) -> None:
    responses = [r async for r in router.client.generate(SIX_WORDS, disaggregation="split")]
    assert "".join(r.text for r in responses) == "Hello, world!"
    assert router.prefill_engine.calls("/tokenize") == router.decode_engine.calls("/tokenize")
    assert router.prefill_engine.calls("/tokenize") == []


@pytest.mark.parametrize("disaggregation", ["split", "colocated"])
async def test_an_engine_refusing_the_request_is_invalid_argument_and_never_retried(
    router: Router, disaggregation: str
) -> None:
    shrink_context(router, 5)  # the prompt alone is over it: vLLM answers 400

    error = await grpc_failure(router, SIX_WORDS, max_tokens=4, disaggregation=disaggregation)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum context length is 5 tokens" in (error.details() or "")
    assert "at least 6 input tokens" in (error.details() or "")
    refusing, other = serving_engines(router, disaggregation)
    # Sent once: neither the client's retries nor a colocated fallback sent it again.
    assert len(generation_legs(refusing)) == 1
    assert generation_legs(other) == []


async def test_an_engine_failure_is_still_unavailable_and_retried(router: Router) -> None:
    # The other side of the rule above, and the proof that the client does retry.
    router.decode_engine.decode_status = 503
    error = await grpc_failure(router, SIX_WORDS, max_tokens=4, disaggregation="colocated")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert len(generation_legs(router.decode_engine)) == 3  # the client's max_attempts


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("disaggregation", ["split", "colocated"])
async def test_http_clients_get_a_400_with_the_engines_message(
    router: Router, disaggregation: str, stream: bool
) -> None:
    shrink_context(router, 8)  # the prompt fits; max_tokens is beyond the context
    body = {"prompt": SIX_WORDS, "max_tokens": 9, "stream": stream}

    status, error = await http_failure(router, {**body, "disaggregation": disaggregation})

    assert status == 400
    assert error["type"] == "invalid_request_error"
    assert "max_tokens=9 cannot be greater than max_model_len=8" in error["message"]
    legs = generation_legs(router.prefill_engine) + generation_legs(router.decode_engine)
    # A split's prefill leg asks for one token and fits; its decode leg is the one refused.
    assert len(legs) == (2 if disaggregation == "split" else 1)
