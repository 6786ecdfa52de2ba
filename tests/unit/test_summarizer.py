"""Summarizer logic without a broker: dedupe, packing, store reuse, retries alone, resume, accounting."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import price_chain
from frugalstream.llm.providers import Completion, SimulatedProvider
from frugalstream.llm.providers.simulated import packed_items
from frugalstream.runtime.records import Decoded, Out, Record
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import (
    ChatMessage,
    SamplingParams,
    SummarizeItem,
    SummarizeJob,
    SummarizeProgress,
    SummaryResult,
    UsageRecord,
)
from frugalstream.schemas import topics as t
from frugalstream.summarizer.app import CONTINUATION_HEADER, continuation, outs_of
from frugalstream.summarizer.batching import SimulatedBatch
from frugalstream.summarizer.logic import Summarizer, SummarizerConfig
from frugalstream.summarizer.plan import content_hash
from frugalstream.summarizer.results import Continues, Emission, Finished
from frugalstream.summarizer.store import NewResult, SummaryStore

INSTRUCTION = "Summarize this product in one sentence."


class Recording:
    """Simulated answers; records the item texts of every completed call; optional sabotage."""

    name = "simulated"

    def __init__(self, *, drop_section: str | None = None, crash_after: int | None = None) -> None:
        self.inner = SimulatedProvider(latency_scale=0.0)
        self.paid: Counter[str] = Counter()
        self.calls: list[int] = []
        self.drop_section = drop_section
        self.crash_after = crash_after

    async def complete(self, *, model: str, messages: Sequence[ChatMessage], sampling: SamplingParams,
                       max_tokens: int | None = None, tools: Sequence[Mapping[str, Any]] = (),
                       response_format: Mapping[str, Any] | None = None) -> Completion:
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise RuntimeError("process died")
        result = await self.inner.complete(model=model, messages=messages, sampling=sampling, max_tokens=max_tokens)
        packed = packed_items(messages)
        texts = [text for _, text in packed[1]] if packed else [messages[-1].content.split("\n\n", 1)[1]]
        self.calls.append(len(texts))
        self.paid.update(content_hash(t) for t in texts)
        if packed and self.drop_section:
            kept = [s for s in result.content.split("### ") if s and not s.startswith(f"{self.drop_section}\n")]
            result = replace(result, content="".join(f"### {s}" for s in kept))
        return result

    async def aclose(self) -> None:
        return None


def make_job(n: int, distinct: int, job_id: str = "job-1", **kw: Any) -> SummarizeJob:
    items = tuple(SummarizeItem(id=f"i{k}", text=f"Widget W{k % distinct:03d} with {k % distinct} speeds")
                  for k in range(n))
    return SummarizeJob(job_id=job_id, tenant="acme", instruction=INSTRUCTION, items=items, **kw)


def summarizer(tmp_path: Path, provider: Any, **kw: Any) -> Summarizer:
    settings = Settings(state_dir=tmp_path, simulated_latency_scale=0.0)
    return Summarizer.build(settings, provider, store=SummaryStore(tmp_path / "s.sqlite"), **kw)


async def on_jobs(logic: Summarizer, jobs: Sequence[SummarizeJob]) -> list[Out]:
    """Runs jobs to the end (continuing each as the service would), with the app's outputs for every emission."""
    outs: list[Out] = []

    async def collect(emission: Emission) -> None:
        outs.extend(outs_of(emission))

    for job in jobs:
        while not isinstance(await logic.handle(job, collect), Finished):
            pass
    return outs


def of(outs: list[Out], kind: type[Any]) -> list[Any]:
    return [o.value for o in outs if isinstance(o.value, kind)]


def priced(outs: list[Out]) -> tuple[Decimal, Decimal, dict[str, Decimal]]:
    catalog = PriceCatalog.load()
    base = actual = Decimal(0)
    savings: dict[str, Decimal] = {}
    for record in {r.id: r for r in of(outs, UsageRecord)}.values():
        chain = price_chain(record, catalog)
        base, actual = base + chain.baseline, actual + chain.actual
        for k, v in chain.savings.items():
            savings[k] = savings.get(k, Decimal(0)) + v
    return base, actual, savings


async def test_repeats_are_paid_once_and_packed(tmp_path: Path) -> None:
    provider = Recording()
    outs = await on_jobs(summarizer(tmp_path, provider), [make_job(500, 50)])
    results = of(outs, SummaryResult)
    assert sorted(r.item_id for r in results) == sorted(f"i{k}" for k in range(500))
    assert Counter(r.source for r in results) == {"llm": 50, "batch_dedupe": 450}
    assert sorted(provider.calls) == [10, 20, 20] and max(provider.paid.values()) == 1
    first = {r.item_id: r for r in results}
    assert first["i50"].reused_from == "i0" and first["i50"].summary == first["i0"].summary
    records = of(outs, UsageRecord)
    assert sum(r.items for r in records) == 500
    assert [s.strategy for s in records[0].steps] == ["routed_down", "batch_dedupe", "batch_packing"]
    base, actual, savings = priced(outs)
    assert base - actual == sum(savings.values()) and actual / base < Decimal("0.02")
    final = of(outs, SummarizeProgress)[-1]
    assert final.finished and final.done_items == 500 and final.unique_items == 50 and final.model_calls == 3
    assert {(o.topic, o.key) for o in outs} == {(t.SUMMARIES, "job-1"), (t.USAGE, "acme"),
                                                 (t.SUMMARIZE_PROGRESS, "job-1")}


async def test_store_reuses_across_jobs_within_tenant_instruction_and_model(tmp_path: Path) -> None:
    provider = Recording()
    logic = summarizer(tmp_path, provider)
    await on_jobs(logic, [make_job(40, 10)])
    outs = await on_jobs(logic, [make_job(40, 10, job_id="job-2")])
    assert len(provider.calls) == 1
    assert {r.source for r in of(outs, SummaryResult)} == {"reused"}
    (record,) = of(outs, UsageRecord)
    assert record.source == "cache_exact" and record.items == 40 and record.steps[-1].usage.output_tokens == 0
    other = make_job(40, 10, job_id="job-3").model_copy(update={"tenant": "globex"})
    await on_jobs(logic, [other])
    assert len(provider.calls) == 2, "another tenant never gets acme's summaries"


async def test_malformed_section_is_retried_alone(tmp_path: Path) -> None:
    provider = Recording(drop_section="3")
    outs = await on_jobs(summarizer(tmp_path, provider), [make_job(5, 5)])
    assert provider.calls == [5, 1]
    results = of(outs, SummaryResult)
    assert len(results) == 5 and all(r.status == "ok" for r in results)
    assert len(of(outs, UsageRecord)) == 2 and sum(r.items for r in of(outs, UsageRecord)) == 5


async def test_restart_resumes_without_paying_again(tmp_path: Path) -> None:
    job = make_job(300, 100)
    config = SummarizerConfig(chunk_calls=1)
    crashing = Recording(crash_after=2)
    with pytest.raises(RuntimeError):
        await on_jobs(summarizer(tmp_path, crashing, config=config), [job])
    survivor = Recording()
    outs = await on_jobs(summarizer(tmp_path, survivor, config=config), [job])
    assert len(crashing.calls) == 2 and len(survivor.calls) == 3
    assert not set(crashing.paid) & set(survivor.paid)
    assert len(set(crashing.paid) | set(survivor.paid)) == 100
    ids = [r.id for r in of(outs, UsageRecord)]
    assert len(ids) == len(set(ids)) == 3  # the two published before the crash are not re-emitted
    assert of(outs, SummarizeProgress)[-1].done_items == 300


async def test_budget_spent_returns_unfinished_then_continues(tmp_path: Path) -> None:
    provider = Recording()
    logic = summarizer(tmp_path, provider, config=SummarizerConfig(chunk_calls=1, handler_budget_s=0.0))
    job = make_job(60, 60)
    outs: list[Out] = []

    async def emit(emission: Emission) -> None:
        outs.extend(outs_of(emission))

    rounds = 1
    while isinstance(outcome := await logic.handle(job, emit), Continues):
        assert outcome.why == "budget"
        rounds += 1
    assert rounds == 3 and len(provider.calls) == 3
    assert len(of(outs, SummaryResult)) == 60


async def test_batch_path_records_batch_api_step(tmp_path: Path) -> None:
    provider = Recording()
    logic = summarizer(tmp_path, provider, batch=SimulatedBatch(provider))
    outs = await on_jobs(logic, [make_job(100, 30, deadline_s=86_400)])
    records = of(outs, UsageRecord)
    assert all(r.steps[-1].strategy == "batch_api" and r.steps[-1].batch for r in records)
    _, _, savings = priced(outs)
    assert savings["batch_api"] > 0
    short = await on_jobs(logic, [make_job(10, 10, job_id="j-short", deadline_s=3600).model_copy(
        update={"instruction": "Other instruction."})])
    assert all(not r.steps[-1].batch for r in of(short, UsageRecord))


async def test_near_duplicates_only_when_asked(tmp_path: Path) -> None:
    texts = ["Sony Bravia LCD TV KDL40 with remote control, black finish, wall mount ready, 2 HDMI inputs",
             "Sony Bravia LCD TV KDL40 with remote control, black finish, wall mount ready, 2 HDMI inputs!!",
             "Sony Bravia LCD TV KDL40 with remote control black finish wall mount ready 2 HDMI inputs new",
             "Sony Bravia LCD TV KDL46 with remote control, black finish, wall mount ready, 2 HDMI inputs",
             "Sony Bravia LCD TV KDL40 no remote control, black finish, wall mount ready, 2 HDMI inputs"]
    items = tuple(SummarizeItem(id=f"n{k}", text=t) for k, t in enumerate(texts))
    job = SummarizeJob(job_id="near", tenant="acme", instruction=INSTRUCTION, items=items, near_duplicates=True)
    provider = Recording()
    outs = await on_jobs(summarizer(tmp_path, provider), [job])
    by_id = {r.item_id: r for r in of(outs, SummaryResult)}
    assert by_id["n1"].source == "batch_dedupe"  # trailing punctuation: exact after normalization
    assert by_id["n2"].source == "near_duplicate" and by_id["n2"].reused_from == "n0"
    assert by_id["n3"].source == "llm" and by_id["n4"].source == "llm"  # model number / negation vetoes
    plain = await on_jobs(summarizer(tmp_path / "b", Recording()),
                          [job.model_copy(update={"near_duplicates": False})])
    assert {r.source for r in of(plain, SummaryResult)} == {"llm", "batch_dedupe"}


def test_a_continuation_is_the_same_part_again_with_its_round() -> None:
    job = make_job(3, 3)
    record = Record(t.SUMMARIZE_JOBS, 0, 7, b"job-1", b"", ((CONTINUATION_HEADER, b"2"),))
    out = continuation(Decoded(record, job))
    assert (out.topic, out.key, out.value, out.headers) == (t.SUMMARIZE_JOBS, "job-1", job, {CONTINUATION_HEADER: "3"})
    first = continuation(Decoded(replace(record, headers=()), job))
    assert first.headers == {CONTINUATION_HEADER: "1"}


async def test_a_write_handed_to_the_store_survives_its_callers_cancellation(tmp_path: Path) -> None:
    store = SummaryStore(tmp_path / "s.sqlite")
    busy = store._submit(time.sleep, 0.2)  # the worker is busy: the write below waits in its queue
    write = asyncio.create_task(store.record_call(
        job_key="k", job_id="j", tenant="acme", call_id="p0", scope="s", model="m", simulated=True,
        results=[NewResult("d", "summary", None, "i0")], items=1, paid=True, usage=None, actual=None))
    await asyncio.sleep(0.01)
    write.cancel()
    with pytest.raises(asyncio.CancelledError):
        await write
    await busy
    await store.aclose()
    again = SummaryStore(tmp_path / "s.sqlite")
    assert [c.call_id for c in await again.calls("k")] == ["p0"]
    await again.aclose()
