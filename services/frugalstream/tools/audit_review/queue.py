"""Which audits await a person, and the verdict a person's decision becomes.

The queue is read from the topics, not kept anywhere: the latest `AuditRecord` of each audit on `llm.audits`,
minus those a person already judged there (judge `human`) or on `llm.audits.reviews` (a verdict the audit
service may not have counted yet) for the same tenant and the same answers. A verdict is built from the record
itself, never from what a browser or a file says the answers were, so it always names the pair on the topic.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from frugalstream.llm.audits import answers_digest
from frugalstream.schemas.audits import AuditRecord, ReviewVerdict, Verdict


class ReviewStore(Protocol):
    """Where audits are read and verdicts go: the broker (`store.KafkaReviewStore`), or a fake in tests."""

    async def load(self, tenant: str | None) -> tuple[list[AuditRecord], list[ReviewVerdict]]:
        """Every judged audit (of `tenant`, or all) in topic order, and every review verdict published."""
        ...

    async def publish(self, verdicts: Sequence[ReviewVerdict]) -> None:
        """Writes the verdicts to `llm.audits.reviews` (key = tenant) and returns once the broker has them."""
        ...


@dataclass(frozen=True)
class Filters:
    tenant: str
    kinds: frozenset[str] = frozenset()  # empty: every kind
    task_types: frozenset[str] = frozenset()

    def admits(self, record: AuditRecord) -> bool:
        return record.tenant == self.tenant and (not self.kinds or record.kind in self.kinds) and \
            (not self.task_types or record.task_type in self.task_types)


def digest_of(record: AuditRecord) -> str:
    return answers_digest(record.candidate, record.reference)


def latest(records: Iterable[AuditRecord]) -> dict[str, AuditRecord]:
    """The latest record of each audit id (topic order: a person's verdict follows the machine's)."""
    found: dict[str, AuditRecord] = {}
    for record in records:
        found.pop(record.audit_id, None)
        found[record.audit_id] = record
    return found


def reviewed(reviews: Iterable[ReviewVerdict]) -> set[tuple[str, str, str]]:
    return {(v.audit_id, v.tenant, v.answers_sha256) for v in reviews}


def pending(records: Iterable[AuditRecord], reviews: Iterable[ReviewVerdict], filters: Filters) -> list[AuditRecord]:
    """Audits of the filters' tenant that no person has judged yet, oldest first."""
    done = reviewed(reviews)
    return [r for r in latest(records).values()
            if filters.admits(r) and r.judge != "human" and (r.audit_id, r.tenant, digest_of(r)) not in done]


def verdict_for(record: AuditRecord, verdict: Verdict, reviewer: str = "", now: float | None = None,
                ) -> ReviewVerdict:
    return ReviewVerdict(audit_id=record.audit_id, tenant=record.tenant, verdict=verdict,
                         answers_sha256=digest_of(record), reviewer=reviewer[:128],
                         reviewed_at=time.time() if now is None else now)
