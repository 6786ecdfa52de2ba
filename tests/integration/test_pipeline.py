"""The whole flow on the real broker: one terminal answer per request, cache hits, costs that reconcile."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from frugalstream.accountant.app import AccountantService
from frugalstream.llm.embedder import MiniLMEmbedder
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, LLMRequest, SummarizeItem, SummarizeJob
from frugalstream.schemas import topics as t
from frugalstream.tools.demo import collect_responses, produce, wait_priced
from tests.integration.adversary import read_quietly
from tests.integration.conftest import PipelineFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def ask(i: int, text: str, tenant: str = "acme", **kw: object) -> LLMRequest:
    return LLMRequest(id=f"q{i}", tenant=tenant, messages=(ChatMessage(role="user", content=text),), **kw)  # type: ignore[arg-type]


def mixed_workload() -> list[LLMRequest]:
    faq = ["What are your business hours?", "How do I reset my password?", "Where is my card?"]
    reqs: list[LLMRequest] = []
    for i in range(30):
        reqs.append(ask(len(reqs), faq[i % 3]))
    reqs.append(ask(len(reqs), "Prove that there are infinitely many primes, step by step."))
    reqs.append(ask(len(reqs), "Write a Python function that parses ISO dates."))
    history = (
        *(ChatMessage(role="user" if k % 2 == 0 else "assistant", content=f"turn {k} " + "words " * 400)
          for k in range(12)),
        ChatMessage(role="user", content="And what about my last statement?"),
    )
    reqs.append(LLMRequest(id=f"q{len(reqs)}", tenant="globex", messages=history))
    reqs.append(ask(len(reqs), "What are your business hours?", tenant="globex"))
    reqs.append(ask(len(reqs), "What are your business hours?", cache={"policy": "no-store"}))
    return reqs


async def test_every_request_gets_one_answer_repeats_hit_cache_and_costs_reconcile(
    pipeline: PipelineFactory, integration_settings: Settings,
) -> None:
    settings = integration_settings
    requests = mixed_workload()
    async with pipeline(embedder=MiniLMEmbedder) as running:
        # First occurrences go first, so the repeats can only be served by the cache or coalescing.
        await produce(settings.kafka_bootstrap, settings, requests[:3], None)
        first = await collect_responses(settings.kafka_bootstrap, settings, {r.id for r in requests[:3]}, 60)
        await produce(settings.kafka_bootstrap, settings, requests[3:], None)
        # Keeps listening past the coalescing timeout after the last first answer: a follower answered once by
        # coalescing and again when its wait expired (or any other late second answer) fails the test.
        got = await read_quietly(settings, settings.topic(t.RESPONSES), want={r.id for r in requests},
                                 key_of=lambda r: r.request_id, timeout_s=90,
                                 quiet_s=settings.coalesce_timeout_s + 2)
        accountant = running.service("accountant")
        assert isinstance(accountant, AccountantService)
        billable = sum(1 for rs in got.values() if rs[0].source != "error")
        await wait_priced(accountant, billable, 30)
        await asyncio.sleep(1)
        totals = accountant.ledger.totals()

    assert len(first) == 3
    assert set(got) == {r.id for r in requests}
    assert all(len(rs) == 1 for rs in got.values()), "exactly one distinct terminal message per request: " + str(
        {k: [r.source for r in rs] for k, rs in got.items() if len(rs) > 1})
    by_id = {k: rs[0] for k, rs in got.items()}
    assert all(r.error is None for r in by_id.values())
    repeats = [by_id[f"q{i}"] for i in range(3, 30)]
    assert all(r.source == "cache_exact" for r in repeats)
    assert by_id["q33"].source == "llm", "another tenant's identical question is never served from acme's cache"
    assert by_id["q34"].source == "llm", "no-store skips the cache"
    assert by_id["q32"].source == "llm"

    events = await read_cost_events(settings, billable)
    assert len({e["id"] for e in events}) == billable
    baseline = sum(e["data"]["baseline_cost_usd"] for e in events)
    actual = sum(e["data"]["actual_cost_usd"] for e in events)
    assert baseline == pytest.approx(totals["baseline_cost_usd"], abs=1e-9)
    assert actual == pytest.approx(totals["actual_cost_usd"], abs=1e-9)
    assert totals["baseline_cost_usd"] - totals["actual_cost_usd"] == pytest.approx(
        sum(totals["by_strategy"].values()), abs=1e-9)
    assert totals["by_strategy"]["cache_exact"] > 0
    assert totals["by_strategy"]["context_trim"] > 0


async def read_cost_events(settings: Settings, expected: int) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(settings.topic(t.COST_EVENTS), bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=50)
    await consumer.start()
    events: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 30
    try:
        while len(events) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for rec in records:
                    event = json.loads(rec.value)
                    events[event["id"]] = event
    finally:
        await consumer.stop()
    return list(events.values())


INPUT_TOPICS = (t.REQUESTS, t.ROUTED, t.DISPATCH, t.RESPONSES, t.USAGE, t.SUMMARIZE_JOBS)


async def test_malformed_message_on_every_input_topic_is_dead_lettered_and_partition_keeps_flowing(
    pipeline: PipelineFactory, integration_settings: Settings,
) -> None:
    settings = integration_settings
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    async with pipeline():
        try:
            for topic in INPUT_TOPICS:
                # Same key as the valid message that follows: same partition, so it must not stall it.
                await producer.send_and_wait(settings.topic(topic), b'{"not": "a contract"}', key=b"k1",
                                             headers=[("origin", b"fuzz")])
            await producer.send_and_wait(settings.topic(t.REQUESTS), b"\xff\xfe\x00", key=b"k1")
            await producer.send_and_wait(settings.topic(t.REQUESTS), ask(1, "Hi there").model_dump_json().encode(),
                                         key=b"k1")
            job = SummarizeJob(job_id="j1", tenant="acme", instruction="Summarize in one line.",
                               items=(SummarizeItem(id="a", text="A red bicycle with two wheels."),))
            await producer.send_and_wait(settings.topic(t.SUMMARIZE_JOBS), job.model_dump_json().encode(), key=b"k1")
            got = await collect_responses(settings.kafka_bootstrap, settings, {"q1"}, 60)
            letters = await read_all(settings, [settings.topic(t.dlq_topic(x)) for x in INPUT_TOPICS], 7)
            summaries = await read_all(settings, [settings.topic(t.SUMMARIES)], 1)
        finally:
            await producer.stop()
    assert got["q1"][0].source == "llm"
    assert json.loads(summaries[0])["item_id"] == "a"
    topics = sorted(json.loads(v)["topic"] for v in letters)
    assert topics == sorted([settings.topic(x) for x in INPUT_TOPICS] + [settings.topic(t.REQUESTS)])
    for raw in letters:
        letter = json.loads(raw)
        assert letter["error"] and letter["error_type"] in {"ValidationError", "ValueError"}
        assert base64.b64decode(letter["value_b64"]) in {b'{"not": "a contract"}', b"\xff\xfe\x00"}
        assert letter["key_b64"] == base64.b64encode(b"k1").decode()


async def read_all(settings: Settings, topics: list[str], expected: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_wait_ms=50)
    await consumer.start()
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    try:
        while len(values) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                values.extend(r.value for r in records)
    finally:
        await consumer.stop()
    return values
