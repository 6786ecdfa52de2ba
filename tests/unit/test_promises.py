"""Promises that survived a deliberate breakage before (issue 19): each test here fails when its promise breaks.

Promises guarded elsewhere are not repeated here: a poison record in a mixed batch (tests/unit/test_stage.py),
copies of a request id in one dispatched batch paid once and redeliveries replayed
(tests/unit/test_gateway_idempotency.py, counted at the provider).

`make mutate` (scripts/mutate.py, tests/mutations.toml) applies each breakage to a scratch copy and checks that
the test named as its guard fails; keep the two in step when a test is renamed.
"""

from __future__ import annotations

import time

import pytest

from frugalstream.accountant.ledger import Ledger
from frugalstream.classifier.routing import PolicyDenied, choose_model
from frugalstream.classifier.trimming import trim_to_budget
from frugalstream.llm.budgets import BudgetBook
from frugalstream.llm.cache_keys import cache_keys
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import cost_event
from frugalstream.llm.tokens import TokenCounter
from frugalstream.llm.usage import llm_usage
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import BudgetState, ChatMessage, LLMRequest, Route, RoutedRequest, TokenUsage
from tests.scenarios import today

COUNTER = TokenCounter()
MODEL = "gpt-4o"


# ------------------------------------------------------------------------------------------ context trimming


def _long_conversation(turns: int) -> list[ChatMessage]:
    msgs = [ChatMessage(role="system", content="You are a support assistant for a bank.")]
    for k in range(turns):
        msgs.append(ChatMessage(role="user", content=f"question {k}: " + "tell me about fees " * 20))
        msgs.append(ChatMessage(role="assistant", content=f"answer {k}: " + "the fee is small " * 20))
    msgs.append(ChatMessage(role="user", content="So what do I pay for a wire transfer?"))
    return msgs


def test_over_budget_context_is_trimmed_to_fit_and_keeps_the_last_user_turn() -> None:
    msgs = _long_conversation(turns=30)
    full = COUNTER.count_messages(msgs, MODEL)
    budget = 1_000
    assert full > 3 * budget, "the input must be well over the budget for this test to mean anything"

    out = trim_to_budget(msgs, budget, COUNTER, MODEL)

    assert out.dropped > 0 and len(out.messages) < len(msgs)
    assert COUNTER.count_messages(out.messages, MODEL) <= budget, "the trimmed context must fit the budget"
    assert out.tokens <= budget and out.full_tokens == full
    assert out.messages[0] == msgs[0], "the system turn is always kept"
    assert out.messages[-1] == msgs[-1], "the newest user turn is what is being asked: never dropped"


def test_under_budget_context_is_left_unchanged() -> None:
    msgs = _long_conversation(turns=2)
    full = COUNTER.count_messages(msgs, MODEL)
    out = trim_to_budget(msgs, full + 10, COUNTER, MODEL)
    assert out.messages == tuple(msgs) and out.dropped == 0 and out.tokens == full


# ------------------------------------------------------------------------------------------ budgets per tenant


def _budget(tenant: str, status: str, action: str, tag: str | None = None) -> BudgetState:
    return BudgetState(budget_id=f"{tenant}-{status}-{action}-{tag}", tenant=tenant, tag=tag, period="day",
                       period_start=today(), limit_usd=1, spent_usd=2, status=status,
                       action=action, updated_at=1.0)


def test_a_tenants_budget_never_affects_another_tenant() -> None:
    settings, policy = Settings(), TenantPolicy()
    book = BudgetBook()
    book.update(_budget("acme", "over", "refuse"))
    book.update(_budget("acme", "near", "downgrade", tag="team=ads"))
    book.update(_budget("initech", "over", "downgrade"))

    assert book.verdict("globex", {}) is None
    assert book.verdict("globex", {"team": "ads"}) is None, "acme's tag budget is acme's alone"
    unaffected = choose_model("large", None, policy, book.verdict("globex", {"team": "ads"}), settings)
    assert unaffected.tier == "large" and not unaffected.downgraded_by_budget

    with pytest.raises(PolicyDenied) as refused:
        choose_model("large", None, policy, book.verdict("acme", {}), settings)
    assert refused.value.code == "budget_exceeded"
    initech = book.verdict("initech", {})
    assert initech is not None and initech.tenant == "initech"
    downgraded = choose_model("large", None, policy, initech, settings)
    assert downgraded.tier == "small" and downgraded.downgraded_by_budget


# ------------------------------------------------------------------------------------------ usage ids per tenant


def _routed(tenant: str, request_id: str) -> RoutedRequest:
    request = LLMRequest(id=request_id, tenant=tenant, messages=(ChatMessage(role="user", content="Hi there"),))
    route = Route(task_type="chat", tier="small", model="gpt-4o-mini", provider="openai", reason="test",
                  input_tokens=10, full_input_tokens=10, baseline_model="gpt-4o")
    return RoutedRequest(request=request, route=route, keys=cache_keys(request, "small"), routed_at=time.time())


def test_two_tenants_reusing_a_request_id_are_both_counted_in_the_ledger() -> None:
    catalog = PriceCatalog.load()
    usage = TokenUsage(input_tokens=10, output_tokens=20)
    records = [llm_usage(_routed(tenant, "req-1"), "gpt-4o-mini", usage) for tenant in ("acme", "globex")]
    assert records[0].id != records[1].id, "a usage id names (stage, tenant, request id)"
    with Ledger() as ledger:
        assert ledger.add_many(cost_event(r, catalog) for r in records) == 2
        assert ledger.add(cost_event(records[0], catalog)) is False, "a redelivery of the same usage is not new"
        assert ledger.totals()["requests"] == 2
