"""`/healthz`, `/readyz`, `/metrics` and 404, and the series an operator alerts on (tokens, errors, lag, budgets)."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import TopicPartition
from faststream.kafka import KafkaBroker
from prometheus_client import CollectorRegistry

from frugalstream.gateway.completed import CompletedLoader, TopicCompleted
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.metrics import Metrics, exposition
from frugalstream.runtime.probes import Health, start_probe_server
from frugalstream.runtime.records import Out, Record
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import _observe_lag, subscribe
from frugalstream.schemas import BudgetState, ChatMessage, LLMRequest, LLMResponse
from frugalstream.schemas import topics as t
from frugalstream.schemas.responses import error_response


@dataclass
class Member:
    joined: bool = True
    pending: set[int] = field(default_factory=set)

    def unready(self) -> set[int]:
        return self.pending


async def _ok() -> bool:
    return True


async def _down() -> bool:
    raise ConnectionError("no broker")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_not_ready_until_started_joined_loaded_and_the_broker_answers() -> None:
    health, member = Health(), Member(joined=False, pending={2})
    health.track("dedupe", member)
    assert health.reasons() == ["consumers not started"]
    health.attach(_ok)
    assert "broker not checked yet" in health.reasons()
    health.broker_ok = True
    assert health.reasons() == ["dedupe: no partition assignment yet"]
    member.joined = True
    assert health.reasons() == ["dedupe: state of partitions [2] not loaded"]
    member.pending.clear()
    assert health.reasons() == []
    health.broker_ok = False
    assert health.reasons() == ["broker not reachable"]
    health.broker_ok = True
    health.detach()
    assert health.readiness() == (False, "consumers not started")


def test_liveness_fails_when_the_loop_stops_beating() -> None:
    clock = Clock()
    health = Health(stale_after_s=30, clock=clock)
    assert health.liveness()[0] is False  # the health task never ran on the loop
    health.attach(_ok)
    health.broker_ok = True
    health.refresh()
    assert health.liveness() == (True, "ok") and health.readiness() == (True, "ready")
    clock.now += 31
    alive, why = health.liveness()
    assert not alive and "stalled" in why
    assert health.readiness()[0] is False  # a stale snapshot is not trusted either


async def test_the_health_task_checks_the_broker() -> None:
    health = Health()
    health.attach(_down)
    task = asyncio.create_task(health.run(beat_s=0.01, ping_s=0.01))
    await asyncio.sleep(0.1)
    assert health.broker_ok is False and health.readiness() == (False, "broker not reachable")
    health.attach(_ok)
    await asyncio.sleep(0.1)
    assert health.broker_ok is True and health.readiness() == (True, "ready")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_gateway_not_ready_until_its_assigned_partitions_are_loaded() -> None:
    settings = Settings()
    store = TopicCompleted(settings)
    loaded = asyncio.Event()

    async def slow_load(partitions: set[int]) -> int:
        await loaded.wait()
        return 0

    store._load = slow_load  # type: ignore[method-assign]
    listener = CompletedLoader(settings, store)
    health = Health()
    health.track("gateway", listener)
    health.attach(_ok)
    health.broker_ok = True
    assert health.reasons() == ["gateway: no partition assignment yet"]
    assigning = asyncio.create_task(listener.on_partitions_assigned({TopicPartition(t.DISPATCH, 3)}))
    await asyncio.sleep(0)
    assert health.reasons() == ["gateway: state of partitions [3] not loaded"]
    loaded.set()
    await assigning
    assert health.reasons() == []


def test_every_group_consumer_is_tracked_for_readiness() -> None:
    broker = KafkaBroker()
    publisher = Publisher(broker, Settings())

    async def process(batch: Any, ctx: Any) -> list[Out]:
        return []

    subscribe(broker, publisher, Settings(), service="classifier", topic=t.REQUESTS, model=LLMRequest,
              process=process)
    publisher.health.attach(_ok)
    publisher.health.broker_ok = True
    assert publisher.health.reasons() == ["classifier: no partition assignment yet"]


@pytest.fixture
def server() -> Iterator[tuple[str, Health, Metrics]]:
    health, metrics = Health(), Metrics(CollectorRegistry())
    srv, thread = start_probe_server(0, health, addr="127.0.0.1", metrics=metrics)
    yield f"http://127.0.0.1:{srv.server_port}", health, metrics
    srv.shutdown()
    srv.server_close()
    thread.join()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read().decode()


def test_the_server_answers_probes_and_metrics_and_404_elsewhere(server: tuple[str, Health, Metrics]) -> None:
    base, health, metrics = server
    metrics.record_error("classifier", "invalid_request")
    assert _get(f"{base}/healthz")[0] == 503  # no beat yet
    health.refresh()
    assert _get(f"{base}/healthz") == (200, "ok\n")
    assert _get(f"{base}/readyz") == (503, "consumers not started\n")
    health.attach(_ok)
    health.broker_ok = True
    health.refresh()
    assert _get(f"{base}/readyz") == (200, "ready\n")
    status, body = _get(f"{base}/metrics")
    assert status == 200 and 'frugal_errors_total{code="invalid_request",service="classifier"} 1.0' in body
    for path in ("/", "/metrics/x", "/health", "/favicon.ico"):
        assert _get(f"{base}{path}")[0] == 404, path


def _request(i: int = 1) -> LLMRequest:
    return LLMRequest(id=f"r{i}", tenant="acme", messages=(ChatMessage(role="user", content="hi"),))


class SinkBroker:
    async def publish(self, data: bytes | None, topic: str, **kwargs: Any) -> None:
        return None


async def test_errors_by_code_and_budget_remaining_are_exported() -> None:
    metrics = Metrics(CollectorRegistry())
    publisher = Publisher(SinkBroker(), Settings(), metrics)  # type: ignore[arg-type]
    refused = error_response(_request(), "budget_exceeded", "over budget")
    answer = LLMResponse(request_id="r2", tenant="acme", source="llm", content="ok", created_at=0, responded_at=0)
    budget = BudgetState(budget_id="acme-day", tenant="acme", period="day", period_start="2026-01-01",
                         limit_usd=10.0, spent_usd=7.5, status="near", action="none", updated_at=0)
    await publisher.publish_all([Out(t.RESPONSES, refused), Out(t.RESPONSES, answer), Out(t.BUDGETS, budget)],
                                service="classifier")
    text = exposition(metrics)
    assert 'frugal_errors_total{code="budget_exceeded",service="classifier"} 1.0' in text
    assert text.count("frugal_errors_total{") == 1  # the answer is not an error
    assert 'frugal_budget_remaining_usd{budget="acme-day",tenant="acme"} 2.5' in text


def test_tokens_are_counted_by_kind() -> None:
    from frugalstream.schemas import CostData, TokenUsage

    metrics = Metrics(CollectorRegistry())
    metrics.record_cost(CostData(
        usage_id="u1", request_id="r1", tenant="acme", stage="gateway", source="llm", model="gpt-4o",
        baseline_model="gpt-4o", usage=TokenUsage(input_tokens=100, cached_input_tokens=40, output_tokens=7),
        baseline_cost_usd=0.0, actual_cost_usd=0.0, saved_usd=0.0, savings_by_strategy={}, estimated=False,
        catalog_version="test"))
    text = exposition(metrics)
    for kind, n in (("input", 100), ("cached", 40), ("output", 7)):
        assert f'frugal_tokens_total{{kind="{kind}",model="gpt-4o",tenant="acme"}} {float(n)}' in text
    assert 'kind="reasoning"' not in text


@dataclass
class LagConsumer:
    high: dict[tuple[str, int], int]
    assigned: set[tuple[str, int]]

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.high.get((tp.topic, tp.partition))

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(topic, p) for topic, p in self.assigned}


def test_consumer_lag_per_partition_and_revoked_partitions_drop_out() -> None:
    metrics = Metrics(CollectorRegistry())
    p0, p1 = ("llm.requests", 0), ("llm.requests", 1)
    consumer = LagConsumer({p0: 50, p1: 9}, {p0, p1})
    batch = [Record(*p0, o, None, b"", ()) for o in (10, 11)] + [Record(*p1, 8, None, b"", ())]
    _observe_lag(metrics, "frugalstream.classifier", consumer, batch)
    text = exposition(metrics)
    assert 'frugal_consumer_lag{group="frugalstream.classifier",partition="0",topic="llm.requests"} 38.0' in text
    assert 'frugal_consumer_lag{group="frugalstream.classifier",partition="1",topic="llm.requests"} 0.0' in text
    consumer.assigned = {("llm.requests", 0)}
    _observe_lag(metrics, "frugalstream.classifier", consumer, batch[:1])
    assert 'partition="1"' not in exposition(metrics)
