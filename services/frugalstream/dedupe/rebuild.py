"""Rebuilds a dedupe instance's state from compacted topics when partitions are assigned.

`llm.cache` holds the answers, `llm.dedupe.waiting` the requests coalesced behind an in-flight twin, and
`llm.responses` after the group's last commit the answers a crashed owner published but had not read back.

The rebalance listener does not gate fetching: aiokafka marks the assignment complete, and may hand out
records of a new partition, before it awaits `on_partitions_assigned`. So the listener only starts the load
(`loads`, a `PartitionLoads`) and the service's handlers wait for the partitions of their records: a shard is
complete and its waiting requests are resumed before any request or answer of its scopes is handled, after a
restart, a rebalance, or a new instance joining. A load that fails is retried when the partition's records
come back; until it succeeds, they are not handled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from frugalstream.dedupe.logic import Deduper
from frugalstream.dedupe.results import Decision
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.records import Out
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.state_topics import OwnedPartitions, PartitionLoads, read_compacted, scan
from frugalstream.schemas import CacheEntry, LLMResponse, RoutedRequest
from frugalstream.schemas import topics as t

log = get_logger(__name__)


def is_release(out: Out) -> bool:
    """A tombstone of `llm.dedupe.waiting`: the request it names no longer waits."""
    return out.topic == t.DEDUPE_WAITING and out.value is None


def releases_last(outs: Sequence[Out]) -> tuple[list[Out], list[Out]]:
    """`outs` without their releases, and the releases: a release is published only once the rest is
    acknowledged. Sent together, the tombstone may land and the dispatch or answer replacing the waiting
    record not: after a crash the next owner finds neither, and the request never gets an answer."""
    return [o for o in outs if not is_release(o)], [o for o in outs if is_release(o)]


async def publish_releases_last(publisher: Publisher, outs: Sequence[Out], service: str) -> None:
    """Publishes `outs`, their releases once the rest is acknowledged (`releases_last`)."""
    first, releases = releases_last(outs)
    await publisher.publish_all(first, service=service)
    await publisher.publish_all(releases, service=service)


async def answered_since_commit(settings: Settings, partitions: set[int]) -> list[tuple[str, str]]:
    """(tenant, request id) of the answers on `llm.responses` after the group's last commit: the answers a
    crashed owner published but had not yet read back. Known before serving, they stop a redelivered request
    from getting a second, different answer (and never silence another tenant's request of the same id)."""
    ids: list[tuple[str, str]] = []
    for _, value, _ in await scan(settings, t.RESPONSES, partitions, from_group=settings.group("dedupe")):
        try:
            response = LLMResponse.model_validate_json(value or b"")
            ids.append((response.tenant, response.request_id))
        except ValidationError:
            continue  # dead-lettered by the handler when it gets there
    return ids


class CacheRebuilder(OwnedPartitions):
    """Starts loading newly owned partitions from the state topics and forgets the ones handed to another
    instance. `owned` is what is assigned; `loads` says which of it is loaded (handlers wait on it). The
    decisions on resumed waiting requests go where the service's `outs_for` sends every decision."""

    def __init__(self, settings: Settings, logic: Deduper,
                 outs_for: Callable[[Sequence[Decision]], list[Out]]) -> None:
        super().__init__(settings, t.ROUTED)
        self._logic = logic
        self._outs_for = outs_for
        self.publisher: Publisher | None = None
        self.loads = PartitionLoads("dedupe")

    def lost(self, partitions: set[int]) -> None:
        self.loads.forget(partitions)
        self._logic.forget_partitions(partitions)

    def unready(self) -> set[int]:
        return self.loads.loading & self.owned

    async def gained(self, partitions: set[int]) -> None:
        task = self.loads.start(partitions, self.load)  # synchronously, before this coroutine first yields
        # Waited for, never raised: a failure is logged by `loads` and retried when the partitions' records
        # come; a cancellation (revoked meanwhile) is not ours.
        await asyncio.wait({task})

    async def load(self, partitions: set[int]) -> None:
        """Rebuilds `partitions` from scratch: whatever is held of them (stale, or half loaded by a failed
        attempt) is dropped first. Their waiting requests are resumed last, once the cache is complete."""
        started = time.monotonic()
        self._logic.forget_partitions(partitions)
        entries = await read_compacted(self._settings, t.CACHE, CacheEntry, partitions)
        loaded = await self._logic.load(entries)
        for tenant, request_id in await answered_since_commit(self._settings, partitions):
            self._logic.mark_answered(tenant, request_id)
        held = await read_compacted(self._settings, t.DEDUPE_WAITING, RoutedRequest, partitions)
        decisions, pending = await self._logic.resume_waiters(held)
        outs = self._outs_for(decisions)
        if outs and self.publisher is not None:
            await publish_releases_last(self.publisher, outs, "dedupe")
        self._logic.settle(pending)  # a failed publish fails the load: retried from scratch, nothing remembered
        log.info("cache_rebuilt", partitions=sorted(partitions), entries=loaded, waiting=len(held),
                 seconds=round(time.monotonic() - started, 2))
