"""Admission: refuse early what would be late anyway.

A request whose best plan is predicted to miss its SLO by more than the profile's slack
is rejected with RESOURCE_EXHAUSTED and a hint of when to retry, before any backend
spends a second on it (Mooncake's early rejection). Serving it would only add load that
makes the requests behind it late too. High priorities can be exempt. The bounded
queues per priority are the daemon's (router/dispatch/admission.py): a policy has no
clock to wait on.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from backends.errors import OverloadedError
from router.scheduling.context import Context
from router.scheduling.deciders import lateness
from router.scheduling.plan import Plan

MIN_RETRY_S = 0.05
MAX_RETRY_S = 30.0


class Admission(Protocol):
    name: ClassVar[str]

    def admit(self, plan: Plan, ctx: Context) -> None:
        """Returns to admit; raises OverloadedError to shed."""
        ...


class AdmitAll:
    name: ClassVar[str] = "admit-all"

    def admit(self, plan: Plan, ctx: Context) -> None:
        return None


class SloGuard:
    """Sheds a request predicted later than ``slack`` times its SLO.

    ``slack`` above 1 tolerates the model's error (it does not see future arrivals);
    priorities of at least ``exempt_priority`` are never shed here.
    """

    name: ClassVar[str] = "slo-guard"

    def __init__(self, slack: float = 1.5, exempt_priority: int = 8) -> None:
        if not slack > 0:
            raise ValueError(f"slack must be > 0, got {slack}")
        self.slack = slack
        self.exempt_priority = exempt_priority

    def admit(self, plan: Plan, ctx: Context) -> None:
        predicted = plan.predicted
        if predicted is None or ctx.features.priority >= self.exempt_priority:
            return
        slo = ctx.slo
        if lateness(predicted, slo) <= self.slack:
            return
        # The queue ahead of it must drain by the excess before the SLO is reachable.
        excess = max(predicted.ttft_s - slo.ttft_s, 0.0) if slo.ttft_s is not None else 0.0
        retry = min(max(excess, MIN_RETRY_S), MAX_RETRY_S)
        raise OverloadedError(
            f"predicted TTFT {predicted.ttft_s * 1000:.0f} ms and TPOT "
            f"{predicted.tpot_s * 1000:.1f} ms miss the SLO ({_ms(slo.ttft_s, 0)}, "
            f"{_ms(slo.tpot_s, 1)}) by more than {self.slack:g}x on every backend; "
            f"retry in {retry:.2f} s or relax the SLO",
            retry_after_s=retry,
        )


def _ms(limit_s: float | None, digits: int) -> str:
    return "no limit" if limit_s is None else f"{limit_s * 1000:.{digits}f} ms"
