"""The whole flow on the in-memory broker: routing, exact cache hits, usage pricing, DLQ."""

from __future__ import annotations

import json
from typing import Any

from faststream.kafka import KafkaBroker

from frugalstream.accountant.app import AccountantService
from frugalstream.runner import RunningServices
from frugalstream.schemas import ChatMessage, LLMRequest, LLMResponse
from frugalstream.schemas import topics as t


def collect(broker: KafkaBroker, topic: str) -> list[bytes]:
    seen: list[bytes] = []

    @broker.subscriber(topic, group_id=f"probe-{topic}")
    async def probe(body: Any) -> None:
        seen.append(json.dumps(body).encode() if not isinstance(body, bytes) else body)

    return seen


def request(i: int, text: str, tenant: str = "acme") -> LLMRequest:
    return LLMRequest(id=f"r{i}", tenant=tenant, messages=(ChatMessage(role="user", content=text),),
                      sampling={"temperature": 0})


async def test_repeat_is_served_from_exact_cache_and_priced(pipeline: RunningServices) -> None:
    broker = pipeline.broker
    responses = collect(broker, t.RESPONSES)
    await broker.start()
    for i, text in enumerate(["What are your business hours?", "what are your  business hours", "Write a haiku"]):
        await broker.publish(request(i, text).model_dump_json().encode(), t.REQUESTS)
    got = {r.request_id: r for r in (LLMResponse.model_validate_json(b) for b in responses)}
    assert set(got) == {"r0", "r1", "r2"}
    assert got["r0"].source == "llm"
    assert got["r1"].source == "cache_exact" and got["r1"].served_from == "r0"
    accountant = pipeline.service("accountant")
    assert isinstance(accountant, AccountantService)
    totals = accountant.ledger.totals()
    assert totals["baseline_cost_usd"] > totals["actual_cost_usd"] > 0
    assert abs(totals["baseline_cost_usd"] - totals["actual_cost_usd"] - sum(totals["by_strategy"].values())) < 1e-9
    assert totals["by_strategy"]["cache_exact"] > 0


async def test_malformed_request_lands_on_dlq_and_next_flows(pipeline: RunningServices) -> None:
    broker = pipeline.broker
    dlq = collect(broker, t.dlq_topic(t.REQUESTS))
    responses = collect(broker, t.RESPONSES)
    await broker.start()
    await broker.publish(b'{"id": 1, "tenant": "x"}', t.REQUESTS)
    await broker.publish(b"\xff\xfe not json", t.REQUESTS)
    await broker.publish(request(9, "Hello there").model_dump_json().encode(), t.REQUESTS)
    assert len(dlq) == 2
    letter = json.loads(dlq[0])
    assert letter["topic"] == t.REQUESTS and letter["error_type"] == "ValidationError"
    assert [LLMResponse.model_validate_json(b).request_id for b in responses] == ["r9"]


async def test_published_outputs_feed_prometheus_series(pipeline: RunningServices) -> None:
    from frugalstream.runtime.metrics import exposition

    broker = pipeline.broker
    await broker.start()
    before = pipeline.publisher.metrics.responses.labels("cache_exact")._value.get()
    for i in range(2):
        await broker.publish(request(100 + i, "Is the branch open on Sunday?", tenant="metrics").model_dump_json()
                             .encode(), t.REQUESTS)
    after = pipeline.publisher.metrics.responses.labels("cache_exact")._value.get()
    assert after == before + 1
    text = exposition(pipeline.publisher.metrics)
    assert 'frugal_routing_decisions_total{task_type="faq",tier="small"}' in text
    assert 'frugal_saved_usd_total{strategy="cache_exact",tenant="metrics"}' in text
    assert "frugal_stage_latency_seconds_bucket" in text
