"""What a request asks of the service besides its content: latency targets, urgency, class."""

from __future__ import annotations

from dataclasses import dataclass

from router.scheduling.slo import Slo

DEFAULT_SLO_CLASS = "default"
MAX_PRIORITY = 9
MAX_TARGET_MS = 3_600_000
# A target the request leaves unset when its SLO class has no default: the latency
# limits of MLPerf Inference's Llama 2 70B server scenario (TTFT 2 s, TPOT 200 ms).
FALLBACK_SLO = Slo(ttft_s=2.0, tpot_s=0.2)


# The least TTFT budget a scheduler is given for a request that spent the rest queued.
MIN_TTFT_BUDGET_S = 0.001


@dataclass(frozen=True)
class ServiceLevel:
    """Validated: targets within 1..MAX_TARGET_MS, priority 0..MAX_PRIORITY, a known class."""

    ttft_ms: int | None = None
    tpot_ms: int | None = None
    priority: int = 0
    slo_class: str = DEFAULT_SLO_CLASS

    def own_slo(self, class_default: Slo | None) -> Slo | None:
        """The request's own targets, a missing one taken from its class's default.

        None when the request set neither: its class's default then applies as a whole.
        """
        if self.ttft_ms is None and self.tpot_ms is None:
            return None
        default = class_default or FALLBACK_SLO
        return Slo(
            ttft_s=default.ttft_s if self.ttft_ms is None else self.ttft_ms / 1000,
            tpot_s=default.tpot_s if self.tpot_ms is None else self.tpot_ms / 1000,
        )

    def effective_slo(self, class_default: Slo | None) -> Slo | None:
        """What the request is held to: its own targets, else its class's (None: no SLO)."""
        return self.own_slo(class_default) or class_default

    def scheduling_slo(self, class_default: Slo | None, waited_s: float) -> Slo | None:
        """The targets the scheduler plans for: the request's own (None: its class's).

        Time spent queued for admission counts toward the time to first token, so a
        request that waited is planned against what is left of its budget.
        """
        own = self.own_slo(class_default)
        held_to = own or class_default
        if waited_s <= 0 or held_to is None or held_to.ttft_s is None:
            return own
        return Slo(max(held_to.ttft_s - waited_s, MIN_TTFT_BUDGET_S), held_to.tpot_s)


DEFAULT_SERVICE = ServiceLevel()
