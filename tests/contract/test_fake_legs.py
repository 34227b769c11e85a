"""The fake engines count the legs they serve by protocol and role, so that the `peers`
bench scenario can tell a router that really split from one that did not: SGLang's
bootstrap legs and vLLM's NIXL legs, paired by their keys, and what breaks the rules."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from bench import fake_legs
from bench.fake_legs import LegCounts, check_split
from bench.fake_vllm import PREFILL_KV_REQUEST, FakeVllm

TOKENS = [" a", " b", " c"]


@pytest.fixture
async def engines() -> AsyncIterator[tuple[FakeVllm, FakeVllm]]:
    # Like the benchmark's engines: separate processes, so the decode one cannot check
    # the prefill one's parameters, and neither keeps its requests.
    pair = (
        FakeVllm(tokens=TOKENS, sglang_mode="prefill", verify_issued=False, keep_requests=False),
        FakeVllm(tokens=TOKENS, sglang_mode="decode", verify_issued=False, keep_requests=False),
    )
    for engine in pair:
        await engine.start()
    yield pair
    for engine in pair:
        await engine.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def sglang_body(room: int, **fields: Any) -> dict[str, Any]:
    """What sglang-router 0.3.2 sends both engines (recorded), with a room of our own."""
    return {
        "model": "fake",
        "prompt": "Hello Hello",
        "max_tokens": 16,
        "stream": True,
        "echo": False,
        "no_stop_trim": False,
        "ignore_eos": False,
        "skip_special_tokens": True,
        "return_hidden_states": False,
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": 8998,
        "bootstrap_room": room,
        **fields,
    }


async def post(
    session: aiohttp.ClientSession, engine: FakeVllm, body: dict[str, Any], **headers: str
) -> tuple[int, bytes]:
    url = f"http://{engine.address}/v1/completions"
    async with session.post(url, json=body, headers=headers) as response:
        return response.status, await response.read()


async def legs(session: aiohttp.ClientSession, engine: FakeVllm) -> LegCounts:
    async with session.get(f"http://{engine.address}/fake/legs") as response:
        return LegCounts.from_json(await response.json())


def texts(stream: bytes) -> str:
    events = [line[6:] for line in stream.split(b"\n\n") if line.startswith(b"data: {")]
    return "".join(json.loads(event)["choices"][0]["text"] for event in events)


async def test_sglang_legs_are_counted_by_role_and_paired_by_room(
    engines: tuple[FakeVllm, FakeVllm], session: aiohttp.ClientSession
) -> None:
    prefill, decode = engines
    for room in (1, 2**63 - 1, 12345):  # no X-Request-Id: SGLang pairs by room
        prefill_status, prefill_answer = await post(session, prefill, sglang_body(room))
        decode_status, decode_answer = await post(session, decode, sglang_body(room))
        assert (prefill_status, decode_status) == (200, 200)
        assert texts(prefill_answer) == " a"  # the prefill engine's first token
        assert texts(decode_answer) == " a b c"
    check = check_split("sglang", 3, await legs(session, prefill), await legs(session, decode))
    assert check.split, check
    assert (check.prefill_legs, check.decode_legs, check.paired) == (3, 3, True)
    assert prefill.requests == []
    assert decode.requests == []


async def test_unpaired_rooms_and_missing_legs_are_not_a_split(
    engines: tuple[FakeVllm, FakeVllm], session: aiohttp.ClientSession
) -> None:
    prefill, decode = engines
    await post(session, prefill, sglang_body(7))
    await post(session, decode, sglang_body(8))  # another room: not the same request
    counted = await legs(session, prefill), await legs(session, decode)
    paired_wrong = check_split("sglang", 1, *counted)
    assert not paired_wrong.paired
    assert not paired_wrong.split
    before_prefill, before_decode = await legs(session, prefill), await legs(session, decode)
    await post(session, decode, sglang_body(9))  # a decode leg with no prefill leg
    only_decode = check_split(
        "sglang",
        1,
        (await legs(session, prefill)).since(before_prefill),
        (await legs(session, decode)).since(before_decode),
    )
    assert (only_decode.prefill_legs, only_decode.decode_legs) == (0, 1)
    assert not only_decode.split


@pytest.mark.parametrize(
    ("fields", "rule"),
    [
        ({"bootstrap_room": -1}, "bootstrap_room"),
        ({"bootstrap_room": 2**63}, "bootstrap_room"),
        ({"bootstrap_room": "12"}, "bootstrap_room"),
        ({"bootstrap_port": "8998"}, "bootstrap_port"),
        ({"bootstrap_host": ""}, "bootstrap_host"),
        ({"kv_transfer_params": dict(PREFILL_KV_REQUEST)}, "not both"),
    ],
)
async def test_broken_bootstrap_fields_are_refused_and_counted(
    engines: tuple[FakeVllm, FakeVllm],
    session: aiohttp.ClientSession,
    fields: dict[str, Any],
    rule: str,
) -> None:
    prefill, _ = engines
    status, answer = await post(session, prefill, sglang_body(5, **fields))
    assert status == 400
    assert rule in answer.decode()
    counted = await legs(session, prefill)
    assert counted.violations == 1
    assert counted.counts[fake_legs.SGLANG_PREFILL] == 0


async def test_a_partial_bootstrap_and_an_engine_outside_sglang_mode_are_refused(
    session: aiohttp.ClientSession,
) -> None:
    plain = FakeVllm(tokens=TOKENS)
    await plain.start()
    try:
        status, answer = await post(session, plain, sglang_body(3))
        assert status == 400
        assert "not in disaggregation mode" in answer.decode()
        plain.sglang_mode = "decode"
        partial = {k: v for k, v in sglang_body(3).items() if k != "bootstrap_port"}
        status, answer = await post(session, plain, partial)
        assert status == 400
        assert "go together" in answer.decode()
        assert len(plain.violations) == 2
    finally:
        await plain.stop()


async def test_vllm_legs_are_counted_and_paired_by_remote_request_id(
    engines: tuple[FakeVllm, FakeVllm], session: aiohttp.ClientSession
) -> None:
    prefill, decode = engines
    for request_id in ("r1", "r2"):
        # vllm-router sends min_tokens 1 on its prefill leg, which vLLM accepts.
        body = {"model": "fake", "prompt": "Hello", "max_tokens": 1, "stream": False,
                "min_tokens": 1, "kv_transfer_params": dict(PREFILL_KV_REQUEST)}  # fmt: skip
        status, answer = await post(session, prefill, body, **{"X-Request-Id": request_id})
        assert status == 200
        params = json.loads(answer)["kv_transfer_params"]
        decode_body = {"model": "fake", "prompt": "Hello", "max_tokens": 16, "stream": True,
                       "kv_transfer_params": params}  # fmt: skip
        status, stream = await post(session, decode, decode_body, **{"X-Request-Id": request_id})
        assert status == 200
        assert texts(stream) == " a b c"
    status, _ = await post(
        session, decode, {"model": "fake", "prompt": "Hi", "stream": True}, **{"X-Request-Id": "d"}
    )
    assert status == 200  # straight to the decode engine: a plain leg
    check = check_split("vllm", 2, await legs(session, prefill), await legs(session, decode))
    assert (check.prefill_legs, check.decode_legs, check.paired) == (2, 2, True)
    assert check.plain_legs == 1
    assert not check.split


async def test_a_prefill_minimum_above_one_token_is_still_refused(
    engines: tuple[FakeVllm, FakeVllm], session: aiohttp.ClientSession
) -> None:
    prefill, _ = engines
    body = {"model": "fake", "prompt": "Hello", "max_tokens": 1, "stream": False,
            "min_tokens": 2, "kv_transfer_params": dict(PREFILL_KV_REQUEST)}  # fmt: skip
    status, answer = await post(session, prefill, body, **{"X-Request-Id": "r"})
    assert status == 400
    assert "min_tokens must not exceed" in answer.decode()


async def test_render_is_refused_as_vllm_does_by_default_and_counted(
    engines: tuple[FakeVllm, FakeVllm], session: aiohttp.ClientSession
) -> None:
    prefill, _ = engines
    url = f"http://{prefill.address}/v1/completions/render"
    async with session.post(url, json={"model": "fake", "prompt": "Hello"}) as response:
        assert response.status == 403
        assert "--enable-scale-out" in (await response.json())["error"]["message"]
    assert (await legs(session, prefill)).counts[fake_legs.RENDER] == 1
