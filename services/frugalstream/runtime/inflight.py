"""Batches in flight at once on one consumer, committed in offset order: no batch waits behind a slow one.

A stage that handles one batch at a time makes every record wait for the slowest work of the batch before it:
a gateway batch holding one 30 s model call holds the fast answers of its partition for 30 s, and the
classifier's embedding thread idles while a batch publishes. For stages whose records are independent (the
classifier, the gateway), `InFlight` runs up to `limit` batches as tasks and commits, per partition, only the
offsets below the first batch not yet finished (the watermark), so a crash redelivers every unfinished record
and loses none. Each batch task runs the stage's steps in order (process, publish and wait for the acks), then:

1. marks its batch finished;
2. commits, per partition, the end of the finished prefix (in offset order), when it moved.

Back-pressure: when `limit` batches are in flight, the handler waits for a slot, so FastStream stops taking
batches and the consumer's fetch buffer bounds what it holds. With `per_record`, the limit counts records
instead (the gateway's: model calls in flight, whatever the batches they came in); a batch larger than the
whole limit still runs, alone. On shutdown, `drain` pauses the partitions, waits for the batches in flight to
publish and commit, and only then may the broker close. On a rebalance, `settle` waits the same way for the
batches of the revoked partitions (`OwnedPartitions.on_partitions_revoked`).

A revoke's wait is bounded, and a batch merely waiting (a deferral's Retry-After, a retry's backoff) would
outlive the bound and then work on a partition another member owns (and pay for what it already paid). So a
batch waits only through `sleep`, which a revoke of one of its partitions ends with `BatchRevokedError`: the
batch stops there, unfinished and uncommitted, and the partition's owner consumes its records again. A batch
that got a slot only after the assignment changed is dropped when its partition is no longer assigned.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.records import Record

log = get_logger(__name__)
Span = tuple[int, int]  # first and last offset of a batch's records on one partition
RETRY_FIRST_S, RETRY_CAP_S = 0.5, 30.0  # a batch whose work raised runs again after these backoffs


class BatchRevokedError(Exception):
    """A partition of the waiting batch was revoked: it stops, uncommitted (raised by `InFlight.sleep`)."""


@dataclass(eq=False)
class _Batch:
    spans: dict[tuple[str, int], Span]
    done: bool = False
    revoked: bool = False  # a partition of it was revoked: its next (or current) `sleep` stops it
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # ends its `sleep` early on a revoke


@dataclass
class CommitTracker:
    """Per partition, the batches in offset order; `finish` returns the offsets that may now be committed.

    A batch that starts past the end of the last one queued is queued behind it, whatever the gap: offsets
    cannot tell a gap (a transaction marker, compaction) from a partition that came back after another member
    moved it on. For the second, the batch still running here then commits its own end, below the other
    member's commit, until the later batch's commit passes it: a crash in between redelivers records already
    handled (at least once, as any redelivery), never loses one. Only a batch starting at or before the end of
    the last one queued is a rewind, which forgets what was queued.
    """

    _queues: dict[tuple[str, int], deque[_Batch]] = field(default_factory=dict)

    def begin(self, records: Iterable[Record]) -> _Batch:
        spans: dict[tuple[str, int], Span] = {}
        for r in records:
            first, last = spans.get((r.topic, r.partition), (r.offset, r.offset))
            spans[(r.topic, r.partition)] = (min(first, r.offset), max(last, r.offset))
        batch = _Batch(spans)
        for tp, (first, _) in spans.items():
            queue = self._queues.setdefault(tp, deque())
            if queue and first <= queue[-1].spans[tp][1]:
                # A rewind (redelivery from the committed offset): what was in flight here is not ours to commit
                # any more. Only offsets going back say so: they also skip forward over a mere gap (a transaction
                # marker, an aborted transaction, compaction), where forgetting the batches still running would
                # let this one commit past them.
                queue.clear()
            queue.append(batch)  # a forward jump waits behind the batches in flight (see the class docstring)
        return batch

    def finish(self, batch: _Batch) -> dict[tuple[str, int], int]:
        batch.done = True
        commits: dict[tuple[str, int], int] = {}
        for tp in batch.spans:
            queue = self._queues.get(tp)
            while queue and queue[0].done:
                commits[tp] = queue.popleft().spans[tp][1] + 1
        return commits

    def in_flight(self) -> int:
        return sum(1 for q in self._queues.values() for b in q if not b.done)


class _Slots:
    """A semaphore whose takers take several slots at once (at most all of them); one taker waits at a time,
    since the consumer's handler submits its batches in turn."""

    def __init__(self, limit: int) -> None:
        self.limit = self.free = limit
        self._freed = asyncio.Event()

    async def take(self, n: int) -> int:
        n = min(n, self.limit)
        while self.free < n:
            self._freed.clear()
            await self._freed.wait()
        self.free -= n
        return n

    def give(self, n: int) -> None:
        self.free += n
        self._freed.set()


class InFlight:
    """Up to `limit` batches (or records, `per_record`) of one consumer as tasks, committed by `CommitTracker`
    (see the module docstring)."""

    def __init__(self, name: str, limit: int, *, per_record: bool = False) -> None:
        self.name = name
        self.per_record = per_record
        self._slots = _Slots(limit)
        self._tracker = CommitTracker()
        self._tasks: dict[asyncio.Task[None], _Batch] = {}
        self._consumer: Any = None
        self._closing = False
        self._revoked: set[tuple[str, int]] = set()  # being settled for a revoke, until `reassigned`

    @property
    def limit(self) -> int:
        return self._slots.limit

    async def submit(self, records: Sequence[Record], consumer: Any, work: Callable[[], Awaitable[None]]) -> None:
        """Starts `work` for the batch (one partition's run, see `stage.partition_runs`) once a slot is free;
        returns without waiting for it. While draining, the batch is left uncommitted (it comes again after the
        restart); so is a batch of a partition being revoked or no longer assigned (fetched before the revoke, it
        waited for a slot, maybe past the revoke's bound): the partition's owner, this member or another,
        consumes it again from the committed offset (aiokafka resets every position on a new assignment)."""
        taken = await self._slots.take(len(records) if self.per_record else 1)
        partitions = {(r.topic, r.partition) for r in records}
        assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        if self._closing or self._revoked & partitions or not partitions <= assigned:
            self._slots.give(taken)
            return
        self._consumer = consumer
        batch = self._tracker.begin(records)
        task = asyncio.create_task(self._run(batch, work, taken), name=f"{self.name}-batch")
        self._tasks[task] = batch
        task.add_done_callback(lambda done: self._tasks.pop(done, None))

    async def _run(self, batch: _Batch, work: Callable[[], Awaitable[None]], slots: int) -> None:
        """`work` again after a backoff while it raises (as a redelivery would run it), until it succeeds or a
        drain gives up on it: unfinished, its offsets hold the watermark and it comes again after a restart."""
        delay = RETRY_FIRST_S
        try:
            while True:
                try:
                    await work()
                    break
                except BatchRevokedError:
                    raise
                except Exception:
                    log.exception("inflight_batch_failed_retrying", stage=self.name, seconds=delay)
                    await self.sleep(delay)
                    delay = min(delay * 2, RETRY_CAP_S)
        except BatchRevokedError:
            # Unfinished, so never committed: the partition's owner consumes these records again.
            log.info("inflight_batch_revoked", stage=self.name, partitions=sorted(batch.spans))
            return
        finally:
            self._slots.give(slots)
        await self._commit(self._tracker.finish(batch))

    async def sleep(self, seconds: float) -> None:
        """Waits `seconds` inside a batch's `work` (a deferral, a backoff); raises `BatchRevokedError` as soon as
        a partition of the batch is revoked (or at once if one was): the work must not go on after the revoke's
        bounded wait gave up on it. Outside a batch task, a plain sleep."""
        task = asyncio.current_task()
        batch = self._tasks.get(task) if task is not None else None
        if batch is None:
            await asyncio.sleep(seconds)
            return
        if not batch.revoked:
            with contextlib.suppress(TimeoutError):  # the wait ran out: the usual end
                await asyncio.wait_for(batch.wake.wait(), seconds)
        if batch.revoked:
            raise BatchRevokedError(f"{self.name}: partitions {sorted(batch.spans)} were revoked")

    async def _commit(self, commits: dict[tuple[str, int], int]) -> None:
        consumer = self._consumer
        if not commits or consumer is None:
            return
        assigned = consumer.assignment()
        offsets = {TopicPartition(t, p): o for (t, p), o in commits.items() if TopicPartition(t, p) in assigned}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except Exception as exc:  # a rebalance took the partition: its new owner redoes what was not committed
            log.warning("inflight_commit_failed", stage=self.name, error_type=type(exc).__name__)

    async def settle(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Returns once no batch of these (topic, partition)s is in flight: each ran its work and committed, or
        stopped at its next `sleep`. For a revoke (see `OwnedPartitions`): until `reassigned`, no new batch of
        them starts. Unbounded: the caller bounds it, and cancelling this wait leaves the batches running (each
        still stops at its next `sleep`)."""
        wanted = set(partitions)
        self._revoked |= wanted
        for batch in self._tasks.values():
            if wanted & batch.spans.keys():
                batch.revoked = True
                batch.wake.set()
        while True:
            tasks = {task for task, batch in self._tasks.items() if wanted & batch.spans.keys()}
            if not tasks:
                return
            await asyncio.wait(tasks)

    def running(self) -> int:
        """Batches whose task has not ended yet."""
        return len(self._tasks)

    def reassigned(self) -> None:
        """The rebalance is over: batches of every assigned partition run again."""
        self._revoked.clear()

    async def drain(self, timeout_s: float) -> None:
        """Takes no new batch, pauses the partitions, and waits (up to `timeout_s`) for the batches in flight."""
        self._closing = True
        if self._consumer is not None and hasattr(self._consumer, "pause"):
            self._consumer.pause(*self._consumer.assignment())
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            if pending:
                log.warning("inflight_batches_abandoned", stage=self.name, batches=len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)
