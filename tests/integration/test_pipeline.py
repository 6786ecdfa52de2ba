"""The pipeline scenarios (`tests/scenarios.py`) on the embedded Kafka-protocol broker, every service running."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Sequence
from types import TracebackType

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from frugalstream.llm.embedder import Embedder, HashingEmbedder, MiniLMEmbedder
from frugalstream.runner import RunningServices
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import LLMResponse
from frugalstream.schemas import topics as t
from tests.integration.adversary import read_quietly
from tests.integration.conftest import PipelineFactory
from tests.scenarios import SCENARIOS, Scenario, repeats_hit_the_cache_and_costs_reconcile

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT_S = 90.0
#: After the expected records are in, how long to keep reading so one too many shows up.
RECORDS_QUIET_S = 1.0
#: The real embedder where a scenario's walls should hold with real similarities too (cross-tenant repeats).
EMBEDDERS: dict[Scenario, Callable[[], Embedder]] = {repeats_hit_the_cache_and_costs_reconcile: MiniLMEmbedder}


class EmbeddedCluster:
    """Every service on the session's embedded broker, under this test's topic prefix, seen through aiokafka."""

    def __init__(self, running: RunningServices) -> None:
        self.running = running
        self._producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, enable_idempotence=False,
                                          acks="all")

    @property
    def settings(self) -> Settings:
        return self.running.settings

    async def __aenter__(self) -> EmbeddedCluster:
        await self._producer.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._producer.stop()

    async def produce(self, topic: str, value: bytes, *, key: bytes | None = None,
                      headers: Sequence[tuple[str, bytes]] = ()) -> None:
        await self._producer.send_and_wait(self.settings.topic(topic), value, key=key, headers=list(headers))

    async def answers(self, want: set[str], *, quiet: bool = True) -> dict[str, list[LLMResponse]]:
        # Past the coalescing timeout after the last first answer: a follower answered once by coalescing and
        # again when its wait expired (or any other late second answer) is seen.
        quiet_s = self.settings.coalesce_timeout_s + 2 if quiet else 0.0
        return await read_quietly(self.settings, self.settings.topic(t.RESPONSES), want=want,
                                  key_of=lambda r: r.request_id, timeout_s=TIMEOUT_S, quiet_s=quiet_s)

    async def records(self, topics: Sequence[str], expected: int) -> list[bytes]:
        consumer = AIOKafkaConsumer(*(self.settings.topic(x) for x in topics),
                                    bootstrap_servers=self.settings.kafka_bootstrap, auto_offset_reset="earliest",
                                    enable_auto_commit=False, fetch_max_wait_ms=50)
        await consumer.start()
        values: list[bytes] = []
        deadline = time.monotonic() + 30
        quiet_until: float | None = None
        try:
            while time.monotonic() < (quiet_until if quiet_until is not None else deadline):
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    values.extend(r.value for r in batch)
                if quiet_until is None and len(values) >= expected:
                    quiet_until = time.monotonic() + RECORDS_QUIET_S
        finally:
            await consumer.stop()
        return values

    async def settle(self) -> None:
        await asyncio.sleep(1)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_scenario_on_the_embedded_broker(pipeline: PipelineFactory, scenario: Scenario) -> None:
    async with (
        pipeline(embedder=EMBEDDERS.get(scenario, HashingEmbedder)) as running,
        EmbeddedCluster(running) as cluster,
    ):
        await scenario(cluster)


async def test_what_the_services_made_at_start_is_out_of_full_collections_while_they_run(
        pipeline: PipelineFactory) -> None:
    """A full collection stops every service's loop while it walks the heap; start-up's objects are skipped."""
    async with pipeline(names=["accountant"]) as running:
        assert gc.get_freeze_count() > 0
        assert not any(o is running.services[0] for o in gc.get_objects())
    assert gc.get_freeze_count() == 0  # a process that starts services again (the tests) keeps nothing frozen
