"""The HTTP entry and the client without a broker: a fake transport plays the pipeline. What a hostile caller
tries must fail: another tenant's key, a tenant in the body, an Idempotency-Key another tenant already used."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from frugalstream.client import AnswerBoard, FrugalClient
from frugalstream.client.kafka import OnAnswer
from frugalstream.http_entry.app import Entry, build_app, listed_models, retry_after
from frugalstream.http_entry.keys import ApiKeys
from frugalstream.http_entry.pricing import Pricer
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import LLMRequest, LLMResponse, ResponseError, TokenUsage, ToolCall

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
ASK = {"model": "auto", "messages": [{"role": "user", "content": "What are your hours?"}]}


def answer(req: LLMRequest, **fields: Any) -> LLMResponse:
    defaults: dict[str, Any] = {
        "source": "llm", "content": f"answer for {req.tenant}", "model": "gpt-4o-mini", "tier": "small",
        "finish_reason": "stop", "usage": TokenUsage(input_tokens=12, output_tokens=5)}
    return LLMResponse(request_id=req.id, tenant=req.tenant, responded_at=time.time(), **{**defaults, **fields})


class FakePipeline:
    """Answers each request; first publishes an answer with the same id for another tenant, as a shared
    `llm.responses` would carry it, which must reach nobody but that tenant."""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        self.sent: list[LLMRequest] = []
        self.on_answer: OnAnswer | None = None
        self.hold = False

    async def start(self, on_answer: OnAnswer | None) -> None:
        self.on_answer = on_answer

    async def start_reader(self, on_answer: OnAnswer) -> None:
        self.on_answer = on_answer

    async def send(self, request: LLMRequest) -> None:
        self.sent.append(request)
        if not self.hold:
            asyncio.get_running_loop().call_soon(self.answer, request)

    def answer(self, request: LLMRequest) -> None:
        assert self.on_answer is not None
        other = request.model_copy(update={"tenant": "intruder"})
        self.on_answer(answer(other, content="NOT YOURS"), 100)
        self.on_answer(answer(request, **self.fields), 100)

    async def stop(self) -> None:
        pass


@pytest.fixture
async def pipeline() -> FakePipeline:
    return FakePipeline()


async def http(pipeline: FakePipeline, **entry: Any) -> AsyncIterator[httpx.AsyncClient]:
    client = FrugalClient("unused", settings=Settings(), transport=pipeline)
    await client.start()
    pricer = Pricer(Settings(), PriceCatalog.load(), TokenCounter())
    app = build_app(Entry(client, ApiKeys(KEYS), pricer, lambda tenant: ["auto", "gpt-4o"], **entry))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://entry") as c:
        yield c


@pytest.fixture
async def api(pipeline: FakePipeline) -> AsyncIterator[httpx.AsyncClient]:
    async for c in http(pipeline):
        yield c


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_a_key_names_the_tenant_and_the_answer_comes_back_in_openai_shape(
        api: httpx.AsyncClient, pipeline: FakePipeline) -> None:
    r = await api.post("/v1/chat/completions", json=ASK, headers=auth("key-a"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "answer for tenant-a", "refusal": None}
    assert body["usage"]["total_tokens"] == 17 and body["object"] == "chat.completion"
    assert pipeline.sent[0].tenant == "tenant-a" and pipeline.sent[0].model is None, "auto lets frugalstream choose"
    assert r.headers["x-frugal-source"] == "llm" and r.headers["x-frugal-tier"] == "small"
    assert float(r.headers["x-frugal-saving-usd"]) > 0, "gpt-4o-mini instead of the gpt-4o baseline"


async def test_no_valid_key_is_401(api: httpx.AsyncClient, pipeline: FakePipeline) -> None:
    for headers in ({}, auth("key-c"), {"authorization": "key-a"}, auth("")):
        r = await api.post("/v1/chat/completions", json=ASK, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert (await api.get("/v1/models")).status_code == 401
    assert pipeline.sent == []


async def test_a_tenant_in_the_body_never_overrides_the_key(api: httpx.AsyncClient, pipeline: FakePipeline) -> None:
    for field in ({"tenant": "tenant-b"}, {"id": "x"}, {"reply_topic": "tenant-b.answers"}):
        r = await api.post("/v1/chat/completions", json={**ASK, **field}, headers=auth("key-a"))
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(field))
    assert pipeline.sent == []


async def test_an_idempotency_key_reused_by_another_tenant_does_not_collide(
        api: httpx.AsyncClient, pipeline: FakePipeline) -> None:
    same = {"idempotency-key": "order-42"}
    a = await api.post("/v1/chat/completions", json=ASK, headers={**auth("key-a"), **same})
    b = await api.post("/v1/chat/completions", json=ASK, headers={**auth("key-b"), **same})
    assert a.json()["choices"][0]["message"]["content"] == "answer for tenant-a"
    assert b.json()["choices"][0]["message"]["content"] == "answer for tenant-b", "not A's remembered answer"
    assert [(s.tenant, s.id.partition(".")[2]) for s in pipeline.sent] == [("tenant-a", "order-42"),
                                                                             ("tenant-b", "order-42")]
    again = await api.post("/v1/chat/completions", json=ASK, headers={**auth("key-a"), **same})
    assert again.json()["choices"][0]["message"]["content"] == "answer for tenant-a"
    assert len(pipeline.sent) == 2, "a retry with the same key replays the answer instead of asking again"


async def test_unsupported_parameters_are_named(api: httpx.AsyncClient) -> None:
    cases = {"frequency_penalty": 0.4, "n": 3, "logprobs": True, "bogus": 1}
    for name, value in cases.items():
        r = await api.post("/v1/chat/completions", json={**ASK, name: value}, headers=auth("key-a"))
        assert r.status_code == 400 and name in r.json()["error"]["message"], (name, r.text)
    ok = await api.post("/v1/chat/completions", json={**ASK, "frequency_penalty": 0, "n": 1, "store": False},
                        headers=auth("key-a"))
    assert ok.status_code == 200


async def test_a_streamed_answer_is_server_sent_events_with_usage(pipeline: FakePipeline) -> None:
    pipeline.fields = {"content": "one two three four five six seven eight nine ten"}
    async for api in http(pipeline):
        body = {**ASK, "stream": True, "stream_options": {"include_usage": True}}
        r = await api.post("/v1/chat/completions", json=body, headers=auth("key-a"))
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "one two three four five six seven eight nine ten" and len(chunks) > 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] == 5


async def test_tool_calls_come_back_with_finish_reason_tool_calls(pipeline: FakePipeline) -> None:
    pipeline.fields = {"content": "", "tool_calls": (ToolCall(id="c1", name="f", arguments="{}"),),
                       "finish_reason": "tool_calls"}
    async for api in http(pipeline):
        r = await api.post("/v1/chat/completions", json=ASK, headers=auth("key-a"))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [{"id": "c1", "type": "function",
                                                "function": {"name": "f", "arguments": "{}"}}]


async def test_error_answers_map_to_http_statuses(pipeline: FakePipeline) -> None:
    pipeline.fields = {"source": "error", "content": None, "usage": None,
                       "error": ResponseError(code="budget_exceeded", message="monthly budget spent")}
    async for api in http(pipeline):
        r = await api.post("/v1/chat/completions", json=ASK, headers=auth("key-a"))
    assert r.status_code == 429 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["code"] == "budget_exceeded"


async def test_when_behind_the_entry_answers_429_with_retry_after(pipeline: FakePipeline) -> None:
    pipeline.hold = True
    async for api in http(pipeline, max_pending=2, timeout_s=5):
        waiting = [asyncio.create_task(api.post("/v1/chat/completions", json=ASK,
                                                headers={**auth("key-a"), "idempotency-key": f"w{i}"}))
                   for i in range(2)]
        async with asyncio.timeout(5):
            while len(pipeline.sent) < 2:  # noqa: ASYNC110 (the fake has no event to wait on)
                await asyncio.sleep(0.01)
        r = await api.post("/v1/chat/completions", json=ASK, headers=auth("key-b"))
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 30
        assert len(pipeline.sent) == 2, "nothing more is queued"
        for request in list(pipeline.sent):
            pipeline.answer(request)
        assert [w.status_code for w in await asyncio.gather(*waiting)] == [200, 200]


def test_retry_after_follows_the_drain_rate() -> None:
    assert retry_after(100, 50.0) == 2 and retry_after(100, 0.0) == 30 and retry_after(1, 1000.0) == 1


async def test_models_list_auto_first_and_policy_limits() -> None:
    assert listed_models(["a", "b"], None, ["c", "a"]) == ["auto", "a", "b", "c"]
    assert listed_models(["a", "b"], ["b"], ["c"]) == ["auto", "b"]


def test_keys_map_to_tenants_and_dev_has_one_key_only_when_none_is_configured(tmp_path: Any) -> None:
    keys = ApiKeys(KEYS)
    assert keys.tenant("Bearer key-a") == "tenant-a" and keys.tenant("Bearer key-b") == "tenant-b"
    assert keys.tenant("Bearer key-") is None and keys.tenant(None) is None and keys.tenant("key-a") is None
    assert ApiKeys.from_settings(Settings(), dev=True).tenant("Bearer frugal-dev") == "dev"
    assert ApiKeys.from_settings(Settings(), dev=False).tenant("Bearer frugal-dev") is None
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"k1": "acme"}))
    configured = ApiKeys.from_settings(Settings(http_api_keys_file=path), dev=True)
    assert configured.tenant("Bearer k1") == "acme" and configured.tenant("Bearer frugal-dev") is None


async def test_board_delivers_by_tenant_and_id_only() -> None:
    board = AnswerBoard()
    req = LLMRequest(id="same", tenant="a", messages=({"role": "user", "content": "q"},))  # type: ignore[arg-type]
    waiting = board.expect("a", "same")
    assert board.deliver(answer(req.model_copy(update={"tenant": "b"}))) == 0
    assert not waiting.done()
    assert board.deliver(answer(req)) == 1 and waiting.result().tenant == "a"
    assert board.recent("b", "same") is not None and board.recent("c", "same") is None


async def test_client_complete_and_submit(pipeline: FakePipeline) -> None:
    async with FrugalClient("acme", settings=Settings(), transport=pipeline) as client:
        got = await client.complete("What are your hours?", tags={"team": "web"})
        assert got.ok and got.tenant == "acme" and got.content == "answer for acme"
        pipeline.hold = True
        rid = await client.submit("Fire and forget")
        assert pipeline.sent[-1].id == rid and client.board.pending == 0
        with pytest.raises(TimeoutError):
            await client.complete("never answered", timeout_s=0.05)
        assert client.board.pending == 0, "a caller that gave up is forgotten"


def test_sync_client_completes_without_an_event_loop() -> None:
    from frugalstream.client import SyncFrugalClient

    with SyncFrugalClient("acme", settings=Settings(), transport=FakePipeline()) as client:
        assert client.complete("What are your hours?").content == "answer for acme"
        assert client.submit("Fire and forget")
