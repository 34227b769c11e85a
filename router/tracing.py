"""OpenTelemetry traces of the requests the router serves (the ``tracing`` extra).

The daemon loads this module only when ``otlp_traces_endpoint`` is set: without it,
nothing of OpenTelemetry is imported and a request costs nothing more than passing
its client's ``traceparent`` on.

One trace per request. Its root span, ``generate <model>`` (SERVER), starts when the
request arrives, as a child of the client's ``traceparent`` when it sent one (else of
nothing: a new trace), and the backends are sent a ``traceparent`` naming it, so an
engine's own spans (vLLM's ``--otlp-traces-endpoint``) hang below the router's. When
the request is over, the phases of its ``RequestRecord`` become child spans, in
order: ``queue`` (waiting for admission), ``prefill`` (to the prefill leg's answer,
or to the first token when colocated), ``kv_handoff`` (split: from the prefill's
answer to the decode leg's first token) and ``decode`` (from the first token the
client got to the last). Times are the dispatcher's monotonic clock, placed on the
wall clock from the instant the request arrived. The root span ends with the last
token, carries the OpenTelemetry GenAI attributes (``gen_ai.*``) and the route
(``hetero_router.*``), and has status ERROR, with the error the client got, when the
request failed.

Spans go to an OTLP collector over gRPC (the router speaks gRPC already: the
exporter adds no HTTP client), batched off the event loop (BatchSpanProcessor).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from backends._gen.hetero.router.v1 import router_pb2
from router import __version__
from router.record import RequestRecord

if TYPE_CHECKING:
    from router.settings import Settings

SERVICE = "hetero-router"
# Outcomes that are no failure of the request: served, or given up by its client.
_NOT_FAILED = frozenset({"ok", "cancelled"})
_PROPAGATOR = TraceContextTextMapPropagator()
# As OpenAI names them (gen_ai.response.finish_reasons).
_FINISH_REASONS: dict[int, str] = {
    router_pb2.FINISH_REASON_STOP: "stop",
    router_pb2.FINISH_REASON_LENGTH: "length",
    router_pb2.FINISH_REASON_ABORT: "abort",
}

Attributes = dict[str, AttributeValue]


class Tracing:
    """The router's tracer provider and the request observer that records into it."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self.observer = RequestTracer(provider.get_tracer(__name__, __version__))

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing:
        """Exports over OTLP/gRPC to ``otlp_traces_endpoint``, batched."""
        endpoint = settings.otlp_traces_endpoint
        if endpoint is None:
            raise ValueError("otlp_traces_endpoint is not set: no traces to export")
        exporter = OTLPSpanExporter(
            endpoint=endpoint,
            # None: TLS, unless the endpoint says http:// (or OTEL_EXPORTER_OTLP_INSECURE).
            insecure=True if settings.otlp_traces_insecure else None,
        )
        provider = tracer_provider(settings.trace_sample_ratio)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def shutdown(self) -> None:
        """Exports the spans still batched and stops (blocking: call it off the loop)."""
        self._provider.shutdown()


def tracer_provider(sample_ratio: float) -> TracerProvider:
    """A provider naming the service, recording ``sample_ratio`` of new traces and
    following the client's sampled flag on the others."""
    resource = Resource.create({SERVICE_NAME: SERVICE, SERVICE_VERSION: __version__})
    return TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))


class RequestTracer:
    """A ``RequestObserver``: one root span per request, its phases as children."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._spans: dict[RequestRecord, Span] = {}

    def started(self, record: RequestRecord) -> str:
        request = record.request
        parent = Context()  # not the ambient one: a request without a traceparent starts a trace
        if request.traceparent:
            carrier = {"traceparent": request.traceparent, "tracestate": request.tracestate}
            parent = _PROPAGATOR.extract(carrier, parent)
        span = self._tracer.start_span(
            f"generate {request.model}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=_request_attributes(record),
            start_time=record.arrived_unix_ns,
        )
        self._spans[record] = span
        return traceparent(span.get_span_context())

    def finished(self, record: RequestRecord) -> None:
        span = self._spans.pop(record, None)
        if span is None:
            return
        if span.is_recording():
            parent = trace.set_span_in_context(span)
            for name, start, end, attributes in _phases(record):
                child = self._tracer.start_span(
                    name, context=parent, attributes=attributes, start_time=_wall_ns(record, start)
                )
                child.end(_wall_ns(record, end))
            span.set_attributes(_outcome_attributes(record))
            if record.first_token_at is not None:
                span.add_event("first_token", timestamp=_wall_ns(record, record.first_token_at))
            if record.outcome not in _NOT_FAILED:
                span.set_status(Status(StatusCode.ERROR, record.error or record.outcome))
        span.end(_end_ns(record))


def traceparent(context: SpanContext) -> str:
    """The W3C ``traceparent`` naming ``context``'s span."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def _wall_ns(record: RequestRecord, at: float) -> int:
    """An instant of the dispatcher's monotonic clock on the wall clock."""
    return record.arrived_unix_ns + round((at - record.arrived) * 1e9)


def _end_ns(record: RequestRecord) -> int:
    """The root span's end: the last token of a served request; now for any other,
    which may have failed or been given up after its last token."""
    if record.outcome == "ok" and record.first_token_at is not None:
        return _wall_ns(record, record.last_token_at)
    latest = max((end for _, _, end, _ in _phases(record)), default=record.arrived)
    return max(time.time_ns(), _wall_ns(record, latest))


def _phases(record: RequestRecord) -> Iterator[tuple[str, float, float, Attributes]]:
    """Each phase the request went through: name, start, end, attributes. A phase whose
    times are out of order (a retry moved its start past its end) is left out."""
    phases: list[tuple[str, float | None, float | None, Attributes]] = [
        ("queue", record.arrived, record.admitted, {}),
        (
            "prefill",
            record.admitted,
            record.prefill_done_at,
            _backend_attributes(record.prefill_backend, record.prefill_kind),
        ),
    ]
    if record.mode == "split":
        handoff: Attributes = {"hetero_router.handoff_bytes": record.handoff_bytes}
        phases.append(("kv_handoff", record.prefill_done_at, record.decode_first_at, handoff))
    phases.append(
        (
            "decode",
            record.first_token_at,
            record.last_token_at if record.first_token_at is not None else None,
            _backend_attributes(record.decode_backend, record.decode_kind),
        )
    )
    for name, start, end, attributes in phases:
        if start is not None and end is not None and start <= end:
            yield name, start, end, attributes


def _backend_attributes(backend: str, kind: str) -> Attributes:
    attributes: Attributes = {}
    if backend:
        attributes["hetero_router.backend"] = backend
    if kind:
        attributes["hetero_router.device_kind"] = kind
    return attributes


def _request_attributes(record: RequestRecord) -> Attributes:
    """What is known when the request arrives (samplers see it too)."""
    request = record.request
    sampling = request.sampling
    return {
        "gen_ai.operation.name": "chat" if request.messages else "text_completion",
        "gen_ai.request.model": request.model,
        "gen_ai.request.max_tokens": sampling.max_tokens,
        "gen_ai.request.temperature": sampling.temperature,
        "gen_ai.request.top_p": sampling.top_p,
        "gen_ai.request.seed": sampling.seed,
        "hetero_router.request_id": request.shown_id,
        "hetero_router.slo_class": record.slo_class,
    }


def _outcome_attributes(record: RequestRecord) -> Attributes:
    """What the request did: its route, tokens, latencies and outcome."""
    attributes: Attributes = {
        "gen_ai.usage.input_tokens": record.prompt_tokens or record.request.prompt_tokens,
        "gen_ai.usage.output_tokens": record.completion_tokens,
        "hetero_router.mode": record.mode,
        "hetero_router.attempts": record.attempts,
        "hetero_router.outcome": record.outcome,
    }
    if record.mode != "none":
        attributes.update(
            {
                "hetero_router.prefill_backend": record.prefill_backend,
                "hetero_router.decode_backend": record.decode_backend,
                "hetero_router.prefill_kind": record.prefill_kind,
                "hetero_router.decode_kind": record.decode_kind,
            }
        )
    finish_reason = _FINISH_REASONS.get(record.finish_reason)
    if finish_reason is not None:
        attributes["gen_ai.response.finish_reasons"] = (finish_reason,)
    ttft, tpot = record.ttft_s, record.tpot_s
    if ttft is not None:
        attributes["gen_ai.server.time_to_first_token"] = ttft
    if tpot is not None:
        attributes["gen_ai.server.time_per_output_token"] = tpot
    if record.handoffs:
        attributes["hetero_router.handoff_bytes"] = record.handoff_bytes
    if record.slo_met is not None:
        attributes["hetero_router.slo_met"] = record.slo_met
    if record.outcome not in _NOT_FAILED:
        attributes["error.type"] = record.outcome
    return attributes
