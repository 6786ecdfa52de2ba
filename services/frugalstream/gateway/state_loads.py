"""Per partition, the read of a gateway state topic that every lookup on the partition waits for.

Shared by the paid-call records (`completed.py`) and the provider batch jobs (`batch_jobs.py`). A load starts
synchronously when partitions are assigned, before any of their records can be handled; a lookup on a
partition whose load runs waits for it; a failed load stays known, and the next lookup on one of its
partitions starts it again (and raises while it keeps failing): nothing of a partition is served from an
incomplete view of its state. Every start, the first and each retry, begins by dropping what the owner holds of
the partitions (`begin`): it may be stale, or half loaded by a failed attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable


class StateLoads:
    def __init__(self, name: str, load: Callable[[set[int]], Awaitable[int]],
                 begin: Callable[[set[int]], None]) -> None:
        self.name = name
        self._load = load
        self._begin = begin
        self._tasks: dict[int, asyncio.Task[int]] = {}  # partitions being (or that failed to be) loaded

    def loading(self) -> set[int]:
        """Partitions being loaded, or whose last load failed."""
        return set(self._tasks)

    def start(self, partitions: set[int]) -> asyncio.Task[int]:
        """Drops what is held of `partitions` and loads them in one task that every lookup on them awaits."""
        self._begin(set(partitions))
        task = asyncio.create_task(self._run(set(partitions)), name=f"{self.name}-load-{sorted(partitions)}")
        for partition in partitions:
            self._tasks[partition] = task
        return task

    async def _run(self, partitions: set[int]) -> int:
        loaded = await self._load(partitions)
        current = asyncio.current_task()
        for partition in partitions:
            if self._tasks.get(partition) is current:  # not started again (or forgotten) meanwhile
                del self._tasks[partition]
        return loaded

    async def ready(self, partition: int) -> None:
        """Waits for the partition's load; restarts a failed one (raises while it keeps failing)."""
        task = self._tasks.get(partition)
        if task is None:
            return
        if task.done() and (task.cancelled() or task.exception() is not None):
            task = self.start({partition})
        await asyncio.shield(task)

    def forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._tasks.pop(partition, None)
