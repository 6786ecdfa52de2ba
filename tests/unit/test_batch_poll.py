"""An empty batch poll waits one period in all, not two; every stage's subscriber polls that way.

FastStream's batch subscriber slept a whole period after a poll that had already waited one, so a record that
landed in that sleep waited up to 50 ms more on every hop of the answer path. The clock here is fake: the
tests count what the poll waits, not how long the machine took.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from faststream.kafka import KafkaBroker

from frugalstream.bootstrap import Resources
from frugalstream.llm.embedder import HashingEmbedder
from frugalstream.llm.providers import SimulatedProvider
from frugalstream.runner import RunningServices
from frugalstream.runtime import batch_poll
from frugalstream.runtime.batch_poll import PromptBatchSubscriber, prompt_polling
from frugalstream.runtime.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class FakeConsumer:
    """`getmany` that takes `waits` seconds of the fake clock and returns `records`."""

    def __init__(self, clock: FakeClock, waits: float, records: dict[TopicPartition, list[Any]]) -> None:
        self.clock, self.waits, self.records = clock, waits, records
        self.calls: list[dict[str, Any]] = []

    async def getmany(self, **kwargs: Any) -> dict[TopicPartition, list[Any]]:
        self.calls.append(kwargs)
        self.clock.now += self.waits
        return self.records


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(batch_poll, "monotonic", fake.monotonic)
    monkeypatch.setattr(batch_poll, "sleep", fake.sleep)
    return fake


def built_subscriber() -> PromptBatchSubscriber:
    subscriber = prompt_polling(KafkaBroker().subscriber("t", batch=True, batch_timeout_ms=50, max_records=7))
    assert isinstance(subscriber, PromptBatchSubscriber)
    return subscriber


async def test_a_poll_that_waited_its_period_for_nothing_does_not_sleep_again(clock: FakeClock) -> None:
    consumer = FakeConsumer(clock, waits=0.05, records={})
    assert await built_subscriber().get_msg(consumer) == ()  # type: ignore[arg-type]
    assert consumer.calls == [{"timeout_ms": 50, "max_records": 7}]
    assert clock.slept == []
    assert clock.now == pytest.approx(100.05)


async def test_a_poll_that_returned_empty_early_sleeps_the_rest_of_its_period(clock: FakeClock) -> None:
    consumer = FakeConsumer(clock, waits=0.02, records={})
    assert await built_subscriber().get_msg(consumer) == ()  # type: ignore[arg-type]
    assert clock.slept == [pytest.approx(0.03)]  # no busy loop: one poll per period while nothing comes
    assert clock.now == pytest.approx(100.05)


async def test_records_are_returned_at_once_in_partition_order(clock: FakeClock) -> None:
    records = {TopicPartition("t", 0): ["a", "b"], TopicPartition("t", 1): ["c"]}
    consumer = FakeConsumer(clock, waits=0.001, records=records)
    assert await built_subscriber().get_msg(consumer) == ("a", "b", "c")  # type: ignore[arg-type]
    assert clock.slept == []


def test_every_stage_subscriber_polls_without_the_second_wait(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, simulated_latency_scale=0.0, kafka_idempotent=False)
    resources = Resources(settings, embedder_factory=HashingEmbedder,
                          provider_factory=lambda _name: SimulatedProvider(latency_scale=0.0))
    running = RunningServices(["classifier", "dedupe", "gateway", "summarizer", "accountant", "audit"], resources)
    try:
        for svc in running.services:
            svc.register(running.broker, running.publisher)
        kinds = {type(sub) for sub in running.broker.subscribers}
    finally:
        resources.close()
    # A FastStream that builds another class for batches fails here, not silently on the latency.
    assert kinds == {PromptBatchSubscriber}


def test_other_subscribers_are_left_as_built() -> None:
    single = KafkaBroker().subscriber("t")
    assert type(prompt_polling(single)) is type(single)
