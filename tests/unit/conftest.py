"""Unit-test fixtures: in-memory broker wiring with fakes behind the small protocols."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from faststream.kafka import TestKafkaBroker

from frugalstream.bootstrap import Resources
from frugalstream.llm.embedder import HashingEmbedder
from frugalstream.llm.providers import SimulatedProvider
from frugalstream.runner import RunningServices
from frugalstream.runtime.settings import Settings


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
