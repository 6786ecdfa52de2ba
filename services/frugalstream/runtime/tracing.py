"""OpenTelemetry traces across the stages: W3C trace context in Kafka headers, one span per consumed record.

Off unless configured: `setup_tracing` installs an SDK provider with an OTLP exporter only when an endpoint
is set (`FRUGAL_OTLP_ENDPOINT`, or the standard `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`); tests `install` one
with an in-memory exporter. With none installed `batch_trace` returns a no-op, so an untraced process starts
no exporter thread, imports no SDK and touches no header.

Why outputs are matched to records by identity: a process step handles a whole batch and returns outputs
without saying which record each came from, but every contract names its (tenant, request id) (or job id),
the identity the whole pipeline keys on. So an output continues the trace of the record of its batch with the
same identity, and a dead letter the record it describes; an output with no such record (an answer released
for a coalesced twin, a budget state) carries no trace context rather than a wrong one.
"""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from pydantic import BaseModel

from frugalstream.runtime.records import Decoded, Failure, Out, Record
from frugalstream.schemas import (
    CacheEntry,
    CompletedCall,
    CostEvent,
    DeadLetter,
    LLMRequest,
    LLMResponse,
    RoutedRequest,
    SummarizeJob,
    SummarizeProgress,
    SummaryResult,
    UsageRecord,
)

if TYPE_CHECKING:
    from frugalstream.runtime.settings import Settings

SCOPE = "frugalstream"
_tracer: Tracer | None = None
_shutdown: Any = None  # the SDK provider's shutdown, when `setup_tracing` built one


def install(provider: trace.TracerProvider | None) -> None:
    """Traces frugalstream's spans with `provider`; None turns tracing off (the default)."""
    global _tracer
    _tracer = provider.get_tracer(SCOPE) if provider is not None else None


def tracer() -> Tracer | None:
    return _tracer


def otlp_endpoint(settings: Settings) -> str | None:
    """The OTLP/HTTP base URL to export to, or None: nothing is exported and no exporter is built."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true" or os.environ.get("OTEL_TRACES_EXPORTER") == "none":
        return None
    return (settings.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)


def setup_tracing(settings: Settings, service_name: str) -> bool:
    """Installs an SDK provider exporting by OTLP/HTTP (protobuf) in batches, when an endpoint is configured.

    The standard `OTEL_*` variables apply (service name, resource attributes, sampler, headers, timeouts).
    Returns whether tracing is on; call `shutdown_tracing` at exit to flush what is buffered.
    """
    global _shutdown
    if otlp_endpoint(settings) is None:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    # The setting is a base URL like the standard variable; the OTEL_* ones are read by the exporter itself.
    exporter = (OTLPSpanExporter(endpoint=settings.otlp_endpoint.rstrip("/") + "/v1/traces")
                if settings.otlp_endpoint else OTLPSpanExporter())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # libraries that trace themselves (httpx instrumentation) join in
    install(provider)
    _shutdown = provider.shutdown
    return True


def shutdown_tracing() -> None:
    global _shutdown
    if _shutdown is not None:
        _shutdown()
        _shutdown = None
    install(None)


Identity = tuple[str, str]


def identity_of(value: BaseModel | None) -> Identity | None:
    """The (tenant, request or job id) a contract is about, or None for one about no single request."""
    if isinstance(value, LLMRequest):
        return value.tenant, value.id
    if isinstance(value, RoutedRequest):
        return value.request.tenant, value.request.id
    if isinstance(value, LLMResponse | UsageRecord | CacheEntry | CompletedCall):
        return value.tenant, value.request_id
    if isinstance(value, CostEvent):
        return value.data.tenant, value.data.request_id
    if isinstance(value, SummarizeJob | SummaryResult | SummarizeProgress):
        return value.tenant, value.job_id
    return None


class _HeaderGetter(Getter[Sequence[tuple[str, bytes]]]):
    """Reads trace headers straight from a record's header pairs (no dict per record)."""

    def get(self, carrier: Sequence[tuple[str, bytes]], key: str) -> list[str] | None:
        found = [v.decode("latin-1") for k, v in carrier if k.lower() == key]
        return found or None

    def keys(self, carrier: Sequence[tuple[str, bytes]]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _HeaderGetter()
_CURRENT: contextvars.ContextVar[BatchTrace | None] = contextvars.ContextVar("frugal_batch_trace", default=None)


def request_context(tenant: str, request_id: str) -> Context | None:
    """The trace context of the record being processed for (tenant, request id): the parent of a span a
    process step opens for it (the gateway's model calls). None when untraced or unknown."""
    current = _CURRENT.get()
    return current.context_of((tenant, request_id)) if current is not None else None


class BatchTrace:
    """The spans of one consumed batch: a CONSUMER span per record, child of the context in its headers (a new
    trace when it has none), ended once the batch's outputs are published; `stamp` puts each output's parent
    in its headers. Used as a context manager around the handler, so process steps find it (`request_context`)."""

    def __init__(self, tracer: Tracer, service: str, group: str | None) -> None:
        self._tracer = tracer
        self._service = service
        self._group = group
        self._started = time.time_ns()
        self._spans: dict[tuple[str, int, int], Span] = {}
        self._by_identity: dict[Identity, Context] = {}
        self._letters: dict[tuple[str, int, int], Context] = {}
        self._token: contextvars.Token[BatchTrace | None] | None = None

    def add(self, good: Iterable[Decoded[Any]], bad: Iterable[Failure]) -> None:
        for item in good:
            ident = identity_of(item.value)
            span = self._open(item.record, ident)
            if ident is not None:
                self._by_identity.setdefault(ident, trace.set_span_in_context(span))
        self.failed(bad)

    def failed(self, bad: Iterable[Failure]) -> None:
        """Records that were dead-lettered: their spans end in error (the type only, never the text)."""
        for rec, exc in bad:
            span = self._spans.get((rec.topic, rec.partition, rec.offset)) or self._open(rec)
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR))

    def _open(self, rec: Record, ident: Identity | None = None) -> Span:
        attributes: dict[str, Any] = {
            "messaging.system": "kafka", "messaging.operation.type": "process",
            "messaging.destination.name": rec.topic, "messaging.destination.partition.id": str(rec.partition),
            "messaging.kafka.offset": rec.offset, "frugalstream.service": self._service,
        }
        if self._group is not None:
            attributes["messaging.consumer.group.name"] = self._group
        if ident is not None:
            attributes["frugalstream.tenant"], attributes["frugalstream.request_id"] = ident
        span = self._tracer.start_span(
            f"process {rec.topic}", context=propagate.extract(rec.headers, getter=_GETTER), kind=SpanKind.CONSUMER,
            attributes=attributes, start_time=self._started)
        self._spans[(rec.topic, rec.partition, rec.offset)] = span
        return span

    def context_of(self, ident: Identity) -> Context | None:
        return self._by_identity.get(ident)

    def _parent(self, out: Out) -> Context | None:
        value = out.value
        if isinstance(value, DeadLetter) and value.partition is not None and value.offset is not None:
            where = (value.topic, value.partition, value.offset)
            span = self._spans.get(where)
            if span is None:
                return None
            if where not in self._letters:  # kept: `stamp` keys its carriers by the context's id
                self._letters[where] = trace.set_span_in_context(span)
            return self._letters[where]
        ident = identity_of(value)
        return self._by_identity.get(ident) if ident is not None else None

    def stamp(self, outs: Sequence[Out]) -> list[Out]:
        """Each output with the trace context of the record it came from in its headers (W3C traceparent)."""
        stamped: list[Out] = []
        carriers: dict[int, dict[str, str]] = {}  # per parent: a record's outputs share its injected headers
        for out in outs:
            parent = self._parent(out)
            if parent is None:
                stamped.append(out)
                continue
            carrier = carriers.get(id(parent))
            if carrier is None:
                carrier = carriers[id(parent)] = {}
                propagate.inject(carrier, context=parent)
            stamped.append(replace(out, headers={**out.headers, **carrier}))
        return stamped

    def __enter__(self) -> BatchTrace:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
        for span in self._spans.values():
            if exc is not None:  # the batch is redelivered: every record's processing failed this time
                span.set_attribute("error.type", type(exc).__name__)
                span.set_status(Status(StatusCode.ERROR))
            span.end()


class _Untraced(BatchTrace):
    """What the stage gets when tracing is off: every step is a no-op."""

    def __init__(self) -> None:
        pass

    def add(self, good: Iterable[Decoded[Any]], bad: Iterable[Failure]) -> None:
        return None

    def failed(self, bad: Iterable[Failure]) -> None:
        return None

    def stamp(self, outs: Sequence[Out]) -> list[Out]:
        return list(outs)

    def __enter__(self) -> BatchTrace:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


UNTRACED: BatchTrace = _Untraced()


def batch_trace(service: str, group: str | None) -> BatchTrace:
    return BatchTrace(_tracer, service, group) if _tracer is not None else UNTRACED


@contextmanager
def child_span(name: str, parent: Context | None, attributes: dict[str, Any]) -> Iterator[Span | None]:
    """A CLIENT span under `parent` (e.g. a model call), or None when tracing is off. An exception ends it in
    error with its type (the message may hold provider text, so it is not recorded)."""
    if _tracer is None:
        yield None
        return
    span = _tracer.start_span(name, context=parent, kind=SpanKind.CLIENT, attributes=attributes)
    try:
        yield span
    except BaseException as exc:
        span.set_attribute("error.type", getattr(exc, "kind", None) or type(exc).__name__)
        span.set_status(Status(StatusCode.ERROR))
        raise
    finally:
        span.end()
