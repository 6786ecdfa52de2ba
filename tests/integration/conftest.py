"""Integration fixtures: every service against the session's embedded broker, isolated by topic prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from frugalstream.bootstrap import SERVICE_NAMES, Resources
from frugalstream.llm.embedder import Embedder, HashingEmbedder
from frugalstream.runner import RunningServices
from frugalstream.runtime.kafka_options import MIN_KAFKA_SESSION_TIMEOUT_MS, TANSU_FETCH_MAX_WAIT_MS
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import topics as t
from frugalstream.tools.embedded_broker import EmbeddedBroker

PARTITIONS = 4
PipelineFactory = Callable[..., AbstractAsyncContextManager[RunningServices]]


@pytest.fixture
async def integration_settings(embedded_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path) -> Settings:
    settings = Settings(
        kafka_bootstrap=embedded_broker.bootstrap, kafka_idempotent=False,
        kafka_fetch_max_wait_ms=TANSU_FETCH_MAX_WAIT_MS, kafka_session_timeout_ms=MIN_KAFKA_SESSION_TIMEOUT_MS,
        topic_prefix=f"{topic_prefix}.", group_prefix=topic_prefix, state_dir=tmp_path / "state",
        simulated_latency_scale=0.01, coalesce_timeout_s=5.0,
    )
    await embedded_broker.create_topics({settings.topic(n): PARTITIONS for n in t.ALL_TOPICS})
    return settings


@pytest.fixture
def pipeline(integration_settings: Settings) -> PipelineFactory:
    """`async with pipeline(names=..., embedder=...) as running:` runs services until the block ends."""

    @asynccontextmanager
    async def run(names: Sequence[str] = SERVICE_NAMES, embedder: Callable[[], Embedder] = HashingEmbedder,
                  settings: Settings | None = None, **resource_kwargs: Any) -> AsyncIterator[RunningServices]:
        resources = Resources(settings or integration_settings, embedder_factory=embedder, **resource_kwargs)
        try:
            async with RunningServices(names, resources) as running:
                yield running
        finally:
            resources.close()

    return run
