"""Runs a set of services on one broker connection: the same code path for `serve`, `demo` and tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from types import TracebackType

from faststream.kafka import KafkaBroker

from frugalstream.bootstrap import Resources, build_services
from frugalstream.runtime.broker import GRACEFUL_TIMEOUT_S, make_broker
from frugalstream.runtime.heap import startup_heap_frozen
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.probes import Health, start_probe_server
from frugalstream.runtime.service import BackgroundWork, Service

log = get_logger(__name__)


class RunningServices:
    """Start order: load resources, attach handlers, connect. Stop order: stop consuming (in-flight batches
    finish, outputs are flushed and offsets committed by their handlers), close the broker, then release."""

    def __init__(self, names: Sequence[str], resources: Resources, *, client_suffix: str = "",
                 health: Health | None = None, services: list[Service] | None = None) -> None:
        self.resources = resources
        self.settings = resources.settings
        self.services: list[Service] = services if services is not None else build_services(names, resources)
        self.broker = make_broker(self.settings, client_suffix=client_suffix)
        self.publisher = Publisher(self.broker, self.settings, health=health)
        self.health = self.publisher.health
        self._heap = contextlib.ExitStack()

    @classmethod
    async def load(cls, names: Sequence[str], resources: Resources, *, health: Health,
                   client_suffix: str = "") -> RunningServices:
        """Builds the services on a worker thread, which loads the models they use (embedder, verifier: seconds
        of CPU): the event loop keeps beating, so the process stays live, and `health` is not ready, saying
        "loading models", until they are in."""
        health.loading("models")
        try:
            services = await asyncio.to_thread(build_services, names, resources)
        finally:
            health.loaded("models")
        return cls(names, resources, client_suffix=client_suffix, health=health, services=services)

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    async def __aenter__(self) -> RunningServices:
        started: list[Service] = []
        try:
            for svc in self.services:
                await svc.start()
                started.append(svc)
                svc.register(self.broker, self.publisher)
            # Budgets and thresholds as they stand, before any request or job is decided on them.
            await self.publisher.preload_state()
            await start_subscribers_together(self.broker)
            self.health.attach(lambda: self.broker.ping(timeout=None))
        except BaseException:
            # A service or the broker failed to start: release what did start, so nothing is left running.
            log.error("services_start_failed", started=[s.name for s in started])
            await self._stop(started)
            raise
        self._heap.enter_context(startup_heap_frozen())  # what start made is skipped by full collections
        log.info("services_started", services=[s.name for s in self.services], bootstrap=self.settings.kafka_bootstrap)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self._stop(self.services)
        finally:
            self._heap.close()
        log.info("services_stopped", services=[s.name for s in self.services])

    async def _stop(self, services: Sequence[Service]) -> None:
        self.health.detach()
        for svc in services:
            if isinstance(svc, BackgroundWork):
                await svc.stop_background()  # nothing may publish once the broker starts closing
        await self.publisher.drain(GRACEFUL_TIMEOUT_S)
        await self.broker.stop()
        for svc in reversed(services):
            try:
                await svc.stop()
            except Exception:
                log.exception("service_stop_failed", service=svc.name)


async def start_subscribers_together(broker: KafkaBroker) -> None:
    """`broker.start()`, with the subscribers started at once instead of one after another.

    A group consumer's start returns once the group has formed, which a broker delays by its initial
    rebalance delay (Kafka's default, and the embedded broker's, is 3 s): thirteen subscribers in a row
    took 28 s to come up, together about 3 s.
    """
    await broker.connect()
    await asyncio.gather(*(sub.start() for sub in broker.subscribers))
    for pub in broker.publishers:
        await pub.start()
    broker.running = True


async def serve_forever(names: Sequence[str], resources: Resources, stop: asyncio.Event) -> None:
    """Runs until `stop`, with `/metrics`, `/healthz` and `/readyz` on `metrics_port` when it is set."""
    health = Health()
    beat: asyncio.Task[None] | None = None
    if resources.settings.metrics_port:
        server, _ = start_probe_server(resources.settings.metrics_port, health)
        beat = asyncio.create_task(health.run(), name="frugal-health")
    try:
        async with await RunningServices.load(names, resources, health=health):
            await stop.wait()
    finally:
        if beat is not None:
            beat.cancel()
            await asyncio.to_thread(server.shutdown)  # waits for the serving thread's poll to end
            server.server_close()
