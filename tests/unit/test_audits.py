"""Audits: sampling, the counterfactual path (never to a caller), audit spend kept net, judges, estimates,
review verdicts tied to their audit, and thresholds per tenant (issue 16)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest

from frugalstream.accountant.audit_estimates import add_audits
from frugalstream.accountant.ledger import Ledger
from frugalstream.accountant.logic import Accountant
from frugalstream.accountant.report import FORMATS, build_report, render
from frugalstream.audit.controller import Label, ThresholdController
from frugalstream.audit.logic import Auditor
from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.dedupe.app import outs_for
from frugalstream.dedupe.audit_sampling import AuditSampler
from frugalstream.dedupe.lookup import SemanticHit
from frugalstream.dedupe.wiring import semantic_policy
from frugalstream.gateway.audits import AuditCalls, InProcessCompleted, sample_paid
from frugalstream.gateway.logic import Gateway, Result
from frugalstream.llm.audit_stats import weighted, wilson
from frugalstream.llm.audits import answers_digest, audit_id, audit_job, audit_usage, sampled
from frugalstream.llm.cache_keys import cache_keys
from frugalstream.llm.judges import MatchJudge, normalize, parse_llm_verdict
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import price_usage
from frugalstream.llm.providers import Completion
from frugalstream.llm.thresholds import ThresholdBook
from frugalstream.llm.tokens import TokenCounter
from frugalstream.llm.usage import llm_usage
from frugalstream.runtime.records import Decoded, Record
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext
from frugalstream.schemas import CacheEntry, ChatMessage, LLMRequest, LLMResponse, Route, RoutedRequest, TokenUsage
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditAnswer, AuditRecord, AuditRequest, ReviewVerdict, ThresholdChange

SETTINGS = Settings(audit_rate=1.0, audit_judges={"default": "match"}, semantic_verifier="features")


def routed(rid: str = "r1", tenant: str = "acme", text: str = "When do you open?", *, model: str = "gpt-4o-mini",
           tier: str = "small", pinned: bool = False, score: float | None = 0.05) -> RoutedRequest:
    request = LLMRequest(id=rid, tenant=tenant, messages=(ChatMessage(role="user", content=text),),
                         reply_topic=f"{tenant}.answers")
    route = Route(task_type="faq", tier=tier, model=model, provider="simulated", reason="test",
                  input_tokens=10, full_input_tokens=10, baseline_model="gpt-4o", pinned=pinned,
                  escalation_score=score)
    return RoutedRequest(request=request, route=route, keys=cache_keys(request, tier), routed_at=time.time())  # type: ignore[arg-type]


def response(r: RoutedRequest, content: str = "We open at 9.") -> LLMResponse:
    return LLMResponse(request_id=r.request.id, tenant=r.request.tenant, source="llm", content=content,
                       model=r.route.model, tier=r.route.tier, task_type="faq", finish_reason="stop",
                       usage=TokenUsage(input_tokens=10, output_tokens=5), keys=r.keys, cacheable=True,
                       responded_at=time.time())


def entry(r: RoutedRequest, content: str) -> CacheEntry:
    return CacheEntry(keys=r.keys, request_id=r.request.id, tenant=r.request.tenant, content=content,
                      model="gpt-4o-mini", output_tokens=5, stored_at=time.time())


# --- sampling and the counterfactual job -------------------------------------------------------------------------

def test_sampling_is_deterministic_and_close_to_the_rate() -> None:
    picks = [sampled("acme", f"r{i}", "routed_down", 0.1) for i in range(5000)]
    assert picks == [sampled("acme", f"r{i}", "routed_down", 0.1) for i in range(5000)]
    assert 0.08 < sum(picks) / 5000 < 0.12
    assert not any(sampled("acme", f"r{i}", "routed_down", 0.0) for i in range(200))


def test_the_audit_job_never_carries_the_callers_identity_or_reply_topic() -> None:
    r = routed()
    job = audit_job(r, "cache_semantic", "gpt-4o")
    assert job.request.id == audit_id("acme", "r1", "cache_semantic") != r.request.id
    assert job.request.reply_topic is None and job.request.cache.policy == "no-store"
    assert job.route.model == "gpt-4o" and job.route.fallbacks == () and job.request.tenant == "acme"
    assert audit_id("acme", "r1", "cache_semantic") != audit_id("other", "r1", "cache_semantic")


def test_audit_spend_is_a_negative_saving_so_savings_stay_net() -> None:
    catalog = PriceCatalog.load()
    job = audit_job(routed(), "routed_down", "gpt-4o")
    audit = price_usage(audit_usage(job, "gpt-4o", TokenUsage(input_tokens=1000, output_tokens=200),
                                    simulated=True), catalog)
    assert audit.actual_cost_usd > 0 and audit.baseline_cost_usd == 0
    assert audit.saved_usd == pytest.approx(-audit.actual_cost_usd)
    assert audit.savings_by_strategy["audit"] == pytest.approx(-audit.actual_cost_usd)
    served = price_usage(llm_usage(routed(), "gpt-4o-mini", TokenUsage(input_tokens=1000, output_tokens=200)), catalog)
    ledger = Ledger()
    accountant = Accountant(catalog, ledger)
    import asyncio
    asyncio.run(accountant.handle([llm_usage(routed(), "gpt-4o-mini", TokenUsage(input_tokens=1000, output_tokens=200)),
                                   audit_usage(job, "gpt-4o", TokenUsage(input_tokens=1000, output_tokens=200),
                                               simulated=True)]))
    totals = ledger.totals()
    assert totals["saved_usd"] == pytest.approx(served.saved_usd - audit.actual_cost_usd, abs=1e-9)
    assert totals["by_strategy"]["audit"] == pytest.approx(-audit.actual_cost_usd, abs=1e-9)


# --- stats and judges ----------------------------------------------------------------------------------------------

def test_wilson_interval_matches_known_values() -> None:
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    # Weights do not buy certainty: one heavy label is one label's worth of evidence.
    assert weighted([(True, 20.0)]).n == pytest.approx(1.0)


def test_match_judge_ignores_case_punctuation_marker_and_json_key_order() -> None:
    assert normalize("[simulated gpt-4o] Yes, Paris.") == normalize("yes paris")
    assert normalize('{"a": 1, "b": 2}') == normalize('{"b":2,"a":1}')
    assert normalize("Paris") != normalize("Lyon")
    assert parse_llm_verdict("[simulated x] REJECT.") == "reject"
    assert parse_llm_verdict("accept it") == "accept" and parse_llm_verdict("maybe") is None


# --- the controller ------------------------------------------------------------------------------------------------

def test_a_broken_bound_tightens_at_once_and_loosening_needs_evidence() -> None:
    c = ThresholdController(min_evidence=30, clock=lambda: 1.0)
    c.observe("a", "faq", "semantic_verify", Label(0.95, True), key="h1")
    c.observe("a", "faq", "semantic_verify", Label(0.92, False), key="h2")  # a false hit above the threshold
    change = c.decide("a", "faq", "semantic_verify", 0.9, 0.99)
    assert change is not None and change.reason == "bound_broken" and change.value > 0.92
    few = ThresholdController(min_evidence=30)
    for i in range(20):
        few.observe("a", "faq", "semantic_verify", Label(0.5 + i / 100, True), key=f"a{i}")
    assert few.decide("a", "faq", "semantic_verify", 0.9, 0.99) is None  # 20 clean labels prove nothing at 1%
    for i in range(80):
        few.observe("a", "faq", "semantic_verify", Label(0.5 + (i % 40) / 100, True), key=f"b{i}")
    assert few.decide("a", "faq", "semantic_verify", 0.9, 0.99) is None  # 100 clean: a 1% bound is not yet shown
    many = ThresholdController(min_evidence=30)
    for i in range(800):
        many.observe("a", "faq", "semantic_verify", Label(0.6 + (i % 40) / 100, True), key=str(i))
    loosened = many.decide("a", "faq", "semantic_verify", 0.9, 0.99)
    assert loosened is not None and loosened.reason == "evidence" and loosened.value < 0.9


def test_routing_threshold_moves_the_other_way() -> None:
    c = ThresholdController(min_evidence=30)
    for i in range(400):
        c.observe("a", "chat", "route_mid", Label(i / 1000, i < 300), key=str(i))  # the cheap answers fail above 0.3
    change = c.decide("a", "chat", "route_mid", 0.12, 0.95)
    assert change is not None and change.reason == "evidence" and 0.12 < change.value <= 0.35


def test_a_threshold_change_for_one_tenant_never_moves_anothers() -> None:
    book = ThresholdBook()
    policy = semantic_policy(SETTINGS, book)
    before = policy.threshold("faq", "b")
    book.update(ThresholdChange(tenant="a", task_type="faq", knob="semantic_verify", value=0.5, previous=before,
                                reason="evidence", target=0.99, n=500, estimate=1.0, low=0.99, high=1.0,
                                changed_at=1.0))
    assert policy.threshold("faq", "a") == 0.5
    assert policy.threshold("faq", "b") == before and policy.threshold("faq") == before


# --- dedupe: sampled hits and free labels --------------------------------------------------------------------------

def test_a_sampled_semantic_hit_goes_to_the_audit_topic_only_keyed_by_its_tenant() -> None:
    r = routed("r2", text="what time do you open")
    cached = routed("r1")
    audit = AuditSampler(SETTINGS).on_hit(r, SemanticHit(entry(cached, "We open at 9."), 0.93, 0.95, 0.89))
    assert audit is not None
    outs = outs_for([audit])
    assert [(o.topic, o.key) for o in outs] == [(t.AUDITS_DISPATCH, "acme")]
    job = audit.request.job
    assert job is not None and job.request.id != "r2" and job.request.reply_topic is None
    assert audit.request.candidate is not None and audit.request.candidate.content == "We open at 9."
    assert audit.request.score == 0.95 and audit.request.threshold == 0.89


def test_a_near_miss_label_comes_with_its_fresh_answer_and_only_for_the_same_tenant() -> None:
    sampler = AuditSampler(SETTINGS)
    r = routed("r2", text="what time do you open")
    sampler.on_near_miss(r, SemanticHit(entry(routed("r1"), "We open at 9."), 0.85, 0.6, 0.89))
    other = routed("r2", tenant="evil")
    assert sampler.on_answer(response(other, "Hacked")) == []  # same id, another tenant: not this label
    [audit] = sampler.on_answer(response(r, "We open at 9 am."))
    assert audit.request.job is None and audit.request.rule == "verifier"
    assert [o.topic for o in outs_for([audit])] == [t.AUDITS_ANSWERED]
    assert audit.request.reference == AuditAnswer(content="We open at 9 am.", model="gpt-4o-mini")


# --- gateway: sampling paid answers and running audit calls --------------------------------------------------------

class Echo:
    name = "simulated"

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def complete(self, *, model: str, messages: Sequence[ChatMessage], **_: Any) -> Completion:
        self.asked.append(model)
        return Completion(content=f"answer of {model}", model=model, usage=TokenUsage(input_tokens=7, output_tokens=3),
                          finish_reason="stop", latency_ms=1.0, simulated=True)

    async def aclose(self) -> None:
        return None


def test_paid_routed_down_answers_are_sampled_but_pinned_ones_are_not() -> None:
    down, pinned = routed("d"), routed("p", pinned=True)
    results = [Result("k1", down, "paid", response(down)), Result("k2", pinned, "paid", response(pinned))]
    outs = sample_paid(SETTINGS, results)
    assert len(outs) == 1 and outs[0].topic == t.AUDITS_DISPATCH
    audit = outs[0].value
    assert isinstance(audit, AuditRequest) and audit.request_id == "d" and audit.kind == "routed_down"
    assert audit.job is not None and audit.job.route.model == "gpt-4o"


def long_chat(rid: str) -> LLMRequest:
    turns = [ChatMessage(role="system", content="You help with bank fees.")]
    for k in range(30):
        turns += [ChatMessage(role="user", content=f"question {k}: " + "tell me about fees " * 20),
                  ChatMessage(role="assistant", content=f"answer {k}: " + "the fee is small " * 20)]
    return LLMRequest(id=rid, tenant="acme", model="gpt-4o", task_hint="chat",
                      messages=(*turns, ChatMessage(role="user", content="So what do I pay for a wire?")))


async def test_a_sampled_trim_is_audited_against_the_same_model_on_the_full_history() -> None:
    settings = SETTINGS.model_copy(update={"context_budgets": {"chat": 1_000}})
    request = long_chat("t1")
    [kept] = await Classifier(settings, TokenCounter(), catalog=PriceCatalog.load()).handle([request])
    assert isinstance(kept, Routed)
    trimmed = kept.routed
    assert trimmed.route.trimmed_messages > 0 and len(trimmed.request.messages) < len(request.messages)
    assert trimmed.audit_messages == request.messages  # sampled (rate 1): the full history travels with it
    [out] = sample_paid(settings, [Result("k", trimmed, "paid", response(trimmed))])
    audit = out.value
    assert isinstance(audit, AuditRequest) and audit.kind == "trimmed" and audit.job is not None
    assert audit.job.request.messages == request.messages and audit.job.route.model == "gpt-4o"
    assert audit.job.audit_messages is None and audit.candidate is not None

    unsampled = settings.model_copy(update={"audit_rate": 0.0})
    [plain] = await Classifier(unsampled, TokenCounter(), catalog=PriceCatalog.load()).handle([long_chat("t2")])
    assert isinstance(plain, Routed) and plain.routed.audit_messages is None  # not sampled: nothing extra carried


async def test_audit_calls_publish_only_to_the_audit_topic_and_bill_audit_usage() -> None:
    provider = Echo()
    calls = AuditCalls(SETTINGS, Gateway({"simulated": provider}, InProcessCompleted()))
    down = routed("d")
    audit = sample_paid(SETTINGS, [Result("k", down, "paid", response(down))])[0].value
    record = Record(t.AUDITS_DISPATCH, 0, 0, None, None, ())
    outs = await calls.on_dispatch([Decoded(record, audit), Decoded(record, audit)], BatchContext())  # type: ignore[arg-type]
    assert {o.topic for o in outs} == {t.AUDITS_ANSWERED, t.USAGE}
    assert provider.asked == ["gpt-4o"]  # a copy in one batch is called once
    answered = [o.value for o in outs if o.topic == t.AUDITS_ANSWERED]
    assert isinstance(answered[0], AuditRequest) and answered[0].reference is not None
    assert answered[0].reference.content == "answer of gpt-4o" and answered[0].candidate is not None
    usage = [o.value for o in outs if o.topic == t.USAGE]
    assert usage and all(u.stage == "audit" and u.tenant == "acme" for u in usage)  # type: ignore[union-attr]


# --- the auditor: estimates and reviews ----------------------------------------------------------------------------

def answered(rid: str, candidate: str, reference: str, tenant: str = "acme") -> AuditRequest:
    return AuditRequest(audit_id=audit_id(tenant, rid, "cache_semantic"), tenant=tenant, request_id=rid,
                        kind="cache_semantic", task_type="faq", question="q", score=0.95, threshold=0.89,
                        candidate=AuditAnswer(content=candidate), reference=AuditAnswer(content=reference),
                        sampled_at=1.0)


async def test_estimates_count_each_audit_once_and_reviews_are_tied_to_tenant_and_answers() -> None:
    auditor = Auditor(SETTINGS, {"match": MatchJudge()})
    ok, bad = answered("r1", "Paris", "paris"), answered("r2", "Paris", "Lyon")
    records, _ = await auditor.judge([ok, bad, ok])
    assert [r.verdict for r in records] == ["accept", "reject"]
    again, _ = await auditor.judge([ok])  # a redelivery
    assert again == [] and records[-1].estimate.n == 2 and records[-1].estimate.accepted == 1
    digest = answers_digest(bad.candidate, bad.reference)  # type: ignore[arg-type]
    forged = [ReviewVerdict(audit_id=bad.audit_id, tenant="evil", verdict="accept", answers_sha256=digest,
                            reviewed_at=2.0),
              ReviewVerdict(audit_id=bad.audit_id, tenant="acme", verdict="accept", answers_sha256="0" * 64,
                            reviewed_at=2.0)]
    assert auditor.review(forged)[0] == []
    reviewed, _ = auditor.review([ReviewVerdict(audit_id=bad.audit_id, tenant="acme", verdict="accept",
                                                answers_sha256=digest, reviewed_at=2.0)])
    assert reviewed[0].judge == "human" and reviewed[0].estimate.accepted == 2 and reviewed[0].estimate.n == 2


async def test_a_restarted_auditor_counts_what_llm_audits_holds_once_and_still_takes_reviews() -> None:
    first = Auditor(SETTINGS, {"match": MatchJudge()})
    ok, bad = answered("r1", "Paris", "paris"), answered("r2", "Paris", "Lyon")
    records, _ = await first.judge([ok, bad])
    restarted = Auditor(SETTINGS, {"match": MatchJudge()})
    assert restarted.restore([*records, *records]) == 2  # the topic read twice counts each audit once
    cell = ("acme", "faq", "cache_semantic")
    assert restarted.estimates.estimate(cell) == first.estimates.estimate(cell)
    assert restarted.controller.labels("acme", "faq", "semantic_verify") == \
        first.controller.labels("acme", "faq", "semantic_verify")
    assert (await restarted.judge([ok]))[0] == []  # judged before the restart: a redelivery changes nothing
    digest = answers_digest(bad.candidate, bad.reference)  # type: ignore[arg-type]
    reviewed, _ = restarted.review([ReviewVerdict(audit_id=bad.audit_id, tenant="acme", verdict="accept",
                                                  answers_sha256=digest, reviewed_at=2.0)])
    assert reviewed[0].judge == "human" and reviewed[0].estimate.n == 2 and reviewed[0].estimate.accepted == 2
    labels = restarted.controller.labels("acme", "faq", "semantic_verify")
    assert len(labels) == 2 and all(lb.accepted for lb in labels)  # the person's label replaced the machine's
    restarted.restore(records)  # the machine's record read again later never overrides the person
    assert restarted.recent[bad.audit_id].judge == "human"


def test_report_shows_audit_estimates_in_every_format_and_human_verdicts_win() -> None:
    ledger = Ledger()
    base = dict(tenant="acme", request_id="r", kind="cache_semantic", task_type="faq",
                candidate=AuditAnswer(content="a"), reference=AuditAnswer(content="b"),
                estimate={"tenant": "acme", "task_type": "faq", "kind": "cache_semantic", "n": 1, "accepted": 0,
                          "rate": 0.0, "low": 0.0, "high": 0.79}, judged_at=1.0)
    add_audits(ledger, [AuditRecord(audit_id="x", judge="human", verdict="accept", **base)])
    add_audits(ledger, [AuditRecord(audit_id="x", judge="match", verdict="reject", **base)])
    report = build_report(ledger)
    assert report.audits[0]["accepted"] == 1 and report.audits[0]["n"] == 1
    for fmt in FORMATS:
        assert "cache_semantic" in render(report, fmt)
