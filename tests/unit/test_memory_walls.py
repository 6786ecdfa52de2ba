"""Memory walls against invented names: a producer naming a fresh tenant, scope or model per request grows no
long-lived structure and no metric label set without bound (dedupe's scope map, the per-tenant and per-model
series, the audit service's recent audits, estimates and threshold labels)."""

from __future__ import annotations

import time

from frugalstream.accountant.ledger import Ledger
from frugalstream.accountant.logic import Accountant
from frugalstream.audit.controller import ThresholdController
from frugalstream.audit.logic import Auditor, EstimateBook, Recent
from frugalstream.dedupe.lookup import Lookup
from frugalstream.dedupe.store import AnswerStore
from frugalstream.llm.judges import MatchJudge
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.metrics import Metrics
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import BudgetState, CacheEntry, CacheKeys, CostPoint, Route, TokenUsage, UsageRecord
from frugalstream.schemas.audits import AuditAnswer, AuditEstimate, AuditRecord
from tests.unit.test_audit_hardening import SETTINGS as AUDIT_SETTINGS
from tests.unit.test_audit_hardening import answered

# --- dedupe: the scope map is bounded by the answer store ---------------------------------------------------------


def cache_entry(n: int, expires_at: float | None) -> CacheEntry:
    keys = CacheKeys(scope=f"scope-{n:064d}", exact=f"e{n}", prefix="", lookup_text="q", tier_rank=0)
    return CacheEntry(keys=keys, request_id=f"r{n}", tenant=f"t{n}", content="x", model="m", output_tokens=1,
                      stored_at=0.0, expires_at=expires_at)


async def test_scopes_whose_entries_expired_are_forgotten_by_the_sweep() -> None:
    store = AnswerStore(max_entries=10_000, clock=lambda: 0.0)  # nothing evicted: only the sweep empties it
    lookup = Lookup(Settings(), store)
    for n in range(5_000):
        lookup.keep(cache_entry(n, expires_at=1.0), partition=0)
    lookup.keep(cache_entry(5_000, expires_at=None), partition=1)
    await lookup.sweep(now=time.time())  # all but the last have expired and left the store
    assert len(store) == 1
    assert lookup.scope_partition == {cache_entry(5_000, None).keys.scope: 1}, \
        f"{len(lookup.scope_partition)} scopes remembered for a store of one entry"


def test_scopes_evicted_from_the_store_are_forgotten_without_a_sweep() -> None:
    store = AnswerStore(max_entries=10, clock=lambda: 0.0)
    lookup = Lookup(Settings(), store)
    for n in range(5_000):
        lookup.keep(cache_entry(n, expires_at=None), partition=n % 2)
    assert len(lookup.scope_partition) <= 2 * 10
    assert {e.keys.scope for e in store} <= set(lookup.scope_partition)  # what is stored is still owned
    lookup.forget_partitions({0, 1})
    assert len(store) == 0 and not lookup.scope_partition


# --- metrics: model and tenant label values are capped ------------------------------------------------------------


def usage(i: int, tenant: str, model: str) -> UsageRecord:
    return UsageRecord(id=f"u{i}", request_id=f"r{i}", tenant=tenant, stage="gateway", source="llm",
                       baseline=CostPoint(model=model, usage=TokenUsage(input_tokens=10, output_tokens=5)),
                       actual_model=model, occurred_at=1_760_000_400.0, task_type="faq")


def series(metrics: Metrics, name: str) -> set[tuple[tuple[str, str], ...]]:
    return {tuple(sorted(s.labels.items())) for m in metrics.registry.collect() if m.name == name
            for s in m.samples if s.name == name or s.name.endswith("_total")}


async def price(records: list[UsageRecord], metrics: Metrics | None = None) -> Metrics:
    metrics = metrics or Metrics()
    accountant = Accountant(PriceCatalog.load(), Ledger(), metrics=metrics)
    await accountant.handle(records)
    accountant.close()
    return metrics


def tenants_of(metrics: Metrics, name: str) -> set[str]:
    return {dict(labels)["tenant"] for labels in series(metrics, name)}


async def test_invented_model_names_share_one_capped_set_of_model_labels() -> None:
    metrics = await price([usage(i, "acme", f"made-up-model-{i}") for i in range(1000)])
    assert len(series(metrics, "frugal_unpriced_usage")) <= 101
    for name in ("frugal_spend_usd", "frugal_baseline_usd"):
        assert len(series(metrics, name)) <= 101, name
    assert len(series(metrics, "frugal_tokens")) <= 101 * 5
    assert ("model", "other") in {kv for labels in series(metrics, "frugal_spend_usd") for kv in labels}


async def test_invented_tenant_names_past_the_cap_are_labelled_other() -> None:
    metrics = await price([usage(i, f"tenant-{i}", "gpt-4o") for i in range(2000)])
    for name in ("frugal_spend_usd", "frugal_baseline_usd", "frugal_tokens"):
        tenants = tenants_of(metrics, name)
        assert len(tenants) <= 100 + 1 and "other" in tenants, name


async def test_a_configured_tenant_keeps_its_own_series_past_the_cap() -> None:
    metrics = Metrics()
    settings = Settings(tenants={"acme": TenantPolicy()}, metrics_tenant_labels=2, kafka_idempotent=False)
    Publisher(object(), settings, metrics)  # type: ignore[arg-type]  # every stage publishes through one
    await price([usage(i, f"invented-{i}", "gpt-4o") for i in range(50)] + [usage(99, "acme", "gpt-4o")], metrics)
    assert tenants_of(metrics, "frugal_spend_usd") == {"invented-0", "invented-1", "other", "acme"}


def test_budget_downgrades_budgets_and_audit_gauges_are_capped_by_tenant() -> None:
    metrics = Metrics()
    metrics.bound_tenants(["acme"], 1)
    route = Route(tier="small", model="gpt-4o-mini", provider="openai", task_type="faq", reason="budget",
                  input_tokens=1, full_input_tokens=1, baseline_model="gpt-4o", downgraded_by_budget=True)
    for i in range(50):
        tenant = f"invented-{i}"
        metrics.record_routing(route, tenant, "budget")
        metrics.record_budget(BudgetState(budget_id="b", tenant=tenant, period="day",
                                          period_start="2026-01-01T00:00:00Z", limit_usd=1.0, spent_usd=2.0,
                                          status="over", action="downgrade", updated_at=0.0))
        metrics.record_audit(AuditEstimate(tenant=tenant, task_type="faq", kind="routed_down", n=1, accepted=0,
                                           rate=0.0, low=0.0, high=0.8))
    for name in ("frugal_budget_downgrades", "frugal_budget_remaining_usd", "frugal_budget_limit_usd",
                 "frugal_audit_acceptance", "frugal_audit_samples"):
        assert tenants_of(metrics, name) == {"invented-0", "other"}, name


# --- the audit service: recent audits, estimates and threshold labels ---------------------------------------------


def record(n: int, tenant: str) -> AuditRecord:
    return AuditRecord(
        audit_id=f"a{n}", tenant=tenant, request_id=f"r{n}", kind="routed_down", task_type="faq",
        candidate=AuditAnswer(content="x"), reference=AuditAnswer(content="y"), judge="match", verdict="reject",
        estimate={"tenant": tenant, "task_type": "faq", "kind": "routed_down", "n": 1, "accepted": 0, "rate": 0.0,
                  "low": 0.0, "high": 0.8}, judged_at=1.0)


def test_recent_audits_of_invented_tenants_share_one_tenants_worth() -> None:
    recent = Recent(per_tenant=10)
    for n in range(1000):
        recent.put(record(n, f"evil-{n}"))
    assert len(recent) <= 10, f"{len(recent)} audits remembered"


def test_a_flood_evicts_its_own_audits_before_a_quiet_tenants_awaiting_review() -> None:
    recent = Recent(per_tenant=10)
    recent.put(record(0, "quiet"))
    for n in range(1, 200):
        recent.put(record(n, "evil"))
    assert "a0" in recent and len(recent) == 10


def test_a_configured_tenants_audits_are_never_evicted_by_invented_tenants() -> None:
    recent = Recent(per_tenant=10, reserved={"acme"})
    for n in range(5):
        recent.put(record(n, "acme"))
    for n in range(5, 2000):
        recent.put(record(n, f"evil-{n}"))
    assert all(f"a{n}" in recent for n in range(5)) and len(recent) <= 5 + 10


async def test_estimates_and_threshold_labels_of_invented_tenants_are_bounded() -> None:
    settings = AUDIT_SETTINGS.model_copy(update={"audit_calibrate": False, "tenants": {"acme": TenantPolicy()}})
    auditor = Auditor(settings, {"match": MatchJudge()}, recent_max=5, estimates=EstimateBook(window=1),
                      controller=ThresholdController(window=1))
    await auditor.judge([answered("mine")])  # acme, configured
    await auditor.judge([answered(f"r{i}", tenant=f"evil-{i}") for i in range(500)])
    assert len(auditor.recent) <= 1 + 5
    assert sum(len(v) for v in auditor.estimates.book.cells.values()) <= 1 + 1 * 10 * 6
    assert sum(len(c) for c in auditor.controller.book.cells.values()) <= 1 + 1 * 10 * 3
    assert auditor.estimates.estimate(("acme", "faq", "cache_semantic")).n == 1
    assert len(auditor.controller.labels("acme", "faq", "semantic_verify")) == 1
