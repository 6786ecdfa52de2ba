"""Accountant service: `llm.usage` -> ledger + `llm.cost-events`, and budget states to `llm.budgets`.

The logic (`Accountant`) prices and writes the ledger; this module puts each cost event on `llm.cost-events`
keyed by its subject, and each budget state on the compacted `llm.budgets` keyed by its budget id. Offsets are
committed after the batch's events are published.

Budget states are published by the service itself, not through the stage, under one lock: evaluate, publish,
and only then mark them published. A failed publish leaves them pending for the next evaluation, which comes
with the next batch or, without traffic, from a timer every `budget_tick_s`, so a period rolls over on time (a
refused tenant is served again after midnight UTC even if it sends nothing).

With `ledger_retention_days` set, a second timer prunes the ledger at start and every `PRUNE_EVERY_S`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from faststream.kafka import KafkaBroker

from frugalstream.accountant.audit_estimates import add_audits
from frugalstream.accountant.budgets import BudgetsConfig, BudgetTracker
from frugalstream.accountant.ledger import Ledger
from frugalstream.accountant.logic import Accountant
from frugalstream.resources import Resources
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.metrics import METRICS, Metrics
from frugalstream.runtime.records import Decoded, Out
from frugalstream.runtime.service import cancel_tasks
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext, background_options, subscribe
from frugalstream.schemas import BudgetState, CostEvent, UsageRecord
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditRecord

log = get_logger(__name__)

#: How often the ledger is pruned when a retention is set.
PRUNE_EVERY_S = 3600.0


class StatePublisher(Protocol):
    """What budget publishing needs from `Publisher` (a fake in tests)."""

    async def publish_all(self, outs: Sequence[Out]) -> None: ...


def cost_outs(events: Sequence[CostEvent]) -> list[Out]:
    return [Out(t.COST_EVENTS, e, key=e.subject) for e in events]


def budget_outs(states: Sequence[BudgetState]) -> list[Out]:
    """Keyed by budget id: the compacted topic keeps each budget's latest decision."""
    return [Out(t.BUDGETS, s, key=s.budget_id) for s in states]


@dataclass
class AccountantService:
    settings: Settings
    logic: Accountant
    publisher: StatePublisher | None = None
    metrics: Metrics = METRICS
    name: str = "accountant"
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _ticker: asyncio.Task[None] | None = field(default=None, repr=False)
    _pruner: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def ledger(self) -> Ledger:
        return self.logic.ledger

    @property
    def priced(self) -> int:
        return self.logic.priced

    async def start(self) -> None:
        if self.logic.budgets is not None and self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_forever(), name="accountant-budget-ticker")
        if self.settings.ledger_retention_days is not None and self._pruner is None:
            self._pruner = asyncio.create_task(self._prune_forever(self.settings.ledger_retention_days * 86_400.0),
                                               name="accountant-ledger-pruner")

    async def stop(self) -> None:
        await self.stop_background()
        await asyncio.to_thread(self.logic.close)

    async def stop_background(self) -> None:
        await cancel_tasks(self._ticker, self._pruner)
        self._ticker = self._pruner = None

    async def _prune_forever(self, keep_s: float) -> None:
        """A failed prune is logged and tried again next time: retention must never stop the accounting."""
        while True:
            try:
                deleted = await asyncio.to_thread(self.ledger.prune, keep_s)
                if deleted:
                    log.info("ledger_pruned", events=deleted, retention_days=keep_s / 86_400)
            except Exception as exc:
                log.warning("ledger_prune_failed", error_type=type(exc).__name__, error=str(exc)[:500])
            await asyncio.sleep(PRUNE_EVERY_S)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.budget_tick_s)
            await self.publish_budgets()

    async def publish_budgets(self) -> int:
        """Publishes the budget states that differ from the last published ones; never raises (a failure is
        logged, counted, and left pending for the next call). Returns how many were published."""
        if self.logic.budgets is None or self.publisher is None:
            return 0
        logic, publisher = self.logic, self.publisher
        async with self._lock:  # one evaluation at a time: a stale one must not publish after a newer one
            try:
                states = await logic.budget_changes()
                if states:
                    await publisher.publish_all(budget_outs(states))
                    logic.budgets_published(states)
                    log.info("budget_states_published", budgets=[(s.budget_id, s.status) for s in states])
                return len(states)
            except Exception as exc:
                self.metrics.budget_publish_failures.inc()
                log.warning("budget_publish_failed", error_type=type(exc).__name__, error=str(exc)[:500])
                return 0

    async def _on_usage(self, batch: Sequence[Decoded[UsageRecord]], _ctx: BatchContext) -> list[Out]:
        events = await self.logic.handle([d.value for d in batch])
        await self.publish_budgets()
        return cost_outs(events)

    async def _on_audits(self, batch: Sequence[Decoded[AuditRecord]], _ctx: BatchContext) -> list[Out]:
        """Judged audits go next to the cost events, so `frugalstream report` shows their estimates."""
        await asyncio.to_thread(add_audits, self.ledger, [d.value for d in batch])
        return []

    def register(self, broker: KafkaBroker, publisher: Publisher) -> None:
        self.publisher = publisher
        subscribe(broker, publisher, self.settings, service=f"{self.name}.audits", topic=t.AUDITS,
                  model=AuditRecord, process=self._on_audits, max_records=256, **background_options())
        subscribe(broker, publisher, self.settings, service=self.name, topic=t.USAGE, model=UsageRecord,
                  process=self._on_usage, max_records=256, **background_options())


def wire(res: Resources) -> AccountantService:
    s = res.settings
    tracker = BudgetTracker(BudgetsConfig.from_file(s.budgets_file, s.budget_action)) if s.budgets_file else None
    return AccountantService(s, Accountant(res.catalog, Ledger(s.state_dir / "ledger.sqlite"), budgets=tracker))
