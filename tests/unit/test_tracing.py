"""Traces across the stages: trace context in Kafka headers, GenAI attributes on model calls, off means off."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from faststream.kafka.annotations import KafkaMessage
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from frugalstream.runner import RunningServices
from frugalstream.runtime import tracing
from frugalstream.runtime.messaging import dead_letter
from frugalstream.runtime.records import Decoded, Out, Record
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import topics as t
from tests.scenarios import ask
from tests.unit.test_pipeline_inmemory import InMemoryCluster

#: A producer's own trace: the pipeline must continue it, not start another.
PRODUCER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_PARENT = f"00-{PRODUCER_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)
    provider.shutdown()


def _record(topic: str, offset: int, headers: tuple[tuple[str, bytes], ...] = ()) -> Record:
    return Record(topic, 0, offset, b"k", b"{}", headers)


def _trace_id(headers: dict[str, str]) -> str:
    return headers["traceparent"].split("-")[1]


def test_each_output_carries_the_trace_of_the_record_it_came_from(spans: InMemorySpanExporter) -> None:
    a, b = ask(1, "first"), ask(2, "second")
    with tracing.batch_trace("classifier", "frugalstream.classifier") as trace:
        trace.add([Decoded(_record(t.REQUESTS, 0, (("traceparent", PRODUCER_PARENT.encode()),)), a),
                   Decoded(_record(t.REQUESTS, 1), b)], [])
        stamped = trace.stamp([Out(t.RESPONSES, b, headers={"x": "1"}), Out(t.RESPONSES, a), Out(t.USAGE, None)])
    finished = {s.attributes["messaging.kafka.offset"]: s for s in spans.get_finished_spans()}
    assert _trace_id(stamped[1].headers) == PRODUCER_TRACE  # continues the producer's trace
    assert finished[0].parent is not None and finished[0].parent.span_id == 0x00F067AA0BA902B7
    second = finished[1].get_span_context()
    assert _trace_id(stamped[0].headers) == f"{second.trace_id:032x}" != PRODUCER_TRACE  # a new trace
    assert stamped[0].headers["traceparent"].split("-")[2] == f"{second.span_id:016x}"  # parent: b's span
    assert stamped[0].headers["x"] == "1"  # the output's own headers stay
    assert "traceparent" not in stamped[2].headers  # no record of its identity: no guessed parent
    assert finished[1].kind is SpanKind.CONSUMER and finished[1].attributes["frugalstream.request_id"] == "q2"


def test_a_dead_letter_continues_the_trace_of_the_record_it_describes(spans: InMemorySpanExporter) -> None:
    rec = _record(t.REQUESTS, 7, (("traceparent", PRODUCER_PARENT.encode()),))
    with tracing.batch_trace("classifier", None) as trace:
        trace.add([], [(rec, ValueError("bad json"))])
        stamped = trace.stamp([dead_letter(rec, ValueError("bad json"), "classifier")])
    (span,) = spans.get_finished_spans()
    assert _trace_id(stamped[0].headers) == PRODUCER_TRACE
    assert span.status.is_ok is False and span.attributes is not None and span.attributes["error.type"] == "ValueError"


def test_tracing_off_touches_nothing() -> None:
    assert tracing.tracer() is None
    trace = tracing.batch_trace("classifier", None)
    assert trace is tracing.UNTRACED
    out = Out(t.RESPONSES, ask(1, "x"))
    assert trace.stamp([out]) == [out]
    assert tracing.request_context("acme", "q1") is None


def test_no_endpoint_builds_no_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "FRUGAL_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert tracing.setup_tracing(Settings(), "frugalstream") is False
    assert tracing.tracer() is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert tracing.otlp_endpoint(Settings()) == "http://collector:4318"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.otlp_endpoint(Settings(otlp_endpoint="http://x:4318")) is None


def test_an_endpoint_installs_an_otlp_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    try:
        assert tracing.setup_tracing(Settings(otlp_endpoint="http://127.0.0.1:9/"), "frugalstream-test")
        assert tracing.tracer() is not None
    finally:
        tracing.shutdown_tracing()  # the exporter's thread stops; nothing was sent (no span was made)
    assert tracing.tracer() is None


def _by_trace(finished: tuple[ReadableSpan, ...], trace_id: int) -> list[ReadableSpan]:
    return [s for s in finished if s.context is not None and s.context.trace_id == trace_id]


async def test_one_request_is_one_trace_across_the_stages(pipeline: RunningServices,
                                                          spans: InMemorySpanExporter) -> None:
    cluster = InMemoryCluster(pipeline)
    cost_headers: list[dict[str, Any]] = []

    @pipeline.broker.subscriber(pipeline.settings.topic(t.COST_EVENTS), group_id="trace-probe")
    async def costs(msg: KafkaMessage) -> None:
        cost_headers.append(dict(msg.headers))

    await pipeline.broker.start()
    request = ask(1, "What are your business hours?")
    await cluster.produce(t.REQUESTS, request.model_dump_json().encode(), key=b"q1",
                          headers=[("traceparent", PRODUCER_PARENT.encode())])
    await cluster.answers({"q1"})
    await cluster.records([t.COST_EVENTS], 1)

    mine = _by_trace(spans.get_finished_spans(), int(PRODUCER_TRACE, 16))
    stages = {(s.attributes or {}).get("frugalstream.service") for s in mine}
    topics = {(s.attributes or {}).get("messaging.destination.name") for s in mine}
    assert {"classifier", "dedupe", "gateway", "accountant"} <= stages
    assert {t.REQUESTS, t.ROUTED, t.DISPATCH, t.RESPONSES, t.USAGE} <= topics
    (chat,) = [s for s in mine if s.name.startswith("chat ")]
    attrs = chat.attributes or {}
    assert chat.kind is SpanKind.CLIENT
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.provider.name"] == "simulated"
    assert attrs["gen_ai.request.model"] and attrs["gen_ai.response.model"]
    assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("stop",)
    dispatch = next(s for s in mine if (s.attributes or {}).get("messaging.destination.name") == t.DISPATCH)
    assert chat.parent is not None and chat.parent.span_id == dispatch.context.span_id
    assert cost_headers and all(_trace_id(h) == PRODUCER_TRACE for h in cost_headers)  # the cost event too
