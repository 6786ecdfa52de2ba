"""The consume-process-publish loop every service shares.

Per batch, in order:
1. decode each record against its contract; failures are dead-lettered, never raised;
2. process the valid ones (plain logic, no Kafka); a batch that raises is retried message by message, and
   a message that still raises is dead-lettered with its error, so one poison message cannot stall a partition;
3. publish every output and dead letter, waiting for the broker's acknowledgements;
4. return, and FastStream commits the offsets (`AckPolicy.NACK_ON_ERROR`). If publishing fails, the handler
   raises and the partitions rewind to the batch start: outputs may repeat, but nothing is lost.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import BaseModel

from services.core.broker import batch_subscriber_options
from services.core.logging import get_logger
from services.core.messaging import Decoded, Failure, Out, Publisher, decode, records_of
from services.core.settings import Settings

M = TypeVar("M", bound=BaseModel)
Process = Callable[[Sequence[Decoded[M]]], Awaitable[list[Out]]]
log = get_logger(__name__)


async def run_batch(process: Process[M], good: Sequence[Decoded[M]], bad: list[Failure]) -> list[Out]:
    try:
        return await process(good)
    except Exception:
        log.exception("batch_failed_retrying_individually", size=len(good))
    outs: list[Out] = []
    for item in good:
        try:
            outs.extend(await process([item]))
        except Exception as exc:
            bad.append((item.record, exc))
    return outs


def whole_topic_options() -> dict[str, Any]:
    """For compacted state topics every instance reads in full: no group, so no commits, from the start."""
    return {"group_id": None, "ack_policy": AckPolicy.ACK_FIRST}


@dataclass(frozen=True)
class TopicHandler(Generic[M]):
    topic: str
    model: type[M]
    process: Process[M]


def subscribe(
    broker: KafkaBroker, publisher: Publisher, settings: Settings, *, service: str, topic: str,
    model: type[M], process: Process[M], max_records: int = 64, **options: Any,
) -> None:
    """Registers a batch subscriber for `topic` (logical name) that runs the steps in the module docstring."""
    subscribe_many(broker, publisher, settings, service=service, handlers=[TopicHandler(topic, model, process)],
                   max_records=max_records, **options)


def subscribe_many(
    broker: KafkaBroker, publisher: Publisher, settings: Settings, *, service: str,
    handlers: Sequence[TopicHandler[Any]], max_records: int = 64, **options: Any,
) -> None:
    """One consumer over several topics; each batch is split by topic and handled in the given order.

    Co-partitioned topics (same key, same partition count) need one consumer with a range assignor, so the
    instance that owns partition N of one topic owns partition N of the others.
    """
    by_topic = {settings.topic(h.topic): h for h in handlers}

    async def handler(msg: KafkaMessage) -> None:
        started = time.perf_counter()
        records = records_of(msg)
        outs: list[Out] = []
        bad_all: list[Failure] = []
        for name, spec in by_topic.items():
            mine = [r for r in records if r.topic == name]
            if not mine:
                continue
            good, bad = decode(mine, spec.model, max_bytes=settings.max_message_bytes)
            outs.extend(await run_batch(spec.process, good, bad) if good else [])
            bad_all.extend(bad)
        processed = time.perf_counter()
        if records:
            publisher.metrics.observe_latency(service, (processed - started) / len(records))
        await publisher.dead_letters(bad_all, service)
        await publisher.publish_all(outs)
        log.debug("batch_done", service=service, records=len(records), outputs=len(outs),
                  process_ms=round((processed - started) * 1000, 1),
                  publish_ms=round((time.perf_counter() - processed) * 1000, 1))

    handler.__name__ = f"{service.replace('.', '_')}_handler"
    kwargs = {**batch_subscriber_options(settings, service, max_records=max_records), **options}
    broker.subscriber(*by_topic, **kwargs)(handler)
