"""Budgets are published reliably, roll over on time without traffic, and act per tenant (pins included)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

from frugalstream.accountant.app import AccountantService
from frugalstream.accountant.budgets import Budget, BudgetTracker
from frugalstream.accountant.ledger import Ledger
from frugalstream.accountant.logic import Accountant
from frugalstream.classifier.logic import Classifier, Refused, Routed
from frugalstream.llm.budgets import BudgetBook
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.metrics import Metrics, exposition
from frugalstream.runtime.records import Decoded, Out, Record
from frugalstream.runtime.service import BackgroundWork
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext
from frugalstream.schemas import (
    BudgetState,
    CacheControl,
    ChatMessage,
    CostPoint,
    LLMRequest,
    LLMResponse,
    RoutedRequest,
    TokenUsage,
    UsageRecord,
)
from frugalstream.schemas import topics as t

CATALOG = PriceCatalog.load()
BEFORE_MIDNIGHT = datetime(2026, 3, 14, 23, 50, tzinfo=UTC).timestamp()
AFTER_MIDNIGHT = datetime(2026, 3, 15, 0, 0, 30, tzinfo=UTC).timestamp()


class FlakyPublisher:
    """Fails the first `failures` publishes, then records what it publishes."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.published: list[Out] = []

    async def publish_all(self, outs: Sequence[Out]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("broker unavailable")
        self.published.extend(outs)

    def states(self) -> list[tuple[str, str, str]]:
        return [(s.tenant, s.status, s.period_start) for o in self.published
                if o.topic == t.BUDGETS and isinstance(s := o.value, BudgetState)]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def usage(i: int, tenant: str, at: float, model: str = "gpt-4o") -> Decoded[UsageRecord]:
    rec = UsageRecord(id=f"u{i}", request_id=f"r{i}", tenant=tenant, stage="gateway", source="llm",
                      baseline=CostPoint(model=model, usage=TokenUsage(input_tokens=100_000)), occurred_at=at)
    return Decoded(Record(t.USAGE, 0, i, None, b"", ()), rec)


def accountant(publisher: FlakyPublisher, clock: Clock, *budgets: Budget, tick_s: float = 60.0,
               metrics: Metrics | None = None) -> AccountantService:
    settings, metrics = Settings(budget_tick_s=tick_s), metrics or Metrics()
    logic = Accountant(CATALOG, Ledger(), budgets=BudgetTracker(budgets), clock=clock, metrics=metrics)
    return AccountantService(settings, logic, publisher=publisher, metrics=metrics)


REFUSE_ACME = Budget(tenant="acme", period="day", limit_usd=0.1, action="refuse")


async def test_a_failed_budget_publish_is_published_by_the_next_evaluation() -> None:
    publisher, metrics = FlakyPublisher(failures=1), Metrics()
    svc = accountant(publisher, Clock(BEFORE_MIDNIGHT), REFUSE_ACME, metrics=metrics)
    outs = await svc._on_usage([usage(1, "acme", BEFORE_MIDNIGHT)], BatchContext())  # $0.25: over; the publish fails
    assert [o.topic for o in outs] == [t.COST_EVENTS], "the usage itself is still priced and published"
    assert publisher.states() == []
    assert "frugal_budget_publish_failures_total 1.0" in exposition(metrics)
    assert await svc.publish_budgets() == 1  # the next tick
    assert publisher.states() == [("acme", "over", "2026-03-14T00:00:00Z")]
    assert await svc.publish_budgets() == 0, "published once acknowledged, not again"


async def test_failed_publish_is_retried_by_the_next_usage_batch_too() -> None:
    publisher = FlakyPublisher(failures=1)
    svc = accountant(publisher, Clock(BEFORE_MIDNIGHT), REFUSE_ACME)
    await svc._on_usage([usage(1, "acme", BEFORE_MIDNIGHT)], BatchContext())
    await svc._on_usage([usage(2, "acme", BEFORE_MIDNIGHT)], BatchContext())
    assert publisher.states() == [("acme", "over", "2026-03-14T00:00:00Z")]


async def test_period_rolls_over_without_traffic_and_the_tenant_is_served_again() -> None:
    publisher, clock = FlakyPublisher(), Clock(BEFORE_MIDNIGHT)
    svc = accountant(publisher, clock, REFUSE_ACME)
    await svc._on_usage([usage(1, "acme", BEFORE_MIDNIGHT)], BatchContext())
    classifier = Classifier(Settings(), TokenCounter(), budgets=BudgetBook(clock=clock), catalog=CATALOG)
    for state in (o.value for o in publisher.published if isinstance(o.value, BudgetState)):
        classifier.budgets.update(state)
    ask = LLMRequest(id="q1", tenant="acme", messages=(ChatMessage(role="user", content="hours?"),))
    [refused] = await classifier.handle([ask])  # only a free answer (cache, a twin in flight) may serve it
    assert isinstance(refused, Routed) and refused.routed.route.refused_by_budget is not None
    no_cache = ask.model_copy(update={"id": "q0", "cache": CacheControl(policy="no-cache")})
    [uncached] = await classifier.handle([no_cache])
    assert isinstance(uncached, Refused) and uncached.response.error is not None
    assert uncached.response.error.code == "budget_exceeded"
    assert await svc.publish_budgets() == 0  # a tick before midnight: nothing changed
    clock.now = AFTER_MIDNIGHT
    assert await svc.publish_budgets() == 1  # the tick after midnight, with no new usage at all
    assert publisher.states()[-1] == ("acme", "ok", "2026-03-15T00:00:00Z")
    classifier.budgets.update(publisher.published[-1].value)  # type: ignore[arg-type]
    [served] = await classifier.handle([ask.model_copy(update={"id": "q2"})])
    assert isinstance(served, Routed) and served.routed.route.refused_by_budget is None


async def test_the_timer_runs_in_the_background_and_stops() -> None:
    publisher, clock = FlakyPublisher(failures=1), Clock(BEFORE_MIDNIGHT)
    svc = accountant(publisher, clock, REFUSE_ACME, tick_s=0.01)
    assert isinstance(svc, BackgroundWork)
    await svc.start()
    try:
        for _ in range(200):  # the first tick fails, a later one succeeds: the task survived the failure
            if publisher.states():
                break
            await asyncio.sleep(0.01)
        assert publisher.states() == [("acme", "ok", "2026-03-14T00:00:00Z")]
        clock.now = AFTER_MIDNIGHT
        for _ in range(200):
            if len(publisher.states()) == 2:
                break
            await asyncio.sleep(0.01)
        assert publisher.states()[-1] == ("acme", "ok", "2026-03-15T00:00:00Z")
    finally:
        await svc.stop_background()
    assert svc._ticker is None
    count = len(publisher.published)
    clock.now += 86400
    await asyncio.sleep(0.05)
    assert len(publisher.published) == count, "no tick after stop_background"


async def test_budgets_are_per_tenant_and_act_on_pins() -> None:
    publisher, clock = FlakyPublisher(), Clock(BEFORE_MIDNIGHT)
    svc = accountant(publisher, clock, REFUSE_ACME, Budget(tenant="globex", period="day", limit_usd=100),
                     Budget(tenant="initech", period="day", limit_usd=0.1, action="downgrade"))
    await svc._on_usage([usage(1, "acme", BEFORE_MIDNIGHT), usage(2, "globex", BEFORE_MIDNIGHT),
                         usage(3, "initech", BEFORE_MIDNIGHT)], BatchContext())
    assert sorted(s[:2] for s in publisher.states()) == [("acme", "over"), ("globex", "ok"), ("initech", "over")]
    classifier = Classifier(Settings(), TokenCounter(), budgets=BudgetBook(clock=clock), catalog=CATALOG)
    for out in publisher.published:
        classifier.budgets.update(out.value)  # type: ignore[arg-type]

    def pinned(rid: str, tenant: str) -> LLMRequest:
        return LLMRequest(id=rid, tenant=tenant, model="gpt-4o",
                          messages=(ChatMessage(role="user", content="Write a long essay."),))

    results = await classifier.handle([pinned("a", "acme"), pinned("g", "globex"), pinned("i", "initech")])
    by_id: dict[str, LLMResponse | RoutedRequest] = {}
    for r in results:
        if isinstance(r, Refused):
            by_id[r.request.id] = r.response
        else:
            by_id[r.routed.request.id] = r.routed
    refused, served, downgraded = by_id["a"], by_id["g"], by_id["i"]
    # Refused spend keeps its pin: only a free answer to the pinned model may serve it.
    assert isinstance(refused, RoutedRequest)
    assert refused.route.refused_by_budget == "budget acme/*/day is over its limit"
    assert refused.route.model == "gpt-4o" and refused.route.pinned and not refused.route.downgraded_by_budget
    assert isinstance(served, RoutedRequest) and served.route.model == "gpt-4o" and served.route.pinned
    assert not served.route.downgraded_by_budget
    assert isinstance(downgraded, RoutedRequest) and downgraded.route.downgraded_by_budget
    assert downgraded.route.tier == "small" and not downgraded.route.pinned


async def test_unpriced_usage_is_billed_into_the_budget_and_counted() -> None:
    publisher, metrics = FlakyPublisher(), Metrics()
    svc = accountant(publisher, Clock(BEFORE_MIDNIGHT), REFUSE_ACME, metrics=metrics)
    outs = await svc._on_usage([usage(1, "acme", BEFORE_MIDNIGHT, model="o3-pro")], BatchContext())
    [event] = [o.value for o in outs if o.topic == t.COST_EVENTS]
    assert event.data.price_unknown and event.data.unpriced_models == ("o3-pro",)  # type: ignore[union-attr]
    assert svc.ledger.totals()["unpriced_requests"] == 1
    assert publisher.states() == [("acme", "over", "2026-03-14T00:00:00Z")]  # 100k tokens at the top rate
    assert 'frugal_unpriced_usage_total{model="o3-pro"} 1.0' in exposition(metrics)
