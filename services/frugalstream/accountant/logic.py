"""The accountant's work, free of Kafka: price usage, write the ledger, and say which budget states changed.

Per batch: every record is priced (a model the catalog lacks at its highest rates, flagged, never dropped),
and the new ones are written to the SQLite ledger (idempotent by CloudEvents id). Every event is returned,
redeliveries too: the ids are deterministic, so downstream deduplicates. The spend, savings and unpriced
metrics count only the events the ledger stored: counted on publish, a redelivered record (a crash before the
offset commit) was counted twice in Prometheus while the ledger kept it once.

Budgets are evaluated in two steps, so a failed publish is not forgotten: `budget_changes` returns the states
that differ from the last published ones (it records nothing), and `budgets_published` records them once the
broker acknowledged them. The caller serialises the two (see `AccountantService.publish_budgets`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from frugalstream.accountant.budgets import BudgetTracker
from frugalstream.accountant.ledger import Ledger
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import cost_event
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.metrics import METRICS, Metrics
from frugalstream.schemas import BudgetState, CostEvent, UsageRecord

log = get_logger(__name__)


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
        metrics count the new ones only."""
        events = [cost_event(r, self.catalog) for r in records]
        stored = set(await asyncio.to_thread(self.ledger.insert, events))
        self.priced += len(events)
        for e in events:
            if e.id not in stored:
                continue
            stored.discard(e.id)  # a record twice in one batch is stored, and counted, once
            self.metrics.record_cost(e.data)
            if e.data.price_unknown:
                self.metrics.record_unpriced(e.data.unpriced_models)
                log.warning("unpriced_usage", models=list(e.data.unpriced_models), tenant=e.data.tenant,
                            usage_id=e.data.usage_id)
        return events

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
