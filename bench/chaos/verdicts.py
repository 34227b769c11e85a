"""What each request got, judged against a fault-free run of the same request.

Mock devices are deterministic: greedy decoding is, and seeded sampling draws a
pure function of (seed, position). So a request sent again with the same prompt,
seed and parameters must produce the same tokens, wherever it is served and
whatever failed on the way. A request is judged by how it ended (a final frame,
an error, nothing) and, when it has tokens, by how they differ from the reference:
repeated (a replay after a resume), missing (a gap, or a stream cut short) or
wrong. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from router.sim.metrics import OK, RequestRecord

# How a request ended, as the client saw it.
Ending = Literal["complete", "error_before_first_token", "error_after_first_token", "lost"]
# How delivered tokens compare with the reference.
TokenKind = Literal["exact", "truncated", "duplicated", "missing", "extra", "wrong"]

STREAM_CLOSED = "ok"  # the stream ended without an error status
DEADLINE = "deadline"  # the client gave up waiting


@dataclass
class Delivery:
    """One request as the client saw it; times are ``time.monotonic()``."""

    index: int
    start_s: float
    end_s: float | None = None
    first_token_s: float | None = None
    token_ids: list[int] = field(default_factory=list)
    token_times_s: list[float] = field(default_factory=list)
    finish_reason: int = 0  # 0: no final frame came
    completion_tokens: int | None = None  # the final frame's usage
    status: str = STREAM_CLOSED  # STREAM_CLOSED, a gRPC status name, or DEADLINE
    detail: str = ""
    prefill_backend: str = ""
    decode_backend: str = ""

    @property
    def ending(self) -> Ending:
        if self.status == STREAM_CLOSED:
            # A stream that closed cleanly without its final frame is as lost as one that
            # never answered: the client cannot tell a finished request from a cut one.
            return "complete" if self.finish_reason else "lost"
        if self.status == DEADLINE:
            return "lost"
        return "error_after_first_token" if self.token_ids else "error_before_first_token"

    def record(self) -> RequestRecord:
        """The load generator's view, for latency, SLO attainment and goodput."""
        return RequestRecord(
            start_s=self.start_s,
            first_token_s=self.first_token_s,
            end_s=self.end_s,
            token_times_s=list(self.token_times_s),
            outcome=OK if self.ending == "complete" else self.status,
        )


@dataclass(frozen=True)
class TokenCheck:
    kind: TokenKind
    duplicated: int = 0  # tokens delivered again
    missing: int = 0  # reference tokens never delivered
    wrong: int = 0  # delivered tokens the reference does not explain


def compare(delivered: Sequence[int], reference: Sequence[int]) -> TokenCheck:
    """How ``delivered`` differs from ``reference``.

    After their common head, the rest of ``delivered`` is looked for as a run of the
    reference: starting before the head's end, it repeats tokens (a resume that
    replayed them); after it, tokens were skipped. The nearest such start wins.
    Otherwise the rest is wrong.
    """
    head = _common_prefix(delivered, reference)
    rest = delivered[head:]
    if not rest:
        if head == len(reference):
            return TokenCheck("exact")
        return TokenCheck("truncated", missing=len(reference) - head)
    start = _nearest_run(rest, reference, head)
    if start is None:
        if head == len(reference):
            return TokenCheck("extra", wrong=len(rest))
        return TokenCheck("wrong", missing=len(reference) - head, wrong=len(rest))
    tail_missing = len(reference) - (start + len(rest))
    if start < head:
        return TokenCheck("duplicated", duplicated=head - start, missing=tail_missing)
    return TokenCheck("missing", missing=start - head + tail_missing)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _nearest_run(rest: Sequence[int], reference: Sequence[int], head: int) -> int | None:
    """The start nearest ``head`` (but not ``head``) where ``reference`` holds ``rest``."""
    width = len(rest)
    starts = [
        start
        for start in range(len(reference) - width + 1)
        if start != head and list(reference[start : start + width]) == list(rest)
    ]
    return min(starts, key=lambda start: (abs(start - head), start)) if starts else None


@dataclass
class Tally:
    """The chaos run's verdict over all requests."""

    requests: int = 0
    endings: Counter[str] = field(default_factory=Counter)
    # Complete requests by how their tokens compare with the reference.
    complete_tokens: Counter[str] = field(default_factory=Counter)
    tokens_duplicated: int = 0
    tokens_missing: int = 0
    tokens_wrong: int = 0
    # Complete requests whose final usage counts other tokens than were delivered.
    usage_mismatch: int = 0
    # Requests with no reference to compare with (the fault-free run failed them too).
    unverified: int = 0
    # Errors after the first token: tokens got first, and whether they matched.
    tokens_before_error: list[int] = field(default_factory=list)
    errors_with_wrong_tokens: int = 0
    lost_by_cause: Counter[str] = field(default_factory=Counter)
    errors_by_status: Counter[str] = field(default_factory=Counter)

    @property
    def differing(self) -> int:
        """Complete requests whose tokens are not exactly the reference's."""
        return sum(n for kind, n in self.complete_tokens.items() if kind != "exact")

    def to_dict(self) -> dict[str, object]:
        before = self.endings["error_before_first_token"]
        after = self.endings["error_after_first_token"]
        return {
            "requests": self.requests,
            "complete": self.endings["complete"],
            "lost": self.endings["lost"],
            "lost_by_cause": dict(sorted(self.lost_by_cause.items())),
            "tokens_differ": self.differing,
            "complete_by_tokens": dict(sorted(self.complete_tokens.items())),
            "tokens_duplicated": self.tokens_duplicated,
            "tokens_missing": self.tokens_missing,
            "tokens_wrong": self.tokens_wrong,
            "usage_mismatch": self.usage_mismatch,
            "unverified": self.unverified,
            "errors_before_first_token": before,
            "errors_after_first_token": after,
            "errors_by_status": dict(sorted(self.errors_by_status.items())),
            "tokens_before_error": sorted(self.tokens_before_error),
            "errors_with_wrong_tokens": self.errors_with_wrong_tokens,
        }


def tally(deliveries: Sequence[Delivery], reference: Mapping[int, Sequence[int]]) -> Tally:
    """Judges every delivery against ``reference`` (request index -> its tokens)."""
    result = Tally(requests=len(deliveries))
    for delivery in deliveries:
        ending = delivery.ending
        result.endings[ending] += 1
        if ending == "lost":
            result.lost_by_cause[
                "deadline" if delivery.status == DEADLINE else "no_final_frame"
            ] += 1
        elif ending != "complete":
            result.errors_by_status[delivery.status] += 1
        expected = reference.get(delivery.index)
        if expected is None:
            result.unverified += 1
            continue
        check = compare(delivery.token_ids, expected)
        if ending == "complete":
            result.complete_tokens[check.kind] += 1
            result.tokens_duplicated += check.duplicated
            result.tokens_missing += check.missing
            result.tokens_wrong += check.wrong
            if delivery.completion_tokens != len(delivery.token_ids):
                result.usage_mismatch += 1
        elif ending == "error_after_first_token":
            result.tokens_before_error.append(len(delivery.token_ids))
            if check.kind not in ("exact", "truncated"):
                result.errors_with_wrong_tokens += 1
    return result


def reference_tokens(deliveries: Sequence[Delivery]) -> dict[int, list[int]]:
    """The tokens of every request that completed: a fault-free run's are the reference."""
    return {d.index: list(d.token_ids) for d in deliveries if d.ending == "complete"}


@dataclass(frozen=True)
class DeviceLoad:
    """What a device's Load RPC reported."""

    kv_leases: int
    running: int
    waiting: int


def lease_tally(loads: Mapping[str, DeviceLoad | None]) -> dict[str, object]:
    """Sums what the devices hold once the load is over; None: the device did not answer.

    Leases held then are KV that no request will fetch (every request has ended), and
    running or waiting sequences are work nobody reads.
    """
    answered = {device: load for device, load in loads.items() if load is not None}
    return {
        "kv_leases": sum(load.kv_leases for load in answered.values()),
        "running": sum(load.running for load in answered.values()),
        "waiting": sum(load.waiting for load in answered.values()),
        "by_device": {
            device: {"kv_leases": load.kv_leases, "running": load.running, "waiting": load.waiting}
            for device, load in sorted(answered.items())
        },
        "unreachable": sorted(device for device, load in loads.items() if load is None),
    }


def per_bin(times_s: Sequence[float], span_s: float, width_s: float) -> list[int]:
    """How many of ``times_s`` (offsets from the run's start) fall in each bin."""
    if width_s <= 0 or span_s <= 0:
        raise ValueError("span_s and width_s must be > 0")
    bins = [0] * max(1, int(span_s / width_s + 0.999999))
    for time_s in times_s:
        if 0 <= time_s < len(bins) * width_s:
            bins[int(time_s / width_s)] += 1
    return bins


def unhealthy_spans(
    polls: Sequence[tuple[float, Mapping[str, tuple[bool, int]]]], end_s: float
) -> dict[str, list[list[float]]]:
    """When the router counted each backend unhealthy, from polls of (offset, {backend:
    (healthy, outstanding)}); a span still open at the last poll ends at ``end_s``."""
    spans: dict[str, list[list[float]]] = {}
    since: dict[str, float] = {}
    for at, backends in polls:
        for backend, (healthy, _) in backends.items():
            if not healthy and backend not in since:
                since[backend] = at
            elif healthy and backend in since:
                spans.setdefault(backend, []).append([round(since.pop(backend), 2), round(at, 2)])
    for backend, start in since.items():
        spans.setdefault(backend, []).append([round(start, 2), round(end_s, 2)])
    return spans


def router_saw(
    spans: Sequence[Sequence[float]],
    applied_s: float,
    back_s: float | None,
    poll_s: float,
    next_fault_s: float = math.inf,
) -> tuple[float | None, float | None]:
    """How long after a fault the router counted the device unhealthy (0: it already
    did), and how long after the device served again it counted it healthy. None where
    it never did (a short stop can pass unnoticed), the device never came back, or the
    device's next fault (``next_fault_s``) came first."""
    for start, end in spans:
        if end < applied_s:
            continue
        if back_s is not None and start > back_s + poll_s:
            break  # a later outage: this fault went unnoticed
        down = max(0.0, start - applied_s)
        if back_s is None or end > next_fault_s:
            return down, None
        return down, max(0.0, end - back_s)
    return None, None
