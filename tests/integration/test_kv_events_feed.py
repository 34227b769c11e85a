"""The KV-event feed over real ZMQ sockets on 127.0.0.1: order, gaps, replay, restarts.

A mock device's publisher (``backends.mock.kv_events``) on one side, the router's
subscription on the other, the prefix index between them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry

from backends.kv_events import encode_seq
from backends.mock.kv_events import KVEventPublisher
from backends.prefix import StoredRun, block_hashes
from router.pool.kv_events import FeedCollector, KVEventFeed, KVEventSubscription
from router.scheduling.prefix import PrefixIndex
from router.settings import KVEventsConfig
from tests.helpers import eventually

PROMPTS = [f"prompt {k}: ".encode() + bytes(range(65, 91)) * 10 for k in range(6)]


def stored(prompt: bytes) -> StoredRun:
    hashes = block_hashes(prompt)
    return StoredRun(hashes, None, prompt[: len(hashes) * 64])


@pytest.fixture
async def feed() -> AsyncIterator[KVEventFeed]:
    index = PrefixIndex()
    feed = KVEventFeed(index)
    yield feed
    await feed.close()


async def start(
    feed: KVEventFeed, *, replay: bool = True
) -> tuple[KVEventPublisher, KVEventSubscription]:
    publisher = KVEventPublisher("127.0.0.1", topic="kv-events")
    publisher.start()
    config = KVEventsConfig(
        endpoint=publisher.endpoint,
        replay_endpoint=publisher.replay_endpoint if replay else None,
        topic="kv-events",
    )
    subscription = feed.subscribe("dev", config)
    return publisher, subscription


def held(feed: KVEventFeed, prompt: bytes) -> int:
    return feed.subscriptions["dev"]._index.matched_blocks(block_hashes(prompt)).get("dev", 0)


async def connected(publisher: KVEventPublisher, subscription: KVEventSubscription) -> None:
    """Publishes empty batches until one arrives: the subscription is live from here."""
    while subscription.stats.batches == 0:
        publisher.publish([])
        try:
            await eventually(lambda: subscription.stats.batches > 0, timeout_s=0.2)
        except AssertionError:
            continue


async def test_stored_and_removed_blocks_reach_the_index(feed: KVEventFeed) -> None:
    publisher, subscription = await start(feed)
    try:
        await connected(publisher, subscription)
        publisher.cache_changed([stored(PROMPTS[0]), stored(PROMPTS[1])], [])
        blocks = len(block_hashes(PROMPTS[0]))
        await eventually(lambda: held(feed, PROMPTS[0]) == blocks and held(feed, PROMPTS[1]) > 0)
        # Evicting the tail of prompt 0 leaves its head matched.
        publisher.cache_changed([], list(block_hashes(PROMPTS[0])[2:]))
        await eventually(lambda: held(feed, PROMPTS[0]) == 2)
        publisher.cache_cleared()
        await eventually(lambda: held(feed, PROMPTS[1]) == 0)
        assert subscription.stats.gaps == subscription.stats.lost == subscription.stats.bad == 0
    finally:
        await publisher.stop()


async def test_batches_published_before_the_subscription_are_replayed(
    feed: KVEventFeed,
) -> None:
    publisher = KVEventPublisher("127.0.0.1")
    publisher.start()
    try:
        publisher.cache_changed([stored(PROMPTS[0])], [])  # nobody listens yet
        config = KVEventsConfig(
            endpoint=publisher.endpoint, replay_endpoint=publisher.replay_endpoint
        )
        subscription = feed.subscribe("dev", config)
        await eventually(lambda: held(feed, PROMPTS[0]) > 0)
        assert subscription.stats.replayed == 1
    finally:
        await publisher.stop()


async def test_a_gap_is_filled_from_the_replay_socket(feed: KVEventFeed) -> None:
    publisher, subscription = await start(feed)
    try:
        await connected(publisher, subscription)
        # Three batches never go out on PUB: the fourth shows the gap.
        publisher.drop_next(3)
        for prompt in PROMPTS[:4]:
            publisher.cache_changed([stored(prompt)], [])
        await eventually(lambda: all(held(feed, p) > 0 for p in PROMPTS[:4]))
        assert subscription.stats.gaps == 1
        assert subscription.stats.replayed >= 3  # the lost ones (and the fourth, maybe)
        assert subscription.stats.lost == 0
        # /metrics says the same, per backend.
        registry = CollectorRegistry()
        registry.register(FeedCollector(feed))
        labels = {"backend": subscription.backend_id}
        assert registry.get_sample_value("hetero_router_kv_event_gaps_total", labels) == 1
        replayed_name = "hetero_router_kv_event_replayed_batches_total"
        replayed = registry.get_sample_value(replayed_name, labels)
        assert replayed == subscription.stats.replayed
        assert registry.get_sample_value("hetero_router_kv_event_lost_batches_total", labels) == 0
    finally:
        await publisher.stop()


async def test_without_a_replay_socket_a_gap_is_counted_lost_and_the_feed_goes_on(
    feed: KVEventFeed,
) -> None:
    publisher, subscription = await start(feed, replay=False)
    try:
        await connected(publisher, subscription)  # (the batches before it joined: lost)
        lost, gaps = subscription.stats.lost, subscription.stats.gaps
        publisher.drop_next(2)
        for prompt in PROMPTS[:3]:
            publisher.cache_changed([stored(prompt)], [])
        await eventually(lambda: held(feed, PROMPTS[2]) > 0)
        assert held(feed, PROMPTS[0]) == held(feed, PROMPTS[1]) == 0
        assert subscription.stats.lost == lost + 2
        assert subscription.stats.gaps == gaps + 1
    finally:
        await publisher.stop()


async def test_a_restarted_engine_is_forgotten_then_followed_from_its_new_start(
    feed: KVEventFeed,
) -> None:
    publisher, subscription = await start(feed)
    port = int(publisher.endpoint.rpartition(":")[2])
    replay_port = int(publisher.replay_endpoint.rpartition(":")[2])
    await connected(publisher, subscription)
    publisher.cache_changed([stored(PROMPTS[0])], [])
    await eventually(lambda: held(feed, PROMPTS[0]) > 0)
    await publisher.stop()
    # The same ports, a new sequence from 0: what the old engine held is gone.
    restarted = KVEventPublisher("127.0.0.1", port, replay_port, topic="kv-events")
    # ZMQ lets go of a closed socket's ports on its I/O thread, a moment after close.
    for _ in range(500):
        try:
            restarted.start()
            break
        except OSError:
            await asyncio.sleep(0.01)
    else:
        pytest.fail("the old publisher's ports were never released")
    try:
        while held(feed, PROMPTS[1]) == 0:
            restarted.cache_changed([stored(PROMPTS[1])], [])
            try:
                await eventually(lambda: held(feed, PROMPTS[1]) > 0, timeout_s=0.3)
            except AssertionError:
                continue
        assert subscription.stats.restarts == 1
        assert held(feed, PROMPTS[0]) == 0
    finally:
        await restarted.stop()


async def test_bad_messages_are_logged_and_skipped(feed: KVEventFeed) -> None:
    context = zmq.asyncio.Context.instance()
    rogue = context.socket(zmq.PUB)
    port = rogue.bind_to_random_port("tcp://127.0.0.1")
    subscription = feed.subscribe("dev", KVEventsConfig(endpoint=f"tcp://127.0.0.1:{port}"))
    good = b"\x93\xcb?\xf8\x00\x00\x00\x00\x00\x00\x90\x00"  # [1.5, [], 0]
    try:
        seq = 0
        while subscription.stats.batches == 0:
            await rogue.send_multipart([b"", b"short"])  # two frames
            await rogue.send_multipart([b"", b"\x01", b""])  # a 1-byte seq
            await rogue.send_multipart([b"", encode_seq(seq), b"\xc1"])  # no msgpack
            await rogue.send_multipart([b"", encode_seq(seq + 1), good])
            seq += 2
            try:
                await eventually(lambda: subscription.stats.batches > 0, timeout_s=0.2)
            except AssertionError:
                continue
        assert subscription.stats.bad >= 3
        assert not subscription._task or not subscription._task.done()
    finally:
        rogue.close(linger=0)
