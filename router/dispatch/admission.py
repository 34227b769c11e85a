"""Admission: an adaptive bound on the requests served at once, a bounded fair queue
per priority, and the checks the doors make before a request may queue at all.

Up to ``limit`` requests are served at once. The limit adapts to the latency the
backends deliver, the time from admission to the first token and the time per
output token (router/scheduling/concurrency_limit.py, a gradient controller);
``max_in_flight`` is its ceiling, and with the adaptive limit off the limit itself.

A request beyond the limit waits in the queue of its priority (0..9, larger is
more urgent). Each freed slot goes to the most urgent non-empty queue; within one,
clients take turns (one request each, round robin) and each client's requests keep
their order, so urgent requests overtake, equals of one client never do, and a
client with hundreds waiting delays another's request by one of its own at most.
A request whose queue already holds ``queue_limit`` is shed at once with
``OverloadedError`` (RESOURCE_EXHAUSTED / 429) and a retry hint.

Before a request reaches the queue, its door calls ``check_door``: a client over
its request rate (a token bucket per client: ``burst`` requests at once, refilled at
``per_s``; the refusal's retry hint is when the next request's token will be there)
or already holding its cap of open streams is refused, and so is a request that would
wait longer than half of what its TTFT target leaves after the backends' usual
first token, at once rather than after waiting to be late. The wait is estimated
from how fast slots free up: by Little's law a slot is held for the busy
slot-seconds over the releases of the last ``_HOLD_WINDOW`` completions, so with
``n`` in flight one frees every ``hold / n`` seconds; a queue that has not moved for
longer than that is taken at its word (a stuck backend makes every estimate
longer). Before anything has finished (a router just started) there is nothing to
tell by, and only ``queue_limit`` bounds the queue: the limit's slow start lets a
burst in as fast as the backends answer it. A request the door let queue is
admitted within the limit it queued under (a cut of the limit while it waits does
not strand it behind the excess), and refused once it has waited all its TTFT
target leaves after the backends' first token (when the estimate was wrong, or
there was none): nothing waits in the queue to be late.

The door names the client and its TTFT target once, in ``client_stream``; they ride
from there to ``acquire`` in a context variable, across the dispatcher, which need
not know them.

``saturation`` says, cheaply, whether every slot is taken: readiness reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator

from backends.errors import OverloadedError
from router.metrics import RouterMetrics
from router.scheduling.concurrency_limit import GradientLimit, LimitConfig, Signal
from router.scheduling.service_level import DEFAULT_SLO_CLASS

PRIORITIES = 10  # priority levels: 0 (least urgent) .. 9 (most urgent)
RETRY_AFTER_MIN_S = 0.05
RETRY_AFTER_MAX_S = 30.0
# The hint when nothing finished recently to measure a rate with.
RETRY_AFTER_UNKNOWN_S = 1.0
# Completions the time a slot is held is measured over.
_HOLD_WINDOW = 64
# Weight of each new first-token latency in the running estimate of what the backends
# take after admission.
_SERVICE_WEIGHT = 0.1
# The share of what a TTFT target leaves after the backends' first token that the
# queue may take: the rest absorbs the estimate's error (a wait of k release gaps
# varies by about 1/sqrt(k)), so that what queues is rarely late after all.
_QUEUE_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class ClientRate:
    """The request rate one client may start requests at: ``burst`` at once, then
    ``per_s`` a second (0: no limit)."""

    per_s: float = 0.0
    burst: int = 1


@dataclasses.dataclass
class _Bucket:
    tokens: float
    at: float  # when ``tokens`` was counted


# Buckets are swept of full ones (a full bucket is no different from none) whenever
# there are this many more than after the last sweep.
_BUCKET_SWEEP = 1024


@dataclasses.dataclass(frozen=True)
class _Entry:
    """What the door knows of a request that the queue needs: whose it is, and how long
    it may wait (None: as long as the queue limit lets it)."""

    client: str = ""
    max_wait_s: float | None = None
    labels: tuple[str, str] = ("", DEFAULT_SLO_CLASS)  # model, SLO class: shed's labels


# Set by the door (client_stream) for the requests of its block.
_ENTRY: contextvars.ContextVar[_Entry] = contextvars.ContextVar("admission", default=_Entry())  # noqa: B039  # frozen: never mutated


@dataclasses.dataclass
class _Waiter:
    future: asyncio.Future[None]
    # The limit when it queued: the door let it in on the wait that limit gave, so a
    # later cut does not strand it (it is admitted while fewer than this are in flight).
    promised_limit: int
    expiry: asyncio.TimerHandle | None = None  # refuses it when its wait runs out


class _FairQueue:
    """The waiters of one priority: FIFO per client, clients served in turn."""

    def __init__(self) -> None:
        self._clients: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, client: str, waiter: _Waiter) -> None:
        self._clients.setdefault(client, deque()).append(waiter)
        self._size += 1

    def peek(self) -> _Waiter:
        """The next waiter in turn (the queue is not empty)."""
        return next(iter(self._clients.values()))[0]

    def pop(self) -> _Waiter:
        """The next waiter in turn; its client goes to the back of the rotation."""
        client, waiters = next(iter(self._clients.items()))
        waiter = waiters.popleft()
        if waiters:
            self._clients.move_to_end(client)
        else:
            del self._clients[client]
        self._size -= 1
        return waiter

    def remove(self, client: str, waiter: _Waiter) -> None:
        waiters = self._clients.get(client)
        if waiters is None or waiter not in waiters:
            return
        waiters.remove(waiter)
        if not waiters:
            del self._clients[client]
        self._size -= 1

    def ahead_of(self, client: str) -> int:
        """Waiters served before a request of ``client`` that joined now (at most)."""
        own = len(self._clients.get(client, ()))
        others = sum(min(len(w), own + 1) for c, w in self._clients.items() if c != client)
        return own + others


class AdmissionGate:
    def __init__(
        self,
        max_in_flight: int,
        queue_limit: int,
        metrics: RouterMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        adaptive: LimitConfig | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if queue_limit < 0:
            raise ValueError("queue_limit must be >= 0")
        self.max_in_flight = max_in_flight
        self.queue_limit = queue_limit
        self._metrics = metrics
        self._clock = clock
        self._limiter: GradientLimit | None = None
        if adaptive is not None:
            ceiling = min(adaptive.maximum, max_in_flight)
            config = dataclasses.replace(
                adaptive, maximum=ceiling, minimum=min(adaptive.minimum, ceiling)
            )
            self._limiter = GradientLimit(config, clock())
        self._in_flight = 0
        self._queues = tuple(_FairQueue() for _ in range(PRIORITIES))
        # Slot-seconds since start (the integral of in_flight over time), when it was
        # last brought up to date, and its value at each recent release.
        self._busy = 0.0
        self._busy_at = clock()
        self._busy_at_release: deque[float] = deque(maxlen=_HOLD_WINDOW)
        # When the queue last moved: a release, or the moment every slot was taken.
        self._progress_at = self._busy_at
        self._service_s: float | None = None  # running first-token latency after admission
        self._client_streams: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._buckets_swept_at = 0  # how many buckets the last sweep left
        for priority in range(PRIORITIES):
            self._depth_changed(priority)
        self._metrics.concurrency_limit.set(self.limit)

    @property
    def limit(self) -> int:
        """Requests served at once: the adaptive limit, else ``max_in_flight``."""
        return self.max_in_flight if self._limiter is None else self._limiter.limit

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet released."""
        return self._in_flight

    def waiting(self, priority: int | None = None) -> int:
        """Requests queued at ``priority``, or at every priority when None."""
        if priority is None:
            return sum(len(queue) for queue in self._queues)
        return len(self._queues[priority])

    def saturation(self) -> str | None:
        """``saturated: limit 37, 37 in flight, 12 queued`` while every slot is taken."""
        if self._in_flight < self.limit:
            return None
        queued = self.waiting()
        return f"saturated: limit {self.limit}, {self._in_flight} in flight, {queued} queued"

    # -- the doors ------------------------------------------------------------

    def check_door(
        self,
        client: str,
        priority: int,
        ttft_target_s: float | None,
        client_cap: int,
        client_rate: ClientRate = ClientRate(),
        *,
        labels: tuple[str, str] = ("", DEFAULT_SLO_CLASS),
    ) -> None:
        """Refuses (OverloadedError) a request that should not even queue: its client is
        over ``client_rate``, or holds ``client_cap`` open streams (0: no cap), or the
        queue ahead of it would take longer than its TTFT target (None: no target)
        allows. A request let through takes one of its client's rate tokens. ``labels``
        (model, SLO class) label what is shed."""
        if client_rate.per_s > 0:
            self._take_rate_token(client, client_rate, labels)
        open_streams = self._client_streams.get(client, 0)
        if client_cap and open_streams >= client_cap:
            self._metrics.shed.labels(*labels, "client_cap").inc()
            hold = self._hold_s()
            raise OverloadedError(
                f"{_who(client)} has {open_streams} streams open, the most one client may "
                f"(max_streams_per_client {client_cap}); retry when one of them ends",
                retry_after_s=_bounded(hold / open_streams if hold else RETRY_AFTER_UNKNOWN_S),
            )
        if ttft_target_s is None:
            return
        wait = self.expected_wait_s(priority, client)
        allowed_s = _QUEUE_SHARE * (ttft_target_s - (self._service_s or 0.0))
        if wait is None or wait == 0.0 or wait <= allowed_s:
            return  # nothing to tell by yet (the queue limit holds), a free slot, in time
        self._metrics.shed.labels(*labels, "queue_time").inc()
        raise OverloadedError(
            f"the router is at capacity ({self._in_flight} requests in flight, limit "
            f"{self.limit}, {self.waiting()} queued): the wait for admission, about "
            f"{wait * 1000:.0f} ms, would miss the {ttft_target_s * 1000:.0f} ms time to "
            "first token",
            retry_after_s=_bounded(wait),
        )

    def _take_rate_token(self, client: str, rate: ClientRate, labels: tuple[str, str]) -> None:
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            self._sweep_buckets(rate, now)
            bucket = self._buckets[client] = _Bucket(float(rate.burst), now)
        else:
            bucket.tokens = min(float(rate.burst), bucket.tokens + (now - bucket.at) * rate.per_s)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        self._metrics.shed.labels(*labels, "client_rate").inc()
        refill_s = (1.0 - bucket.tokens) / rate.per_s
        raise OverloadedError(
            f"{_who(client)} is over its request rate (max_requests_per_s_per_client "
            f"{rate.per_s:g}, bursts of {rate.burst}); retry in {refill_s * 1000:.0f} ms",
            retry_after_s=max(refill_s, RETRY_AFTER_MIN_S),
        )

    def _sweep_buckets(self, rate: ClientRate, now: float) -> None:
        """Forgets the clients whose buckets have refilled: memory follows the clients
        that are sending, not all that ever sent."""
        if len(self._buckets) < self._buckets_swept_at + _BUCKET_SWEEP:
            return
        full_after_s = {
            client: (rate.burst - bucket.tokens) / rate.per_s - (now - bucket.at)
            for client, bucket in self._buckets.items()
        }
        for client, left_s in full_after_s.items():
            if left_s <= 0:
                del self._buckets[client]
        self._buckets_swept_at = len(self._buckets)

    @contextlib.contextmanager
    def client_stream(
        self,
        client: str,
        ttft_target_s: float | None = None,
        labels: tuple[str, str] = ("", DEFAULT_SLO_CLASS),
    ) -> Iterator[None]:
        """Counts an open stream of ``client`` while the block runs; the block's
        requests queue as ``client``'s, and are refused if they wait so long that their
        TTFT target (None: none) is out of reach. ``labels`` (model, SLO class) label
        what of them is shed."""
        self._client_streams[client] = self._client_streams.get(client, 0) + 1
        max_wait_s = None
        if ttft_target_s is not None:
            max_wait_s = max(ttft_target_s - (self._service_s or 0.0), 0.0)
        token = _ENTRY.set(_Entry(client, max_wait_s, labels))
        try:
            yield
        finally:
            _ENTRY.reset(token)
            left = self._client_streams[client] - 1
            if left:
                self._client_streams[client] = left
            else:
                del self._client_streams[client]  # memory follows the clients present

    def expected_wait_s(self, priority: int, client: str = "") -> float | None:
        """Seconds a request of ``priority`` and ``client`` arriving now would wait for
        a slot: 0 when one is free, None when nothing has finished yet to tell."""
        ahead = sum(len(queue) for queue in self._queues[priority + 1 :])
        ahead += self._queues[priority].ahead_of(client)
        releases_needed = self._in_flight - self.limit + ahead + 1
        if releases_needed <= 0:
            return 0.0
        hold = self._hold_s()
        if hold is None or self._in_flight == 0:
            return None
        stalled_s = self._clock() - self._progress_at  # no slot freed for this long
        return releases_needed * max(hold / self._in_flight, stalled_s)

    # -- the dispatcher -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admitted(self, priority: int) -> AsyncIterator[bool]:
        """Holds a slot while the block runs; yields whether the request had to queue."""
        queued = await self.acquire(priority)
        try:
            yield queued
        finally:
            self.release()

    async def acquire(self, priority: int) -> bool:
        """Takes a slot, waiting for one if all are taken; True when it had to wait.

        Raises OverloadedError when the queue of ``priority`` is full. A caller
        cancelled while waiting leaves the queue and holds nothing.
        """
        if not 0 <= priority < PRIORITIES:
            raise ValueError(f"priority must be between 0 and {PRIORITIES - 1}, got {priority}")
        if self._in_flight < self.limit:
            self._admit_waiters()  # those before it first (none, unless one is leaving)
            if self._in_flight < self.limit:
                self._take_slot()
                return False
        queue = self._queues[priority]
        if len(queue) >= self.queue_limit:
            self._metrics.shed.labels(*_ENTRY.get().labels, "queue_full").inc()
            raise OverloadedError(
                f"the router is at capacity ({self._in_flight} requests in flight, limit "
                f"{self.limit}) and the queue for priority {priority} is full "
                f"({len(queue)} waiting)",
                retry_after_s=self.retry_after_s(priority),
            )
        entry = _ENTRY.get()
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), self.limit)
        if entry.max_wait_s is not None:
            expire = functools.partial(self._expire, priority, entry, waiter)
            waiter.expiry = loop.call_later(entry.max_wait_s, expire)
        queue.push(entry.client, waiter)
        self._depth_changed(priority)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # the slot arrived as the caller left: pass it on
            else:
                queue.remove(entry.client, waiter)
                self._depth_changed(priority)
            raise
        finally:
            if waiter.expiry is not None:
                waiter.expiry.cancel()
        return True

    def _expire(self, priority: int, entry: _Entry, waiter: _Waiter) -> None:
        """A queued request whose wait has used up its TTFT target: refused now rather
        than admitted late (the door's estimate was wrong, or nothing has finished yet
        to estimate with)."""
        if waiter.future.done():
            return
        self._queues[priority].remove(entry.client, waiter)
        self._depth_changed(priority)
        self._metrics.shed.labels(*entry.labels, "queue_expired").inc()
        waiter.future.set_exception(
            OverloadedError(
                f"the router is at capacity ({self._in_flight} requests in flight, limit "
                f"{self.limit}): the request waited {entry.max_wait_s or 0.0:.2f} s for "
                "admission, all its time to first token allowed",
                retry_after_s=self.retry_after_s(priority),
            )
        )

    def release(self) -> None:
        """Frees a slot: to the next waiter of the most urgent queue, else to the pool."""
        self._account_busy()
        self._busy_at_release.append(self._busy)
        self._progress_at = self._busy_at
        self._in_flight -= 1
        self._admit_waiters()

    def observe_first_token(self, latency_s: float) -> None:
        """The time from a request's admission to its first frame: the limit's signal,
        and what the door adds to the queue wait."""
        if self._service_s is None:
            self._service_s = latency_s
        else:
            self._service_s += _SERVICE_WEIGHT * (latency_s - self._service_s)
        self._observe(Signal.FIRST_TOKEN, latency_s)

    def observe_time_per_token(self, latency_s: float) -> None:
        """A completed request's time per output token: the limit's decode-side signal."""
        self._observe(Signal.PER_TOKEN, latency_s)

    def _observe(self, signal: Signal, latency_s: float) -> None:
        limiter = self._limiter
        if limiter is None:
            return
        moved = limiter.observe(signal, latency_s, self._clock(), self._in_flight)
        if not moved:
            return
        self._metrics.concurrency_limit.set(limiter.limit)
        for kind, latency in limiter.signals.items():
            if latency.sample_s is not None and latency.baseline_s is not None:
                gauge = self._metrics.concurrency_latency
                gauge.labels(kind.value, "sample").set(latency.sample_s)
                gauge.labels(kind.value, "baseline").set(latency.baseline_s)
        self._admit_waiters()  # a higher limit lets waiters in now

    def count_write_stall(self, door: str) -> None:
        """A stream of ``door`` was cut because its reader stopped reading."""
        self._metrics.write_stalls.labels(door).inc()

    def retry_after_s(self, priority: int) -> float:
        """Seconds until a request of ``priority`` arriving now would likely be admitted."""
        wait = self.expected_wait_s(priority, _ENTRY.get().client)
        return RETRY_AFTER_UNKNOWN_S if wait is None else _bounded(wait)

    # -- inside ---------------------------------------------------------------

    def _take_slot(self) -> None:
        self._account_busy()
        self._in_flight += 1
        if self._in_flight == self.limit:
            self._progress_at = self._busy_at  # saturated from now: the queue starts here
        if self._limiter is not None:
            self._limiter.admitted(self._in_flight)

    def _admit_waiters(self) -> None:
        """Hands free slots to the next waiters of the most urgent queues, each within
        the limit it queued under."""
        for priority in range(PRIORITIES - 1, -1, -1):
            queue = self._queues[priority]
            if not queue:
                continue
            while queue:
                if queue.peek().future.done():  # cancelled, its caller still leaving
                    queue.pop()
                    continue
                if self._in_flight >= max(self.limit, queue.peek().promised_limit):
                    self._depth_changed(priority)
                    return
                self._take_slot()
                queue.pop().future.set_result(None)
            self._depth_changed(priority)

    def _account_busy(self) -> None:
        now = self._clock()
        self._busy += self._in_flight * (now - self._busy_at)
        self._busy_at = now

    def _hold_s(self) -> float | None:
        """Mean seconds a slot is held, over the recent releases (None: fewer than two)."""
        releases = self._busy_at_release
        if len(releases) < 2:
            return None
        return (releases[-1] - releases[0]) / (len(releases) - 1)

    def _depth_changed(self, priority: int) -> None:
        self._metrics.admission_queue_depth.labels(str(priority)).set(len(self._queues[priority]))


def _bounded(retry_after_s: float) -> float:
    return min(max(retry_after_s, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)


def _who(client: str) -> str:
    """How a refusal names the client: never a token, only where it comes from."""
    kind, _, name = client.partition(":")
    return f"client {name}" if kind == "peer" else "this token"
