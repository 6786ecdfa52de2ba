"""The gateway's idempotency surface: "already paid for (tenant, request id)?" and "paid".

The protocol is all the gateway logic sees. `MemoryCompleted` is the in-memory fake the unit tests use, and the
memory behind the real store, `frugalstream.gateway.completed.TopicCompleted` (records on `llm.gateway.completed`,
visible to every replica; see that module for the ordering that makes a paid call durable before its answer
is published). There is no local file any more: a file on one pod cannot stop another pod from paying again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from frugalstream.llm.identity import request_key
from frugalstream.schemas import CompletedCall

Clock = Callable[[], float]


class CompletedCalls(Protocol):
    """Where the gateway asks "already paid?" and says "paid": the only idempotency surface it sees."""

    async def lookup(self, partition: int, key: str) -> CompletedCall | None:
        """The recorded call for `key` (a `request_key`) on this dispatch partition, if any, durable."""
        ...

    async def record(self, partition: int, call: CompletedCall) -> None:
        """Remembers a paid (or failed) call; durable when it returns, raises if it could not be made so."""
        ...


def call_key(call: CompletedCall) -> str:
    return request_key(call.tenant, call.request_id)


class MemoryCompleted:
    """Records by partition, in completion order, forgotten after the retention. The in-memory fake used by unit
    tests, and the memory behind `TopicCompleted`."""

    def __init__(self, retention_s: float = 7 * 86400, clock: Clock = time.time) -> None:
        self.retention_s = retention_s
        self._clock = clock
        self._by_partition: dict[int, OrderedDict[str, CompletedCall]] = {}

    def __len__(self) -> int:
        return sum(len(calls) for calls in self._by_partition.values())

    def _expired(self, call: CompletedCall, now: float) -> bool:
        return call.completed_at < now - self.retention_s

    def prune(self) -> int:
        """Drops expired records (oldest first in each partition); returns how many."""
        now, dropped = self._clock(), 0
        for calls in self._by_partition.values():
            while calls and self._expired(next(iter(calls.values())), now):
                calls.popitem(last=False)
                dropped += 1
        return dropped

    def get(self, partition: int, key: str) -> CompletedCall | None:
        self.prune()
        calls = self._by_partition.get(partition)
        return calls.get(key) if calls is not None else None

    def put(self, partition: int, call: CompletedCall) -> None:
        calls = self._by_partition.setdefault(partition, OrderedDict())
        calls[call_key(call)] = call
        calls.move_to_end(call_key(call))

    def load(self, entries: Iterable[tuple[CompletedCall, int]]) -> int:
        """Adds records read back from the topic, skipping expired ones; returns how many were kept."""
        now = self._clock()
        kept = sorted(((c, p) for c, p in entries if not self._expired(c, now)), key=lambda e: e[0].completed_at)
        for call, partition in kept:
            self.put(partition, call)
        return len(kept)

    def forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._by_partition.pop(partition, None)

    async def lookup(self, partition: int, key: str) -> CompletedCall | None:
        return self.get(partition, key)

    async def record(self, partition: int, call: CompletedCall) -> None:
        self.put(partition, call)
