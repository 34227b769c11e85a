"""Every Prometheus metric of the router, on a registry that is passed in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets in seconds, dense where SLOs sit (TTFT 0.1-1 s, TPOT 2-50 ms).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10)
_TPOT_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.1, 0.25
)  # fmt: skip
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "hetero_router_requests",
            "Generate requests by outcome (ok, invalid, unavailable, cancelled, ...) and mode",
            ["outcome", "mode"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "hetero_router_time_to_first_token_seconds",
            "From request arrival to the first token sent to the client",
            ["mode"],
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.time_per_output_token = Histogram(
            "hetero_router_time_per_output_token_seconds",
            "Mean gap between output tokens after the first, per request",
            ["mode"],
            buckets=_TPOT_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            "hetero_router_request_duration_seconds",
            "From request arrival to the last token",
            ["mode"],
            buckets=_E2E_BUCKETS,
            registry=registry,
        )
        self.output_tokens = Counter(
            "hetero_router_output_tokens", "Tokens streamed to clients", ["mode"], registry=registry
        )
        self.in_flight = Gauge(
            "hetero_router_requests_in_flight", "Generate requests being served", registry=registry
        )
        self.admission_queue_depth = Gauge(
            "hetero_router_admission_queue_depth",
            "Requests waiting for admission, by priority (0..9, larger is more urgent)",
            ["priority"],
            registry=registry,
        )
        self.shed = Counter(
            "hetero_router_shed",
            "Requests refused RESOURCE_EXHAUSTED, by reason: queue_full (the admission "
            "queue of their priority was full), queue_time (the wait for admission would "
            "miss their time to first token), queue_expired (they waited all their time to "
            "first token allowed), client_rate (their client was over its request rate), "
            "client_cap (their client had the most open streams one client may), slo "
            "(predicted to miss their SLO)",
            ["reason"],
            registry=registry,
        )
        self.concurrency_limit = Gauge(
            "hetero_router_concurrency_limit",
            "Requests the router serves at once now: the adaptive limit (at most "
            "max_in_flight), or max_in_flight when the limit is fixed",
            registry=registry,
        )
        self.concurrency_latency = Gauge(
            "hetero_router_concurrency_latency_seconds",
            "Latencies the adaptive limit follows, by signal (first_token: admission to "
            "first token; per_token: time per output token) and window (sample: the last "
            "window's; baseline: the lowest window's of the baseline period)",
            ["signal", "window"],
            registry=registry,
        )
        self.write_stalls = Counter(
            "hetero_router_write_stalls",
            "Streams cancelled because their reader took nothing for write_stall_timeout_s, "
            "by door (grpc, http)",
            ["door"],
            registry=registry,
        )
        self.slo_requests = Counter(
            "hetero_router_slo_requests",
            "Completed requests with an SLO, by outcome (met: both time to first token "
            "and time per output token within target; missed), SLO class and mode",
            ["outcome", "slo_class", "mode"],
            registry=registry,
        )
        self.backend_healthy = Gauge(
            "hetero_router_backend_healthy",
            "1 when the backend passes health checks",
            ["backend", "role"],
            registry=registry,
        )
        self.backend_outstanding = Gauge(
            "hetero_router_backend_outstanding_requests",
            "Requests the router has in flight on the backend",
            ["backend"],
            registry=registry,
        )
        self.backend_failures = Counter(
            "hetero_router_backend_failures",
            "Failed legs by backend and phase (prefill, decode, generate, relay, handoff)",
            ["backend", "phase"],
            registry=registry,
        )
        self.backend_ejected = Gauge(
            "hetero_router_backend_ejected",
            "1 while the backend is ejected by passive outlier detection",
            ["backend"],
            registry=registry,
        )
        self.outlier_ejections = Counter(
            "hetero_router_outlier_ejections",
            "Times the backend was ejected for failing requests in a row",
            ["backend"],
            registry=registry,
        )
        self.retries = Counter(
            "hetero_router_retries",
            "Attempts after a failed one, by kind: retry (no token had reached the client), "
            "migration (resumed on another backend after the client's tokens), colocated "
            "(a stalled KV handoff served on the decode backend alone)",
            ["kind"],
            registry=registry,
        )
        self.retries_refused = Counter(
            "hetero_router_retries_refused",
            "Failed attempts not tried again, by reason: attempts (max_attempts reached), "
            "budget (the retry budget was spent), no_backend (no other backend could take "
            "it), migration_off (the client had tokens and migration is off)",
            ["reason"],
            registry=registry,
        )
