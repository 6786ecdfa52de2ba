"""What every service offers the runner: heavy resources load in `start`, handlers attach in `register`."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol, runtime_checkable

from faststream.kafka import KafkaBroker

from frugalstream.runtime.messaging import Publisher


class Service(Protocol):
    name: str

    async def start(self) -> None:
        """Load models and state once, before the broker starts consuming."""
        ...

    def register(self, broker: KafkaBroker, publisher: Publisher) -> None: ...

    async def stop(self) -> None:
        """Release resources after the broker has stopped consuming and flushed."""
        ...


@runtime_checkable
class BackgroundWork(Protocol):
    """A service with work outside its handlers (timers): it is stopped before the broker, not after."""

    async def stop_background(self) -> None: ...


async def cancel_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancels a service's timers and waits until each has ended (None: never started)."""
    for task in tasks:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
