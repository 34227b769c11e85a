"""KV layouts: every layout holds the same KV, and a streamed conversion loses nothing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from backends import kvlayout
from backends.base import KVLayout


def layout(tp: int, block: int, dtype: str = "float32") -> KVLayout:
    return KVLayout(layers=2, kv_heads=4, head_dim=8, dtype=dtype, block_size=block,
                    tensor_parallel=tp)  # fmt: skip


def kv(tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (2, 4, tokens, 8)
    return (
        rng.standard_normal(shape).astype(np.float32),
        rng.standard_normal(shape).astype(np.float32),
    )


def _name(value: KVLayout) -> str:
    return f"tp{value.tensor_parallel}-b{value.block_size}"


LAYOUTS = [layout(tp, block) for tp in (1, 2, 4) for block in (1, 16, 48)]


@pytest.mark.parametrize("target", LAYOUTS, ids=_name)
@pytest.mark.parametrize("tokens", [1, 37, 100])
def test_every_layout_round_trips(target: KVLayout, tokens: int) -> None:
    keys, values = kv(tokens)
    payload = kvlayout.encode(keys, values, target)
    assert len(payload) == tokens * kvlayout.token_bytes(target)
    back_keys, back_values = kvlayout.decode(payload, target, tokens)
    assert np.array_equal(back_keys, keys)
    assert np.array_equal(back_values, values)


def test_layouts_differ_in_order_only() -> None:
    keys, values = kv(40)
    one = kvlayout.encode(keys, values, layout(1, 16))
    other = kvlayout.encode(keys, values, layout(2, 48))
    assert one != other
    assert sorted(one) == sorted(other)


async def convert(
    payload: bytes, source: KVLayout, target: KVLayout, tokens: int
) -> tuple[bytes, int]:
    """Runs the streamed conversion; returns the target payload and the largest piece read."""
    spans = kvlayout.rank_spans(source, tokens)
    positions = [span.offset for span in spans]
    largest = 0

    async def read(rank: int, count: int) -> bytes:
        nonlocal largest
        largest = max(largest, count)
        start = positions[rank]
        positions[rank] += count
        assert positions[rank] <= spans[rank].offset + spans[rank].length
        return payload[start : start + count]

    out = bytearray(len(payload))
    async for offset, data in kvlayout.translate(read, source, target, tokens):
        out[offset : offset + len(data)] = data
    return bytes(out), largest


@pytest.mark.parametrize(
    ("source", "target"),
    list(itertools.permutations([layout(2, 16), layout(1, 16), layout(4, 48), layout(1, 1)], 2)),
    ids=_name,
)
async def test_streamed_conversion_is_lossless_and_bounded(
    source: KVLayout, target: KVLayout
) -> None:
    tokens = 300
    keys, values = kv(tokens, seed=3)
    converted, largest = await convert(
        kvlayout.encode(keys, values, source), source, target, tokens
    )
    assert converted == kvlayout.encode(keys, values, target)
    unit = np.lcm(source.block_size, target.block_size)
    # Never more than one unit of one rank's shard at a time.
    assert largest <= unit * kvlayout.token_bytes(source) // source.tensor_parallel


def test_a_dtype_mismatch_is_refused_with_a_reason() -> None:
    reason = kvlayout.incompatibility(layout(1, 16), layout(1, 16, dtype="bfloat16"))
    assert reason == "dtype float32 cannot become bfloat16 without loss"
    assert kvlayout.incompatibility(layout(1, 16), layout(3, 16)) == (
        "4 KV heads do not split over 3 ranks"
    )
    assert kvlayout.incompatibility(layout(2, 16), layout(4, 1)) is None


def test_a_short_payload_is_refused() -> None:
    with pytest.raises(ValueError, match="needs"):
        kvlayout.decode(b"\0" * 10, layout(1, 16), 4)
