"""The request contract reads what OpenAI callers send, and the pipeline honours it: content parts (text read,
other parts passed on untouched, never cached), `developer`, `content: null` beside tool calls, tool choice,
top-level sampling, `max_completion_tokens`, `n: 1`; what it cannot honour is refused naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.classifier.trimming import trim_to_budget
from frugalstream.llm.cache_keys import cache_keys
from frugalstream.llm.providers.anthropic import build_messages_body
from frugalstream.llm.providers.openai import OpenAIProvider, message_to_openai
from frugalstream.llm.providers.simulated import SimulatedProvider
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, LLMRequest, SamplingParams

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}}


def request(**fields: Any) -> LLMRequest:
    return LLMRequest.model_validate({"id": "r1", "tenant": "acme",
                                      "messages": [{"role": "user", "content": "What is the refund window?"}],
                                      **fields})


def test_an_openai_body_is_read_as_written() -> None:
    r = request(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}, IMAGE]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ], temperature=0, top_p=0.5, seed=7, stop="END", max_completion_tokens=64, n=1, tool_choice="auto",
        parallel_tool_calls=False, tools=[WEATHER])
    assert r.sampling == SamplingParams(temperature=0, top_p=0.5, seed=7, stop=("END",))
    assert r.max_tokens == 64 and r.tool_choice == "auto" and r.parallel_tool_calls is False
    assert r.messages[1].content == "Weather?" and r.messages[1].parts is not None and r.opaque
    assert r.messages[2].content == "" and r.messages[2].tool_calls[0].name == "get_weather"
    assert LLMRequest.model_validate_json(r.model_dump_json()) == r, "survives the trip through Kafka"


def test_text_of_parts_is_recomputed_so_content_cannot_lie_about_them() -> None:
    m = ChatMessage.model_validate({"role": "user", "content": "harmless", "parts": [{"type": "text", "text": "real"}]})
    assert m.content == "real" and not m.opaque


@pytest.mark.parametrize(("fields", "named"), [
    ({"n": 2}, "n=2"),
    ({"temperature": 0.2, "sampling": {"temperature": 0.9}}, "temperature"),
    ({"max_tokens": 10, "max_completion_tokens": 20}, "max_completion_tokens"),
    ({"tool_choice": {"type": "function"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": None}]}, "content may be null only"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "text parts need"),
])
def test_what_cannot_be_honoured_is_refused_naming_the_field(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        request(**fields)


async def routed(req: LLMRequest) -> Routed:
    [result] = await Classifier(Settings(), TokenCounter()).handle([req])
    assert isinstance(result, Routed)
    return result


async def test_a_request_with_an_image_part_is_never_looked_up_nor_stored() -> None:
    parts = [{"type": "text", "text": "What is in this picture?"}, IMAGE]
    picture = await routed(request(messages=[{"role": "user", "content": parts}]))
    text_parts = await routed(request(messages=[{"role": "user", "content": parts[:1]}]))
    assert picture.routed.request.cache.policy == "no-store"
    assert text_parts.routed.request.cache.policy == "default", "text parts alone are cacheable"
    assert picture.routed.request.messages[0].parts == tuple(parts), "parts travel on untouched"


def test_tool_choice_is_part_of_the_cache_scope_and_absent_keeps_old_scopes() -> None:
    base = cache_keys(request(tools=[WEATHER]), "small").scope
    assert cache_keys(request(tools=[WEATHER], tool_choice="none"), "small").scope != base
    assert cache_keys(request(tools=[WEATHER], tool_choice="required"), "small").scope != \
        cache_keys(request(tools=[WEATHER], tool_choice="none"), "small").scope
    assert cache_keys(request(tools=[WEATHER], parallel_tool_calls=False), "small").scope != base


def test_trimming_keeps_developer_instructions() -> None:
    long = "many words of history " * 200
    msgs = [ChatMessage(role="developer", content="Always answer in French."),
            *[ChatMessage(role="user" if i % 2 == 0 else "assistant", content=long) for i in range(6)],
            ChatMessage(role="user", content="And now?")]
    trimmed = trim_to_budget(msgs, 2000, TokenCounter(), "gpt-4o-mini")
    assert trimmed.dropped > 0 and trimmed.messages[0].role == "developer"


def test_openai_adapter_passes_parts_and_tool_options_through() -> None:
    r = request(messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, IMAGE]},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}])
    assert message_to_openai(r.messages[0])["content"] == [{"type": "text", "text": "what?"}, IMAGE]
    assert message_to_openai(r.messages[1])["content"] is None
    body = OpenAIProvider(api_key="k").build_body(
        model="m", messages=r.messages, sampling=r.sampling, max_tokens=None, tools=[WEATHER], response_format=None,
        tool_choice="required", parallel_tool_calls=False)
    assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False


def test_anthropic_adapter_maps_tool_choice_and_developer_turns() -> None:
    r = request(messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    body = build_messages_body(model="claude", messages=r.messages, sampling=r.sampling, max_tokens=10,
                               tools=[WEATHER], response_format=None,
                               tool_choice={"type": "function", "function": {"name": "get_weather"}},
                               parallel_tool_calls=False)
    assert body["system"] == "Be brief." and [t["role"] for t in body["messages"]] == ["user"]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}


async def test_simulated_provider_calls_a_tool_only_when_told_to() -> None:
    sim = SimulatedProvider(latency_scale=0)
    msgs = (ChatMessage(role="user", content="Weather in Lyon?"),)
    forced = await sim.complete(model="gpt-4o-mini", messages=msgs, sampling=SamplingParams(), tools=[WEATHER],
                                tool_choice="required")
    assert forced.finish_reason == "tool_calls" and forced.tool_calls[0].name == "get_weather"
    assert json.loads(forced.tool_calls[0].arguments) == {"city": "simulated", "days": 1}
    free = await sim.complete(model="gpt-4o-mini", messages=msgs, sampling=SamplingParams(), tools=[WEATHER])
    assert free.finish_reason == "stop" and not free.tool_calls
