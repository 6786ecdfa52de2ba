"""Provider faults from a fake OpenAI-compatible server on 127.0.0.1, through the real OpenAI adapter.

The server misbehaves per request, chosen by the user message (`fault:<kind>`), and only for the routed
model unless the message says `all` (`429round`: every model is rate limited once, then answers): so a
request shows retries, then the tier's fallback model, then an error answer with the reason. A 429 with
Retry-After on the real broker pauses the partition instead of sleeping in the handler: the other
partitions keep being answered meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from frugalstream.bootstrap import Resources
from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.gateway.idempotency import MemoryCompleted
from frugalstream.gateway.logic import Gateway, Result
from frugalstream.llm.providers import OpenAIProvider
from frugalstream.llm.resilience import BreakerRegistry, CircuitBreaker, RetryPolicy
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runner import RunningServices
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, LLMRequest, LLMResponse, RoutedRequest
from frugalstream.schemas import topics as t
from frugalstream.tools.embedded_broker import EmbeddedBroker
from tests.integration.test_faults_helpers import FakeChatServer, read_topics, responses_by_id

pytestmark = [pytest.mark.integration]
OK_BODY = {"choices": [{"message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 12, "completion_tokens": 3}}


class FakeOpenAI(FakeChatServer):
    """Misbehaves per request, chosen by the user message (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: Counter[str] = Counter()  # fault text -> requests received

    async def answer(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        messages = body["messages"]
        assert isinstance(messages, list)
        text: str = messages[-1]["content"]
        self.hits[text] += 1
        kind = text.split(":")[1] if text.startswith("fault:") else "ok"
        primary = body["model"] == "gpt-4o-mini" or "all" in text
        if not primary or kind == "ok" or (kind == "429round" and self.hits[text] > 2):
            send(writer, 200, json.dumps(OK_BODY | {"model": body["model"]}))
        elif kind in ("429", "429round"):
            send(writer, 429, '{"error": {"message": "slow down"}}', "retry-after: 2\r\n")
        elif kind == "5xx":
            send(writer, 503, '{"error": {"message": "overloaded"}}')
        elif kind == "malformed":
            send(writer, 200, "<html>gateway error</html>")
        elif kind == "timeout":
            await asyncio.sleep(1.0)  # past the client's 0.5 s timeout
            return False
        elif kind == "reset":
            writer.transport.abort()
            return False
        elif kind == "partial":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"choi")
            await writer.drain()
            writer.transport.abort()
            return False
        await writer.drain()
        return True


def send(writer: asyncio.StreamWriter, status: int, body: str, extra: str = "") -> None:
    data = body.encode()
    writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
                 f"{extra}\r\n".encode() + data)


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


def provider(server: FakeOpenAI) -> OpenAIProvider:
    return OpenAIProvider(base_url=server.url, api_key="sk-test", timeout_s=0.5, connect_timeout_s=0.5)


def answer_of(result: Result) -> LLMResponse:
    assert result.response is not None, f"no answer: {result.outcome}"
    return result.response


def openai_settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(provider="openai", state_dir=tmp_path, kafka_idempotent=False, **kw)  # type: ignore[arg-type]


async def route(settings: Settings, texts: list[str], prefix: str = "r") -> list[RoutedRequest]:
    requests = [LLMRequest(id=f"{prefix}{i}", tenant="acme", messages=(ChatMessage(role="user", content=x),))
                for i, x in enumerate(texts)]
    results = await Classifier(settings, TokenCounter()).handle(requests)
    routed = [r.routed for r in results if isinstance(r, Routed)]
    assert all(r.route.model == "gpt-4o-mini" and r.route.fallbacks for r in routed)
    return routed


@pytest.mark.parametrize("kind", ["5xx", "malformed", "timeout", "reset", "partial", "429"])
async def test_fault_is_retried_then_falls_back_then_answers_with_the_reason(
    fake_openai: FakeOpenAI, tmp_path: Path, kind: str,
) -> None:
    settings = openai_settings(tmp_path)
    gateway = Gateway({"openai": provider(fake_openai)}, MemoryCompleted(),
                      policy=RetryPolicy(attempts=2, base_delay_s=0.01, max_delay_s=0.02))
    first, down = await route(settings, [f"fault:{kind}:one?", f"fault:{kind}:all?"])
    started = time.monotonic()
    results = await gateway.handle([first, down], can_defer=False)
    elapsed = time.monotonic() - started
    await gateway.providers["openai"].aclose()
    answer, error = (answer_of(r) for r in results)
    # Not retried on the same model: a malformed body, and a Retry-After longer than the gateway waits inline.
    retried = 1 if kind in ("malformed", "429") else 2
    assert fake_openai.hits[f"fault:{kind}:one?"] == retried + 1, "retries on the model, then one fallback call"
    assert answer.source == "llm" and answer.model != "gpt-4o-mini", "the tier's fallback model answered"
    assert error.source == "error" and error.error is not None
    assert "gpt-4o-mini" in error.error.message and error.error.message.startswith("all models failed")
    assert elapsed < 4.0, "a 2 s Retry-After is not slept in the handler"


async def test_circuit_breaker_stops_hammering_a_provider_that_is_down(fake_openai: FakeOpenAI,
                                                                        tmp_path: Path) -> None:
    settings = openai_settings(tmp_path)
    breakers = BreakerRegistry(lambda: CircuitBreaker(failure_threshold=3, cooldown_s=60))
    gateway = Gateway({"openai": provider(fake_openai)}, MemoryCompleted(), breakers=breakers,
                      policy=RetryPolicy(attempts=2, base_delay_s=0.0, max_delay_s=0.0))
    routed = await route(settings, [f"fault:5xx:all {i}?" for i in range(20)])
    for r in routed:  # one at a time, as a stream arrives
        await gateway.handle([r], can_defer=False)
    await gateway.providers["openai"].aclose()
    assert sum(fake_openai.hits.values()) <= 8, "after the circuits open, calls stop reaching the provider"
    last = answer_of((await gateway.handle([routed[-1].model_copy(update={"request": routed[-1].request.model_copy(
        update={"id": "later"})})], can_defer=False))[0])
    assert last.error is not None and last.error.code == "circuit_open"


async def test_429_with_retry_after_pauses_the_partition_not_the_handler(
    fake_openai: FakeOpenAI, embedded_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path,
) -> None:
    settings = openai_settings(tmp_path, kafka_bootstrap=embedded_broker.bootstrap, kafka_fetch_max_wait_ms=50,
                               kafka_session_timeout_ms=6000, topic_prefix=f"{topic_prefix}.",
                               group_prefix=topic_prefix)
    await embedded_broker.create_topics({settings.topic(n): 2 for n in t.ALL_TOPICS})
    limited = (await route(settings, ["fault:429round:all limited?"], "limited"))[0]
    others = await route(settings, [f"plain question {i}?" for i in range(10)], "o")
    resources = Resources(settings, provider_factory=lambda _n: provider(fake_openai))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        async with RunningServices(["gateway"], resources):
            sent = time.time()
            await producer.send_and_wait(settings.topic(t.DISPATCH), limited.model_dump_json().encode(), partition=0)
            for r in others:  # same partition behind it, and the other partition
                await producer.send_and_wait(settings.topic(t.DISPATCH), r.model_dump_json().encode(),
                                             partition=int(r.request.id[1:]) % 2)
            ids = {"limited0", *(r.request.id for r in others)}
            records = await read_topics(settings, [t.RESPONSES], done=lambda rs: set(responses_by_id(rs)) >= ids,
                                        timeout_s=60)
    finally:
        await producer.stop()
    first_seen: dict[str, float] = {}
    for rec in records:
        rid = json.loads(rec.value)["request_id"]
        first_seen.setdefault(rid, rec.timestamp / 1000 - sent)
    by_id = responses_by_id(records)
    assert all(len(m) == 1 and sum(m.values()) == 1 for m in by_id.values()), "held-back answers are sent once"
    assert '"source":"llm"' in next(iter(by_id["limited0"])), "the rate-limited request is answered after the wait"
    assert first_seen["limited0"] >= 1.9
    other_partition = [first_seen[r.request.id] for r in others if int(r.request.id[1:]) % 2 == 1]
    assert max(other_partition) < first_seen["limited0"], "the other partition flowed while partition 0 waited"
    assert fake_openai.hits["fault:429round:all limited?"] == 3, "both models limited once, then one success"
