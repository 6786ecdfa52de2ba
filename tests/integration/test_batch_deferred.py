"""Deferrable requests through a provider batch API, on the embedded broker, with the gateway as an OS process
talking to a loopback fake of the OpenAI Batch API (`tests/fake_batch_api.py`), which counts every model call
per prompt whichever way it came (chat or batch line): `calls[prompt] > 1` is a second payment.

- A gateway that exits between recording a job and committing, and is then SIGKILLed while its batches are in
  flight, resumes the same batch ids after the restart: no request joins a second job, no batch is created
  twice, every request is answered once from its batch and paid once, at the batch price.
- A deadline a batch cannot meet (the fake never completes it) falls back to an interactive call, answered
  before the deadline, and the batch is cancelled.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.llm.identity import request_key
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import FAULT_EXIT_CODE
from frugalstream.schemas import ChatMessage, LLMRequest, LLMResponse, RoutedRequest, UsageRecord
from frugalstream.schemas import topics as t
from frugalstream.tools.embedded_broker import EmbeddedBroker
from tests.fake_batch_api import FakeProviderAPI
from tests.integration.test_faults_helpers import (
    ServiceProcess,
    answers_by_key,
    fault_env,
    read_topics,
    read_until_quiet,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PARTITIONS = 4
TENANTS = ("acme", "globex")
FAST_BATCHES = {"FRUGAL_BATCH_GATHER_S": "1", "FRUGAL_BATCH_POLL_INTERVAL_S": "0.5", "FRUGAL_BATCH_MIN_LEAD_S": "5"}


@pytest.fixture
async def batch_settings(embedded_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path) -> Settings:
    settings = Settings(
        kafka_bootstrap=embedded_broker.bootstrap, kafka_idempotent=False, kafka_fetch_max_wait_ms=50,
        kafka_session_timeout_ms=6000, topic_prefix=f"{topic_prefix}.", group_prefix=topic_prefix,
        state_dir=tmp_path / "state", simulated_latency_scale=0.0,
    )
    await embedded_broker.create_topics({settings.topic(n): PARTITIONS for n in t.ALL_TOPICS})
    return settings


async def deferred(n: int, tag: str, **fields: Any) -> list[RoutedRequest]:
    """Requests that can wait, with unique prompts, routed as the classifier routes them for the openai provider.
    Two tenants share each id: each is batched, paid and answered for itself."""
    requests = [LLMRequest(id=f"{tag}-{i // 2}", tenant=TENANTS[i % 2], created_at=time.time(),
                           messages=(ChatMessage(role="user", content=f"{tag} nightly tag {i}: label it"),), **fields)
                for i in range(n)]
    results = await Classifier(Settings(provider="openai", kafka_idempotent=False), TokenCounter()).handle(requests)
    routed = [r.routed for r in results if isinstance(r, Routed)]
    assert len(routed) == n and all(r.route.provider == "openai" for r in routed)
    return routed


async def produce(settings: Settings, routed: list[RoutedRequest]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=False, acks="all")
    await producer.start()
    try:
        for i, r in enumerate(routed):
            await producer.send(settings.topic(t.DISPATCH), r.model_dump_json().encode(), key=r.keys.scope.encode(),
                                partition=i % PARTITIONS)
        await producer.flush()
    finally:
        await producer.stop()


def key_of(r: RoutedRequest) -> str:
    return request_key(r.request.tenant, r.request.id)


def prompt_of(r: RoutedRequest) -> str:
    return r.request.messages[-1].content


async def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


def lines(fake: FakeProviderAPI) -> int:
    return sum(len(b["lines"]) for b in fake.batches.values())


async def usage_of(settings: Settings, keys: set[str]) -> dict[str, UsageRecord]:
    def done(recs: list[Any]) -> bool:
        return {request_key(u.tenant, u.request_id) for u in (UsageRecord.model_validate_json(r.value) for r in recs)
                } >= keys

    records = await read_topics(settings, [t.USAGE], done=done, timeout_s=30)
    usage = (UsageRecord.model_validate_json(r.value) for r in records)
    return {request_key(u.tenant, u.request_id): u for u in usage if u.stage == "gateway"}


async def test_gateway_killed_mid_batch_resumes_the_same_batch_and_pays_once(
    batch_settings: Settings, tmp_path: Path,
) -> None:
    settings = batch_settings
    routed = await deferred(8, "resume", latency_class="within_1h")
    keys = {key_of(r) for r in routed}
    async with FakeProviderAPI() as fake:
        env = fault_env(settings, **fake.env(), **FAST_BATCHES, FRUGAL_STATE_DIR=str(tmp_path / "gw1"),
                        FRUGAL_FAULT_EXIT_AFTER_PUBLISH="gateway", FRUGAL_FAULT_EXIT_AFTER_BATCHES="1")
        gw = ServiceProcess("gateway", env, tmp_path)
        gw.start()
        try:
            await gw.wait_started()
            await produce(settings, routed)
            # 1) Exits after recording its first jobs, before committing the dispatches they hold.
            assert await gw.wait_exit(timeout_s=60) == FAULT_EXIT_CODE, gw.tail()
            gw.env = fault_env(settings, **fake.env(), **FAST_BATCHES, FRUGAL_STATE_DIR=str(tmp_path / "gw2"))
            gw.start()
            await gw.wait_started()
            # 2) The redelivered dispatches join no second job; every request ends up in a submitted batch.
            await wait_for(lambda: lines(fake) >= len(routed), 60, f"not every request was batched: {gw.tail()}")
            await asyncio.sleep(1.0)
            before = {b: len(s["lines"]) for b, s in fake.batches.items()}
            assert sum(before.values()) == len(routed), f"a request was submitted twice: {before}"
            # 3) Killed while its batches are in flight; the next gateway resumes them by their recorded ids.
            await gw.kill()
            gw.env = fault_env(settings, **fake.env(), **FAST_BATCHES, FRUGAL_STATE_DIR=str(tmp_path / "gw3"))
            gw.start()
            await gw.wait_started()
            fake.complete.set()
            responses = await read_until_quiet(settings, [t.RESPONSES], keys=keys, quiet_s=2.0, timeout_s=90)
        finally:
            await gw.stop()
    assert {b: len(s["lines"]) for b, s in fake.batches.items()} == before, "no batch was created after the kill"
    ended = {e["batch_id"] for e in gw.events("batch_ended", run=3)}
    assert ended == set(before), "the restarted gateway polled the batches the killed one had submitted"
    by_key = answers_by_key(responses)
    for r in routed:
        distinct = by_key[key_of(r)]
        assert len(distinct) == 1, f"{key_of(r)} got different answers"
        answer = LLMResponse.model_validate_json(next(iter(distinct)))
        assert answer.ok and answer.content == f"{prompt_of(r)} #1" and answer.tenant == r.request.tenant
    assert all(n == 1 for n in fake.calls.values()) and set(fake.calls) == {prompt_of(r) for r in routed}
    assert not fake.chat_calls, "nothing was called interactively"
    usage = await usage_of(settings, keys)
    assert all(u.steps and u.steps[-1].strategy == "batch_api" and u.steps[-1].batch for u in usage.values())


async def test_a_deadline_the_batch_cannot_meet_falls_back_to_an_interactive_call_in_time(
    batch_settings: Settings, tmp_path: Path,
) -> None:
    settings = batch_settings
    async with FakeProviderAPI() as fake:  # its batches never complete
        env = fault_env(settings, **fake.env(), **FAST_BATCHES, FRUGAL_BATCH_FALLBACK_MARGIN_S="8",
                        FRUGAL_STATE_DIR=str(tmp_path / "gw"))
        gw = ServiceProcess("gateway", env, tmp_path)
        gw.start()
        try:
            await gw.wait_started()
            due = time.time() + 25
            routed = await deferred(4, "due", deadline=due)
            keys = {key_of(r) for r in routed}
            await produce(settings, routed)
            await wait_for(lambda: lines(fake) >= len(routed), 30, f"the requests were not batched: {gw.tail()}")
            responses = await read_until_quiet(settings, [t.RESPONSES], keys=keys, quiet_s=2.0, timeout_s=40)
            await wait_for(lambda: all(b.get("cancelled") for b in fake.batches.values()), 20,
                           "the batch nobody waits for any more was not cancelled")
        finally:
            await gw.stop()
    by_key = answers_by_key(responses)
    for r in routed:
        [text] = list(by_key[key_of(r)])
        answer = LLMResponse.model_validate_json(text)
        assert answer.ok and answer.content == f"{prompt_of(r)} #1"
        assert answer.responded_at <= due, f"answered {answer.responded_at - due:.1f} s after its deadline"
    assert {p: fake.chat_calls[p] for p in map(prompt_of, routed)} == {prompt_of(r): 1 for r in routed}
    assert all(n == 1 for n in fake.calls.values()), "the cancelled batch ran nothing: paid once, interactively"
    usage = await usage_of(settings, keys)
    assert usage and not any(s.batch for u in usage.values() for s in u.steps), "billed at the interactive price"
