"""An immutable view of the pool at one instant: what scheduling policies read."""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import HandoffMode, Role


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

    def can_hand_off_to(self, decode: BackendView) -> bool:
        """A split needs one adapter kind on both legs and a handoff mode they share."""
        shared = (self.handoff & decode.handoff) - {HandoffMode.NONE}
        return self.kind == decode.kind and bool(shared)


@dataclass(frozen=True)
class PoolSnapshot:
    backends: tuple[BackendView, ...]

    def serving(self, model: str) -> tuple[BackendView, ...]:
        return tuple(b for b in self.backends if b.healthy and b.model == model)

    def prefill_candidates(self, model: str) -> tuple[BackendView, ...]:
        """Prefill backends with at least one decode backend they can hand KV to."""
        # (kind, mode) pairs some decode backend accepts: linear, not prefill x decode.
        accepted = {(d.kind, mode) for d in self.decode_candidates(model) for mode in d.handoff}
        return tuple(
            b
            for b in self.serving(model)
            if b.role.can_prefill()
            and any((b.kind, mode) in accepted for mode in b.handoff - {HandoffMode.NONE})
        )

    def decode_candidates(self, model: str) -> tuple[BackendView, ...]:
        return tuple(
            b for b in self.serving(model) if b.role.can_decode() and b.handoff - {HandoffMode.NONE}
        )

    def colocated_candidates(self, model: str) -> tuple[BackendView, ...]:
        """Backends that run a whole request: role ``both``, else decode ones (local prefill)."""
        both = tuple(b for b in self.serving(model) if b.role is Role.BOTH)
        return both or tuple(b for b in self.serving(model) if b.role is Role.DECODE)
