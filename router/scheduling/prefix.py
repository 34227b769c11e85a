"""Prefix-cache affinity: chained hashes of a prompt's blocks and who holds them.

A prompt is cut into fixed blocks of bytes; block *i*'s hash covers every byte up to the
end of block *i* (a running CRC-32 tagged with the block index), so two prompts share
hash *i* only if they share their first *i* + 1 blocks, as a prefix cache needs. Bytes,
not tokens: the router does not tokenize, and a shared byte prefix is a shared token
prefix for every tokenizer up to the last block. The mock devices hash their prompts with
the same function, so what they report and what the router sent agree.

:class:`PrefixIndex` remembers which blocks each backend was sent (and what backends
report as cached), least recently used first out, within a budget per backend. Policies
only read it; the daemon and the simulator record a request's hashes after routing it.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

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


# Holders of a block are kept as one string of backend ids joined by this (ids never
# contain it): a dict of ints to strings is invisible to the garbage collector, whereas
# a set per block made each full collection walk every block held (~20 ms per 100k).
_SEP = "\x00"


class PrefixIndex:
    """Which backend holds which block hashes, bounded per backend (LRU)."""

    def __init__(self, blocks_per_backend: int = 65536) -> None:
        if blocks_per_backend < 1:
            raise ValueError("blocks_per_backend must be >= 1")
        self.blocks_per_backend = blocks_per_backend
        self._holders: dict[int, str] = {}
        self._held: dict[str, OrderedDict[int, None]] = {}

    def record(self, backend_id: str, hashes: Iterable[int]) -> None:
        """``backend_id`` now holds these blocks (it was sent them, or reports them)."""
        held = self._held.setdefault(backend_id, OrderedDict())
        holders = self._holders
        for value in hashes:
            if value in held:
                held.move_to_end(value)
                continue
            held[value] = None
            current = holders.get(value)
            holders[value] = backend_id if current is None else current + _SEP + backend_id
        while len(held) > self.blocks_per_backend:
            old, _ = held.popitem(last=False)
            self._drop(old, backend_id)

    def forget(self, backend_id: str) -> None:
        """Everything ``backend_id`` held (it restarted, or left the pool)."""
        for value in self._held.pop(backend_id, {}):
            self._drop(value, backend_id)

    def matched_blocks(self, hashes: Sequence[int]) -> Mapping[str, int]:
        """Leading blocks of ``hashes`` each backend holds (backends with none are absent)."""
        matched: dict[str, int] = {}
        for index, value in enumerate(hashes):
            holders = self._holders.get(value)
            if holders is None:
                break
            extended = False
            for backend_id in holders.split(_SEP) if _SEP in holders else (holders,):
                if matched.get(backend_id, 0) == index:
                    matched[backend_id] = index + 1
                    extended = True
            if not extended:
                break
        return matched

    def blocks_held(self, backend_id: str) -> int:
        return len(self._held.get(backend_id, ()))

    def _drop(self, value: int, backend_id: str) -> None:
        holders = self._holders.get(value)
        if holders is None:
            return
        if holders == backend_id:
            del self._holders[value]
            return
        rest = [h for h in holders.split(_SEP) if h != backend_id]
        if rest:
            self._holders[value] = _SEP.join(rest)
        else:
            del self._holders[value]
