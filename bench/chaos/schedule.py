"""Which device fails when, and how: a seeded fault plan, made before the run starts.

Faults arrive as a Poisson process over a window of the run. Each one picks a
device that is up and whose role keeps at least one other device up, so a role is
never wholly down; when no device qualifies the slot is skipped (and counted).
Pure: the same seed and inputs give the same plan, and the injector replays it.

- ``kill``: SIGKILL, then a restart on the same port after ``hold_s``;
- ``stop``: SIGSTOP, then SIGCONT after ``hold_s`` (the process keeps its sockets
  but answers nothing: a hung device);
- ``restart``: SIGTERM (the device drains and exits), then a start at once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

FaultKind = Literal["kill", "stop", "restart"]
FAULT_KINDS: tuple[FaultKind, ...] = ("kill", "stop", "restart")


@dataclass(frozen=True)
class Fault:
    at_s: float  # offset from the start of the load
    device: str
    kind: FaultKind
    hold_s: float  # kill: down before the restart; stop: until SIGCONT; restart: 0

    @property
    def back_s(self) -> float:
        """When the injector brings the device back (it then still has to start)."""
        return self.at_s + self.hold_s


@dataclass(frozen=True)
class FaultMix:
    """How often faults come, of which kinds, and for how long."""

    mean_gap_s: float  # mean time between faults (exponential gaps)
    weights: Mapping[FaultKind, float]  # relative share of each kind
    kill_down_s: tuple[float, float]  # uniform range of a killed device's downtime
    stop_s: tuple[float, float]  # uniform range of a stop's length
    # Kept clear after a device comes back before it may fail again: a restarted
    # device needs this long to serve, and the router to see it healthy.
    recovery_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean_gap_s) and self.mean_gap_s > 0):
            raise ValueError(f"mean_gap_s must be finite and > 0, got {self.mean_gap_s!r}")
        if not self.weights or any(w < 0 for w in self.weights.values()):
            raise ValueError("weights must name at least one kind, none negative")
        if sum(self.weights.values()) <= 0:
            raise ValueError("weights must not all be 0")
        unknown = set(self.weights) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        for name in ("kill_down_s", "stop_s"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be a range 0 <= low <= high, got {(low, high)}")
        if self.recovery_s < 0:
            raise ValueError(f"recovery_s must be >= 0, got {self.recovery_s}")


@dataclass(frozen=True)
class FaultPlan:
    faults: tuple[Fault, ...]
    skipped: int  # fault slots with no device that could fail without emptying a role

    def counts(self) -> dict[str, int]:
        counted = Counter(f.kind for f in self.faults)
        return {kind: counted.get(kind, 0) for kind in FAULT_KINDS}


def plan_faults(
    roles: Mapping[str, str],
    *,
    start_s: float,
    end_s: float,
    mix: FaultMix,
    seed: int,
) -> FaultPlan:
    """Faults at Poisson times in [start_s, end_s); every device is back by ``end_s``.

    ``roles`` maps each device to its role. A device is out from its fault until
    ``recovery_s`` after it comes back; at most all but one device of a role are out
    at once.
    """
    if not end_s > start_s >= 0:
        raise ValueError(f"need 0 <= start_s < end_s, got {start_s}, {end_s}")
    rng = np.random.default_rng(seed)
    kinds = [k for k in FAULT_KINDS if mix.weights.get(k, 0) > 0]
    shares = np.array([mix.weights[k] for k in kinds], dtype=np.float64)
    shares /= shares.sum()
    out_until: dict[str, float] = {}
    faults: list[Fault] = []
    skipped = 0
    at = start_s
    while True:
        at += float(rng.exponential(mix.mean_gap_s))
        if at >= end_s:
            break
        kind = kinds[int(rng.choice(len(kinds), p=shares))]
        hold = _hold_s(kind, mix, rng)
        eligible = _eligible(roles, out_until, at)
        if not eligible:
            skipped += 1
            continue
        device = eligible[int(rng.integers(len(eligible)))]
        hold = min(hold, end_s - at)  # back within the window, whatever was drawn
        faults.append(Fault(round(at, 3), device, kind, round(hold, 3)))
        out_until[device] = at + hold + mix.recovery_s
    return FaultPlan(tuple(faults), skipped)


def _hold_s(kind: FaultKind, mix: FaultMix, rng: np.random.Generator) -> float:
    if kind == "restart":
        return 0.0
    low, high = mix.kill_down_s if kind == "kill" else mix.stop_s
    return float(rng.uniform(low, high))


def _eligible(roles: Mapping[str, str], out_until: Mapping[str, float], at: float) -> list[str]:
    """Devices that are up at ``at`` and whose role keeps another device up without them."""
    out = {device for device, until in out_until.items() if until > at}
    up_by_role = Counter(role for device, role in roles.items() if device not in out)
    return sorted(
        device for device, role in roles.items() if device not in out and up_by_role[role] > 1
    )


def most_out_by_role(
    faults: Sequence[Fault], roles: Mapping[str, str], recovery_s: float = 0.0
) -> dict[str, int]:
    """The most devices of each role out at one moment (from a fault until ``recovery_s``
    after it is back): a plan keeps each below the role's device count."""
    events: list[tuple[float, int, str]] = []
    for fault in faults:
        role = roles[fault.device]
        events.append((fault.at_s, 1, role))
        events.append((fault.back_s + recovery_s, -1, role))
    # At one instant a device coming back is counted before another one failing.
    events.sort(key=lambda event: (event[0], event[1]))
    now: Counter[str] = Counter()
    most = dict.fromkeys(sorted(set(roles.values())), 0)
    for _, step, role in events:
        now[role] += step
        most[role] = max(most[role], now[role])
    return most
