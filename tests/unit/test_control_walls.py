"""The control topics (`llm.budgets`, `llm.thresholds`) and the spend behind budgets, against a careless producer
and a clock that steps: no record may freeze a tenant's state, refuse it for ever, or set a threshold outside its
knob's range."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from frugalstream.accountant.budgets import Budget, BudgetTracker
from frugalstream.accountant.ledger import Ledger
from frugalstream.accountant.logic import Accountant
from frugalstream.audit.controller import ThresholdController
from frugalstream.audit.logic import Auditor
from frugalstream.dedupe.wiring import semantic_policy
from frugalstream.llm.audits import audit_id
from frugalstream.llm.budgets import BudgetBook
from frugalstream.llm.judges import MatchJudge
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.thresholds import ThresholdBook
from frugalstream.runtime.messaging import decode
from frugalstream.runtime.records import Record
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import BudgetState, UsageRecord
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import KNOB_BOUNDS, AuditAnswer, AuditRequest, ThresholdChange

DAY = 86_400.0
NOW = 1_796_100_000.0  # 2026-12-01T... UTC
SETTINGS = Settings(audit_rate=1.0, audit_judges={"default": "match"}, semantic_verifier="features")


def change(value: float, changed_at: float, tenant: str = "acme") -> ThresholdChange:
    return ThresholdChange(tenant=tenant, task_type="faq", knob="semantic_verify", value=value, previous=0.9,
                           reason="evidence", target=0.95, n=50, estimate=0.96, low=0.9, high=0.99,
                           changed_at=changed_at)


def with_literal(body: dict[str, object], field: str, literal: str) -> bytes:
    """`body` as JSON bytes with `field` replaced by a raw JSON literal (NaN, Infinity, a number)."""
    return json.dumps({**body, field: "VALUE"}).replace('"VALUE"', literal).encode()


def decoded(topic: str, values: list[bytes], model: type[ThresholdChange] | type[BudgetState]) -> tuple[int, int]:
    good, bad = decode([Record(topic, 0, i, b"k", v, ()) for i, v in enumerate(values)], model,
                       max_bytes=1_000_000)
    return len(good), len(bad)


def budget_state(status: str, action: str, updated_at: float, start: str = "2026-12-01T00:00:00Z",
                 period: str = "day") -> BudgetState:
    return BudgetState.model_validate({
        "budget_id": f"acme/*/{period}", "tenant": "acme", "period": period, "period_start": start,
        "limit_usd": 1.0, "spent_usd": 2.0 if status == "over" else 0.0, "status": status, "action": action,
        "updated_at": updated_at})


# --- thresholds -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "literal"), [("value", "NaN"), ("value", "Infinity"), ("value", "-1.0"),
                                                ("value", "0.0"), ("value", "0.1"), ("changed_at", "NaN"),
                                                ("changed_at", "Infinity"), ("estimate", "NaN")])
def test_a_threshold_record_outside_its_knobs_range_or_not_finite_is_a_dead_letter(field: str, literal: str) -> None:
    """At or below the semantic floor every nearest neighbour would be served as a hit; NaN turns the cache off
    silently, and a NaN stamp compares false against every later change."""
    body = change(0.95, NOW).model_dump(mode="json")
    assert decoded(t.THRESHOLDS, [with_literal(body, field, literal)], ThresholdChange) == (0, 1)
    assert decoded(t.THRESHOLDS, [json.dumps(body).encode()], ThresholdChange) == (1, 0)


def test_dedupe_never_serves_at_a_threshold_below_the_knobs_floor() -> None:
    lo, hi = KNOB_BOUNDS["semantic_verify"]
    book = ThresholdBook(clock=lambda: NOW)
    with pytest.raises(ValueError, match="semantic_verify"):
        change(lo - 0.01, NOW)
    book.update(change(lo, NOW))
    assert lo <= semantic_policy(SETTINGS, book).threshold("faq", "acme") <= hi


def test_a_threshold_change_stamped_in_milliseconds_does_not_freeze_the_threshold() -> None:
    book = ThresholdBook(clock=lambda: NOW)
    book.update(change(0.5, NOW * 1000))  # a careless producer's milliseconds
    book.update(change(0.93, NOW + 60))  # the controller's next move
    assert book.get("acme", "faq", "semantic_verify") == 0.93


async def test_a_tightening_decided_with_a_lagging_clock_still_takes_effect() -> None:
    """The value held was stamped by an instance whose clock ran 10 minutes ahead; this one's is behind. Its
    tightening must still outrank the held value, in its own book and in every reader's."""
    held = change(0.9, NOW + 600)
    auditor = Auditor(SETTINGS, {"match": MatchJudge()},
                      controller=ThresholdController(min_evidence=SETTINGS.audit_min_evidence, clock=lambda: NOW),
                      book=ThresholdBook(clock=lambda: NOW))
    auditor.book.update(held)
    audits = [AuditRequest(audit_id=audit_id("acme", f"r{i}", "cache_semantic"), tenant="acme", request_id=f"r{i}",
                           kind="cache_semantic", task_type="faq", question="q", score=0.95, threshold=0.9,
                           rule="verifier", candidate=AuditAnswer(content="Lyon"),
                           reference=AuditAnswer(content="Paris"), sampled_at=1.0) for i in range(3)]
    _records, changes = await auditor.judge(audits)
    assert changes and changes[0].reason == "bound_broken" and changes[0].value > 0.95
    reader = ThresholdBook(clock=lambda: NOW)
    for c in (held, *changes):
        reader.update(c)
    assert reader.get("acme", "faq", "semantic_verify") == changes[0].value
    assert auditor.book.get("acme", "faq", "semantic_verify") == changes[0].value


# --- budgets ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "literal"), [("updated_at", "NaN"), ("updated_at", "Infinity"),
                                                ("spent_usd", "NaN"), ("period_start", '"yesterday"')])
def test_a_budget_state_with_a_non_finite_number_or_no_time_is_a_dead_letter(field: str, literal: str) -> None:
    body = budget_state("over", "refuse", NOW).model_dump(mode="json")
    assert decoded(t.BUDGETS, [with_literal(body, field, literal)], BudgetState) == (0, 1)
    assert decoded(t.BUDGETS, [json.dumps(body).encode()], BudgetState) == (1, 0)


def test_a_later_budget_state_wins_whatever_its_stamp() -> None:
    """A state stamped in milliseconds (or by a clock that ran ahead) must not hide the accountant's next one."""
    book = BudgetBook(clock=lambda: NOW)
    book.update(budget_state("over", "refuse", NOW * 1000))
    book.update(budget_state("ok", "none", NOW + 60))
    assert book.verdict("acme", {}) is None
    book.update(budget_state("over", "refuse", NOW - 3600))  # a clock behind: still the latest decision
    assert book.verdict("acme", {}) is not None


def test_a_budget_state_speaks_only_for_its_period() -> None:
    """An operator replaces a refusing daily budget by a monthly one: the old id is never published again, and
    its `over/refuse` must stop refusing when its day ends."""
    start = datetime.fromtimestamp(NOW, UTC).strftime("%Y-%m-%dT00:00:00Z")
    clock = [NOW]
    book = BudgetBook(clock=lambda: clock[0])
    book.update(budget_state("over", "refuse", NOW, start=start))
    assert book.verdict("acme", {}) is not None
    clock[0] = NOW + DAY
    assert book.verdict("acme", {}) is None
    month = budget_state("over", "refuse", NOW, start=start[:8] + "01T00:00:00Z", period="month")
    book.update(month)
    assert book.verdict("acme", {}) is not None  # a month outlives the day
    clock[0] = month.ends_at()
    assert book.verdict("acme", {}) is None


async def test_usage_stamped_far_in_the_future_is_not_charged_to_every_later_period() -> None:
    """A stage with a broken clock (year 2100) must not keep the tenant over its daily budget until 2100."""
    now = time.time()
    clock = [now]
    tracker = BudgetTracker([Budget(tenant="acme", period="day", limit_usd=1.0, action="refuse")])
    acc = Accountant(PriceCatalog.load(), Ledger(":memory:"), budgets=tracker, clock=lambda: clock[0])
    future = UsageRecord.model_validate({
        "id": "u-r1", "request_id": "r1", "tenant": "acme", "stage": "gateway", "source": "llm",
        "baseline": {"model": "gpt-4o", "usage": {"input_tokens": 1_000_000, "output_tokens": 100_000}},
        "occurred_at": 4_102_444_800.0})
    await acc.handle([future])
    clock[0] = now + 3 * DAY
    (state,) = await acc.budget_changes()
    assert state.status == "ok", state


async def test_spend_stamped_in_the_next_period_is_not_charged_to_this_one() -> None:
    """A stage's clock a minute ahead (within the skew the accountant accepts) stamps usage just past midnight
    while the accountant's day has not ended: it is tomorrow's spend, and today's budget must not count it."""
    midnight = (NOW // DAY + 1) * DAY
    clock = [midnight - 60.0]
    tracker = BudgetTracker([Budget(tenant="acme", period="day", limit_usd=1.0, action="refuse")])
    acc = Accountant(PriceCatalog.load(), Ledger(":memory:"), budgets=tracker, clock=lambda: clock[0])
    ahead = UsageRecord.model_validate({
        "id": "u-r1", "request_id": "r1", "tenant": "acme", "stage": "gateway", "source": "llm",
        "baseline": {"model": "gpt-4o", "usage": {"input_tokens": 1_000_000, "output_tokens": 100_000}},
        "occurred_at": midnight + 30.0})
    await acc.handle([ahead])
    states = await acc.budget_changes()
    assert all(state.status == "ok" for state in states), states


@pytest.mark.parametrize(("period", "start"), [("month", "2026-01-31T00:00:00Z"), ("month", "9999-12-01T00:00:00Z"),
                                               ("day", "9999-12-31T00:00:00Z"), ("day", "2026-12-01T12:00:00Z")])
def test_a_budget_state_whose_period_is_no_period_is_a_dead_letter(period: str, start: str) -> None:
    """A month from the 31st, or a period ending in year 10000, has no computable end: it could never expire,
    and computing it raised inside every decision that read the state (the classifier's whole batch failed)."""
    raw = json.dumps({"budget_id": "acme/*/x", "tenant": "acme", "period": period, "period_start": start,
                      "limit_usd": 1.0, "spent_usd": 2.0, "status": "over", "action": "refuse",
                      "updated_at": NOW}).encode()
    assert decoded(t.BUDGETS, [raw], BudgetState) == (0, 1)
    book = BudgetBook(clock=lambda: NOW)
    book.update(budget_state("over", "refuse", NOW, start="2026-12-01T00:00:00Z"))
    assert book.verdict("acme", {}) is not None  # the control: a real period still decides
