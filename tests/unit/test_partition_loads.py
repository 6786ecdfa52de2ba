"""State loaded on assignment gates the handlers, not the rebalance listener: aiokafka hands out records of a new
partition while `on_partitions_assigned` still runs, so dedupe's handlers wait for their partitions' loads."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import TopicPartition

from frugalstream.dedupe import app as dedupe_app
from frugalstream.dedupe import rebuild
from frugalstream.dedupe.app import DedupeService
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.records import Decoded, Out, Record
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext
from frugalstream.runtime.state_topics import PartitionLoads, PartitionRevokedError
from frugalstream.schemas import CacheEntry, RoutedRequest
from frugalstream.schemas import topics as t
from tests.unit.test_dedupe import SETTINGS, answer, ask, deduper, route, sources

# -- PartitionLoads on its own ---------------------------------------------------------------------------------


class GatedLoader:
    """A loader that blocks on `release` and fails while `failing` is set; records what it was asked."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.failing = False
        self.asked: list[set[int]] = []
        self.done: list[set[int]] = []

    async def __call__(self, partitions: set[int]) -> None:
        self.asked.append(set(partitions))
        if self.failing:
            raise ConnectionError("broker away")
        await self.release.wait()
        self.done.append(set(partitions))


async def test_wait_blocks_until_the_load_of_its_partitions_is_done() -> None:
    loads, loader = PartitionLoads("t"), GatedLoader()
    loads.start({0, 1}, loader)
    waiting = asyncio.create_task(loads.wait({1}))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "a partition whose load runs is not ready"
    await loads.wait({2})  # never assigned through a listener: nothing to wait for
    loader.release.set()
    await asyncio.wait_for(waiting, 1)
    assert loads.loading == set() and loader.asked == [{0, 1}]


async def test_a_failed_load_is_retried_by_the_next_wait_and_raises_while_it_keeps_failing() -> None:
    loads, loader = PartitionLoads("t"), GatedLoader()
    loader.failing = True
    task = loads.start({0, 1}, loader)
    with pytest.raises(ConnectionError):
        await task
    with pytest.raises(ConnectionError):
        await loads.wait({0, 1})
    assert loader.asked == [{0, 1}, {0, 1}], "retried once, for all of the failed load's partitions together"
    assert await loads.settle({0}) and loads.loading == {0, 1}, "still not ready"
    loader.failing = False
    loader.release.set()
    await asyncio.wait_for(loads.wait({0}), 1)
    assert loads.loading == set()


async def test_revoked_partitions_are_refused_until_assigned_again_and_then_loaded_again() -> None:
    loads, loader = PartitionLoads("t"), GatedLoader()
    loads.start({0, 1}, loader)
    waiting = asyncio.create_task(loads.settle({0}))
    await asyncio.sleep(0.01)
    loads.forget({0})  # revoked while its load runs: cancelled; partition 1 loads again on its own
    failed = await asyncio.wait_for(waiting, 1)
    assert isinstance(failed[0], PartitionRevokedError)
    assert loader.asked == [{0, 1}, {1}] and loads.loading == {1}
    loader.release.set()
    await asyncio.wait_for(loads.wait({1}), 1)
    assert isinstance((await loads.settle({0}))[0], PartitionRevokedError)
    loads.start({0}, loader)
    await asyncio.wait_for(loads.wait({0}), 1)
    assert loader.done == [{1}, {0}], "loaded again when assigned again"


# -- Dedupe's handlers wait for the rebuild ----------------------------------------------------------------------


class ListPublisher(Publisher):
    def __init__(self) -> None:
        self.published: list[Out] = []

    async def publish_all(self, outs: Any, *, service: str = "publisher") -> None:
        self.published.extend(outs)


PAUSING = BatchContext(can_defer=True)

def decoded(value: Any, topic: str, partition: int = 0, offset: int = 0) -> Decoded[Any]:
    return Decoded(Record(topic, partition, offset, None, None, ()), value)


class GatedCache:
    """`read_compacted` for the rebuild: `llm.cache` holds `entries`, returned once `release` is set."""

    def __init__(self, entries: list[tuple[CacheEntry, int]]) -> None:
        self.entries = entries
        self.release = asyncio.Event()
        self.failing = False
        self.reads = 0

    async def __call__(self, _s: Settings, name: str, _model: type[Any], parts: set[int]) -> list[Any]:
        if name != t.CACHE:
            return []
        self.reads += 1
        if self.failing:
            raise ConnectionError("broker away")
        await self.release.wait()
        return [(e, p) for e, p in self.entries if p in parts]


async def no_answers(_s: Settings, _parts: set[int]) -> list[tuple[str, str]]:
    return []


async def service_with_cache(monkeypatch: pytest.MonkeyPatch) -> tuple[DedupeService, GatedCache, RoutedRequest]:
    first, again = await route(ask("a", "What are your opening hours?"), ask("b", "what are your opening hours"))
    entry = CacheEntry(keys=first.keys, request_id="a", tenant="acme", content="9 to 5", model="m",
                       output_tokens=3, stored_at=time.time())
    cache = GatedCache([(entry, 0)])
    monkeypatch.setattr(rebuild, "read_compacted", cache)
    monkeypatch.setattr(rebuild, "answered_since_commit", no_answers)
    service = DedupeService(SETTINGS, deduper(semantic=False))
    service.rebuilder.publisher = ListPublisher()
    return service, cache, again


def assign(service: DedupeService, *partitions: int) -> asyncio.Task[None]:
    topic = SETTINGS.topic(t.ROUTED)
    return asyncio.create_task(service.rebuilder.on_partitions_assigned({TopicPartition(topic, p) for p in partitions}))


async def test_a_request_on_a_partition_still_loading_waits_for_the_cache_and_is_served_from_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, cache, again = await service_with_cache(monkeypatch)
    listener = assign(service, 0)
    await asyncio.sleep(0.01)  # aiokafka already hands out records of partition 0 while the listener runs
    handled = asyncio.create_task(service._on_routed([decoded(again, t.ROUTED)], PAUSING))
    await asyncio.sleep(0.05)
    assert not handled.done(), "nothing is decided on a partition whose cache is not loaded"
    cache.release.set()
    outs = (await asyncio.wait_for(handled, 1)).outs
    assert sources(outs) == ["cache_exact"], "served from the rebuilt cache, not dispatched a second time"
    await asyncio.wait_for(listener, 1)


async def test_an_answer_on_a_partition_still_loading_waits_too(monkeypatch: pytest.MonkeyPatch) -> None:
    service, cache, again = await service_with_cache(monkeypatch)
    listener = assign(service, 0)
    await asyncio.sleep(0.01)
    handled = asyncio.create_task(service._on_responses([decoded(answer(again), t.RESPONSES)], PAUSING))
    await asyncio.sleep(0.05)
    assert not handled.done() and len(service.logic.store) == 0
    cache.release.set()
    await asyncio.wait_for(handled, 1)
    await asyncio.wait_for(listener, 1)


async def test_records_of_a_partition_whose_load_fails_are_deferred_and_served_once_the_retry_succeeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, cache, again = await service_with_cache(monkeypatch)
    cache.failing = True
    await asyncio.wait_for(assign(service, 0), 1)  # the listener logs the failure and returns
    other = (await route(ask("c", "Do you ship abroad?", tenant="globex")))[0]
    handled = await service._on_routed([decoded(again, t.ROUTED, 0, 7), decoded(other, t.ROUTED, 1, 3)], PAUSING)
    deferred = [(d.record.partition, d.record.offset, d.after_s) for d in handled.deferred]
    assert deferred == [(0, 7, dedupe_app.LOAD_RETRY_S)], "partition 0 comes back later, partition 1 flows"
    outs = handled.outs
    assert [o.topic for o in outs] == [t.DISPATCH] and outs[0].value.request.id == "c"
    assert cache.reads == 2, "the failed load was retried by the handler"
    cache.failing = False
    cache.release.set()
    assert sources((await service._on_routed([decoded(again, t.ROUTED, 0, 7)], PAUSING)).outs) == ["cache_exact"]


async def test_without_a_pausing_consumer_the_batch_raises_while_the_load_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, cache, again = await service_with_cache(monkeypatch)
    cache.failing = True
    await asyncio.wait_for(assign(service, 0), 1)
    with pytest.raises(ConnectionError):
        await service._on_routed([decoded(again, t.ROUTED)], BatchContext())  # the consumer cannot pause
    decided = service.logic.metrics.registry.get_sample_value("frugal_dedupe_decisions_total", {"outcome": "miss"})
    assert decided in (None, 0.0), "nothing decided"


async def test_records_of_a_revoked_partition_are_left_to_its_new_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    service, cache, again = await service_with_cache(monkeypatch)
    listener = assign(service, 0, 1)
    await asyncio.sleep(0.01)
    handled = asyncio.create_task(service._on_routed([decoded(again, t.ROUTED, 0)], PAUSING))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(assign(service, 1), 1)  # partition 0 goes elsewhere mid-load
    left = await asyncio.wait_for(handled, 1)
    assert left.outs == [] and left.deferred == []
    cache.release.set()
    await asyncio.wait_for(listener, 1)
    assert service.rebuilder.owned == {1} and service.rebuilder.loads.loading == set()


async def test_stopping_the_service_cancels_a_load_still_running(monkeypatch: pytest.MonkeyPatch) -> None:
    service, _cache, _again = await service_with_cache(monkeypatch)
    listener = assign(service, 0)
    await asyncio.sleep(0.01)
    await asyncio.wait_for(service.stop_background(), 1)  # a load may publish: not once the broker closes
    await asyncio.wait_for(listener, 1)
    assert service.rebuilder.loads.loading == {0} and service.rebuilder.publisher.published == []  # type: ignore[union-attr]
