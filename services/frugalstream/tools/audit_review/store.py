"""The review tools' view of the broker: `llm.audits` and `llm.audits.reviews` read whole, verdicts produced.

Both topics are keyed by tenant, so a tenant's records are filtered by key before any is decoded; decoding
runs on a worker thread (a topic of many audits must not stall the review page). Reading never joins a
consumer group and never commits: the audit service's own offsets are untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TypeVar

from aiokafka import AIOKafkaProducer
from pydantic import BaseModel

from frugalstream.runtime.broker import aiokafka_security
from frugalstream.runtime.kafka_options import producer_options
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.state_topics import read_topic
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditRecord, ReviewVerdict

M = TypeVar("M", bound=BaseModel)


class KafkaReviewStore:
    def __init__(self, settings: Settings, *, idle_s: float = 2.0) -> None:
        self.settings = settings
        self.idle_s = idle_s
        self._producer: AIOKafkaProducer | None = None

    async def _read(self, name: str, model: type[M], tenant: str | None) -> list[M]:
        return await read_topic(self.settings, name, model, key=None if tenant is None else tenant.encode(),
                                idle_s=self.idle_s)

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
