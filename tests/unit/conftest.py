"""Unit-test fixtures: in-memory broker wiring with fakes behind the small protocols."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from faststream.kafka import TestKafkaBroker

from services.bootstrap import Resources
from services.core.embedder import HashingEmbedder
from services.core.settings import Settings
from services.gateway.providers import SimulatedProvider
from services.runner import RunningServices


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state", simulated_latency_scale=0.0, kafka_idempotent=False)


@pytest.fixture
def resources(settings: Settings) -> Resources:
    return Resources(
        settings,
        embedder_factory=HashingEmbedder,
        provider_factory=lambda _name: SimulatedProvider(latency_scale=0.0),
    )


@pytest.fixture
async def pipeline(resources: Resources) -> AsyncIterator[RunningServices]:
    """Every service on FastStream's in-memory broker: publishes are delivered to handlers synchronously."""
    running = RunningServices(["classifier", "dedupe", "gateway", "summarizer", "accountant"], resources)
    for svc in running.services:
        await svc.start()
        svc.register(running.broker, running.publisher)
    async with TestKafkaBroker(running.broker):
        yield running
    for svc in reversed(running.services):
        await svc.stop()
    resources.close()
