"""Dedupe service: one consumer over `llm.requests.routed` and `llm.responses`, co-partitioned by scope."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from faststream.kafka import KafkaBroker

from schemas import LLMResponse, RoutedRequest
from schemas import topics as t
from services.core.messaging import Decoded, Out, Publisher
from services.core.settings import Settings
from services.core.stage import TopicHandler, subscribe_many
from services.dedupe.logic import Deduper
from services.dedupe.rebuild import CacheRebuilder


@dataclass
class DedupeService:
    settings: Settings
    logic: Deduper
    name: str = "dedupe"
    _publisher: Publisher | None = None
    rebuilder: CacheRebuilder = field(init=False)
    _sweeper: asyncio.Task[None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.rebuilder = CacheRebuilder(self.settings, self.logic)

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_waiters(), name="dedupe-coalesce-sweeper")

    async def stop(self) -> None:
        await self.stop_background()

    async def stop_background(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep_waiters(self) -> None:
        """Coalesced followers whose leader is slow are dispatched on their own after the timeout."""
        while True:
            await asyncio.sleep(min(1.0, self.settings.coalesce_timeout_s / 4))
            outs = self.logic.expire_waiters()
            if outs and self._publisher is not None:
                await self._publisher.publish_all(outs)

    async def _on_routed(self, batch: Sequence[Decoded[RoutedRequest]]) -> list[Out]:
        return await self.logic.on_routed([d.value for d in batch], [d.record.partition for d in batch])

    async def _on_responses(self, batch: Sequence[Decoded[LLMResponse]]) -> list[Out]:
        return await self.logic.on_responses([(d.value, d.record.partition) for d in batch])

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
