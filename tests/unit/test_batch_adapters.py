"""The real batch and prompt-caching adapters against a loopback server speaking the providers' wire formats."""

from __future__ import annotations

import json

from frugalstream.llm.prompt_cache import CachePlan
from frugalstream.llm.providers import AnthropicProvider, OpenAIProvider, ProviderError
from frugalstream.llm.providers.anthropic_batch import AnthropicBatchJobs
from frugalstream.llm.providers.batch_api import BatchCall, OpenAIBatchJobs, custom_id
from frugalstream.llm.providers.openai_batch import OpenAIBatchClient
from frugalstream.schemas import ChatMessage, SamplingParams
from tests.fake_batch_api import FakeProviderAPI

SYSTEM = ChatMessage(role="system", content="You tag support tickets. " * 50)


def calls(n: int, model: str) -> list[BatchCall]:
    return [BatchCall(custom_id=custom_id(f"t\x00r{i}"), model=model, max_tokens=16,
                      messages=(SYSTEM, ChatMessage(role="user", content=f"ticket {i}")),
                      cache_plan=CachePlan(("system",))) for i in range(n)]


async def test_openai_batch_submit_find_poll_and_results() -> None:
    async with FakeProviderAPI() as fake:
        chat = OpenAIProvider(base_url=fake.openai_url, api_key="sk-test")
        jobs = OpenAIBatchJobs(OpenAIBatchClient(base_url=fake.openai_url, api_key="sk-test"), chat)
        batch_id = await jobs.submit("job-1", "gpt-4o-mini", calls(3, "gpt-4o-mini"))
        created = fake.batches[batch_id]
        assert created["metadata"] == {"frugalstream_job": "job-1"}, "the job id travels as batch metadata"
        assert [ln["body"]["messages"][-1]["content"] for ln in created["lines"]] == [f"ticket {i}" for i in range(3)]
        assert all(ln["url"] == "/v1/chat/completions" and ln["method"] == "POST" for ln in created["lines"])
        assert await jobs.find("job-1") == batch_id, "a lost batch id is found again by the job id"
        assert await jobs.find("job-2") is None
        assert not (await jobs.poll(batch_id, "gpt-4o-mini")).done
        fake.complete.set()
        polled = await jobs.poll(batch_id, "gpt-4o-mini")
        assert polled.done and polled.status == "completed"
        first = polled.results[custom_id("t\x00r0")]
        assert not isinstance(first, ProviderError) and first.content == "ticket 0 #1"
        assert first.usage.cached_input_tokens == 0 and first.usage.input_tokens == 1500
        await jobs.aclose()
        await chat.aclose()


async def test_openai_batch_cancel_reads_as_ended_without_results() -> None:
    async with FakeProviderAPI() as fake:
        chat = OpenAIProvider(base_url=fake.openai_url, api_key="sk-test")
        jobs = OpenAIBatchJobs(OpenAIBatchClient(base_url=fake.openai_url, api_key="sk-test"), chat)
        batch_id = await jobs.submit("job-c", "gpt-4o-mini", calls(2, "gpt-4o-mini"))
        await jobs.cancel(batch_id)
        polled = await jobs.poll(batch_id, "gpt-4o-mini")
        assert polled.done and polled.status == "cancelled" and polled.results == {}
        assert not fake.calls, "a cancelled batch ran nothing"
        await jobs.aclose()
        await chat.aclose()


async def test_anthropic_message_batch_wire_format_with_cache_breakpoints() -> None:
    async with FakeProviderAPI(cache_read=1000) as fake:
        chat = AnthropicProvider(base_url=fake.base, api_key="sk-ant-test")
        jobs = AnthropicBatchJobs(chat, base_url=fake.base, api_key="sk-ant-test")
        batch_id = await jobs.submit("job-a", "claude-3-5-haiku", calls(2, "claude-3-5-haiku"))
        assert batch_id.startswith("msgbatch_")
        params = fake.batches[batch_id]["lines"][0]["params"]
        assert params["system"] == [{"type": "text", "text": SYSTEM.content, "cache_control": {"type": "ephemeral"}}]
        assert await jobs.find("job-a") is None, "Message Batches carry no metadata: nothing to find by"
        assert not (await jobs.poll(batch_id, "claude-3-5-haiku")).done
        fake.complete.set()
        polled = await jobs.poll(batch_id, "claude-3-5-haiku")
        answer = polled.results[custom_id("t\x00r1")]
        assert not isinstance(answer, ProviderError)
        assert answer.content == "ticket 1 #1" and answer.usage.cached_input_tokens == 1000
        await jobs.aclose()
        await chat.aclose()


async def test_anthropic_prompt_cache_breakpoints_on_the_messages_api() -> None:
    tools = ({"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},)
    messages = (SYSTEM, ChatMessage(role="user", content="first"), ChatMessage(role="assistant", content="ok"),
                ChatMessage(role="user", content="second"))
    async with FakeProviderAPI(cache_read=900, cache_write=100) as fake:
        chat = AnthropicProvider(base_url=fake.base, api_key="sk-ant-test")
        completion = await chat.complete(model="claude-3-5-haiku", messages=messages, sampling=SamplingParams(),
                                         tools=tools, cache_plan=CachePlan(("tools", "system", "leading")))
        body = next(b for m, p, b in fake.bodies if p == "/v1/messages")
        assert body["tools"][-1]["cache_control"] == {"type": "ephemeral"}
        assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}
        assert body["messages"][-2]["content"][-1] == {"type": "text", "text": "ok",
                                                        "cache_control": {"type": "ephemeral"}}
        assert body["messages"][-1]["content"] == "second", "the new turn is never marked"
        assert (completion.usage.cached_input_tokens, completion.usage.cache_write_tokens) == (900, 100)
        await chat.complete(model="claude-3-5-haiku", messages=messages, sampling=SamplingParams())
        plain = [b for m, p, b in fake.bodies if p == "/v1/messages"][-1]
        assert "cache_control" not in json.dumps(plain), "no plan, no breakpoint"
        await chat.aclose()


async def test_openai_cached_tokens_are_read_from_usage_details() -> None:
    async with FakeProviderAPI(cached_tokens=1280) as fake:
        chat = OpenAIProvider(base_url=fake.openai_url, api_key="sk-test")
        completion = await chat.complete(model="gpt-4o-mini", messages=(SYSTEM, ChatMessage(role="user", content="q")),
                                         sampling=SamplingParams())
        assert completion.usage.cached_input_tokens == 1280
        assert completion.usage.input_tokens == 1500 - 1280, "cached tokens are billed apart, never twice"
        await chat.aclose()


async def test_refused_batch_is_a_non_retryable_error() -> None:
    async with FakeProviderAPI() as fake:
        fake.refuse_batches = True
        chat = OpenAIProvider(base_url=fake.openai_url, api_key="sk-test")
        jobs = OpenAIBatchJobs(OpenAIBatchClient(base_url=fake.openai_url, api_key="sk-test"), chat)
        try:
            await jobs.submit("job-r", "gpt-4o-mini", calls(1, "gpt-4o-mini"))
        except ProviderError as exc:
            assert not exc.retryable and exc.kind == "client"
        else:
            raise AssertionError("a refused batch must raise")
        await jobs.aclose()
        await chat.aclose()
