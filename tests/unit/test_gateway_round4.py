"""Round 4 of the hostile review of the gateway and the provider adapters: answers a provider (or a proxy in
front of it) gets wrong must become classified errors or estimates, never exceptions that fail a whole batch,
pay twice and wedge a batch job; a provider's Retry-After never pauses a dispatch partition for long."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest

from frugalstream.gateway.audits import AuditCalls, InProcessCompleted
from frugalstream.gateway.batch_runner import BatchRunner
from frugalstream.gateway.idempotency import MemoryCompleted
from frugalstream.gateway.logic import Gateway
from frugalstream.llm.providers import AnthropicProvider, Completion, OpenAIProvider, ProviderError
from frugalstream.llm.providers.anthropic_batch import AnthropicBatchJobs
from frugalstream.llm.providers.batch_api import BatchCall, BatchPoll
from frugalstream.llm.providers.openai_batch import BatchStatus, OpenAIBatchClient
from frugalstream.runtime.records import Decoded, Out, Record
from frugalstream.runtime.stage import BatchContext, run_batch
from frugalstream.schemas import ChatMessage, RoutedRequest, SamplingParams, TokenUsage, ToolCall
from frugalstream.schemas import topics as t
from tests.unit.test_audit_spend_kept import LLM_JUDGE, Priced, _audit
from tests.unit.test_batch_runner import POLICY, Harness, routed

USER = (ChatMessage(role="user", content="hi"),)
TEXT = {"role": "assistant", "content": "We open at 9."}
LONG_ID_CALL = {"role": "assistant", "content": None,
                "tool_calls": [{"id": "c" * 300, "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


def _raw(body: str, status: int = 200, headers: dict[str, str] | None = None) -> httpx.MockTransport:
    sent = {"content-type": "application/json", **(headers or {})}
    return httpx.MockTransport(lambda _: httpx.Response(status, content=body.encode(), headers=sent))


def _openai_body(usage: str, message: dict[str, Any] = TEXT) -> str:
    return '{"choices":[{"finish_reason":"stop","message":' + json.dumps(message) + '}],"usage":' + usage + "}"


class Made:
    def __init__(self) -> None:
        self.providers: list[OpenAIProvider | AnthropicProvider] = []
        self.calls = 0

    def counting(self, transport: httpx.MockTransport) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            self.calls += 1
            return await transport.handle_async_request(request)

        return httpx.MockTransport(handle)

    def openai(self, body: str, status: int = 200, headers: dict[str, str] | None = None) -> OpenAIProvider:
        provider = OpenAIProvider(api_key="sk-test", transport=self.counting(_raw(body, status, headers)))
        self.providers.append(provider)
        return provider

    def anthropic(self, body: str) -> AnthropicProvider:
        provider = AnthropicProvider(api_key="ak-test", transport=self.counting(_raw(body)))
        self.providers.append(provider)
        return provider


@pytest.fixture
async def made() -> AsyncIterator[Made]:
    harness = Made()
    yield harness
    for provider in harness.providers:
        await provider.aclose()


async def _ask(provider: OpenAIProvider | AnthropicProvider) -> Any:
    return await provider.complete(model="gpt-4o-mini", messages=USER, sampling=SamplingParams())


# --- answers the schema cannot hold ---------------------------------------------------------------------

@pytest.mark.parametrize("usage", [
    '{"prompt_tokens":1e12,"completion_tokens":1}',  # over the 10^11 a usage field may hold
    '{"prompt_tokens":Infinity,"completion_tokens":1}',  # Python's json reads these; int() of them raises
    '{"prompt_tokens":5,"completion_tokens":NaN}',
])
async def test_an_openai_usage_that_cannot_be_true_is_estimated_not_raised(made: Made, usage: str) -> None:
    done = await _ask(made.openai(_openai_body(usage)))
    assert done.content == "We open at 9." and done.usage.estimated, "billed as a tiktoken estimate"


@pytest.mark.parametrize("usage", [
    '{"input_tokens":1,"output_tokens":Infinity}',
    '{"input_tokens":1,"output_tokens":1,"cache_read_input_tokens":1e13}',
    '{"input_tokens":9e10,"output_tokens":1,"cache_read_input_tokens":9e10,"cache_creation_input_tokens":9e10}',
])
async def test_an_anthropic_usage_that_cannot_be_true_is_estimated_not_raised(made: Made, usage: str) -> None:
    body = '{"content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":' + usage + "}"
    done = await _ask(made.anthropic(body))
    assert done.content == "hi" and done.usage.estimated


async def test_a_tool_call_the_schema_cannot_hold_is_a_malformed_answer(made: Made) -> None:
    with pytest.raises(ProviderError) as openai_error:
        await _ask(made.openai(_openai_body('{"prompt_tokens":1,"completion_tokens":1}', LONG_ID_CALL)))
    body = json.dumps({"content": [{"type": "tool_use", "id": "x", "name": "n" * 300, "input": {}}],
                       "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 1}})
    with pytest.raises(ProviderError) as anthropic_error:
        await _ask(made.anthropic(body))
    assert openai_error.value.kind == anthropic_error.value.kind == "malformed"


async def test_a_body_nested_too_deeply_is_a_malformed_answer(made: Made) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ProviderError) as ok_status:
        await _ask(made.openai(deep))
    with pytest.raises(ProviderError) as error_status:
        await _ask(made.openai(deep, status=500))
    assert (ok_status.value.kind, error_status.value.kind) == ("malformed", "server")


async def test_the_gateway_answers_a_malformed_answer_once_instead_of_failing_the_batch(made: Made) -> None:
    """Before: the ValidationError escaped `handle`, the stage retried the request alone (paying again) and
    dead-lettered it, with no usage for either call."""
    provider = made.openai(_openai_body('{"prompt_tokens":1,"completion_tokens":1}', LONG_ID_CALL))
    gateway = Gateway({"simulated": provider}, MemoryCompleted())
    [result] = await gateway.handle([routed(1, latency="interactive")], can_defer=False)
    assert result.outcome == "failed" and result.response is not None and not result.response.ok
    assert made.calls == 1, "malformed is not retried on the same model"
    [again] = await gateway.handle([routed(1, latency="interactive")], can_defer=False)
    assert again.outcome == "replayed" and made.calls == 1


# --- provider batches -----------------------------------------------------------------------------------

async def test_a_batch_output_file_the_schema_cannot_hold_still_reads_line_by_line() -> None:
    good = {"custom_id": "ok", "response": {"status_code": 200, "body": {
        "choices": [{"finish_reason": "stop", "message": TEXT}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1}}}}
    long_id = {"custom_id": "tool", "response": {"status_code": 200, "body": {
        "choices": [{"finish_reason": "tool_calls", "message": LONG_ID_CALL}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1}}}}
    lines = [json.dumps(good), json.dumps(long_id).replace('"prompt_tokens": 1,', '"prompt_tokens": Infinity,'),
             '{"custom_id":"deep","x":' + "[" * 100_000 + "]" * 100_000 + "}"]

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content="\n".join(lines).encode())

    client = OpenAIBatchClient(api_key="sk-test", transport=httpx.MockTransport(handle))
    try:
        with pytest.raises(ProviderError) as deep:  # the whole file is unreadable: a classified error, not a crash
            await client.results(BatchStatus("b", "completed", output_file_id="f"), "gpt-4o-mini")
        assert deep.value.kind == "malformed"
        lines.pop()
        results = await client.results(BatchStatus("b", "completed", output_file_id="f"), "gpt-4o-mini")
    finally:
        await client.aclose()
    assert not isinstance(results["ok"], ProviderError)
    assert isinstance(results["tool"], ProviderError) and results["tool"].kind == "malformed"


class BrokenPoll:
    """A batch backend whose results cannot be read for a reason nobody foresaw."""

    name = "simulated"
    simulated = True

    async def submit(self, job_id: str, model: str, calls: Sequence[BatchCall]) -> str:
        return "b1"

    async def find(self, job_id: str) -> str | None:
        return None

    async def poll(self, batch_id: str, model: str) -> BatchPoll:
        raise RuntimeError("an answer nobody foresaw")

    async def cancel(self, batch_id: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_a_poll_that_fails_unexpectedly_does_not_keep_a_member_past_its_deadline() -> None:
    """Before: the exception left `_advance` before the deadline fallback, every tick: the job was wedged and
    its members never answered."""
    h = Harness()
    h.runner = BatchRunner(h.runner.gateway, h.store, {"simulated": BrokenPoll()}, POLICY, emit=h.emit,
                           clock=h.clock)
    await h.intake([routed(1)])
    await h.advance(POLICY.gather_s + 1)  # submitted, then polled: the poll raises
    assert h.store.jobs()[0].state == "submitted" and not h.emitted
    await h.advance(3600 - POLICY.fallback_margin_s)  # due: answered interactively whatever the poll does
    assert [(r.outcome, r.response is not None and r.response.ok) for r in h.emitted] == [("paid", True)]


# --- Retry-After ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{"retry-after": "999999999"}, {"retry-after-ms": "1e400"},
                                     {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}])
async def test_a_huge_retry_after_defers_the_partition_briefly(made: Made, headers: dict[str, str]) -> None:
    """Before: the dispatch partition (every tenant on it) was paused for as long as the provider said: years,
    or forever for an infinite value."""
    provider = made.openai('{"error":{"message":"slow down"}}', status=429, headers=headers)
    gateway = Gateway({"simulated": provider}, MemoryCompleted())
    [result] = await gateway.handle([routed(1, latency="interactive")], can_defer=True)
    assert result.outcome == "deferred" and result.retry_after_s is not None
    assert 0 < result.retry_after_s <= 300


# --- a request that raises in a batch of others ---------------------------------------------------------

class SlowUnlessBroken:
    """The prompt "broken" raises at once, as an adapter bug or a body it cannot build would; a first call of any
    other prompt answers once a second call of it comes, or after a second."""

    name = "simulated"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.again = asyncio.Event()

    async def complete(self, *, model: str, messages: Sequence[ChatMessage], **_: Any) -> Completion:
        prompt = str(messages[-1].content)
        self.calls[prompt] += 1
        if prompt == "broken":
            raise KeyError("name")
        if self.calls[prompt] > 1:
            self.again.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.again.wait(), 1.0)
        return Completion(content="ok", model=model, usage=TokenUsage(input_tokens=5, output_tokens=1),
                          finish_reason="stop", latency_ms=1.0, simulated=True)

    async def aclose(self) -> None:
        return None


def _with_prompt(i: int, prompt: str) -> RoutedRequest:
    base = routed(i, latency="interactive")
    request = base.request.model_copy(update={"messages": (ChatMessage(role="user", content=prompt),)})
    return base.model_copy(update={"request": request})


async def test_a_request_that_raises_never_makes_the_stage_pay_again_for_its_siblings_in_flight() -> None:
    """The stage retries a batch that raised record by record at once. Before: `handle` raised as soon as one
    call did, while its siblings (other tenants' requests too) were still being paid for, unrecorded: each
    record's own retry called the provider again."""
    provider = SlowUnlessBroken()
    gateway = Gateway({"simulated": provider}, MemoryCompleted())
    batch = [_with_prompt(1, "broken"), _with_prompt(2, "When do you open?")]
    items = [Decoded(Record(t.DISPATCH, 0, offset, None, None, ()), r) for offset, r in enumerate(batch)]

    async def process(good: Sequence[Decoded[RoutedRequest]], _ctx: BatchContext) -> list[Out]:
        results = await gateway.handle([d.value for d in good], [d.record.partition for d in good])
        return [Out(t.RESPONSES, r.response) for r in results if r.response is not None]

    bad: list[Any] = []
    done = await run_batch(process, items, bad)
    assert [rec.offset for rec, _ in bad] == [0], "the request that raises is dead-lettered, alone"
    assert provider.calls["When do you open?"] == 1, "its sibling is paid once, and replayed"
    assert sum(1 for o in done.outs if o.topic == t.RESPONSES) == 2


async def test_an_anthropic_function_tool_without_a_name_is_a_client_error(made: Made) -> None:
    provider = made.anthropic(json.dumps({"content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                                          "usage": {"input_tokens": 1, "output_tokens": 1}}))
    with pytest.raises(ProviderError) as refused:
        await provider.complete(model="claude-3-5-haiku", messages=USER, sampling=SamplingParams(),
                                tools=({"type": "function", "function": {"description": "no name"}},))
    assert refused.value.kind == "client" and made.calls == 0


async def test_one_tenants_unbuildable_request_does_not_refuse_everyones_anthropic_batch() -> None:
    """Before: the Message Batch was refused whole (a client error building one line), and every member of the
    job, other tenants' too, was called interactively at the full price."""
    posted: list[dict[str, Any]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        posted.append(json.loads(request.content))
        return httpx.Response(200, json={"id": "msgbatch_1", "processing_status": "in_progress"})

    transport = httpx.MockTransport(handle)
    chat = AnthropicProvider(api_key="ak-test", transport=transport)
    jobs = AnthropicBatchJobs(chat, api_key="ak-test", transport=transport)
    broken = (ChatMessage(role="user", content="look it up"),
              ChatMessage(role="assistant", tool_calls=(ToolCall(id="c1", name="lookup", arguments="{not json"),)),
              ChatMessage(role="tool", tool_call_id="c1", content="shipped"))
    try:
        batch_id = await jobs.submit("job-1", "claude-3-5-haiku", [
            BatchCall(custom_id="rgood", model="claude-3-5-haiku", messages=USER),
            BatchCall(custom_id="rbroken", model="claude-3-5-haiku", messages=broken)])
        with pytest.raises(ProviderError) as refused:  # nothing left to send: refused, every member called now
            await jobs.submit("job-2", "claude-3-5-haiku", [
                BatchCall(custom_id="rbroken", model="claude-3-5-haiku", messages=broken)])
    finally:
        await jobs.aclose()
        await chat.aclose()
    assert batch_id == "msgbatch_1" and refused.value.kind == "client"
    assert [r["custom_id"] for r in posted[0]["requests"]] == ["rgood"], "the broken line is left out (missing)"


# --- secrets --------------------------------------------------------------------------------------------

SECRET = "sk-live-0123456789abcdefSECRET"


@pytest.mark.parametrize(("status", "body"), [
    (401, json.dumps({"error": {"code": "invalid_api_key", "message": f"Incorrect API key provided: {SECRET}."}})),
    (502, f"upstream refused; request headers: authorization: Bearer {SECRET}"),  # a proxy dumping headers
])
async def test_a_provider_error_echoing_the_api_key_never_carries_it(status: int, body: str) -> None:
    """Before: the key went into the ProviderError, the log line, and the error answer the tenant reads."""
    openai = OpenAIProvider(api_key=SECRET, transport=_raw(body, status))
    anthropic = AnthropicProvider(api_key=SECRET, transport=_raw(body, status))
    gateway = Gateway({"simulated": openai}, MemoryCompleted())
    try:
        for provider in (openai, anthropic):
            with pytest.raises(ProviderError) as failed:
                await _ask(provider)
            assert SECRET not in str(failed.value) and "[redacted]" in str(failed.value)
        [result] = await gateway.handle([routed(1, latency="interactive")], can_defer=False)
    finally:
        await openai.aclose()
        await anthropic.aclose()
    assert result.response is not None and result.response.error is not None
    assert SECRET not in result.response.model_dump_json()


# --- audits ---------------------------------------------------------------------------------------------

async def test_an_audit_delivered_twice_in_one_batch_is_run_and_answered_once() -> None:
    """A replayed paid answer is sampled again, so one audit id can come twice in a batch. Before: the judge
    calls were deduplicated by the gateway and `zip(strict=True)` raised, failing the whole audit batch."""
    provider = Priced()
    calls = AuditCalls(LLM_JUDGE, Gateway({"simulated": provider}, InProcessCompleted()))
    audit = _audit()
    twice = [Decoded(Record(t.AUDITS_DISPATCH, 0, offset, None, None, ()), audit) for offset in range(2)]
    outs = await calls.on_dispatch(twice, BatchContext())
    assert len(provider.asked) == 2, "the counterfactual call and the judge's, once each"
    assert len([o for o in outs if o.topic == t.AUDITS_ANSWERED]) == 1
