"""One simulated device: the state of the mock engine's loop, and the router's view of it.

The engine's state is what ``backends.mock.engine.DeviceEngine`` keeps (waiting,
prefilling, running sequences, KV tokens reserved, leases, prefix cache), kept as
counters so that a decode step costs the same whatever the batch; the router's
counters are those the daemon keeps per backend (router.pool.registry).
"""

from __future__ import annotations

import math
import sys
from array import array
from collections import deque

from backends.base import HandoffMode
from backends.prefix import BLOCK_BYTES, PrefixCache
from router.scheduling.plan import Plan
from router.scheduling.snapshot import BackendView
from router.sim.cluster import DeviceSpec
from router.sim.metrics import FloatArray
from router.sim.results import DeviceStats, Outcome
from router.sim.workload import RequestSpec

# Prompt tokens one prefix block covers: the mock's tokens are bytes.
BLOCK_TOKENS = BLOCK_BYTES
# A prefix cache this large never evicts (``simulate --unbounded-prefix-cache``).
UNBOUNDED_CACHE_BLOCKS = sys.maxsize
# What the mock adapter offers (backends/mock/adapter.py): a pull by the decode side, or a
# relay through the router. Both take the same modelled wire time, so the simulator times
# them alike.
_HANDOFF = frozenset({HandoffMode.SEQUENTIAL, HandoffMode.RELAY})


class SimRequest:
    """One request, on whichever device holds it now (never two at once)."""

    __slots__ = (
        "arrival_s",
        "cached_tokens",
        "decode",
        "finish_s",
        "first_token_s",
        "hashes",
        "index",
        "join_step",
        "max_tokens",
        "missed",
        "needed",
        "outcome",
        "plan",
        "prefill",
        "prompt",
        "relay",
        "slo_class",
        "split",
    )

    def __init__(self, index: int, spec: RequestSpec, hashes: tuple[int, ...]) -> None:
        self.index = index
        self.arrival_s = spec.arrival_s
        self.prompt = spec.prompt_tokens
        self.max_tokens = spec.output_tokens
        self.hashes = hashes
        self.slo_class = spec.slo_class
        self.split = False
        self.plan: Plan | None = None  # what the policy decided for it
        self.relay = False  # the router moves its KV (else the decode device pulls it)
        self.prefill: SimDevice | None = None
        self.decode: SimDevice | None = None
        self.needed = 0  # KV tokens charged on the device that holds it
        self.cached_tokens = 0
        self.first_token_s = math.nan
        self.finish_s = math.nan
        self.join_step = -1  # index of its first decode step on its decode device
        self.outcome = Outcome.PENDING
        self.missed = False


class SimDevice:
    """One device: the engine's state, and the router's accounting of it."""

    __slots__ = (
        "arriving",
        "batch",
        "busy",
        "busy_s",
        "cache",
        "cache_blocks",
        "cache_news",
        "capacity",
        "context_total",
        "decode_iterations",
        "decode_tokens",
        "dirty",
        "finish_steps",
        "finishing",
        "id",
        "index",
        "kv_peak",
        "kv_used",
        "longest",
        "outstanding",
        "pending",
        "perf",
        "prefill_iterations",
        "prefill_tokens",
        "queued_prefill_tokens",
        "reported_kv",
        "router_context",
        "router_running",
        "run_durations",
        "run_ends",
        "run_serial",
        "running",
        "spec",
        "step_ends",
        "steps",
        "timing",
        "waiting",
        "wake_pending",
    )

    def __init__(self, index: int, spec: DeviceSpec, *, cache_blocks: int | None = None) -> None:
        """``cache_blocks``: its prefix cache's size in blocks (None: the spec's)."""
        self.index = index
        self.id = spec.id
        self.spec = spec
        self.perf = spec.perf
        self.timing = spec.perf.timing
        self.capacity = spec.perf.kv_capacity_tokens
        # Engine state.
        self.kv_used = 0
        self.kv_peak = 0
        self.waiting: deque[SimRequest] = deque()
        self.arriving: deque[SimRequest] = deque()  # sent by the router, not there yet
        self.batch: list[SimRequest] | None = None  # the prefill iteration in progress
        self.busy = False
        self.wake_pending = False
        self.running = 0
        self.context_total = 0  # sum over running sequences of the context of their next token
        self.steps = 0  # decode iterations done
        self.finishing: dict[int, list[SimRequest]] = {}  # step count -> sequences it ends
        self.finish_steps: list[int] = []  # heap of the keys of ``finishing``
        # The decode run in progress: steps of an unchanging batch up to its next ending,
        # their durations and end times, and the serial number of its end event.
        self.run_durations: list[float] | FloatArray = []
        self.run_ends: list[float] | FloatArray = []
        self.run_serial = 0
        self.pending: list[SimRequest] = []  # joined during an iteration; step from the next
        # Max-heap of running contexts as (step at join - context at join, ...): the
        # longest context is ``steps - heap[0][0]``. Only pipelined parts need it.
        self.longest: list[tuple[int, int, SimRequest]] | None = (
            [] if self.timing.profile.pipeline is not None else None
        )
        self.cache_blocks = spec.prefix_cache_blocks if cache_blocks is None else cache_blocks
        # The mock engine's own prefix cache: the same hits, order and evictions.
        self.cache: PrefixCache | None = (
            PrefixCache(self.cache_blocks) if self.cache_blocks else None
        )
        self.cache_news: dict[int, None] = {}  # remembered since its last load report
        # The router's accounting, as the daemon keeps it.
        self.outstanding = 0
        self.queued_prefill_tokens = 0
        self.router_running = 0
        self.router_context = 0
        self.reported_kv = 0
        self.dirty = False  # its view is stale; listed for a rebuild
        # Statistics.
        self.busy_s = 0.0
        self.prefill_iterations = 0
        self.prefill_tokens = 0
        self.decode_iterations = 0
        self.decode_tokens = 0
        self.step_ends = array("d")  # end time of every decode iteration

    def view(self, shape: tuple[int, int, int, str]) -> BackendView:
        spec = self.spec
        return BackendView(
            id=self.id,
            kind="mock",
            address=f"sim:{self.index}",
            role=spec.role,
            model=spec.model,
            profile=spec.profile,
            healthy=True,
            outstanding=self.outstanding,
            handoff=_HANDOFF,
            wants_relay=spec.relay,
            kv_shape=shape,
            queued_prefill_tokens=self.queued_prefill_tokens,
            running=self.router_running,
            context_tokens=self.router_context,
            kv_tokens_used=self.reported_kv,
            kv_tokens_capacity=self.capacity,
            perf=self.perf,
        )

    def reload(self, view: BackendView) -> BackendView:
        """``view`` (this device's) with the router's load figures as they are now."""
        return view.with_load(
            outstanding=self.outstanding,
            queued_prefill_tokens=self.queued_prefill_tokens,
            running=self.router_running,
            context_tokens=self.router_context,
            kv_tokens_used=self.reported_kv,
        )

    # -- prefix cache (backends.prefix.PrefixCache) -----------------------------------

    def cached_tokens(self, hashes: tuple[int, ...], prompt: int) -> int:
        cache = self.cache
        return 0 if cache is None else cache.cached_tokens(hashes, prompt)

    def remember(self, hashes: tuple[int, ...]) -> None:
        """The engine's record (last block first), and the news for the next load report."""
        cache = self.cache
        if cache is None or not hashes:
            return
        cache.record(hashes)
        news = self.cache_news
        for value in reversed(hashes):
            news.pop(value, None)
            news[value] = None

    def kv_shape(self) -> tuple[int, int, int, str]:
        """The emulated model's KV shape: devices of one model can always hand KV over."""
        model = self.timing.model
        return (model.layers, model.kv_heads, model.head_dim, "bfloat16")

    def stats(self) -> DeviceStats:
        spec = self.spec
        return DeviceStats(
            id=self.id,
            profile=spec.profile,
            role=spec.role.value,
            chips=self.timing.chips,
            price_per_hour_usd=self.perf.price_per_hour_usd,
            busy_s=self.busy_s,
            prefill_iterations=self.prefill_iterations,
            prefill_tokens=self.prefill_tokens,
            decode_iterations=self.decode_iterations,
            decode_tokens=self.decode_tokens,
            kv_peak_tokens=self.kv_peak,
            kv_capacity_tokens=self.capacity,
        )
