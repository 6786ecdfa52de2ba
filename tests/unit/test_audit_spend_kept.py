"""Audit spend is kept whatever becomes of the answer: every priced call made for an audit (its counterfactual
call and the LLM judge's) reaches `llm.usage`, also when the answer was too large to record and also on a replay
after a failed publish; its usage id is deterministic, so the ledger counts a re-emitted record once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from frugalstream.accountant.ledger import Ledger
from frugalstream.accountant.logic import Accountant
from frugalstream.gateway.audits import AuditCalls, InProcessCompleted, sample_paid
from frugalstream.gateway.logic import Gateway, Result
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.providers import Completion
from frugalstream.runtime.records import Decoded, Out, Record
from frugalstream.runtime.stage import BatchContext
from frugalstream.schemas import ChatMessage, TokenUsage, UsageRecord
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditRequest
from tests.unit.test_audits import SETTINGS, response, routed

LLM_JUDGE = SETTINGS.model_copy(update={"audit_judges": {"default": "llm"}, "audit_judge_model": "gpt-4o-mini"})
BILLED = TokenUsage(input_tokens=7, output_tokens=3)


class Priced:
    """A provider that bills every call and answers per model (a long answer to make it `too_large`)."""

    name = "simulated"

    def __init__(self, answers: dict[str, str] | None = None) -> None:
        self.asked: list[str] = []
        self.answers = answers or {}

    async def complete(self, *, model: str, messages: Sequence[ChatMessage], **_: Any) -> Completion:
        self.asked.append(model)
        return Completion(content=self.answers.get(model, f"answer of {model}"), model=model, usage=BILLED,
                          finish_reason="stop", latency_ms=1.0, simulated=True)

    async def aclose(self) -> None:
        return None


def _audit() -> AuditRequest:
    down = routed("d")
    [out] = sample_paid(SETTINGS, [Result("k", down, "paid", response(down))])
    assert isinstance(out.value, AuditRequest)
    return out.value


async def _dispatch(calls: AuditCalls, audit: AuditRequest) -> list[Out]:
    record = Record(t.AUDITS_DISPATCH, 0, 0, None, None, ())
    return await calls.on_dispatch([Decoded(record, audit)], BatchContext())


def _usage(outs: list[Out]) -> list[UsageRecord]:
    found = [o.value for o in outs if o.topic == t.USAGE]
    assert all(isinstance(u, UsageRecord) for u in found)
    assert all(o.key == "acme" for o in outs if o.topic == t.USAGE)  # keyed by tenant, like every usage
    return found  # type: ignore[return-value]


def _billed(u: UsageRecord) -> tuple[str, str | None, TokenUsage]:
    return u.stage, u.actual_model, u.steps[-1].usage


async def test_an_audit_answer_too_large_to_record_is_dropped_but_its_call_is_billed() -> None:
    provider = Priced({"gpt-4o": "x" * 5000})
    calls = AuditCalls(SETTINGS, Gateway({"simulated": provider}, InProcessCompleted(), max_answer_bytes=2000))
    outs = await _dispatch(calls, _audit())
    assert provider.asked == ["gpt-4o"]
    assert not [o for o in outs if o.topic == t.AUDITS_ANSWERED]  # no answer to judge: the audit is dropped
    [usage] = _usage(outs)
    assert _billed(usage) == ("audit", "gpt-4o", BILLED)


async def test_a_redelivered_audit_re_emits_the_same_usage_and_the_ledger_counts_it_once() -> None:
    provider = Priced()
    calls = AuditCalls(SETTINGS, Gateway({"simulated": provider}, InProcessCompleted()))
    audit = _audit()
    first = _usage(await _dispatch(calls, audit))  # built, then the publish failed: the batch comes again
    again = _usage(await _dispatch(calls, audit))  # replayed from the paid-call memory, not paid again
    assert provider.asked == ["gpt-4o"]
    assert [u.id for u in again] == [u.id for u in first] and len(first) == 1
    assert [_billed(u) for u in again] == [("audit", "gpt-4o", BILLED)]
    ledger = Ledger()
    await Accountant(PriceCatalog.load(), ledger).handle([*first, *again])
    once = Ledger()
    await Accountant(PriceCatalog.load(), once).handle(first)
    spent = ledger.totals()["by_strategy"]["audit"]
    assert spent < 0 and spent == pytest.approx(once.totals()["by_strategy"]["audit"])


async def test_the_llm_judges_call_is_billed_on_a_replay_too() -> None:
    provider = Priced({"gpt-4o-mini": "accept"})
    calls = AuditCalls(LLM_JUDGE, Gateway({"simulated": provider}, InProcessCompleted()))
    audit = _audit()
    first = _usage(await _dispatch(calls, audit))
    again = await _dispatch(calls, audit)
    assert provider.asked == ["gpt-4o", "gpt-4o-mini"]  # the call and the judge, each paid once
    assert [o.topic for o in again if o.topic == t.AUDITS_ANSWERED] == [t.AUDITS_ANSWERED]
    assert sorted(u.id for u in _usage(again)) == sorted(u.id for u in first) and len(first) == 2


async def test_the_llm_judges_call_is_billed_when_its_answer_is_too_large() -> None:
    provider = Priced({"gpt-4o-mini": "y" * 5000})
    calls = AuditCalls(LLM_JUDGE, Gateway({"simulated": provider}, InProcessCompleted(), max_answer_bytes=2000))
    outs = await _dispatch(calls, _audit())
    assert provider.asked == ["gpt-4o", "gpt-4o-mini"]
    [answered] = [o.value for o in outs if o.topic == t.AUDITS_ANSWERED]
    assert isinstance(answered, AuditRequest) and answered.judge_verdict is None  # no verdict from an error
    assert sorted(_billed(u) for u in _usage(outs)) == [("audit", "gpt-4o", BILLED), ("audit", "gpt-4o-mini", BILLED)]
