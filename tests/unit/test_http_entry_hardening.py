"""The HTTP entry against a hostile or careless caller, without a broker (a fake transport plays the pipeline):
an Idempotency-Key answers only a retry of the call that chose it; bad input of any kind (too big, too deep,
not Unicode, mistyped tags, a wrong path) is a 4xx in OpenAI's error shape with nothing sent; one tenant
cannot hold every wait of an entry.

The new modules are imported inside the tests that need them, so on the code before these fixes every other
test fails on its own assertion rather than all of them on one import.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiokafka.errors import MessageSizeTooLargeError

from frugalstream.client import FrugalClient
from frugalstream.client.kafka import OnAnswer
from frugalstream.http_entry.app import Entry, build_app
from frugalstream.http_entry.keys import ApiKeys
from frugalstream.http_entry.openai_shape import BadRequest, to_request
from frugalstream.http_entry.pricing import Pricer
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import LLMRequest, LLMResponse, TokenUsage

# Two API keys of one tenant (two apps, two end users), and one of another tenant.
KEYS = {"key-a1": "tenant-a", "key-a2": "tenant-a", "key-b": "tenant-b"}
ASK = {"model": "auto", "messages": [{"role": "user", "content": "What are your hours?"}]}
ALICE = {"model": "auto", "messages": [{"role": "user", "content": "Alice's salary is 91k; draft her review"}]}
BOB = {"model": "auto", "messages": [{"role": "user", "content": "Translate 'good morning' to French"}]}
URL = "/v1/chat/completions"


def auth(key: str, idempotency_key: str | None = None) -> dict[str, str]:
    headers = {"authorization": f"Bearer {key}"}
    return {**headers, "idempotency-key": idempotency_key} if idempotency_key else headers


class FakePipeline:
    """Answers each identity (tenant, id) once, with the question in the answer, as the real pipeline answers
    an identity once; `hold` keeps requests unanswered until `answer`; `fail` makes the send raise."""

    def __init__(self) -> None:
        self.sent: list[LLMRequest] = []
        self.on_answer: OnAnswer | None = None
        self.hold = False
        self.fail: BaseException | None = None
        self.answered: set[tuple[str, str]] = set()

    async def start(self, on_answer: OnAnswer | None) -> None:
        self.on_answer = on_answer

    async def start_reader(self, on_answer: OnAnswer) -> None:
        self.on_answer = on_answer

    async def send(self, request: LLMRequest) -> None:
        if self.fail is not None:
            raise self.fail
        self.sent.append(request)
        if not self.hold:
            asyncio.get_running_loop().call_soon(self.answer, request)

    def answer(self, request: LLMRequest) -> None:
        assert self.on_answer is not None
        if (request.tenant, request.id) in self.answered:
            return
        self.answered.add((request.tenant, request.id))
        self.on_answer(LLMResponse(
            request_id=request.id, tenant=request.tenant, responded_at=time.time(), source="llm",
            content=f"re: {request.messages[-1].content}", model="gpt-4o-mini", tier="small", finish_reason="stop",
            usage=TokenUsage(input_tokens=12, output_tokens=5)), 100)

    async def stop(self) -> None:
        pass


async def http(pipeline: FakePipeline, *, raise_app_exceptions: bool = True,
               **entry: Any) -> AsyncIterator[httpx.AsyncClient]:
    client = FrugalClient("unused", settings=Settings(), transport=pipeline)
    await client.start()
    pricer = Pricer(Settings(), PriceCatalog.load(), TokenCounter())
    app = build_app(Entry(client, ApiKeys(KEYS), pricer, lambda tenant: ["auto", "gpt-4o"], **entry))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with httpx.AsyncClient(transport=transport, base_url="http://entry") as c:
        yield c


def openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The 4xx body OpenAI's SDKs parse: JSON, `error` with message, type, param and code."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.text[:300]
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text[:300]
    text: str = r.json()["choices"][0]["message"]["content"]
    return text


async def until_sent(pipeline: FakePipeline, count: int) -> None:
    async with asyncio.timeout(5):
        while len(pipeline.sent) < count:  # noqa: ASYNC110 (the fake has no event to wait on)
            await asyncio.sleep(0.01)


# --- An Idempotency-Key answers only a retry of the call that chose it ---------------------------------------


def chosen(request_id: str) -> str:
    """The Idempotency-Key inside an HTTP request id (`<caller namespace>.<key>`)."""
    namespace, _, key = request_id.partition(".")
    assert len(namespace) == 16, request_id
    return key


async def test_a_key_another_api_key_of_the_tenant_chose_is_its_own_request() -> None:
    """A key names a request in its caller's namespace: another API key of the tenant sending the same key
    asks its own question; it is never answered with the first caller's answer."""
    pipeline = FakePipeline()
    async for api in http(pipeline):
        alice = await api.post(URL, json=ALICE, headers=auth("key-a1", "job-1"))
        bob = await api.post(URL, json=BOB, headers=auth("key-a2", "job-1"))
        same_body = await api.post(URL, json=ALICE, headers=auth("key-a2", "job-2"))
        again = await api.post(URL, json=ALICE, headers=auth("key-a1", "job-1"))
        other_tenant = await api.post(URL, json=BOB, headers=auth("key-b", "job-1"))
    assert "salary" in content(alice) and content(again) == content(alice), "a true retry is still replayed"
    assert "good morning" in content(bob) and "salary" not in content(bob)
    assert "salary" in content(same_body)
    assert "good morning" in content(other_tenant), "another tenant's same key is its own identity"
    assert [(s.tenant, chosen(s.id)) for s in pipeline.sent] == [
        ("tenant-a", "job-1"), ("tenant-a", "job-1"), ("tenant-a", "job-2"), ("tenant-b", "job-1")]
    assert len({s.id for s in pipeline.sent}) == 4


async def test_a_key_naming_a_kafka_producers_request_never_returns_its_answer() -> None:
    """The tenant's Kafka producer asked under id `order-123-faq`; its answer passes on llm.responses, which the
    entry reads whole. An HTTP caller sending that id as its key asks its own question."""
    pipeline = FakePipeline()
    async for api in http(pipeline):
        assert pipeline.on_answer is not None
        pipeline.on_answer(LLMResponse(
            request_id="order-123-faq", tenant="tenant-a", responded_at=time.time(), source="llm",
            content="Alice's salary is 91k.", model="gpt-4o-mini", tier="small", finish_reason="stop",
            usage=TokenUsage(input_tokens=12, output_tokens=5)), 100)
        r = await api.post(URL, json=BOB, headers=auth("key-a2", "order-123-faq"))
    assert "good morning" in content(r) and "salary" not in r.text
    assert [chosen(s.id) for s in pipeline.sent] == ["order-123-faq"]
    assert r.headers["x-frugal-request-id"] == pipeline.sent[0].id != "order-123-faq"


async def test_a_key_reused_with_another_body_is_409() -> None:
    pipeline = FakePipeline()
    async for api in http(pipeline):
        assert "salary" in content(await api.post(URL, json=ALICE, headers=auth("key-a1", "job-1")))
        for body in (BOB, {**ALICE, "temperature": 0.2}, {**ALICE, "user": "mallory"}):
            openai_error(await api.post(URL, json=body, headers=auth("key-a1", "job-1")), 409,
                         "idempotency_key_reused")
        # the volatile created_at and the presentation (stream) are not part of the call
        replay = await api.post(URL, json={**ALICE, "stream": True}, headers=auth("key-a1", "job-1"))
        assert replay.status_code == 200 and "salary" in replay.text
    assert len(pipeline.sent) == 1


async def test_a_reused_key_never_shares_a_wait_in_flight_but_a_retry_does() -> None:
    pipeline = FakePipeline()
    pipeline.hold = True
    async for api in http(pipeline, timeout_s=5):
        alice = asyncio.create_task(api.post(URL, json=ALICE, headers=auth("key-a1", "job-2")))
        await until_sent(pipeline, 1)
        retry = asyncio.create_task(api.post(URL, json=ALICE, headers=auth("key-a1", "job-2")))
        pipeline.hold = False  # Bob's call is answered at once; Alice's stays in flight
        bobs = await api.post(URL, json=BOB, headers=auth("key-a2", "job-2"))
        pipeline.answer(pipeline.sent[0])
        first, second = await asyncio.gather(alice, retry)
    assert "salary" in content(first) and content(second) == content(first)
    assert "good morning" in content(bobs), "Bob's question was asked, not joined to Alice's wait"
    assert len({s.id for s in pipeline.sent}) == 2, "the retry is Alice's identity again (answered once)"


def test_the_fingerprint_is_who_asked_what_without_the_volatile_fields() -> None:
    from frugalstream.http_entry.idempotency import fingerprint

    first, _, _ = to_request(ALICE, tenant="t", request_id="k")
    later = first.model_copy(update={"created_at": first.created_at + 5})  # type: ignore[operator]
    other, _, _ = to_request(BOB, tenant="t", request_id="k")
    assert fingerprint(b"key-1", first) == fingerprint(b"key-1", later)
    assert fingerprint(b"key-1", first) != fingerprint(b"key-2", first)
    assert fingerprint(b"key-1", first) != fingerprint(b"key-1", other)


def test_bindings_outlive_the_boards_memory_and_stay_bounded() -> None:
    import inspect

    from frugalstream.client import AnswerBoard
    from frugalstream.http_entry.idempotency import BOARD_REMEMBER, BOARD_REMEMBER_S, KeyBindings

    board = inspect.signature(AnswerBoard.__init__).parameters
    assert board["remember"].default <= BOARD_REMEMBER and board["remember_s"].default <= BOARD_REMEMBER_S
    entry = Entry(None, ApiKeys(KEYS), None, lambda t: [], max_pending=10, timeout_s=30)  # type: ignore[arg-type]
    assert entry.bindings._remember_s == BOARD_REMEMBER_S + 30 and entry.bindings._remember == BOARD_REMEMBER + 10

    now = [0.0]
    bindings = KeyBindings(remember=2, remember_s=10, clock=lambda: now[0])
    assert bindings.claim("t", "k", b"A") == "new" and bindings.claim("t", "k", b"B") == "reused"
    assert bindings.claim("u", "k", b"B") == "new", "bound per tenant"
    now[0] = 8
    assert bindings.claim("t", "k", b"A") == "retry"  # a retry renews the binding
    now[0] = 15
    assert bindings.claim("t", "k", b"B") == "reused", "still bound 7 s after its last use"
    now[0] = 30
    assert bindings.claim("t", "k", b"B") == "new", "forgotten after remember_s"
    bindings.claim("t", "k2", b"x")
    bindings.claim("t", "k3", b"x")
    assert len(bindings) == 2 and bindings.claim("t", "k", b"C") == "new", "the oldest goes first"
    bindings.release("t", "k", b"other")
    assert bindings.claim("t", "k", b"D") == "reused", "only the binding's own call releases it"
    bindings.release("t", "k", b"C")
    assert bindings.claim("t", "k", b"D") == "new"


# --- Too big: 413 in OpenAI's shape, nothing sent ---------------------------------------------------------------


async def test_a_body_over_the_limit_is_413_by_its_length_or_while_it_is_read() -> None:
    pipeline = FakePipeline()

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives, and refused
        yield json.dumps(ASK).encode()  # though what it holds would be a small message
        for _ in range(10):
            yield b" " * 500

    async for api in http(pipeline, max_body_bytes=2000):
        big = {**ASK, "messages": [{"role": "user", "content": "x" * 3000}]}
        openai_error(await api.post(URL, json=big, headers=auth("key-a1")), 413, "request_too_large")
        declared = await api.post(URL, content=b"{}", headers={**auth("key-a1"), "content-length": "2001"})
        openai_error(declared, 413, "request_too_large")  # refused by the declared length, before reading
        openai_error(await api.post(URL, content=chunked(), headers=auth("key-a1")), 413, "request_too_large")
        openai_error(await api.post(URL, content=b"{}", headers={**auth("key-a1"), "content-length": "2x"}), 400)
        assert content(await api.post(URL, json=ASK, headers=auth("key-a1")))
    assert len(pipeline.sent) == 1


async def test_a_request_that_outgrows_the_limit_as_a_message_is_413() -> None:
    pipeline = FakePipeline()
    # 120 empty turns: a 3.4 kB body, but each turn gains its defaulted fields as a message (over 10 kB).
    turns = {"model": "auto", "messages": [{"role": "user", "content": ""}] * 119 + [{"role": "user",
                                                                                        "content": "hi"}]}
    async for api in http(pipeline, max_body_bytes=8000):
        raw = json.dumps(turns).encode()
        assert len(raw) < 8000
        r = await api.post(URL, content=raw, headers={**auth("key-a1"), "content-type": "application/json"})
        openai_error(r, 413, "request_too_large")
    assert pipeline.sent == []


async def test_a_message_the_broker_refuses_is_413_and_frees_the_key() -> None:
    pipeline = FakePipeline()
    pipeline.fail = MessageSizeTooLargeError()
    async for api in http(pipeline):
        openai_error(await api.post(URL, json=ALICE, headers=auth("key-a1", "job-3")), 413, "request_too_large")
        pipeline.fail = None
        assert "good morning" in content(await api.post(URL, json=BOB, headers=auth("key-a1", "job-3"))), (
            "nothing was sent under the key: it is free for the next call")


# --- Malformed: 400 in OpenAI's shape, nothing sent -------------------------------------------------------------


async def test_a_lone_surrogate_escape_is_a_400_that_names_it() -> None:
    pipeline = FakePipeline()
    bodies = [b'{"model":"auto","messages":[{"role":"user","content":"hello \\ud800 there"}]}',
              b'{"model":"auto","messages":[{"role":"user","content":"x"}],"\\udfff":1}']  # in a name we echo
    async for api in http(pipeline):
        errors = [openai_error(await api.post(URL, content=raw, headers={**auth("key-a1"),
                                                                         "content-type": "application/json"}), 400)
                  for raw in bodies]
    assert "not valid Unicode" in errors[0]["message"]
    assert errors[1]["param"] == "\\udfff", "echoed escaped: a lone surrogate cannot be encoded in the answer"
    assert pipeline.sent == []
    with pytest.raises(BadRequest, match="Unicode"):
        to_request({"messages": [{"role": "user", "content": "a \ud800"}]}, tenant="t", request_id="r")


async def test_tags_and_metadata_that_are_not_objects_are_a_400_naming_them() -> None:
    pipeline = FakePipeline()
    bad = [("tags", "vip"), ("tags", 5), ("tags", ["ab"]), ("tags", [1, 2]), ("tags", True), ("tags", []),
           ("metadata", []), ("metadata", 0)]  # falsy ones were read as {}, ["ab"] as {"a": "b"}
    async for api in http(pipeline):
        for name, value in bad:
            r = await api.post(URL, json={**ASK, name: value}, headers=auth("key-a1"))
            assert openai_error(r, 400)["param"] == name, (name, value)
    assert pipeline.sent == []
    good = {**ASK, "tags": {"team": "web"}, "metadata": {"env": "prod"}, "user": "u1"}
    request, _, _ = to_request(good, tenant="t", request_id="r")
    assert request.tags == {"team": "web", "env": "prod", "user": "u1"}, "objects still merge, user included"


async def test_a_deeply_nested_body_is_a_400() -> None:
    pipeline = FakePipeline()
    def deep(depth: int) -> bytes:
        return b"[" * depth + b"]" * depth

    pad = b"x" * 300_000  # over INLINE_JSON_BYTES: parsed on a worker thread's fresh stack, walked on the loop's
    bodies = [b'{"model":"auto","messages":' + deep(5000) + b"}",  # 10 kB: the parser itself gives up
              b'{"model":"auto","messages":[{"role":"user","content":"' + pad + b'"}],"logit_bias":' + deep(990)
              + b"}",  # parsed, then too deep for the checks on the loop
              b'{"model":"auto","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":'
              b'{"name":"f","parameters":{"type":"object","x":' + deep(500) + b"}}}]}"]  # too deep to serialize
    async for api in http(pipeline):
        for raw in bodies:
            r = await api.post(URL, content=raw, headers={**auth("key-a1"), "content-type": "application/json"})
            message = openai_error(r, 400)["message"]
            assert "nested too deeply" in message or "nested deeper than" in message, message
    assert pipeline.sent == []


async def test_unknown_paths_and_methods_answer_in_openai_error_shape() -> None:
    async for api in http(FakePipeline()):
        missing = await api.post("/v1/completions", json=ASK, headers=auth("key-a1"))
        assert "/v1/completions" in openai_error(missing, 404, "unknown_url")["message"]
        wrong = await api.get(URL, headers=auth("key-a1"))
        openai_error(wrong, 405, "method_not_allowed")
        assert wrong.headers["allow"] == "POST"


async def test_a_dead_answer_reader_is_a_503_to_retry_not_a_500() -> None:
    from frugalstream.client import AnswerReaderFailed

    pipeline = FakePipeline()
    pipeline.fail = AnswerReaderFailed("answer reader failed: TopicAuthorizationFailedError()")
    async for api in http(pipeline):
        r = await api.post(URL, json=ASK, headers=auth("key-a1", "job-9"))
    body = openai_error(r, 503, "answers_unavailable")
    assert r.headers["retry-after"] and "job-9" in body["message"]


async def test_an_unforeseen_failure_is_a_500_in_openai_error_shape() -> None:
    pipeline = FakePipeline()
    pipeline.fail = RuntimeError("the broker went away")
    async for api in http(pipeline, raise_app_exceptions=False):
        r = await api.post(URL, json=ASK, headers=auth("key-a1"))
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "broker" not in r.text, "no internals in the answer"


# --- Fair waits: one tenant cannot fill the entry --------------------------------------------------------------


async def test_a_tenant_holding_its_share_of_the_waits_gets_429_alone() -> None:
    pipeline = FakePipeline()
    pipeline.hold = True
    async for api in http(pipeline, max_pending=10, tenant_max_pending=2, timeout_s=5):
        held = [asyncio.create_task(api.post(URL, json=ASK, headers=auth(key, f"w{i}")))
                for i, key in enumerate(("key-a1", "key-a2"))]
        await until_sent(pipeline, 2)
        r = await api.post(URL, json=ASK, headers=auth("key-a1", "w9"))
        openai_error(r, 429, "tenant_pending_limit")
        assert 1 <= int(r.headers["retry-after"]) <= 30
        other = asyncio.create_task(api.post(URL, json=ASK, headers=auth("key-b", "w9")))
        await until_sent(pipeline, 3)
        assert [(s.tenant, chosen(s.id)) for s in pipeline.sent][-1] == ("tenant-b", "w9"), "the other tenant is served"
        for request in list(pipeline.sent):
            pipeline.answer(request)
        assert [w.status_code for w in await asyncio.gather(*held, other)] == [200, 200, 200]
        pipeline.hold = False
        again = await api.post(URL, json=ASK, headers=auth("key-a1", "w9"))
    assert again.status_code == 200, "the waits ended: the tenant is under its share again"


def test_the_entry_takes_its_limits_from_the_settings() -> None:
    from frugalstream.http_entry.server import _entry

    settings = Settings(max_message_bytes=5000, http_max_pending=10, http_tenant_pending_share=0.3)
    entry = _entry(settings, None, ApiKeys(KEYS), Pricer(settings, PriceCatalog.load(), TokenCounter()))  # type: ignore[arg-type]
    assert entry.max_body_bytes == 5000 and entry.tenant_max_pending == 3
    assert _entry(Settings(), None, ApiKeys(KEYS), entry.pricer).tenant_max_pending == 500  # type: ignore[arg-type]
    alone = ApiKeys({"key-1": "solo", "key-2": "solo"})
    assert _entry(settings, None, alone, entry.pricer).tenant_max_pending is None, \
        "one tenant behind the entry keeps the whole queue"  # type: ignore[arg-type]
