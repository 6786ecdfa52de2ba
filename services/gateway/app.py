"""Gateway service: `llm.requests.dispatch` -> `llm.responses` + `llm.usage`.

A request the provider rate-limits with a long Retry-After is deferred: its partition is rewound to it and
paused (`services.core.stage.defer`), so no handler sleeps and other partitions keep flowing. Answers of
later records on that partition are held back: they are stored already and replay, once, on redelivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from faststream.kafka import KafkaBroker

from schemas import RoutedRequest
from schemas import topics as t
from services.core.messaging import Decoded, Out, Publisher
from services.core.settings import Settings
from services.core.stage import can_defer, defer, subscribe
from services.gateway.logic import Gateway


@dataclass
class GatewayService:
    settings: Settings
    logic: Gateway
    name: str = "gateway"

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        for provider in self.logic.providers.values():
            await provider.aclose()
        await asyncio.to_thread(self.logic.completed.close)

    async def _on_dispatch(self, batch: Sequence[Decoded[RoutedRequest]]) -> list[Out]:
        results = await self.logic.handle([d.value for d in batch], can_defer=can_defer())
        waits = {r.request_id: r.retry_after_s for r in results if r.retry_after_s is not None}
        if not waits:
            return [out for r in results for out in r.outs]
        rewound: dict[tuple[str, int], int] = {}  # partition -> earliest deferred offset
        for d in batch:
            wait = waits.get(d.value.request.id)
            if wait is not None and defer(d.record, wait):
                part = (d.record.topic, d.record.partition)
                rewound[part] = min(rewound.get(part, d.record.offset), d.record.offset)
        held = {d.value.request.id for d in batch
                if d.record.offset >= rewound.get((d.record.topic, d.record.partition), d.record.offset + 1)}
        return [out for r in results if r.request_id not in held for out in r.outs]

    def register(self, broker: KafkaBroker, publisher: Publisher) -> None:
        subscribe(broker, publisher, self.settings, service=self.name, topic=t.DISPATCH, model=RoutedRequest,
                  process=self._on_dispatch, max_records=128)
