"""What the runtime moves around: consumer records in, outputs to publish, decoded contracts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from faststream.kafka.message import KafkaMessage
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


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
    side: bool = False  # a copy to a topic outside frugalstream (a reply topic): best effort, never fatal


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
