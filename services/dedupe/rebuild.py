"""Rebuilds a dedupe instance's state from compacted topics when partitions are assigned.

`llm.cache` holds the answers, `llm.dedupe.waiting` the requests coalesced behind an in-flight twin. aiokafka
awaits `on_partitions_assigned` before it fetches from the new partitions, so a shard is complete and its
waiting requests are resumed before any request of its scopes is served: after a restart, a rebalance, or
a new instance joining.
"""

from __future__ import annotations

import time
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from pydantic import BaseModel, ValidationError

from schemas import CacheEntry, LLMResponse, RoutedRequest
from schemas import topics as t
from services.core.broker import aiokafka_security
from services.core.logging import get_logger
from services.core.messaging import Publisher
from services.core.settings import Settings
from services.dedupe.logic import Deduper

log = get_logger(__name__)
M = TypeVar("M", bound=BaseModel)


async def scan(settings: Settings, name: str, partitions: set[int], *, from_group: str | None = None,
               idle_s: float = 2.0, timeout_s: float = 120.0) -> list[tuple[bytes, bytes | None, int]]:
    """(key, value, partition) of the given partitions, from the start or from `from_group`'s committed offsets.

    The group is only asked for its offsets: this reader never joins it and never commits.
    """
    topic = settings.topic(name)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms, group_id=from_group,
                                **aiokafka_security(settings))
    await consumer.start()
    found: list[tuple[bytes, bytes | None, int]] = []
    try:
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        if from_group is not None:
            for tp in tps:
                committed = await consumer.committed(tp)
                if committed is not None:
                    consumer.seek(tp, committed)
        end = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(*tps, timeout_ms=200)
            if not batch:
                # Done when the reported end is reached and the partitions stay quiet for a moment, or after
                # `idle_s` of quiet whatever the end offsets say: some brokers (Tansu) report them wrong.
                idle = time.monotonic() - idle_since
                positions = [await consumer.position(tp) for tp in tps]
                at_end = all(pos >= end[tp] for pos, tp in zip(positions, tps, strict=True))
                if (at_end and idle >= min(0.5, idle_s)) or idle >= idle_s:
                    break
                continue
            idle_since = time.monotonic()
            found.extend((rec.key or b"", rec.value, tp.partition) for tp, records in batch.items() for rec in records)
    finally:
        await consumer.stop()
    return found


async def read_compacted(settings: Settings, name: str, model: type[M], partitions: set[int]) -> list[tuple[M, int]]:
    """Latest value per key of the given partitions (compaction semantics: tombstones delete)."""
    latest: dict[bytes, tuple[M, int] | None] = {}
    for key, value, partition in await scan(settings, name, partitions):
        if value is None:
            latest[key] = None
            continue
        try:
            latest[key] = (model.model_validate_json(value), partition)
        except ValidationError:
            log.warning("state_record_invalid", topic=name, partition=partition)
    return [v for v in latest.values() if v is not None]


async def answered_since_commit(settings: Settings, partitions: set[int]) -> list[str]:
    """Request ids answered on `llm.responses` after the group's last commit: the answers a crashed owner
    published but had not yet read back. Known before serving, they stop a redelivered request from
    getting a second, different answer."""
    ids = []
    for _, value, _ in await scan(settings, t.RESPONSES, partitions, from_group=settings.group("dedupe")):
        try:
            ids.append(LLMResponse.model_validate_json(value or b"").request_id)
        except ValidationError:
            continue  # dead-lettered by the handler when it gets there
    return ids


class CacheRebuilder(ConsumerRebalanceListener):  # type: ignore[misc]
    """Loads newly owned partitions from `llm.cache` and forgets the ones handed to another instance."""

    def __init__(self, settings: Settings, logic: Deduper) -> None:
        self._settings = settings
        self._logic = logic
        self.owned: set[int] = set()
        self.publisher: Publisher | None = None

    async def on_partitions_revoked(self, revoked: object) -> None:
        return None  # decided in on_partitions_assigned, which knows what stays

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        mine = {tp.partition for tp in assigned if tp.topic == self._settings.topic(t.ROUTED)}
        new, gone = mine - self.owned, self.owned - mine
        if gone:
            self._logic.forget_partitions(gone)
        if new:
            started = time.monotonic()
            entries = await read_compacted(self._settings, t.CACHE, CacheEntry, new)
            loaded = await self._logic.load(entries)
            for request_id in await answered_since_commit(self._settings, new):
                self._logic.mark_answered(request_id)
            held = await read_compacted(self._settings, t.DEDUPE_WAITING, RoutedRequest, new)
            outs = await self._logic.restore_waiters(held)
            if outs and self.publisher is not None:
                await self.publisher.publish_all(outs)
            log.info("cache_rebuilt", partitions=sorted(new), entries=loaded, waiting=len(held),
                     seconds=round(time.monotonic() - started, 2))
        self.owned = mine  # only once rebuilt: `owned` means "complete and serving"
