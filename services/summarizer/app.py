"""Summarizer service: `llm.summarize.jobs` -> `llm.summaries`, progress, and usage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from faststream.kafka import KafkaBroker

from schemas import SummarizeJob
from schemas import topics as t
from services.core.messaging import Decoded, Out, Publisher
from services.core.settings import Settings
from services.core.stage import subscribe
from services.summarizer.logic import Summarizer


@dataclass
class SummarizerService:
    settings: Settings
    logic: Summarizer
    name: str = "summarizer"

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self.logic.provider.aclose()

    async def _on_jobs(self, batch: Sequence[Decoded[SummarizeJob]]) -> list[Out]:
        return await self.logic.on_jobs([d.value for d in batch])

    def register(self, broker: KafkaBroker, publisher: Publisher) -> None:
        subscribe(broker, publisher, self.settings, service=self.name, topic=t.SUMMARIZE_JOBS, model=SummarizeJob,
                  process=self._on_jobs, max_records=4)
