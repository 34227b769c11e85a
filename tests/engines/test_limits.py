"""Requests the engine would refuse are the client's fault: INVALID_ARGUMENT / 400, once."""

from __future__ import annotations

import grpc
import pytest

from bench.engines.servers import MAX_MODEL_LEN, VllmServer
from tests.engines.conftest import (
    Engines,
    StartRouter,
    backend,
    pd_backends,
    prompt_tokens,
    via_grpc,
)

REQUESTS_TOTAL = "vllm:request_success_total"


def over_long_prompt() -> str:
    """More tokens than the engine's max_model_len, fewer bytes than the router's own limit."""
    return " ".join(f"{i * 7919 % 100003}" for i in range(700))  # ~4100 bytes, ~3200 tokens


def engine_requests(server: VllmServer) -> float:
    """Requests the engine finished, whatever their finish reason."""
    return sum(v for k, v in server.metrics().items() if k.startswith(REQUESTS_TOTAL))


@pytest.mark.parametrize("mode", ["split", "colocated"])
async def test_over_long_prompt_is_refused_before_any_leg(
    mode: str, engines: Engines, router_for: StartRouter
) -> None:
    prompt = over_long_prompt()
    assert await prompt_tokens(engines.decode, prompt) > MAX_MODEL_LEN
    router = await router_for(pd_backends(engines))
    before = engine_requests(engines.prefill) + engine_requests(engines.decode)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await via_grpc(router, prompt, 16, mode)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert str(MAX_MODEL_LEN) in (refused.value.details() or "")

    async with router.http.post(
        router.http_url + "/v1/completions",
        json={"model": "tiny-llama", "prompt": prompt, "max_tokens": 16, "disaggregation": mode},
    ) as answer:
        assert answer.status == 400
        error = (await answer.json())["error"]
    assert str(MAX_MODEL_LEN) in error["message"]
    assert engine_requests(engines.prefill) + engine_requests(engines.decode) == before


async def test_engine_refusal_is_invalid_argument_not_unavailable(
    engines: Engines, router_for: StartRouter
) -> None:
    """The openai adapter knows no limit: the engine's own 400 must reach the client as 400."""
    router = await router_for([backend("lone", engines.decode, "both", kind="openai")])
    too_many = MAX_MODEL_LEN + 100  # vLLM refuses max_tokens beyond its context
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await via_grpc(router, "def f():", too_many, "colocated")
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    async with router.http.post(
        router.http_url + "/v1/completions",
        json={"model": "tiny-llama", "prompt": "def f():", "max_tokens": too_many},
    ) as answer:
        assert answer.status == 400, await answer.text()
