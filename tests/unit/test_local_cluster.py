"""The local-cluster helper without a broker: the settings it builds, the topics it asks for, what it releases.

Starting and stopping the broker is covered where a broker runs: the demo, dev mode and the integration suite.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest

import frugalstream.runner
from frugalstream.resources import Resources
from frugalstream.schemas import topics as t
from frugalstream.tools.embedded_broker import EmbeddedBroker
from frugalstream.tools.local_cluster import EMBEDDED_CLIENT, PARTITIONS, cluster_settings, create_topics, run_services


def test_cluster_settings_fit_the_embedded_broker_and_take_overrides(tmp_path: Path) -> None:
    settings = cluster_settings("127.0.0.1:19092", tmp_path, topic_prefix="x.", coalesce_timeout_s=5.0)
    assert settings.kafka_bootstrap == "127.0.0.1:19092" and settings.state_dir == tmp_path
    assert {name: getattr(settings, name) for name in EMBEDDED_CLIENT} == dict(EMBEDDED_CLIENT)
    assert settings.topic(t.REQUESTS) == f"x.{t.REQUESTS}" and settings.coalesce_timeout_s == 5.0
    assert cluster_settings("b:1", tmp_path, kafka_fetch_max_wait_ms=200).kafka_fetch_max_wait_ms == 200


class RecordingBroker:
    def __init__(self) -> None:
        self.specs: dict[str, int] = {}

    async def create_topics(self, specs: Mapping[str, int]) -> None:
        self.specs.update(specs)


async def test_every_topic_is_created_under_the_prefix_with_one_partition_count(tmp_path: Path) -> None:
    broker = RecordingBroker()
    await create_topics(cast(EmbeddedBroker, broker), cluster_settings("b:1", tmp_path, topic_prefix="p."))
    assert broker.specs == {f"p.{name}": PARTITIONS for name in t.ALL_TOPICS}
    assert {f"p.{t.dlq_topic(t.REQUESTS)}", f"p.{t.CACHE}"} <= set(broker.specs)


async def test_resources_are_released_when_the_services_fail_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed: list[Resources] = []

    class Broken:
        def __init__(self, names: Any, resources: Resources) -> None:
            self.resources = resources

        async def __aenter__(self) -> None:
            raise RuntimeError("a service failed to start")

        async def __aexit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(frugalstream.runner, "RunningServices", Broken)
    monkeypatch.setattr(Resources, "close", lambda self: closed.append(self))
    settings = cluster_settings("b:1", tmp_path)
    with pytest.raises(RuntimeError, match="failed to start"):
        async with run_services(settings, ["accountant"]):
            pytest.fail("the block must not run")
    assert [r.settings for r in closed] == [settings]
