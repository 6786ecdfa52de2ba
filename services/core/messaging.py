"""Decoding, dead-lettering and publishing: the only place that touches raw Kafka records."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from faststream.kafka import KafkaBroker
from faststream.kafka.message import KafkaMessage
from pydantic import BaseModel, ValidationError

from schemas import CostEvent, DeadLetter, LLMResponse, RoutedRequest
from schemas import topics as t
from schemas.topics import dlq_topic
from services.core.logging import get_logger
from services.core.metrics import METRICS, Metrics
from services.core.settings import Settings

M = TypeVar("M", bound=BaseModel)
log = get_logger(__name__)


@dataclass(frozen=True)
class Record:
    """The parts of a consumer record the services need, independent of aiokafka's class."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class Out:
    """One message to publish; `topic` is the logical name, the publisher adds the prefix."""

    topic: str
    value: BaseModel | None  # None is a tombstone on a compacted topic (it needs a key)
    key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    partition: int | None = None  # explicit partition, for co-partitioned state topics
    prefixed: bool = False  # `topic` is already the full name (a DLQ named after a consumed topic)


@dataclass(frozen=True)
class Decoded(Generic[M]):
    record: Record
    value: M


def records_of(message: KafkaMessage) -> list[Record]:
    raw: Any = message.raw_message
    items: Iterable[Any] = raw if isinstance(raw, list | tuple) else (raw,)
    return [
        Record(r.topic, r.partition, r.offset, r.key, r.value, tuple((k, v or b"") for k, v in (r.headers or ())))
        for r in items
    ]


Failure = tuple[Record, Exception]


def decode(records: Sequence[Record], model: type[M], *, max_bytes: int) -> tuple[list[Decoded[M]], list[Failure]]:
    """Splits a batch into valid contracts and failures; nothing raises, so one bad message never stalls a batch."""
    good: list[Decoded[M]] = []
    bad: list[tuple[Record, Exception]] = []
    for rec in records:
        try:
            if rec.value is None:
                raise ValueError("empty message (tombstone) on a non-compacted topic")
            if len(rec.value) > max_bytes:
                raise ValueError(f"message of {len(rec.value)} bytes exceeds the {max_bytes}-byte limit")
            good.append(Decoded(rec, model.model_validate_json(rec.value)))
        except (ValidationError, ValueError, UnicodeDecodeError) as exc:
            bad.append((rec, exc))
    return good, bad


def _error_text(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        # Field paths and error types only: the input values may be prompt text.
        return json.dumps([{"loc": list(e["loc"]), "type": e["type"], "msg": e["msg"]} for e in exc.errors()])[:4000]
    return str(exc)[:4000]


def dead_letter(record: Record, exc: Exception, service: str) -> Out:
    headers = {k: v.decode("utf-8", "replace") for k, v in record.headers}
    letter = DeadLetter(
        topic=record.topic, partition=record.partition, offset=record.offset,
        key_b64=base64.b64encode(record.key).decode() if record.key is not None else None,
        value_b64=base64.b64encode(record.value or b"").decode(),
        headers=headers, error_type=type(exc).__name__, error=_error_text(exc), service=service,
        failed_at=time.time(),
    )
    # The DLQ topic name keeps the source topic's full (possibly prefixed) name.
    key = record.key.decode("utf-8", "replace") if record.key else None
    return Out(topic=dlq_topic(record.topic), value=letter, key=key, prefixed=True)


class Publisher:
    """Publishes outputs and waits for the broker's acks, so the caller may commit afterwards.

    Every terminal response, routing decision and cost event passes through here, which makes it the one
    place that feeds the Prometheus series.
    """

    def __init__(self, broker: KafkaBroker, settings: Settings, metrics: Metrics = METRICS) -> None:
        self._broker = broker
        self._settings = settings
        self.metrics = metrics

    def topic(self, out: Out) -> str:
        return out.topic if out.prefixed else self._settings.topic(out.topic)

    async def publish_all(self, outs: Sequence[Out]) -> None:
        if not outs:
            return
        await asyncio.gather(*(self._publish(out) for out in outs))
        for out in outs:
            self._observe(out)

    def _observe(self, out: Out) -> None:
        value = out.value
        if out.topic == t.RESPONSES and isinstance(value, LLMResponse):
            self.metrics.record_response(value.source)
        elif out.topic == t.ROUTED and isinstance(value, RoutedRequest):
            self.metrics.record_route(value.route.tier, value.route.task_type)
        elif out.topic == t.COST_EVENTS and isinstance(value, CostEvent):
            self.metrics.record_cost(value.data)

    async def _publish(self, out: Out) -> None:
        headers = {"content-type": "application/json", **out.headers}
        await self._broker.publish(
            out.value.model_dump_json(exclude_none=False).encode() if out.value is not None else None,
            self.topic(out),
            key=out.key.encode() if out.key is not None else None,
            partition=out.partition,
            headers=headers,
        )

    async def dead_letters(self, failures: Sequence[tuple[Record, Exception]], service: str) -> None:
        for rec, exc in failures:
            log.warning("dead_letter", topic=rec.topic, partition=rec.partition, offset=rec.offset,
                        error_type=type(exc).__name__, service=service)
        await self.publish_all([dead_letter(rec, exc, service) for rec, exc in failures])
