"""Offsets are committed only after a batch's outputs are published (issue 19), on the embedded broker.

A publisher that fails once stands for a broker that does not acknowledge: the handler must raise, the batch
must be consumed again and published, and only then committed. With auto-commit the records are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel

from frugalstream.runtime.broker import make_broker
from frugalstream.runtime.kafka_options import MIN_KAFKA_SESSION_TIMEOUT_MS, TANSU_FETCH_MAX_WAIT_MS
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.records import Decoded, Out
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext, subscribe
from frugalstream.tools.embedded_broker import EmbeddedBroker


class _Note(BaseModel):
    n: int

class _FlakyPublisher(Publisher):
    """Fails the first publish of outputs, like a broker that does not acknowledge: the handler then raises."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.failures_left = 1
        self.published: list[int] = []
        self.all_published = asyncio.Event()

    async def publish_all(self, outs: Sequence[Out], **kwargs: Any) -> None:
        if outs and self.failures_left > 0:
            self.failures_left -= 1
            raise ConnectionError("outputs not acknowledged")
        await super().publish_all(outs, **kwargs)
        self.published.extend(o.value.n for o in outs if isinstance(o.value, _Note))
        if set(self.published) >= {0, 1, 2}:
            self.all_published.set()


@pytest.mark.integration
async def test_offsets_are_committed_only_after_the_outputs_are_published(
    embedded_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path,
) -> None:
    """A batch whose outputs fail to publish is consumed again (nothing lost), and only then committed."""
    settings = await _in_and_out(embedded_broker, topic_prefix, tmp_path)
    source = settings.topic("in")
    broker = make_broker(settings)
    publisher = _FlakyPublisher(broker, settings)
    seen: list[int] = []

    async def process(batch: Sequence[Decoded[_Note]], _ctx: BatchContext) -> list[Out]:
        seen.extend(d.value.n for d in batch)
        return [Out("out", d.value, key="k") for d in batch]

    subscribe(broker, publisher, settings, service="promise", topic="in", model=_Note, process=process)
    async with broker:
        await broker.start()
        for n in range(3):
            await broker.publish(_Note(n=n).model_dump_json().encode(), source, key=b"k")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(publisher.all_published.wait(), 15)
        assert publisher.failures_left == 0, f"the first publish failed, as staged (seen {seen})"
        assert sorted(set(publisher.published)) == [0, 1, 2], \
            f"records whose outputs were never published were committed and lost (seen {seen})"
        committed = await _committed(settings, source, settings.group("promise"))
    assert committed == 3


@pytest.mark.integration
async def test_batches_in_flight_at_once_never_commit_past_one_still_running(
    embedded_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path,
) -> None:
    """With batches in flight at once, a slow record holds nothing behind it but the committed offset: later
    records are answered while it runs, and the commit stays below it (a crash now would redeliver it)."""
    settings = await _in_and_out(embedded_broker, topic_prefix, tmp_path)
    source = settings.topic("in")
    broker = make_broker(settings)
    publisher = _FlakyPublisher(broker, settings)
    publisher.failures_left = 0
    slow_may_finish = asyncio.Event()

    async def process(batch: Sequence[Decoded[_Note]], _ctx: BatchContext) -> list[Out]:
        if any(d.value.n == 0 for d in batch):
            await slow_may_finish.wait()  # a 30 s model call, say
        return [Out("out", d.value, key="k") for d in batch]

    subscribe(broker, publisher, settings, service="inflight", topic="in", model=_Note, process=process,
              max_records=1, concurrency=4)
    async with broker:
        await broker.start()
        for n in range(3):
            await broker.publish(_Note(n=n).model_dump_json().encode(), source, key=b"k")
        deadline = time.monotonic() + 15
        while set(publisher.published) != {1, 2} and time.monotonic() < deadline:  # noqa: ASYNC110 - a list the publisher fills
            await asyncio.sleep(0.05)
        assert sorted(publisher.published) == [1, 2], "the records behind the slow one waited for it"
        assert await _committed(settings, source, settings.group("inflight"), within_s=1.0) is None, \
            "an offset past a record still in flight was committed: a crash now would lose it"
        slow_may_finish.set()
        committed = await _committed(settings, source, settings.group("inflight"))
    assert committed == 3 and sorted(publisher.published) == [0, 1, 2]


@pytest.mark.integration
async def test_one_partitions_slow_record_does_not_hold_another_partitions_answer_polled_with_it(
    embedded_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path,
) -> None:
    """Records of two partitions fetched in one poll are answered apart: the fast one is published while the
    slow one still runs, and only the fast partition's offset is committed."""
    settings = await _in_and_out(embedded_broker, topic_prefix, tmp_path, partitions=2)
    source = settings.topic("in")
    broker = make_broker(settings)
    publisher = _FlakyPublisher(broker, settings)
    publisher.failures_left = 0
    slow_may_finish = asyncio.Event()
    batches: list[list[int]] = []

    async def process(batch: Sequence[Decoded[_Note]], _ctx: BatchContext) -> list[Out]:
        batches.append([d.value.n for d in batch])
        if any(d.value.n == 0 for d in batch):
            await slow_may_finish.wait()  # a strong model's long answer, say
        return [Out("out", d.value, key="k") for d in batch]

    producer = make_broker(settings)
    async with producer:
        await producer.start()
        for n, partition in ((0, 0), (1, 1), (2, 1)):  # all there before the consumer starts: one poll
            await producer.publish(_Note(n=n).model_dump_json().encode(), source, partition=partition)
    subscribe(broker, publisher, settings, service="split", topic="in", model=_Note, process=process,
              max_records=64, concurrency=4)
    async with broker:
        await broker.start()
        deadline = time.monotonic() + 15
        while set(publisher.published) != {1, 2} and time.monotonic() < deadline:  # noqa: ASYNC110 - a list the publisher fills
            await asyncio.sleep(0.05)
        assert sorted(publisher.published) == [1, 2], f"partition 1 waited for partition 0 (batches {batches})"
        assert sorted(batches) == [[0], [1, 2]], "one batch per partition, each whole"
        assert await _committed(settings, source, settings.group("split"), 1.0, partition=0, until=1) is None
        assert await _committed(settings, source, settings.group("split"), partition=1, until=2) == 2
        slow_may_finish.set()
        assert await _committed(settings, source, settings.group("split"), partition=0, until=1) == 1
    assert sorted(publisher.published) == [0, 1, 2]


async def _in_and_out(embedded_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path,
                      partitions: int = 1) -> Settings:
    """Settings for an `in` topic of `partitions` and a one-partition `out` topic of this test's own, created."""
    settings = Settings(
        kafka_bootstrap=embedded_broker.bootstrap, kafka_idempotent=False,
        kafka_fetch_max_wait_ms=TANSU_FETCH_MAX_WAIT_MS, kafka_session_timeout_ms=MIN_KAFKA_SESSION_TIMEOUT_MS,
        topic_prefix=f"{topic_prefix}.", group_prefix=topic_prefix, state_dir=tmp_path / "state",
    )
    await embedded_broker.create_topics({settings.topic("in"): partitions, settings.topic("out"): 1})
    return settings


async def _committed(settings: Settings, topic: str, group: str, within_s: float = 15.0, *, partition: int = 0,
                     until: int = 3) -> int | None:
    """The group's committed offset on `partition`, once it reaches `until` or `within_s` passes."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        deadline = time.monotonic() + within_s
        while True:
            offset: int | None = await consumer.committed(TopicPartition(topic, partition))
            if offset == until or time.monotonic() > deadline:
                return offset
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()
