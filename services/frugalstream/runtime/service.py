"""What every service offers the runner: heavy resources load in `start`, handlers attach in `register`."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

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
