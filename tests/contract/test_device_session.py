"""The Session fast path: many requests on one stream, routed by a fixed header."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from backends._gen.hetero.device.v1 import device_pb2
from backends._gen.hetero.router.v1 import router_pb2
from backends.base import GenerationRequest, Role, SamplingParams
from backends.errors import BackendError, ServingError
from backends.frames import coalesce
from backends.mock import wire
from backends.mock.adapter import MockBackend
from backends.mock.config import DeviceConfig
from backends.mock.server import DeviceServer
from tests.helpers import eventually


def request(request_id: str, prompt: str = "hello", max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        model="llama-3.1-8b",
        prompt=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=5),
        prompt_tokens=len(prompt) + 1,
    )


@pytest.fixture
async def backend() -> AsyncIterator[tuple[DeviceServer, MockBackend]]:
    device = DeviceServer(
        DeviceConfig(
            backend_id="d0",
            profile="groq-lpu",
            model="llama-3.1-8b",
            roles=(Role.PREFILL, Role.DECODE),
            time_scale=0.0,
        )
    )
    await device.start("127.0.0.1:0")
    adapter = MockBackend("d0", device.address)
    await adapter.start()
    yield device, adapter
    await adapter.close()
    await device.stop(0)


def tokens(frames: list[bytes]) -> list[int]:
    return [t for f in frames for t in router_pb2.GenerateResponse.FromString(f).token_ids]


async def collect(adapter: MockBackend, req: GenerationRequest) -> list[bytes]:
    return [frame async for frame in adapter.generate(req, timeout_s=10)]


async def test_concurrent_requests_on_one_session_each_get_their_own_tokens(
    backend: tuple[DeviceServer, MockBackend],
) -> None:
    _, adapter = backend
    prompts = [f"prompt number {i}" for i in range(8)]
    together = await asyncio.gather(
        *(collect(adapter, request(f"r{i}", p)) for i, p in enumerate(prompts))
    )
    alone = [await collect(adapter, request(f"s{i}", p)) for i, p in enumerate(prompts)]
    assert [tokens(f) for f in together] == [tokens(f) for f in alone]
    assert all(len(tokens(f)) == 16 for f in together)
    last = router_pb2.GenerateResponse.FromString(together[0][-1])
    assert last.finish_reason == router_pb2.FINISH_REASON_LENGTH


async def test_frames_waiting_for_a_slow_reader_arrive_coalesced(
    backend: tuple[DeviceServer, MockBackend],
) -> None:
    _, adapter = backend
    reference = tokens(await collect(adapter, request("ref", max_tokens=40)))
    stream = adapter.generate(request("slow", max_tokens=40), timeout_s=10)
    first = await anext(stream)
    # Read nothing more until every frame, and the end of the stream, reached the router.
    inboxes = adapter._session._inboxes  # type: ignore[union-attr]  # started above
    await eventually(lambda: all(inbox.status is not None for inbox in inboxes.values()))
    rest = [frame async for frame in stream]
    assert len(rest) == 1
    assert tokens([first, *rest]) == reference
    text = "".join(router_pb2.GenerateResponse.FromString(f).text for f in [first, *rest])
    assert text.encode("utf-8", "replace")


async def test_leaving_a_stream_early_cancels_it_on_the_device(
    backend: tuple[DeviceServer, MockBackend],
) -> None:
    device, adapter = backend
    device.engine.time_scale = 1.0  # slow enough to still be running when we leave
    stream = adapter.generate(request("leave", max_tokens=3000), timeout_s=30)
    await anext(stream)
    assert device.engine.load().running == 1
    await stream.aclose()
    await eventually(lambda: device.engine.load().running == 0)
    assert device.engine.load().kv_tokens_used == 0


async def test_a_failing_request_ends_its_stream_not_the_session(
    backend: tuple[DeviceServer, MockBackend],
) -> None:
    _, adapter = backend
    too_big = request("huge", max_tokens=10_000_000)
    with pytest.raises(ServingError, match="needs 10000006 KV tokens"):
        await collect(adapter, too_big)
    assert len(tokens(await collect(adapter, request("after")))) == 16


async def test_a_device_restart_fails_open_streams_and_the_next_request_reconnects() -> None:
    config = DeviceConfig(backend_id="d1", profile="h100", model="llama-3.1-8b", time_scale=1.0)
    device = DeviceServer(config)
    port = await device.start("127.0.0.1:0")
    adapter = MockBackend("d1", device.address)
    await adapter.start()
    try:
        stream = adapter.generate(request("doomed", max_tokens=3000), timeout_s=30)
        await anext(stream)
        await device.stop(0)
        with pytest.raises(BackendError, match="UNAVAILABLE"):
            async for _ in stream:
                pass
        device = DeviceServer(config)
        await device.start(f"127.0.0.1:{port}")
        device.engine.time_scale = 0.0
        assert len(tokens(await collect(adapter, request("again")))) == 16
    finally:
        await adapter.close()
        await device.stop(0)


def test_frames_of_many_streams_pack_and_unpack_without_decoding() -> None:
    sizes = (0, 5, 127, 128, 300, 70_000)
    frames = [bytes(range(256)) * (n // 256) + bytes(range(n % 256)) for n in sizes]
    packed = wire.pack(
        [wire.session_frame(2**64 - 1 - i, f) for i, f in enumerate(frames)]
        + [wire.session_status(7, 13, "broken")]
    )
    entries = list(wire.unpack(packed))
    assert [(i, f) for i, f, _ in entries[:-1]] == [
        (2**64 - 1 - i, f) for i, f in enumerate(frames)
    ]
    assert all(status is None for _, _, status in entries[:-1])
    stream_id, frame, status = entries[-1]
    assert (stream_id, frame) == (7, None)
    assert status is not None
    assert (status.code, status.message) == (13, "broken")
    # The hand-made encoding is the protobuf one: a generic decoder agrees.
    decoded = device_pb2.SessionFrames.FromString(packed)
    assert [f.frame for f in decoded.frames[:-1]] == frames


def test_coalesce_keeps_every_token_and_all_text_in_order() -> None:
    parts = [
        router_pb2.GenerateResponse(token_ids=[1], text="a"),
        router_pb2.GenerateResponse(token_ids=[2, 3], text="bc"),
        router_pb2.GenerateResponse(
            token_ids=[4],
            text="d",
            finish_reason=router_pb2.FINISH_REASON_STOP,
            usage=router_pb2.Usage(prompt_tokens=7, completion_tokens=4),
        ),
    ]
    merged = router_pb2.GenerateResponse.FromString(
        coalesce([p.SerializeToString() for p in parts])
    )
    assert list(merged.token_ids) == [1, 2, 3, 4]
    assert merged.text == "abcd"
    assert merged.finish_reason == router_pb2.FINISH_REASON_STOP
    assert merged.usage.completion_tokens == 4
