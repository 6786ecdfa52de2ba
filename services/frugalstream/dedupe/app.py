"""Dedupe service: one consumer over `llm.requests.routed` and `llm.responses`, co-partitioned by scope.

The logic (`Deduper.handle`) decides and returns domain results; `outs_for` turns them into topics, keys and
partitions, for the handlers, the coalesce sweeper and the rebuild alike.

The handlers decide nothing on a record before its partition's state is loaded (`CacheRebuilder.loads`):
aiokafka may hand out records of a newly assigned partition while the rebalance listener still loads it, and a
redelivered request answered from a half-loaded cache would get a second, different answer. Records of a
partition whose load failed are deferred (returned as `Deferral`s: their partition is rewound and paused): the
load is retried when they come back. Records of a partition revoked meanwhile are left to its new owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, assert_never

from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from faststream.kafka import KafkaBroker

from frugalstream.dedupe.logic import Deduper, Pending
from frugalstream.dedupe.rebuild import CacheRebuilder, releases_last
from frugalstream.dedupe.results import Answer, Audit, Decision, Dispatch, Hold, Refusal, Release, Store
from frugalstream.dedupe.wiring import build_deduper
from frugalstream.llm.thresholds import ThresholdBook
from frugalstream.resources import Resources
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.records import Decoded, Out
from frugalstream.runtime.replies import response_outs
from frugalstream.runtime.service import cancel_tasks
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import (
    BatchContext,
    Deferral,
    Handled,
    TopicHandler,
    follow_state,
    subscribe_many,
)
from frugalstream.runtime.state_topics import PartitionRevokedError
from frugalstream.schemas import LLMResponse, RoutedRequest
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import ThresholdChange

log = get_logger(__name__)
M = TypeVar("M", LLMResponse, RoutedRequest)
LOAD_RETRY_S = 1.0  # records of a partition whose state failed to load come back after this


def outs_for(decisions: Iterable[Decision]) -> list[Out]:
    """Where each decision goes. Dispatches are keyed by scope like the routed topic; waiting is keyed by
    identity on the partition it belongs to (a compacted topic: a `Release` is its tombstone); a cache entry is
    keyed `scope:exact` on its answer's partition; an answer goes to `llm.responses` (and the producer's reply
    topic) with its usage record keyed by tenant."""
    outs: list[Out] = []
    for d in decisions:
        if isinstance(d, Dispatch):
            outs.append(Out(t.DISPATCH, d.routed, key=d.routed.keys.scope))
        elif isinstance(d, Hold):
            outs.append(Out(t.DEDUPE_WAITING, d.routed, key=d.identity, partition=d.partition))
        elif isinstance(d, Release):
            outs.append(Out(t.DEDUPE_WAITING, None, key=d.identity, partition=d.partition))
        elif isinstance(d, Store):
            keys = d.entry.keys
            outs.append(Out(t.CACHE, d.entry, key=f"{keys.scope}:{keys.exact}", partition=d.partition))
        elif isinstance(d, Answer):
            outs.extend(response_outs(d.response, d.routed.request, d.routed.keys.scope))
            outs.append(Out(t.USAGE, d.usage, key=d.routed.request.tenant))
        elif isinstance(d, Refusal):
            outs.extend(response_outs(d.response, d.routed.request, d.routed.keys.scope))
        elif isinstance(d, Audit):
            topic = t.AUDITS_DISPATCH if d.request.job is not None else t.AUDITS_ANSWERED
            outs.append(Out(topic, d.request, key=d.request.tenant))
        else:
            assert_never(d)
    return outs


@dataclass
class DedupeService:
    settings: Settings
    logic: Deduper
    name: str = "dedupe"
    _publisher: Publisher | None = None
    rebuilder: CacheRebuilder = field(init=False)
    _sweeper: asyncio.Task[None] | None = field(default=None, repr=False)
    _shard_sweeper: asyncio.Task[None] | None = field(default=None, repr=False)
    #: Outputs of the coalesce sweeper not yet published: retried on the next tick, never dropped.
    unpublished: list[Out] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rebuilder = CacheRebuilder(self.settings, self.logic, outs_for)

    @property
    def thresholds(self) -> ThresholdBook:
        """The semantic policy's live book (`llm.thresholds`), shared with the matcher."""
        return self.logic.thresholds

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_waiters(), name="dedupe-coalesce-sweeper")
        self._shard_sweeper = asyncio.create_task(self._sweep_shards(), name="dedupe-shard-sweeper")

    async def stop(self) -> None:
        await self.stop_background()

    async def stop_background(self) -> None:
        await cancel_tasks(self._sweeper, self._shard_sweeper)
        self._sweeper = self._shard_sweeper = None
        await self.rebuilder.loads.close()

    async def _sweep_waiters(self) -> None:
        """Coalesced followers whose leader is slow are dispatched on their own after the timeout."""
        while True:
            await asyncio.sleep(min(1.0, self.settings.coalesce_timeout_s / 4))
            await self.sweep_waiters_once()

    async def sweep_waiters_once(self) -> None:
        """One tick. A failure (a publish, say) is logged and its outputs kept for the next tick: the task
        must outlive it, or every later follower of a slow leader would wait forever."""
        try:
            self.unpublished.extend(outs_for(self.logic.expire_waiters()))
            if not self.unpublished or self._publisher is None:
                return
            outs, self.unpublished = self.unpublished, []
            first, releases = releases_last(outs)  # a follower is released only once its dispatch is on the broker
            try:
                await self._publisher.publish_all(first, service=self.name)
            except Exception:
                self.unpublished = outs + self.unpublished
                raise
            try:
                await self._publisher.publish_all(releases, service=self.name)
            except Exception:
                self.unpublished = releases + self.unpublished
                raise
        except Exception:
            log.exception("coalesce_sweep_failed", pending=len(self.unpublished))

    async def _sweep_shards(self) -> None:
        """Expired and evicted entries leave the store and the semantic shards (rebuilt off the event loop)."""
        while True:
            await asyncio.sleep(self.settings.shard_sweep_interval_s)
            try:
                dropped, removed = await self.logic.sweep()
                if dropped or removed:
                    log.info("cache_swept", store_entries=dropped, shard_entries=removed)
            except Exception:
                log.exception("cache_sweep_failed")

    async def _loaded(self, batch: Sequence[Decoded[M]], ctx: BatchContext) -> tuple[list[Decoded[M]], list[Deferral]]:
        """The records whose partition's state is loaded, once it is (waits for loads in progress, retries a
        failed one), and the others to deliver again later; when the consumer cannot pause, the batch raises."""
        failed = await self.rebuilder.loads.settle({d.record.partition for d in batch})
        if not failed:
            return list(batch), []
        ready: list[Decoded[M]] = []
        deferred: list[Deferral] = []
        for d in batch:
            error = failed.get(d.record.partition)
            if error is None:
                ready.append(d)
            elif isinstance(error, PartitionRevokedError):
                continue  # its new owner handles it
            elif ctx.can_defer:
                deferred.append(Deferral(d.record, LOAD_RETRY_S))
            else:
                raise error
        log.warning("dedupe_partitions_not_loaded", partitions=sorted(failed), held=len(batch) - len(ready))
        return ready, deferred

    async def _on_routed(self, batch: Sequence[Decoded[RoutedRequest]], ctx: BatchContext) -> Handled:
        ready, deferred = await self._loaded(batch, ctx)
        if not ready:
            return Handled([], deferred)
        decided = await self.logic.decide(requests=[(d.value, d.record.partition) for d in ready])
        return self._handled(*decided, deferred)

    async def _on_responses(self, batch: Sequence[Decoded[LLMResponse]], ctx: BatchContext) -> Handled:
        ready, deferred = await self._loaded(batch, ctx)
        if not ready:
            return Handled([], deferred)
        decided = await self.logic.decide(answers=[(d.value, d.record.partition) for d in ready])
        return self._handled(*decided, deferred)

    def _handled(self, decisions: Sequence[Decision], pending: Pending, deferred: list[Deferral]) -> Handled:
        """The stage publishes the outputs; once they are acknowledged (and before the commit), the releases
        follow and the logic remembers what was answered and released. A failed publish remembers nothing:
        the redelivered batch answers again."""
        outs, releases = releases_last(outs_for(decisions))

        async def after_publish() -> None:
            if releases and self._publisher is not None:
                await self._publisher.publish_all(releases, service=self.name)
            self.logic.settle(pending)

        return Handled(outs, deferred, [after_publish])

    def register(self, broker: KafkaBroker, publisher: Publisher) -> None:
        self._publisher = publisher
        self.rebuilder.publisher = publisher
        # Responses first: a batch that holds both an answer and a repeat of its question serves the repeat.
        subscribe_many(
            broker, publisher, self.settings, service=self.name,
            handlers=[
                TopicHandler(t.RESPONSES, LLMResponse, self._on_responses),
                TopicHandler(t.ROUTED, RoutedRequest, self._on_routed),
            ],
            partition_assignment_strategy=(RangePartitionAssignor,),
            listener=self.rebuilder,
        )
        # Live per-tenant thresholds: every instance reads the compacted topic whole (no group, no commits).
        follow_state(broker, publisher, self.settings, service=f"{self.name}.thresholds", topic=t.THRESHOLDS,
                     model=ThresholdChange, update=self.thresholds.update)


def wire(res: Resources) -> DedupeService:
    return DedupeService(res.settings, build_deduper(res.settings, res.embedder, res.verifier))
