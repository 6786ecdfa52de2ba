"""Classifier logic without a broker: task rules, trimming, tier decisions, tenant policy and budgets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frugalstream.classifier.routing import (
    PolicyDenied,
    TierThresholds,
    choose_model,
    decide_tier,
)
from frugalstream.classifier.task_rules import classify_task
from frugalstream.classifier.trimming import trim_to_budget
from frugalstream.llm.budgets import BudgetBook
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import BudgetState, ChatMessage, LLMRequest, ToolCall
from tests.scenarios import today

COUNTER = TokenCounter()


def req(text: str, **kw: object) -> LLMRequest:
    return LLMRequest(id="r", tenant="t", messages=(ChatMessage(role="user", content=text),), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "task"), [
    ("What are your business hours?", "faq"),
    ("my card still hasn't arrived", "faq"),
    ("Summarize this article in three bullet points: ...", "summarization"),
    ("Write a Python function that reverses a linked list", "code"),
    ("Prove that the square root of 2 is irrational", "reasoning"),
    ("Write a haiku about autumn", "creative"),
    ("Draft an email to my landlord about the broken heater", "drafting"),
    ("Extract every date mentioned in the following text: ...", "extraction"),
    ("Classify the sentiment of this review: great product", "classification"),
])
def test_task_rules(text: str, task: str) -> None:
    assert classify_task(req(text)).task_type == task


def test_task_hint_wins() -> None:
    assert classify_task(req("What are your hours?", task_hint="code")) == classify_task(req("x", task_hint="code"))
    assert classify_task(req("What are your hours?", task_hint="code")).rule == "task_hint"


def _conversation(turns: int, words: int) -> list[ChatMessage]:
    msgs = [ChatMessage(role="system", content="You are a bank assistant.")]
    for k in range(turns):
        msgs.append(ChatMessage(role="user", content=f"question {k} " + "word " * words))
        if k % 3 == 1:
            call = ToolCall(id=f"call{k}", name="lookup", arguments='{"q": 1}')
            msgs.append(ChatMessage(role="assistant", tool_calls=(call,)))
            msgs.append(ChatMessage(role="tool", tool_call_id=f"call{k}", content="result " * words))
        msgs.append(ChatMessage(role="assistant", content=f"answer {k} " + "word " * words))
    msgs.append(ChatMessage(role="user", content="And now?"))
    return msgs


@settings(max_examples=60, deadline=None)
@given(turns=st.integers(1, 14), words=st.integers(5, 300), budget=st.integers(50, 6000))
def test_trimming_keeps_system_newest_turns_and_never_splits_tool_pairs(turns: int, words: int, budget: int) -> None:
    msgs = _conversation(turns, words)
    out = trim_to_budget(msgs, budget, COUNTER, "gpt-4o")
    kept = list(out.messages)
    assert kept[0].role == "system" and kept[-1].content == "And now?"
    assert out.dropped == len(msgs) - len(kept)
    # The kept non-system turns are a contiguous newest window of the original.
    rest = [m for m in msgs if m.role != "system"]
    kept_rest = [m for m in kept if m.role != "system"]
    assert rest[len(rest) - len(kept_rest):] == kept_rest
    calls = {c.id for m in kept for c in m.tool_calls}
    results = {m.tool_call_id for m in kept if m.role == "tool"}
    assert calls == results, "a tool call is kept exactly when its result is"
    if out.dropped:
        assert out.tokens <= budget or len(kept_rest) <= 3  # only the newest unit may exceed the budget alone
    assert out.full_tokens == COUNTER.count_messages(msgs, "gpt-4o")


def test_tier_floor_and_score() -> None:
    th = TierThresholds(mid=0.5, large=0.8)
    assert decide_tier("faq", None, 100, th).tier == "small"
    assert decide_tier("code", None, 100, th).tier == "mid"
    assert decide_tier("chat", 0.9, 100, th).tier == "large"
    assert decide_tier("chat", 0.6, 100, th).tier == "mid"
    assert decide_tier("faq", 0.1, 9_000, th).tier == "mid"


def budget(status: str, action: str, tag: str | None = None) -> BudgetState:
    return BudgetState(budget_id=f"b-{status}-{action}-{tag}", tenant="t", tag=tag, period="day",
                       period_start=today(), limit_usd=1, spent_usd=2, status=status,  # type: ignore[arg-type]
                       action=action, updated_at=1.0)  # type: ignore[arg-type]


def test_policies_and_budgets() -> None:
    s = Settings()
    free = TenantPolicy()
    assert choose_model("large", None, free, None, s).model == "gpt-4o"
    assert choose_model("large", None, TenantPolicy(max_tier="mid"), None, s).tier == "mid"
    only_mini = TenantPolicy(allowed_models=("gpt-4o-mini",))
    assert choose_model("large", None, only_mini, None, s).model == "gpt-4o-mini"
    with pytest.raises(PolicyDenied) as denied:
        choose_model("small", "gpt-4o", only_mini, None, s)
    assert denied.value.code == "policy_denied"
    with pytest.raises(PolicyDenied):
        choose_model("small", "gpt-4o", TenantPolicy(max_tier="mid"), None, s)
    pinned = choose_model("small", "gpt-4o", free, None, s)
    assert pinned.pinned and pinned.model == "gpt-4o"
    over = choose_model("large", "gpt-4o", free, budget("over", "downgrade"), s)
    assert over.downgraded_by_budget and over.tier == "small" and not over.pinned
    near = choose_model("large", None, free, budget("near", "downgrade"), s)
    assert near.tier == "mid"
    with pytest.raises(PolicyDenied) as refused:
        choose_model("small", None, free, budget("over", "refuse"), s)
    assert refused.value.code == "budget_exceeded"


def test_budget_book_applies_tag_budgets_only_to_tagged_requests() -> None:
    book = BudgetBook()
    book.update(budget("over", "refuse", tag="team=ads"))
    assert book.verdict("t", {"team": "search"}) is None
    verdict = book.verdict("t", {"team": "ads"})
    assert verdict is not None and verdict.status == "over"
    book.update(budget("near", "downgrade"))
    untagged = book.verdict("t", {})
    assert untagged is not None and untagged.status == "near"
