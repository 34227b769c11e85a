"""Pickers: one backend out of the candidates of a leg.

A picker that wants scores gets a ``rate`` callable: it returns the weighted score of
the candidates it is given (so power-of-two-choices scores two, max-score all).
Randomness comes from the request's arrival sequence through a fixed mix, never from a
global generator: the same sequence picks the same way in the daemon, the tests and the
simulator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol

from router.scheduling.snapshot import BackendView

Rate = Callable[[Sequence[BackendView]], list[float]]

_MASK = (1 << 64) - 1


def mix(value: int) -> int:
    """SplitMix64's finaliser: a well-spread 64-bit function of ``value``."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


class Picker(Protocol):
    name: ClassVar[str]

    def pick(self, candidates: Sequence[BackendView], sequence: int, rate: Rate) -> BackendView: ...


def _check(candidates: Sequence[BackendView]) -> None:
    if not candidates:
        raise ValueError("no candidates to pick from")


class RoundRobinPicker:
    """Candidates in turn, by arrival sequence: no state, and blind to load."""

    name: ClassVar[str] = "round-robin"

    def pick(self, candidates: Sequence[BackendView], sequence: int, rate: Rate) -> BackendView:
        _check(candidates)
        return candidates[sequence % len(candidates)]


class LeastOutstandingPicker:
    """Fewest requests in flight from this router; ties rotate with the arrival sequence."""

    name: ClassVar[str] = "least-outstanding"

    def pick(self, candidates: Sequence[BackendView], sequence: int, rate: Rate) -> BackendView:
        _check(candidates)
        fewest = min(c.outstanding for c in candidates)
        tied = [c for c in candidates if c.outstanding == fewest]
        return tied[sequence % len(tied)]


class PowerOfTwoPicker:
    """Two candidates drawn from the sequence's hash; the better scored of them wins.

    Nearly as good as scoring all at a fraction of the cost, and it spreads a burst
    instead of sending it all to one momentary best (Mitzenmacher's power of two choices).
    """

    name: ClassVar[str] = "power-of-two-choices"

    def pick(self, candidates: Sequence[BackendView], sequence: int, rate: Rate) -> BackendView:
        _check(candidates)
        count = len(candidates)
        if count == 1:
            return candidates[0]
        draw = mix(sequence)
        first = draw % count
        second = (first + 1 + (draw >> 32) % (count - 1)) % count
        pair = (candidates[first], candidates[second])
        a, b = rate(pair)
        if a == b:
            return min(pair, key=lambda c: c.outstanding)
        return pair[0] if a > b else pair[1]


class MaxScorePicker:
    """The best weighted score; ties rotate with the arrival sequence."""

    name: ClassVar[str] = "max-score"

    def pick(self, candidates: Sequence[BackendView], sequence: int, rate: Rate) -> BackendView:
        _check(candidates)
        if len(candidates) == 1:
            return candidates[0]
        scores = rate(candidates)
        best = max(scores)
        tied = [c for c, s in zip(candidates, scores, strict=True) if s >= best - 1e-12]
        return tied[sequence % len(tied)]
