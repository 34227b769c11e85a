"""What one request did, as the dispatcher saw it: the source of its metrics, its log
line and its trace.

The dispatcher fills a ``RequestRecord`` as the request runs (times on its monotonic
clock) and hands it, once the request is over, to the metrics and to every
``RequestObserver`` (tracing). Phases, on the clock:

    arrived -> admitted            queue (the router's admission queue)
    admitted -> prefill_done_at    prefill (split: the prefill leg answered;
                                   colocated: the first token)
    prefill_done_at -> decode_first_at
                                   KV handoff (split: transfer plus the decode
                                   leg's first step)
    first_token_at -> last_token_at
                                   decode (tokens streamed to the client)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from backends.base import GenerationRequest
from router.scheduling.plan import Decision, Prediction
from router.scheduling.slo import Slo


@dataclass(eq=False)
class Leg:
    """One leg a backend served to its end: what its latency metric observes."""

    backend: str
    phase: str  # prefill, decode, generate
    started: float
    ended: float


@dataclass(eq=False)
class RequestRecord:
    request: GenerationRequest
    arrived: float  # monotonic clock, before any wait for admission
    arrived_unix_ns: int  # the same instant on the wall clock (for trace spans)
    slo_class: str
    admitted: float | None = None
    mode: str = "none"  # split, colocated; none: refused before a plan
    prefill_backend: str = ""
    decode_backend: str = ""
    prefill_kind: str = ""
    decode_kind: str = ""
    prefill_done_at: float | None = None
    decode_first_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float = 0.0
    # Gaps between consecutive frames sent to the client after the first.
    frame_gaps: list[float] = field(default_factory=list)
    handoff_bytes: int = 0
    handoffs: int = 0
    prompt_tokens: int = 0  # as the backend reported them (0: not reported)
    completion_tokens: int = 0  # tokens the client was sent
    attempts: int = 0
    legs: list[Leg] = field(default_factory=list)
    # The last frame's router_pb2.FinishReason (0: no last frame reached the client).
    finish_reason: int = 0
    outcome: str = "error"
    error: str = ""  # the error the client got, when it got one
    slo_met: bool | None = None  # None: held to no SLO, or not completed
    # Why the request was split or not (None: refused before a plan), and the targets
    # the scheduler planned it against (its own or its class's, less its admission wait).
    decision: Decision | None = None
    planned_slo: Slo | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None: fewer than two tokens)."""
        if self.first_token_at is None or self.completion_tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (self.completion_tokens - 1)

    @property
    def e2e_s(self) -> float | None:
        return None if self.first_token_at is None else self.last_token_at - self.arrived

    @property
    def queue_s(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.arrived

    @property
    def prefill_s(self) -> float | None:
        if self.admitted is None or self.prefill_done_at is None:
            return None
        return self.prefill_done_at - self.admitted

    @property
    def handoff_s(self) -> float | None:
        if self.prefill_done_at is None or self.decode_first_at is None:
            return None
        return self.decode_first_at - self.prefill_done_at

    @property
    def decode_s(self) -> float | None:
        return None if self.first_token_at is None else self.last_token_at - self.first_token_at

    def log_fields(self) -> dict[str, object]:
        """The request's log line: ids are bound by the door (``bind_request``)."""
        fields: dict[str, object] = {
            "model": self.request.model,
            "mode": self.mode,
            "outcome": self.outcome,
            "slo_class": self.slo_class,
            "prompt_tokens": self.prompt_tokens or self.request.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "attempts": self.attempts,
        }
        if self.mode != "none":
            fields["prefill"] = self.prefill_backend
            fields["decode"] = self.decode_backend
        for name, value in (
            ("queue_ms", self.queue_s),
            ("ttft_ms", self.ttft_s),
            ("tpot_ms", self.tpot_s),
            ("handoff_ms", self.handoff_s),
            ("e2e_ms", self.e2e_s),
        ):
            if value is not None:
                fields[name] = round(value * 1000, 3)
        if self.handoffs:
            fields["handoff_bytes"] = self.handoff_bytes
        if self.decision is not None:
            fields.update(self._decision_fields(self.decision))
        if self.slo_met is not None:
            fields["slo_met"] = self.slo_met
        if self.error:
            fields["error"] = self.error
        return fields

    def _decision_fields(self, decision: Decision) -> dict[str, object]:
        """Why the request was split or not: the reason, the targets planned for, and
        what was predicted of each mode the scheduler built."""
        fields: dict[str, object] = {"decision": decision.reason.value}
        slo = self.planned_slo
        if slo is not None:
            for name, limit in (("planned_ttft_ms", slo.ttft_s), ("planned_tpot_ms", slo.tpot_s)):
                if limit is not None:
                    fields[name] = round(limit * 1000, 3)
        for name, predicted in (("split", decision.split), ("colocated", decision.colocated)):
            if predicted is not None:
                fields[f"predicted_{name}"] = _prediction_fields(predicted)
        return fields


def _prediction_fields(predicted: Prediction) -> dict[str, float]:
    return {
        "ttft_ms": round(predicted.ttft_s * 1000, 3),
        "tpot_ms": round(predicted.tpot_s * 1000, 3),
        "cost_usd": float(f"{predicted.cost_usd:.4g}"),
        "marginal_usd": float(f"{predicted.marginal_usd:.4g}"),
        "prefill_load": round(predicted.prefill_load, 3),
        "decode_load": round(predicted.decode_load, 3),
    }


class RequestObserver(Protocol):
    """Told of every request the dispatcher serves (tracing)."""

    def started(self, record: RequestRecord) -> str:
        """The request arrived: the ``traceparent`` its backends are to be sent (the
        request's own, or one naming the observer's span)."""
        ...

    def finished(self, record: RequestRecord) -> None:
        """The request is over (any outcome); ``record`` is complete."""
        ...
