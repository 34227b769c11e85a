"""A real 1P1D split over NIXL: the decode engine uses the transferred KV.

The engines' own counters prove it: the decode engine's
``vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}`` rises by the
prompt (less at most one block, the part of the last block the decode engine
recomputes), its ``local_compute`` by at most one block, and the greedy tokens are
those of a colocated run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bench.engines.servers import VllmServer
from tests.engines.conftest import (
    Engines,
    StartRouter,
    direct,
    long_prompt,
    pd_backends,
    prompt_tokens,
    via_grpc,
    via_http,
)

BLOCK_TOKENS = 128  # vLLM's CPU block size
EXTERNAL = 'vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}'
LOCAL = 'vllm:prompt_tokens_by_source_total{source="local_compute"}'
MAX_TOKENS = 24


def counters(server: VllmServer) -> dict[str, float]:
    samples = server.metrics()
    return {name: samples.get(name, 0.0) for name in (EXTERNAL, LOCAL)}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


async def test_split_output_is_colocated_and_decode_read_the_kv(
    engines: Engines, router_for: StartRouter, report: Callable[[str], None]
) -> None:
    router = await router_for(pd_backends(engines))
    prompt = long_prompt("a")
    tokens = await prompt_tokens(engines.decode, prompt)
    before_p, before_d = counters(engines.prefill), counters(engines.decode)
    text, route = await via_grpc(router, prompt, MAX_TOKENS, "split")
    after_p, after_d = counters(engines.prefill), counters(engines.decode)

    assert (route.prefill_backend, route.decode_backend) == ("prefill-0", "decode-0")
    on_decode, on_prefill = delta(before_d, after_d), delta(before_p, after_p)
    report(f"split of a {tokens}-token prompt: prefill {on_prefill}, decode {on_decode}")
    assert on_prefill[LOCAL] == tokens
    assert tokens - BLOCK_TOKENS <= on_decode[EXTERNAL] <= tokens
    assert on_decode[LOCAL] <= BLOCK_TOKENS
    # Colocated on the prefill engine (the decode engine now caches this prompt).
    assert text == await direct(engines.prefill, prompt, MAX_TOKENS)


async def test_split_over_http_streams_the_colocated_tokens(
    engines: Engines, router_for: StartRouter
) -> None:
    router = await router_for(pd_backends(engines))
    prompt = long_prompt("b")
    before = counters(engines.decode)
    got = await via_http(router, prompt, MAX_TOKENS, chat=False, stream=True, mode="split")
    assert delta(before, counters(engines.decode))[EXTERNAL] > 0
    assert got == await direct(engines.prefill, prompt, MAX_TOKENS)


async def test_concurrent_splits_each_read_their_kv(
    engines: Engines, router_for: StartRouter, report: Callable[[str], None]
) -> None:
    router = await router_for(pd_backends(engines))
    prompts = [long_prompt(f"c{i}", lines=30 + 7 * i) for i in range(4)]
    total = sum([await prompt_tokens(engines.decode, p) for p in prompts])
    before = counters(engines.decode)
    answers = await asyncio.gather(*(via_grpc(router, p, MAX_TOKENS, "split") for p in prompts))
    moved = delta(before, counters(engines.decode))
    report(f"4 concurrent splits, {total} prompt tokens in all: decode {moved}")
    assert total - len(prompts) * BLOCK_TOKENS <= moved[EXTERNAL] <= total
    assert moved[LOCAL] <= len(prompts) * BLOCK_TOKENS
    for prompt, (text, route) in zip(prompts, answers, strict=True):
        assert route.decode_backend == "decode-0"
        assert text == await direct(engines.prefill, prompt, MAX_TOKENS)
