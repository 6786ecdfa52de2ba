"""Gateway service: `llm.requests.dispatch` -> `llm.responses` + `llm.usage`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from faststream.kafka import KafkaBroker

from schemas import RoutedRequest
from schemas import topics as t
from services.core.messaging import Decoded, Out, Publisher
from services.core.settings import Settings
from services.core.stage import subscribe
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
        return await self.logic.on_dispatch([d.value for d in batch])

    def register(self, broker: KafkaBroker, publisher: Publisher) -> None:
        subscribe(broker, publisher, self.settings, service=self.name, topic=t.DISPATCH, model=RoutedRequest,
                  process=self._on_dispatch, max_records=128)
