"""An immutable view of the pool at one instant: what scheduling policies read."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

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
        used = max(self.kv_tokens_used, self.context_tokens)
        free = max(0.0, 1.0 - used / capacity) if capacity else 0.5
        object.__setattr__(self, "kv_free_fraction", free)
        queued = self.queued_prefill_tokens
        wait = perf.timing.prefill_seconds_one(queued) if perf and queued > 0 else 0.0
        object.__setattr__(self, "queue_wait_s", wait)

    def can_hand_off_to(self, decode: BackendView) -> bool:
        return not self.split_keys.isdisjoint(decode.split_keys)

    def relays_with(self, decode: BackendView) -> bool:
        """Whether a split of this pair has the router move the KV."""
        both_can = HandoffMode.RELAY in self.handoff and HandoffMode.RELAY in decode.handoff
        return both_can and (self.wants_relay or decode.wants_relay)


@dataclass(frozen=True)
class PoolSnapshot:
    backends: tuple[BackendView, ...]
    # Block hashes each backend was sent or reports cached. Shared, not copied: the
    # daemon and the simulator record into it between decisions, never during one.
    prefix_index: PrefixIndex | None = field(default=None, compare=False)
    # Candidate lists per model, computed on first use: a snapshot serves many decisions.
    _candidates: dict[tuple[str | int, ...], Any] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

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

    def split_candidates(
        self, model: str
    ) -> tuple[tuple[BackendView, ...], tuple[BackendView, ...]]:
        """Prefill backends that some decode backend can take KV from, and decode backends."""
        key = ("split", model)
        cached = self._candidates.get(key)
        if cached is None:
            cached = self._candidates[key] = self._split_candidates(model)
        return cached

    def _split_candidates(
        self, model: str
    ) -> tuple[tuple[BackendView, ...], tuple[BackendView, ...]]:
        serving = self.serving(model)
        decode = tuple(b for b in serving if b.role.can_decode() and b.split_keys)
        accepted = frozenset().union(*(d.split_keys for d in decode))
        prefill = tuple(
            b for b in serving if b.role.can_prefill() and not b.split_keys.isdisjoint(accepted)
        )
        return prefill, decode

    def decode_partners(
        self, prefill: BackendView, decode: tuple[BackendView, ...]
    ) -> tuple[BackendView, ...]:
        """The backends of ``decode`` that can take KV from ``prefill``, itself last resort:
        splitting onto one device gains nothing, so it decodes elsewhere when it can."""
        key = ("partners", prefill.id, id(decode))
        cached = self._candidates.get(key)
        if cached is None:
            compatible = tuple(d for d in decode if prefill.can_hand_off_to(d))
            others = tuple(d for d in compatible if d.id != prefill.id)
            cached = self._candidates[key] = others or compatible
        return cached

    def min_kv_capacity(self, candidates: tuple[BackendView, ...]) -> int:
        """The smallest known KV capacity among ``candidates`` (a tuple this snapshot made)."""
        key = ("capacity", id(candidates))
        cached = self._candidates.get(key)
        if cached is None:
            known = [c.kv_capacity for c in candidates if c.kv_capacity]
            cached = self._candidates[key] = min(known) if known else 0
        return cached

    def prefill_candidates(self, model: str) -> tuple[BackendView, ...]:
        return self.split_candidates(model)[0]

    def decode_candidates(self, model: str) -> tuple[BackendView, ...]:
        return self.split_candidates(model)[1]

    def colocated_candidates(self, model: str) -> tuple[BackendView, ...]:
        """Backends that run a whole request: role ``both``, else decode ones (local prefill)."""
        key = ("colocated", model)
        cached = self._candidates.get(key)
        if cached is None:
            cached = self._candidates[key] = self._colocated_candidates(model)
        return cached

    def _colocated_candidates(self, model: str) -> tuple[BackendView, ...]:
        both = tuple(b for b in self.serving(model) if b.role is Role.BOTH)
        return both or tuple(b for b in self.serving(model) if b.role is Role.DECODE)
