"""A provider that answers HTTP 200 with a body it cannot use and no usage was still paid for the prompt: the
spend is estimated from the request, never dropped. An error body carries no spend (nothing was generated)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from frugalstream.gateway.idempotency import MemoryCompleted
from frugalstream.gateway.logic import Gateway
from frugalstream.llm.providers import AnthropicProvider, OpenAIProvider, ProviderError
from frugalstream.llm.providers.openai_batch import parse_output_line
from frugalstream.schemas import ChatMessage, SamplingParams, TokenUsage
from tests.unit.test_gateway_spend_kept import GOOD, Chat, _body, _discarded, _usage, _with_fallback

PROMPT = [ChatMessage(role="user", content="Summarise the attached returns policy in three sentences, please.")]


@pytest.fixture
async def chat() -> AsyncIterator[Chat]:
    made = Chat({"gpt-4o-mini": {"choices": []}, "gpt-4o": _body(GOOD)})  # the first: no choices, no usage
    yield made
    await made.provider.aclose()


async def test_a_malformed_answer_without_usage_is_billed_its_estimated_prompt(chat: Chat) -> None:
    gateway = Gateway({"simulated": chat.provider}, MemoryCompleted())
    [result] = await gateway.handle([_with_fallback()], can_defer=False)
    assert result.outcome == "paid" and chat.asked == ["gpt-4o-mini", "gpt-4o"]
    [wasted] = _discarded(_usage(result))
    usage = wasted.steps[-1].usage
    assert wasted.actual_model == "gpt-4o-mini"
    assert usage.input_tokens > 0 and usage.output_tokens == 0 and usage.estimated


async def test_an_openai_error_body_with_status_200_carries_no_spend() -> None:
    body = {"error": {"message": "upstream overloaded"}}
    answer = httpx.MockTransport(lambda _r: httpx.Response(200, json=body))
    provider = OpenAIProvider(api_key="sk-test", transport=answer)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.complete(model="gpt-4o-mini", messages=PROMPT, sampling=SamplingParams())
    finally:
        await provider.aclose()
    assert caught.value.kind == "server" and caught.value.usage is None


@pytest.mark.parametrize(("payload", "billed"), [
    ({"type": "message", "content": "not a list"}, True),  # malformed: answered, so billed
    ({"type": "error", "error": {"message": "overloaded"}}, False),  # an error body: nothing generated
])
async def test_an_anthropic_answer_without_usage_is_billed_only_when_it_was_an_answer(
        payload: dict[str, object], billed: bool) -> None:
    provider = AnthropicProvider(api_key="ak-test", transport=httpx.MockTransport(
        lambda _r: httpx.Response(200, content=json.dumps(payload).encode(),
                                  headers={"content-type": "application/json"})))
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.complete(model="claude-3-5-haiku-20241022", messages=PROMPT,
                                    sampling=SamplingParams())
    finally:
        await provider.aclose()
    usage = caught.value.usage
    if billed:
        assert usage is not None and usage.input_tokens > 0 and usage.output_tokens == 0 and usage.estimated
    else:
        assert usage is None


def test_a_batch_line_without_choices_or_usage_is_billed_its_estimated_prompt() -> None:
    line = {"custom_id": "c1", "response": {"status_code": 200, "body": {"choices": []}}}
    estimated = TokenUsage(input_tokens=42, output_tokens=0, estimated=True)
    got = parse_output_line(line, "gpt-4o-mini", lambda content, calls: estimated)
    assert isinstance(got, ProviderError) and got.kind == "malformed" and got.usage == estimated
    unestimated = parse_output_line(line, "gpt-4o-mini")
    assert isinstance(unestimated, ProviderError) and unestimated.usage is None  # nothing to estimate it from
