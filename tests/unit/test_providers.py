"""Provider adapters against httpx.MockTransport: request mapping, usage mapping, error classification."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from frugalstream.llm.providers import (
    AnthropicProvider,
    Completion,
    OpenAIProvider,
    Provider,
    ProviderError,
    SimulatedProvider,
    build_provider,
)
from frugalstream.llm.resilience import BreakerRegistry, RetryPolicy, call_with_fallbacks
from frugalstream.schemas import ChatMessage, SamplingParams, ToolCall

Reply = httpx.Response | httpx.HTTPError
P = TypeVar("P", bound=Provider)
USER = (ChatMessage(role="user", content="What are your business hours?"),)
TOOL_CONVERSATION = (
    ChatMessage(role="system", content="You are a support bot."),
    ChatMessage(role="user", content="Where is order 42?"),
    ChatMessage(role="assistant", tool_calls=(ToolCall(id="call_1", name="lookup", arguments='{"order": 42}'),)),
    ChatMessage(role="tool", tool_call_id="call_1", content='{"status": "shipped"}'),
)
TOOLS = ({"type": "function", "function": {"name": "lookup", "description": "Find an order",
                                           "parameters": {"type": "object", "properties": {}}}},)
TINY_USAGE = {"prompt_tokens": 9, "completion_tokens": 3}


def openai_ok(usage: dict[str, Any] | None = TINY_USAGE, message: dict[str, Any] | None = None) -> httpx.Response:
    body: dict[str, Any] = {"id": "chatcmpl-1", "model": "gpt-4o-mini-2024-07-18", "choices": [
        {"index": 0, "finish_reason": "stop", "message": message or {"role": "assistant", "content": "We open at 9."}}]}
    if usage is not None:
        body["usage"] = usage
    return httpx.Response(200, json=body)


class Mock:
    """Providers on scripted MockTransports (last reply repeats); closed at teardown, as warnings are errors."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.made: list[Provider] = []

    def transport(self, replies: Sequence[Reply]) -> httpx.MockTransport:
        queue = list(replies)

        def handle(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            reply = queue.pop(0) if len(queue) > 1 else queue[0]
            if isinstance(reply, httpx.HTTPError):
                raise reply
            return reply

        return httpx.MockTransport(handle)

    def keep(self, provider: P) -> P:
        self.made.append(provider)
        return provider

    def openai(self, *replies: Reply, **kwargs: Any) -> OpenAIProvider:
        return self.keep(OpenAIProvider(api_key="sk-test", transport=self.transport(replies), **kwargs))

    def anthropic(self, *replies: Reply, **kwargs: Any) -> AnthropicProvider:
        return self.keep(AnthropicProvider(api_key="ak-test", transport=self.transport(replies), **kwargs))

    @property
    def last(self) -> tuple[httpx.Request, dict[str, Any]]:
        return self.requests[-1], json.loads(self.requests[-1].content)


class Sleeps(list[float]):
    """A fake `sleep` that records instead of waiting."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
async def mock() -> AsyncIterator[Mock]:
    harness = Mock()
    yield harness
    for provider in harness.made:
        await provider.aclose()


async def ask(provider: Provider, model: str = "m", messages: Sequence[ChatMessage] = USER, **kw: Any) -> Completion:
    return await provider.complete(model=model, messages=messages, sampling=kw.pop("sampling", SamplingParams()), **kw)


# --- OpenAI-compatible ---------------------------------------------------------------------------------

async def test_openai_usage_cached_and_reasoning_are_split_out(mock: Mock) -> None:
    usage = {"prompt_tokens": 2000, "completion_tokens": 500, "total_tokens": 2500,
             "prompt_tokens_details": {"cached_tokens": 1536}, "completion_tokens_details": {"reasoning_tokens": 320}}
    done = await ask(mock.openai(openai_ok(usage)), "gpt-4o-mini")
    u = done.usage
    assert (u.input_tokens, u.cached_input_tokens, u.output_tokens, u.reasoning_tokens) == (464, 1536, 180, 320)
    assert u.input_tokens + u.cached_input_tokens == 2000 and u.output_tokens + u.reasoning_tokens == 500
    assert not u.estimated and not done.simulated
    assert (done.content, done.finish_reason, done.model) == ("We open at 9.", "stop", "gpt-4o-mini")
    assert done.reported_model == "gpt-4o-mini-2024-07-18"


async def test_openai_null_details_and_missing_usage(mock: Mock) -> None:
    u = (await ask(mock.openai(openai_ok({**TINY_USAGE, "prompt_tokens_details": None})))).usage
    assert (u.input_tokens, u.cached_input_tokens, u.output_tokens, u.estimated) == (9, 0, 3, False)
    u = (await ask(mock.openai(openai_ok(None)), "gpt-4o")).usage
    assert u.estimated and u.input_tokens > 5 and u.output_tokens > 2


async def test_openai_request_body_maps_system_tools_and_sampling(mock: Mock) -> None:
    reply = {"role": "assistant", "content": None,
             "tool_calls": [{"id": "call_2", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}
    provider = mock.openai(openai_ok(message=reply), organization="org-1", extra_headers={"x-team": "support"},
                           max_tokens_field="max_completion_tokens")
    done = await ask(provider, messages=TOOL_CONVERSATION, max_tokens=64, tools=TOOLS,
                     sampling=SamplingParams(temperature=0.2, top_p=0.9, seed=7, stop=("END",)),
                     response_format={"type": "json_object"})
    request, body = mock.last
    assert request.url.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["openai-organization"] == "org-1" and request.headers["x-team"] == "support"
    assert body["messages"] == [
        {"role": "system", "content": "You are a support bot."},
        {"role": "user", "content": "Where is order 42?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"order": 42}'}}]},
        {"role": "tool", "content": '{"status": "shipped"}', "tool_call_id": "call_1"},
    ]
    assert (body["temperature"], body["top_p"], body["seed"], body["stop"]) == (0.2, 0.9, 7, ["END"])
    assert body["max_completion_tokens"] == 64 and "max_tokens" not in body
    assert body["tools"] == list(TOOLS) and body["response_format"] == {"type": "json_object"}
    assert done.content == "" and done.tool_calls == (ToolCall(id="call_2", name="lookup", arguments="{}"),)


async def test_openai_azure_style(mock: Mock) -> None:
    provider = mock.openai(openai_ok(), base_url="https://x.openai.azure.com", api_version="2024-10-21",
                           auth_style="api-key", chat_path="/openai/deployments/{model}/chat/completions")
    await ask(provider, "prod-mini")
    request, _ = mock.last
    assert request.url.path == "/openai/deployments/prod-mini/chat/completions"
    assert request.url.params["api-version"] == "2024-10-21"
    assert request.headers["api-key"] == "sk-test" and "authorization" not in request.headers


async def test_429_retry_after_seconds(mock: Mock) -> None:
    limited = httpx.Response(429, headers={"retry-after": "7"},
                             json={"error": {"message": "slow down", "code": "rate_limit"}})
    with pytest.raises(ProviderError) as info:
        await ask(mock.openai(limited))
    err = info.value
    assert (err.kind, err.status, err.retryable, err.retry_after_s) == ("rate_limited", 429, True, 7.0)
    assert "slow down" in str(err) and "sk-test" not in str(err)


async def test_error_classification(mock: Mock) -> None:
    cases: list[tuple[Reply, str, bool]] = [
        (httpx.Response(429, json={"error": {"code": "insufficient_quota", "message": "no credit"}}), "client", False),
        (httpx.Response(503, text="down", headers={"x-ratelimit-reset-requests": "9s"}), "server", True),
        (httpx.Response(529, json={"type": "error", "error": {"type": "overloaded_error"}}), "server", True),
        (httpx.Response(408), "timeout", True),
        (httpx.Response(400, json={"error": {"message": "bad"}}), "client", False),
        (httpx.Response(200, text="<html>gateway</html>"), "malformed", False),
        (httpx.Response(200, json={"choices": []}), "malformed", False),
        (httpx.Response(200, json=[1, 2]), "malformed", False),
        (httpx.ReadTimeout("slow"), "timeout", True),
        (httpx.ConnectError("refused"), "connection", True),
        (httpx.RemoteProtocolError("peer reset"), "connection", True),
    ]
    for reply, kind, retryable in cases:
        with pytest.raises(ProviderError) as info:
            await ask(mock.openai(reply))
        assert (info.value.kind, info.value.retryable, info.value.retry_after_s) == (kind, retryable, None), reply


async def test_5xx_retried_then_succeeds(mock: Mock) -> None:
    provider = mock.openai(httpx.Response(502), httpx.Response(503), openai_ok())
    slept = Sleeps()
    done = await call_with_fallbacks(
        lambda model: provider, ["gpt-4o-mini"], lambda p, model: ask(p, model),
        policy=RetryPolicy(attempts=3), breakers=BreakerRegistry(), sleep=slept, rng=random.Random(1),
    )
    assert done.content == "We open at 9." and len(slept) == 2 and len(mock.requests) == 3


async def test_api_key_from_file(mock: Mock, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    provider = build_provider("openai", api_key_file=str(key_file), api_key_env=None, organization=None,
                              transport=mock.transport([openai_ok()]))
    mock.made.append(provider)
    await ask(provider)
    assert mock.last[0].headers["authorization"] == "Bearer sk-from-file"
    with pytest.raises(TypeError):
        build_provider("simulated", latency_scal=0.0)


# --- Anthropic ----------------------------------------------------------------------------------------

async def test_anthropic_usage_and_request_mapping(mock: Mock) -> None:
    reply = httpx.Response(200, json={
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5-20251001",
        "content": [{"type": "text", "text": "It shipped."},
                    {"type": "tool_use", "id": "tu_9", "name": "notify", "input": {"to": "me"}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 120, "cache_read_input_tokens": 2048, "cache_creation_input_tokens": 300,
                  "output_tokens": 42},
    })
    provider = mock.anthropic(reply, beta=("prompt-caching-2024-07-31",))
    done = await ask(provider, "claude-haiku-4-5", TOOL_CONVERSATION, tools=TOOLS,
                     sampling=SamplingParams(temperature=1.5, seed=3, stop=("END",)),
                     response_format={"type": "json_object"})
    u = done.usage
    assert (u.input_tokens, u.cached_input_tokens, u.cache_write_tokens, u.output_tokens) == (120, 2048, 300, 42)
    assert not u.estimated and u.reasoning_tokens == 0
    assert done.finish_reason == "tool_calls" and done.content == "It shipped."
    assert done.tool_calls == (ToolCall(id="tu_9", name="notify", arguments='{"to":"me"}'),)

    request, body = mock.last
    assert request.url.path == "/v1/messages"
    assert request.headers["x-api-key"] == "ak-test" and request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert body["system"].startswith("You are a support bot.\n\nRespond with a single JSON object")
    assert body["messages"] == [
        {"role": "user", "content": "Where is order 42?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "lookup",
                                           "input": {"order": 42}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1",
                                      "content": '{"status": "shipped"}'}]},
    ]
    assert body["max_tokens"] == 4096 and body["temperature"] == 1.0 and "seed" not in body
    assert body["stop_sequences"] == ["END"]
    assert body["tools"] == [{"name": "lookup", "description": "Find an order",
                              "input_schema": {"type": "object", "properties": {}}}]


async def test_anthropic_errors_and_missing_usage(mock: Mock) -> None:
    overloaded = httpx.Response(529, headers={"retry-after": "3"},
                                json={"type": "error", "error": {"type": "overloaded_error"}})
    with pytest.raises(ProviderError) as info:
        await ask(mock.anthropic(overloaded))
    assert (info.value.kind, info.value.status, info.value.retry_after_s) == ("server", 529, 3.0)

    no_usage = httpx.Response(200, json={"content": [{"type": "text", "text": "Hi"}], "stop_reason": "max_tokens"})
    done = await ask(mock.anthropic(no_usage), max_tokens=5)
    assert done.usage.estimated and done.usage.output_tokens >= 1 and done.finish_reason == "length"

    with pytest.raises(ProviderError) as info:
        await ask(mock.anthropic(httpx.Response(200, json={"type": "message"})))
    assert info.value.kind == "malformed"


# --- Simulated ----------------------------------------------------------------------------------------

async def test_simulated_is_deterministic_and_says_so() -> None:
    a, b = SimulatedProvider(latency_scale=0), SimulatedProvider(latency_scale=0)
    first, again = await ask(a, "gpt-4o-mini"), await ask(b, "gpt-4o-mini")
    assert first == again and first.simulated
    assert first.content.startswith("[simulated gpt-4o-mini]")
    assert (await ask(a, "gpt-4o")).content != first.content

    faq = first.usage.output_tokens
    code = await ask(a, "gpt-4o-mini", (ChatMessage(role="user", content="Implement a python merge of two lists."),))
    assert faq < 100 < code.usage.output_tokens
    draft = (ChatMessage(role="user", content="Write a blog post about our refund policy."),)
    capped = await ask(a, "gpt-4o-mini", draft, max_tokens=12)
    assert capped.usage.output_tokens <= 12 and capped.finish_reason == "length"
    assert capped.usage.input_tokens > 0 and not capped.usage.estimated


async def test_simulated_latency_and_faults() -> None:
    slept = Sleeps()
    small = SimulatedProvider(latency_scale=0.01, sleep=slept)
    done = await ask(small, "gpt-4o-mini")
    assert list(slept) == [pytest.approx(done.latency_ms / 1000)]
    assert done.latency_ms == pytest.approx((150 + 5 * done.usage.output_tokens) * 0.01)

    flaky = SimulatedProvider(latency_scale=0, transient_failures=2, fail_kind="rate_limited", retry_after_s=1.0)
    for _ in range(2):
        with pytest.raises(ProviderError) as info:
            await ask(flaky)
        assert (info.value.kind, info.value.status, info.value.retry_after_s) == ("rate_limited", 429, 1.0)
    assert (await ask(flaky)).simulated

    with pytest.raises(ProviderError):
        await ask(SimulatedProvider(latency_scale=0, fail_rate=1.0))
