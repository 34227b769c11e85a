"""Every Prometheus metric of the router, on a registry that is passed in.

Names follow vLLM's where the meaning is the same (``vllm:time_to_first_token_seconds``
is ``hetero_router_time_to_first_token_seconds``), so dashboards written for vLLM read
the router after a change of prefix. Request metrics carry the route's labels:
``model``, ``mode`` (split, colocated), ``slo_class`` and the device kinds of its legs
(``prefill_kind``, ``decode_kind``: the backends' profiles, e.g. ``h100``,
``groq-lpu``), so what each kind of chip delivers can be read apart.

Buckets hold every boundary vLLM's histogram of the same quantity has (a query on a
vLLM ``le`` works unchanged) plus finer ones where the SLOs of fast decode chips and
of a router's own queue sit: vLLM's time-per-token buckets start at 10 ms, where an
SRAM decode chip's whole SLO may be 5 ms.

Every labelled counter is created at zero for the label values known at start
(``initialise``), so that ``rate()`` of it exists before its first event.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from router.record import RequestRecord
from router.scheduling.plan import Plan, Reason


def _merged(*groups: Iterable[float]) -> tuple[float, ...]:
    return tuple(sorted({float(b) for group in groups for b in group}))


# vLLM's (vllm/v1/metrics/loggers.py), then the finer boundaries added here.
VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
VLLM_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
VLLM_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TTFT_BUCKETS = _merged(
    VLLM_TTFT_BUCKETS, (0.0025, 0.15, 0.2, 0.3, 0.4, 0.6, 1.25, 1.5, 1.75, 2.0, 3.0, 4.0)
)
TOKEN_BUCKETS = _merged(
    VLLM_TOKEN_BUCKETS, (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.015, 0.02, 0.035)
)
LATENCY_BUCKETS = _merged(VLLM_LATENCY_BUCKETS, (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2))
HANDOFF_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)

# Backends beyond this many get the label "other" on the per-backend histogram.
BACKEND_LABEL_CAP = 64

ROUTE_LABELS = ("model", "mode", "slo_class", "prefill_kind", "decode_kind")
KIND_LABELS = ("model", "prefill_kind", "decode_kind")
MODES = ("split", "colocated")
# Outcomes every model's request counter starts with (others appear as they happen).
OUTCOMES = ("ok", "cancelled", "error", "invalid", "overloaded", "unavailable")
SHED_REASONS = ("queue_full", "queue_time", "queue_expired", "client_rate", "client_cap", "slo")
RETRY_KINDS = ("retry", "migration", "colocated")
RETRY_REFUSALS = ("attempts", "budget", "no_backend", "migration_off")
DOORS = ("grpc", "http")
LEG_PHASES = ("prefill", "decode", "generate", "relay")
SLO_OUTCOMES = ("met", "missed")
DECISION_REASONS = tuple(reason.value for reason in Reason)


_Metric = TypeVar("_Metric", Counter, Gauge)


class Children(Generic[_Metric]):
    """A prometheus_client metric's children by their label values, each looked up
    once. ``labels()`` takes a lock and checks and converts every value on each call,
    which the request path would pay several times a request; a dict lookup does
    not. ``remove`` drops a series and its child, so nothing writes to a series that
    has left the page."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: _Metric) -> None:
        self._metric: _Metric = metric
        self._children: dict[tuple[str, ...], _Metric] = {}

    def __call__(self, *values: str) -> _Metric:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child

    def remove(self, *values: str) -> None:
        self._children.pop(values, None)
        _remove(self._metric, *values)


class HistogramSeries:
    """One label set's buckets: ``observe`` is a bisection and two additions."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Buckets are inclusive upper bounds: a value equal to a bound counts in it.
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value


class LabelledHistogram(Collector):
    """A Prometheus histogram for the request path, written as prometheus_client's own
    (``_bucket``, ``_count``, ``_sum``) but without its per-value locks and linear
    scan of the buckets: the router observes on one event loop, which /metrics is also
    read on, so a scrape never sees half an observation."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Iterable[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = tuple(sorted(float(b) for b in buckets))
        # le values spelled as prometheus_client spells them ("1.0", "0.005", "+Inf").
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]  # untyped in prometheus_client
        self._series: dict[tuple[str, ...], HistogramSeries] = {}
        registry.register(self)

    @property
    def labelnames(self) -> tuple[str, ...]:
        return self._labelnames

    def labels(self, *values: str) -> HistogramSeries:
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
            series = self._series[values] = HistogramSeries(self._bounds)
        return series

    def remove(self, *values: str) -> None:
        self._series.pop(values, None)

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, series in self._series.items():
            total, buckets = 0, []
            for le, count in zip(self._les, series.counts, strict=True):
                total += count
                buckets.append((le, float(total)))
            family.add_metric(list(values), buckets, series.sum)
        yield family


@dataclass(frozen=True)
class Route:
    """The label values of a request's route."""

    model: str
    mode: str
    slo_class: str
    prefill_kind: str
    decode_kind: str


class _RouteSeries:
    """A route's children of every request metric, bound once."""

    __slots__ = (
        "decode",
        "e2e",
        "generation_tokens",
        "handoff_bytes",
        "handoff_seconds",
        "itl",
        "prefill",
        "prompt_tokens",
        "queue",
        "slo",
        "slo_tpot",
        "slo_ttft",
        "tpot",
        "ttft",
    )

    def __init__(self, metrics: RouterMetrics, route: Route) -> None:
        labels = (route.model, route.mode, route.slo_class, route.prefill_kind, route.decode_kind)
        kinds = (route.model, route.prefill_kind, route.decode_kind)
        self.ttft = metrics.time_to_first_token.labels(*labels)
        self.itl = metrics.inter_token_latency.labels(*labels)
        self.tpot = metrics.request_time_per_output_token.labels(*labels)
        self.e2e = metrics.e2e_request_latency.labels(*labels)
        self.queue = metrics.request_queue_time.labels(*labels)
        self.prefill = metrics.request_prefill_time.labels(*labels)
        self.decode = metrics.request_decode_time.labels(*labels)
        self.prompt_tokens = metrics.prompt_tokens.labels(*labels)
        self.generation_tokens = metrics.generation_tokens.labels(*labels)
        self.handoff_seconds = metrics.kv_handoff_seconds.labels(*kinds)
        self.handoff_bytes = metrics.kv_handoff_bytes.labels(*kinds)
        self.slo = {
            outcome: metrics.slo_requests.labels(route.model, outcome, *labels[1:])
            for outcome in SLO_OUTCOMES
        }
        self.slo_ttft = {
            outcome: metrics.slo_ttft_requests.labels(route.model, outcome, *labels[1:])
            for outcome in SLO_OUTCOMES
        }
        self.slo_tpot = {
            outcome: metrics.slo_tpot_requests.labels(route.model, outcome, *labels[1:])
            for outcome in SLO_OUTCOMES
        }


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # No `_created` series beside every counter and histogram: they would double
        # the series scraped and say only when the process started.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
        self.registry = registry
        self._routes: dict[Route, _RouteSeries] = {}
        self._backend_labels: dict[str, str] = {}

        def histogram(
            name: str, doc: str, labels: Sequence[str], buckets: Iterable[float]
        ) -> LabelledHistogram:
            return LabelledHistogram(name, doc, labels, buckets, registry)

        # -- requests ---------------------------------------------------------------
        self.requests = Counter(
            "hetero_router_requests",
            "Generate requests by outcome (ok, invalid, unavailable, cancelled, ...) and "
            "mode (split, colocated; none: refused before it had a route)",
            ["model", "mode", "outcome"],
            registry=registry,
        )
        self.time_to_first_token = histogram(
            "hetero_router_time_to_first_token_seconds",
            "From request arrival to the first token sent to the client (every request "
            "that got one, whatever its outcome)",
            ROUTE_LABELS,
            TTFT_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "hetero_router_inter_token_latency_seconds",
            "Gap between two consecutive token frames sent to a client (a frame may carry "
            "several tokens)",
            ROUTE_LABELS,
            TOKEN_BUCKETS,
        )
        self.request_time_per_output_token = histogram(
            "hetero_router_request_time_per_output_token_seconds",
            "Per completed request: time from its first token to its last over the tokens "
            "after the first",
            ROUTE_LABELS,
            TOKEN_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "hetero_router_e2e_request_latency_seconds",
            "Completed requests: from arrival to the last token",
            ROUTE_LABELS,
            LATENCY_BUCKETS,
        )
        self.request_queue_time = histogram(
            "hetero_router_request_queue_time_seconds",
            "Completed requests: time waiting in the router's admission queue",
            ROUTE_LABELS,
            LATENCY_BUCKETS,
        )
        self.request_prefill_time = histogram(
            "hetero_router_request_prefill_time_seconds",
            "Completed requests: from admission to the prefill's end (split: the prefill "
            "backend answered; colocated: the first token)",
            ROUTE_LABELS,
            LATENCY_BUCKETS,
        )
        self.request_decode_time = histogram(
            "hetero_router_request_decode_time_seconds",
            "Completed requests: from the first token to the last",
            ROUTE_LABELS,
            LATENCY_BUCKETS,
        )
        self.kv_handoff_seconds = histogram(
            "hetero_router_kv_handoff_seconds",
            "Split requests: from the prefill backend's answer to the decode backend's "
            "first token (the KV's transfer and the first decode step)",
            KIND_LABELS,
            HANDOFF_BUCKETS,
        )
        self.kv_handoff_bytes = Counter(
            "hetero_router_kv_handoff_bytes",
            "KV bytes handed from prefill to decode backends, as the prefill backend "
            "reported them (engines that do not report bytes count 0)",
            list(KIND_LABELS),
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "hetero_router_prompt_tokens",
            "Prompt tokens of completed requests, as their backends counted them",
            list(ROUTE_LABELS),
            registry=registry,
        )
        self.generation_tokens = Counter(
            "hetero_router_generation_tokens",
            "Tokens streamed to clients by completed requests",
            list(ROUTE_LABELS),
            registry=registry,
        )
        slo_labels = ["model", "outcome", *ROUTE_LABELS[1:]]
        self.slo_requests = Counter(
            "hetero_router_slo_requests",
            "Completed requests with an SLO, by outcome (met: both time to first token "
            "and time per output token within target; missed): goodput is the rate of met",
            slo_labels,
            registry=registry,
        )
        self.slo_ttft_requests = Counter(
            "hetero_router_slo_ttft_requests",
            "Completed requests with a time-to-first-token target, by outcome (met, missed)",
            slo_labels,
            registry=registry,
        )
        self.slo_tpot_requests = Counter(
            "hetero_router_slo_tpot_requests",
            "Completed requests with a time-per-output-token target and two tokens or "
            "more, by outcome (met, missed)",
            slo_labels,
            registry=registry,
        )
        self.split_decisions = Counter(
            "hetero_router_split_decisions",
            "Requests scheduled, by decision (split, colocated) and its reason: requested "
            "(the request named the mode), policy (the decider always or never splits), "
            "only_mode (the pool has backends for one mode alone), prompt_length (the "
            "prompt-length rule: no performance model), cheaper (both modes predicted on "
            "time; the lower marginal cost), on_time (the only mode predicted on time), "
            "less_late (neither on time; the less late)",
            ["model", "slo_class", "decision", "reason"],
            registry=registry,
        )
        self.num_requests_running = Gauge(
            "hetero_router_num_requests_running",
            "Requests admitted and being served",
            ["model"],
            registry=registry,
        )
        self.num_requests_waiting = Gauge(
            "hetero_router_num_requests_waiting",
            "Requests waiting in the admission queue",
            ["model"],
            registry=registry,
        )

        # -- admission ----------------------------------------------------------------
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
            "(predicted to miss their SLO); by model and SLO class too (model empty: "
            "refused before its model was known)",
            ["model", "slo_class", "reason"],
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

        # -- backends -------------------------------------------------------------------
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
        self.backend_kv_cache_usage = Gauge(
            "hetero_router_backend_kv_cache_usage_perc",
            "KV cache in use on the backend, 0..1 (1 is full), as its load report says",
            ["backend", "kind"],
            registry=registry,
        )
        self.backend_running = Gauge(
            "hetero_router_backend_num_requests_running",
            "Sequences the backend reports running",
            ["backend"],
            registry=registry,
        )
        self.backend_waiting = Gauge(
            "hetero_router_backend_num_requests_waiting",
            "Requests the backend reports waiting",
            ["backend"],
            registry=registry,
        )
        self.backend_request_latency = histogram(
            "hetero_router_backend_request_latency_seconds",
            "One leg's duration on a backend, by phase (prefill, decode, generate); "
            f"backends past the first {BACKEND_LABEL_CAP} are labelled 'other'",
            ("backend", "phase"),
            LATENCY_BUCKETS,
        )
        self.backend_failures = Counter(
            "hetero_router_backend_failures",
            "Failed legs by backend and phase (prefill, decode, generate, relay)",
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
        for kind in RETRY_KINDS:
            self.retries.labels(kind)
        for reason in RETRY_REFUSALS:
            self.retries_refused.labels(reason)
        for door in DOORS:
            self.write_stalls.labels(door)
        # The children the request path writes to, each looked up once.
        self.requests_by = Children(self.requests)
        self.split_decisions_by = Children(self.split_decisions)
        self.running_by_model = Children(self.num_requests_running)
        self.waiting_by_model = Children(self.num_requests_waiting)
        self.outstanding_by_backend = Children(self.backend_outstanding)

    def initialise(
        self,
        backends: Iterable[tuple[str, str, str]],
        routes: Iterable[Route],
    ) -> None:
        """Creates at zero the series of every known label value: ``backends`` as
        (id, model, kind), ``routes`` every route a request may take."""
        models: set[str] = set()
        for backend_id, model, _kind in backends:
            models.add(model)
            self.add_backend(backend_id)
        for route in routes:  # counters only: a histogram's series appear with its first use
            models.add(route.model)
            for reason in SHED_REASONS:
                self.shed.labels(route.model, route.slo_class, reason)
            labels = (route.mode, route.slo_class, route.prefill_kind, route.decode_kind)
            self.prompt_tokens.labels(route.model, *labels)
            self.generation_tokens.labels(route.model, *labels)
            for outcome in SLO_OUTCOMES:
                for counter in (self.slo_requests, self.slo_ttft_requests, self.slo_tpot_requests):
                    counter.labels(route.model, outcome, *labels)
            if route.mode == "split":
                self.kv_handoff_bytes.labels(route.model, route.prefill_kind, route.decode_kind)
            for reason in DECISION_REASONS:
                self.split_decisions.labels(route.model, route.slo_class, route.mode, reason)
        for model in models:
            self.num_requests_running.labels(model)
            self.num_requests_waiting.labels(model)
            for outcome in OUTCOMES:
                self.requests.labels(model, "none", outcome)
                for mode in MODES:
                    self.requests.labels(model, mode, outcome)

    def add_backend(self, backend_id: str) -> None:
        """Creates at zero the counters of a backend new to the pool."""
        self.outlier_ejections.labels(backend_id)
        self.backend_ejected.labels(backend_id)  # (a new gauge series is 0)
        for phase in LEG_PHASES:
            self.backend_failures.labels(backend_id, phase)

    def remove_backend(self, backend_id: str, role: str, kind: str) -> None:
        """Drops every series of a backend that left the pool (``role`` and ``kind``
        as its series were labelled), and frees its histogram label."""
        self.outstanding_by_backend.remove(backend_id)
        one: tuple[Gauge | Counter, ...] = (
            self.backend_running,
            self.backend_waiting,
            self.backend_ejected,
            self.outlier_ejections,
        )
        for metric in one:
            _remove(metric, backend_id)
        _remove(self.backend_healthy, backend_id, role)
        _remove(self.backend_kv_cache_usage, backend_id, kind)
        for phase in LEG_PHASES:
            _remove(self.backend_failures, backend_id, phase)
        if self._backend_labels.pop(backend_id, None) == backend_id:
            for phase in LEG_PHASES:
                _remove(self.backend_request_latency, backend_id, phase)

    def route(self, route: Route) -> _RouteSeries:
        series = self._routes.get(route)
        if series is None:
            series = self._routes[route] = _RouteSeries(self, route)
        return series

    def backend_label(self, backend_id: str) -> str:
        """The backend's label on histograms: its id, or "other" past the cap."""
        label = self._backend_labels.get(backend_id)
        if label is None:
            label = backend_id if len(self._backend_labels) < BACKEND_LABEL_CAP else "other"
            self._backend_labels[backend_id] = label
        return label

    def record_decision(self, model: str, slo_class: str, plan: Plan) -> None:
        """A request's first plan: its mode and why (a plan without a decision was not
        the scheduler's: counted as requested)."""
        reason = Reason.REQUESTED if plan.decision is None else plan.decision.reason
        self.split_decisions_by(model, slo_class, plan.mode.value, reason.value).inc()

    def record_request(self, record: RequestRecord, met: tuple[bool | None, bool | None]) -> None:
        """One finished request: ``met`` says whether it met its (TTFT, TPOT) targets
        (None: held to none, or not completed)."""
        model = record.request.model
        self.requests_by(model, record.mode, record.outcome).inc()
        if record.mode == "none":
            return
        series = self.route(
            Route(model, record.mode, record.slo_class, record.prefill_kind, record.decode_kind)
        )
        self._streamed(series, record)
        if record.outcome == "ok":
            self._completed(series, record, met)

    def _streamed(self, series: _RouteSeries, record: RequestRecord) -> None:
        """What any request that had a route did: its tokens' times, its KV handoff, its
        legs (a request may end, or fail, before any token)."""
        first = record.first_token_at
        if first is not None:
            series.ttft.observe(first - record.arrived)
            itl = series.itl
            for gap in record.frame_gaps:
                itl.observe(gap)
        if record.handoffs:
            series.handoff_bytes.inc(record.handoff_bytes)
            handoff = record.handoff_s
            if handoff is not None:
                series.handoff_seconds.observe(handoff)
        for leg in record.legs:
            self.backend_request_latency.labels(self.backend_label(leg.backend), leg.phase).observe(
                leg.ended - leg.started
            )

    @staticmethod
    def _completed(
        series: _RouteSeries, record: RequestRecord, met: tuple[bool | None, bool | None]
    ) -> None:
        """What only a completed request is counted for: its phases, tokens and SLO."""
        first = record.first_token_at
        if record.last_token_at >= record.arrived:  # its last frame's time
            series.e2e.observe(record.last_token_at - record.arrived)
        if first is not None:
            series.decode.observe(record.last_token_at - first)
        if record.admitted is not None:
            series.queue.observe(record.admitted - record.arrived)
            prefill = record.prefill_s
            if prefill is not None:
                series.prefill.observe(prefill)
        tpot = record.tpot_s
        if tpot is not None:
            series.tpot.observe(tpot)
        series.generation_tokens.inc(record.completion_tokens)
        series.prompt_tokens.inc(record.prompt_tokens or record.request.prompt_tokens)
        ttft_met, tpot_met = met
        if ttft_met is not None:
            series.slo_ttft["met" if ttft_met else "missed"].inc()
        if tpot_met is not None:
            series.slo_tpot["met" if tpot_met else "missed"].inc()
        if record.slo_met is not None:
            series.slo["met" if record.slo_met else "missed"].inc()


def _remove(metric: Gauge | Counter | LabelledHistogram, *labels: str) -> None:
    # Older prometheus_client versions raise KeyError for a series never created.
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
