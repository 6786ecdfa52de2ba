"""Batches in flight at once (`runtime.inflight`): commits never pass a batch that has not finished, a slow
batch holds nothing but its own offsets, and a drain waits for what is in flight."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition

from frugalstream.runtime.inflight import CommitTracker, InFlight
from frugalstream.runtime.records import Record


def records(partition: int, first: int, last: int, topic: str = "t") -> list[Record]:
    return [Record(topic, partition, o, None, b"{}", ()) for o in range(first, last + 1)]


class Consumer:
    def __init__(self, partitions: set[int]) -> None:
        self.assigned = {TopicPartition("t", p) for p in partitions}
        self.commits: list[dict[TopicPartition, int]] = []
        self.paused: list[TopicPartition] = []

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))

    def pause(self, *tps: Any) -> None:
        self.paused.extend(tps)


def test_the_watermark_moves_only_over_finished_batches_in_offset_order() -> None:
    tracker = CommitTracker()
    a, b, c = (tracker.begin(records(0, f, f + 4)) for f in (0, 5, 10))
    other = tracker.begin(records(1, 0, 2))
    assert tracker.finish(b) == {}  # a, before it, is still running
    assert tracker.finish(c) == {}
    assert tracker.finish(a) == {("t", 0): 15}  # a, b and c at once
    assert tracker.finish(other) == {("t", 1): 3}
    assert tracker.in_flight() == 0


def test_a_rewind_forgets_what_was_in_flight_on_that_partition() -> None:
    tracker = CommitTracker()
    old = tracker.begin(records(0, 0, 4))
    tracker.begin(records(0, 5, 9))
    again = tracker.begin(records(0, 0, 4))  # redelivered from the committed offset
    assert tracker.finish(old) == {}  # not ours to commit any more: the queue was reset
    assert tracker.finish(again) == {("t", 0): 5}


async def test_a_slow_batch_holds_only_its_own_offsets_and_a_drain_waits_for_it() -> None:
    consumer = Consumer({0, 1})
    inflight = InFlight("stage", limit=4)
    slow_gate, finished = asyncio.Event(), []

    async def slow() -> None:
        await slow_gate.wait()
        finished.append("slow")

    async def fast(name: str) -> None:
        finished.append(name)

    await inflight.submit(records(0, 0, 9), consumer, slow)
    await inflight.submit(records(0, 10, 12), consumer, lambda: fast("after-slow"))
    await inflight.submit(records(1, 0, 3), consumer, lambda: fast("other-partition"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert finished == ["after-slow", "other-partition"]  # nobody waited for the slow one
    assert consumer.commits == [{TopicPartition("t", 1): 4}]  # partition 0's watermark waits for the slow batch
    drained = asyncio.create_task(inflight.drain(timeout_s=5))
    await asyncio.sleep(0)
    assert not drained.done() and set(consumer.paused) == consumer.assigned
    slow_gate.set()
    await drained
    assert consumer.commits[-1] == {TopicPartition("t", 0): 13}
    await inflight.submit(records(0, 13, 14), consumer, lambda: fast("late"))  # drained: taken, not run
    assert "late" not in finished and len(consumer.commits) == 2


async def test_the_limit_holds_the_next_batch_until_a_slot_frees() -> None:
    consumer = Consumer({0})
    inflight = InFlight("stage", limit=1)
    gate = asyncio.Event()

    async def held() -> None:
        await gate.wait()

    async def quick() -> None:
        return None

    await inflight.submit(records(0, 0, 0), consumer, held)
    second = asyncio.create_task(inflight.submit(records(0, 1, 1), consumer, quick))
    await asyncio.sleep(0.01)
    assert not second.done()  # back-pressure: FastStream's loop waits here, so no more is fetched and held
    gate.set()
    await asyncio.wait_for(second, 1)


async def test_a_per_record_limit_counts_the_records_in_flight_not_the_batches() -> None:
    """The gateway's bound is calls in flight: three single-record batches fit a limit of three, a fourth
    record waits; a batch larger than the whole limit still runs once nothing else is in flight."""
    consumer = Consumer({0, 1})
    inflight = InFlight("gateway", limit=3, per_record=True)
    gates = [asyncio.Event() for _ in range(3)]
    finished: list[str] = []

    def held(i: int) -> Any:
        async def work() -> None:
            await gates[i].wait()
            finished.append(f"held-{i}")
        return work

    async def done(name: str) -> None:
        finished.append(name)

    for i in range(3):
        await asyncio.wait_for(inflight.submit(records(0, i, i), consumer, held(i)), 1)  # one slot each
    fourth = asyncio.create_task(inflight.submit(records(1, 0, 0), consumer, lambda: done("fourth")))
    await asyncio.sleep(0.01)
    assert not fourth.done(), "three calls in flight: the fourth record waits"
    gates[0].set()
    await asyncio.wait_for(fourth, 1)
    big = asyncio.create_task(inflight.submit(records(1, 1, 5), consumer, lambda: done("big")))
    await asyncio.sleep(0.01)
    assert not big.done(), "five records wait for every slot"
    gates[1].set()
    gates[2].set()
    await asyncio.wait_for(big, 1)
    await inflight.drain(timeout_s=1)
    assert finished[-1] == "big" and {"fourth", "held-1", "held-2"} <= set(finished)
