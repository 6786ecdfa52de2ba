"""The accountant's work, free of Kafka: price usage, write the ledger, and say which budget states changed.

Per batch: every record is priced (a model the catalog lacks at its highest rates, flagged, never dropped; a
record stamped at no time at the accountant's clock, never dropped either), and the new ones are written to the
SQLite ledger (idempotent by CloudEvents id, of the record's own tenant). Every event is returned, redeliveries
too, as the ledger holds it: the ids are deterministic and their content fixed, so downstream deduplicates.
The spend, savings and unpriced metrics count only the events the ledger stored: counted on publish, a
redelivered record (a crash before the offset commit) was counted twice in Prometheus while the ledger kept it
once.

Budgets are evaluated in two steps, so a failed publish is not forgotten: `budget_changes` returns the states
that differ from the last published ones (it records nothing), and `budgets_published` records them once the
broker acknowledged them. The caller serialises the two (see `AccountantService.publish_budgets`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from frugalstream.accountant.budgets import BudgetTracker
from frugalstream.accountant.ledger import Ledger
from frugalstream.llm.identity import request_key
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import cost_event, event_id
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.metrics import METRICS, Metrics
from frugalstream.schemas import BudgetState, CostEvent, UsageRecord
from frugalstream.schemas._base import CLOCK_SKEW_S

log = get_logger(__name__)


def named_tenant(uid: str) -> str | None:
    """The tenant a usage id names when `llm.identity.usage_id` made it (`stage:["tenant","request id"]`)."""
    _, colon, identity = uid.partition(":")
    if not colon or not identity.startswith("["):
        return None
    try:
        named = json.loads(identity)
    except ValueError:
        return None
    ok = isinstance(named, list) and len(named) == 2 and all(isinstance(part, str) for part in named)
    return named[0] if ok else None


def billed_now_if_no_time(record: UsageRecord, now: float) -> UsageRecord:
    """`record`, stamped `now` when its time is none up to `now` plus the clock skew (milliseconds, NaN, a clock
    years ahead): such a record was dead-lettered (no date to price it at) or counted against no budget until
    then. Either way its spend left every budget; billed now, it counts."""
    if 0.0 <= record.occurred_at <= now + CLOCK_SKEW_S:
        return record
    log.warning("usage_time_out_of_range", tenant=record.tenant, usage_id=record.id, occurred_at=record.occurred_at)
    return record.model_copy(update={"occurred_at": now})


def priced_event(record: UsageRecord, catalog: PriceCatalog, now: float) -> CostEvent:
    """`cost_event` (of a record stamped at a time, `billed_now_if_no_time`), under an id of the record's own
    tenant when its usage id names another tenant's request: ids are the ledger's key, so a record forging
    another tenant's usage id would otherwise take the id of that tenant's real record, which the ledger then
    ignored as a redelivery (its spend gone from every budget)."""
    event = cost_event(billed_now_if_no_time(record, now), catalog)
    named = named_tenant(record.id)
    if named is None or named == record.tenant:
        return event  # the id every ledger already holds for it
    return event.model_copy(update={"id": event_id(request_key(record.tenant, record.id))})


@dataclass
class Accountant:
    catalog: PriceCatalog
    ledger: Ledger
    budgets: BudgetTracker | None = None
    clock: Callable[[], float] = time.time
    metrics: Metrics = METRICS
    # Records priced so far (redeliveries too): the demo and tests wait on it; a per-instance count, which the
    # process-wide metrics registry cannot give.
    priced: int = 0

    async def handle(self, records: Sequence[UsageRecord]) -> list[CostEvent]:
        """The cost event of every record, written to the ledger (in a worker thread: SQLite blocks); the
        metrics count the new ones only. An id the ledger already held, or held twice in the batch, is
        returned as the ledger holds it: its other content (re-stamped, re-priced, rewritten) never reaches
        `llm.cost-events` under the id of what was counted."""
        now = self.clock()
        events = [priced_event(r, self.catalog, now) for r in records]
        stored = set(await asyncio.to_thread(self.ledger.insert, events))
        self.priced += len(events)
        older = {e.id for e in events if e.id not in stored}
        kept: dict[str, CostEvent] = {}
        for e in events:
            if e.id not in stored:
                continue
            stored.discard(e.id)  # a record twice in one batch is stored, and counted, once
            kept[e.id] = e
            self.metrics.record_cost(e.data)
            if e.data.price_unknown:
                self.metrics.record_unpriced(e.data.unpriced_models)
                log.warning("unpriced_usage", models=list(e.data.unpriced_models), tenant=e.data.tenant,
                            usage_id=e.data.usage_id)
        if older:
            kept.update(await asyncio.to_thread(self.ledger.events, older))
        return [kept.get(e.id, e) for e in events]

    async def budget_changes(self) -> list[BudgetState]:
        """The budget states to publish now (changed since the last acknowledged publish); records nothing."""
        if self.budgets is None:
            return []
        return await asyncio.to_thread(self.budgets.pending, self.ledger, self.clock())

    def budgets_published(self, states: Sequence[BudgetState]) -> None:
        """Call only after the broker acknowledged `states`."""
        if self.budgets is not None:
            self.budgets.mark_published(states)

    def close(self) -> None:
        self.ledger.close()
