"""Colocated serving through the openai and vllm adapters: the engine's own greedy answer."""

from __future__ import annotations

import pytest

from tests.engines.conftest import Engines, StartRouter, backend, direct, via_grpc, via_http

PROMPT = "def parse_header(line):\n    "
MAX_TOKENS = 24


@pytest.mark.parametrize("kind", ["vllm", "openai"])
async def test_grpc_answer_is_the_engines_own(
    kind: str, engines: Engines, router_for: StartRouter
) -> None:
    router = await router_for([backend("lone", engines.decode, "both", kind=kind)])
    expected = await direct(engines.decode, PROMPT, MAX_TOKENS)
    text, route = await via_grpc(router, PROMPT, MAX_TOKENS, "colocated")
    assert text == expected
    assert route.prefill_backend == route.decode_backend == "lone"


@pytest.mark.parametrize("kind", ["vllm", "openai"])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_http_answer_is_the_engines_own(
    kind: str, chat: bool, stream: bool, engines: Engines, router_for: StartRouter
) -> None:
    router = await router_for([backend("lone", engines.decode, "both", kind=kind)])
    expected = await direct(engines.decode, PROMPT, MAX_TOKENS, chat=chat)
    got = await via_http(router, PROMPT, MAX_TOKENS, chat=chat, stream=stream, mode="colocated")
    assert got == expected
