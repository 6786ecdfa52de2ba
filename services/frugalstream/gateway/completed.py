"""Paid calls, remembered on the compacted topic `llm.gateway.completed`: paid once across replicas and restarts.

Why a topic and not a file: a redelivered dispatch may land on another replica (a rebalance, a pod replaced
after a crash). The record of a paid call must be visible to whichever instance owns the request's
partition next, so it lives where the partition does.

Layout. One `CompletedCall` per paid (or failed) call, keyed by `request_key(tenant, request id)` and written
to the SAME partition number as the dispatch record it answers. So `llm.requests.dispatch` and
`llm.gateway.completed` MUST have equal partition counts (as `frugalstream topics` creates them): the owner of
dispatch partition N finds every record it needs in completed partition N and reads nothing else. A dispatch
is keyed by its cache scope, which a request keeps however often it is re-routed, so a redelivered (tenant,
id) always comes back on the same partition (as long as the partition count is not changed).

Ordering. `record` returns only once the broker acknowledged the record; the gateway publishes the response
and usage after that, and the stage commits after those. A crash anywhere in between leaves the dispatch
uncommitted and the record durable: the redelivery, on this instance or another, replays the recorded answer
and never pays again. Error answers (every model failed) are recorded too, so a redelivery replays the same
error instead of trying (and paying) again; only an error where no call went out (every circuit open) is not,
as nothing was paid. The store, not the gateway logic, holds the Publisher: the logic
only sees the `CompletedCalls` protocol and stays testable with `MemoryCompleted`.

Ownership. `CompletedLoader` is the consumer's rebalance listener: it starts loading the records of newly
assigned partitions and forgets revoked ones. aiokafka hands out records of a new partition while the listener
is still running (it marks the assignment complete before awaiting the callback), so the listener alone gates
nothing: a lookup on a partition whose load is in progress waits for it, and a lookup on a partition whose
load failed retries the load (and fails, deferring the request, until it succeeds): no dispatch of a partition
is served from an incomplete view of what was paid. A lookup on a partition forgotten (lost to another member)
raises `PartitionRevokedError` until the partition is loaded again: knowing nothing of it here does not mean
"never paid", and answering so would pay again for what the new owner may have paid already. Records older
than `idempotency_retention_s` are skipped on load and dropped from memory; the topic itself needs a matching
retention (`cleanup.policy=compact,delete`, `retention.ms`, as `frugalstream.runtime.topics_admin` creates
it), or it grows without bound.
"""

from __future__ import annotations

import asyncio
import time

from frugalstream.gateway.idempotency import Clock, MemoryCompleted, call_key
from frugalstream.gateway.state_loads import StateLoads
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.records import Out
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.state_topics import OwnedPartitions, PartitionRevokedError, read_compacted
from frugalstream.schemas import CompletedCall
from frugalstream.schemas import topics as t

log = get_logger(__name__)


class TopicCompleted:
    """`CompletedCalls` on `llm.gateway.completed`: memory for the owned partitions, the topic for durability.

    A call whose record could not be published stays *pending* in memory (it was paid: calling again would pay
    twice); the next lookup of it publishes it again before replaying it.
    """

    def __init__(self, settings: Settings, publisher: Publisher | None = None, clock: Clock = time.time) -> None:
        self.settings = settings
        self.publisher = publisher  # set by the service when it registers on the broker
        self.memory = MemoryCompleted(settings.idempotency_retention_s, clock)
        self._pending: dict[tuple[int, str], CompletedCall] = {}
        self._forgotten: set[int] = set()  # lost (owned elsewhere) until loaded again: lookups on them raise
        self.loads = StateLoads("gateway-completed", lambda partitions: self._load(partitions), self._begin)

    async def _publish(self, partition: int, call: CompletedCall) -> None:
        if self.publisher is None:
            raise RuntimeError("the completed-call store has no publisher (service not registered)")
        await self.publisher.publish_all([Out(t.GATEWAY_COMPLETED, call, key=call_key(call), partition=partition)])

    async def lookup(self, partition: int, key: str) -> CompletedCall | None:
        if partition in self._forgotten:  # its records are not ours: the new owner knows what was paid
            raise PartitionRevokedError(f"gateway-completed: partition {partition} is owned elsewhere")
        await self.loads.ready(partition)
        pending = self._pending.get((partition, key))
        if pending is not None:
            await self._publish(partition, pending)
            del self._pending[(partition, key)]
            self.memory.put(partition, pending)
            return pending
        return self.memory.get(partition, key)

    async def record(self, partition: int, call: CompletedCall) -> None:
        key = (partition, call_key(call))
        self._pending[key] = call
        await self._publish(partition, call)
        del self._pending[key]
        self.memory.put(partition, call)

    def loading(self) -> set[int]:
        """Partitions being loaded, or whose last load failed (a lookup on them retries it)."""
        return self.loads.loading()

    def start_load(self, partitions: set[int]) -> asyncio.Task[int]:
        """Forgets what is known of these partitions and reads them back from the topic, in one task that every
        lookup on them awaits. Must be called synchronously when they are assigned, before any of their records
        can be handled."""
        return self.loads.start(partitions)

    def _begin(self, partitions: set[int]) -> None:
        """What a (re)started load drops first: whatever was kept from an earlier ownership (or a failed load)
        may be stale."""
        self._forgotten -= partitions
        self.memory.forget(partitions)

    async def _load(self, partitions: set[int]) -> int:
        started = time.monotonic()
        entries = await read_compacted(self.settings, t.GATEWAY_COMPLETED, CompletedCall, partitions)
        loaded = self.memory.load(entries)
        log.info("completed_calls_loaded", partitions=sorted(partitions), records=loaded,
                 seconds=round(time.monotonic() - started, 2))
        return loaded

    def forget(self, partitions: set[int]) -> None:
        lost = [k for k in self._pending if k[0] in partitions]
        if lost:  # paid, never made durable, and now another instance owns them: it may pay again
            log.warning("completed_pending_dropped", partitions=sorted(partitions), calls=len(lost))
        for k in lost:
            del self._pending[k]
        self.loads.forget(partitions)
        self.memory.forget(partitions)
        self._forgotten |= partitions


class CompletedLoader(OwnedPartitions):
    """Starts loading newly owned dispatch partitions (lookups wait for it) and forgets revoked ones."""

    def __init__(self, settings: Settings, store: TopicCompleted) -> None:
        super().__init__(settings, t.DISPATCH)
        self._store = store

    def lost(self, partitions: set[int]) -> None:
        self._store.forget(partitions)

    def unready(self) -> set[int]:
        return self._store.loading() & self.owned

    async def gained(self, partitions: set[int]) -> None:
        task = self._store.start_load(partitions)  # synchronously, before this coroutine first yields
        try:
            await asyncio.shield(task)
        except Exception:
            log.exception("completed_calls_load_failed", partitions=sorted(partitions))  # lookups retry it
