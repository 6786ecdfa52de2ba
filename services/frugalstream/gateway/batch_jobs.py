"""The gateway's provider batch jobs, kept on the compacted topic `llm.gateway.batches`: durable across crashes,
restarts and rebalances, like the paid-call records of `llm.gateway.completed` (see `completed.py`).

Layout. One `BatchJob` per job, keyed by its job id and written to the SAME partition number as the dispatch
records of its members, so `llm.requests.dispatch` and `llm.gateway.batches` must have equal partition counts
(as `frugalstream topics` creates them). The owner of dispatch partition N loads the jobs of batches partition
N when it is assigned N, and forgets them when N is revoked: a job moves with its partition. From the revoke
until the assignment says whether N stays, its jobs are hidden from the runner (`suspend`), and the revoke
waits for the runner's step in progress (`BatchRunner.quiesce`); once N is lost, nothing is kept of it, not
even a job the runner records afterwards (the record still reaches the topic, where the new owner finds it).
Otherwise a tick that was inside a provider call when N moved would put the job back, and two gateways would
advance it, and both pay its members' fallback calls.

Ordering. `record` returns once the broker acknowledged the job; the gateway commits a deferred dispatch only
after its job (with it as a member) is recorded, and waits on a provider batch only after its id is recorded.

`MemoryBatchJobs` is the same surface without a topic, for unit tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from aiokafka import TopicPartition

from frugalstream.gateway.completed import CompletedLoader, TopicCompleted
from frugalstream.gateway.state_loads import StateLoads
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.records import Out
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.state_topics import PartitionRevokedError, read_compacted
from frugalstream.schemas import BatchJob
from frugalstream.schemas import topics as t

log = get_logger(__name__)


class BatchJobStore(Protocol):
    async def ready(self, partition: int) -> None:
        """Returns once the partition's jobs are loaded (raises while its load keeps failing)."""
        ...

    def jobs(self) -> list[BatchJob]:
        """Every job of the loaded, owned partitions that is not done."""
        ...

    async def record(self, job: BatchJob) -> None:
        """Durable when it returns (raises if it could not be made so); a `done` job is then forgotten."""
        ...


class MemoryBatchJobs:
    def __init__(self) -> None:
        self.by_partition: dict[int, dict[str, BatchJob]] = {}
        self.recorded: list[BatchJob] = []  # every write, in order (tests read it)

    async def ready(self, partition: int) -> None:
        return None

    def jobs(self) -> list[BatchJob]:
        return [j for jobs in self.by_partition.values() for j in jobs.values()]

    def put(self, job: BatchJob) -> None:
        jobs = self.by_partition.setdefault(job.partition, {})
        if job.state == "done":
            jobs.pop(job.job_id, None)
        else:
            jobs[job.job_id] = job

    def load(self, entries: Iterable[tuple[BatchJob, int]]) -> int:
        kept = 0
        for job, _partition in entries:
            if job.state != "done":
                self.put(job)
                kept += 1
        return kept

    def forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self.by_partition.pop(partition, None)

    async def record(self, job: BatchJob) -> None:
        self.recorded.append(job)
        self.put(job)


class TopicBatchJobs(MemoryBatchJobs):
    """`BatchJobStore` on `llm.gateway.batches`: memory for the owned partitions, the topic for durability."""

    def __init__(self, settings: Settings, publisher: Publisher | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.publisher = publisher  # set by the service when it registers on the broker
        self.loads = StateLoads("gateway-batches", lambda partitions: self._load(partitions), self._begin)
        self._suspended: set[int] = set()  # revoked, until the assignment says whether they stay: hidden
        self._forgotten: set[int] = set()  # lost (owned elsewhere) until gained again: nothing is kept of them

    async def ready(self, partition: int) -> None:
        if partition in self._suspended:  # its jobs are hidden: joining one now could join a request twice
            raise PartitionRevokedError(f"gateway-batches: partition {partition} is being revoked")
        await self.loads.ready(partition)

    def loaded(self, partition: int) -> bool:
        return partition in self.by_partition and partition not in self.loads.loading()

    def jobs(self) -> list[BatchJob]:
        hidden = self.loads.loading() | self._suspended
        return [j for p, jobs in self.by_partition.items() if p not in hidden for j in jobs.values()]

    def put(self, job: BatchJob) -> None:
        if job.partition in self._forgotten:  # owned elsewhere now: its owner has it from the topic
            log.info("batch_job_not_kept", job_id=job.job_id, partition=job.partition, state=job.state)
            return
        super().put(job)

    def suspend(self, partitions: Iterable[int]) -> None:
        """Revoked: their jobs are hidden (and no request joins one) until the assignment is known."""
        self._suspended |= set(partitions)

    def resume(self) -> None:
        """The assignment is known: call it just before the lost partitions are forgotten."""
        self._suspended.clear()

    async def record(self, job: BatchJob) -> None:
        if self.publisher is None:
            raise RuntimeError("the batch job store has no publisher (service not registered)")
        await self.publisher.publish_all([Out(t.GATEWAY_BATCHES, job, key=job.job_id, partition=job.partition)])
        self.recorded.append(job)
        self.put(job)

    def loading(self) -> set[int]:
        return self.loads.loading()

    def start_load(self, partitions: set[int]) -> asyncio.Task[int]:
        """Like `TopicCompleted.start_load`: synchronously, before any record of these partitions is handled."""
        return self.loads.start(partitions)

    def _begin(self, partitions: set[int]) -> None:
        """What a (re)started load drops first: the jobs held of these partitions."""
        super().forget(partitions)
        self._suspended -= partitions
        self._forgotten -= partitions
        for partition in partitions:
            self.by_partition[partition] = {}

    async def _load(self, partitions: set[int]) -> int:
        started = time.monotonic()
        entries = await read_compacted(self.settings, t.GATEWAY_BATCHES, BatchJob, partitions)
        kept = self.load(entries)
        log.info("batch_jobs_loaded", partitions=sorted(partitions), jobs=kept,
                 seconds=round(time.monotonic() - started, 2))
        return kept

    def forget(self, partitions: Iterable[int]) -> None:
        parts = set(partitions)
        self.loads.forget(parts)
        super().forget(parts)
        self._suspended -= parts
        self._forgotten |= parts


class GatewayLoader(CompletedLoader):
    """The gateway's rebalance listener when it runs batch jobs: paid calls and batch jobs of a partition are
    loaded together when it is gained, and forgotten together when it is lost. On a revoke, once the dispatch
    batches in flight are done (their intakes join jobs), the revoked partitions' jobs are suspended and the
    runner's step in progress is waited for (`quiesce`, set by the service: `BatchRunner.quiesce`)."""

    def __init__(self, settings: Settings, completed: TopicCompleted, jobs: TopicBatchJobs) -> None:
        super().__init__(settings, completed)
        self._jobs = jobs
        self.quiesce: Callable[[], Awaitable[None]] | None = None

    async def settle(self, revoked: set[TopicPartition]) -> None:
        try:
            await super().settle(revoked)
        finally:  # even when the bound cut the wait short
            self._jobs.suspend(tp.partition for tp in revoked if tp.topic == self._settings.topic(t.DISPATCH))
        if self.quiesce is not None:
            await self.quiesce()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # Kept partitions run on; lost ones are forgotten by `lost`, before anything else runs (no await between).
        self._jobs.resume()
        await super().on_partitions_assigned(assigned)

    def lost(self, partitions: set[int]) -> None:
        super().lost(partitions)
        self._jobs.forget(partitions)

    def unready(self) -> set[int]:
        return super().unready() | (self._jobs.loading() & self.owned)

    async def gained(self, partitions: set[int]) -> None:
        task = self._jobs.start_load(partitions)  # synchronously, before the first await
        await super().gained(partitions)
        try:
            await asyncio.shield(task)
        except Exception:
            log.exception("batch_jobs_load_failed", partitions=sorted(partitions))  # `ready` retries it
