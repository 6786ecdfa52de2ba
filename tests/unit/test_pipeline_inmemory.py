"""The pipeline scenarios (`tests/scenarios.py`) on FastStream's in-memory broker, with fakes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from frugalstream.runner import RunningServices
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import LLMResponse
from frugalstream.schemas import topics as t
from tests.scenarios import SCENARIOS, Scenario

#: How long to wait for what background work (the summarizer's flushes) publishes.
TIMEOUT_S = 10.0
#: Publishes are handled before `publish` returns, so only background work can answer late: a short quiet
#: period is enough to see it.
QUIET_S = 0.2


class InMemoryCluster:
    """Every service on FastStream's in-memory broker; one probe records every topic's values as sent."""

    def __init__(self, running: RunningServices) -> None:
        self.running = running
        self.seen: dict[str, list[bytes]] = {}
        topics = [running.settings.topic(name) for name in t.ALL_TOPICS]

        @running.broker.subscriber(*topics, group_id="probe")
        async def probe(msg: KafkaMessage) -> None:
            record: Any = msg.raw_message  # one ConsumerRecord: the probe is not a batch subscriber
            self.seen.setdefault(record.topic, []).append(msg.body)

    @property
    def settings(self) -> Settings:
        return self.running.settings

    async def produce(self, topic: str, value: bytes, *, key: bytes | None = None,
                      headers: Sequence[tuple[str, bytes]] = ()) -> None:
        await self.running.broker.publish(value, self.settings.topic(topic), key=key,
                                          headers={k: v.decode() for k, v in headers})

    async def answers(self, want: set[str], *, quiet: bool = True) -> dict[str, list[LLMResponse]]:
        await self._until(lambda: want <= set(self._grouped()))
        if quiet:
            await asyncio.sleep(QUIET_S)
        return self._grouped()

    async def records(self, topics: Sequence[str], expected: int) -> list[bytes]:
        def values() -> list[bytes]:
            return [v for name in topics for v in self.seen.get(self.settings.topic(name), [])]

        await self._until(lambda: len(values()) >= expected)
        await asyncio.sleep(QUIET_S)
        return values()

    async def settle(self) -> None:
        await asyncio.sleep(0)

    def _grouped(self) -> dict[str, list[LLMResponse]]:
        """Distinct responses per request id, as the embedded broker's reader groups them."""
        got: dict[str, list[LLMResponse]] = {}
        canonical: set[str] = set()
        for value in self.seen.get(self.settings.topic(t.RESPONSES), []):
            try:
                response = LLMResponse.model_validate_json(value)
            except ValidationError:
                continue
            if response.model_dump_json() not in canonical:
                canonical.add(response.model_dump_json())
                got.setdefault(response.request_id, []).append(response)
        return got

    @staticmethod
    async def _until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not done() and time.monotonic() < deadline:  # noqa: ASYNC110 - a condition on recorded values
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_scenario_on_the_in_memory_broker(pipeline: RunningServices, scenario: Scenario) -> None:
    cluster = InMemoryCluster(pipeline)
    await pipeline.broker.start()
    await scenario(cluster)
