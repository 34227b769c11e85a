"""From an engine's KV event blocks to the router's prefix blocks.

The router's prefix index names blocks by ``backends.prefix.block_hashes``: chained
hashes of 64-byte blocks of the prompt's bytes, so that a lookup costs no tokenizer.
Engines name theirs otherwise:

- Mock devices publish the router's own hashes: :class:`SameHashes` passes them on.
- vLLM hashes blocks of ``block_size`` tokens, chained, with a seed and an algorithm
  of its own (``PYTHONHASHSEED``, ``--prefix-caching-hash-algo``, LoRA and multimodal
  keys), so its hashes cannot be recomputed from a prompt here. But each
  ``BlockStored`` carries the token ids it covers, and its parent's hash:
  :class:`TokenBytes` turns the ids back into bytes with the model's byte-level
  vocabulary (tokenizer.json, read once), runs the router's byte hash along the chain
  (each engine block remembers where the byte hash stood after it), and remembers
  which router blocks each engine block completed, for its eviction. No request pays
  for it, every replica derives the same blocks from the same events, and it is exact
  for text prompts: special tokens (BOS) map to no bytes, as the router hashes the
  prompt without them. A chat prompt is templated by the engine, so its bytes differ
  from the router's: it falls back to the router's own record of what it sent.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from backends.kv_events import BlockStored, ExternalBlockHash
from backends.prefix import ChainState
from router.errors import ConfigError

# Engine blocks whose chain state is kept, per backend: a vLLM engine holds about
# 1 GiB / (block size x bytes per token) blocks; this is far above what a CPU engine
# holds and a few MiB at most.
DEFAULT_CHAIN_BLOCKS = 262_144


class BlockMap(Protocol):
    def stored(self, event: BlockStored) -> list[int]:
        """The router's blocks that the engine's newly stored blocks complete."""

    def removed(self, block_hashes: Sequence[ExternalBlockHash]) -> list[int]:
        """The router's blocks the engine evicted with these."""

    def clear(self) -> None:
        """The engine dropped everything."""


def _as_int(value: ExternalBlockHash) -> int:
    if isinstance(value, bytes):
        return int.from_bytes(value[-8:], "big")
    return value


class SameHashes:
    """The engine hashes as the router does (mock devices)."""

    def stored(self, event: BlockStored) -> list[int]:
        return [_as_int(value) for value in event.block_hashes]

    def removed(self, block_hashes: Sequence[ExternalBlockHash]) -> list[int]:
        return [_as_int(value) for value in block_hashes]

    def clear(self) -> None:
        pass


class TokenBytes:
    """The router's blocks of an engine's token blocks, through their bytes."""

    def __init__(self, vocabulary: Sequence[bytes], capacity: int = DEFAULT_CHAIN_BLOCKS) -> None:
        self._vocabulary = vocabulary
        self._capacity = capacity
        # engine block hash -> (byte hash state after it, router blocks it completed)
        self._chain: OrderedDict[ExternalBlockHash, tuple[ChainState, tuple[int, ...]]] = (
            OrderedDict()
        )
        # Stored blocks whose parent was never seen (stored before we subscribed).
        self.orphans = 0

    def stored(self, event: BlockStored) -> list[int]:
        size = event.block_size
        if size < 1 or len(event.token_ids) != size * len(event.block_hashes):
            raise ValueError(
                f"BlockStored: {len(event.token_ids)} token ids for "
                f"{len(event.block_hashes)} blocks of {size}"
            )
        if event.parent_block_hash is None:
            state = ChainState()
        else:
            parent = self._chain.get(event.parent_block_hash)
            if parent is None:
                self.orphans += 1
                return []
            state = parent[0]
        vocabulary, count = self._vocabulary, len(self._vocabulary)
        completed: list[int] = []
        for index, engine_hash in enumerate(event.block_hashes):
            tokens = event.token_ids[index * size : (index + 1) * size]
            data = b"".join(vocabulary[t] for t in tokens if 0 <= t < count)
            state, hashes = state.extend(data)
            self._chain[engine_hash] = (state, hashes)
            self._chain.move_to_end(engine_hash)
            completed.extend(hashes)
        while len(self._chain) > self._capacity:
            self._chain.popitem(last=False)
        return completed

    def removed(self, block_hashes: Sequence[ExternalBlockHash]) -> list[int]:
        gone: list[int] = []
        for engine_hash in block_hashes:
            entry = self._chain.pop(engine_hash, None)
            if entry is not None:
                gone.extend(entry[1])
        return gone

    def clear(self) -> None:
        self._chain.clear()


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character standing for each byte, reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, characters, strict=True)}


@functools.cache
def byte_vocabulary(path: Path) -> tuple[bytes, ...]:
    """Each token id's bytes in a byte-level BPE tokenizer.json (special tokens: none);
    ConfigError when the file cannot be read or is no byte-level BPE."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        model = document["model"]
        vocab: dict[str, int] = model["vocab"]
        added = document.get("added_tokens") or []
        if model.get("type") != "BPE" or not _is_byte_level(document):
            raise ValueError("not a byte-level BPE tokenizer")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"kv_events tokenizer {path}: {error}") from None
    decoder = _byte_decoder()
    size = 1 + max([*vocab.values(), *(int(token["id"]) for token in added)], default=-1)
    table = [b""] * size
    for piece, token_id in vocab.items():
        table[token_id] = bytes(decoder[c] for c in piece if c in decoder)
    for token in added:
        content = str(token.get("content", ""))
        table[int(token["id"])] = b"" if token.get("special", False) else content.encode()
    return tuple(table)


def _is_byte_level(document: dict[str, object]) -> bool:
    def mentions(part: object) -> bool:
        if isinstance(part, dict):
            return part.get("type") == "ByteLevel" or any(mentions(v) for v in part.values())
        if isinstance(part, list):
            return any(mentions(v) for v in part)
        return False

    return mentions(document.get("decoder")) or mentions(document.get("pre_tokenizer"))


def block_map_for(tokenizer: Path | None) -> BlockMap:
    """The mapping a backend's ``kv_events`` asks for (a fresh one per backend)."""
    if tokenizer is None:
        return SameHashes()
    return TokenBytes(byte_vocabulary(tokenizer))
