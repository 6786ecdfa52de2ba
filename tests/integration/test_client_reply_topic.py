"""Against a real broker: a client limited to its reply topic gets its answers there, and only its own."""

from __future__ import annotations

import pytest

from frugalstream.client import FrugalClient
from frugalstream.runtime.settings import Settings
from frugalstream.tools.embedded_broker import EmbeddedBroker
from tests.integration.conftest import PARTITIONS, PipelineFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_a_client_with_a_reply_topic_is_answered_there_and_reads_nothing_else(
    pipeline: PipelineFactory, integration_settings: Settings, embedded_broker: EmbeddedBroker,
) -> None:
    settings = integration_settings
    await embedded_broker.create_topics({settings.topic(f"{x}.replies"): PARTITIONS for x in ("acme", "globex")})
    async with pipeline(), FrugalClient("acme", settings=settings, reply_topic="acme.replies") as acme, \
            FrugalClient("globex", settings=settings, reply_topic="globex.replies") as globex:
        mine = await acme.complete("What are your business hours?", timeout_s=60)
        theirs = await globex.complete("Where is my parcel?", timeout_s=60)
        seen = {tp.topic for tp in acme._transport._consumer.assignment()}  # type: ignore[attr-defined]
    assert mine.ok and theirs.ok and mine.tenant == "acme" and theirs.tenant == "globex"
    assert seen == {settings.topic("acme.replies")}  # the services write reply topics under the topic prefix
