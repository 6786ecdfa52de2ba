"""Broker trouble: the broker is frozen (SIGSTOP) in the middle of a stream and resumed (SIGCONT).

A dedicated broker, since freezing the session one would stall every other test. The services, the
producer and the reader reconnect on their own; every request still gets exactly one distinct answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from frugalstream.bootstrap import Resources
from frugalstream.llm.embedder import HashingEmbedder
from frugalstream.runner import RunningServices
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import topics as t
from frugalstream.tools.embedded_broker import EmbeddedBroker
from tests.integration.test_faults_crash import produce_stream
from tests.integration.test_faults_helpers import fresh_workload, read_topics, responses_by_id

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
async def own_broker(tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker(log_dir=tmp_path / "tansu") as broker:
        yield broker


async def test_frozen_broker_comes_back_and_no_request_is_lost(own_broker: EmbeddedBroker, tmp_path: Path) -> None:
    settings = Settings(kafka_bootstrap=own_broker.bootstrap, kafka_idempotent=False, kafka_fetch_max_wait_ms=50,
                        kafka_session_timeout_ms=6000, state_dir=tmp_path / "state", simulated_latency_scale=0.05,
                        topic_prefix="frozen.", group_prefix="frozen")
    await own_broker.create_topics({settings.topic(n): 2 for n in t.ALL_TOPICS})
    requests = fresh_workload(60, "frozen")
    resources = Resources(settings, embedder_factory=HashingEmbedder)
    try:
        async with RunningServices(["classifier", "dedupe", "gateway"], resources):
            stream = asyncio.create_task(produce_stream(settings, requests, [], rate=10.0))
            await asyncio.sleep(2.0)
            own_broker.freeze()
            await asyncio.sleep(8.0)  # longer than the 6 s session timeout
            own_broker.thaw()
            await stream
            ids = {r.id for r in requests}
            records = await read_topics(settings, [t.RESPONSES], done=lambda rs: set(responses_by_id(rs)) >= ids,
                                        timeout_s=90)
    finally:
        if own_broker.frozen:
            own_broker.thaw()
        resources.close()
    by_id = responses_by_id(records)
    assert set(by_id) >= ids, f"lost: {sorted(ids - set(by_id))[:5]}"
    assert all(len(msgs) == 1 for rid, msgs in by_id.items() if rid in ids), "one distinct answer per request"
