"""Prefix-cache affinity: which backend holds which of a prompt's blocks.

:class:`PrefixIndex` remembers which blocks (``backends.prefix.block_hashes``) each
backend was sent (and what backends report as cached, or publish in their KV cache
events, evictions included), least recently used first out, within a budget per backend.
Policies only read it; the daemon and the simulator record a request's hashes after
routing it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

# Holders of a block are kept as one string of backend ids joined by this (ids never
# contain it): a dict of ints to strings is invisible to the garbage collector, whereas
# a set per block made each full collection walk every block held (~20 ms per 100k).
_SEP = "\x00"


# Blocks remembered per backend: 4 MiB of prompt at 64-byte blocks, a few MiB of index.
DEFAULT_BLOCKS_PER_BACKEND = 65536


class PrefixIndex:
    """Which backend holds which block hashes, bounded per backend (LRU)."""

    def __init__(self, blocks_per_backend: int = DEFAULT_BLOCKS_PER_BACKEND) -> None:
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

    def remove(self, backend_id: str, hashes: Iterable[int]) -> None:
        """``backend_id`` no longer holds these blocks (it evicted them)."""
        held = self._held.get(backend_id)
        if held is None:
            return
        for value in hashes:
            if held.pop(value, False) is None:
                self._drop(value, backend_id)

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
