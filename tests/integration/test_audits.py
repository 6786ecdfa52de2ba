"""Audits on the embedded broker, every service running: a routed-down answer gets its counterfactual and a
verdict on `llm.audits`; the audit answer never reaches `llm.responses` or a reply topic; its spend is priced
as the `audit` strategy in the ledger (issue 16)."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from frugalstream.accountant.app import AccountantService
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, LLMRequest
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditRecord
from tests.integration.adversary import read_quietly
from tests.integration.conftest import PipelineFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def read_audits(bootstrap: str, topic: str, want: set[str], timeout_s: float) -> dict[str, AuditRecord]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_wait_ms=50)
    await consumer.start()
    found: dict[str, AuditRecord] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not want <= set(found):
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    audit = AuditRecord.model_validate_json(record.value or b"{}")
                    found[audit.request_id] = audit
    finally:
        await consumer.stop()
    return found


async def test_routed_down_answers_are_audited_and_the_audit_never_reaches_a_caller(
        pipeline: PipelineFactory, integration_settings: Settings) -> None:
    settings = integration_settings.model_copy(update={"audit_rate": 1.0, "audit_judges": {"default": "match"}})
    ids = {f"a{i}" for i in range(3)}
    async with pipeline(settings=settings) as running:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            for rid in sorted(ids):
                request = LLMRequest(id=rid, tenant="acme", reply_topic="acme.answers", task_hint="faq",
                                     messages=(ChatMessage(role="user", content=f"opening hours of shop {rid}?"),))
                await producer.send_and_wait(settings.topic(t.REQUESTS), request.model_dump_json().encode())
        finally:
            await producer.stop()
        audits = await read_audits(settings.kafka_bootstrap, settings.topic(t.AUDITS), ids, 90.0)
        assert set(audits) == ids
        for audit in audits.values():
            assert audit.kind == "routed_down" and audit.tenant == "acme" and audit.judge == "match"
            assert audit.reference.model == settings.default_baseline_model
            assert audit.estimate.n >= 1
        answers = await read_quietly(settings, settings.topic(t.RESPONSES), want=ids, key_of=lambda r: r.request_id,
                                     timeout_s=30.0, quiet_s=2.0)
        assert set(answers) == ids and all(len(v) == 1 for v in answers.values())  # no audit id, one answer each
        replies = await read_quietly(settings, settings.topic("acme.answers"), want=ids,
                                     key_of=lambda r: r.request_id, timeout_s=10.0, quiet_s=1.0)
        assert set(replies) <= ids
        accountant = running.service("accountant")
        assert isinstance(accountant, AccountantService)
        for _ in range(100):
            if accountant.ledger.totals()["by_strategy"].get("audit", 0.0) < 0:
                break
            await asyncio.sleep(0.2)
        assert accountant.ledger.totals()["by_strategy"]["audit"] < 0  # audit spend, net of the savings
