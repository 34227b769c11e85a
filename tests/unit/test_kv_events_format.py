"""KV event batches on the wire: vLLM 0.32's msgpack layout, both ways.

The expected layout is written out as plain msgpack values (arrays, maps), as
``vllm/distributed/kv_events.py`` encodes its msgspec structs: the batch an array
``[ts, events, data_parallel_rank]``, each event a map tagged by ``type``, its fields
at their default left out.
"""

from __future__ import annotations

import msgspec
import pytest

from backends.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    decode_seq,
    encode_batch,
    encode_seq,
)

STORED_AS_VLLM_SENDS = {
    "type": "BlockStored",
    "block_hashes": [2**63 + 5, 17],
    "parent_block_hash": None,
    "token_ids": list(range(32)),
    "block_size": 16,
    "lora_id": None,
    "medium": "GPU",
    "lora_name": None,
}


def test_a_batch_in_vllms_layout_decodes_to_its_events() -> None:
    removed = {"type": "BlockRemoved", "block_hashes": [b"\x01" * 32], "medium": "GPU"}
    payload = msgspec.msgpack.encode(
        [1.5, [STORED_AS_VLLM_SENDS, removed, {"type": "AllBlocksCleared"}], 0]
    )
    batch = decode_batch(payload)
    assert batch.ts == 1.5
    assert batch.data_parallel_rank == 0
    stored, gone, cleared = batch.events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [2**63 + 5, 17]
    assert stored.parent_block_hash is None
    assert stored.token_ids == list(range(32))
    assert stored.block_size == 16
    assert stored.medium == "GPU"
    assert isinstance(gone, BlockRemoved)
    assert gone.block_hashes == [
        b"\x01" * 32
    ]  # bytes hashes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0)
    assert isinstance(cleared, AllBlocksCleared)


def test_a_batch_we_encode_has_vllms_layout() -> None:
    stored = BlockStored(
        block_hashes=[2**63 + 5, 17],
        parent_block_hash=None,
        token_ids=list(range(32)),
        block_size=16,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )
    raw = msgspec.msgpack.decode(encode_batch(KVEventBatch(ts=1.5, events=[stored])))
    # Events leave out their fields at the default; the batch, an array, keeps them all.
    assert raw == [1.5, [STORED_AS_VLLM_SENDS], None]


def test_newer_fields_and_a_rank_round_trip() -> None:
    stored = BlockStored(
        block_hashes=[1],
        parent_block_hash=0,
        token_ids=[5] * 16,
        block_size=16,
        lora_id=None,
        medium="CPU",
        lora_name="adapter",
        extra_keys=[("adapter",)],
        group_idx=1,
    )
    batch = KVEventBatch(ts=2.0, events=[stored, BlockRemoved([1], None)], data_parallel_rank=3)
    assert decode_batch(encode_batch(batch)) == batch


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never used in msgpack
        msgspec.msgpack.encode({"ts": 1.0, "events": []}),  # a map, not vLLM's array
        msgspec.msgpack.encode([1.0, [{"type": "BlockEvicted", "block_hashes": []}]]),
        msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": "x"}]]),
    ],
)
def test_anything_else_is_a_one_line_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError, match="not a KV event batch") as caught:
        decode_batch(payload)
    assert "\n" not in str(caught.value)


def test_sequence_frames_are_eight_bytes_big_endian() -> None:
    assert encode_seq(1) == b"\x00" * 7 + b"\x01"
    assert decode_seq((258).to_bytes(8, "big")) == 258
    assert decode_seq(END_SEQ) == -1
    with pytest.raises(ValueError, match="8 bytes"):
        decode_seq(b"\x01")
