"""An immutable view of the pool at one instant: what scheduling policies read."""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import Role


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


@dataclass(frozen=True)
class PoolSnapshot:
    backends: tuple[BackendView, ...]

    def serving(self, model: str) -> tuple[BackendView, ...]:
        return tuple(b for b in self.backends if b.healthy and b.model == model)

    def prefill_candidates(self, model: str) -> tuple[BackendView, ...]:
        return tuple(b for b in self.serving(model) if b.role.can_prefill())

    def decode_candidates(self, model: str) -> tuple[BackendView, ...]:
        return tuple(b for b in self.serving(model) if b.role.can_decode())

    def colocated_candidates(self, model: str) -> tuple[BackendView, ...]:
        """Backends that run a whole request: role ``both``, else decode ones (local prefill)."""
        both = tuple(b for b in self.serving(model) if b.role is Role.BOTH)
        return both or tuple(b for b in self.serving(model) if b.role is Role.DECODE)
