"""An immutable view of the pool at one instant: what scheduling policies read."""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, overload

from backends.base import HandoffMode, Role
from router.scheduling.perf import DevicePerf
from router.scheduling.prefix import PrefixIndex


@dataclass(frozen=True)
class BackendView:
    id: str
    kind: str
    address: str
    role: Role
    model: str
    profile: str
    healthy: bool
    outstanding: int
    detail: str = ""
    # How the adapter can hand KV to or from another backend (from its capabilities).
    handoff: frozenset[HandoffMode] = frozenset({HandoffMode.SEQUENTIAL})
    # (kind, mode, KV shape) it can split with: one adapter kind on both legs, a
    # shared mode (never NONE), a KV that can move. Precomputed: a decision tests it
    # for every backend.
    wants_relay: bool = False  # the pool file asks for the router to move its KV
    # What a KV must share to move between two backends at all (layers, KV heads,
    # head size, dtype); rank counts and block sizes a relay converts. None: unknown.
    kv_shape: tuple[int, int, int, str] | None = None
    # Load as this router sees it: prompt tokens sent here for prefill and not yet
    # prefilled, sequences decoding here, and the KV tokens those sequences reserve
    # (prompt plus max_tokens each).
    queued_prefill_tokens: int = 0
    running: int = 0
    context_tokens: int = 0
    # KV tokens the backend reports in use and in all (0: not reported).
    kv_tokens_used: int = 0
    kv_tokens_capacity: int = 0
    # Timing, capacity and price of the hardware (None: the profile is not in the catalogue).
    perf: DevicePerf | None = field(default=None, compare=False)
    split_keys: frozenset[tuple[str, HandoffMode, tuple[int, int, int, str] | None]] = field(
        init=False, repr=False, compare=False
    )

    # Derived once per view, since every decision over this snapshot reads them: KV tokens
    # it holds in all (reported, else modelled; 0 unknown), and the modelled time to
    # prefill what is queued on it.
    kv_capacity: int = field(init=False, repr=False, compare=False)
    queue_wait_s: float = field(init=False, repr=False, compare=False)
    # Share of that capacity not used or reserved (0.5 when the capacity is unknown).
    kv_free_fraction: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = frozenset(
            (self.kind, m, self.kv_shape) for m in self.handoff if m is not HandoffMode.NONE
        )
        object.__setattr__(self, "split_keys", keys)
        perf = self.perf
        capacity = self.kv_tokens_capacity or (perf.kv_capacity_tokens if perf else 0)
        object.__setattr__(self, "kv_capacity", capacity)
        self._derive_load()

    def _derive_load(self) -> None:
        """The figures derived from load (the last attributes a view gets)."""
        capacity = self.kv_capacity
        used = max(self.kv_tokens_used, self.context_tokens)
        free = max(0.0, 1.0 - used / capacity) if capacity else 0.5
        object.__setattr__(self, "kv_free_fraction", free)
        queued, perf = self.queued_prefill_tokens, self.perf
        wait = perf.timing.prefill_seconds_one(queued) if perf and queued > 0 else 0.0
        object.__setattr__(self, "queue_wait_s", wait)

    def with_load(
        self,
        *,
        outstanding: int,
        queued_prefill_tokens: int,
        running: int,
        context_tokens: int,
        kv_tokens_used: int,
    ) -> BackendView:
        """This backend with other load figures, everything else the same: what a change
        of load alone makes, at half the cost of building the view anew.

        Every attribute is set one by one, in the order the constructor sets them, never
        through ``__dict__``: a view whose ``__dict__`` was asked for reads its attributes
        at half the speed, and scorers read many. A field added to the class is added
        here too (a test compares this copy with the constructor's view).
        """
        view = object.__new__(BackendView)
        put = object.__setattr__
        put(view, "id", self.id)
        put(view, "kind", self.kind)
        put(view, "address", self.address)
        put(view, "role", self.role)
        put(view, "model", self.model)
        put(view, "profile", self.profile)
        put(view, "healthy", self.healthy)
        put(view, "outstanding", outstanding)
        put(view, "detail", self.detail)
        put(view, "handoff", self.handoff)
        put(view, "wants_relay", self.wants_relay)
        put(view, "kv_shape", self.kv_shape)
        put(view, "queued_prefill_tokens", queued_prefill_tokens)
        put(view, "running", running)
        put(view, "context_tokens", context_tokens)
        put(view, "kv_tokens_used", kv_tokens_used)
        put(view, "kv_tokens_capacity", self.kv_tokens_capacity)
        put(view, "perf", self.perf)
        put(view, "split_keys", self.split_keys)
        put(view, "kv_capacity", self.kv_capacity)
        view._derive_load()
        return view

    def can_hand_off_to(self, decode: BackendView) -> bool:
        return not self.split_keys.isdisjoint(decode.split_keys)

    def relays_with(self, decode: BackendView) -> bool:
        """Whether a split of this pair has the router move the KV."""
        both_can = HandoffMode.RELAY in self.handoff and HandoffMode.RELAY in decode.handoff
        return both_can and (self.wants_relay or decode.wants_relay)


class Candidates(Sequence[BackendView]):
    """Some of a snapshot's backends, by position: a candidate list that is free to make.

    Which backends are candidates for a leg depends on the pool's roster (which backends
    serve which model in which role, healthy or not), not on their load, so the positions
    are worked out once per roster and every snapshot of that roster reads its own views
    through them. A decision that samples a few candidates touches only those; one that
    scores them all reads the list once as a tuple, kept for the next.
    """

    __slots__ = ("_backends", "_roster", "_views", "key", "positions")

    def __init__(
        self, snapshot: PoolSnapshot, positions: tuple[int, ...], key: tuple[str, ...]
    ) -> None:
        self._backends = snapshot.backends
        self._roster = snapshot._roster  # noqa: SLF001  # the snapshot's own, made by it
        self._views: tuple[BackendView, ...] | None = None
        # Indices into the snapshot's backends, and the list's name within its roster,
        # whatever snapshot it is read through.
        self.positions = positions
        self.key = key

    def __len__(self) -> int:
        return len(self.positions)

    @overload
    def __getitem__(self, index: int) -> BackendView: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[BackendView, ...]: ...

    def __getitem__(self, index: int | slice) -> BackendView | tuple[BackendView, ...]:
        views = self._views
        if views is not None:  # read as a whole before: a snapshot that serves many decisions
            return views[index]
        if isinstance(index, slice):
            return tuple(map(self._backends.__getitem__, self.positions[index]))
        return self._backends[self.positions[index]]

    def __iter__(self) -> Iterator[BackendView]:
        return iter(self.views)

    @property
    def views(self) -> tuple[BackendView, ...]:
        views = self._views
        if views is None:
            views = self._views = self._roster.cut(self)(self._backends)
        return views

    def holding(self, backend_ids: Collection[str]) -> list[BackendView]:
        """The candidates whose id is in ``backend_ids``, in candidate order."""
        where = self._roster.positions(self)
        found = sorted(p for b in backend_ids if (p := where.get(b)) is not None)
        return [self[p] for p in found]


Cut = Callable[[tuple[BackendView, ...]], tuple[BackendView, ...]]

# A list of more runs of neighbours than this is gathered one position at a time.
_MAX_SLICES = 8


def _cut(positions: tuple[int, ...]) -> Cut:
    """What takes the views at ``positions`` out of a snapshot's tuple, fastest: a slice
    per run of neighbours (like backends are listed together), else one by one."""
    runs: list[list[int]] = []
    for position in positions:
        if runs and runs[-1][1] == position:
            runs[-1][1] = position + 1
        else:
            runs.append([position, position + 1])
    if not runs:
        return lambda _: ()
    if len(runs) <= _MAX_SLICES:
        slices = [slice(start, stop) for start, stop in runs]
        first, rest = slices[0], slices[1:]
        return lambda backends: sum((backends[s] for s in rest), backends[first])
    # More runs than that: 9 positions or more, so the getter gives a tuple.
    return operator.itemgetter(*positions)


class _Roster:
    """What candidate lists are made of, shared by the snapshots of one pool for as long
    as its backends change only in load (see :meth:`PoolSnapshot.replaced`)."""

    __slots__ = ("cache",)

    def __init__(self) -> None:
        self.cache: dict[tuple[str, ...], Any] = {}

    def cut(self, candidates: Candidates) -> Cut:
        key = ("cut", *candidates.key)
        cut: Cut | None = self.cache.get(key)
        if cut is None:
            cut = self.cache[key] = _cut(candidates.positions)
        return cut

    def positions(self, candidates: Candidates) -> dict[str, int]:
        """Each candidate's id and its index in ``candidates``."""
        key = ("positions", *candidates.key)
        where: dict[str, int] | None = self.cache.get(key)
        if where is None:
            where = self.cache[key] = {c.id: i for i, c in enumerate(candidates)}
        return where


def _same_roster(old: BackendView, new: BackendView) -> bool:
    """Whether ``new`` leaves every candidate list as ``old`` had it (only its load moved)."""
    return (
        old.id == new.id
        and old.healthy == new.healthy
        and old.model == new.model
        and old.role is new.role
        and old.kv_capacity == new.kv_capacity
        and (old.split_keys is new.split_keys or old.split_keys == new.split_keys)
    )


@dataclass(frozen=True)
class PoolSnapshot:
    backends: tuple[BackendView, ...]
    # Block hashes each backend was sent or reports cached. Shared, not copied: the
    # daemon and the simulator record into it between decisions, never during one.
    prefix_index: PrefixIndex | None = field(default=None, compare=False)
    # This snapshot's candidate lists, made on first use: a snapshot serves many decisions,
    # and a leg's list is the same object for all of them.
    _candidates: dict[tuple[str, ...], Any] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # The positions those lists are made of: carried over to a snapshot made by
    # ``replaced`` while the roster holds, so a pool that changes at every decision
    # (as a busy one does) does not work them out again each time.
    _roster: _Roster = field(default_factory=_Roster, init=False, repr=False, compare=False)

    def replaced(self, views: Iterable[tuple[int, BackendView]]) -> PoolSnapshot:
        """This pool with the backend at each position replaced by the view given for it.

        The new snapshot keeps this one's roster when every replaced backend changed only
        in load; any other change (health, role, model, handoff, KV capacity) starts a
        fresh one.
        """
        backends = list(self.backends)
        keep = True
        for position, view in views:
            keep = keep and _same_roster(backends[position], view)
            backends[position] = view
        snapshot = PoolSnapshot(tuple(backends), self.prefix_index)
        if keep:
            object.__setattr__(snapshot, "_roster", self._roster)
        return snapshot

    def without(self, backend_ids: Collection[str]) -> PoolSnapshot:
        """This view with ``backend_ids`` out of service: where a retried request failed."""
        if not backend_ids:
            return self
        backends = tuple(
            replace(b, healthy=False) if b.id in backend_ids else b for b in self.backends
        )
        return PoolSnapshot(backends, self.prefix_index)

    def serving(self, model: str) -> tuple[BackendView, ...]:
        return tuple(b for b in self.backends if b.healthy and b.model == model)

    def split_candidates(self, model: str) -> tuple[Candidates, Candidates]:
        """Prefill backends that some decode backend can take KV from, and decode backends."""
        key = ("split", model)
        cached: tuple[Candidates, Candidates] | None = self._candidates.get(key)
        if cached is None:
            prefill, decode = self._worked_out(key, self._split_positions, model)
            cached = self._candidates[key] = (
                Candidates(self, prefill, ("split-prefill", model)),
                Candidates(self, decode, ("split-decode", model)),
            )
        return cached

    def _split_positions(self, model: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        serving = self._serving_positions(model)
        backends = self.backends
        decode = tuple(
            i for i in serving if backends[i].role.can_decode() and backends[i].split_keys
        )
        accepted = frozenset().union(*(backends[i].split_keys for i in decode))
        prefill = tuple(
            i
            for i in serving
            if backends[i].role.can_prefill() and not backends[i].split_keys.isdisjoint(accepted)
        )
        return prefill, decode

    def _serving_positions(self, model: str) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.backends) if b.healthy and b.model == model)

    def _worked_out(self, key: tuple[str, ...], work_out: Callable[[str], Any], arg: str) -> Any:
        cache = self._roster.cache
        positions = cache.get(key)
        if positions is None:
            positions = cache[key] = work_out(arg)
        return positions

    def decode_partners(self, prefill: BackendView, decode: Candidates) -> Candidates:
        """The backends of ``decode`` that can take KV from ``prefill``, itself last resort:
        splitting onto one device gains nothing, so it decodes elsewhere when it can."""
        key = ("partners", prefill.id, *decode.key)
        cached: Candidates | None = self._candidates.get(key)
        if cached is None:
            cache = self._roster.cache
            positions = cache.get(key)
            if positions is None:
                positions = cache[key] = self._partner_positions(prefill, decode)
            cached = self._candidates[key] = Candidates(self, positions, key)
        return cached

    def _partner_positions(self, prefill: BackendView, decode: Candidates) -> tuple[int, ...]:
        # What can take KV from ``prefill`` depends on its split keys alone, which a whole
        # group of like backends shares: worked out once per group, not once per backend.
        cache = self._roster.cache
        group = ("compatible", *decode.key, *sorted(map(repr, prefill.split_keys)))
        compatible: tuple[int, ...] | None = cache.get(group)
        if compatible is None:
            pairs = zip(decode.positions, decode, strict=True)
            compatible = cache[group] = tuple(p for p, d in pairs if prefill.can_hand_off_to(d))
        where = self._roster.positions(decode).get(prefill.id)
        own = None if where is None else decode.positions[where]
        if own is None or own not in compatible or len(compatible) == 1:
            return compatible
        at = compatible.index(own)
        return compatible[:at] + compatible[at + 1 :]

    def min_kv_capacity(self, candidates: Candidates) -> int:
        """The smallest known KV capacity among ``candidates`` (a list this snapshot made)."""
        key = ("capacity", *candidates.key)
        cache = self._roster.cache
        cached: int | None = cache.get(key)
        if cached is None:
            known = [c.kv_capacity for c in candidates if c.kv_capacity]
            cached = cache[key] = min(known) if known else 0
        return cached

    def prefill_candidates(self, model: str) -> Candidates:
        return self.split_candidates(model)[0]

    def decode_candidates(self, model: str) -> Candidates:
        return self.split_candidates(model)[1]

    def colocated_candidates(self, model: str) -> Candidates:
        """Backends that run a whole request: role ``both``, else decode ones (local prefill)."""
        key = ("colocated", model)
        cached: Candidates | None = self._candidates.get(key)
        if cached is None:
            positions = self._worked_out(key, self._colocated_positions, model)
            cached = self._candidates[key] = Candidates(self, positions, key)
        return cached

    def _colocated_positions(self, model: str) -> tuple[int, ...]:
        serving = self._serving_positions(model)
        backends = self.backends
        both = tuple(i for i in serving if backends[i].role is Role.BOTH)
        return both or tuple(i for i in serving if backends[i].role is Role.DECODE)
