"""From engine blocks to the router's prefix blocks, and the index's evictions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from backends.kv_events import BlockStored, ExternalBlockHash
from backends.prefix import BLOCK_BYTES, MAX_BLOCKS, ChainState, block_hashes
from router.errors import ConfigError
from router.metrics import RouterMetrics
from router.pool.kv_block_map import SameHashes, TokenBytes, byte_vocabulary
from router.pool.registry import Pool
from router.scheduling.prefix import PrefixIndex
from router.settings import parse_pool

BOS = 256


def stored(
    hashes: list[ExternalBlockHash], parent: int | None, tokens: list[int], size: int
) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=size,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )


def test_chain_state_in_pieces_gives_the_whole_prompts_hashes() -> None:
    data = random.Random(7).randbytes(40 * BLOCK_BYTES + 13)
    for cuts in ([5], [64, 65, 128], [1000, 1001], list(range(3, 2000, 97))):
        state, start = ChainState(), 0
        hashes: list[int] = []
        for end in [*cuts, len(data)]:
            state, more = state.extend(data[start:end])
            hashes.extend(more)
            start = end
        assert tuple(hashes) == block_hashes(data)


def test_chain_state_stops_at_max_blocks() -> None:
    data = bytes((MAX_BLOCKS + 3) * BLOCK_BYTES)
    state, hashes = ChainState().extend(data)
    assert tuple(hashes) == block_hashes(data)
    assert len(hashes) == MAX_BLOCKS
    assert state.extend(data)[1] == ()


def byte_tokens() -> list[bytes]:
    """A vocabulary of the 256 bytes, a two-byte token (256 + 1) and a special BOS."""
    vocabulary = [bytes([b]) for b in range(256)]
    return [*vocabulary, b"", b"ab"]


def tokens_of(text: bytes) -> list[int]:
    """BOS, then ``ab`` as one token where it occurs, else bytes."""
    tokens, index = [BOS], 0
    while index < len(text):
        if text[index : index + 2] == b"ab":
            tokens.append(257)
            index += 2
        else:
            tokens.append(text[index])
            index += 1
    return tokens


def test_token_blocks_map_to_the_router_blocks_of_the_prompt_bytes() -> None:
    prompt = b"ab cd abab " * 40
    tokens = tokens_of(prompt)
    size = 16
    whole = len(tokens) // size
    mapping = TokenBytes(byte_tokens())
    # The engine stores the prompt in two events, the second chained to the first.
    first, rest = 3, whole - 3
    got = mapping.stored(stored(list(range(first)), None, tokens[: first * size], size))
    got += mapping.stored(
        stored(list(range(first, whole)), first - 1, tokens[first * size : whole * size], size)
    )
    assert rest > 0
    covered = b"".join(byte_tokens()[t] for t in tokens[: whole * size])
    assert tuple(got) == block_hashes(covered)
    assert got == list(block_hashes(prompt)[: len(got)])  # BOS is no byte of the prompt
    # The last engine block's eviction takes the router blocks it completed, not others.
    index = PrefixIndex()
    index.record("engine", got)
    last = list(range(whole - 8, whole))  # 128 tokens: at least one router block
    tail = mapping.removed(last)
    assert tail
    assert tail == got[-len(tail) :]
    index.remove("engine", tail)
    assert index.blocks_held("engine") == len(got) - len(tail)
    assert mapping.removed(last) == []  # gone already


def test_a_block_whose_parent_is_unknown_maps_to_nothing() -> None:
    mapping = TokenBytes(byte_tokens())
    assert mapping.stored(stored([9], 8, [1] * 16, 16)) == []
    assert mapping.orphans == 1


def test_token_ids_that_do_not_fill_the_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="15 token ids for 1 blocks of 16"):
        TokenBytes(byte_tokens()).stored(stored([1], None, [1] * 15, 16))


def test_same_hashes_pass_as_they_are() -> None:
    event = stored([5, 6], None, [0] * 128, 64)
    assert SameHashes().stored(event) == [5, 6]
    assert SameHashes().removed([(7).to_bytes(8, "big")]) == [7]


def test_index_remove_drops_only_that_backends_blocks() -> None:
    index = PrefixIndex()
    index.record("a", [1, 2, 3])
    index.record("b", [1, 2])
    index.remove("a", [2, 3, 99])
    assert index.matched_blocks([1, 2, 3]) == {"a": 1, "b": 2}
    index.remove("c", [1])  # never held anything: nothing happens
    assert index.blocks_held("a") == 1


def write_tokenizer(path: Path, vocab: dict[str, int], **parts: object) -> Path:
    document = {
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "added_tokens": [{"id": 3, "content": "<s>", "special": True}],
        **parts,
    }
    path.write_text(json.dumps(document))
    return path


def test_a_byte_level_tokenizer_json_gives_each_tokens_bytes(tmp_path: Path) -> None:
    # "Ġ" is how GPT-2's byte-level alphabet writes a space; "Ã©" is é's two bytes.
    vocab = {"a": 0, "Ġhello": 1, "Ã©": 2}
    path = write_tokenizer(tmp_path / "t.json", vocab, decoder={"type": "ByteLevel"})
    assert byte_vocabulary(path) == (b"a", b" hello", "é".encode(), b"")


def test_a_tokenizer_that_is_not_byte_level_is_a_config_error(tmp_path: Path) -> None:
    path = write_tokenizer(tmp_path / "t.json", {"a": 0}, decoder={"type": "Metaspace"})
    with pytest.raises(ConfigError, match="not a byte-level BPE"):
        byte_vocabulary(path)
    with pytest.raises(ConfigError, match=r"missing\.json"):
        byte_vocabulary(tmp_path / "missing.json")


def pool_with(kv_events: dict[str, object]) -> dict[str, object]:
    entry = {"id": "v", "kind": "mock", "address": "127.0.0.1:1", "role": "both", "model": "m"}
    return {"backends": [{**entry, "kv_events": kv_events}]}


def test_a_pool_entrys_kv_events_are_checked_when_the_file_is_read(tmp_path: Path) -> None:
    config = parse_pool(pool_with({"endpoint": "ipc:///run/v.pub", "topic": "kv-events"}))
    events = config.backends[0].kv_events
    assert events is not None
    assert events.replay_endpoint is None
    with pytest.raises(ConfigError, match=r"kv_events\.endpoint"):
        parse_pool(pool_with({"endpoint": "tcp://*:5557"}))  # a bind address
    with pytest.raises(ConfigError, match="kv_events"):
        parse_pool(pool_with({"endpoint": "tcp://h:1", "replay": "tcp://h:2"}))
    missing = parse_pool(
        pool_with({"endpoint": "tcp://h:1", "tokenizer": str(tmp_path / "none.json")})
    )
    with pytest.raises(ConfigError, match=r"^backend v: kv_events tokenizer .*none\.json"):
        Pool(missing, RouterMetrics(CollectorRegistry()))
