"""The ledger keeps a cost event a set time after storing it, then deletes it whole; the accountant prunes on a timer.

Retention goes by when an event was stored, not by its own time: a record a producer's slow clock stamped weeks
ago is spend like any other, and a redelivery within the retention is still recognised and counted once.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from frugalstream.accountant import ledger as ledger_module
from frugalstream.accountant.app import AccountantService
from frugalstream.accountant.ledger import Ledger
from frugalstream.accountant.logic import Accountant, priced_event
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import CostEvent, CostPoint, PricedStep, TokenUsage, UsageRecord

CATALOG = PriceCatalog.load()
DAY = 86_400.0
MONTH_START = datetime(2026, 3, 1, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def event(i: int, at: float, tenant: str = "acme") -> CostEvent:
    record = UsageRecord(id=f"u{i}", request_id=f"r{i}", tenant=tenant, stage="gateway", source="llm",
                         tags={"team": "search"}, actual_model="gpt-4o-mini",
                         baseline=CostPoint(model="gpt-4o", usage=TokenUsage(input_tokens=1_000)),
                         steps=(PricedStep(strategy="routed_down", model="gpt-4o-mini",
                                           usage=TokenUsage(input_tokens=1_000)),), occurred_at=at)
    return priced_event(record, CATALOG, at)


def rows(ledger: Ledger, table: str) -> int:
    return int(ledger._query(f"SELECT COUNT(*) FROM {table}")[0][0])


def test_prune_deletes_what_was_stored_before_the_retention_with_its_savings_and_tags() -> None:
    clock = Clock(MONTH_START)
    ledger = Ledger(clock=clock)
    assert len(ledger.insert([event(1, clock.now), event(2, clock.now)])) == 2
    clock.now += 10 * DAY
    assert len(ledger.insert([event(3, clock.now)])) == 1
    clock.now += 30 * DAY
    assert ledger.prune(35 * DAY) == 2
    assert rows(ledger, "cost_events") == 1
    assert rows(ledger, "cost_tags") == 1
    assert rows(ledger, "cost_savings") > 0
    for table in ("cost_savings", "cost_tags"):  # nothing left behind of a deleted event
        assert rows(ledger, f"{table} WHERE event_id NOT IN (SELECT id FROM cost_events)") == 0
    assert ledger.breakdown("tag")[0]["requests"] == 1
    assert ledger.prune(35 * DAY) == 0


def test_prune_goes_on_chunk_by_chunk_until_nothing_old_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "PRUNE_CHUNK", 2)
    clock = Clock(MONTH_START)
    ledger = Ledger(clock=clock)
    ledger.insert([event(i, clock.now) for i in range(5)])
    clock.now += 40 * DAY
    assert ledger.prune(32 * DAY) == 5
    assert rows(ledger, "cost_events") == 0


def test_a_record_stamped_long_ago_but_stored_now_is_kept_and_a_redelivery_is_still_counted_once() -> None:
    clock = Clock(MONTH_START + 40 * DAY)
    ledger = Ledger(clock=clock)
    late = event(1, MONTH_START)  # a producer's clock 40 days behind
    assert len(ledger.insert([late])) == 1
    assert ledger.prune(32 * DAY) == 0
    clock.now += 31 * DAY
    assert ledger.insert([late]) == []  # redelivered within the retention: the ledger still knows it
    assert ledger.totals()["requests"] == 1


def test_at_the_minimum_retention_a_months_budget_still_sees_its_first_spend(tmp_path: Path) -> None:
    clock = Clock(MONTH_START)
    ledger = Ledger(tmp_path / "ledger.sqlite", clock=clock)
    ledger.insert([event(1, MONTH_START)])
    clock.now = datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    ledger.prune(Settings(ledger_retention_days=32).ledger_retention_days * DAY)  # type: ignore[operator]
    assert ledger.spent("acme", None, MONTH_START, clock.now) == pytest.approx(event(1, 0).data.actual_cost_usd)


def test_a_retention_shorter_than_a_month_is_refused() -> None:
    with pytest.raises(ValidationError, match="ledger_retention_days"):
        Settings(ledger_retention_days=31)


def test_a_ledger_written_before_retention_dates_its_rows_by_their_own_time(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    ledger = Ledger(path, clock=Clock(MONTH_START))
    ledger.insert([event(1, MONTH_START - 50 * DAY), event(2, MONTH_START)])
    ledger.close()
    with sqlite3.connect(path) as conn:  # as the file was before the column existed
        conn.execute("DROP INDEX cost_events_stored")
        conn.execute("ALTER TABLE cost_events DROP COLUMN stored_at")
    reopened = Ledger(path, clock=Clock(MONTH_START + DAY))
    assert reopened.prune(32 * DAY) == 1
    assert reopened.totals()["requests"] == 1


async def test_the_accountant_prunes_when_it_starts_with_a_retention() -> None:
    clock = Clock(MONTH_START)
    ledger = Ledger(clock=clock)
    ledger.insert([event(1, clock.now)])
    clock.now += 40 * DAY
    ledger.insert([event(2, clock.now)])
    service = AccountantService(Settings(ledger_retention_days=32), Accountant(CATALOG, ledger, clock=clock))
    await service.start()
    try:
        for _ in range(200):
            if rows(ledger, "cost_events") == 1:
                break
            await asyncio.sleep(0.01)
        assert rows(ledger, "cost_events") == 1
    finally:
        await service.stop_background()


async def test_without_a_retention_the_accountant_keeps_everything() -> None:
    clock = Clock(MONTH_START)
    ledger = Ledger(clock=clock)
    ledger.insert([event(1, clock.now)])
    clock.now += 4000 * DAY
    service = AccountantService(Settings(), Accountant(CATALOG, ledger, clock=clock))
    await service.start()
    try:
        await asyncio.sleep(0.05)
        assert rows(ledger, "cost_events") == 1
        assert service._pruner is None
    finally:
        await service.stop_background()
