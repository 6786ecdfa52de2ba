"""Decision counters an operator alerts on: why each request got its tier, budget downgrades, trims, what the
semantic verifier decided, coalesced joins. Counted where the decision is made, read back from the registry."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry

from frugalstream.classifier.app import ClassifierService
from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.dedupe.wiring import CountingVerifier, build_deduper
from frugalstream.llm.embedder import AsyncEmbedder, HashingEmbedder
from frugalstream.llm.tokens import TokenCounter
from frugalstream.llm.verifier import TrainedVerifier
from frugalstream.runtime.metrics import METRICS, Metrics
from frugalstream.runtime.records import Decoded, Record
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.runtime.stage import BatchContext
from frugalstream.schemas import BudgetState, ChatMessage, LLMRequest, LLMResponse, RoutedRequest, TokenUsage
from frugalstream.schemas import topics as t
from tests.scenarios import today


class KeywordScorer:
    """Escalation score 0.9 for texts that say "escalate", else 0: the tier follows the test's intent."""

    def score(self, embeddings: npt.NDArray[np.float32], texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return np.array([0.9 if "escalate" in text else 0.0 for text in texts], dtype=np.float32)


def ask(rid: str, text: str, tenant: str = "acme", history: tuple[ChatMessage, ...] = (), **kw: object) -> Decoded[
        LLMRequest]:
    request = LLMRequest(id=rid, tenant=tenant, messages=(*history, ChatMessage(role="user", content=text)),
                         **kw)
    return Decoded(Record(t.REQUESTS, 0, 0, None, None, ()), request)


def long_history(turns: int = 40) -> tuple[ChatMessage, ...]:
    """About 8,000 tokens of chat: over the long-input line (6,000) and the chat context budget (3,000)."""
    out: list[ChatMessage] = []
    for k in range(turns):
        out += [ChatMessage(role="user", content=f"turn {k} " + "tell me more about the weather " * 20),
                ChatMessage(role="assistant", content=f"reply {k} " + "it is sunny and mild today " * 20)]
    return tuple(out)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_routing_reasons_budget_downgrades_and_trims_are_counted_per_decision() -> None:
    settings = Settings(tenants={"capped": TenantPolicy(max_tier="small")})
    embedder = AsyncEmbedder(HashingEmbedder())
    logic = Classifier(settings, TokenCounter(), embedder=embedder, scorer=KeywordScorer())
    logic.budgets.update(BudgetState(budget_id="thrifty-day", tenant="thrifty", period="day", period_start=today(),
                                     limit_usd=10, spent_usd=9, status="near", action="downgrade", updated_at=1.0))
    metrics = Metrics(CollectorRegistry())
    service = ClassifierService(settings, logic, metrics=metrics)
    batch = [
        ask("floor", "What are your business hours?", task_hint="faq"),
        ask("score", "Please escalate: what are your business hours?", task_hint="faq"),
        ask("pin", "What are your business hours?", model="gpt-4o"),
        ask("budget", "Please escalate: what are your business hours?", tenant="thrifty", task_hint="faq"),
        ask("policy", "Write a Python function that reverses a linked list", tenant="capped"),
        ask("long", "And tomorrow?", history=long_history(), task_hint="chat"),
    ]
    try:
        outs = await service._on_requests(batch, BatchContext())
    finally:
        embedder.close()
    assert {o.value.request.id: o.value.route.tier for o in outs} == {  # type: ignore[union-attr]
        "floor": "small", "score": "large", "pin": "large", "budget": "mid", "policy": "small", "long": "mid"}
    reasons = {(tier, reason): sample(metrics, "frugal_routing_reasons_total", tier=tier, reason=reason)
               for tier, reason in [("small", "floor"), ("large", "score"), ("large", "pinned"), ("mid", "budget"),
                                    ("small", "policy"), ("mid", "long_input")]}
    assert reasons == dict.fromkeys(reasons, 1.0), reasons
    assert sample(metrics, "frugal_budget_downgrades_total", tenant="thrifty", tier="mid") == 1.0
    assert sample(metrics, "frugal_budget_downgrades_total", tenant="acme", tier="large") == 0.0
    assert sample(metrics, "frugal_context_trims_total", task_type="chat") == 1.0
    assert sample(metrics, "frugal_context_trims_total", task_type="faq") == 0.0
    long = next(o.value.route for o in outs if o.value.request.id == "long")  # type: ignore[union-attr]
    trimmed = long.full_input_tokens - long.input_tokens
    assert sample(metrics, "frugal_trimmed_tokens_total", task_type="chat") == trimmed > 0


def test_verifier_decisions_are_counted_as_accept_reject_or_veto() -> None:
    metrics = Metrics(CollectorRegistry())
    verifier = CountingVerifier(TrainedVerifier.load(), metrics)
    decisions = verifier.verify_batch([
        ("What are your business hours?", "what are your business hours", 0.99, 0.5),  # the same text
        ("Can I send 50 dollars?", "Can I send 500 dollars?", 0.97, 0.5),  # the rule on numbers
        ("How do I reset my password?", "Where is the nearest branch office?", 0.86, 0.999),  # the model says no
    ])
    assert [(d.hit, d.reason) for d in decisions] == [(True, "exact"), (False, "number_mismatch"), (False, "model")]
    assert verifier.verify("Can I send 50 dollars?", "Can I send 500 dollars?", 0.97, 0.5).reason == "number_mismatch"
    assert sample(metrics, "frugal_verifier_decisions_total", outcome="accept", reason="exact") == 1.0
    assert sample(metrics, "frugal_verifier_decisions_total", outcome="veto", reason="number_mismatch") == 2.0
    assert sample(metrics, "frugal_verifier_decisions_total", outcome="reject", reason="model") == 1.0


def verdicts(metrics: Metrics) -> float:
    return sum(s.value for family in metrics.registry.collect() if family.name == "frugal_verifier_decisions"
               for s in family.samples if s.name.endswith("_total"))


async def test_the_dedupe_service_counts_its_verifier_decisions_and_coalesced_joins() -> None:
    """`build_deduper` (what the service runs) puts the counting verifier in front of the semantic index."""
    settings = Settings(semantic_task_types=("faq",), semantic_verifier="features")
    embedder = AsyncEmbedder(HashingEmbedder())
    deduper = build_deduper(settings, embedder, TrainedVerifier.load())
    deduper.metrics = own = Metrics(CollectorRegistry())
    classifier = Classifier(settings, TokenCounter(), embedder=embedder)
    texts = ["what are your business hours", "what are your business hours today", "do you charge for wires",
             "do you charge for wires"]
    results = await classifier.handle([ask(str(i), text, task_hint="faq").value for i, text in enumerate(texts)])
    first, reworded, leader, twin = [r.routed for r in results if isinstance(r, Routed)]
    before = verdicts(METRICS)
    try:
        await deduper.handle(requests=[(first, 0)])
        await deduper.handle(answers=[(answer(first), 0)])
        await deduper.handle(requests=[(reworded, 0), (leader, 1)])
        await deduper.handle(requests=[(twin, 1)])
    finally:
        embedder.close()
    assert verdicts(METRICS) - before == 1.0, "the reworded question went to the verifier once, and was counted"
    assert sample(own, "frugal_dedupe_decisions_total", outcome="coalesced") == 1.0, "the twin joined its leader"


def answer(routed: RoutedRequest) -> LLMResponse:
    return LLMResponse(request_id=routed.request.id, tenant=routed.request.tenant, source="llm", content="9 to 5.",
                       model=routed.route.model, tier=routed.route.tier, task_type=routed.route.task_type,
                       finish_reason="stop", usage=TokenUsage(output_tokens=5), keys=routed.keys, cacheable=True,
                       responded_at=time.time())
