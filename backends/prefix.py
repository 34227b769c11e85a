"""Prefix blocks: chained hashes of a prompt's blocks, and an engine's cache of them.

A prompt is cut into fixed blocks of bytes; block *i*'s hash covers every byte up to the
end of block *i* (a running CRC-32 tagged with the block index), so two prompts share
hash *i* only if they share their first *i* + 1 blocks, as a prefix cache needs. Bytes,
not tokens: the router does not tokenize, and a shared byte prefix is a shared token
prefix for every tokenizer up to the last block. The router's prefix index, the mock
devices and the simulator hash with this one function, so what a device reports and
what the router sent agree.
"""

from __future__ import annotations

import itertools
import zlib
from collections import OrderedDict
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

BLOCK_BYTES = 64
# Beyond this many blocks (64 KiB of prompt) affinity is decided already.
MAX_BLOCKS = 1024


def block_hashes(
    prompt: bytes | str, block_bytes: int = BLOCK_BYTES, max_blocks: int = MAX_BLOCKS
) -> tuple[int, ...]:
    """Hashes of the prompt's whole leading blocks (a partial last block is not cacheable)."""
    data = prompt.encode() if isinstance(prompt, str) else prompt
    count = min(len(data) // block_bytes, max_blocks)
    hashes = []
    crc = 0
    view = memoryview(data)
    for index in range(count):
        crc = zlib.crc32(view[index * block_bytes : (index + 1) * block_bytes], crc)
        hashes.append((index << 32) | crc)
    return tuple(hashes)


@dataclass(frozen=True)
class ChainState:
    """Where :func:`block_hashes` stands after some leading bytes of a prompt: the
    whole blocks hashed, the running CRC, and the bytes of the partial block after them.
    Lets a prompt's hashes be computed a piece at a time (as an engine's KV events
    deliver its token blocks) and give what the whole prompt would."""

    blocks: int = 0
    crc: int = 0
    pending: bytes = b""

    def extend(self, data: bytes) -> tuple[ChainState, tuple[int, ...]]:
        """The state after ``data`` more bytes, and the hashes of the blocks they complete."""
        buffered = self.pending + data
        whole = min(len(buffered) // BLOCK_BYTES, max(0, MAX_BLOCKS - self.blocks))
        crc, hashes = self.crc, []
        view = memoryview(buffered)
        for offset in range(whole):
            crc = zlib.crc32(view[offset * BLOCK_BYTES : (offset + 1) * BLOCK_BYTES], crc)
            hashes.append(((self.blocks + offset) << 32) | crc)
        # Beyond MAX_BLOCKS nothing is hashed: nothing is kept for it.
        rest = b"" if self.blocks + whole >= MAX_BLOCKS else bytes(view[whole * BLOCK_BYTES :])
        return ChainState(self.blocks + whole, crc, rest), tuple(hashes)


@dataclass(frozen=True)
class StoredRun:
    """Blocks newly cached, consecutive in a prompt: their hashes, the hash of the block
    before them (None: they start the prompt), and the bytes they cover."""

    hashes: tuple[int, ...]
    parent: int | None
    data: bytes


# (runs newly stored, hashes evicted), in that order, after each change.
CacheListener = Callable[[list[StoredRun], list[int]], None]


def _runs(hashes: Sequence[int], cached: Container[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of ``hashes`` not in ``cached``."""
    runs, start = [], None
    for index, value in enumerate(hashes):
        if value in cached:
            if start is not None:
                runs.append((start, index))
                start = None
        elif start is None:
            start = index
    if start is not None:
        runs.append((start, len(hashes)))
    return runs


class PrefixCache:
    """Hashes of the prompt blocks whose KV this device computed or received, LRU.

    Timing only: a prefill whose leading blocks are here is charged for the rest of its
    prompt. Cached blocks hold none of the device's KV capacity; a real engine keeps them
    in KV blocks nobody else is using and evicts them when it needs the room, which this
    emulation does not model: here they are free.
    """

    def __init__(self, capacity_blocks: int, listener: CacheListener | None = None) -> None:
        if capacity_blocks < 0:
            raise ValueError(f"prefix_cache_blocks must be >= 0, not {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()
        # Told of every change, as an engine publishes its KV cache events.
        self.listener = listener

    def hashes_of(self, prompt: str) -> tuple[int, ...]:
        """The prompt's block hashes (none when the cache is off), over the bytes the
        tokenizer reads, with the router's function so both name the same blocks."""
        if not self.capacity_blocks:
            return ()
        return block_hashes(prompt.encode("utf-8", errors="replace"))

    def matched_blocks(self, hashes: Sequence[int]) -> int:
        """How many of the leading blocks are cached, consecutive from block 0."""
        return sum(1 for _ in itertools.takewhile(self._blocks.__contains__, hashes))

    def matched_in_batch(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        """:meth:`matched_blocks` of each prompt of one prefill batch, in batch order, with
        the blocks of the prompts before it in the batch counted as cached: an engine that
        caches a block when it allocates it (vLLM's v1 scheduler) lets a later request of
        the same step reuse what an earlier one is computing."""
        if len(prompts) == 1:
            return [self.matched_blocks(prompts[0])]
        blocks = self._blocks
        batch: set[int] = set()
        matched = []
        for hashes in prompts:
            count = 0
            for value in hashes:
                if value not in blocks and value not in batch:
                    break
                count += 1
            matched.append(count)
            batch.update(hashes)
        return matched

    def cached_tokens(self, hashes: Sequence[int], prompt_tokens: int) -> int:
        """Leading prompt tokens a prefill need not compute. The last is always computed:
        its logits give the first output token."""
        return max(0, min(self.matched_blocks(hashes) * BLOCK_BYTES, prompt_tokens - 1))

    def record(self, hashes: Sequence[int], data: bytes = b"") -> None:
        """These blocks were just computed (or their KV received): now the most recent.

        Last block first, so a prompt's head outlives its tail: eviction takes tails
        first, as in vLLM (which frees a sequence's blocks in reverse) and SGLang (which
        evicts radix-tree leaves). A head evicted first would strand the blocks after it.
        ``data``: the bytes the hashes cover (the prompt's), for the listener.
        """
        stored = _runs(hashes, self._blocks) if self.listener is not None else []
        for value in reversed(hashes):
            self._blocks[value] = None
            self._blocks.move_to_end(value)
        removed = []
        while len(self._blocks) > self.capacity_blocks:
            removed.append(self._blocks.popitem(last=False)[0])
        if self.listener is not None and (stored or removed):
            runs = [
                StoredRun(
                    tuple(hashes[start:end]),
                    hashes[start - 1] if start else None,
                    data[start * BLOCK_BYTES : end * BLOCK_BYTES],
                )
                for start, end in stored
            ]
            self.listener(runs, removed)

    def recent(self, limit: int) -> list[int]:
        """At most ``limit`` cached hashes, the most recently used first."""
        return list(itertools.islice(reversed(self._blocks), limit))

    def __len__(self) -> int:
        return len(self._blocks)
