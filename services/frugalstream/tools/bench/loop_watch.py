"""How long the shared event loop stood still during a bench step, and how much of that full collections explain.

Every service in the bench's process shares one loop: anything that holds it (a full garbage collection, CPU work
that belongs on a worker) delays every stage at once, and shows as a tail no single stage explains.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator
from typing import Any

#: How often the watcher asks the loop to wake it: a stall is how much later than this it woke.
TICK_S = 0.002


class LoopWatch:
    """Stalls of the loop (how late each tick woke) and the length of each full collection, in seconds."""

    def __init__(self) -> None:
        self.stall_s: list[float] = []
        self.full_s: list[float] = []
        self._started: float | None = None

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.full_s.append(time.perf_counter() - self._started)
            self._started = None

    async def beat(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(TICK_S)
            self.stall_s.append(max(0.0, time.perf_counter() - asked - TICK_S))

    def report(self) -> dict[str, Any]:
        stalls = sorted(self.stall_s)
        return {
            "loop_stall_ms_p99": round(stalls[int(len(stalls) * 0.99)] * 1000, 1) if stalls else None,
            "loop_stall_ms_max": round(stalls[-1] * 1000, 1) if stalls else None,
            "loop_stalls_over_20ms": sum(1 for s in stalls if s > 0.02),
            "gc_full_collections": len(self.full_s),
            "gc_full_ms_max": round(max(self.full_s) * 1000, 1) if self.full_s else 0.0,
        }


@contextlib.asynccontextmanager
async def loop_watch() -> AsyncIterator[LoopWatch]:
    watch = LoopWatch()
    gc.callbacks.append(watch.on_gc)
    task = asyncio.create_task(watch.beat(), name="bench-loop-watch")
    try:
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gc.callbacks.remove(watch.on_gc)
