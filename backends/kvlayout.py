"""How a mock device lays its KV out in bytes, and how a relay converts between layouts.

A layout has a tensor-parallel degree ``tp`` and a block size ``B``. Rank ``r``
holds KV heads ``[r*h/tp, (r+1)*h/tp)``; the payload is rank 0's shard, then rank
1's, and so on. A shard is its blocks in order (tokens ``[j*B, (j+1)*B)``, the
last one possibly short); a block is, for each layer, the shard's K then its V,
``(heads, tokens, head_dim)`` in C order, little-endian float32. Every layout of
the same KV has the same byte length: only the order differs.

A relay converts between two layouts as a stream: it reads every source rank a
unit at a time (the least common multiple of the two block sizes, in tokens) and
writes that unit's destination blocks, so it holds one unit of KV, never all of it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from backends.base import KVLayout

_DTYPE = np.dtype("<f4")
Floats = NDArray[np.float32]


@dataclass(frozen=True)
class Span:
    """A byte range of a payload."""

    offset: int
    length: int


def token_bytes(layout: KVLayout) -> int:
    """Bytes one token takes across all ranks (K and V, every layer and head)."""
    return 2 * layout.layers * layout.kv_heads * layout.head_dim * _DTYPE.itemsize


def incompatibility(source: KVLayout, target: KVLayout) -> str | None:
    """Why a KV cannot be converted from ``source`` to ``target``, or None."""
    if source.dtype != target.dtype:
        return f"dtype {source.dtype} cannot become {target.dtype} without loss"
    shape = (source.layers, source.kv_heads, source.head_dim)
    if shape != (target.layers, target.kv_heads, target.head_dim):
        return f"model shapes differ: {source.describe()} vs {target.describe()}"
    for layout in (source, target):
        if layout.kv_heads % layout.tensor_parallel:
            return f"{layout.kv_heads} KV heads do not split over {layout.tensor_parallel} ranks"
    return None


def rank_spans(layout: KVLayout, num_tokens: int) -> list[Span]:
    """Where each rank's shard lies in the payload."""
    size = num_tokens * token_bytes(layout) // layout.tensor_parallel
    return [Span(rank * size, size) for rank in range(layout.tensor_parallel)]


def encode(keys: Floats, values: Floats, layout: KVLayout) -> bytes:
    """The payload of keys/values ``(layers, kv_heads, tokens, head_dim)`` in ``layout``."""
    tokens = keys.shape[2]
    heads = layout.kv_heads // layout.tensor_parallel
    parts: list[bytes] = []
    for rank in range(layout.tensor_parallel):
        shard = slice(rank * heads, (rank + 1) * heads)
        for start in range(0, tokens, layout.block_size):
            block = slice(start, min(start + layout.block_size, tokens))
            both = np.stack((keys[:, shard, block], values[:, shard, block]), axis=1)
            parts.append(both.astype(_DTYPE, copy=False).tobytes())
    return b"".join(parts)


def decode(buffer: bytes | bytearray | memoryview, layout: KVLayout,
           num_tokens: int) -> tuple[Floats, Floats]:  # fmt: skip
    """Keys and values ``(layers, kv_heads, tokens, head_dim)`` from a payload in ``layout``."""
    expected = num_tokens * token_bytes(layout)
    view = memoryview(buffer).cast("B")
    if len(view) != expected:
        raise ValueError(f"KV payload is {len(view)} bytes; {layout.describe()} needs {expected}")
    shape = (layout.layers, layout.kv_heads, num_tokens, layout.head_dim)
    keys, values = np.empty(shape, np.float32), np.empty(shape, np.float32)
    heads = layout.kv_heads // layout.tensor_parallel
    offset = 0
    for rank in range(layout.tensor_parallel):
        shard = slice(rank * heads, (rank + 1) * heads)
        for start in range(0, num_tokens, layout.block_size):
            count = min(layout.block_size, num_tokens - start)
            size = 2 * layout.layers * heads * count * layout.head_dim * _DTYPE.itemsize
            block = np.frombuffer(view[offset : offset + size], _DTYPE).reshape(
                layout.layers, 2, heads, count, layout.head_dim
            )
            keys[:, shard, start : start + count] = block[:, 0]
            values[:, shard, start : start + count] = block[:, 1]
            offset += size
    return keys, values


ReadExact = Callable[[int, int], Awaitable[bytes]]  # (rank, byte count) -> the next bytes


async def translate(
    read: ReadExact, source: KVLayout, target: KVLayout, num_tokens: int
) -> AsyncIterator[tuple[int, bytes]]:
    """(target offset, bytes) of the KV in ``target``, reading ``source`` one unit at a time.

    ``read(rank, n)`` returns the next ``n`` bytes of that source rank's shard.
    """
    reason = incompatibility(source, target)
    if reason is not None:
        raise ValueError(reason)
    unit = math.lcm(source.block_size, target.block_size)
    per_token_rank = token_bytes(source) // source.tensor_parallel
    target_ranks = rank_spans(target, num_tokens)
    target_per_token_rank = token_bytes(target) // target.tensor_parallel
    for start in range(0, num_tokens, unit):
        count = min(unit, num_tokens - start)
        shards = [
            await read(rank, count * per_token_rank) for rank in range(source.tensor_parallel)
        ]
        keys, values = _unit(shards, source, count)
        for rank, span in enumerate(target_ranks):
            data = encode(*_heads(keys, values, target, rank), _single_rank(target))
            yield span.offset + start * target_per_token_rank, data


def _unit(shards: list[bytes], layout: KVLayout, count: int) -> tuple[Floats, Floats]:
    """All heads of ``count`` tokens from one piece of every rank's shard."""
    parts = [decode(shard, _single_rank(layout), count) for shard in shards]
    keys = np.concatenate([k for k, _ in parts], axis=1)
    values = np.concatenate([v for _, v in parts], axis=1)
    return keys, values


def _single_rank(layout: KVLayout) -> KVLayout:
    """The layout of one rank's shard, read as a payload of its own."""
    return KVLayout(
        layers=layout.layers,
        kv_heads=layout.kv_heads // layout.tensor_parallel,
        head_dim=layout.head_dim,
        dtype=layout.dtype,
        block_size=layout.block_size,
        tensor_parallel=1,
    )


def _heads(keys: Floats, values: Floats, layout: KVLayout, rank: int) -> tuple[Floats, Floats]:
    heads = layout.kv_heads // layout.tensor_parallel
    shard = slice(rank * heads, (rank + 1) * heads)
    return keys[:, shard], values[:, shard]
