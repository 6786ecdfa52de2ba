"""The cache scales out with Kafka: a surviving instance rebuilds a stopped instance's shards and serves them."""

from __future__ import annotations

import asyncio
import time

import pytest

from frugalstream.bootstrap import Resources
from frugalstream.dedupe.app import DedupeService
from frugalstream.llm.embedder import HashingEmbedder
from frugalstream.runner import RunningServices
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, LLMRequest
from frugalstream.tools.demo import collect_responses, produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def questions(round_: int) -> list[LLMRequest]:
    # 16 tenants: their scopes spread over the 4 partitions, so each instance owns some of them.
    return [
        LLMRequest(id=f"r{round_}-{n}", tenant=f"tenant-{n}",
                   messages=(ChatMessage(role="user", content=f"What is the status of order {n}?"),))
        for n in range(16)
    ]


async def wait_until(check: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached in time")


async def test_surviving_instance_takes_over_partitions_and_serves_the_stopped_ones_entries(
    integration_settings: Settings,
) -> None:
    settings = integration_settings
    res_a = Resources(settings, embedder_factory=HashingEmbedder)
    res_b = Resources(settings, embedder_factory=HashingEmbedder)
    async with RunningServices(["classifier", "gateway", "dedupe"], res_a, client_suffix="-a") as a:
        dedupe_a = a.service("dedupe")
        assert isinstance(dedupe_a, DedupeService)
        b = RunningServices(["dedupe"], res_b, client_suffix="-b")
        await b.__aenter__()
        dedupe_b = b.service("dedupe")
        assert isinstance(dedupe_b, DedupeService)
        rebuilder_b = dedupe_b.rebuilder
        rebuilder_a = dedupe_a.rebuilder
        await wait_until(lambda: len(rebuilder_a.owned) == 2 and len(rebuilder_b.owned) == 2, 60)

        first = questions(0)
        await produce(settings.kafka_bootstrap, settings, first, None)
        got = await collect_responses(settings.kafka_bootstrap, settings, {r.id for r in first}, 60)
        assert {rs[0].source for rs in got.values()} == {"llm"}
        await wait_until(lambda: len(dedupe_a.logic.store) + len(dedupe_b.logic.store) == 16, 30)
        held_by_b = len(dedupe_b.logic.store)
        assert 0 < held_by_b < 16, "both instances own part of the cache"

        await b.__aexit__(None, None, None)
        # `owned` is what is assigned; the rebuild of the new partitions may still run (handlers wait for it).
        await wait_until(lambda: len(rebuilder_a.owned) == 4 and not rebuilder_a.loads.loading, 60)
        assert len(dedupe_a.logic.store) == 16, "the survivor rebuilt the stopped instance's shards"

        again = questions(1)
        await produce(settings.kafka_bootstrap, settings, again, None)
        got = await collect_responses(settings.kafka_bootstrap, settings, {r.id for r in again}, 60)
    res_a.close()
    res_b.close()
    assert all(len(rs) == 1 for rs in got.values())
    assert {rs[0].source for rs in got.values()} == {"cache_exact"}
    assert {rs[0].served_from for rs in got.values()} == {f"r0-{n}" for n in range(16)}
