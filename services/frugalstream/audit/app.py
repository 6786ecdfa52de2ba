"""Audit service: `llm.audits.answered` + `llm.audits.reviews` -> `llm.audits` (+ `llm.thresholds`).

Judged audits go on `llm.audits` keyed by tenant (analytics and the accountant read them); threshold changes
go on the compacted `llm.thresholds` keyed `tenant/task_type/knob`, which the classifier and dedupe read whole.
The service reads `llm.thresholds` whole too, so after a restart it moves thresholds from where they are, and
before it subscribes it reads `llm.audits` whole: the estimates, the threshold labels and the audits reviewers
may judge survive a restart (as far back as the topic's retention). Its estimates are exported to Prometheus
as they change.

A batch whose outputs were not acknowledged comes again and finds its audits already counted: it publishes
again what the first delivery made (`Auditor.judged_before` / `reviewed_before`), counting nothing twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

from faststream.kafka import KafkaBroker

from frugalstream.audit.logic import Auditor, Outputs
from frugalstream.llm.judges import EmbeddingJudge, Judge, MatchJudge
from frugalstream.llm.thresholds import threshold_key
from frugalstream.resources import Resources
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.metrics import METRICS, Metrics
from frugalstream.runtime.records import Decoded, Out
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext, background_options, follow_state, subscribe
from frugalstream.runtime.state_topics import read_topic
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditRecord, AuditRequest, ReviewVerdict, ThresholdChange

log = get_logger(__name__)
History = Callable[[], Awaitable[Sequence[AuditRecord]]]


def audit_outs(records: Sequence[AuditRecord], changes: Sequence[ThresholdChange],
               again: Outputs = ([], [])) -> list[Out]:
    """`again`: what an earlier delivery of the batch made, published again (see `Auditor.judged_before`)."""
    return [*(Out(t.AUDITS, r, key=r.tenant) for r in [*again[0], *records]),
            *(Out(t.THRESHOLDS, c, key=threshold_key(c.tenant, c.task_type, c.knob)) for c in [*again[1], *changes])]


@dataclass
class AuditService:
    settings: Settings
    logic: Auditor
    history: History | None = None  # the judged audits so far (`llm.audits`); None: start empty (tests)
    metrics: Metrics = METRICS
    name: str = "audit"

    async def start(self) -> None:
        if self.history is None:
            return
        records = await self.history()
        counted = self.logic.restore(records)
        self._export([r for r in self.logic.recent.values()], [])
        log.info("audits_restored", records=len(records), counted=counted)

    async def stop(self) -> None:
        return None

    def _export(self, records: Sequence[AuditRecord], changes: Sequence[ThresholdChange]) -> None:
        for r in records:
            self.metrics.record_audit(r.estimate)
        for c in changes:
            self.metrics.record_threshold(c)

    async def _on_answered(self, batch: Sequence[Decoded[AuditRequest]], _ctx: BatchContext) -> list[Out]:
        audits = [d.value for d in batch]
        records, changes = await self.logic.judge(audits)
        self._export(records, changes)
        return audit_outs(records, changes, self.logic.judged_before(audits, records))

    async def _on_reviews(self, batch: Sequence[Decoded[ReviewVerdict]], _ctx: BatchContext) -> list[Out]:
        verdicts = [d.value for d in batch]
        records, changes = self.logic.review(verdicts)
        self._export(records, changes)
        return audit_outs(records, changes, self.logic.reviewed_before(verdicts, records))

    def register(self, broker: KafkaBroker, publisher: Publisher) -> None:
        # One consumer group: the controller sees every label of a tenant in one place. No caller waits on an
        # audit or a review, so both poll like the other background consumers.
        subscribe(broker, publisher, self.settings, service=self.name, topic=t.AUDITS_ANSWERED, model=AuditRequest,
                  process=self._on_answered, max_records=64, **background_options())
        subscribe(broker, publisher, self.settings, service=f"{self.name}.reviews", topic=t.AUDIT_REVIEWS,
                  model=ReviewVerdict, process=self._on_reviews, **background_options())
        follow_state(broker, publisher, self.settings, service=f"{self.name}.thresholds", topic=t.THRESHOLDS,
                     model=ThresholdChange, update=self.logic.book.update)


def wire(res: Resources) -> AuditService:
    s = res.settings
    judges: dict[str, Judge] = {"match": MatchJudge(),
                                "embedding": EmbeddingJudge(res.embedder, s.audit_embedding_accept)}
    return AuditService(s, Auditor(s, judges), history=partial(read_topic, s, t.AUDITS, AuditRecord))
