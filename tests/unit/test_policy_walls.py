"""Walls the tenant policy grants, never the request: reply topics, shared scopes, unpriced pins, sampled answers,
and a terminal answer for an invalid request. Plus: the classifier's CPU work stays off the event loop."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any

import pytest
from faststream.kafka import TestKafkaBroker

from frugalstream.classifier import logic as classifier_logic
from frugalstream.classifier.app import ClassifierService, result_outs
from frugalstream.classifier.invalid import invalid_request_answer
from frugalstream.classifier.logic import Classifier
from frugalstream.llm.cache_keys import cache_keys
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.broker import make_broker
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.records import Out, Record
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import ChatMessage, LLMRequest, LLMResponse, RoutedRequest
from frugalstream.schemas import topics as t

CATALOG = PriceCatalog.load()


def ask(rid: str = "r1", tenant: str = "acme", text: str = "What are your opening hours?", **kw: Any) -> LLMRequest:
    return LLMRequest(id=rid, tenant=tenant, messages=(ChatMessage(role="user", content=text),), task_hint="faq",
                      **kw)


async def run(settings: Settings, *requests: LLMRequest, counter: TokenCounter | None = None) -> list[Out]:
    """The logic's results, routed to topics as the service routes them."""
    return result_outs(await Classifier(settings, counter or TokenCounter(), catalog=CATALOG).handle(list(requests)))


def routed_of(outs: Iterable[Out]) -> list[RoutedRequest]:
    return [o.value for o in outs if isinstance(o.value, RoutedRequest)]


def errors_of(outs: Iterable[Out]) -> list[tuple[str, str, str]]:
    """(topic, code, message) of every error response."""
    return [(o.topic, o.value.error.code, o.value.error.message) for o in outs
            if isinstance(o.value, LLMResponse) and o.value.error is not None]


# --- 1. Reply topics -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("topic", [
    "globex.replies",  # another tenant's prefix
    "replies", "acmex.replies",  # no prefix / a prefix that only looks alike
    "llm.responses", "llm.budgets", "llm.cache", "llm.dedupe.waiting", "llm.requests", "llm.gateway.completed",
    "llm_budgets",  # collides with llm.budgets in Kafka
    "llm.requests.dlq", "acme.replies.dlq",  # any DLQ, even under the tenant's prefix
])
async def test_reply_topic_outside_the_grant_is_refused_on_llm_responses_only(topic: str) -> None:
    outs = await run(Settings(), ask(reply_topic=topic))
    assert routed_of(outs) == []
    assert [o.topic for o in outs] == [t.RESPONSES], "never published to the refused topic"
    [(_, code, message)] = errors_of(outs)
    assert code == "reply_topic_denied" and repr(topic) in message
    assert outs[0].key == "r1"


async def test_reply_topic_under_the_tenant_prefix_is_served() -> None:
    [routed] = routed_of(await run(Settings(), ask(reply_topic="acme.replies")))
    assert routed.request.reply_topic == "acme.replies"


async def test_internal_topics_are_refused_whatever_the_policy_and_prefix() -> None:
    settings = Settings(topic_prefix="test-", tenants={
        "acme": TenantPolicy(reply_topic_prefixes=("",)), "llm": TenantPolicy()})
    for tenant, topic in [("acme", "llm.budgets"), ("acme", "test-llm.budgets"), ("acme", "test-llm.cache.dlq"),
                          ("acme", "anything.dlq"), ("llm", "llm.cache")]:  # default prefix `llm.` of tenant llm
        outs = await run(settings, ask(tenant=tenant, reply_topic=topic))
        assert [code for _, code, _ in errors_of(outs)] == ["reply_topic_denied"], (tenant, topic)
    granted = Settings(tenants={"acme": TenantPolicy(reply_topic_prefixes=("shared.replies.",))})
    assert routed_of(await run(granted, ask(reply_topic="shared.replies.acme")))
    assert errors_of(await run(granted, ask(reply_topic="acme.replies")))  # the grant replaces the default


# --- 2. Shared cache scopes ----------------------------------------------------------------------------------

async def test_shared_scope_needs_a_grant() -> None:
    settings = Settings(tenants={"acme": TenantPolicy(shared_scopes=("public-faq",))})
    shared = {"shared_scope": "public-faq"}
    [routed] = routed_of(await run(settings, ask(cache=shared)))
    assert routed.request.cache.shared_scope == "public-faq"
    outs = await run(settings, ask(tenant="globex", cache=shared), ask("r2", cache={"shared_scope": "other"}))
    assert routed_of(outs) == []
    assert sorted((code, "public-faq" in m or "other" in m) for _, code, m in errors_of(outs)) == [
        ("shared_scope_denied", True), ("shared_scope_denied", True)]


# --- 3. Unpriced pins ----------------------------------------------------------------------------------------

async def test_pin_to_an_unpriced_model_is_refused_naming_it() -> None:
    outs = await run(Settings(), ask(model="o3-pro", reply_topic="acme.replies"))
    assert routed_of(outs) == []
    assert [(topic, code, "'o3-pro'" in message) for topic, code, message in errors_of(outs)] == [
        (t.RESPONSES, "unpriced_model", True), ("acme.replies", "unpriced_model", True)]  # a granted topic is fine


async def test_unpriced_pin_is_served_when_the_policy_allows_it() -> None:
    settings = Settings(tenants={"acme": TenantPolicy(allow_unpriced_models=True)})
    [routed] = routed_of(await run(settings, ask(model="o3-pro")))
    assert routed.route.model == "o3-pro" and routed.route.pinned


async def test_priced_pins_by_any_catalog_name_are_served() -> None:
    for pin in ("gpt-4o", "gpt-4o-2024-08-06", "openai/gpt-4o-mini"):
        assert CATALOG.has(pin)
        [routed] = routed_of(await run(Settings(), ask(model=pin)))
        assert routed.route.model == pin


async def test_unpriced_tenant_baseline_falls_back_to_the_default_baseline() -> None:
    settings = Settings(tenants={"acme": TenantPolicy(baseline_model="gpt-99-typo"),
                                 "globex": TenantPolicy(baseline_model="gpt-4.1")})
    [a, g] = routed_of(await run(settings, ask(), ask("r2", tenant="globex")))
    assert a.route.baseline_model == settings.default_baseline_model
    assert g.route.baseline_model == "gpt-4.1"


# --- 6. Sampled answers are not cached; the pin is part of the cache key --------------------------------------

async def test_sampled_request_is_routed_no_store_unless_the_tenant_opts_in() -> None:
    hot = ask(sampling={"temperature": 0.7})
    [routed] = routed_of(await run(Settings(), hot))
    assert routed.request.cache.policy == "no-store" and "sampled_no_store" in routed.route.reason
    assert hot.cache.policy == "default", "the request on llm.requests is not changed"
    assert routed.request.messages == hot.messages and routed.request.id == hot.id
    for cold in (ask(sampling={"temperature": 0.0}), ask()):
        [r] = routed_of(await run(Settings(), cold))
        assert r.request.cache.policy == "default"
    opted = Settings(tenants={"acme": TenantPolicy(cache_sampled=True)})
    [r] = routed_of(await run(opted, hot))
    assert r.request.cache.policy == "default"
    [r] = routed_of(await run(Settings(), ask(sampling={"temperature": 0.7}, cache={"policy": "no-cache"})))
    assert r.request.cache.policy == "no-store"


async def test_pin_reaches_the_cache_keys() -> None:
    pinned = ask(model="gpt-4o")
    [routed] = routed_of(await run(Settings(), pinned))
    assert routed.keys == cache_keys(pinned, routed.route.tier, pinned="gpt-4o")
    [free] = routed_of(await run(Settings(), ask()))
    assert free.keys == cache_keys(ask(), free.route.tier, pinned=None)


# --- 7. Invalid requests get a terminal message ---------------------------------------------------------------

def record(value: bytes | None) -> Record:
    return Record(topic="llm.requests", partition=0, offset=7, key=None, value=value, headers=())


def invalid_request_outs(rec: Record, exc: Exception, settings: Settings) -> list[Out]:
    """What the classifier stage publishes for an undecodable request."""
    return ClassifierService(settings, Classifier(settings, TokenCounter(), catalog=CATALOG))._on_invalid(rec, exc)


def validation_error(raw: bytes) -> Exception:
    try:
        LLMRequest.model_validate_json(raw)
    except Exception as exc:
        return exc
    raise AssertionError("expected the raw request to be invalid")


def test_invalid_request_gets_an_error_with_field_paths_and_no_prompt_text() -> None:
    raw = json.dumps({"id": "bad-1", "tenant": "acme", "reply_topic": "acme.replies", "created_at": 12.5,
                      "messages": [{"role": "robot", "content": "SECRET PROMPT TEXT"}]}).encode()
    outs = invalid_request_outs(record(raw), validation_error(raw), Settings())
    assert [(o.topic, o.key) for o in outs] == [(t.RESPONSES, "bad-1")], "llm.responses only, never reply_topic"
    response = outs[0].value
    assert isinstance(response, LLMResponse) and response.error is not None
    assert (response.request_id, response.tenant, response.source, response.created_at) == (
        "bad-1", "acme", "error", 12.5)
    assert response.error.code == "invalid_request" and "messages.0.role" in response.error.message
    assert "SECRET" not in response.model_dump_json()


def test_oversized_request_is_answered_too_large() -> None:
    settings = Settings(max_message_bytes=1_000)
    raw = json.dumps({"id": "big-1", "tenant": "acme", "messages": [{"role": "user", "content": "x" * 5_000}]})
    outs = invalid_request_outs(record(raw.encode()), ValueError("too big"), settings)
    [response] = [o.value for o in outs]
    assert isinstance(response, LLMResponse) and response.error is not None
    assert response.error.code == "too_large" and "1000-byte" in response.error.message


@pytest.mark.parametrize("raw", [
    None, b"", b"not json", b"[1, 2]", b'{"id": "x"}', b'{"tenant": "acme"}', b'{"id": 5, "tenant": "acme"}',
    json.dumps({"id": "x" * 129, "tenant": "acme"}).encode(), json.dumps({"id": "x", "tenant": ""}).encode(),
    b"\xff\xfe\x00garbage",
])
def test_unidentifiable_invalid_request_gets_nothing(raw: bytes | None) -> None:
    assert invalid_request_answer(raw, ValueError("bad"), Settings()) is None
    assert invalid_request_outs(record(raw), ValueError("bad"), Settings()) == []


async def test_invalid_request_is_answered_through_the_classifier_stage(settings: Settings) -> None:
    """Wired on the `llm.requests` subscriber: the caller hears back and the record is still dead-lettered."""
    service = ClassifierService(settings, Classifier(settings, TokenCounter(), catalog=CATALOG))
    broker = make_broker(settings)
    publisher = Publisher(broker, settings)
    got: list[bytes] = []
    dead: list[bytes] = []
    broker.subscriber(settings.topic(t.RESPONSES), group_id="t")(lambda body: got.append(body))
    broker.subscriber(settings.topic(t.dlq_topic(t.REQUESTS)), group_id="t2")(lambda body: dead.append(body))
    service.register(broker, publisher)
    raw = json.dumps({"id": "bad-2", "tenant": "acme", "messages": []}).encode()
    async with TestKafkaBroker(broker):
        await broker.publish(raw, settings.topic(t.REQUESTS))
    assert len(dead) == 1
    [response] = [LLMResponse.model_validate(b if isinstance(b, dict) else json.loads(b)) for b in got]
    assert response.request_id == "bad-2" and response.error is not None
    assert response.error.code == "invalid_request"


# --- 8. CPU work off the event loop ---------------------------------------------------------------------------

class ThreadRecordingCounter(TokenCounter):
    def __init__(self) -> None:
        self.threads: set[int] = set()

    def count_message(self, message: ChatMessage, model: str) -> int:
        self.threads.add(threading.get_ident())
        return super().count_message(message, model)


async def test_counting_trimming_and_key_hashing_run_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread = threading.get_ident()
    key_threads: set[int] = set()
    real_keys = cache_keys

    def recording_keys(*args: Any, **kw: Any) -> Any:
        key_threads.add(threading.get_ident())
        return real_keys(*args, **kw)

    monkeypatch.setattr(classifier_logic, "cache_keys", recording_keys)
    counter = ThreadRecordingCounter()
    long_history = tuple(ChatMessage(role="user" if i % 2 == 0 else "assistant", content="word " * 2_000)
                         for i in range(9))
    requests = [LLMRequest(id=f"r{i}", tenant="acme", messages=long_history) for i in range(4)]
    outs = await run(Settings(), *requests, counter=counter)
    assert len(routed_of(outs)) == 4 and any(r.route.trimmed_messages for r in routed_of(outs))
    assert counter.threads and loop_thread not in counter.threads
    assert key_threads and loop_thread not in key_threads


async def test_a_small_batch_is_routed_on_the_loop_and_a_long_one_on_a_worker() -> None:
    """The thread hop costs a small batch more than its work (the loop waits for the GIL the worker holds):
    short prompts stay on the loop, but the threshold is what keeps long histories off it."""
    loop_thread = threading.get_ident()
    short, long = ThreadRecordingCounter(), ThreadRecordingCounter()
    await run(Settings(), LLMRequest(id="s", tenant="acme", messages=(ChatMessage(role="user", content="Hours?"),)),
              counter=short)
    text = "word " * (classifier_logic.INLINE_MAX_CHARS // 5 + 1)
    await run(Settings(), LLMRequest(id="l", tenant="acme", messages=(ChatMessage(role="user", content=text),)),
              counter=long)
    assert short.threads == {loop_thread}
    assert long.threads and loop_thread not in long.threads
