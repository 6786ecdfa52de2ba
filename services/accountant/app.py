"""Accountant service: `llm.usage` -> ledger + `llm.cost-events`, and budget states to `llm.budgets`.

Per batch: price every record, write the new ones to the SQLite ledger (idempotent by CloudEvents id), then
publish every event (redeliveries too: the ids are deterministic, so downstream deduplicates) and any budget
state that changed; offsets are committed after that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from faststream.kafka import KafkaBroker

from schemas import CostEvent, UsageRecord
from schemas import topics as t
from services.accountant.budgets import BudgetTracker
from services.accountant.ledger import Ledger
from services.accountant.pricing import cost_event
from services.core.logging import get_logger
from services.core.messaging import Decoded, Out, Publisher
from services.core.prices import PriceCatalog
from services.core.settings import Settings
from services.core.stage import subscribe

log = get_logger(__name__)


@dataclass
class AccountantService:
    settings: Settings
    catalog: PriceCatalog
    ledger: Ledger
    budgets: BudgetTracker | None = None
    name: str = "accountant"
    priced: int = field(default=0)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await asyncio.to_thread(self.ledger.close)

    async def _on_usage(self, batch: Sequence[Decoded[UsageRecord]]) -> list[Out]:
        # An unknown model raises here, before any ledger write; the stage then retries record by record and
        # dead-letters only the record the catalog cannot price.
        events: list[CostEvent] = [cost_event(d.value, self.catalog) for d in batch]
        await asyncio.to_thread(self.ledger.add_many, events)
        self.priced += len(events)
        outs = [Out(t.COST_EVENTS, e, key=e.subject) for e in events]
        if self.budgets is not None:
            states = await asyncio.to_thread(self.budgets.evaluate, self.ledger, time.time())
            outs.extend(Out(t.BUDGETS, s, key=s.budget_id) for s in states)
        return outs

    def register(self, broker: KafkaBroker, publisher: Publisher) -> None:
        subscribe(broker, publisher, self.settings, service=self.name, topic=t.USAGE, model=UsageRecord,
                  process=self._on_usage, max_records=256)
