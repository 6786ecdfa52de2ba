"""A service reads its control topics to their end before it consumes anything: a classifier restarted with a
refusing budget on `llm.budgets` refuses from its first request, not once its follower has caught up."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer
from structlog.testing import capture_logs

from frugalstream.classifier.app import ClassifierService
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.state_topics import StateFollower, read_to_end
from frugalstream.schemas import BudgetState
from frugalstream.schemas import topics as t
from tests.integration.conftest import PipelineFactory

pytestmark = [pytest.mark.integration]


def _state(status: str, spent: float) -> BudgetState:
    today = datetime.now(UTC).strftime("%Y-%m-%dT00:00:00Z")
    return BudgetState(budget_id="strict/*/day", tenant="strict", period="day", period_start=today, limit_usd=1.0,
                       spent_usd=spent, status=status, action="refuse", updated_at=datetime.now(UTC).timestamp())


async def _publish(settings: Settings, states: list[BudgetState]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for s in states:
            await producer.send_and_wait(settings.topic(t.BUDGETS), s.model_dump_json().encode(),
                                         key=s.budget_id.encode())
    finally:
        await producer.stop()


async def test_preload_applies_the_topic_in_order_and_records_where_it_stopped(integration_settings: Settings) -> None:
    await _publish(integration_settings, [_state("ok", 0.1), _state("near", 0.9), _state("over", 1.5)])
    seen: list[str] = []
    follower = StateFollower(t.BUDGETS, BudgetState, lambda s: seen.append(s.status))
    values, last = await read_to_end(integration_settings, t.BUDGETS, BudgetState)
    assert len(values) == 3
    follower.catch_up(values, last)
    assert seen == ["ok", "near", "over"]
    assert sum(follower.applied.values()) + len(follower.applied) == 3  # last offsets read, one partition or more
    assert await read_to_end(integration_settings, "llm.no-such-topic", BudgetState) == ([], {})


async def test_a_started_classifier_already_holds_the_budget_on_the_topic(
    pipeline: PipelineFactory, integration_settings: Settings,
) -> None:
    await _publish(integration_settings, [_state("ok", 0.1), _state("over", 1.5)])
    with capture_logs() as logs:
        async with pipeline(names=["classifier"]) as running:
            classifier = running.service("classifier")
            assert isinstance(classifier, ClassifierService)
            verdict = classifier.logic.budgets.verdict("strict", {})  # at once: no wait for its consumer
            assert verdict is not None and verdict.status == "over" and verdict.action == "refuse"
    preloaded = [e for e in logs if e["event"] == "state_preloaded"]
    assert preloaded and preloaded[0]["records"] >= 2
