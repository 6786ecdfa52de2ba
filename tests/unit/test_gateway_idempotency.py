"""The gateway's paid-once promise without Kafka: identity is (tenant, id), records precede answers, retention.

A counting provider stands for the bill: every `complete` call is one paid call, so nothing can collapse it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition

from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.gateway import batch_jobs as batch_jobs_module
from frugalstream.gateway import completed as completed_module
from frugalstream.gateway.app import GatewayService
from frugalstream.gateway.batch_jobs import TopicBatchJobs
from frugalstream.gateway.completed import CompletedLoader, TopicCompleted
from frugalstream.gateway.idempotency import MemoryCompleted
from frugalstream.gateway.logic import Gateway, Result
from frugalstream.llm.identity import request_key
from frugalstream.llm.providers import Completion, ProviderError
from frugalstream.llm.resilience import RetryPolicy
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.metrics import Metrics
from frugalstream.runtime.records import Decoded, Out, Record
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext, Deferral
from frugalstream.runtime.state_topics import PartitionRevokedError
from frugalstream.schemas import (
    BatchJob,
    ChatMessage,
    CompletedCall,
    LLMRequest,
    LLMResponse,
    RoutedRequest,
    TokenUsage,
)
from frugalstream.schemas import topics as t


class CountingProvider:
    """Answers with the tenant-free prompt echo and counts calls per prompt; `fail` makes every call a 5xx, and
    a prompt in `limited` is rate limited with a Retry-After of 30 s."""

    name = "simulated"

    def __init__(self, *, fail: bool = False, limited: frozenset[str] = frozenset()) -> None:
        self.calls: Counter[str] = Counter()
        self.fail = fail
        self.limited = limited

    async def complete(self, *, model: str, messages: Sequence[ChatMessage], **_: Any) -> Completion:
        prompt = str(messages[-1].content)
        self.calls[prompt] += 1
        if self.fail:
            raise ProviderError("down", kind="server", status=503)
        if prompt in self.limited:
            raise ProviderError("slow down", kind="rate_limited", status=429, retry_after_s=30.0)
        return Completion(content=f"answer #{sum(self.calls.values())} to {prompt}", model=model,
                          usage=TokenUsage(input_tokens=5, output_tokens=3), finish_reason="stop", latency_ms=1.0,
                          simulated=True)

    async def aclose(self) -> None:
        return None


class FakePublisher(Publisher):
    """Records what is published, in order; `broken` makes every publish raise (the broker did not ack)."""

    def __init__(self) -> None:
        self.published: list[Out] = []
        self.broken = False

    async def publish_all(self, outs: Sequence[Out], *, service: str = "publisher") -> None:
        if self.broken:
            raise ConnectionError("no ack")
        self.published.extend(outs)


@pytest.fixture
def settings() -> Settings:
    return Settings(kafka_idempotent=False, idempotency_retention_s=3600)


async def routed(settings: Settings, tenant: str, rid: str, prompt: str) -> RoutedRequest:
    request = LLMRequest(id=rid, tenant=tenant, messages=(ChatMessage(role="user", content=prompt),))
    results = await Classifier(settings, TokenCounter()).handle([request])
    found = [r.routed for r in results if isinstance(r, Routed)]
    assert len(found) == 1
    return found[0]


def gateway(provider: CountingProvider, store: Any, metrics: Metrics | None = None) -> Gateway:
    return Gateway({"simulated": provider}, store, policy=RetryPolicy(attempts=1), metrics=metrics or Metrics())


def answer(result: Result) -> LLMResponse:
    assert result.response is not None, f"no answer: {result.outcome}"
    return result.response


def decoded(value: RoutedRequest, partition: int = 0, offset: int = 0) -> Decoded[RoutedRequest]:
    return Decoded(Record(t.DISPATCH, partition, offset, None, None, ()), value)


PAUSING = BatchContext(can_defer=True)


async def test_another_tenant_reusing_an_answered_id_is_called_and_answered_for_itself(settings: Settings) -> None:
    provider = CountingProvider()
    gw = gateway(provider, MemoryCompleted())
    a = await routed(settings, "tenant-a", "order-1", "A's question?")
    b = await routed(settings, "tenant-b", "order-1", "B's question?")
    first_a = answer((await gw.handle([a]))[0])
    got_b = answer((await gw.handle([b]))[0])
    assert provider.calls == Counter({"A's question?": 1, "B's question?": 1}), "B was paid for, not replayed"
    assert got_b.tenant == "tenant-b" and "B's question?" in (got_b.content or "")
    assert got_b.content != first_a.content
    again_a = answer((await gw.handle([a]))[0])  # A's redelivery still replays A's own answer
    assert again_a == first_a and sum(provider.calls.values()) == 2


async def test_copies_in_one_batch_are_called_once_per_tenant_and_id(settings: Settings) -> None:
    provider = CountingProvider()
    gw = gateway(provider, MemoryCompleted())
    a = await routed(settings, "tenant-a", "same", "A asks?")
    b = await routed(settings, "tenant-b", "same", "B asks?")
    results = await gw.handle([a, a, b], [0, 0, 1])
    assert provider.calls == Counter({"A asks?": 1, "B asks?": 1})
    assert {answer(r).tenant for r in results} == {"tenant-a", "tenant-b"}
    assert {r.key for r in results} == {request_key("tenant-a", "same"), request_key("tenant-b", "same")}


async def test_a_redelivery_replays_the_identical_answer_and_usage(settings: Settings) -> None:
    provider = CountingProvider()
    metrics = Metrics()
    gw = gateway(provider, MemoryCompleted(), metrics)
    r = await routed(settings, "acme", "r1", "Once only?")
    first = (await gw.handle([r], [2]))[0]
    second = (await gw.handle([r], [2]))[0]
    assert provider.calls["Once only?"] == 1
    assert (first.outcome, second.outcome) == ("paid", "replayed")
    assert (second.response, second.usage) == (first.response, first.usage)
    assert second.usage is not None, "the replay carries the same usage record"
    assert metrics.registry.get_sample_value("frugal_gateway_outcomes_total", {"outcome": "replayed"}) == 1


async def test_a_final_provider_error_is_recorded_and_replayed_not_retried(settings: Settings) -> None:
    provider = CountingProvider(fail=True)
    gw = gateway(provider, MemoryCompleted())
    r = await routed(settings, "acme", "r1", "Down?")
    first = answer((await gw.handle([r], can_defer=False))[0])
    tried = provider.calls["Down?"]
    second = answer((await gw.handle([r], can_defer=False))[0])
    assert first.source == "error" and second == first
    assert provider.calls["Down?"] == tried, "the redelivery replays the error instead of calling again"


async def test_the_record_is_acknowledged_on_the_dispatch_partition_before_the_answer_is_returned(
    settings: Settings,
) -> None:
    provider = CountingProvider()
    publisher = FakePublisher()
    store = TopicCompleted(settings, publisher)
    service = GatewayService(settings, gateway(provider, store), store=store)
    r = await routed(settings, "acme", "r1", "Durable?")
    handled = await service._on_dispatch([decoded(r, partition=3)], PAUSING)
    assert [o.topic for o in publisher.published] == [t.GATEWAY_COMPLETED], "recorded before anything else"
    record = publisher.published[0]
    assert record.partition == 3 and record.key == request_key("acme", "r1")
    assert isinstance(record.value, CompletedCall) and record.value.response == handled.outs[0].value
    assert all(o.topic != t.GATEWAY_COMPLETED for o in handled.outs), "the stage publishes only the answer"


async def test_an_unacknowledged_record_defers_the_answer_and_is_retried_without_paying_again(
    settings: Settings,
) -> None:
    provider = CountingProvider()
    publisher = FakePublisher()
    gw = gateway(provider, TopicCompleted(settings, publisher))
    r = await routed(settings, "acme", "r1", "Ack?")
    publisher.broken = True
    first = (await gw.handle([r], [0], can_defer=True))[0]
    assert first.response is None and first.usage is None and first.retry_after_s is not None, (
        "no answer published while the record is not durable")
    publisher.broken = False
    second = (await gw.handle([r], [0], can_defer=True))[0]
    assert provider.calls["Ack?"] == 1, "the redelivery did not pay again"
    assert [o.topic for o in publisher.published] == [t.GATEWAY_COMPLETED]
    assert answer(second).source == "llm"


async def test_the_service_sends_the_answer_by_cache_scope_and_the_usage_by_tenant(settings: Settings) -> None:
    service = GatewayService(settings, gateway(CountingProvider(), MemoryCompleted()))
    r = await routed(settings, "acme", "r1", "Where to?")
    handled = await service._on_dispatch([decoded(r), decoded(r, offset=1)], PAUSING)
    assert [(o.topic, o.key) for o in handled.outs] == [(t.RESPONSES, r.keys.scope), (t.USAGE, "acme")]
    assert handled.deferred == []


async def test_a_deferred_request_holds_back_the_answers_after_it_on_its_partition(settings: Settings) -> None:
    """Records at or after a rewind point are delivered again: answered now too, they would be sent twice."""
    provider = CountingProvider(limited=frozenset({"Later?"}))
    service = GatewayService(settings, gateway(provider, MemoryCompleted()))
    now, later, behind, other = [await routed(settings, "acme", f"r{i}", text)
                                 for i, text in enumerate(["Now?", "Later?", "Behind?", "Elsewhere?"])]
    batch = [decoded(now, 0, 0), decoded(later, 0, 1), decoded(behind, 0, 2), decoded(other, 1, 0)]
    handled = await service._on_dispatch(batch, PAUSING)
    assert handled.deferred == [Deferral(batch[1].record, 30.0)]
    answered = {o.value.request_id for o in handled.outs if isinstance(o.value, LLMResponse)}
    assert answered == {"r0", "r3"}, "the answer behind the rewind point is held back"
    again = await service._on_dispatch(batch[2:3], PAUSING)
    assert [o.value.request_id for o in again.outs if isinstance(o.value, LLMResponse)] == ["r2"]
    assert provider.calls["Behind?"] == 1, "the held-back answer was recorded: its redelivery replays it"


async def test_records_expire_after_the_retention_and_expired_ones_are_not_loaded() -> None:
    now = [1000.0]
    memory = MemoryCompleted(retention_s=60, clock=lambda: now[0])
    response = LLMResponse(request_id="r", tenant="acme", source="llm", content="x", created_at=0, responded_at=0)
    old = CompletedCall(tenant="acme", request_id="old", response=response, completed_at=900.0)
    fresh = CompletedCall(tenant="acme", request_id="fresh", response=response, completed_at=990.0)
    assert memory.load([(old, 0), (fresh, 0)]) == 1
    assert await memory.lookup(0, request_key("acme", "old")) is None
    assert await memory.lookup(0, request_key("acme", "fresh")) == fresh
    now[0] = 1051.0
    assert await memory.lookup(0, request_key("acme", "fresh")) is None and len(memory) == 0


async def test_loader_reads_new_partitions_before_serving_and_forgets_revoked_ones(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    response = LLMResponse(request_id="r", tenant="acme", source="llm", content="x", created_at=0, responded_at=0)
    on_topic = {p: CompletedCall(tenant="acme", request_id=f"r{p}", response=response, completed_at=time.time())
                for p in range(3)}
    asked: list[set[int]] = []

    async def fake_read(_s: Settings, name: str, _model: type[CompletedCall], parts: set[int]) -> list[Any]:
        assert name == t.GATEWAY_COMPLETED
        asked.append(set(parts))
        return [(on_topic[p], p) for p in parts]

    monkeypatch.setattr(completed_module, "read_compacted", fake_read)
    store = TopicCompleted(settings, FakePublisher())
    loader = CompletedLoader(settings, store)
    dispatch = settings.topic(t.DISPATCH)
    await loader.on_partitions_assigned({TopicPartition(dispatch, 0), TopicPartition(dispatch, 1)})
    assert asked == [{0, 1}]
    assert await store.lookup(1, request_key("acme", "r1")) == on_topic[1]
    await loader.on_partitions_assigned({TopicPartition(dispatch, 1), TopicPartition(dispatch, 2)})
    assert asked[-1] == {2}, "only the newly owned partition is read"
    with pytest.raises(PartitionRevokedError):  # forgotten: knowing nothing of it is not "never paid"
        await store.lookup(0, request_key("acme", "r0"))
    assert await store.lookup(2, request_key("acme", "r2")) == on_topic[2]


async def test_a_lookup_waits_for_its_partition_to_load_and_retries_a_failed_load(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiokafka hands out records of a new partition while the rebalance listener still runs: the lookup itself
    must wait for the partition's records, or a redelivery is paid again during the load."""
    response = LLMResponse(request_id="r", tenant="acme", source="llm", content="x", created_at=0, responded_at=0)
    paid = CompletedCall(tenant="acme", request_id="r", response=response, completed_at=time.time())
    release = asyncio.Event()
    failing = [True]
    attempts: list[int] = []

    async def slow_read(*_: Any) -> list[Any]:
        attempts.append(1)
        if failing[0]:
            raise ConnectionError("broker away")
        await release.wait()
        return [(paid, 0)]

    monkeypatch.setattr(completed_module, "read_compacted", slow_read)
    store = TopicCompleted(settings, FakePublisher())
    loader = CompletedLoader(settings, store)
    await loader.on_partitions_assigned({TopicPartition(settings.topic(t.DISPATCH), 0)})  # the load fails
    with pytest.raises(ConnectionError):
        await store.lookup(0, request_key("acme", "r"))  # retried, fails again: no answer from an empty view
    assert len(attempts) == 2
    failing[0] = False
    lookup = asyncio.create_task(store.lookup(0, request_key("acme", "r")))
    await asyncio.sleep(0.05)
    assert not lookup.done(), "the lookup waits for the load"
    release.set()
    assert await lookup == paid


async def test_a_partition_gained_again_is_loaded_afresh_not_from_what_an_earlier_ownership_held(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between two ownerships another instance owned the partition: what this one still holds may be stale, so
    only the topic speaks for it (the paid-call records and the batch jobs alike)."""
    response = LLMResponse(request_id="r", tenant="acme", source="llm", content="x", created_at=0, responded_at=0)
    stale = CompletedCall(tenant="acme", request_id="r", response=response, completed_at=time.time())

    async def empty_read(*_: Any) -> list[Any]:
        return []

    monkeypatch.setattr(completed_module, "read_compacted", empty_read)
    monkeypatch.setattr(batch_jobs_module, "read_compacted", empty_read)
    store = TopicCompleted(settings, FakePublisher())
    store.memory.put(0, stale)
    await store.start_load({0})
    assert await store.lookup(0, request_key("acme", "r")) is None
    jobs = TopicBatchJobs(settings)
    jobs.by_partition[0] = {"job-1": BatchJob.model_construct(job_id="job-1", partition=0, state="submitted")}
    await jobs.start_load({0})
    assert jobs.jobs() == [] and jobs.loaded(0)


async def test_an_answer_too_large_to_record_is_recorded_and_answered_as_the_same_too_large_error(
    settings: Settings,
) -> None:
    """A record that could not be written would let a redelivery pay again; the error stands in for the
    answer in the record and on the topic alike, and the paid call is billed all the same."""
    provider = CountingProvider()
    store = MemoryCompleted()
    gw = Gateway({"simulated": provider}, store, policy=RetryPolicy(attempts=1), metrics=Metrics(),
                 max_answer_bytes=400)
    r = await routed(settings, "acme", "big-1", "Tell me everything " + "x" * 500)
    first = (await gw.handle([r]))[0]
    error = answer(first)
    assert error.error is not None and error.error.code == "too_large"
    assert first.usage is not None and first.usage.request_id == "big-1", "the paid call is still billed"
    again = (await gw.handle([r]))[0]
    assert answer(again) == error and again.usage == first.usage and sum(provider.calls.values()) == 1
