"""The KV-event feed: each backend's own word on what its prefix cache holds.

Per backend whose pool entry has ``kv_events``, one task subscribes to the engine's
PUB socket (``backends.kv_events``: vLLM's format, which mock devices publish too)
and applies each batch to the prefix index: stored blocks are recorded, removed ones
dropped, a cleared cache forgotten. So every router replica routes by the same
picture, whoever sent the prompts, and none goes on believing in evicted blocks.

Sequence numbers keep it whole. A subscription starts by asking the replay socket
for everything the engine still buffers (from 0), then applies live batches in order;
a gap (a batch lost on the way, a slow join) asks for a replay from the first one
missing; a number that goes back means the engine restarted: what it held is
forgotten and the new sequence applied from its start. A bad message is logged and
skipped; nothing an engine sends stops the feed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import zmq
import zmq.asyncio
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from backends.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    decode_batch,
    decode_seq,
    encode_seq,
)
from router.logging import get_logger
from router.pool.kv_block_map import BlockMap, block_map_for
from router.scheduling.prefix import PrefixIndex
from router.settings import KVEventsConfig

log = get_logger(__name__)

# A replay socket that does not answer within this is given up on until the next gap.
REPLAY_TIMEOUT_S = 5.0


@dataclass
class FeedStats:
    """What one subscription saw, for tests and logs."""

    batches: int = 0  # applied, live or replayed
    replayed: int = 0  # of those, from the replay socket
    gaps: int = 0  # gaps in the live sequence
    lost: int = 0  # batches neither the live socket nor a replay delivered
    bad: int = 0  # messages or events that could not be read
    restarts: int = 0  # times the sequence went back (the engine restarted)


class KVEventSubscription:
    """One backend's events into the prefix index."""

    def __init__(
        self,
        backend_id: str,
        config: KVEventsConfig,
        index: PrefixIndex,
        block_map: BlockMap,
        context: zmq.asyncio.Context,
    ) -> None:
        self.backend_id = backend_id
        self.config = config
        self._index = index
        self._map = block_map
        self._context = context
        self.stats = FeedStats()
        self._next_seq = 0  # the first batch not applied yet
        self._live_last = -1  # the last sequence number seen on the live socket
        self._replay: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        # Set once the first replay (of what the engine did before) is over.
        self.caught_up = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self.backend_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._close_replay()

    async def _run(self) -> None:
        subscriber = self._context.socket(zmq.SUB)
        try:
            subscriber.setsockopt(zmq.SUBSCRIBE, self.config.topic.encode())
            subscriber.connect(self.config.endpoint)
            log.info(
                "kv events: subscribed",
                backend=self.backend_id,
                endpoint=self.config.endpoint,
                replay=self.config.replay_endpoint,
            )
            await self._catch_up(self._next_seq)  # what the engine did before we came
            self.caught_up = True
            while True:
                frames = await subscriber.recv_multipart()
                try:
                    await self._received(frames)
                except (zmq.ZMQError, ValueError) as error:  # the next message may do better
                    self._bad(f"{type(error).__name__}: {error}")
        finally:
            subscriber.close(linger=0)

    async def _received(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            self._bad(f"a message of {len(frames)} frames, not [topic, seq, payload]")
            return
        try:
            seq = decode_seq(frames[1])
        except ValueError as error:
            self._bad(str(error))
            return
        if seq <= self._live_last:
            # PUB never repeats a number: the engine started over.
            self.stats.restarts += 1
            log.info("kv events: sequence restarted", backend=self.backend_id, seq=seq)
            self._index.forget(self.backend_id)
            self._map.clear()
            self._next_seq = 0
        self._live_last = seq
        if seq < self._next_seq:
            return  # a replay applied it already
        if seq > self._next_seq:
            self.stats.gaps += 1
            log.info(
                "kv events: gap, replaying",
                backend=self.backend_id,
                expected=self._next_seq,
                received=seq,
            )
            await self._catch_up(self._next_seq)
            if seq < self._next_seq:
                return
            self._lost(seq)
        self._apply(seq, frames[2])

    async def _catch_up(self, start: int) -> None:
        """Applies what the replay socket holds from ``start`` on (nothing without one)."""
        if self.config.replay_endpoint is None:
            return
        if self._replay is None:
            self._replay = self._context.socket(zmq.DEALER)
            self._replay.connect(self.config.replay_endpoint)
        replay = self._replay
        await replay.send_multipart((b"", encode_seq(start)))
        while True:
            if not await replay.poll(REPLAY_TIMEOUT_S * 1000):
                log.warning(
                    "kv events: replay did not answer",
                    backend=self.backend_id,
                    endpoint=self.config.replay_endpoint,
                    timeout_s=REPLAY_TIMEOUT_S,
                )
                self._close_replay()  # its late answer must not be read as the next one
                return
            frames = await replay.recv_multipart()
            # vLLM 0.32 sends [b"", topic, seq, payload]; its later builds leave out the topic.
            if len(frames) not in (3, 4) or frames[0]:
                self._bad(f"a replay message of {len(frames)} frames")
                continue
            try:
                seq = decode_seq(frames[-2])
            except ValueError as error:
                self._bad(str(error))
                continue
            if seq < 0:
                return  # the end marker
            if seq < self._next_seq:
                continue
            self._lost(seq)
            self.stats.replayed += 1
            self._apply(seq, frames[-1])

    def _lost(self, seq: int) -> None:
        """Batches before ``seq`` that nothing will deliver any more."""
        if seq > self._next_seq:
            missing = seq - self._next_seq
            self.stats.lost += missing
            log.warning(
                "kv events: batches lost",
                backend=self.backend_id,
                first=self._next_seq,
                count=missing,
            )
            self._next_seq = seq

    def _apply(self, seq: int, payload: bytes) -> None:
        self._next_seq = seq + 1
        try:
            batch = decode_batch(payload)
        except ValueError as error:
            self._bad(str(error))
            return
        index, backend_id = self._index, self.backend_id
        for event in batch.events:
            try:
                if isinstance(event, BlockStored):
                    index.record(backend_id, self._map.stored(event))
                elif isinstance(event, BlockRemoved):
                    index.remove(backend_id, self._map.removed(event.block_hashes))
                elif isinstance(event, AllBlocksCleared):
                    index.forget(backend_id)
                    self._map.clear()
            except ValueError as error:
                self._bad(str(error))
        self.stats.batches += 1

    def _bad(self, problem: str) -> None:
        self.stats.bad += 1
        log.warning("kv events: message ignored", backend=self.backend_id, problem=problem)

    def _close_replay(self) -> None:
        if self._replay is not None:
            self._replay.close(linger=0)
            self._replay = None


class KVEventFeed:
    """The subscriptions of a pool, one per backend that publishes events."""

    def __init__(self, index: PrefixIndex) -> None:
        self._index = index
        self._context = zmq.asyncio.Context.instance()
        self.subscriptions: dict[str, KVEventSubscription] = {}

    def subscribe(self, backend_id: str, config: KVEventsConfig) -> KVEventSubscription:
        """Starts feeding ``backend_id``'s events (ConfigError for a bad tokenizer)."""
        if backend_id in self.subscriptions:
            raise ValueError(f"backend {backend_id} is subscribed already")
        block_map = block_map_for(config.tokenizer)
        subscription = KVEventSubscription(
            backend_id, config, self._index, block_map, self._context
        )
        self.subscriptions[backend_id] = subscription
        subscription.start()
        return subscription

    async def unsubscribe(self, backend_id: str) -> None:
        subscription = self.subscriptions.pop(backend_id, None)
        if subscription is not None:
            await subscription.stop()

    async def close(self) -> None:
        for backend_id in list(self.subscriptions):
            await self.unsubscribe(backend_id)


class FeedCollector(Collector):
    """The feed's counts per backend on /metrics, read when scraped (the feed itself
    keeps plain integers): a backend that leaves takes its series with it."""

    # (metric, its help, the FeedStats field)
    _COUNTS = (
        ("batches", "KV event batches applied to the prefix index, live or replayed", "batches"),
        ("replayed_batches", "KV event batches fetched from the replay endpoint", "replayed"),
        ("gaps", "Gaps in the live sequence of KV event batches", "gaps"),
        (
            "lost_batches",
            "KV event batches that neither the live feed nor a replay delivered",
            "lost",
        ),
        ("bad_messages", "KV event messages or events that could not be read", "bad"),
        (
            "restarts",
            "Times a backend's KV event sequence went back (the engine restarted)",
            "restarts",
        ),
    )

    def __init__(self, feed: KVEventFeed) -> None:
        self._feed = feed

    def describe(self) -> list[Metric]:
        return [
            CounterMetricFamily(f"hetero_router_kv_event_{name}", help_, labels=["backend"])
            for name, help_, _ in self._COUNTS
        ]

    def collect(self) -> Iterator[Metric]:
        for name, help_, field in self._COUNTS:
            family = CounterMetricFamily(
                f"hetero_router_kv_event_{name}", help_, labels=["backend"]
            )
            for backend_id, subscription in self._feed.subscriptions.items():
                family.add_metric([backend_id], getattr(subscription.stats, field))
            yield family
