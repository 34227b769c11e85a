"""The `peers` scenario's judgement: each system's figures against vllm-router's from the
same run, and the issue's targets. Pure: figures in, ratios and verdicts out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bench.report import check

REFERENCE = "vllm-router"
HTTP_DOOR = "hetero-http"
# The HTTP door of a router run with --workers 2 (two processes sharing the port).
HTTP_DOOR_WORKERS = "hetero-http-2w"
GRPC_DOOR = "hetero-grpc"
RELAY = "grpc-relay"
# A bare aiohttp relay of the split forwarding the engine's SSE bytes: the HTTP door's floor.
HTTP_RELAY = "http-relay"
DIRECT = "direct"

# What a system is held to against vllm-router, as ours / theirs.
CPU_RATIO_AT_MOST = 1.0
TTFT_RATIO_AT_MOST = 1.0
THROUGHPUT_RATIO_AT_LEAST = 1.0
# The gRPC door's added TTFT p50 over the raw relay's (the floor), in ms.
GRPC_OVER_RELAY_AT_MOST_MS = 0.1


@dataclass(frozen=True)
class SystemFigures:
    """One system's figures from one run; None where it has none (direct has no router)."""

    added_ttft_p50_ms: float | None
    added_ttft_p99_ms: float | None
    cpu_us_per_request: float | None
    requests_per_s: float | None
    rss_peak_mib: float | None = None
    rss_after_mib: float | None = None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs; None when either is missing or theirs is not above zero (an added
    TTFT of zero or below is noise around direct, and no base for a ratio)."""
    if ours is None or theirs is None or theirs <= 0:
        return None
    return ours / theirs


def ratios(figures: Mapping[str, SystemFigures]) -> dict[str, dict[str, float | None]]:
    """Every system's figures over vllm-router's (none when it did not run)."""
    reference = figures.get(REFERENCE)
    if reference is None:
        return {}
    return {
        name: {
            "cpu_per_request_ratio": ratio(mine.cpu_us_per_request, reference.cpu_us_per_request),
            "added_ttft_p50_ratio": ratio(mine.added_ttft_p50_ms, reference.added_ttft_p50_ms),
            "added_ttft_p99_ratio": ratio(mine.added_ttft_p99_ms, reference.added_ttft_p99_ms),
            "throughput_ratio": ratio(mine.requests_per_s, reference.requests_per_s),
        }
        for name, mine in figures.items()
        if name != REFERENCE
    }


def _against_reference(
    ours: float | None,
    theirs: float | None,
    *,
    at_most: float | None = None,
    at_least: float | None = None,
    missing: str | None = None,
) -> dict[str, Any]:
    """ours / theirs judged against a limit; a base of zero or below is judged ours <=
    theirs (lower is better wherever a limit is at_most)."""
    target = f"<= {at_most}x" if at_most is not None else f">= {at_least}x"
    if missing is not None or ours is None or theirs is None:
        return {"value": None, "target": target, "met": False, "skipped": missing or "no figure"}
    value = ratio(ours, theirs)
    if value is None:
        return {
            "value": None,
            "target": target,
            "met": bool(ours <= theirs),
            "ours": round(ours, 4),
            "theirs": round(theirs, 4),
            "note": "vllm-router's figure is not above zero: judged as ours <= theirs",
        }
    return {
        **check(value, at_most=at_most, at_least=at_least),
        "target": target,
        "ours": round(ours, 4),
        "theirs": round(theirs, 4),
    }


def targets(
    figures: Mapping[str, SystemFigures],
    split: Mapping[str, bool],
    peers_missing: str | None = None,
) -> dict[str, dict[str, Any]]:
    """The issue's targets for this router's doors. ``split`` says for each router whether
    the engines counted a prefill and a decode leg for every request it was sent;
    ``peers_missing`` is why the peer routers did not run, when they did not."""
    door = figures[HTTP_DOOR]
    reference = figures.get(REFERENCE)
    missing = peers_missing or (None if reference is not None else "vllm-router did not run")

    def theirs(name: str) -> float | None:
        return None if reference is None else getattr(reference, name)

    grpc_door, relay = figures.get(GRPC_DOOR), figures.get(RELAY)
    over_relay = (
        None
        if grpc_door is None
        or relay is None
        or grpc_door.added_ttft_p50_ms is None
        or relay.added_ttft_p50_ms is None
        else grpc_door.added_ttft_p50_ms - relay.added_ttft_p50_ms
    )
    return {
        "cpu_per_request_ratio": _against_reference(
            door.cpu_us_per_request,
            theirs("cpu_us_per_request"),
            at_most=CPU_RATIO_AT_MOST,
            missing=missing,
        ),
        "added_ttft_p50_ratio": _against_reference(
            door.added_ttft_p50_ms,
            theirs("added_ttft_p50_ms"),
            at_most=TTFT_RATIO_AT_MOST,
            missing=missing,
        ),
        "added_ttft_p99_ratio": _against_reference(
            door.added_ttft_p99_ms,
            theirs("added_ttft_p99_ms"),
            at_most=TTFT_RATIO_AT_MOST,
            missing=missing,
        ),
        "throughput_ratio": _against_reference(
            door.requests_per_s,
            theirs("requests_per_s"),
            at_least=THROUGHPUT_RATIO_AT_LEAST,
            missing=missing,
        ),
        "grpc_door_over_relay_added_ttft_p50_ms": (
            check(over_relay, at_most=GRPC_OVER_RELAY_AT_MOST_MS)
            if over_relay is not None
            else {"value": None, "target": f"<= {GRPC_OVER_RELAY_AT_MOST_MS}", "met": False}
        ),
        "routers_split": {
            **check(sum(split.values()), at_least=len(split)),
            "not_split": sorted(name for name, ok in split.items() if not ok),
        },
    }


def floors(figures: Mapping[str, SystemFigures]) -> dict[str, float | None]:
    """What bounds the doors: each relay's CPU per request over vllm-router's (what Python
    doing the same I/O costs at the least) and each door's over its relay's (what the
    router's own software adds). Figures, not targets."""

    def cpu(name: str) -> float | None:
        system = figures.get(name)
        return None if system is None else system.cpu_us_per_request

    return {
        "http_relay_cpu_over_vllm_router": ratio(cpu(HTTP_RELAY), cpu(REFERENCE)),
        "grpc_relay_cpu_over_vllm_router": ratio(cpu(RELAY), cpu(REFERENCE)),
        "http_door_cpu_over_http_relay": ratio(cpu(HTTP_DOOR), cpu(HTTP_RELAY)),
        "grpc_door_cpu_over_grpc_relay": ratio(cpu(GRPC_DOOR), cpu(RELAY)),
    }
