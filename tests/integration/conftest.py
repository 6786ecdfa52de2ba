"""Integration fixtures: every service against the session's embedded broker, isolated by topic prefix.

The broker is the session's (see `tests/conftest.py`); the settings, the topic layout and the running of
services are the local cluster's, the same code the demo and the benches use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from frugalstream.llm.embedder import Embedder, HashingEmbedder
from frugalstream.llm.providers import Provider
from frugalstream.runner import RunningServices
from frugalstream.runtime.settings import Settings
from frugalstream.tools.embedded_broker import EmbeddedBroker
from frugalstream.tools.local_cluster import PARTITIONS, cluster_settings, create_topics, run_services

__all__ = ["PARTITIONS", "PipelineFactory"]

PipelineFactory = Callable[..., AbstractAsyncContextManager[RunningServices]]


@pytest.fixture
async def integration_settings(embedded_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path) -> Settings:
    settings = cluster_settings(embedded_broker.bootstrap, tmp_path / "state", topic_prefix=f"{topic_prefix}.",
                                group_prefix=topic_prefix, simulated_latency_scale=0.01, coalesce_timeout_s=5.0)
    await create_topics(embedded_broker, settings)
    return settings


@pytest.fixture
def pipeline(integration_settings: Settings) -> PipelineFactory:
    """`async with pipeline(names=..., embedder=...) as running:` runs services until the block ends."""

    def run(names: Sequence[str] | None = None, embedder: Callable[[], Embedder] = HashingEmbedder,
            settings: Settings | None = None,
            provider_factory: Callable[[str], Provider] | None = None) -> AbstractAsyncContextManager[RunningServices]:
        return run_services(settings or integration_settings, names, embedder=embedder, provider=provider_factory)

    return run
