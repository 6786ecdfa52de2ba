"""Crash (SIGKILL) and graceful stop (SIGTERM) of service processes in the middle of a stream.

Contract asserted (DESIGN.md, at-least-once + idempotent): every request id gets exactly one *distinct*
terminal message. After a crash the same message may be published again byte for byte (the gateway
replays its stored answer; a reader deduplicates by request id), but never a second, different answer.
No request id is paid twice (one `provider_call` audit line per id across all gateway runs), and the
ledger holds each request's cost exactly once: its totals equal the pricing of the distinct usage records,
and every answered request has exactly one usage record.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from schemas import LLMRequest, SummarizeItem, SummarizeJob, SummaryResult, UsageRecord
from schemas import topics as t
from services.accountant.pricing import cost_event
from services.core.embedded_broker import EmbeddedBroker
from services.core.prices import PriceCatalog
from services.core.settings import Settings
from tests.integration.test_faults_helpers import (
    ServiceProcess,
    fault_env,
    fresh_workload,
    read_topics,
    responses_by_id,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SERVICES = ("classifier", "dedupe", "gateway", "summarizer", "accountant")


@pytest.fixture
async def fault_settings(embedded_broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path) -> Settings:
    settings = Settings(
        kafka_bootstrap=embedded_broker.bootstrap, kafka_idempotent=False, kafka_fetch_max_wait_ms=50,
        kafka_session_timeout_ms=6000, topic_prefix=f"{topic_prefix}.", group_prefix=topic_prefix,
        state_dir=tmp_path / "state", simulated_latency_scale=0.3, coalesce_timeout_s=5.0,
    )
    await embedded_broker.create_topics({settings.topic(n): 4 for n in t.ALL_TOPICS})
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


async def collect(settings: Settings, ids: set[str], items: set[tuple[str, str]]) -> tuple[list[Any], list[Any]]:
    def answered(recs: list[Any]) -> bool:
        return set(responses_by_id(recs)) >= ids

    def summarized(recs: list[Any]) -> bool:
        return {(r.job_id, r.item_id) for r in (SummaryResult.model_validate_json(x.value) for x in recs)} >= items

    responses, summaries = await asyncio.gather(
        read_topics(settings, [t.RESPONSES], done=answered, timeout_s=150),
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
        responses, summaries = await collect(settings, ids, items)
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


async def test_sigterm_finishes_in_flight_work_and_commits_so_nothing_is_redelivered(
    fault_settings: Settings, tmp_path: Path,
) -> None:
    """A graceful stop mid-stream: the in-flight batch is answered and committed before exit, so the
    restarted gateway gets no redelivery: no response is published twice, not even identically."""
    settings = fault_settings
    env = fault_env(settings, FRUGAL_SIMULATED_LATENCY_SCALE="1.0")
    procs = {name: ServiceProcess(name, env, tmp_path) for name in ("classifier", "dedupe", "gateway")}
    requests = fresh_workload(80, "term")
    await start_all(procs)
    try:
        stream = asyncio.create_task(produce_stream(settings, requests, [], rate=10.0))
        deadline = time.monotonic() + 60
        # Stop it mid-stream, once it is answering (polls its log file).
        while len(procs["gateway"].events("provider_call")) < 3 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        procs["gateway"].signal(signal.SIGTERM)
        assert await procs["gateway"].wait_exit() == 0
        in_flight = len(procs["gateway"].events("provider_call"))
        procs["gateway"].start()
        await asyncio.gather(stream, procs["gateway"].wait_started())
        ids = {r.id for r in requests}
        responses = await read_topics(settings, [t.RESPONSES], done=lambda rs: set(responses_by_id(rs)) >= ids,
                                      timeout_s=90)
        await asyncio.sleep(1.0)  # a redelivered batch would re-publish within this time
        responses = await read_topics(settings, [t.RESPONSES], done=lambda _r: False, timeout_s=2)
    finally:
        await stop_all(procs)
    by_id = responses_by_id(responses)
    assert set(by_id) >= ids
    assert in_flight > 0, "the gateway was stopped before it answered anything"
    copies = {rid: sum(msgs.values()) for rid, msgs in by_id.items() if sum(msgs.values()) > 1}
    assert not copies, f"published more than once after a graceful stop: {list(copies)[:5]}"
    paid = Counter(e["request_id"] for e in procs["gateway"].events("provider_call"))
    assert max(paid.values()) == 1
