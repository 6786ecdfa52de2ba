"""Time a request spends inside the services, from their own trace spans: the embedded broker's waits aside.

The embedded broker answers a waiting fetch only when its wait runs out, so on it every hop adds up to the
fetch wait (50 ms) that a Kafka broker does not; end-to-end figures there measure the broker as much as the
product. Each stage's span of a record runs from the start of its batch's handling to the broker's
acknowledgement of the batch's outputs (`runtime.tracing`), so the sum of a request's spans on the answer path,
less its model call, is the time frugalstream spent on it: processing, waiting on its batch-mates, publishing.
Queueing before a batch starts (a busy stage) is not in it; the consumer lag and the end-to-end figures show it.
The gateway releases each answer once its call is recorded (`BatchContext.release`), before its batch's span
ends: there a request's inside time is an upper bound, and its outside time (the rest) can come out negative.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from frugalstream.runtime import tracing

#: The answer path of a request that misses the cache: one span per stage on these topics.
ANSWER_PATH = ("llm.requests", "llm.requests.routed", "llm.requests.dispatch")


class SpanRecord(NamedTuple):
    """What the bench reads of a finished span, in nanoseconds since the epoch."""

    name: str
    span_id: int
    parent_id: int | None
    start: int
    end: int
    request_id: str | None
    topic: str


class SpanRecorder(SpanExporter):
    """Keeps a small record of each span, not the span: a 30 s step finishes about 8,000 of them, each a dozen
    objects with locks and attribute maps, and in the one process the bench shares with the services, the
    garbage collector walking them was a pause the services' figures would have counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[SpanRecord] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        kept = []
        for span in spans:
            if span.start_time is None or span.end_time is None:
                continue
            attrs = span.attributes or {}
            rid = attrs.get("frugalstream.request_id")
            kept.append(SpanRecord(span.name, span.context.span_id if span.context else 0,
                                   span.parent.span_id if span.parent else None, span.start_time, span.end_time,
                                   None if rid is None else str(rid), str(attrs.get("messaging.destination.name", ""))))
        with self._lock:
            self._records += kept
        return SpanExportResult.SUCCESS

    def records(self) -> list[SpanRecord]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records = []


@contextlib.contextmanager
def span_recorder() -> Iterator[SpanRecorder]:
    recorder = SpanRecorder()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(recorder))
    tracing.install(provider)
    try:
        yield recorder
    finally:
        tracing.install(None)
        provider.shutdown()


#: The answer path's steps, in order: the wait before each stage (from the previous one's end, or from the
#: request's `created_at`) and the stage itself (the gateway's less its model call).
STEPS = ("to classifier", "classifier", "to dedupe", "dedupe", "to gateway", "gateway less call")


def answer_path(recorder: SpanRecorder, topic_of: dict[str, str]
                ) -> tuple[dict[str, dict[str, tuple[int, int, int]]], dict[str, float]]:
    """Per request id and answer-path topic (logical name): its spans' first start, last end and summed length,
    in nanoseconds since the epoch (a batch run again has two spans); and per request id, the milliseconds of
    its model calls.

    `topic_of` maps a physical topic name (with the deployment's prefix) to its logical name."""
    stages: dict[str, dict[str, tuple[int, int, int]]] = defaultdict(dict)
    calls: dict[str, float] = defaultdict(float)
    spans = recorder.records()
    by_span: dict[int, str] = {}
    for span in spans:
        if span.request_id is None:
            continue
        by_span[span.span_id] = span.request_id
        topic = topic_of.get(span.topic, "")
        if topic in ANSWER_PATH:
            start, end, total = stages[span.request_id].get(topic, (span.start, span.end, 0))
            stages[span.request_id][topic] = (min(start, span.start), max(end, span.end),
                                              total + span.end - span.start)
    for span in spans:
        if span.name.startswith("chat ") and span.parent_id is not None:
            rid = by_span.get(span.parent_id)
            if rid is not None:
                calls[rid] += (span.end - span.start) / 1e6
    return stages, calls


def inside_ms(recorder: SpanRecorder, topic_of: dict[str, str]) -> dict[str, float]:
    """Per request id: milliseconds inside the stages of the answer path, less the model calls made there."""
    stages, calls = answer_path(recorder, topic_of)
    return {rid: max(0.0, sum(total for _, _, total in spans.values()) / 1e6 - calls.get(rid, 0.0))
            for rid, spans in stages.items()}


def steps_ms(recorder: SpanRecorder, topic_of: dict[str, str], created_at: dict[str, float]
             ) -> dict[str, list[float]]:
    """Per step of `STEPS`, the milliseconds of each request in `created_at` (seconds since the epoch) that
    passed every stage of the answer path."""
    stages, calls = answer_path(recorder, topic_of)
    steps: dict[str, list[float]] = {name: [] for name in STEPS}
    for rid, created in created_at.items():
        spans = stages.get(rid, {})
        if len(spans) != len(ANSWER_PATH):
            continue
        previous_end = created * 1e9
        for (wait, stage), topic in zip(zip(STEPS[::2], STEPS[1::2], strict=True), ANSWER_PATH, strict=True):
            start, end, _ = spans[topic]
            steps[wait].append((start - previous_end) / 1e6)
            steps[stage].append((end - start) / 1e6 - (calls.get(rid, 0.0) if topic == ANSWER_PATH[-1] else 0.0))
            previous_end = end
    return steps
