"""Reading compacted state topics partition by partition: how a new owner rebuilds what it must know.

Used when partitions are assigned (dedupe's cache and waiting requests, the gateway's paid calls). The
rebalance listener alone gates nothing: aiokafka marks a new assignment complete, and its fetcher may hand out
records of a new partition, before it awaits `on_partitions_assigned`. So the listener only *starts* the load
(`PartitionLoads.start`, synchronously, before its first await) and the handlers wait for the partitions of
the records they process (`PartitionLoads.wait` / `settle`) before deciding anything on them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from pydantic import BaseModel, ValidationError

from frugalstream.runtime.broker import aiokafka_security
from frugalstream.runtime.inflight import InFlight
from frugalstream.runtime.kafka_options import client_options
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.settings import Settings, UsageError

log = get_logger(__name__)
M = TypeVar("M", bound=BaseModel)


async def scan(settings: Settings, name: str, partitions: set[int], *, from_group: str | None = None,
               idle_s: float = 2.0, timeout_s: float = 120.0,
               last_offsets: dict[int, int] | None = None) -> list[tuple[bytes, bytes | None, int]]:
    """(key, value, partition) of the given partitions, from the start or from `from_group`'s committed offsets.

    The group is only asked for its offsets: this reader never joins it and never commits. `last_offsets`, when
    given, receives the offset of the last record read from each partition.
    """
    topic = settings.topic(name)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms, group_id=from_group,
                                **aiokafka_security(settings))
    await consumer.start()
    found: list[tuple[bytes, bytes | None, int]] = []
    try:
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        if from_group is not None:
            for tp in tps:
                committed = await consumer.committed(tp)
                if committed is not None:
                    consumer.seek(tp, committed)
        end = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(*tps, timeout_ms=200)
            if not batch:
                # Done when the reported end is reached and the partitions stay quiet for a moment, or after
                # `idle_s` of quiet whatever the end offsets say: some brokers (Tansu) report them wrong.
                idle = time.monotonic() - idle_since
                positions = [await consumer.position(tp) for tp in tps]
                at_end = all(pos >= end[tp] for pos, tp in zip(positions, tps, strict=True))
                if (at_end and idle >= min(0.5, idle_s)) or idle >= idle_s:
                    break
                continue
            idle_since = time.monotonic()
            found.extend((rec.key or b"", rec.value, tp.partition) for tp, records in batch.items() for rec in records)
            if last_offsets is not None:
                last_offsets.update((tp.partition, records[-1].offset) for tp, records in batch.items() if records)
    finally:
        await consumer.stop()
    return found


async def read_compacted(settings: Settings, name: str, model: type[M], partitions: set[int]) -> list[tuple[M, int]]:
    """Latest value per key of the given partitions (compaction semantics: tombstones delete)."""
    latest: dict[bytes, tuple[M, int] | None] = {}
    for key, value, partition in await scan(settings, name, partitions):
        if value is None:
            latest[key] = None
            continue
        try:
            latest[key] = (model.model_validate_json(value), partition)
        except ValidationError:
            log.warning("state_record_invalid", topic=name, partition=partition)
    return [v for v in latest.values() if v is not None]


async def topic_partitions(settings: Settings, name: str) -> set[int]:
    """The partition numbers of a topic (logical name); a clear error when it does not exist."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                                **aiokafka_security(settings), **client_options())
    await consumer.start()
    try:
        await consumer.topics()
        found = consumer.partitions_for_topic(settings.topic(name)) or set()
    finally:
        await consumer.stop()
    if not found:
        raise UsageError(f"topic {settings.topic(name)} does not exist on {settings.kafka_bootstrap} "
                         "(run `frugalstream topics` first)")
    return set(found)


def decode_found(found: Iterable[tuple[bytes, bytes | None, int]], model: type[M],
                 key: bytes | None = None) -> list[M]:
    """The valid records of a scan (of one key, when given), in scan order; invalid ones are logged and skipped."""
    out: list[M] = []
    for k, value, _ in found:
        if value is None or (key is not None and k != key):
            continue
        try:
            out.append(model.model_validate_json(value))
        except ValidationError:
            log.warning("state_record_invalid", model=model.__name__)
    return out


async def read_topic(settings: Settings, name: str, model: type[M], *, key: bytes | None = None,
                     idle_s: float = 2.0) -> list[M]:
    """Every valid record of a whole topic (of one key, when given), without a group; decoded on a worker
    thread, since a topic of many records must not stall the event loop."""
    found = await scan(settings, name, await topic_partitions(settings, name), idle_s=idle_s)
    return await asyncio.to_thread(decode_found, found, model, key)


@dataclass
class StateFollower(Generic[M]):
    """One service's view of a control topic (budgets, thresholds) that every instance reads whole.

    The topic is read to its end before the service's consumers start (`read_to_end`, handed to `catch_up`), so
    no request or job is decided on a view still catching up after a restart; the follower's consumer then reads
    the topic from its start again, and `apply` skips what the catch-up applied (a record at or below the last
    offset applied on its partition), so the view never steps back to an older state on the way."""

    topic: str  # logical name
    model: type[M]
    update: Callable[[M], None]
    applied: dict[int, int] = field(default_factory=dict)  # partition -> offset of the last record applied

    def apply(self, value: M, partition: int, offset: int) -> None:
        if offset <= self.applied.get(partition, -1):
            return
        self.applied[partition] = offset
        self.update(value)

    def catch_up(self, values: Sequence[M], last_offsets: Mapping[int, int]) -> None:
        """The topic as `read_to_end` read it: its valid records in order, and where each partition stopped."""
        for value in values:
            self.update(value)
        self.applied.update(last_offsets)


async def read_to_end(settings: Settings, name: str, model: type[M], *,
                      idle_s: float = 1.0) -> tuple[list[M], dict[int, int]]:
    """Every valid record of a whole topic in order, and the offset of the last record read on each partition;
    a topic not created yet has none."""
    try:
        partitions = await topic_partitions(settings, name)
    except UsageError:
        return [], {}
    last: dict[int, int] = {}
    found = await scan(settings, name, partitions, idle_s=idle_s, last_offsets=last)
    return await asyncio.to_thread(decode_found, found, model), last


Loader = Callable[[set[int]], Awaitable[object]]


class PartitionRevokedError(RuntimeError):
    """The partition was handed to another instance (while a handler waited for it): its records are not ours."""


@dataclass(eq=False)
class _Load:
    partitions: frozenset[int]
    loader: Loader
    task: asyncio.Task[object] = field(init=False)

    def failed(self) -> bool:
        return self.task.done() and (self.task.cancelled() or self.task.exception() is not None)


class PartitionLoads:
    """Readiness, per partition, of the state loaded when the partition was assigned.

    A partition is *loading* from `start` until its load succeeds, *ready* after, *revoked* after `forget`
    (until started again), and ready when nothing is known of it (no listener: tests, in-memory brokers). A
    failed load is kept and restarted by the next `wait`/`settle` on one of its partitions, which raises (or
    reports) while it keeps failing: no record is handled without its partition's state.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._loads: dict[int, _Load] = {}  # partitions loading, or whose load failed
        self._revoked: set[int] = set()

    @property
    def loading(self) -> set[int]:
        """Partitions not ready yet (loading, or whose last load failed)."""
        return set(self._loads)

    def start(self, partitions: set[int], loader: Loader) -> asyncio.Task[object]:
        """Loads `partitions` with `loader` in one task. Call it synchronously when they are assigned, before any
        of their records can be handled; the loader must start by dropping whatever it holds of them (it may be
        stale, or half loaded by a failed attempt)."""
        load = _Load(frozenset(partitions), loader)
        load.task = asyncio.create_task(self._run(load), name=f"{self.name}-load-{sorted(partitions)}")
        load.task.add_done_callback(self._report)
        for partition in partitions:
            self._loads[partition] = load
        self._revoked -= partitions
        return load.task

    async def _run(self, load: _Load) -> object:
        result = await load.loader(set(load.partitions))
        for partition in load.partitions:
            if self._loads.get(partition) is load:
                del self._loads[partition]
        return result

    def _report(self, task: asyncio.Task[object]) -> None:
        if not task.cancelled() and task.exception() is not None:  # retrieved: retried by the next wait
            log.warning("partition_load_failed", loads=self.name, task=task.get_name(),
                        error_type=type(task.exception()).__name__)

    def forget(self, partitions: set[int]) -> None:
        """Revoked partitions: a load still running for them is cancelled (its other partitions load again in a
        new task), and their records are refused until they are started again."""
        self._revoked |= partitions
        cancelled: dict[int, _Load] = {}
        for partition in partitions:
            load = self._loads.pop(partition, None)
            if load is not None and not load.task.done():
                load.task.cancel()
                cancelled[id(load)] = load
        for load in cancelled.values():
            rest = {p for p in load.partitions if self._loads.get(p) is load}
            if rest:
                self.start(rest, load.loader)

    async def close(self) -> None:
        """Cancels the loads still running (a load may publish: nothing may once the broker closes)."""
        tasks = {load.task for load in self._loads.values() if not load.task.done()}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _restart(self, load: _Load, partition: int) -> _Load:
        """A failed load again, for all of its partitions still waiting on it (one task, not one per partition)."""
        self.start({p for p in load.partitions if self._loads.get(p) is load}, load.loader)
        return self._loads[partition]

    async def settle(self, partitions: Iterable[int]) -> dict[int, Exception]:
        """Waits until each partition is loaded, restarting a failed load once; returns the partitions that are
        not ready with why (the load's error, or `PartitionRevokedError`)."""
        failed: dict[int, Exception] = {}
        retried: set[_Load] = set()  # restarted by this call: a second failure is final for this call
        for partition in sorted(set(partitions)):
            while True:
                if partition in self._revoked:
                    failed[partition] = PartitionRevokedError(f"{self.name}: partition {partition} was revoked")
                    break
                load = self._loads.get(partition)
                if load is None:
                    break
                if load.failed() and load not in retried:
                    load = self._restart(load, partition)
                    retried.add(load)
                try:
                    await asyncio.shield(load.task)
                    break
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if not load.task.cancelled() or (task is not None and task.cancelling()):
                        raise  # we were cancelled, not the load
                    if self._loads.get(partition) is load:  # cancelled by someone else: treat as failed
                        failed[partition] = RuntimeError(f"{self.name}: load of partition {partition} cancelled")
                        break
                    # revoked (and maybe started again) while we waited: look again
                except Exception as exc:
                    failed[partition] = exc
                    break
        return failed

    async def wait(self, partitions: Iterable[int]) -> None:
        """Returns once every given partition is loaded; raises the first failure (see `settle`)."""
        failed = await self.settle(partitions)
        if failed:
            raise failed[min(failed)]


class OwnedPartitions(ConsumerRebalanceListener):  # type: ignore[misc]
    """A rebalance listener that keeps `owned` (the partitions of `topic` assigned to this member) and hands
    the difference to `gained` and `lost`, decided on assignment, which knows what stays.

    aiokafka may hand out records of a gained partition while `gained` still runs: start loads synchronously in
    it (before its first await) and have the handlers wait for them; the listener alone gates nothing.

    On revoke, the work still running on the revoked partitions is waited for (`settle`): Kafka runs every
    member's revoke before any member's assignment, so what is recorded and committed by then is what the next
    owner reads. Without it a gateway batch still paying for a call when its partition moves is paid again by
    the new owner, which loads the paid-call records before the old owner wrote that one. The wait is bounded
    by half the session timeout (the group's rebalance timeout): a member that rejoins later is dropped from
    the group, and what still runs then may be done twice.
    """

    def __init__(self, settings: Settings, topic: str) -> None:
        self._settings = settings
        self._topic = topic  # logical name
        self.owned: set[int] = set()
        self.joined = False  # got its first assignment (possibly empty): readiness waits for it
        self.inflight: InFlight | None = None  # the consumer's batches in flight, when it runs them as tasks

    @property
    def revoke_wait_s(self) -> float:
        """Half the session timeout, which is the group's rebalance timeout (`runtime.kafka_options`)."""
        return self._settings.kafka_session_timeout_ms / 2000

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        try:
            async with asyncio.timeout(self.revoke_wait_s):
                await self.settle(set(revoked))
        except TimeoutError:
            log.warning("revoke_settle_timed_out", topic=self._topic, seconds=self.revoke_wait_s,
                        partitions=sorted(tp.partition for tp in revoked))

    async def settle(self, revoked: set[TopicPartition]) -> None:
        """Waits for the work still running on the revoked partitions (at the bound the wait ends, not the work)."""
        if self.inflight is not None:
            await self.inflight.settle((tp.topic, tp.partition) for tp in revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.inflight is not None:
            self.inflight.reassigned()
        mine = {tp.partition for tp in assigned if tp.topic == self._settings.topic(self._topic)}
        new, gone = mine - self.owned, self.owned - mine
        self.owned = mine
        self.joined = True
        if gone:
            self.lost(gone)
        if new:
            await self.gained(new)

    def unready(self) -> set[int]:
        """Owned partitions whose state is not loaded yet (loading, or the last load failed): `/readyz`."""
        return set()

    def lost(self, partitions: set[int]) -> None:
        """Forget what belongs to partitions now owned elsewhere (their new owner loads them)."""

    async def gained(self, partitions: set[int]) -> None:
        """Start loading newly owned partitions."""
