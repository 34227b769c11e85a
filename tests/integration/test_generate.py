"""The whole path on real sockets: client -> router -> mock devices -> client."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import Role
from router.client import AsyncRouterClient
from tests.conftest import Cluster, start_cluster, stop_cluster
from tests.helpers import eventually

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Disaggregated serving splits prefill and decode: " * 12,
    "Unicode too: héllo wörld, 你好, ✓",
]


async def collect(
    client: AsyncRouterClient, prompt: str, **options: object
) -> list[router_pb2.GenerateResponse]:
    return [response async for response in client.generate(prompt, **options)]


def token_ids(responses: list[router_pb2.GenerateResponse]) -> list[int]:
    return [token for response in responses for token in response.token_ids]


def text(responses: list[router_pb2.GenerateResponse]) -> str:
    return "".join(response.text for response in responses)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.9, "seed": 1234}],
    ids=["greedy", "seeded"],
)
async def test_split_gives_exactly_the_tokens_of_colocated(
    cluster: Cluster, prompt: str, sampling: dict[str, float]
) -> None:
    split = await collect(cluster.client, prompt, max_tokens=24, disaggregation="split", **sampling)
    colocated = await collect(
        cluster.client, prompt, max_tokens=24, disaggregation="colocated", **sampling
    )
    assert split[0].route.mode == router_pb2.ROUTE_MODE_SPLIT
    assert split[0].route.prefill_backend.startswith("h100")
    assert split[0].route.decode_backend.startswith("groq")
    assert colocated[0].route.mode == router_pb2.ROUTE_MODE_COLOCATED
    assert token_ids(split) == token_ids(colocated)
    assert text(split) == text(colocated)
    assert split[-1].finish_reason == colocated[-1].finish_reason != 0
    assert split[-1].usage == colocated[-1].usage
    assert split[-1].usage.completion_tokens == len(token_ids(split)) or (
        split[-1].finish_reason == router_pb2.FINISH_REASON_STOP
    )


async def test_router_picks_a_seed_and_reports_it(cluster: Cluster) -> None:
    first = await collect(cluster.client, "seedless", max_tokens=16, disaggregation="split")
    seed = first[0].route.seed
    again = await collect(
        cluster.client, "seedless", max_tokens=16, disaggregation="colocated", seed=seed
    )
    assert token_ids(first) == token_ids(again)


async def test_first_message_carries_route_and_last_carries_finish(cluster: Cluster) -> None:
    responses = await collect(
        cluster.client, "route please", max_tokens=8, temperature=0, request_id="req-42"
    )
    assert responses[0].route.request_id == "req-42"
    assert all(not r.HasField("route") for r in responses[1:])
    assert all(r.finish_reason == 0 for r in responses[:-1])
    assert responses[-1].finish_reason in (
        router_pb2.FINISH_REASON_LENGTH,
        router_pb2.FINISH_REASON_STOP,
    )


async def test_auto_splits_long_prompts_and_colocates_short_ones() -> None:
    cluster = await start_cluster(decider="prompt-length", split_min_prompt_tokens=64)
    try:
        short = await collect(cluster.client, "short", max_tokens=4)
        long = await collect(cluster.client, "x" * 200, max_tokens=4)
        assert short[0].route.mode == router_pb2.ROUTE_MODE_COLOCATED
        assert short[0].route.decode_backend.startswith("groq")
        assert long[0].route.mode == router_pb2.ROUTE_MODE_SPLIT
    finally:
        await stop_cluster(cluster)


async def test_max_tokens_one_is_served_by_prefill_alone(cluster: Cluster) -> None:
    responses = await collect(
        cluster.client, "one token", max_tokens=1, temperature=0, disaggregation="split"
    )
    assert len(token_ids(responses)) <= 1
    assert responses[-1].usage.completion_tokens == 1
    assert cluster.devices["groq-0"].requests_received == 0
    assert cluster.devices["groq-1"].requests_received == 0


async def test_stop_string_ends_generation_identically_in_both_modes(cluster: Cluster) -> None:
    prompt = PROMPTS[1]
    free = text(await collect(cluster.client, prompt, max_tokens=40, temperature=0))
    stop = free[10:13]
    assert len(stop) == 3, "the greedy output is too short to pick a stop string from"
    for mode in ("split", "colocated"):
        responses = await collect(
            cluster.client, prompt, max_tokens=40, temperature=0, stop=[stop], disaggregation=mode
        )
        assert text(responses) == free[: free.index(stop)]
        assert responses[-1].finish_reason == router_pb2.FINISH_REASON_STOP


async def test_tokens_stream_while_decode_is_still_running() -> None:
    # At a real time scale the decode device takes ~1 ms per token, so the client
    # sees early frames while the device still holds the request: nothing is buffered.
    cluster = await start_cluster(time_scale=1.0)
    try:
        seen_running = []
        count = 0
        async for response in cluster.client.generate(
            "stream me", max_tokens=200, temperature=0, disaggregation="split"
        ):
            count += len(response.token_ids)
            if count in (2, 3, 4):
                seen_running.append(sum(d.engine.load().running for d in cluster.devices.values()))
        assert seen_running
        assert all(running >= 1 for running in seen_running)
    finally:
        await stop_cluster(cluster)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompt": ""}, "prompt must not be empty"),
        ({"max_tokens": 0}, "max_tokens must be between 1 and 4096"),
        ({"max_tokens": 100_000}, "max_tokens must be between 1 and 4096"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"model": "gpt-17"}, "unknown model 'gpt-17'"),
        ({"stop": [""]}, "stop string"),
        ({"request_id": "x" * 500}, "request_id must be at most 128"),
    ],
)
async def test_bad_input_is_invalid_argument_and_reaches_no_backend(
    cluster: Cluster, options: dict[str, object], message: str
) -> None:
    prompt = str(options.pop("prompt", "hello"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(cluster.client, prompt, **options)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (raised.value.details() or "")
    assert all(device.requests_received == 0 for device in cluster.devices.values())


async def test_prompt_over_the_limit_is_refused() -> None:
    cluster = await start_cluster(max_prompt_tokens=100)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await collect(cluster.client, "y" * 101)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "limit is 100" in (raised.value.details() or "")
    finally:
        await stop_cluster(cluster)


async def test_cancelling_the_client_aborts_the_backends() -> None:
    cluster = await start_cluster(time_scale=1.0)
    try:
        call = cluster.client.generate(
            "cancel me", max_tokens=4000, temperature=0, disaggregation="split"
        )
        received = 0
        async for response in call:
            received += len(response.token_ids)
            if received >= 3:
                break
        await call.aclose()
        assert any(used for used, _ in cluster.kv_in_use().values())
        await eventually(lambda: all(v == (0, 0) for v in cluster.kv_in_use().values()))
        await eventually(
            lambda: all(view.outstanding == 0 for view in cluster.daemon.pool.snapshot().backends)
        )
    finally:
        await stop_cluster(cluster)


async def test_no_healthy_decode_backend_is_unavailable(cluster: Cluster) -> None:
    for name in ("groq-0", "groq-1"):
        await cluster.devices[name].stop(grace_s=0)
    await cluster.daemon.health.check_all()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(cluster.client, "anyone there?", disaggregation="split")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "0 healthy decode" in (raised.value.details() or "")
    ready, detail = cluster.daemon.readiness()
    assert not ready
    assert "llama-3.1-8b" in detail


async def test_failed_prefill_falls_back_to_local_prefill_on_decode() -> None:
    layout = [("h100-0", "prefill", "h100"), ("groq-0", "decode", "groq-lpu")]
    cluster = await start_cluster([(i, Role(r), p) for i, r, p in layout])
    try:
        # The prefill device dies after the last health check: the router still picks it.
        await cluster.devices["h100-0"].stop(grace_s=0)
        responses = await collect(
            cluster.client, "fallback", max_tokens=6, temperature=0, disaggregation="split"
        )
        assert responses[0].route.mode == router_pb2.ROUTE_MODE_COLOCATED
        assert responses[0].route.decode_backend == "groq-0"
        assert responses[-1].finish_reason != 0
    finally:
        await stop_cluster(cluster)


async def test_list_backends_reports_the_pool(cluster: Cluster) -> None:
    listing = await cluster.client.list_backends()
    by_id = {backend.id: backend for backend in listing.backends}
    assert set(by_id) == {"h100-0", "h100-1", "groq-0", "groq-1"}
    assert by_id["h100-0"].role == router_pb2.BACKEND_ROLE_PREFILL
    assert by_id["groq-1"].role == router_pb2.BACKEND_ROLE_DECODE
    assert by_id["groq-1"].profile == "groq-lpu"
    assert all(backend.healthy for backend in listing.backends)
    # Load as the scheduler sees it: an idle pool, the devices' KV and the model's size.
    assert all(b.queued_prefill_tokens == 0 and b.running == 0 for b in listing.backends)
    assert all(b.kv_tokens_capacity > 0 for b in listing.backends)
    assert by_id["h100-0"].chips == 1  # one H100 holds Llama-3.1-8B
    assert by_id["groq-0"].chips > 1


async def test_cancelling_during_prefill_frees_everything() -> None:
    cluster = await start_cluster(time_scale=1.0)
    try:
        # ~8k tokens on an emulated H100 take a few hundred modelled milliseconds.
        prompt = "p" * 8000
        task = asyncio.create_task(
            collect(cluster.client, prompt, max_tokens=64, disaggregation="split")
        )
        await eventually(lambda: any(used for used, _ in cluster.kv_in_use().values()))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: all(v == (0, 0) for v in cluster.kv_in_use().values()))
        assert all(d.engine.load().running == 0 for d in cluster.devices.values())
    finally:
        await stop_cluster(cluster)


async def test_shutdown_lets_in_flight_streams_finish() -> None:
    cluster = await start_cluster(time_scale=1.0, drain_grace_s=10.0)
    try:
        stream = cluster.client.generate("drain", max_tokens=150, temperature=0)
        first = await anext(stream)
        stopping = asyncio.create_task(cluster.daemon.stop())
        rest = [response async for response in stream]
        await stopping
        assert first.route.request_id
        assert rest[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH
        assert rest[-1].usage.completion_tokens == 150
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await collect(cluster.client, "too late", max_tokens=2)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_cluster(cluster)


async def test_split_equals_colocated_while_devices_batch_other_requests(cluster: Cluster) -> None:
    # Devices batch every running sequence into one decode step; a sequence's
    # tokens must not depend on which neighbours it was batched with.
    prompts = [f"concurrent prompt {i} " * (i + 1) for i in range(12)]

    async def both(prompt: str) -> tuple[list[int], list[int]]:
        options = {"max_tokens": 20, "temperature": 0.8, "seed": 99}
        split, colocated = await asyncio.gather(
            collect(cluster.client, prompt, disaggregation="split", **options),
            collect(cluster.client, prompt, disaggregation="colocated", **options),
        )
        return token_ids(split), token_ids(colocated)

    results = await asyncio.gather(*(both(p) for p in prompts))
    for split, colocated in results:
        assert split == colocated
        assert len(split) == 20


async def test_a_lost_kv_lease_is_recomputed_on_decode_with_the_same_tokens() -> None:
    # Prefill devices drop their KV at once: every decode pull finds nothing and the
    # decode device prefills locally, yielding exactly the tokens of a colocated run.
    cluster = await start_cluster(device_options={"kv_lease_s": 0.0})
    try:
        options = {"max_tokens": 12, "temperature": 0.8, "seed": 5}
        split = await collect(cluster.client, "lost lease", disaggregation="split", **options)
        colocated = await collect(
            cluster.client, "lost lease", disaggregation="colocated", **options
        )
        assert split[0].route.mode == router_pb2.ROUTE_MODE_SPLIT
        assert token_ids(split) == token_ids(colocated)
        assert sum(d.kv_recomputes for d in cluster.devices.values()) == 1
        assert all(v == (0, 0) for v in cluster.kv_in_use().values())
    finally:
        await stop_cluster(cluster)
