"""The review tools' view of the broker: `llm.audits` and `llm.audits.reviews` read whole, verdicts produced.

Both topics are keyed by tenant, so a tenant's records are filtered by key before any is decoded; decoding
runs on a worker thread (a topic of many audits must not stall the review page). Reading never joins a
consumer group and never commits: the audit service's own offsets are untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import BaseModel, ValidationError

from frugalstream.runtime.broker import aiokafka_security
from frugalstream.runtime.kafka_options import client_options, producer_options
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.settings import Settings, UsageError
from frugalstream.runtime.state_topics import scan
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditRecord, ReviewVerdict

log = get_logger(__name__)
M = TypeVar("M", bound=BaseModel)


def _decode(found: list[tuple[bytes, bytes | None, int]], model: type[M], tenant: str | None) -> list[M]:
    out: list[M] = []
    want = None if tenant is None else tenant.encode()
    for key, value, _ in found:
        if value is None or (want is not None and key != want):
            continue
        try:
            out.append(model.model_validate_json(value))
        except ValidationError:
            log.warning("audit_review_record_invalid", model=model.__name__)
    return out


class KafkaReviewStore:
    def __init__(self, settings: Settings, *, idle_s: float = 2.0) -> None:
        self.settings = settings
        self.idle_s = idle_s
        self._producer: AIOKafkaProducer | None = None

    async def partitions(self, name: str) -> set[int]:
        s = self.settings
        consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                                    **aiokafka_security(s), **client_options())
        await consumer.start()
        try:
            await consumer.topics()
            found = consumer.partitions_for_topic(s.topic(name)) or set()
        finally:
            await consumer.stop()
        if not found:
            raise UsageError(f"topic {s.topic(name)} does not exist on {s.kafka_bootstrap} "
                             "(run `frugalstream topics` first)")
        return set(found)

    async def _read(self, name: str, model: type[M], tenant: str | None) -> list[M]:
        found = await scan(self.settings, name, await self.partitions(name), idle_s=self.idle_s)
        return await asyncio.to_thread(_decode, found, model, tenant)

    async def load(self, tenant: str | None) -> tuple[list[AuditRecord], list[ReviewVerdict]]:
        records, reviews = await asyncio.gather(self._read(t.AUDITS, AuditRecord, tenant),
                                                self._read(t.AUDIT_REVIEWS, ReviewVerdict, tenant))
        return records, reviews

    async def start(self) -> None:
        s = self.settings
        self._producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, client_id="frugalstream-audit-review",
                                          **aiokafka_security(s), **producer_options(idempotent=s.kafka_idempotent))
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def publish(self, verdicts: Sequence[ReviewVerdict]) -> None:
        if self._producer is None:
            raise RuntimeError("the review store is not started")
        topic = self.settings.topic(t.AUDIT_REVIEWS)
        sent = [await self._producer.send(topic, v.model_dump_json().encode(), key=v.tenant.encode(),
                                          headers=[("content-type", b"application/json")]) for v in verdicts]
        await asyncio.gather(*sent)
