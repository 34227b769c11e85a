"""KV cache events as vLLM publishes them (``--kv-events-config``), for both ends.

An engine tells who listens which prefix blocks it now holds and which it dropped:
a ZMQ PUB socket sends multipart messages ``[topic, seq, payload]`` (``seq`` an
8-byte big-endian counter from 0, ``payload`` a msgpack :class:`KVEventBatch`), and
a ROUTER socket replays what a subscriber missed: it sends ``[b"", seq]`` from a
DEALER, and gets ``[b"", topic, seq, payload]`` for every buffered batch from ``seq``
on, then ``[b"", b"", END_SEQ, b""]`` (vLLM 0.32; later builds leave the topic out,
and a subscriber reads both).

The layout is vLLM 0.32's (``vllm/distributed/kv_events.py``): a batch is an array
``[ts, events, data_parallel_rank]`` (vLLM's publisher sets the rank, 0 without data
parallelism); each event is a map tagged ``{"type": "BlockStored", ...}``, its fields
at their default left out. Block hashes are 64-bit integers (vLLM's default,
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``) or bytes. Mock devices publish the same, so
one subscriber serves both.
"""

from __future__ import annotations

from typing import Any

import msgspec

# A block hash as published: vLLM's default is an int; with
# VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 it sends the hash's bytes.
ExternalBlockHash = int | bytes

SEQ_BYTES = 8
END_SEQ = (-1).to_bytes(SEQ_BYTES, "big", signed=True)
# vLLM's default topic is "" (every message); its docs use "kv-events".
DEFAULT_TOPIC = "kv-events"


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """One change to an engine's prefix cache (tagged by class name)."""


class BlockStored(KVCacheEvent):
    """Blocks that became cached: ``block_hashes`` chained after ``parent_block_hash``
    (None: from the prompt's start), ``token_ids`` the tokens they cover
    (``block_size`` a block), in order."""

    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    """Blocks the engine evicted."""

    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    """The engine dropped its whole prefix cache (a reset)."""


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one message carries: the events of one engine step, in order."""

    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """The batch in ``payload``; ValueError (one line) for anything else."""
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError as error:  # ValidationError is one too
        raise ValueError(f"not a KV event batch: {error}") from None


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big", signed=True)


def decode_seq(frame: bytes) -> int:
    """A sequence frame's number; ValueError when it is not 8 bytes."""
    if len(frame) != SEQ_BYTES:
        raise ValueError(f"a sequence number is {SEQ_BYTES} bytes, not {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)
