"""Crash (SIGKILL), injected exits and graceful stop (SIGTERM) of service processes in the middle of a stream.

Contract asserted (DESIGN.md, at-least-once + idempotent): every (tenant, request id) gets exactly one
*distinct* terminal message. After a crash the same message may be published again byte for byte (the gateway
replays its recorded answer; a reader deduplicates), but never a second, different answer; readers keep
listening for a quiet period after the last first answer, so a late second answer is seen. No request is paid
twice: the gateway tests count calls at a fake OpenAI-compatible provider, per call and per (unique) prompt,
so no id can collapse a second payment. Kills are placed, not timed: inside the publish-to-commit window by
the stage's fault-injection exit (`FRUGAL_FAULT_EXIT_AFTER_PUBLISH`), or while a given provider call is in
flight. Every gateway instance has its own state dir, as deployed: what makes a replay possible is the
`llm.gateway.completed` topic, not a shared file. The whole-pipeline SIGKILL test also checks the ledger holds
each request's cost exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.llm.identity import request_key
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import cost_event
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import FAULT_EXIT_CODE
from frugalstream.schemas import (
    ChatMessage,
    LLMRequest,
    RoutedRequest,
    SummarizeItem,
    SummarizeJob,
    SummaryResult,
    UsageRecord,
)
from frugalstream.schemas import topics as t
from frugalstream.tools.embedded_broker import EmbeddedBroker
from tests.integration.test_faults_helpers import (
    CountingOpenAI,
    ServiceProcess,
    answers_by_key,
    fault_env,
    fresh_workload,
    read_topics,
    read_until_quiet,
    responses_by_id,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SERVICES = ("classifier", "dedupe", "gateway", "summarizer", "accountant")
PARTITIONS = 4  # every topic, so llm.requests.dispatch and llm.gateway.completed line up


@pytest.fixture
async def fault_settings(embedded_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path) -> Settings:
    settings = Settings(
        kafka_bootstrap=embedded_broker.bootstrap, kafka_idempotent=False, kafka_fetch_max_wait_ms=50,
        kafka_session_timeout_ms=6000, topic_prefix=f"{topic_prefix}.", group_prefix=topic_prefix,
        state_dir=tmp_path / "state", simulated_latency_scale=0.3, coalesce_timeout_s=5.0,
    )
    await embedded_broker.create_topics({settings.topic(n): PARTITIONS for n in t.ALL_TOPICS})
    settings.state_dir.mkdir(parents=True)  # `serve accountant` alone cannot create it (Ledger does not mkdir)
    return settings


def jobs(n: int, items: int, tag: str) -> list[SummarizeJob]:
    texts = [f"Acme kettle K{i:03d}, {i % 4 + 1} litres, {i % 3 + 1} year warranty" for i in range(items // 2)]
    return [SummarizeJob(job_id=f"{tag}-job{j}", tenant="acme", instruction="Summarize this product in one line.",
                         items=tuple(SummarizeItem(id=f"i{k}", text=texts[(k * 7 + j) % len(texts)])
                                     for k in range(items))) for j in range(n)]


async def produce_stream(settings: Settings, requests: list[LLMRequest], job_list: list[SummarizeJob],
                         rate: float) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=False, acks="all")
    await producer.start()
    try:
        start = time.monotonic()
        every = max(1, len(requests) // max(1, len(job_list)))
        for i, req in enumerate(requests):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            stamped = req.model_copy(update={"created_at": time.time()})
            await producer.send(settings.topic(t.REQUESTS), stamped.model_dump_json().encode(), key=req.id.encode())
            if i % every == 0 and i // every < len(job_list):
                job = job_list[i // every]
                await producer.send(settings.topic(t.SUMMARIZE_JOBS), job.model_dump_json().encode(),
                                    key=job.job_id.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def start_all(procs: dict[str, ServiceProcess]) -> None:
    for proc in procs.values():
        proc.start()
    await asyncio.gather(*(p.wait_started() for p in procs.values()))


async def stop_all(procs: dict[str, ServiceProcess]) -> None:
    await asyncio.gather(*(p.stop() for p in procs.values()), return_exceptions=True)


async def collect(settings: Settings, keys: set[str], items: set[tuple[str, str]]) -> tuple[list[Any], list[Any]]:
    def summarized(recs: list[Any]) -> bool:
        return {(r.job_id, r.item_id) for r in (SummaryResult.model_validate_json(x.value) for x in recs)} >= items

    responses, summaries = await asyncio.gather(
        read_until_quiet(settings, [t.RESPONSES], keys=keys, timeout_s=150),
        read_topics(settings, [t.SUMMARIES], done=summarized, timeout_s=150))
    return responses, summaries


def ledger_count(db: Path) -> int:
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        try:
            return int(conn.execute("SELECT COUNT(*) FROM cost_events").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def ledger_totals(db: Path) -> tuple[int, float, float]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        n, base, act = conn.execute(
            "SELECT COUNT(*), SUM(baseline_u), SUM(actual_u) FROM cost_events").fetchone()
    return int(n), base / 1e10, act / 1e10


async def wait_ledger(db: Path, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while ledger_count(db) < expected and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a file
        await asyncio.sleep(0.25)


async def test_sigkill_each_service_mid_stream_loses_nothing_pays_once_counts_once(
    fault_settings: Settings, tmp_path: Path,
) -> None:
    settings = fault_settings
    env = fault_env(settings)
    procs = {name: ServiceProcess(name, env, tmp_path) for name in SERVICES}
    # The gateway keeps nothing in a state dir; give it its own, as a separate pod would have.
    procs["gateway"] = ServiceProcess("gateway", {**env, "FRUGAL_STATE_DIR": str(tmp_path / "gw")}, tmp_path)
    requests = fresh_workload(140, "crash")
    job_list = jobs(5, 40, "crash")
    await start_all(procs)
    try:
        stream = asyncio.create_task(produce_stream(settings, requests, job_list, rate=8.0))
        restarts = []
        for name in SERVICES:  # one crash every ~2.5 s while the stream runs; outages overlap
            await asyncio.sleep(2.5)
            await procs[name].kill()
            procs[name].start()
            restarts.append(asyncio.create_task(procs[name].wait_started()))
        await asyncio.gather(stream, *restarts)
        ids = {r.id for r in requests}
        items = {(j.job_id, i.id) for j in job_list for i in j.items}
        responses, summaries = await collect(settings, {request_key(r.tenant, r.id) for r in requests}, items)
        usage_records = await read_topics(settings, [t.USAGE], done=lambda _r: False, timeout_s=3)
        usage = {u.id: u for u in (UsageRecord.model_validate_json(r.value) for r in usage_records)}
        await wait_ledger(settings.state_dir / "ledger.sqlite", len(usage), 60)
    finally:
        await stop_all(procs)

    by_id = responses_by_id(responses)
    missing = ids - set(by_id)
    assert not missing, f"{len(missing)} requests never answered, e.g. {sorted(missing)[:5]}"
    distinct = {rid: msgs for rid, msgs in by_id.items() if rid in ids and len(msgs) > 1}
    assert not distinct, f"{len(distinct)} requests got different answers: {list(distinct)[:5]}"
    republished = sum(n - 1 for msgs in by_id.values() for n in msgs.values())

    paid = Counter(e["request_id"] for e in procs["gateway"].events("provider_call"))
    assert paid, "the gateway made no model call"
    assert max(paid.values()) == 1, f"paid twice: {[k for k, n in paid.items() if n > 1][:5]}"
    llm_ids = {rid for rid, msgs in by_id.items() for m in msgs if '"source":"llm"' in m}
    assert llm_ids <= set(paid), "every model answer was paid exactly once"

    got_items = {(s.job_id, s.item_id) for s in (SummaryResult.model_validate_json(x.value) for x in summaries)}
    assert got_items >= items, f"{len(items - got_items)} summary items missing"

    per_request = Counter(u.request_id for u in usage.values() if u.stage in ("gateway", "dedupe"))
    answered_ok = {rid for rid, msgs in by_id.items() if rid in ids and '"source":"error"' not in next(iter(msgs))}
    assert set(per_request) == answered_ok, "every answered request has a usage record, errors none"
    assert max(per_request.values()) == 1, "a request's cost is recorded once (one usage id per request)"
    catalog = PriceCatalog.load()
    events = [cost_event(u, catalog) for u in usage.values()]
    count, baseline, actual = ledger_totals(settings.state_dir / "ledger.sqlite")
    assert count == len(usage)
    assert baseline == pytest.approx(sum(e.data.baseline_cost_usd for e in events), abs=1e-6)
    assert actual == pytest.approx(sum(e.data.actual_cost_usd for e in events), abs=1e-6)
    print(f"republished identical responses: {republished}; paid calls: {len(paid)}")




# --- The gateway alone, against a provider that counts every call ------------------------------------------

TENANTS = ("acme", "globex")


async def routed_requests(n: int, tag: str) -> list[RoutedRequest]:
    """`n` requests with unique prompts, routed as the classifier routes them for the openai provider. Ids are
    shared by pairs of tenants (acme and globex both send `<tag>-k`): each must be paid and answered for itself."""
    requests = [LLMRequest(id=f"{tag}-{i // 2}", tenant=TENANTS[i % 2],
                           messages=(ChatMessage(role="user", content=f"{tag} question {i}: what is {i} plus one?"),))
                for i in range(n)]
    results = await Classifier(Settings(provider="openai", kafka_idempotent=False), TokenCounter()).handle(requests)
    routed = [r.routed for r in results if isinstance(r, Routed)]
    assert len(routed) == n and all(r.route.provider == "openai" and r.route.model.startswith("gpt-") for r in routed)
    return routed


def prompt_of(routed: RoutedRequest) -> str:
    return str(routed.request.messages[-1].content)


def key_of(routed: RoutedRequest) -> str:
    return request_key(routed.request.tenant, routed.request.id)


async def produce_dispatch(settings: Settings, routed: list[RoutedRequest], rate: float, first: int = 0) -> None:
    """Straight onto `llm.requests.dispatch` as dedupe would (keyed by scope), spread over every partition."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=False, acks="all")
    await producer.start()
    try:
        start = time.monotonic()
        for i, r in enumerate(routed):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            await producer.send(settings.topic(t.DISPATCH), r.model_dump_json().encode(), key=r.keys.scope.encode(),
                                partition=(first + i) % PARTITIONS)
        await producer.flush()
    finally:
        await producer.stop()


def gateway_env(settings: Settings, fake: CountingOpenAI, state_dir: Path, **extra: str) -> dict[str, str]:
    return fault_env(settings, **fake.env(), FRUGAL_STATE_DIR=str(state_dir), **extra)


def crash_env(after_batches: int) -> dict[str, str]:
    """Exit after the N-th batch is published, before its commit. One batch at a time, so the exit lands in
    exactly that window: with calls in flight (`gateway_calls_in_flight`), calls still at the provider when a
    process dies are paid again after the restart, a different window (see the kill-in-flight test)."""
    return {"FRUGAL_FAULT_EXIT_AFTER_PUBLISH": "gateway", "FRUGAL_FAULT_EXIT_AFTER_BATCHES": str(after_batches),
            "FRUGAL_GATEWAY_CALLS_IN_FLIGHT": "1"}


def assert_one_answer_each_paid_once(routed: list[RoutedRequest], responses: list[Any], fake: CountingOpenAI,
                                     *, paid_twice: Collection[str] = ()) -> int:
    """Every request answered by one distinct message of its own tenant; every prompt paid once (except the
    `paid_twice` ones, whose first call was cut by the kill). Returns how many identical copies were republished."""
    by_key = answers_by_key(responses)
    keys = {key_of(r) for r in routed}
    missing = keys - set(by_key)
    assert not missing, f"{len(missing)} requests never answered, e.g. {sorted(missing)[:3]}"
    distinct = {k: list(m) for k, m in by_key.items() if k in keys and len(m) > 1}
    assert not distinct, f"{len(distinct)} requests got different answers, e.g. {list(distinct.items())[:1]}"
    for r in routed:  # the answer is the one paid for this (tenant, id), never the other tenant's
        answer = next(iter(by_key[key_of(r)]))
        assert f'"content":"{prompt_of(r)} #' in answer, f"{key_of(r)} got an answer to another prompt"
    prompts = {prompt_of(r) for r in routed}
    twice = {p: n for p, n in fake.calls.items() if n > 1 and p not in paid_twice}
    assert not twice, f"paid more than once: {list(twice.items())[:5]}"
    assert set(fake.calls) == prompts, "every request was paid for (none served by another's answer)"
    return sum(n - 1 for m in by_key.values() for n in m.values())


async def test_exit_between_publish_and_commit_replays_the_batch_and_pays_nothing_twice(
    fault_settings: Settings, tmp_path: Path,
) -> None:
    """The worst moment: the 3rd batch's answers are published, its offsets not committed. The restarted gateway
    (another state dir: nothing local survives) gets that batch again and must replay it, not pay for it."""
    settings = fault_settings
    routed = await routed_requests(48, "window")
    async with CountingOpenAI(latency_s=0.05) as fake:
        gw = ServiceProcess("gateway", gateway_env(settings, fake, tmp_path / "gw1", **crash_env(3)), tmp_path)
        gw.start()
        await gw.wait_started()
        stream = asyncio.create_task(produce_dispatch(settings, routed, rate=12.0))
        try:
            assert await gw.wait_exit(timeout_s=60) == FAULT_EXIT_CODE, gw.tail()
            assert gw.events("fault_injected_exit"), "the exit was the injected one, after publishing"
            gw.env = gateway_env(settings, fake, tmp_path / "gw2")
            gw.start()
            await asyncio.gather(stream, gw.wait_started())
            responses = await read_until_quiet(settings, [t.RESPONSES], keys={key_of(r) for r in routed})
        finally:
            await gw.stop()
    republished = assert_one_answer_each_paid_once(routed, responses, fake)
    assert republished > 0, "the published-but-uncommitted batch was redelivered and its answers replayed"
    assert gw.events("completed_replayed", run=2), "the restart replayed from llm.gateway.completed"


async def test_replica_exiting_in_the_window_its_partitions_are_replayed_by_the_survivor_not_paid(
    fault_settings: Settings, tmp_path: Path,
) -> None:
    """Two gateway replicas in one group, each with its own state dir. One exits between publish and commit;
    the survivor is assigned its partitions, loads their paid-call records, and replays the redelivered batch."""
    settings = fault_settings
    routed = await routed_requests(48, "replica")
    async with CountingOpenAI(latency_s=0.05) as fake:
        doomed = ServiceProcess("gateway", gateway_env(settings, fake, tmp_path / "a", **crash_env(2)), tmp_path,
                                label="gateway-a")
        survivor = ServiceProcess("gateway", gateway_env(settings, fake, tmp_path / "b"), tmp_path, label="gateway-b")
        doomed.start()
        await doomed.wait_started()
        survivor.start()
        await survivor.wait_started()
        deadline = time.monotonic() + 60
        while not (doomed.events("completed_calls_loaded") and survivor.events("completed_calls_loaded")):
            assert time.monotonic() < deadline, "both replicas own partitions"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # the last rebalance settles
        try:
            stream = asyncio.create_task(produce_dispatch(settings, routed, rate=12.0))
            assert await doomed.wait_exit(timeout_s=60) == FAULT_EXIT_CODE, doomed.tail()
            await stream
            responses = await read_until_quiet(settings, [t.RESPONSES], keys={key_of(r) for r in routed},
                                               timeout_s=120)
        finally:
            await asyncio.gather(doomed.stop(), survivor.stop())
    republished = assert_one_answer_each_paid_once(routed, responses, fake)
    assert republished > 0, "the doomed replica's uncommitted batch was redelivered to the survivor"
    assert any(e["records"] > 0 for e in survivor.events("completed_calls_loaded")), \
        "the survivor loaded the doomed replica's paid calls when it took its partitions over"
    assert survivor.events("completed_replayed"), "and replayed them instead of paying"


async def test_kill_while_a_provider_call_is_in_flight_loses_nothing(fault_settings: Settings, tmp_path: Path) -> None:
    """SIGKILL while a call is in flight (placed by the provider, not a timer): that batch was not committed, so
    it is redelivered and answered. Only the cut call is paid again (the provider got it, the gateway never
    got the answer); everything answered before the kill is replayed or left alone, never paid again."""
    settings = fault_settings
    before, trap_batch, after = await routed_requests(16, "calm"), await routed_requests(1, "trap"), \
        await routed_requests(16, "late")
    trap = prompt_of(trap_batch[0])
    async with CountingOpenAI(latency_s=0.05, hold=[trap]) as fake:
        gw = ServiceProcess("gateway", gateway_env(settings, fake, tmp_path / "gw1"), tmp_path)
        gw.start()
        await gw.wait_started()
        try:
            await produce_dispatch(settings, before, rate=20.0)
            await read_topics(settings, [t.RESPONSES], timeout_s=60,
                              done=lambda rs: set(answers_by_key(rs)) >= {key_of(r) for r in before})
            await produce_dispatch(settings, trap_batch, rate=1.0)
            await asyncio.wait_for(fake.held.wait(), 30)
            await gw.kill()
            gw.env = gateway_env(settings, fake, tmp_path / "gw2")
            gw.start()
            await gw.wait_started()
            await produce_dispatch(settings, after, rate=20.0, first=1)
            everything = [*before, *trap_batch, *after]
            responses = await read_until_quiet(settings, [t.RESPONSES], keys={key_of(r) for r in everything})
        finally:
            await gw.stop()
    assert_one_answer_each_paid_once(everything, responses, fake, paid_twice={trap})
    assert fake.calls[trap] == 2, "the cut call was made again after the restart"


async def committed_total(settings: Settings) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.group("gateway"),
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(settings.topic(t.DISPATCH), p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        return sum([await consumer.committed(tp) or 0 for tp in tps])
    finally:
        await consumer.stop()


async def test_sigterm_finishes_in_flight_work_and_commits_so_nothing_is_redelivered(
    fault_settings: Settings, tmp_path: Path,
) -> None:
    """A graceful stop mid-batch: calls in flight at SIGTERM are answered and their offsets committed before
    exit, so the restart gets no redelivery: nothing is replayed, paid twice or published twice."""
    settings = fault_settings
    routed = await routed_requests(60, "term")
    prompt_key = {prompt_of(r): key_of(r) for r in routed}
    async with CountingOpenAI(latency_s=0.6) as fake:
        gw = ServiceProcess("gateway", gateway_env(settings, fake, tmp_path / "gw1"), tmp_path)
        gw.start()
        await gw.wait_started()
        try:
            stream = asyncio.create_task(produce_dispatch(settings, routed, rate=15.0))
            deadline = time.monotonic() + 60
            # Stop it while calls are in flight at the provider (received, not yet answered).
            while not (sum(fake.answered.values()) >= 3 and fake.calls - fake.answered):
                assert time.monotonic() < deadline, "the gateway never had calls in flight"
                await asyncio.sleep(0.02)
            in_flight = set(fake.calls - fake.answered)
            gw.signal(signal.SIGTERM)
            assert await gw.wait_exit() == 0, gw.tail()
            paid_by_first_run = set(fake.calls)
            first = answers_by_key(await read_topics(settings, [t.RESPONSES], done=lambda _r: False, timeout_s=2))
            committed = await committed_total(settings)
            gw.env = gateway_env(settings, fake, tmp_path / "gw2")
            gw.start()
            await asyncio.gather(stream, gw.wait_started())
            responses = await read_until_quiet(settings, [t.RESPONSES], keys=set(prompt_key.values()))
        finally:
            await gw.stop()
    assert in_flight, "the stop came while calls were in flight"
    missing = {prompt_key[p] for p in paid_by_first_run} - set(first)
    assert not missing, f"calls in flight at SIGTERM were not answered before exit: {sorted(missing)[:3]}"
    assert committed == len(first), "everything answered was committed, and nothing more"
    republished = assert_one_answer_each_paid_once(routed, responses, fake)
    assert republished == 0, "no response published twice, not even identically"
    assert not gw.events("completed_replayed", run=2), "the restart had nothing to replay"
