"""The audit stage after a failed publish: a redelivered batch publishes what its first delivery lost.

An audit (or a person's review) is counted when its batch is processed, before the stage publishes the record;
when that publish is not acknowledged the stage raises and the batch comes again, finding the audit counted.
`llm.audits` is all a restart reads and `llm.thresholds` all the classifier and dedupe read, so the redelivery
publishes the remembered record and the threshold change its batch caused again, and counts nothing twice.
The stage's real handler is driven, with a broker that refuses publishes while told to.
"""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from frugalstream.audit.app import AuditService
from frugalstream.audit.logic import Auditor
from frugalstream.llm.judges import MatchJudge
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.metrics import Metrics
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditRecord, ThresholdChange
from tests.unit.test_audit_hardening import CELL, SETTINGS, answered, review
from tests.unit.test_stage import CapturingBroker, FakeBroker, FakeConsumer, FakeMessage, FakeRecord

SETTINGS = SETTINGS.model_copy(update={"kafka_idempotent": False})
AUDITS, THRESHOLDS = SETTINGS.topic(t.AUDITS), SETTINGS.topic(t.THRESHOLDS)




class Stage:
    """The audit service behind the stage's real handlers; `broker.fail` refuses a topic's publishes."""

    def __init__(self) -> None:
        self.auditor = Auditor(SETTINGS, {"match": MatchJudge()})
        self.broker = FakeBroker()
        self.subscriptions = CapturingBroker()  # every handler the service subscribes, by topic
        AuditService(SETTINGS, self.auditor).register(
            self.subscriptions, Publisher(self.broker, SETTINGS, Metrics(CollectorRegistry())))  # type: ignore[arg-type]

    async def deliver(self, topic: str, values: list[BaseModel], *, partition: int = 0,
                      unacknowledged: bool = False) -> None:
        """One delivery of a batch; `unacknowledged`: its publish fails (the stage raises, the batch comes again)."""
        message = FakeMessage(tuple(FakeRecord(SETTINGS.topic(topic), partition, i, b"acme",
                                               v.model_dump_json().encode()) for i, v in enumerate(values)),
                              FakeConsumer())
        handler = self.subscriptions.handlers[SETTINGS.topic(topic)]
        if not unacknowledged:
            await handler(message)
            return
        self.broker.fail = {AUDITS, THRESHOLDS}
        with pytest.raises(ConnectionError):
            await handler(message)
        self.broker.fail = set()

    def audits(self) -> list[AuditRecord]:
        return [AuditRecord.model_validate_json(data) for data in self.broker.on(AUDITS)]

    def thresholds(self) -> list[ThresholdChange]:
        return [ThresholdChange.model_validate_json(data) for data in self.broker.on(THRESHOLDS)]


async def test_an_audit_whose_publish_failed_is_published_on_redelivery_and_counted_once() -> None:
    stage = Stage()
    batch = [answered("r1", "Paris", "Lyon")]
    await stage.deliver(t.AUDITS_ANSWERED, batch, unacknowledged=True)
    await stage.deliver(t.AUDITS_ANSWERED, batch)  # redelivered
    assert [r.request_id for r in stage.audits()] == ["r1"], "the judged audit never reaches llm.audits"
    assert stage.audits()[0].estimate.n == stage.auditor.estimates.estimate(CELL).n == 1


async def test_the_threshold_change_of_a_batch_whose_publish_failed_is_published_on_redelivery() -> None:
    stage = Stage()
    batch = [answered("r1", "Paris", "Lyon", score=0.95)]  # a rejected hit: the bound is broken, it tightens
    await stage.deliver(t.AUDITS_ANSWERED, batch, unacknowledged=True)
    moved = stage.auditor.current("acme", "faq", "semantic_verify")
    await stage.deliver(t.AUDITS_ANSWERED, batch)  # redelivered
    assert [c.value for c in stage.thresholds()] == [moved] and moved > 0.95, \
        "the classifier and dedupe never see the tightened threshold"


async def test_a_persons_review_whose_publish_failed_survives_redelivery_and_restart() -> None:
    stage = Stage()
    audit = answered("r2", "Paris", "Lyon")  # the machine rejects it
    await stage.deliver(t.AUDITS_ANSWERED, [audit])
    await stage.deliver(t.AUDIT_REVIEWS, [review(audit, "accept")], unacknowledged=True)
    await stage.deliver(t.AUDIT_REVIEWS, [review(audit, "accept")])  # redelivered
    restarted = Auditor(SETTINGS, {"match": MatchJudge()})
    restarted.restore(stage.audits())  # what `AuditService.start` reads back from llm.audits
    assert (restarted.recent[audit.audit_id].judge, restarted.recent[audit.audit_id].verdict) == ("human", "accept")
    assert stage.auditor.estimates.estimate(CELL).n == 1


async def test_a_redelivery_never_publishes_a_threshold_change_superseded_since() -> None:
    stage = Stage()
    first = [answered("x", "Paris", "Lyon", score=0.95)]
    await stage.deliver(t.AUDITS_ANSWERED, first, unacknowledged=True)  # tightens past 0.95, not published
    moved = stage.auditor.current("acme", "faq", "semantic_verify")
    later = ThresholdChange(tenant="acme", task_type="faq", knob="semantic_verify", value=0.99, previous=moved,
                            reason="bound_broken", target=0.99, n=1, estimate=0.0, low=0.0, high=1.0,
                            changed_at=time.time())  # decided since (by the instance judging the reviews)
    await stage.deliver(t.THRESHOLDS, [later])  # read back from llm.thresholds
    await stage.deliver(t.AUDITS_ANSWERED, first)  # redelivered
    assert [r.request_id for r in stage.audits()] == ["x"]
    assert stage.thresholds() == [] and stage.auditor.current("acme", "faq", "semantic_verify") == 0.99, \
        "the redelivery moved the threshold back to what its first delivery decided"


async def test_a_delivered_audit_is_published_once_and_its_redelivery_republishes_it_unchanged() -> None:
    stage = Stage()
    batch = [answered("r1", "Paris", "Lyon")]
    await stage.deliver(t.AUDITS_ANSWERED, batch)
    assert [r.request_id for r in stage.audits()] == ["r1"]
    await stage.deliver(t.AUDITS_ANSWERED, batch)  # published, then a crash before the commit: it comes again
    first, again = stage.audits()
    assert again == first and stage.auditor.estimates.estimate(CELL).n == 1
