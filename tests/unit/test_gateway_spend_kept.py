"""Gateway spend is kept whatever becomes of the answer: a billed call whose answer was malformed reaches
`llm.usage` (and the replay record), a batch line without usage is estimated instead of paid again, and an
error where no call was made is neither recorded as paid nor final."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest

from frugalstream.accountant.ledger import Ledger
from frugalstream.accountant.logic import Accountant
from frugalstream.gateway.app import _outs
from frugalstream.gateway.audits import AuditCalls, InProcessCompleted
from frugalstream.gateway.batch_jobs import MemoryBatchJobs
from frugalstream.gateway.batch_runner import BatchRunner
from frugalstream.gateway.idempotency import MemoryCompleted
from frugalstream.gateway.logic import Gateway, Result
from frugalstream.llm.identity import request_key
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.providers import Completion, OpenAIProvider, ProviderError
from frugalstream.llm.providers.batch_api import OpenAIBatchJobs, custom_id
from frugalstream.llm.providers.openai_batch import OpenAIBatchClient
from frugalstream.llm.resilience import BreakerRegistry, CircuitBreaker
from frugalstream.runtime.records import Decoded, Record
from frugalstream.runtime.stage import BatchContext
from frugalstream.schemas import ChatMessage, RoutedRequest, UsageRecord
from frugalstream.schemas import topics as t
from tests.unit.test_audit_spend_kept import BILLED, Priced, _audit
from tests.unit.test_audits import SETTINGS
from tests.unit.test_batch_runner import POLICY, Clock, routed

GOOD = {"role": "assistant", "content": "We open at 9."}
BAD = {"role": "assistant", "content": None,  # a tool call id the contract cannot hold: a malformed answer
       "tool_calls": [{"id": "c" * 300, "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
USAGE = {"prompt_tokens": 40, "completion_tokens": 30}


def _body(message: dict[str, object], usage: dict[str, int] | None = USAGE) -> dict[str, object]:
    body: dict[str, object] = {"choices": [{"finish_reason": "stop", "message": message}]}
    return body | ({"usage": usage} if usage is not None else {})


class Chat:
    """An OpenAI-compatible endpoint answering per model: every answer billed (HTTP 200 with usage)."""

    def __init__(self, bodies: dict[str, dict[str, object]]) -> None:
        self.bodies = bodies
        self.asked: list[str] = []
        self.provider = OpenAIProvider(api_key="sk-test", transport=httpx.MockTransport(self.handle))

    def handle(self, request: httpx.Request) -> httpx.Response:
        model = json.loads(request.content)["model"]
        self.asked.append(model)
        return httpx.Response(200, json=self.bodies[model])


@pytest.fixture
async def chat() -> AsyncIterator[Chat]:
    made = Chat({"gpt-4o-mini": _body(BAD), "gpt-4o": _body(GOOD)})
    yield made
    await made.provider.aclose()


def _with_fallback(fallbacks: tuple[str, ...] = ("gpt-4o",)) -> RoutedRequest:
    down = routed(1, latency="interactive")
    return down.model_copy(update={"route": down.route.model_copy(update={"fallbacks": fallbacks})})


def _usage(result: Result) -> list[UsageRecord]:
    found = [o.value for o in _outs(result) if o.topic == t.USAGE]
    assert all(isinstance(u, UsageRecord) for u in found)
    return found  # type: ignore[return-value]


def _discarded(records: list[UsageRecord]) -> list[UsageRecord]:
    return [u for u in records if any(s.strategy == "discarded" for s in u.steps)]


async def test_a_billed_malformed_answer_is_billed_and_replayed_with_the_fallback_answer(chat: Chat) -> None:
    gateway = Gateway({"simulated": chat.provider}, MemoryCompleted())
    [result] = await gateway.handle([_with_fallback()], can_defer=False)
    assert result.outcome == "paid" and chat.asked == ["gpt-4o-mini", "gpt-4o"]
    records = _usage(result)
    [wasted] = _discarded(records)
    assert wasted.actual_model == "gpt-4o-mini" and wasted.stage == "gateway"
    assert wasted.steps[-1].usage.input_tokens == 40 and wasted.steps[-1].usage.output_tokens == 30
    assert len({u.id for u in records}) == 2, "the answer's usage and the discarded call's, under their own ids"
    [again] = await gateway.handle([_with_fallback()], can_defer=False)
    assert again.outcome == "replayed" and chat.asked == ["gpt-4o-mini", "gpt-4o"], "replayed, not paid again"
    assert _usage(again) == records, "the replay re-emits the same records (same ids: counted once)"
    twice, once = Ledger(), Ledger()
    await Accountant(PriceCatalog.load(), twice).handle([*records, *_usage(again)])
    await Accountant(PriceCatalog.load(), once).handle(records)
    spent = twice.totals()["by_strategy"]["discarded"]
    assert spent < 0 and spent == pytest.approx(once.totals()["by_strategy"]["discarded"]), "counted once"


async def test_a_failure_after_a_billed_malformed_answer_keeps_its_spend(chat: Chat) -> None:
    gateway = Gateway({"simulated": chat.provider}, MemoryCompleted())
    [result] = await gateway.handle([_with_fallback(())], can_defer=False)
    assert result.outcome == "failed" and result.response is not None and not result.response.ok
    [wasted] = _usage(result)
    assert _discarded([wasted]) == [wasted] and wasted.steps[-1].usage.output_tokens == 30
    [again] = await gateway.handle([_with_fallback(())], can_defer=False)
    assert again.outcome == "replayed" and _usage(again) == [wasted] and chat.asked == ["gpt-4o-mini"]


async def _batch_answers(body: dict[str, object]) -> tuple[list[Result], list[str]]:
    """One member through an OpenAI batch whose output line has `body`: what was emitted, and the models the
    interactive fallback asked."""
    key = request_key("acme", "r1")
    batch = {"id": "batch_1", "status": "completed", "output_file_id": "file_out"}
    line = {"custom_id": custom_id(key), "response": {"status_code": 200, "body": body}}

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/files") and request.method == "POST":
            return httpx.Response(200, json={"id": "file_in"})
        if path.endswith("/batches") and request.method == "GET":
            return httpx.Response(200, json={"data": [], "has_more": False})
        if path.endswith("/content"):
            return httpx.Response(200, content=json.dumps(line).encode())
        return httpx.Response(200, json=batch)

    transport = httpx.MockTransport(handle)
    jobs = OpenAIBatchJobs(OpenAIBatchClient(api_key="sk-test", transport=transport),
                           OpenAIProvider(api_key="sk-test", transport=transport))
    interactive = Chat({"gpt-4o-mini": _body(GOOD)})
    clock, emitted = Clock(), []

    async def emit(results: Sequence[Result]) -> None:
        emitted.extend(results)

    runner = BatchRunner(Gateway({"simulated": interactive.provider}, MemoryCompleted(clock=clock)),
                         MemoryBatchJobs(), {"simulated": jobs}, POLICY, emit=emit, clock=clock)
    try:
        member = routed(1)
        await runner.intake([(member, 0, runner.accepts(member, clock.now) or 0.0)])
        for _ in range(3):
            clock.now += POLICY.gather_s + 1
            await runner.tick()
    finally:
        for client in (jobs, jobs.chat, interactive.provider):
            await client.aclose()
    return emitted, interactive.asked


async def test_a_batch_line_without_usage_is_estimated_not_paid_again() -> None:
    [answer], asked = await _batch_answers(_body(GOOD, usage=None))
    assert not asked, "not paid again interactively"
    assert answer.outcome == "paid" and answer.response is not None and answer.response.content == GOOD["content"]
    assert answer.usage is not None and answer.usage.steps[-1].batch, "answered by the batch, at the batch price"
    billed = answer.usage.steps[-1].usage
    assert billed.estimated and billed.input_tokens > 0 and billed.output_tokens > 0


async def test_a_billed_malformed_batch_line_is_billed_at_the_batch_price_before_the_fallback() -> None:
    emitted, asked = await _batch_answers(_body(BAD))
    assert asked == ["gpt-4o-mini"], "the member is answered interactively"
    wasted = _discarded([u for r in emitted for u in _usage(r)])
    assert [(w.steps[-1].batch, w.steps[-1].usage.output_tokens) for w in wasted] == [(True, 30)]


def _open_breakers() -> BreakerRegistry:
    def tripped() -> CircuitBreaker:
        breaker = CircuitBreaker(failure_threshold=1)
        breaker.record_failure()
        return breaker

    return BreakerRegistry(tripped)


async def test_an_open_circuit_is_a_retryable_answer_that_is_not_recorded_as_paid(chat: Chat) -> None:
    completed = MemoryCompleted()
    gateway = Gateway({"simulated": chat.provider}, completed, breakers=_open_breakers())
    request = routed(1, latency="interactive")
    [refused] = await gateway.handle([request], can_defer=False)
    assert refused.outcome == "failed" and refused.response is not None and refused.response.error is not None
    assert refused.response.error.code == "circuit_open" and refused.response.error.retryable
    assert not chat.asked and len(completed) == 0, "no call was made: nothing paid, nothing to replay"
    chat.bodies["gpt-4o-mini"] = _body(GOOD)
    gateway.breakers = BreakerRegistry()  # the provider recovered
    [answered] = await gateway.handle([request], can_defer=False)
    assert answered.outcome == "paid" and answered.response is not None and answered.response.ok
    assert chat.asked == ["gpt-4o-mini"] and len(completed) == 1


class Unusable(Priced):
    """Bills every call and answers it with something that cannot be used."""

    async def complete(self, *, model: str, messages: Sequence[ChatMessage], **_: Any) -> Completion:
        self.asked.append(model)
        raise ProviderError("tool call id or name is longer than the contract allows", kind="malformed",
                            usage=BILLED)


async def test_an_audit_call_billed_for_an_unusable_answer_is_audit_spend() -> None:
    provider = Unusable()
    calls = AuditCalls(SETTINGS, Gateway({"simulated": provider}, InProcessCompleted()))
    record = Record(t.AUDITS_DISPATCH, 0, 0, None, None, ())
    outs = await calls.on_dispatch([Decoded(record, _audit())], BatchContext())
    assert provider.asked == ["gpt-4o"] and not [o for o in outs if o.topic == t.AUDITS_ANSWERED]
    [spent] = [o.value for o in outs if o.topic == t.USAGE]
    assert isinstance(spent, UsageRecord) and spent.stage == "audit" and spent.steps[-1].usage == BILLED
