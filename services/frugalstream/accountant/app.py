"""Accountant service: `llm.usage` -> ledger + `llm.cost-events`, and budget states to `llm.budgets`.

Per batch: price every record (a model the catalog lacks at its highest rates, flagged, never dropped), write
the new ones to the SQLite ledger (idempotent by CloudEvents id), then publish every event (redeliveries too:
the ids are deterministic, so downstream deduplicates); offsets are committed after that.

Budget states are published by the accountant itself, under one lock: evaluate, publish, and only then mark
them published. A failed publish leaves them pending for the next evaluation, which comes with the next batch
or, without traffic, from a timer every `budget_tick_s`, so a period rolls over on time (a refused tenant is
served again after midnight UTC even if it sends nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from faststream.kafka import KafkaBroker

from frugalstream.accountant.budgets import BudgetsConfig, BudgetTracker
from frugalstream.accountant.ledger import Ledger
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import cost_event
from frugalstream.resources import Resources
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.metrics import METRICS, Metrics
from frugalstream.runtime.records import Decoded, Out
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext, subscribe
from frugalstream.schemas import CostEvent, UsageRecord
from frugalstream.schemas import topics as t

log = get_logger(__name__)


class StatePublisher(Protocol):
    """What budget publishing needs from `Publisher` (a fake in tests)."""

    async def publish_all(self, outs: Sequence[Out]) -> None: ...


@dataclass
class AccountantService:
    settings: Settings
    catalog: PriceCatalog
    ledger: Ledger
    budgets: BudgetTracker | None = None
    name: str = "accountant"
    priced: int = field(default=0)
    clock: Callable[[], float] = time.time
    metrics: Metrics = METRICS
    publisher: StatePublisher | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _ticker: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self) -> None:
        if self.budgets is not None and self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_forever(), name="accountant-budget-ticker")

    async def stop(self) -> None:
        await self.stop_background()
        await asyncio.to_thread(self.ledger.close)

    async def stop_background(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.budget_tick_s)
            await self.publish_budgets()

    async def publish_budgets(self) -> int:
        """Publishes the budget states that differ from the last published ones; never raises (a failure is
        logged, counted, and left pending for the next call). Returns how many were published."""
        if self.budgets is None or self.publisher is None:
            return 0
        tracker, publisher = self.budgets, self.publisher
        async with self._lock:
            try:
                states = await asyncio.to_thread(tracker.pending, self.ledger, self.clock())
                if states:
                    await publisher.publish_all([Out(t.BUDGETS, s, key=s.budget_id) for s in states])
                    tracker.mark_published(states)
                    log.info("budget_states_published", budgets=[(s.budget_id, s.status) for s in states])
                return len(states)
            except Exception as exc:
                self.metrics.budget_publish_failures.inc()
                log.warning("budget_publish_failed", error_type=type(exc).__name__, error=str(exc)[:500])
                return 0

    async def _on_usage(self, batch: Sequence[Decoded[UsageRecord]], _ctx: BatchContext) -> list[Out]:
        events: list[CostEvent] = [cost_event(d.value, self.catalog) for d in batch]
        await asyncio.to_thread(self.ledger.add_many, events)
        self.priced += len(events)
        for e in events:
            if e.data.price_unknown:
                self.metrics.record_unpriced(e.data.unpriced_models)
                log.warning("unpriced_usage", models=list(e.data.unpriced_models), tenant=e.data.tenant,
                            usage_id=e.data.usage_id)
        await self.publish_budgets()
        return [Out(t.COST_EVENTS, e, key=e.subject) for e in events]

    def register(self, broker: KafkaBroker, publisher: Publisher) -> None:
        self.publisher = publisher
        subscribe(broker, publisher, self.settings, service=self.name, topic=t.USAGE, model=UsageRecord,
                  process=self._on_usage, max_records=256)


def wire(res: Resources) -> AccountantService:
    s = res.settings
    tracker = BudgetTracker(BudgetsConfig.from_file(s.budgets_file)) if s.budgets_file else None
    return AccountantService(s, res.catalog, Ledger(s.state_dir / "ledger.sqlite"), budgets=tracker)
