"""A short answer is published once its call is recorded, not when its batch's slowest call ends.

The gateway hands each decided result to the stage's `BatchContext.release`; the batch then publishes only
what was not released. A release the broker refuses is kept for the batch's own publish, so nothing is lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from frugalstream.gateway.app import GatewayService
from frugalstream.gateway.idempotency import MemoryCompleted
from frugalstream.llm.identity import request_key
from frugalstream.llm.providers import Completion
from frugalstream.runtime.records import Decoded, Out
from frugalstream.runtime.replies import response_outs
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext
from frugalstream.schemas import ChatMessage, LLMRequest, LLMResponse, UsageRecord
from frugalstream.schemas import topics as t
from tests.unit.test_gateway_idempotency import CountingProvider, decoded, gateway, routed
from tests.unit.test_stage import FakeBroker, batch, request, response, stage

LONG = "write me a long essay, please"


class GatedProvider(CountingProvider):
    """The long prompt's call waits for `gate`; the others answer at once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = asyncio.Event()

    async def complete(self, *, model: str, messages: Sequence[ChatMessage], **kwargs: Any) -> Completion:
        if messages[-1].content == LONG:
            await self.gate.wait()
        return await super().complete(model=model, messages=messages, **kwargs)


def answered(outs: Sequence[Out]) -> list[str]:
    return [o.value.request_id for o in outs if isinstance(o.value, LLMResponse) and not o.side]


async def test_a_short_answer_is_released_while_its_batch_mate_is_still_being_paid_for(settings: Settings) -> None:
    provider, store = GatedProvider(), MemoryCompleted()
    svc = GatewayService(settings, gateway(provider, store))
    slow = await routed(settings, "acme", "slow-1", LONG)
    fast = await routed(settings, "acme", "fast-1", "What are your hours?")
    released: list[Out] = []

    async def release(outs: Sequence[Out]) -> bool:
        [rid] = answered(outs)
        assert await store.lookup(0, request_key("acme", rid)) is not None, "recorded before it is released"
        released.extend(outs)
        provider.gate.set()  # the long call ends only once something was released
        return True

    handled = await asyncio.wait_for(
        svc._on_dispatch([decoded(slow, 0, 0), decoded(fast, 0, 1)], BatchContext(release=release)), timeout=5)
    assert answered(released) == ["fast-1", "slow-1"], "the short answer went out first, without waiting"
    assert sum(isinstance(o.value, UsageRecord) for o in released) == 2, "each answer with its usage"
    assert handled.outs == [], "nothing released is published twice"


async def test_an_answer_the_broker_would_not_take_early_is_published_with_its_batch(settings: Settings) -> None:
    svc = GatewayService(settings, gateway(CountingProvider(), MemoryCompleted()))
    one = await routed(settings, "acme", "one", "What are your hours?")
    attempts: list[list[str]] = []

    async def refused(outs: Sequence[Out]) -> bool:
        attempts.append(answered(outs))
        return False

    handled = await svc._on_dispatch([decoded(one)], BatchContext(release=refused))
    assert attempts == [["one"]] and answered(handled.outs) == ["one"]
    assert any(isinstance(o.value, UsageRecord) for o in handled.outs), "its usage is not lost either"


async def test_an_answer_released_before_a_rewind_is_not_published_again_when_it_comes_back(
    settings: Settings,
) -> None:
    provider = CountingProvider(limited=frozenset({"busy?"}))
    svc = GatewayService(settings, gateway(provider, MemoryCompleted()))
    limited = await routed(settings, "acme", "limited", "busy?")
    other = await routed(settings, "acme", "other", "What are your hours?")
    batch = [decoded(limited, 0, 0), decoded(other, 0, 1)]
    released: list[Out] = []

    async def release(outs: Sequence[Out]) -> bool:
        released.extend(outs)
        return True

    handled = await svc._on_dispatch(batch, BatchContext(can_defer=True, release=release))
    assert answered(released) == ["other"], "a deferral has no answer to release"
    assert [d.record.offset for d in handled.deferred] == [0] and handled.outs == []
    provider.limited = frozenset()  # the Retry-After has passed: the partition comes again from offset 0
    again = await svc._on_dispatch(batch, BatchContext(can_defer=True, release=release))
    assert answered(released) == ["other", "limited"], "the released answer is not sent a second time"
    assert again.outs == [] and again.deferred == []
    assert provider.calls["What are your hours?"] == 1, "and its call was paid once"


async def test_the_stage_publishes_a_release_at_once_and_the_rest_with_the_batch() -> None:
    broker = FakeBroker()
    seen_early: list[list[bytes]] = []

    async def step(items: Sequence[Decoded[LLMRequest]], ctx: BatchContext) -> list[Out]:
        first, *rest = items
        assert ctx.release is not None
        assert await ctx.release(response_outs(response(first.value), first.value, None))
        seen_early.append(list(broker.on(t.RESPONSES)))  # published before the step returns
        return [o for item in rest for o in response_outs(response(item.value), item.value, None)]

    handler, _ = stage(step, broker)
    await handler(batch(request("a").model_dump_json().encode(), request("b").model_dump_json().encode()))
    assert [LLMResponse.model_validate_json(d).request_id for d in seen_early[0]] == ["a"]
    assert [LLMResponse.model_validate_json(d).request_id for d in broker.on(t.RESPONSES)] == ["a", "b"]


async def test_a_release_the_broker_refuses_returns_false_instead_of_raising() -> None:
    broker = FakeBroker(fail={t.RESPONSES})
    results: list[bool] = []

    async def step(items: Sequence[Decoded[LLMRequest]], ctx: BatchContext) -> list[Out]:
        assert ctx.release is not None
        results.append(await ctx.release(response_outs(response(items[0].value), items[0].value, None)))
        return []

    handler, _ = stage(step, broker)
    await handler(batch(request("a").model_dump_json().encode()))
    assert results == [False]


def test_the_gateway_bounds_calls_in_flight_not_batches(settings: Settings) -> None:
    """Sixteen batches of slow calls were the gateway's whole concurrency: at 20 req/s and real model latencies
    requests queued a median 210 ms before it. Its bound is now requests, from its own setting."""
    from faststream.kafka import KafkaBroker

    from frugalstream.runtime.messaging import Publisher

    broker = KafkaBroker()
    custom = settings.model_copy(update={"gateway_calls_in_flight": 300, "concurrent_batches": 4})
    publisher = Publisher(broker, custom)
    GatewayService(custom, gateway(CountingProvider(), MemoryCompleted())).register(broker, publisher)
    [inflight] = publisher.inflight
    assert inflight.per_record and inflight.limit == 300
