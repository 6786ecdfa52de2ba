"""One terminal answer, and one payment, when a batch comes twice or outlives its partition.

Dedupe remembers what it answered only once the outputs are acknowledged (`Deduper.settle`); until then, what an
answer in the batch already decided for its followers must still keep a request of one of them, in the same
batch, from a second decision. A gateway batch that merely waits (a provider's Retry-After, a retry's backoff)
past the revoke's bounded wait stops at the revoke instead of paying later for a partition another member owns
(`InFlight.sleep`); a batch that got its slot after the assignment changed never runs; the paid-call store
refuses lookups on a partition it forgot rather than answering "never paid".
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from frugalstream.dedupe.results import Answer, Dispatch
from frugalstream.gateway.completed import TopicCompleted
from frugalstream.gateway.idempotency import call_key
from frugalstream.llm.providers import ProviderError
from frugalstream.runtime import inflight as inflight_module
from frugalstream.runtime.inflight import InFlight
from frugalstream.runtime.records import Out
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.state_topics import PartitionRevokedError
from frugalstream.schemas import CompletedCall, LLMResponse
from frugalstream.schemas import topics as t
from frugalstream.schemas.responses import error_response
from tests.unit.test_dedupe import answer, ask, deduper, route
from tests.unit.test_dedupe_redelivery import instance
from tests.unit.test_gateway_idempotency import CountingProvider, routed
from tests.unit.test_inflight import Consumer, records
from tests.unit.test_rebalance_walls import LogPublisher, dispatch, dispatch_replica, log, settled  # noqa: F401  (fixture)
from tests.unit.test_stage import FakeRecord

# -- dedupe: a follower released and re-routed in the same batch ------------------------------------------------


def to(rid: str, decisions: list[Any]) -> list[Any]:
    return [d for d in decisions if isinstance(d, Answer | Dispatch) and d.routed.request.id == rid]


async def test_a_follower_released_and_re_routed_in_one_decision_is_answered_once() -> None:
    d = deduper(semantic=False)
    leader, follower = await route(ask("a", "Can I get a new PIN?"), ask("b", "Can I get a new PIN?"))
    await d.handle(requests=[(leader, 0)])
    await d.handle(requests=[(follower, 0)])  # b waits for a
    decisions = await d.handle(answers=[(answer(leader), 0)], requests=[(follower, 0)])
    assert [x.response.source for x in to("b", decisions)] == ["coalesced"]


async def test_a_follower_whose_leader_failed_and_re_routed_in_one_decision_is_dispatched_once() -> None:
    d = deduper(semantic=False)
    leader, follower = await route(ask("a", "Can I close my account?"), ask("b", "Can I close my account?"))
    await d.handle(requests=[(leader, 0)])
    await d.handle(requests=[(follower, 0)])
    failed = error_response(leader.request, "provider_error", "every model failed", routed=leader)
    decisions = await d.handle(answers=[(failed, 0)], requests=[(follower, 0)])
    assert [type(x).__name__ for x in to("b", decisions)] == ["Dispatch"]


async def test_a_follower_released_and_re_routed_in_one_stage_batch_is_answered_once() -> None:
    """Through the stage, the answer and the request are decided by two steps of one batch, settled together."""
    _, broker = instance()
    leader, follower = await route(ask("a", "Can I freeze my card?"), ask("b", "Can I freeze my card?"))
    await broker.deliver(t.ROUTED, [leader])
    await broker.deliver(t.ROUTED, [follower], offset=1)
    s = broker.settings
    raw = [FakeRecord(s.topic(t.RESPONSES), 0, 0, None, answer(leader).model_dump_json().encode()),
           FakeRecord(s.topic(t.ROUTED), 0, 2, None, follower.model_dump_json().encode())]
    await broker.handlers[s.topic(t.ROUTED)](SimpleNamespace(raw_message=raw, consumer=None))
    assert [a.source for a in broker.answers_to("b")] == ["coalesced"]


# -- gateway: a batch outliving its partition ---------------------------------------------------------------------

RETRY_AFTER_S = 60.0  # a provider's Retry-After far past the revoke's bound


class RateLimited(CountingProvider):
    """Rate limited until `limiting` is cleared; `paid` counts the calls answered (and so billed)."""

    def __init__(self) -> None:
        super().__init__()
        self.limiting = True
        self.paid = 0

    async def complete(self, **kw: Any):  # type: ignore[no-untyped-def]
        if self.limiting:
            raise ProviderError("slow down", kind="rate_limited", status=429, retry_after_s=RETRY_AFTER_S)
        self.paid += 1
        return await super().complete(**kw)


async def test_a_batch_sleeping_on_a_retry_after_stops_at_the_revoke_and_never_pays_for_the_moved_partition(
    log: list[Out],  # noqa: F811
) -> None:
    s = Settings(kafka_idempotent=False, idempotency_retention_s=10**9)
    provider = RateLimited()
    request = await routed(s, "acme", "r1", "Write a long essay on tides")
    tp = TopicPartition(s.topic(t.DISPATCH), 0)

    handler_a, listener_a, pub_a = dispatch_replica(s, provider, log)
    consumer_a = Consumer(set())
    consumer_a.assigned = {tp}
    await listener_a.on_partitions_assigned({tp})
    await handler_a(dispatch(s, request, consumer_a))  # rate limited: its task sleeps on the Retry-After
    await settled()
    provider.limiting = False

    revoking = asyncio.create_task(listener_a.on_partitions_revoked({tp}))
    await settled()
    assert revoking.done(), "the revoke waited for a batch that was only sleeping"
    assert consumer_a.commits == [], "the stopped batch was committed, though its request was never answered"
    consumer_a.assigned = set()
    await listener_a.on_partitions_assigned(set())
    assert listener_a.inflight is not None and listener_a.inflight.running() == 0

    handler_b, listener_b, pub_b = dispatch_replica(s, provider, log)  # the new owner: nothing committed, redelivered
    consumer_b = Consumer(set())
    consumer_b.assigned = {tp}
    await listener_b.on_partitions_assigned({tp})
    await handler_b(dispatch(s, request, consumer_b))
    await pub_b.drain(5.0)
    await pub_a.drain(5.0)
    assert provider.paid == 1


async def test_a_batch_in_its_retry_backoff_stops_at_the_revoke_and_is_never_run_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inflight_module, "RETRY_FIRST_S", RETRY_AFTER_S)
    consumer = Consumer({0})
    inflight = InFlight("stage", limit=2)
    runs: list[int] = []

    async def failing() -> None:
        runs.append(1)
        raise ConnectionError("the broker did not acknowledge")

    await inflight.submit(records(0, 0, 4), consumer, failing)
    await settled()
    settling = asyncio.create_task(inflight.settle({("t", 0)}))
    await settled()
    assert settling.done(), "the revoke waited for a batch that was only backing off"
    assert runs == [1] and consumer.commits == [] and inflight.running() == 0


async def test_a_batch_that_got_its_slot_after_the_revoke_never_runs_once_its_partition_is_owned_elsewhere() -> None:
    consumer = Consumer({0})
    inflight = InFlight("gateway", limit=1)
    gate, ran = asyncio.Event(), []

    async def slow() -> None:  # a long call of partition 0, past the revoke's bound
        await gate.wait()

    async def stale() -> None:
        ran.append("stale")

    await inflight.submit(records(0, 0, 4), consumer, slow)
    waiting = asyncio.create_task(inflight.submit(records(0, 5, 9), consumer, stale))  # fetched, no slot
    settling = asyncio.create_task(inflight.settle({("t", 0)}))
    await settled()
    settling.cancel()  # the revoke's bound ran out
    consumer.assigned = set()  # partition 0 went to another member
    inflight.reassigned()
    gate.set()
    await waiting
    await settled()
    assert ran == []


async def test_a_lookup_on_a_forgotten_partition_raises_until_it_is_loaded_again(
    log: list[Out],  # noqa: F811
) -> None:
    s = Settings(kafka_idempotent=False, idempotency_retention_s=10**9)
    store = TopicCompleted(s, LogPublisher(s, log))
    request = await routed(s, "acme", "r1", "Write a long essay on tides")
    response = LLMResponse(request_id="r1", tenant="acme", source="llm", content="Tides.", responded_at=1.0,
                           model=request.route.model, tier=request.route.tier)
    call = CompletedCall(tenant="acme", request_id="r1", response=response, completed_at=time.time())
    await store.start_load({0})
    await store.record(0, call)
    key = call_key(call)
    assert await store.lookup(0, key) == call
    store.forget({0})  # lost to another member, which may have paid since
    with pytest.raises(PartitionRevokedError):
        await store.lookup(0, key)
    await store.start_load({0})  # gained again: read back from the topic
    found = await store.lookup(0, key)
    assert found is not None and found.response.content == "Tides."
