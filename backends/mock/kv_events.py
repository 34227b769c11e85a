"""A mock device's KV cache events: its prefix cache's changes, published as vLLM does.

A ZMQ PUB socket sends each change as one :class:`~backends.kv_events.KVEventBatch`
(``[topic, seq, payload]``); a ROUTER socket replays the buffered batches from the
sequence number a subscriber asks for, then the end marker. The block hashes are the
router's own (``backends.prefix.block_hashes``), and the token ids are the blocks'
bytes (the mock model's tokens), so a router maps them as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Iterable

import structlog
import zmq
import zmq.asyncio

from backends.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_seq,
    encode_batch,
    encode_seq,
)
from backends.prefix import BLOCK_BYTES, StoredRun

# vLLM's default replay buffer: the last 10k engine steps.
DEFAULT_BUFFER_STEPS = 10_000
MEDIUM = "GPU"  # what vLLM names the device's own KV memory

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)


def stored_events(runs: Iterable[StoredRun]) -> list[BlockStored]:
    return [
        BlockStored(
            block_hashes=list(run.hashes),
            parent_block_hash=run.parent,
            token_ids=list(run.data),
            block_size=BLOCK_BYTES,
            lora_id=None,
            medium=MEDIUM,
            lora_name=None,
        )
        for run in runs
    ]


class KVEventPublisher:
    """PUB + replay ROUTER on ``host``; ports 0 are chosen by the system.

    ``drop_first``: fault injection for tests: the first N batches go to the replay
    buffer only, never on the PUB socket, as if the network had lost them.
    """

    def __init__(
        self,
        host: str,
        port: int = 0,
        replay_port: int = 0,
        topic: str = "",
        *,
        buffer_steps: int = DEFAULT_BUFFER_STEPS,
        drop_first: int = 0,
    ) -> None:
        self._host = host
        self._ports = (port, replay_port)
        self._topic = topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = itertools.count()
        self._dropping = drop_first
        self._pub: zmq.Socket[bytes] | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._replayer: asyncio.Task[None] | None = None
        self.endpoint = ""
        self.replay_endpoint = ""
        self.batches_published = 0

    def start(self) -> None:
        pub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        replay = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        try:
            self.endpoint = _bind(pub, self._host, self._ports[0])
            self.replay_endpoint = _bind(replay, self._host, self._ports[1])
        except zmq.ZMQError as error:
            pub.close(linger=0)
            replay.close(linger=0)
            raise OSError(f"kv events: cannot listen on {self._host}: {error}") from None
        self._pub, self._replay = pub, replay
        self._replayer = asyncio.create_task(self._serve_replay(), name="kv-events-replay")

    async def stop(self) -> None:
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
        for socket in (self._pub, self._replay):
            if socket is not None:
                socket.close(linger=0)
        self._pub = self._replay = None

    # -- what the device's prefix cache tells ------------------------------------

    def drop_next(self, count: int) -> None:
        """Fault injection: the next ``count`` batches reach the replay buffer only."""
        self._dropping = count

    def cache_changed(self, runs: list[StoredRun], removed: list[int]) -> None:
        events: list[BlockStored | BlockRemoved | AllBlocksCleared] = [*stored_events(runs)]
        if removed:
            events.append(BlockRemoved(block_hashes=list(removed), medium=MEDIUM))
        self.publish(events)

    def cache_cleared(self) -> None:
        self.publish([AllBlocksCleared()])

    def publish(self, events: list[BlockStored | BlockRemoved | AllBlocksCleared]) -> None:
        """One batch: buffered for replay first, then sent (PUB never blocks: at its
        high-water mark it drops, and the subscriber's gap check asks for a replay)."""
        if self._pub is None:
            return
        seq = next(self._seq)
        payload = encode_batch(KVEventBatch(ts=time.time(), events=events, data_parallel_rank=0))
        self._buffer.append((seq, payload))
        self.batches_published += 1
        if self._dropping:
            self._dropping -= 1
            return
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart((self._topic, encode_seq(seq), payload), flags=zmq.NOBLOCK)

    async def _serve_replay(self) -> None:
        replay = self._replay
        if replay is None:
            return
        while True:
            frames = await replay.recv_multipart()
            if len(frames) != 3 or frames[1]:
                log.warning("kv events: replay request ignored", frames=len(frames))
                continue
            client, _, start = frames
            try:
                start_seq = decode_seq(start)
            except ValueError as error:
                log.warning("kv events: replay request ignored", error=str(error))
                continue
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await replay.send_multipart(
                        (client, b"", self._topic, encode_seq(seq), payload)
                    )
            await replay.send_multipart((client, b"", b"", END_SEQ, b""))


def _bind(socket: zmq.Socket[bytes] | zmq.asyncio.Socket, host: str, port: int) -> str:
    """Binds ``tcp://host:port`` (port 0: any free one); the endpoint to connect to."""
    socket.bind(f"tcp://{host}:{port or '*'}")
    bound = socket.getsockopt_string(zmq.LAST_ENDPOINT)
    return bound.replace("0.0.0.0", "127.0.0.1")
