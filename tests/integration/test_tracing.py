"""Request traces (the tracing extra), read from an in-memory exporter: one root span per
request, its phases as children, the client's trace joined and the backends sent the
router's span."""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator, Sequence

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the tracing extra is not installed")

import aiohttp
import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from backends._gen.hetero.router.v1 import router_pb2
from backends.base import GenerationRequest
from backends.errors import BackendError
from router.daemon import Daemon, build_tracing
from router.errors import ConfigError
from router.settings import Settings
from router.tracing import Tracing, traceparent, tracer_provider
from tests.conftest import start_cluster, stop_cluster
from tests.integration.test_trace_propagation import TRACEPARENT, TRACESTATE, grpc_generate
from tests.recording import MODEL, Recorder, recording_router, stub_router
from tests.stubs import StubBackend

CLIENT_TRACE_ID = int(TRACEPARENT.split("-")[1], 16)
CLIENT_SPAN_ID = int(TRACEPARENT.split("-")[2], 16)
PHASES = ["queue", "prefill", "kv_handoff", "decode"]


def in_memory(sample_ratio: float = 1.0) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = tracer_provider(sample_ratio)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


def root_of(spans: Sequence[ReadableSpan]) -> ReadableSpan:
    (root,) = [span for span in spans if span.name.startswith("generate ")]
    return root


def sampled(traceparent: str) -> bool:
    """The sampled bit of a traceparent's flags (others, such as random, may be set)."""
    return bool(int(traceparent.rpartition("-")[2], 16) & 1)


def times(span: ReadableSpan) -> tuple[int, int]:
    assert span.start_time is not None
    assert span.end_time is not None
    return span.start_time, span.end_time


async def test_a_split_request_is_one_root_span_with_its_four_phases_in_order() -> None:
    tracing, exporter = in_memory()
    cluster = await start_cluster(tracing=tracing)
    try:
        responses = [
            response
            async for response in cluster.client.generate(
                "trace me", max_tokens=8, temperature=0, disaggregation="split"
            )
        ]
    finally:
        await stop_cluster(cluster)

    spans = exporter.get_finished_spans()
    root = root_of(spans)
    assert root.name == "generate llama-3.1-8b"
    assert root.kind is SpanKind.SERVER
    assert root.parent is None  # no client trace context: a new trace
    assert root.status.status_code is StatusCode.UNSET
    children = [span for span in spans if span is not root]
    assert sorted(span.name for span in children) == sorted(PHASES)
    by_name = {span.name: span for span in children}
    for span in children:
        assert span.parent is not None
        assert span.parent.span_id == root.context.span_id
        assert span.context.trace_id == root.context.trace_id
        start, end = times(span)
        assert times(root)[0] <= start <= end <= times(root)[1]
    starts = [times(by_name[name])[0] for name in PHASES]
    assert starts == sorted(starts)
    assert times(by_name["queue"])[0] == times(root)[0]  # the request's arrival
    assert times(by_name["queue"])[1] == times(by_name["prefill"])[0]  # admission
    assert times(by_name["prefill"])[1] == times(by_name["kv_handoff"])[0]
    assert times(by_name["decode"])[1] == times(root)[1]  # the last token

    tokens = sum(len(response.token_ids) for response in responses)
    route = responses[0].route
    attributes = dict(root.attributes or {})
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.request.model"] == "llama-3.1-8b"
    assert attributes["gen_ai.request.max_tokens"] == 8
    assert attributes["gen_ai.usage.input_tokens"] == responses[-1].usage.prompt_tokens > 0
    assert attributes["gen_ai.usage.output_tokens"] == tokens > 0
    finish = router_pb2.FinishReason.Name(responses[-1].finish_reason)
    assert attributes["gen_ai.response.finish_reasons"] == (
        finish.removeprefix("FINISH_REASON_").lower(),
    )
    assert attributes["hetero_router.mode"] == "split"
    assert attributes["hetero_router.prefill_backend"] == route.prefill_backend
    assert attributes["hetero_router.decode_backend"] == route.decode_backend
    assert attributes["hetero_router.prefill_kind"] == "h100"
    assert attributes["hetero_router.decode_kind"] == "groq-lpu"
    assert attributes["hetero_router.slo_class"] == "default"
    assert attributes["hetero_router.attempts"] == 1
    assert attributes["hetero_router.outcome"] == "ok"
    handoff_bytes = attributes["hetero_router.handoff_bytes"]
    assert isinstance(handoff_bytes, int)
    assert handoff_bytes > 0
    assert (by_name["kv_handoff"].attributes or {})["hetero_router.handoff_bytes"] == handoff_bytes
    assert (by_name["prefill"].attributes or {})["hetero_router.backend"] == route.prefill_backend
    assert (by_name["decode"].attributes or {})["hetero_router.device_kind"] == "groq-lpu"
    ttft = attributes["gen_ai.server.time_to_first_token"]
    assert isinstance(ttft, float)
    (event,) = root.events
    assert event.name == "first_token"
    assert event.timestamp == times(root)[0] + round(ttft * 1e9)


async def test_a_colocated_request_has_no_kv_handoff() -> None:
    tracing, exporter = in_memory()
    cluster = await start_cluster(tracing=tracing)
    try:
        stream = cluster.client.generate("together", max_tokens=4, disaggregation="colocated")
        async for _ in stream:
            pass
    finally:
        await stop_cluster(cluster)

    spans = exporter.get_finished_spans()
    assert (root_of(spans).attributes or {})["hetero_router.mode"] == "colocated"
    assert sorted(span.name for span in spans if span is not root_of(spans)) == [
        "decode",
        "prefill",
        "queue",
    ]


async def test_the_root_joins_the_clients_trace_and_the_backend_is_sent_the_routers_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracing, exporter = in_memory()
    async with recording_router(monkeypatch, tracing) as daemon:
        await grpc_generate(daemon, (("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)))

    root = root_of(exporter.get_finished_spans())
    assert root.context.trace_id == CLIENT_TRACE_ID
    assert root.parent is not None
    assert root.parent.is_remote
    assert root.parent.span_id == CLIENT_SPAN_ID
    assert root.context.trace_state.to_header() == TRACESTATE
    (served,) = Recorder.served
    assert served.traceparent == traceparent(root.context)
    assert served.traceparent.startswith(f"00-{CLIENT_TRACE_ID:032x}-")
    assert served.traceparent != TRACEPARENT
    assert served.tracestate == TRACESTATE


async def test_without_a_traceparent_the_backend_is_sent_the_new_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracing, exporter = in_memory()
    async with recording_router(monkeypatch, tracing) as daemon:
        await grpc_generate(daemon, (("traceparent", "00-junk"),))

    root = root_of(exporter.get_finished_spans())
    assert root.parent is None  # the invalid one was ignored: a new trace
    assert root.context.trace_id != CLIENT_TRACE_ID
    (served,) = Recorder.served
    assert served.traceparent == traceparent(root.context)
    assert sampled(served.traceparent)


async def test_an_unsampled_client_trace_records_nothing_but_still_propagates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracing, exporter = in_memory()
    unsampled = TRACEPARENT.removesuffix("01") + "00"
    async with recording_router(monkeypatch, tracing) as daemon:
        await grpc_generate(daemon, (("traceparent", unsampled),))

    assert exporter.get_finished_spans() == ()
    (served,) = Recorder.served
    assert served.traceparent.startswith(f"00-{CLIENT_TRACE_ID:032x}-")
    assert not sampled(served.traceparent)


async def test_sample_ratio_zero_records_no_new_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    tracing, exporter = in_memory(sample_ratio=0.0)
    async with recording_router(monkeypatch, tracing) as daemon:
        await grpc_generate(daemon, ())

    assert exporter.get_finished_spans() == ()
    assert not sampled(Recorder.served[0].traceparent)


class Failing(StubBackend):
    async def generate(
        self, request: GenerationRequest, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        raise BackendError(self.id, "the engine fell over", retryable=False)
        yield b""  # an async generator  # pragma: no cover


async def test_a_failed_request_has_an_error_status_with_its_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracing, exporter = in_memory()
    async with stub_router(monkeypatch, Failing, tracing) as daemon:
        with pytest.raises(Exception, match="fell over"):
            await grpc_generate(daemon, ())

    root = root_of(exporter.get_finished_spans())
    assert root.status.status_code is StatusCode.ERROR
    assert "the engine fell over" in (root.status.description or "")
    attributes = dict(root.attributes or {})
    assert attributes["error.type"] == attributes["hetero_router.outcome"] != "ok"
    assert attributes["gen_ai.usage.output_tokens"] == 0
    start, end = times(root)
    assert start <= end


def test_an_endpoint_without_the_extra_is_a_one_line_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "router.tracing", None)  # as if absent
    settings = Settings(otlp_traces_endpoint="http://127.0.0.1:19401")
    with pytest.raises(ConfigError, match=r"pip install 'hetero-router\[tracing\]'") as error:
        build_tracing(settings)
    assert "\n" not in str(error.value)


def test_an_endpoint_builds_an_otlp_exporter_that_shuts_down() -> None:
    tracing = build_tracing(Settings(otlp_traces_endpoint="http://127.0.0.1:19401"))
    assert isinstance(tracing, Tracing)
    tracing.shutdown()  # nothing batched: returns at once
    assert build_tracing(Settings()) is None


def test_insecure_contradicts_an_https_endpoint() -> None:
    with pytest.raises(ValueError, match="contradicts"):
        Settings(otlp_traces_endpoint="https://collector:4317", otlp_traces_insecure=True)


async def test_the_daemon_flushes_its_spans_when_it_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    tracing, _ = in_memory()
    shut: list[bool] = []
    monkeypatch.setattr(tracing, "shutdown", lambda: shut.append(True))
    async with recording_router(monkeypatch, tracing) as daemon:
        assert isinstance(daemon, Daemon)
        assert shut == []
    assert shut == [True]


class Collector:
    """An OTLP/gRPC trace receiver on 127.0.0.1: the spans of every export it was sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []  # (service.name, span name)
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            self._export,
            request_deserializer=ExportTraceServiceRequest.FromString,
            response_serializer=ExportTraceServiceResponse.SerializeToString,
        )
        service = "opentelemetry.proto.collector.trace.v1.TraceService"
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"Export": handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def _export(
        self, request: ExportTraceServiceRequest, context: object
    ) -> ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((resource["service.name"], s.name) for s in scope_spans.spans)
        return ExportTraceServiceResponse()


async def test_spans_reach_an_otlp_collector_by_the_time_the_router_has_stopped() -> None:
    collector = Collector()
    await collector.server.start()
    try:
        endpoint = f"http://127.0.0.1:{collector.port}"
        cluster = await start_cluster(otlp_traces_endpoint=endpoint)
        try:
            stream = cluster.client.generate("export me", max_tokens=4, disaggregation="split")
            async for _ in stream:
                pass
        finally:
            await stop_cluster(cluster)  # flushes the batch before it returns
    finally:
        await collector.server.stop(0)

    assert sorted(collector.spans) == sorted(
        ("hetero-router", name) for name in ["generate llama-3.1-8b", *PHASES]
    )


async def test_a_chat_completion_over_http_is_a_chat_span_in_the_clients_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracing, exporter = in_memory()
    async with recording_router(monkeypatch, tracing) as daemon:
        url = f"http://127.0.0.1:{daemon.http_port}/v1/chat/completions"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=body, headers={"traceparent": TRACEPARENT}) as reply,
        ):
            assert reply.status == 200
            await reply.read()

    root = root_of(exporter.get_finished_spans())
    attributes = dict(root.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.max_tokens"] == 5
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert root.context.trace_id == CLIENT_TRACE_ID
    assert Recorder.served[0].traceparent == traceparent(root.context)
