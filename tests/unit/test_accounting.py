"""Cost accounting end to end without Kafka: pricing -> ledger -> budgets -> reports (and metrics)."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frugalstream.accountant.budgets import Budget, BudgetsConfig, BudgetTracker
from frugalstream.accountant.ledger import Ledger
from frugalstream.accountant.report import build_report, render
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import cost_event, event_id, price_chain, price_usage
from frugalstream.runtime.metrics import Metrics, exposition
from frugalstream.schemas import STRATEGIES, BudgetState, CostPoint, PricedStep, TokenUsage, UsageRecord

CATALOG = PriceCatalog.load()
T0 = 1_760_000_400.0  # a multiple of 3600: 2025-10-09T09:00:00Z
FAR = T0 + 86_400.0  # an upper bound past every event of these tests
M = 1_000_000

tokens = st.integers(min_value=0, max_value=3 * M)
usages = st.builds(TokenUsage, input_tokens=tokens, cached_input_tokens=tokens, cache_write_tokens=tokens,
                   output_tokens=tokens, reasoning_tokens=tokens, estimated=st.booleans())
models = st.sampled_from(CATALOG.models)
steps = st.builds(PricedStep, model=models, usage=usages, batch=st.booleans(), strategy=st.sampled_from(STRATEGIES))


@st.composite
def records(draw: st.DrawFn) -> list[UsageRecord]:
    n = draw(st.integers(min_value=1, max_value=12))
    return [UsageRecord(
        id=f"usage-{i}", request_id=f"req-{i}", tenant=draw(st.sampled_from(["acme", "globex"])),
        stage=draw(st.sampled_from(["dedupe", "gateway", "summarizer"])), source="llm",
        tags=draw(st.sampled_from([{}, {"team": "search"}, {"team": "ads", "env": "prod"}])),
        baseline=CostPoint(model=draw(models), usage=draw(usages)),
        steps=tuple(draw(st.lists(steps, max_size=4))), items=draw(st.integers(min_value=1, max_value=5)),
        occurred_at=T0 + draw(st.integers(min_value=0, max_value=40 * 86400)),
    ) for i in range(n)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recs=records(), dup_picks=st.lists(st.integers(min_value=0, max_value=100), max_size=10),
       order=st.randoms(use_true_random=False))
def test_savings_reconcile_and_duplicates_change_nothing(recs: list[UsageRecord], dup_picks: list[int],
                                                         order: random.Random) -> None:
    expected_base = expected_act = Decimal(0)
    for rec in recs:
        chain = price_chain(rec, CATALOG)
        assert chain.baseline - chain.actual == sum(chain.savings.values(), Decimal(0))  # exact
        data = price_usage(rec, CATALOG)
        assert abs(data.baseline_cost_usd - data.actual_cost_usd - sum(data.savings_by_strategy.values())) < 1e-9
        assert data.saved_usd == pytest.approx(data.baseline_cost_usd - data.actual_cost_usd, abs=1e-9)
        assert set(data.savings_by_strategy) == {s.strategy for s in rec.steps}
        points = (rec.baseline, *rec.steps)
        assert data.estimated == points[-1].usage.estimated  # the billed usage only
        assert data.baseline_estimated == any(p.usage.estimated for p in (points[:-1] or points))
        expected_base += chain.baseline
        expected_act += chain.actual
    events = [cost_event(r, CATALOG) for r in recs]
    stream = events + [events[i % len(events)] for i in dup_picks]
    order.shuffle(stream)
    with Ledger() as ledger:
        assert sum(ledger.add(e) for e in stream) == len(recs)
        totals = ledger.totals()
        assert totals["requests"] == len(recs) and totals["items"] == sum(r.items for r in recs)
        saved = totals["baseline_cost_usd"] - totals["actual_cost_usd"]
        assert abs(saved - sum(totals["by_strategy"].values())) < 1e-9
        assert abs(saved - totals["saved_usd"]) < 1e-9
        slack = 1e-10 * len(recs) + 1e-9
        assert abs(Decimal(repr(totals["baseline_cost_usd"])) - expected_base) < Decimal(repr(slack))
        assert abs(Decimal(repr(totals["actual_cost_usd"])) - expected_act) < Decimal(repr(slack))
        by_tenant = ledger.breakdown("tenant")
        assert sum(r["requests"] for r in by_tenant) == len(recs)
        assert abs(sum(r["actual_cost_usd"] for r in by_tenant) - totals["actual_cost_usd"]) < 1e-9
        before = (totals, ledger.breakdown("strategy"), ledger.breakdown("tag"), ledger.timeseries(86400))
        assert ledger.add_many(stream) == 0
        after = (ledger.totals(), ledger.breakdown("strategy"), ledger.breakdown("tag"), ledger.timeseries(86400))
        assert before == after


def rec(i: int, tenant: str, base: CostPoint, *chain: PricedStep, at: float = T0, source: str = "llm",
        tags: dict[str, str] | None = None) -> UsageRecord:
    return UsageRecord.model_validate(dict(
        id=f"u{i}", request_id=f"r{i}", tenant=tenant, stage="gateway", source=source, tags=tags or {},
        baseline=base, steps=chain, occurred_at=at, task_type="faq"))


def point(model: str, **kw: int) -> CostPoint:
    return CostPoint(model=model, usage=TokenUsage(**kw))


def step(strategy: str, model: str, batch: bool = False, **kw: int) -> PricedStep:
    return PricedStep.model_validate(dict(strategy=strategy, model=model, usage=TokenUsage(**kw), batch=batch))


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    led = Ledger()
    for r in (
        # $2.50 -> $0.15 by routing down: saves $2.35.
        rec(1, "acme", point("gpt-4o", input_tokens=M), step("routed_down", "gpt-4o-mini", input_tokens=M),
            tags={"team": "search"}),
        # $10 -> $0 served from the exact cache.
        rec(2, "globex", point("gpt-4o", output_tokens=M), step("cache_exact", "gpt-4o"), at=T0 + 3600,
            source="cache_exact", tags={"team": "ads"}),
        # $3 (1.5M x $2 on gpt-4.1), nothing saved.
        rec(3, "acme", point("gpt-4.1", input_tokens=3 * M // 2), at=T0 + 3 * 3600),
    ):
        assert led.add(cost_event(r, CATALOG))
    yield led
    led.close()


def test_cost_event_is_deterministic() -> None:
    r = rec(7, "acme", point("gpt-4o", input_tokens=10), at=T0 + 0.25)
    a, b = cost_event(r, CATALOG), cost_event(r, CATALOG)
    assert a == b and a.id == event_id("u7") and re.fullmatch(r"[0-9a-f]{32}", a.id)
    assert a.subject == "acme" and a.time == "2025-10-09T09:00:00.250000Z"
    assert datetime.fromisoformat(a.time).timestamp() == T0 + 0.25
    assert a.data.catalog_version == CATALOG.version and a.data.model == "gpt-4o"
    assert not a.data.price_unknown and a.data.unpriced_models == ()


def test_strategy_appearing_twice_is_summed() -> None:
    r = rec(9, "acme", point("gpt-4o", input_tokens=M, output_tokens=M),
            step("context_trim", "gpt-4o", input_tokens=M // 2, output_tokens=M),   # 12.50 -> 11.25
            step("routed_down", "gpt-4o-mini", input_tokens=M // 2, output_tokens=M),  # -> 0.675
            step("context_trim", "gpt-4o-mini", input_tokens=0, output_tokens=M))  # -> 0.60
    data = price_usage(r, CATALOG)
    assert data.savings_by_strategy == {"context_trim": 1.325, "routed_down": 10.575}
    assert (data.baseline_cost_usd, data.actual_cost_usd, data.saved_usd) == (12.5, 0.6, 11.9)


def test_ledger_totals_and_breakdowns(ledger: Ledger) -> None:
    t = ledger.totals()
    assert (t["requests"], t["baseline_cost_usd"], t["actual_cost_usd"], t["saved_usd"]) == (3, 15.5, 3.15, 12.35)
    assert t["by_strategy"] == {"cache_exact": 10.0, "routed_down": 2.35}
    assert t["savings_pct"] == pytest.approx(100 * 12.35 / 15.5)
    assert [(r["tenant"], r["actual_cost_usd"], r["baseline_cost_usd"]) for r in ledger.breakdown("tenant")] == [
        ("acme", 3.15, 5.5), ("globex", 0.0, 10.0)]
    assert [r["model"] for r in ledger.breakdown("model")] == ["gpt-4.1", "gpt-4o-mini", "(none)"]
    assert [(r["strategy"], r["saved_usd"]) for r in ledger.breakdown("strategy")] == [
        ("cache_exact", 10.0), ("routed_down", 2.35)]
    assert {r["tag"]: r["requests"] for r in ledger.breakdown("tag")} == {"team=search": 1, "team=ads": 1, "(none)": 1}
    assert [r["task"] for r in ledger.breakdown("task")] == ["faq"]
    assert ledger.totals(since=T0 + 1)["requests"] == 2


def test_timeseries_fills_gaps(ledger: Ledger) -> None:
    series = ledger.timeseries(3600)
    assert [s["t"] for s in series] == [T0, T0 + 3600, T0 + 7200, T0 + 10800]
    assert [s["actual_cost_usd"] for s in series] == [0.15, 0.0, 0.0, 3.0]
    assert series[2]["requests"] == 0 and series[1]["baseline_cost_usd"] == 10.0


def test_spent_for_budgets(ledger: Ledger) -> None:
    assert ledger.spent("acme", None, T0, FAR) == 3.15
    assert ledger.spent("acme", "team=search", T0, FAR) == 0.15
    assert ledger.spent("acme", None, T0 + 1, FAR) == 3.0
    assert ledger.spent("globex", None, T0, FAR) == 0.0


def test_file_ledger_is_wal_and_idempotent_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    event = cost_event(rec(1, "acme", point("gpt-4o", input_tokens=M)), CATALOG)
    with Ledger(path) as led:
        assert led.add(event)
    with Ledger(path) as led:
        assert not led.add(event)
        assert led.totals()["baseline_cost_usd"] == 2.5
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


class FakeSpend:
    def __init__(self) -> None:
        self.amount = 0.0
        self.calls: list[tuple[str, str | None, float]] = []

    def spent(self, tenant: str, tag: str | None, since: float, until: float) -> float:
        self.calls.append((tenant, tag, since))
        return self.amount


def test_budget_states_near_and_over() -> None:
    now = datetime(2025, 3, 15, 13, 30, tzinfo=UTC).timestamp()
    tracker = BudgetTracker([
        Budget(tenant="acme", period="month", limit_usd=10, action="refuse"),
        Budget(tenant="acme", tag="team=ads", period="day", limit_usd=10, near_pct=50),
    ])
    spend = FakeSpend()

    def published(at: float, **kw: bool) -> list[BudgetState]:
        states = tracker.pending(spend, at, **kw)
        tracker.mark_published(states)
        return states

    first = published(now)
    assert [(s.status, s.action) for s in first] == [("ok", "none"), ("ok", "none")]
    assert [s.period_start for s in first] == ["2025-03-01T00:00:00Z", "2025-03-15T00:00:00Z"]
    assert spend.calls[1] == ("acme", "team=ads", datetime(2025, 3, 15, tzinfo=UTC).timestamp())
    assert published(now) == []  # nothing changed
    spend.amount = 6.0
    assert [(s.budget_id, s.status, s.action) for s in published(now)] == [
        ("acme/team=ads/day", "near", "downgrade")]
    spend.amount = 8.5
    assert [(s.status, s.action) for s in published(now)] == [("near", "none")]  # refuse: no downgrade
    spend.amount = 12.0
    states = published(now, only_changed=False)
    assert [(s.status, s.action, s.spent_usd) for s in states] == [
        ("over", "refuse", 12.0), ("over", "downgrade", 12.0)]
    spend.amount = 0.0
    assert len(published(now + 86400)) == 2  # new day (and back to ok): both changed


def test_budget_against_real_ledger_and_config_file(ledger: Ledger, tmp_path: Path) -> None:
    cfg = tmp_path / "budgets.toml"
    cfg.write_text('[[budgets]]\ntenant = "acme"\nperiod = "day"\nlimit_usd = 3.5\n\n'
                   '[[budgets]]\ntenant = "acme"\ntag = "team=search"\nperiod = "day"\nlimit_usd = 1\n')
    states = BudgetTracker(BudgetsConfig.from_file(cfg)).pending(ledger, T0 + 4 * 3600)
    assert [(s.spent_usd, s.status) for s in states] == [(3.15, "near"), (0.15, "ok")]
    with pytest.raises(ValueError, match="duplicate"):
        BudgetsConfig(budgets=(Budget(tenant="a", period="day", limit_usd=1),) * 2)


def test_a_budget_that_names_no_action_takes_the_budget_action_setting(tmp_path: Path) -> None:
    from frugalstream.accountant.app import wire
    from frugalstream.resources import Resources
    from frugalstream.runtime.settings import Settings

    cfg = tmp_path / "budgets.json"
    budgets = [{"tenant": "acme", "period": "day", "limit_usd": 1},
               {"tenant": "globex", "period": "day", "limit_usd": 1, "action": "downgrade"}]
    cfg.write_text(json.dumps({"budgets": budgets}))
    actions = {}
    for default in ("downgrade", "refuse"):
        settings = Settings(budgets_file=cfg, budget_action=default, state_dir=tmp_path / default)
        tracker = wire(Resources(settings)).logic.budgets
        assert tracker is not None
        actions[default] = [(b.tenant, b.action) for b in tracker.budgets]
    assert actions == {"downgrade": [("acme", "downgrade"), ("globex", "downgrade")],
                       "refuse": [("acme", "refuse"), ("globex", "downgrade")]}, "a budget's own action wins"


def test_report_formats(ledger: Ledger) -> None:
    report = build_report(ledger, by="tenant", bucket_s=3600)
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    assert [r["tenant"] for r in rows] == ["acme", "globex", "(total)"]
    assert float(rows[-1]["actual_cost_usd"]) == sum(float(r["actual_cost_usd"]) for r in rows[:-1])
    doc = json.loads(render(report, "json"))
    assert doc["totals"]["saved_usd"] == 12.35 and len(doc["timeseries"]) == 4
    ledger.add(cost_event(rec(99, "<script>x</script>", point("gpt-4o", input_tokens=1)), CATALOG))
    html = render(build_report(ledger, by="tenant", bucket_s=3600), "html")
    svgs = re.findall(r"<svg.*?</svg>", html, re.S)
    assert len(svgs) == 2 and all(ET.fromstring(svg).tag.endswith("svg") for svg in svgs)  # well-formed
    assert "<polyline" in svgs[0] and "<rect" in svgs[1] and "cache_exact" in svgs[1]
    assert not re.search(r"<script|<link|\bsrc=|\bhref=|@import", html)  # self-contained, names escaped
    assert "&lt;script&gt;" in html
    table = render(report, "table")
    assert "globex" in table and "$12.35" in table
    strategy_rows = list(csv.DictReader(io.StringIO(render(build_report(ledger, by="strategy"), "csv"))))
    assert [r["strategy"] for r in strategy_rows] == ["cache_exact", "routed_down", "(total)"]
    with pytest.raises(ValueError):
        render(report, "pdf")  # type: ignore[arg-type]


def test_metrics_registry_and_exposition() -> None:
    metrics = Metrics()
    data = price_usage(rec(1, "acme", point("gpt-4o", input_tokens=M), step("routed_down", "gpt-4o-mini",
                                                                             input_tokens=M)), CATALOG)
    metrics.record_cost(data)
    metrics.record_response("cache_exact")
    metrics.observe_latency("gateway", 0.02)
    text = exposition(metrics)
    assert 'frugal_spend_usd_total{model="gpt-4o-mini",tenant="acme"} 0.15' in text
    assert 'frugal_saved_usd_total{strategy="routed_down",tenant="acme"} 2.35' in text
    assert 'frugal_stage_latency_seconds_count{stage="gateway"} 1.0' in text
    assert "frugal_spend_usd_total{" not in exposition(Metrics())  # a fresh registry, not the global one


# --- Spend is never dropped: a model the catalog lacks is priced at its highest rates and flagged ---------------

def _highest(kind: str) -> Decimal:
    """Independent of the code under test: the top standard rate of a kind across the shipped catalog."""
    return max(Decimal(getattr(CATALOG.rates(m).standard, kind)) for m in CATALOG.models)


def test_unpriced_model_is_priced_conservatively_and_flagged() -> None:
    data = price_usage(rec(8, "acme", point("gpt-99", input_tokens=M, output_tokens=M)), CATALOG)
    assert data.price_unknown and data.unpriced_models == ("gpt-99",)
    assert data.actual_cost_usd == float(_highest("input") + _highest("output")) > 0
    assert data.model == "gpt-99" and data.saved_usd == 0.0
    # Conservative: no catalog model would bill the same work more.
    work = {"input_tokens": M, "cached_input_tokens": M, "cache_write_tokens": M, "output_tokens": M,
            "reasoning_tokens": M}
    guess = price_usage(rec(9, "acme", point("o9-ultra", **work)), CATALOG).actual_cost_usd
    assert all(price_usage(rec(10, "acme", point(m, **work)), CATALOG).actual_cost_usd <= guess
               for m in CATALOG.models)
    # A routed-down step to an unpriced model: the chain still reconciles, the extra cost is a negative saving.
    routed = price_usage(rec(11, "acme", point("gpt-4o", input_tokens=M),
                             step("routed_down", "mystery-1", input_tokens=M)), CATALOG)
    assert routed.unpriced_models == ("mystery-1",) and routed.savings_by_strategy["routed_down"] < 0
    assert routed.baseline_cost_usd - routed.actual_cost_usd == pytest.approx(routed.savings_by_strategy["routed_down"])
    assert not price_usage(rec(12, "acme", point("gpt-4o", input_tokens=1)), CATALOG).price_unknown


def test_unpriced_spend_reaches_ledger_report_and_budgets(ledger: Ledger) -> None:
    before = ledger.spent("acme", None, T0, FAR)
    event = cost_event(rec(20, "acme", point("o3-pro", output_tokens=M), at=T0 + 60), CATALOG)
    assert ledger.add(event)
    assert ledger.spent("acme", None, T0, FAR) == pytest.approx(before + float(_highest("output")))
    assert ledger.totals()["unpriced_requests"] == 1
    assert ledger.unpriced() == [{"model": "o3-pro", "requests": 1, "actual_cost_usd": float(_highest("output"))}]
    tracker = BudgetTracker([Budget(tenant="acme", period="day", limit_usd=before + 1, action="refuse")])
    assert [s.status for s in tracker.pending(ledger, T0 + 120)] == ["over"]
    report = build_report(ledger, by="model", bucket_s=3600)
    assert json.loads(render(report, "json"))["unpriced"][0]["model"] == "o3-pro"
    assert "Models without a catalog price" in render(report, "html") and "o3-pro" in render(report, "table")
    assert "without a catalog price" not in render(build_report(Ledger()), "html")


_OLD_SCHEMA = """
CREATE TABLE cost_events (id TEXT PRIMARY KEY, usage_id TEXT NOT NULL, request_id TEXT NOT NULL,
    tenant TEXT NOT NULL, model TEXT, baseline_model TEXT NOT NULL, task_type TEXT, stage TEXT NOT NULL,
    source TEXT NOT NULL, tags TEXT NOT NULL, time REAL NOT NULL, items INTEGER NOT NULL,
    baseline_u INTEGER NOT NULL, actual_u INTEGER NOT NULL, saved_u INTEGER NOT NULL, estimated INTEGER NOT NULL,
    batch INTEGER NOT NULL, simulated INTEGER NOT NULL, catalog_version TEXT NOT NULL, payload TEXT NOT NULL);
INSERT INTO cost_events VALUES ('old', 'u-old', 'r-old', 'acme', 'gpt-4o', 'gpt-4o', 'faq', 'gateway', 'llm', '{}',
    1760000400.0, 1, 25000000000, 25000000000, 0, 0, 0, 0, 'v0', '{}');
"""


def test_ledger_written_before_the_flag_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_OLD_SCHEMA)
    conn.close()
    with Ledger(path) as led:
        assert led.totals()["unpriced_requests"] == 0 and led.totals()["actual_cost_usd"] == 2.5
        assert led.add(cost_event(rec(21, "acme", point("o3-pro", input_tokens=M), at=T0 + 1), CATALOG))
        assert led.totals()["unpriced_requests"] == 1 and [u["model"] for u in led.unpriced()] == ["o3-pro"]
    with Ledger(path) as led:  # reopening migrates nothing twice
        assert led.totals()["requests"] == 2


def test_unpriced_usage_metric() -> None:
    metrics = Metrics()
    metrics.record_unpriced(("o3-pro",))
    metrics.record_unpriced(("o3-pro", "mystery"))
    text = exposition(metrics)
    assert 'frugal_unpriced_usage_total{model="o3-pro"} 2.0' in text
    assert 'frugal_unpriced_usage_total{model="mystery"} 1.0' in text
