"""Discrete-event simulation of a cluster of mock devices behind the router.

Each device replays the compute loop of ``backends.mock.engine.DeviceEngine``, one
event per iteration: prefill first (the engine's own batching decision from
``backends.perf.batching``: FCFS, KV reserved up front), otherwise one decode step
for every running sequence, each as long as the device's roofline says. The router side
replays the dispatcher: the scheduling policy is called with a snapshot built from
the same load accounting the daemon keeps, a split request's first token comes from
its prefill device, its KV is leased there until the decode device has pulled it
over the modelled link (or the router has relayed it), and decoding continues there.
What follows a prefill is decided by the dispatcher's own rule
(``router.scheduling.handoff``).

Speed comes from never touching a sequence between its first and last token. A
running sequence's context grows by one per step, so a device keeps only the sum of
its running contexts (plus ``count`` per step) and, for pipelined SRAM parts that
need it, the longest one as an offset against a step counter; the step at which a
sequence ends is known when it joins, so ends are filed by step number. Nor is a
step an event of its own: the steps of a batch up to its next change (a sequence
ending, a prompt or a KV reaching the device) are timed at once, as a run with one
event at its end, cut short at the step in progress when something reaches the
device; the times are the very ones a step at a time gives (``RUN_STEPS = 1``). And a
decision's snapshot is the last one with the changed views replaced, keeping its
candidate lists (``PoolSnapshot.replaced``): a decision costs the same whatever the
fleet's size.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from functools import reduce
from itertools import accumulate
from operator import add
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from backends.errors import OverloadedError, ServingError
from backends.perf.batching import LOAD_PREFIX_HASHES, prefill_batch_size
from router.errors import NoHealthyBackendError
from router.scheduling.handoff import NextStep, after_prefill
from router.scheduling.plan import Disaggregation, Mode, Plan, RequestFeatures
from router.scheduling.prefix import DEFAULT_BLOCKS_PER_BACKEND, PrefixIndex
from router.scheduling.service_level import DEFAULT_SERVICE, ServiceLevel
from router.scheduling.slo import Slo
from router.scheduling.snapshot import PoolSnapshot
from router.sim.blocks import prompt_blocks
from router.sim.cluster import Cluster
from router.sim.device import BLOCK_TOKENS, UNBOUNDED_CACHE_BLOCKS, SimDevice, SimRequest
from router.sim.metrics import FloatArray
from router.sim.results import Outcome, SimResult
from router.sim.workload import RequestSpec

_push = heapq.heappush

# Most decode steps a run times at once: a run cut short by an arrival wastes the rest.
RUN_STEPS = 256


class SchedulerLike(Protocol):
    """What the simulator needs of a policy: the daemon's own entry point."""

    def schedule(self, features: RequestFeatures, snapshot: PoolSnapshot, now: float) -> Plan: ...


class SimulationError(Exception):
    """The policy answered something no dispatcher could run (e.g. an unknown backend)."""


ProgressCallback = Callable[[float, int, int], None]  # (simulated s, requests done, total)


class Simulator:
    """One run of ``requests`` through ``scheduler`` over ``cluster``.

    ``load_report_interval_s`` is how often the router learns each device's KV usage
    (0: at every decision); the router's own counters are always current, as the
    daemon's are. ``max_in_flight`` and ``queue_limit`` are the daemon's admission
    gate: beyond ``max_in_flight`` requests wait in a FIFO of at most ``queue_limit``,
    and a request that finds it full is shed. ``request_slo`` is the SLO every
    request carries to the policy (None: its class's default, the policy's profile of
    the request's ``slo_class``).

    ``overhead_s`` is the fixed latency of the serving path outside the devices' own
    iterations (client, router and device RPCs, timers): a request reaches its device
    that long after the router decided. 0 models the devices alone; a live cluster
    adds a few milliseconds, which requests served one at a time measure.
    ``handoff_s`` is the same for a split's decode leg: the prefill's answer reaching
    the router, the decode request reaching the decode device and its pull starting.
    The decode device has the KV that long plus the modelled wire time after the
    prefill ends (the prefill device holds its lease until then).

    ``unbounded_prefix_cache`` gives every device a prefix cache that never evicts,
    whatever the cluster says: the most prefix caching could save on the workload.
    """

    def __init__(
        self,
        cluster: Cluster,
        scheduler: SchedulerLike,
        *,
        load_report_interval_s: float = 1.0,
        max_in_flight: int | None = None,
        queue_limit: int = 0,
        request_slo: Slo | None = None,
        prefix_index_blocks: int = DEFAULT_BLOCKS_PER_BACKEND,
        progress: ProgressCallback | None = None,
        progress_interval_s: float = 2.0,
        overhead_s: float = 0.0,
        handoff_s: float = 0.0,
        unbounded_prefix_cache: bool = False,
    ) -> None:
        if not cluster.devices:
            raise ValueError("a cluster needs at least one device")
        if load_report_interval_s < 0:
            raise ValueError("load_report_interval_s must be >= 0")
        if not (math.isfinite(overhead_s) and overhead_s >= 0):
            raise ValueError("overhead_s must be finite and >= 0")
        if not (math.isfinite(handoff_s) and handoff_s >= 0):
            raise ValueError("handoff_s must be finite and >= 0")
        self.cluster = cluster
        self.scheduler = scheduler
        self.model = cluster.model
        # The request's own targets, and its class's, as the dispatcher derives them.
        self._service = _service_level(request_slo)
        self._class_slos: dict[str, tuple[Slo | None, Slo | None]] = {}
        self._decisions = itertools.count()
        cache_blocks = UNBOUNDED_CACHE_BLOCKS if unbounded_prefix_cache else None
        self.devices = [
            SimDevice(i, spec, cache_blocks=cache_blocks) for i, spec in enumerate(cluster.devices)
        ]
        self._by_id = {device.id: device for device in self.devices}
        if len(self._by_id) != len(self.devices):
            raise ValueError("device ids must be unique")
        self._shapes = {device.id: device.kv_shape() for device in self.devices}
        self._dirty: list[SimDevice] = []
        self.prefix_index = PrefixIndex(prefix_index_blocks)
        self._snapshot = PoolSnapshot(
            tuple(device.view(self._shapes[device.id]) for device in self.devices),
            self.prefix_index,
        )
        self._report_interval = load_report_interval_s
        self._next_report = 0.0
        self._max_in_flight = max_in_flight
        self._queue_limit = queue_limit
        self._in_flight = 0
        self._queue: deque[SimRequest] = deque()
        self._ready: deque[SimRequest] = deque()  # let through the gate; routed after the event
        # (time, tie-breaker, handler, its argument): a device or a request.
        self._heap: list[tuple[float, int, Callable[[Any, float], None], Any]] = []
        self._order = itertools.count()
        self._progress = progress
        self._progress_interval_s = progress_interval_s
        self._overhead_s = overhead_s
        self._handoff_s = handoff_s
        self._watch: Mapping[str, Slo] | None = None
        self._misses = 0
        self._done = 0
        self._ran = False

    # ================================================================ the event loop

    def run(
        self,
        requests: Sequence[RequestSpec],
        *,
        slo: Slo | Mapping[str, Slo] | None = None,
        stop_after_misses: int | None = None,
    ) -> SimResult:
        """Simulates every request to its end; once per simulator.

        With ``stop_after_misses``, the run stops as soon as more than that many
        requests are certain to miss ``slo`` (one for all, or one per SLO class: a
        planner's early out for a cluster that cannot meet it); the result then says
        ``stopped_early``.
        """
        if self._ran:
            raise RuntimeError("a Simulator runs once; make another for another run")
        self._ran = True
        if stop_after_misses is not None and slo is None:
            raise ValueError("stop_after_misses needs an slo")
        self._check_classes(requests)
        if stop_after_misses is not None and slo is not None:
            self._watch = _per_class(slo, {spec.slo_class for spec in requests})
        wall_started, cpu_started = time.monotonic(), time.process_time()
        records = _requests(requests)
        if any(b.arrival_s < a.arrival_s for a, b in itertools.pairwise(records)):
            raise ValueError("requests must be sorted by arrival_s")
        limit = math.inf if stop_after_misses is None else stop_after_misses
        end, stopped = self._loop(records, limit, wall_started)
        return collect(
            self.cluster,
            records,
            self.devices,
            makespan_s=end,
            stopped_early=stopped,
            wall_s=time.monotonic() - wall_started,
            cpu_s=time.process_time() - cpu_started,
        )

    def _check_classes(self, requests: Sequence[RequestSpec]) -> None:
        """Every SLO class the requests name must be a profile of the policy."""
        known = getattr(self.scheduler, "slo_classes", None)
        if not isinstance(known, frozenset):
            return
        unknown = sorted({spec.slo_class for spec in requests} - known)
        if unknown:
            raise SimulationError(
                f"the requests name SLO class {unknown[0]!r}, which the policy has no profile "
                f"for (it has {', '.join(sorted(known))})"
            )

    def _loop(self, records: list[SimRequest], limit: float, started: float) -> tuple[float, bool]:
        """Events in time order until none is left; returns the last time, and whether
        it stopped early. Arrivals stream from the sorted list, beside the heap."""
        heap = self._heap
        pop = heapq.heappop
        arrivals = [r.arrival_s for r in records]
        total = len(records)
        now = 0.0
        next_index = 0
        next_arrival = arrivals[0] if total else math.inf
        progress_at = started + self._progress_interval_s
        for tick in itertools.count():
            # Arrivals go first at equal times: requests sent together batch together.
            if heap and heap[0][0] < next_arrival:
                now, _, handler, target = pop(heap)
                handler(target, now)
            elif next_index < total:
                now = next_arrival
                self._arrive(records[next_index], now)
                next_index += 1
                next_arrival = arrivals[next_index] if next_index < total else math.inf
            else:
                return now, False
            while self._ready:
                self._route(self._ready.popleft(), now)
            if self._misses > limit:
                self._settle_runs(now)
                return now, True
            if not tick & 0xFFF and self._progress is not None:
                wall = time.monotonic()
                if wall >= progress_at:
                    progress_at = wall + self._progress_interval_s
                    self._progress(now, self._done, total)
        raise AssertionError("unreachable")  # itertools.count() never ends

    # ================================================================ the router

    def _arrive(self, request: SimRequest, now: float) -> None:
        if self._max_in_flight is None or self._in_flight < self._max_in_flight:
            self._in_flight += 1
            self._route(request, now)
        elif len(self._queue) < self._queue_limit:
            self._queue.append(request)
        else:
            self._end(request, Outcome.SHED, now, counted=False)

    def _route(self, request: SimRequest, now: float) -> None:
        waited = now - request.arrival_s
        features = RequestFeatures(
            request_id=str(request.index),
            model=self.model,
            prompt_tokens=request.prompt,
            max_tokens=request.max_tokens,
            disaggregation=Disaggregation.AUTO,
            sequence=next(self._decisions),
            slo=self._slo_of(request.slo_class, waited),
            slo_class=request.slo_class,
            prefix_hashes=request.hashes,
        )
        try:
            plan = self.scheduler.schedule(features, self._current_snapshot(now), now)
        except OverloadedError:
            self._end(request, Outcome.SHED, now)
            return
        except NoHealthyBackendError:
            self._end(request, Outcome.UNAVAILABLE, now)
            return
        except ServingError:
            self._end(request, Outcome.REJECTED, now)
            return
        prefill = self._device(plan.prefill_backend)
        decode = self._device(plan.decode_backend) if plan.mode is Mode.SPLIT else prefill
        if request.hashes:  # both backends of the plan end up holding the prompt's KV
            self.prefix_index.record(prefill.id, request.hashes)
            if decode is not prefill:
                self.prefix_index.record(decode.id, request.hashes)
        prefill.outstanding += 1
        prefill.queued_prefill_tokens += request.prompt
        self._mark(prefill)
        request.plan = plan
        request.prefill = prefill
        request.decode = decode
        if plan.mode is Mode.SPLIT:
            request.split = True
            self._submit(prefill, request, request.prompt + 1, now)
        else:
            self._submit(prefill, request, request.prompt + request.max_tokens, now)

    def _slo_of(self, slo_class: str, waited_s: float) -> Slo | None:
        """What a request is planned against (the daemon's rule): its own targets, else
        None for its class's, less the time it queued for admission."""
        known = self._class_slos.get(slo_class)
        if known is None:
            default_slo = getattr(self.scheduler, "default_slo", None)
            found = default_slo(slo_class) if default_slo is not None else None
            class_slo = found if isinstance(found, Slo) else None
            known = self._class_slos[slo_class] = (class_slo, self._service.own_slo(class_slo))
        class_slo, own = known
        if waited_s <= 0:
            return own
        return self._service.scheduling_slo(class_slo, waited_s)

    def _device(self, backend_id: str) -> SimDevice:
        device = self._by_id.get(backend_id)
        if device is None:
            raise SimulationError(f"the policy chose backend {backend_id!r}, not in the cluster")
        if device.spec.model != self.model:
            raise SimulationError(f"the policy sent a {self.model} request to {backend_id}")
        return device

    def _mark(self, device: SimDevice) -> None:
        if not device.dirty:
            device.dirty = True
            self._dirty.append(device)

    def _current_snapshot(self, now: float) -> PoolSnapshot:
        """The pool as the daemon would see it now; only changed views are rebuilt."""
        if now >= self._next_report:
            for device in self.devices:
                if device.reported_kv != device.kv_used:
                    device.reported_kv = device.kv_used
                    self._mark(device)
                if device.cache_news:
                    # The load report lists the cached blocks; the newest are what changed.
                    news = list(device.cache_news)[-LOAD_PREFIX_HASHES:]
                    self.prefix_index.record(device.id, news)
                    device.cache_news.clear()
            interval = self._report_interval
            if interval > 0:
                self._next_report = (math.floor(now / interval) + 1) * interval
        dirty = self._dirty
        if dirty:
            # Only load changed: the new snapshot keeps the old one's candidate lists.
            backends = self._snapshot.backends
            self._snapshot = self._snapshot.replaced(
                (device.index, device.reload(backends[device.index])) for device in dirty
            )
            for device in dirty:
                device.dirty = False
            dirty.clear()
        return self._snapshot

    def _end(
        self, request: SimRequest, outcome: Outcome, now: float, *, counted: bool = True
    ) -> None:
        """The request's last event: it completed, or will never be served."""
        request.outcome = outcome
        if outcome is Outcome.OK:
            request.finish_s = now
        self._done += 1
        watch = None if self._watch is None else self._watch.get(request.slo_class)
        if watch is not None and not request.missed:
            if outcome is not Outcome.OK:
                request.missed = True
            elif request.max_tokens > 1:
                first = request.first_token_s
                tpot = (now - first) / (request.max_tokens - 1)
                late_tokens = watch.tpot_s is not None and tpot > watch.tpot_s
                late_end = watch.e2e_s is not None and now - request.arrival_s > watch.e2e_s
                request.missed = late_tokens or late_end
            if request.missed:
                self._misses += 1
        if counted:
            self._in_flight -= 1
            if self._queue:
                self._in_flight += 1
                self._ready.append(self._queue.popleft())

    def _first_token(self, request: SimRequest, now: float) -> None:
        request.first_token_s = now
        watch = None if self._watch is None else self._watch.get(request.slo_class)
        if (
            watch is not None
            and watch.ttft_s is not None
            and now - request.arrival_s > watch.ttft_s
        ):
            request.missed = True
            self._misses += 1

    # ================================================================ the devices

    def _submit(self, device: SimDevice, request: SimRequest, needed: int, now: float) -> None:
        request.needed = needed
        if self._overhead_s > 0:
            _push(self._heap, (now + self._overhead_s, next(self._order), self._reach, device))
            device.arriving.append(request)
        else:
            self._reach_with(device, request, now)

    def _reach(self, device: SimDevice, now: float) -> None:
        """The oldest request on its way to ``device`` gets there (delays are all equal)."""
        self._reach_with(device, device.arriving.popleft(), now)

    def _reach_with(self, device: SimDevice, request: SimRequest, now: float) -> None:
        if request.needed > device.capacity:  # the engine refuses what could never fit
            device.outstanding -= 1
            device.queued_prefill_tokens -= request.prompt
            self._mark(device)
            self._end(request, Outcome.FAILED, now)
            return
        device.waiting.append(request)
        if device.busy:
            self._interrupt(device, now)
        else:
            self._wake_at(device, now)

    def _wake_at(self, device: SimDevice, now: float) -> None:
        """Starts an idle device after every other event of this instant."""
        if not device.busy and not device.wake_pending:
            device.wake_pending = True
            _push(self._heap, (now, next(self._order), self._wake, device))

    def _wake(self, device: SimDevice, now: float) -> None:
        device.wake_pending = False
        if not device.busy:
            self._start(device, now)

    def _start(self, device: SimDevice, now: float) -> None:
        """The engine's loop: admit and prefill if it can, else decode, else idle."""
        if device.waiting and (batch := self._admit(device)):
            duration = self._prefill_seconds(device, batch)
            device.batch = batch
        elif device.running or device.pending:
            if device.pending:
                for request in device.pending:
                    self._join(device, request)
                device.pending.clear()
            longest = 0 if device.longest is None else self._longest(device)
            # Waiting prompts may be admitted after any step; otherwise nothing this device
            # holds changes before its next sequence ends, unless something reaches it.
            steps = 1 if device.waiting else device.finish_steps[0] - device.steps
            self._decode_run(device, now, longest, min(steps, RUN_STEPS))
            return
        else:
            device.busy = False
            return
        device.busy = True
        device.busy_s += duration
        _push(self._heap, (now + duration, next(self._order), self._iteration_end, device))

    def _decode_run(self, device: SimDevice, now: float, longest: int, steps: int) -> None:
        """``steps`` decode iterations of the running batch, timed at once, with one event
        at the end of the last: the step-by-step loop's times, without its events."""
        durations = device.timing.decode_run_seconds(
            device.running, device.context_total, longest, steps
        )
        ends: list[float] | FloatArray
        if isinstance(durations, list):
            ends = list(accumulate(durations, initial=now))
            del ends[0]
            end = ends[-1]
        else:  # a long run stays an array; cumsum adds one step after the other too
            ends = _running_sum(now, durations)
            end = float(ends[-1])
        device.run_durations = durations
        device.run_ends = ends
        device.busy = True
        device.run_serial += 1
        _push(self._heap, (end, next(self._order), self._run_end, (device, device.run_serial)))

    def _interrupt(self, device: SimDevice, now: float) -> None:
        """Something reached ``device`` that its loop looks at between iterations: its
        decode run ends with the step in progress (a step that ends now included)."""
        ends = device.run_ends
        if len(ends) > 1:
            keep = bisect_left(ends, now) + 1
            if keep < len(ends):
                ends = device.run_ends = ends[:keep]
                device.run_durations = device.run_durations[:keep]
                serial = device.run_serial = device.run_serial + 1
                event = (float(ends[-1]), next(self._order), self._run_end, (device, serial))
                _push(self._heap, event)

    def _run_end(self, run: tuple[SimDevice, int], now: float) -> None:
        """A decode run's last step ends: its steps are counted as one at a time would be."""
        device, serial = run
        if serial != device.run_serial:  # the run was cut short; its end moved earlier
            return
        self._count_run(device)
        ends = device.run_ends
        steps = device.steps = device.steps + len(ends)
        if isinstance(ends, list):
            device.step_ends.fromlist(ends)
        else:
            device.step_ends.frombytes(ends.tobytes())
        device.run_ends = []
        ending = device.finishing.pop(steps, None)
        if ending is not None:
            heapq.heappop(device.finish_steps)
            self._finished(device, ending, now)
        self._start(device, now)

    @staticmethod
    def _count_run(device: SimDevice) -> None:
        """The run's steps in the device's counters (busy time summed step by step)."""
        steps, running = len(device.run_ends), device.running
        durations = device.run_durations
        if isinstance(durations, list):
            device.busy_s = reduce(add, durations, device.busy_s)
        else:
            device.busy_s = float(_running_sum(device.busy_s, durations)[-1])
        device.decode_iterations += steps
        device.decode_tokens += steps * running
        device.context_total += steps * running

    def _settle_runs(self, now: float) -> None:
        """A run stopped early: decode runs count up to the step in progress, as the
        engine's loop counts a step when it starts."""
        for device in self.devices:
            if len(device.run_ends):
                self._interrupt(device, now)
                self._count_run(device)
                device.run_ends = []

    @staticmethod
    def _prefill_seconds(device: SimDevice, batch: list[SimRequest]) -> float:
        lengths = [r.prompt for r in batch]
        device.prefill_iterations += 1
        device.prefill_tokens += sum(lengths)
        if device.cache is None:
            return device.timing.prefill_seconds(lengths)
        matched = device.cache.matched_in_batch([r.hashes for r in batch])
        cached = []
        for request, blocks in zip(batch, matched, strict=True):
            request.cached_tokens = hit = min(blocks * BLOCK_TOKENS, request.prompt)
            cached.append(min(hit, request.prompt - 1))  # the last token's logits are computed
        return device.timing.prefill_seconds(lengths, cached)

    @staticmethod
    def _admit(device: SimDevice) -> list[SimRequest]:
        """The engine's own batching decision (backends.perf.batching)."""
        waiting = device.waiting
        count = prefill_batch_size(
            ((request.prompt, request.needed) for request in waiting),
            device.kv_used,
            device.capacity,
        )
        batch = [waiting.popleft() for _ in range(count)]
        device.kv_used += sum(request.needed for request in batch)
        device.kv_peak = max(device.kv_peak, device.kv_used)
        return batch

    @staticmethod
    def _longest(device: SimDevice) -> int:
        heap = device.longest
        if heap is None:  # kept for pipelined parts only
            raise SimulationError(f"device {device.id} keeps no longest-context heap")
        while heap and heap[0][2].outcome is not Outcome.PENDING:
            heapq.heappop(heap)
        if len(heap) > 2 * device.running + 64:  # drop what finished deep in the heap
            heap[:] = [entry for entry in heap if entry[2].outcome is Outcome.PENDING]
            heapq.heapify(heap)
        return device.steps - heap[0][0] if heap else 0

    @staticmethod
    def _join(device: SimDevice, request: SimRequest) -> None:
        """A sequence with its first token starts decoding: context prompt + 1."""
        steps = device.steps
        device.running += 1
        context = request.prompt + 1
        device.context_total += context
        ends_at = steps + request.max_tokens - 1
        ending = device.finishing.get(ends_at)
        if ending is None:
            device.finishing[ends_at] = [request]
            _push(device.finish_steps, ends_at)
        else:
            ending.append(request)
        request.join_step = steps
        if device.longest is not None:
            _push(device.longest, (steps - context, request.index, request))

    def _iteration_end(self, device: SimDevice, now: float) -> None:
        """A prefill iteration ends (decode steps end in runs: ``_run_end``)."""
        batch = device.batch
        if batch is None:
            raise SimulationError(f"device {device.id} ended a prefill it never started")
        device.batch = None
        for request in batch:
            device.remember(request.hashes)
        for request in batch:
            self._prefilled(device, request, now)
        self._start(device, now)

    def _prefilled(self, device: SimDevice, request: SimRequest, now: float) -> None:
        device.queued_prefill_tokens -= request.prompt
        self._mark(device)
        self._first_token(request, now)
        plan, decode = request.plan, request.decode
        if plan is None or decode is None:
            raise SimulationError(f"request {request.index} prefilled before it was routed")
        step = after_prefill(
            plan,
            finished=request.max_tokens <= 1,
            layouts_compatible=self._shapes[device.id] == self._shapes[decode.id],
        )
        if step is NextStep.FINISHED:
            device.kv_used -= request.needed
            device.outstanding -= 1
            self._end(request, Outcome.OK, now)
        elif step is NextStep.DECODE_IN_PLACE:
            self._join(device, request)
            device.router_running += 1
            device.router_context += request.prompt + request.max_tokens
        else:
            # The prefill's reservation ends; its KV stays, leased, until pulled.
            device.kv_used += request.prompt - request.needed
            device.outstanding -= 1
            request.relay = step is NextStep.RELAY_THEN_DECODE
            if not request.relay:  # the decode leg is sent now and pulls the KV itself
                self._decode_leg(decode, request)
            wire_s = (
                0.0 if decode is device else device.perf.transfer_s(request.prompt, decode.perf)
            )
            arrives = now + self._handoff_s + wire_s
            _push(self._heap, (arrives, next(self._order), self._kv_arrived, request))

    def _decode_leg(self, decode: SimDevice, request: SimRequest) -> None:
        """The router sends the decode leg: the request counts on the decode backend."""
        decode.outstanding += 1
        decode.router_running += 1
        decode.router_context += request.prompt + request.max_tokens
        self._mark(decode)

    def _finished(self, device: SimDevice, ending: list[SimRequest], now: float) -> None:
        for request in ending:
            total = request.prompt + request.max_tokens
            device.running -= 1
            device.context_total -= total
            device.kv_used -= request.needed
            device.outstanding -= 1
            device.router_running -= 1
            device.router_context -= total
            self._end(request, Outcome.OK, now)
        self._mark(device)

    def _kv_arrived(self, request: SimRequest, now: float) -> None:
        """The decode device has the KV: the holder frees its lease, decoding begins."""
        holder, decode = request.prefill, request.decode
        if holder is None or decode is None:
            raise SimulationError(f"request {request.index}'s KV arrived before it was routed")
        holder.kv_used -= request.prompt
        if holder.waiting:
            self._wake_at(holder, now)  # the freed lease may let a prefill in
        if request.relay:  # the router moved the KV; only now does it send the decode leg
            self._decode_leg(decode, request)
        needed = request.prompt + request.max_tokens
        if needed > decode.capacity:
            decode.outstanding -= 1
            decode.router_running -= 1
            decode.router_context -= needed
            self._mark(decode)
            self._end(request, Outcome.FAILED, now)
            return
        # Reserved at once, even beyond capacity: the engine's decode() does not wait.
        request.needed = needed
        decode.kv_used += needed
        decode.kv_peak = max(decode.kv_peak, decode.kv_used)
        decode.remember(request.hashes)
        if decode.busy:
            decode.pending.append(request)
            self._interrupt(decode, now)
        else:
            self._join(decode, request)
            self._wake_at(decode, now)


def _per_class(slo: Slo | Mapping[str, Slo], classes: set[str]) -> dict[str, Slo]:
    """``slo`` for each of ``classes``: one for all, or each class's own."""
    if isinstance(slo, Slo):
        return dict.fromkeys(classes, slo)
    missing = sorted(classes - set(slo))
    if missing:
        raise ValueError(f"no SLO given for class {missing[0]!r}")
    return dict(slo)


def _running_sum(start: float, values: FloatArray) -> FloatArray:
    """``start`` plus each of ``values`` in turn, every partial sum (as a loop adds them)."""
    sums = np.empty(len(values) + 1)
    sums[0] = start
    sums[1:] = values
    return np.add.accumulate(sums, out=sums)[1:]


def _service_level(slo: Slo | None) -> ServiceLevel:
    if slo is None:
        return DEFAULT_SERVICE
    return ServiceLevel(ttft_ms=_whole_ms(slo.ttft_s), tpot_ms=_whole_ms(slo.tpot_s))


def _whole_ms(limit_s: float | None) -> int | None:
    """A limit as the daemon's requests carry it (None: the SLO class's default)."""
    return None if limit_s is None else round(limit_s * 1000)


def _requests(specs: Sequence[RequestSpec]) -> list[SimRequest]:
    """Requests with their prompts' block names (``router.sim.blocks``) when any prefix
    is shared.

    Without shared prefixes every block is unique: no cache or index could ever match
    one, so the names are left out and the run is the same, only faster.
    """
    if not any(spec.prefix_group >= 0 or spec.block_hashes for spec in specs):
        return [SimRequest(index, spec, ()) for index, spec in enumerate(specs)]
    return [SimRequest(index, spec, prompt_blocks(index, spec)) for index, spec in enumerate(specs)]


def collect(
    cluster: Cluster,
    records: Sequence[SimRequest],
    devices: Sequence[SimDevice],
    *,
    makespan_s: float,
    stopped_early: bool,
    wall_s: float,
    cpu_s: float,
) -> SimResult:
    """The run's requests as columns, with the largest gap between tokens of each."""
    count = len(records)
    first = np.fromiter((r.first_token_s for r in records), np.float64, count)
    finish = np.fromiter((r.finish_s for r in records), np.float64, count)
    arrival = np.fromiter((r.arrival_s for r in records), np.float64, count)
    output = np.fromiter((r.max_tokens for r in records), np.int64, count)
    outcome = np.array([r.outcome.value for r in records], dtype=np.str_)
    slo_class = np.array([r.slo_class for r in records], dtype=np.str_)
    ok = outcome == Outcome.OK.value
    decode_index = np.fromiter(
        (-1 if r.decode is None else r.decode.index for r in records), np.int64, count
    )
    join_step = np.fromiter((r.join_step for r in records), np.int64, count)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(ok & (output > 1), (finish - first) / (output - 1), np.nan)
    return SimResult(
        cluster=cluster,
        devices=tuple(device.stats() for device in devices),
        arrival_s=arrival,
        prompt_tokens=np.fromiter((r.prompt for r in records), np.int64, count),
        output_tokens=output,
        cached_tokens=np.fromiter((r.cached_tokens for r in records), np.int64, count),
        outcome=outcome,
        slo_class=slo_class,
        split=np.fromiter((r.split for r in records), np.bool_, count),
        prefill_device=np.fromiter(
            (-1 if r.prefill is None else r.prefill.index for r in records), np.int64, count
        ),
        decode_device=decode_index,
        ttft_s=np.where(np.isnan(first), np.nan, first - arrival),
        tpot_s=tpot,
        e2e_s=np.where(ok, finish - arrival, np.nan),
        max_itl_s=_max_gaps(
            devices,
            decoded=ok & (output > 1),
            device_index=decode_index,
            join_step=join_step,
            first_token_s=first,
            output_tokens=output,
        ),
        makespan_s=makespan_s,
        stopped_early=stopped_early,
        wall_s=wall_s,
        cpu_s=cpu_s,
    )


def _max_gaps(
    devices: Sequence[SimDevice],
    *,
    decoded: npt.NDArray[np.bool_],
    device_index: npt.NDArray[np.int64],
    join_step: npt.NDArray[np.int64],
    first_token_s: npt.NDArray[np.float64],
    output_tokens: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    """Each request's largest gap between two tokens, from its device's step end times.

    A request that joined at step J with M output tokens got them at its first-token
    time and at the ends of steps J .. J+M-2: the gaps are the first one and the
    differences of consecutive step ends, maxed per request with one ``reduceat``.
    """
    gaps = np.full(len(decoded), np.nan)
    # Each device's requests in their order, by one stable sort rather than a pass over
    # every request per device (a thousand devices, millions of requests).
    served = np.flatnonzero(decoded)
    served = served[np.argsort(device_index[served], kind="stable")]
    counts = np.bincount(device_index[served], minlength=len(devices))
    last = np.cumsum(counts)
    for device in devices:
        through = int(last[device.index])
        mine = served[through - int(counts[device.index]) : through]
        if not len(mine):
            continue
        ends = np.frombuffer(device.step_ends, dtype=np.float64)
        joins = join_step[mine]
        first_gap = ends[joins] - first_token_s[mine]
        steps = np.append(np.diff(ends, prepend=ends[0]), 0.0)  # steps[k] = ends[k] - ends[k-1]
        starts, stops = joins + 1, joins + output_tokens[mine] - 1
        bounds = np.empty(2 * len(mine), dtype=np.int64)
        bounds[0::2], bounds[1::2] = starts, stops
        later = np.maximum.reduceat(steps, bounds)[0::2]
        gaps[mine] = np.where(stops > starts, np.maximum(first_gap, later), first_gap)
    return gaps
