"""The mock device's prefix cache: which blocks it keeps and what a hit saves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import Role, SamplingParams
from backends.mock.clock import LoopClock
from backends.mock.config import DeviceConfig
from backends.mock.engine import DeviceEngine
from backends.mock.model import TinyTransformer, encode
from backends.mock.server import DeviceServer
from backends.perf.roofline import TimingModel, load_catalog
from backends.prefix import PrefixCache, block_hashes
from router.cli import build_parser
from router.cluster import device_command
from router.settings import BackendConfig

HEAD = "".join(chr(ord("a") + i % 26) for i in range(256))  # four whole blocks
PROMPT = HEAD + " and a tail of its own that is not a whole block."


class RecordingClock(LoopClock):
    """Virtual time that jumps to each deadline; keeps how long each iteration was."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep_until(self, deadline: float) -> None:
        self.waits.append(deadline - self.now)
        self.now = max(self.now, deadline)
        await asyncio.sleep(0)


@pytest.fixture(scope="module")
def timing() -> TimingModel:
    catalog = load_catalog()
    return TimingModel(catalog.profiles["h100"], catalog.models["llama-3.1-70b"])


@pytest.fixture
def clock() -> RecordingClock:
    return RecordingClock()


@pytest.fixture
async def engine(timing: TimingModel, clock: RecordingClock) -> AsyncIterator[DeviceEngine]:
    device = DeviceEngine(TinyTransformer(), timing, clock=clock, prefix_cache_blocks=64)
    device.start()
    yield device
    await device.stop()


async def generate(engine: DeviceEngine, request_id: str, prompt: str, tokens: int) -> list[int]:
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0, top_p=1.0, seed=0)
    frames = [frame async for frame in engine.generate(request_id, prompt, sampling)]
    return [t for f in frames for t in router_pb2.GenerateResponse.FromString(f).token_ids]


async def prefill_time(
    engine: DeviceEngine, clock: RecordingClock, request_id: str, prompt: str
) -> float:
    """The modelled time of the prompt's prefill, on an engine that was idle."""
    clock.now += 10.0
    clock.waits.clear()
    await generate(engine, request_id, prompt, tokens=1)
    (wait,) = clock.waits
    return wait


def test_a_match_counts_cached_blocks_from_the_first_only() -> None:
    cache = PrefixCache(16)
    hashes = block_hashes(PROMPT)
    assert len(hashes) == 4
    cache.record(hashes[:2])
    assert cache.matched_blocks(hashes) == 2
    other = PrefixCache(16)
    other.record(hashes[1:])  # block 0 missing: nothing after it can be used
    assert other.matched_blocks(hashes) == 0


def test_cached_tokens_are_whole_blocks_and_never_the_last_token() -> None:
    cache = PrefixCache(16)
    hashes = block_hashes(HEAD)
    cache.record(hashes)
    assert cache.cached_tokens(hashes, len(encode(PROMPT))) == 256
    assert cache.cached_tokens(hashes, 200) == 199


def test_eviction_takes_a_prompt_tail_before_its_head() -> None:
    cache = PrefixCache(3)
    hashes = block_hashes(PROMPT)
    cache.record(hashes)
    assert len(cache) == 3
    assert cache.matched_blocks(hashes) == 3


def test_recording_again_makes_blocks_the_most_recent() -> None:
    cache = PrefixCache(4)
    first, second = block_hashes("x" * 128), block_hashes("y" * 128)
    cache.record(first)
    cache.record(second)
    cache.record(first)
    assert cache.recent(4)[:2] == [first[0], first[1]]
    cache.record(block_hashes("z" * 128))  # evicts the least recent: second
    assert cache.matched_blocks(first) == 2
    assert cache.matched_blocks(second) == 0
    assert len(cache.recent(3)) == 3


def test_a_cache_of_zero_blocks_hashes_nothing() -> None:
    assert PrefixCache(0).hashes_of(PROMPT) == ()
    assert PrefixCache(8).hashes_of(PROMPT) == block_hashes(PROMPT)
    with pytest.raises(ValueError, match="prefix_cache_blocks"):
        PrefixCache(-1)


async def test_a_cached_head_is_not_charged_again(
    engine: DeviceEngine, clock: RecordingClock, timing: TimingModel
) -> None:
    length = len(encode(PROMPT))
    cold = await prefill_time(engine, clock, "cold", PROMPT)
    assert cold == pytest.approx(timing.prefill_seconds([length]))
    assert engine.prefix_hit_tokens == 0
    warm = await prefill_time(engine, clock, "warm", PROMPT)
    assert warm == pytest.approx(timing.prefill_seconds([length], [256]))
    assert warm < cold
    assert engine.prefix_hit_tokens == 256
    sibling = HEAD[:128] + "-" * 200  # shares two blocks
    assert await prefill_time(engine, clock, "sibling", sibling) == pytest.approx(
        timing.prefill_seconds([len(encode(sibling))], [128])
    )


async def test_a_cache_hit_gives_the_tokens_a_cold_device_gives(
    engine: DeviceEngine, timing: TimingModel
) -> None:
    cold = DeviceEngine(engine.model, timing, time_scale=0.0)
    cold.start()
    try:
        expected = await generate(cold, "cold", PROMPT, tokens=12)
    finally:
        await cold.stop()
    await generate(engine, "first", PROMPT, tokens=1)
    assert await generate(engine, "hit", PROMPT, tokens=12) == expected
    assert engine.prefix_hit_tokens == 256


async def test_a_prompt_reuses_what_an_earlier_one_of_its_prefill_batch_computes(
    engine: DeviceEngine, clock: RecordingClock, timing: TimingModel
) -> None:
    length = len(encode(PROMPT))
    clock.waits.clear()
    await asyncio.gather(generate(engine, "a", PROMPT, 1), generate(engine, "b", PROMPT, 1))
    assert clock.waits[0] == pytest.approx(timing.prefill_seconds([length, length], [0, 256]))
    assert engine.prefix_hit_tokens == 256  # b's head is a's, computed in the same step
    await generate(engine, "c", PROMPT, 1)
    assert engine.prefix_hit_tokens == 512


def test_a_batch_match_counts_blocks_of_earlier_prompts_of_the_batch() -> None:
    cache = PrefixCache(16)
    hashes = block_hashes(PROMPT)
    sibling = block_hashes(HEAD[:128] + "-" * 200)  # shares two blocks with PROMPT
    cache.record(sibling[:1])
    assert cache.matched_in_batch([hashes]) == [1]
    assert cache.matched_in_batch([hashes, sibling, hashes]) == [1, 2, 4]
    assert cache.matched_in_batch([sibling, hashes]) == [1, 2]
    assert len(cache) == 1  # a lookup records nothing


async def test_a_decode_device_keeps_the_prefix_of_the_kv_it_received(
    engine: DeviceEngine,
) -> None:
    ids = encode(PROMPT)
    cache, _ = engine.model.prefill(ids, len(ids) + 4)
    sampling = SamplingParams(max_tokens=3, temperature=0.0, top_p=1.0, seed=0)
    frames = [f async for f in engine.decode("d", PROMPT, sampling, cache, first_token_id=65)]
    assert frames
    assert engine.prefix_cache.matched_blocks(block_hashes(PROMPT)) == 4


def test_the_pool_option_reaches_the_device_flag() -> None:
    backend = BackendConfig(
        id="h100-0",
        address="127.0.0.1:0",
        role=Role.PREFILL,
        model="llama-3.1-8b",
        profile="h100",
        options={"prefix_cache_blocks": 512},
    )
    command = device_command(backend, time_scale=0.0)
    assert command[command.index("--prefix-cache-blocks") + 1] == "512"
    options = build_parser().parse_args(command[command.index("device") :])
    assert options.prefix_cache_blocks == 512
    default = build_parser().parse_args(["device", "--id", "d0", "--profile", "h100"])
    assert default.prefix_cache_blocks == 0


def test_a_pool_entry_chips_size_the_emulated_deployment() -> None:
    backend = BackendConfig(
        id="p0", address="127.0.0.1:0", role=Role.PREFILL, model="llama-3.1-70b", profile="h100",
        chips=8,
    )  # fmt: skip
    command = device_command(backend, time_scale=0.0)
    options = build_parser().parse_args(command[command.index("device") :])
    assert options.chips == 8
    server = DeviceServer(
        DeviceConfig(backend_id="p0", profile="h100", model="llama-3.1-70b", chips=8)
    )
    auto = TimingModel(load_catalog().profiles["h100"], load_catalog().models["llama-3.1-70b"])
    assert server.timing.chips == 8
    assert auto.chips == 4
    assert server.timing.decode_step_seconds([1000]) < auto.decode_step_seconds([1000])
