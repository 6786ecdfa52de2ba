"""Traces and readiness on the embedded Kafka-protocol broker: real headers, real assignments, a real ping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from frugalstream.runtime import tracing
from frugalstream.schemas import topics as t
from tests.integration.adversary import read_quietly
from tests.integration.conftest import PipelineFactory
from tests.scenarios import ask

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)
    provider.shutdown()


async def test_one_requests_spans_from_every_stage_share_one_trace(pipeline: PipelineFactory,
                                                                   spans: InMemorySpanExporter) -> None:
    async with pipeline(names=["classifier", "dedupe", "gateway", "accountant"]) as running:
        settings = running.settings
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            request = ask(1, "What are your business hours?")
            await producer.send_and_wait(settings.topic(t.REQUESTS), request.model_dump_json().encode(), key=b"q1",
                                         headers=[("traceparent", f"00-{TRACE}-b7ad6b7169203331-01".encode())])
        finally:
            await producer.stop()
        await read_quietly(settings, settings.topic(t.RESPONSES), want={"q1"}, key_of=lambda r: r.request_id,
                           timeout_s=60, quiet_s=0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the accountant prices the usage a moment after the answer
            mine = [s for s in spans.get_finished_spans() if s.context and f"{s.context.trace_id:032x}" == TRACE]
            if {"classifier", "dedupe", "gateway", "accountant"} <= {(s.attributes or {}).get("frugalstream.service")
                                                                  for s in mine}:
                break
            await asyncio.sleep(0.2)
        stages = {(s.attributes or {}).get("frugalstream.service") for s in mine}
        assert {"classifier", "dedupe", "gateway", "accountant"} <= stages, stages
        assert any(s.name.startswith("chat ") and (s.attributes or {}).get("gen_ai.usage.output_tokens")
                   for s in mine)


async def test_ready_once_consumers_joined_and_the_broker_answers(pipeline: PipelineFactory) -> None:
    async with pipeline(names=["classifier", "gateway"]) as running:
        health = running.health
        beat = asyncio.create_task(health.run(beat_s=0.1))
        try:
            deadline = time.monotonic() + 60
            while not health.readiness()[0] and time.monotonic() < deadline:  # noqa: ASYNC110 - polled state
                await asyncio.sleep(0.1)
            assert health.readiness() == (True, "ready"), health.readiness()
            assert health.liveness()[0]
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
    assert health.reasons() == ["consumers not started"]
