"""A job id reused with other content is another run: the backfill follower takes only its own run's results,
progress and spend, and the summarizer's progress, unique count and part order are per run, never summed over
every run ever made under the job id."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from frugalstream.runtime.records import Out
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import SummarizeItem, SummarizeJob, SummarizeProgress, SummaryResult, UsageRecord
from frugalstream.schemas import topics as t
from frugalstream.summarizer.config import SummarizerConfig
from frugalstream.summarizer.logic import Summarizer
from frugalstream.summarizer.results import Continues, Emission, Finished
from frugalstream.summarizer.store import SummaryStore
from frugalstream.tools.backfill import split_job
from frugalstream.tools.job_report import JobFollower
from tests.unit.test_summarizer import Recording, of, on_jobs, summarizer

Follow = Callable[[Sequence[SummarizeJob]], JobFollower]


def items(*texts: str) -> list[SummarizeItem]:
    return [SummarizeItem(id=str(n), text=text) for n, text in enumerate(texts, start=1)]


def run(instruction: str, texts: Sequence[str], **kw: int) -> list[SummarizeJob]:
    """The parts `frugalstream backfill --job-id nightly` publishes for a file of these texts."""
    return split_job("nightly", "acme", instruction, items(*texts), **kw)


def result(parts: Sequence[SummarizeJob] | None, item_id: str, summary: str) -> SummaryResult:
    return SummaryResult(job_id="nightly", tenant="acme", item_id=item_id, status="ok", summary=summary,
                         source="llm", run_key=parts[0].run_key() if parts else None)


def finished(parts: Sequence[SummarizeJob] | None, n: int) -> SummarizeProgress:
    return SummarizeProgress(job_id="nightly", tenant="acme", total_items=n, done_items=n, unique_items=n,
                             model_calls=1, finished=True, run_key=parts[0].run_key() if parts else None)


@pytest.fixture
async def follow() -> AsyncIterator[Follow]:
    """Followers of a run fed records by hand (`_take`): never started, so no broker; closed at the end."""
    made: list[JobFollower] = []

    def make(parts: Sequence[SummarizeJob]) -> JobFollower:
        made.append(JobFollower.of_run(Settings(), parts))
        return made[-1]

    yield make
    for follower in made:
        await follower.stop()


def feed(follower: JobFollower, outs: Sequence[Out]) -> None:
    for out in outs:
        follower._take(out.topic, out.value.model_dump_json().encode())


async def test_a_backfill_reusing_a_job_id_is_not_answered_with_the_earlier_runs_results(follow: Follow) -> None:
    """`--job-id nightly` run twice, yesterday with another instruction: the follower reads the topics from their
    beginning, so it meets yesterday's results and finished progress before today's job has even run."""
    yesterday, today = run("Summarize in French.", ["Oak table"]), run("Summarize in English.", ["Oak table"])
    f = follow(today)
    f._take(t.SUMMARIES, result(yesterday, "1", "OLD instruction").model_dump_json().encode())
    f._take(t.SUMMARIES, result(None, "1", "a summarizer from before runs").model_dump_json().encode())
    f._take(t.SUMMARIZE_PROGRESS, finished(yesterday, 1).model_dump_json().encode())
    f._take(t.SUMMARIZE_PROGRESS, finished(None, 1).model_dump_json().encode())
    assert not f.outcome.finished and not f.outcome.results, "today's run is 'done' on yesterday's data"
    f._take(t.SUMMARIES, result(today, "1", "NEW instruction").model_dump_json().encode())
    f._take(t.SUMMARIZE_PROGRESS, finished(today, 1).model_dump_json().encode())
    assert f.outcome.finished and f.outcome.results["1"].summary == "NEW instruction"
    assert (f.outcome.duplicates, f.outcome.conflicts) == (0, 0)


def test_another_file_of_the_same_shape_is_another_run_and_the_same_file_again_is_the_same_run() -> None:
    """Same job id, instruction and options, as many items in as many parts: only the items differ. Every part
    of a run carries one key (progress is summed over it), so the summarizer cannot tell the runs apart from
    one part: the backfill names the run by its items."""
    first = run("Summarize.", ["Oak table", "Red kettle", "Blue mug"], part_items=1)
    other = run("Summarize.", ["Pine bench", "Steel pan", "Green cup"], part_items=1)
    again = run("Summarize.", ["Oak table", "Red kettle", "Blue mug"], part_items=1)
    assert len(first) == 3 and len({p.run_key() for p in first}) == 1
    assert first[0].run_key() != other[0].run_key()
    assert [p.run_key() for p in again] == [p.run_key() for p in first]  # rerun of a file: answered, not repaid


async def test_a_rerun_is_answered_and_reported_from_its_own_run_only(tmp_path: Path, follow: Follow) -> None:
    """Both runs through the summarizer, everything they published fed to today's follower in order: today's
    summaries, today's progress, and today's spend only (yesterday's usage records would double the cost)."""
    logic = summarizer(tmp_path, Recording())
    yesterday = run("Summarize in French.", ["Oak table", "Red kettle", "Oak table"], part_items=2)
    today = run("Summarize in English.", ["Oak table", "Blue mug"], part_items=1)
    try:
        old, new = await on_jobs(logic, yesterday), await on_jobs(logic, today)
    finally:
        await logic.db.aclose()
    f = follow(today)
    feed(f, old)
    assert not f.outcome.results and f.outcome.progress is None and not f.outcome.usage
    feed(f, new)
    assert f.outcome.finished and set(f.outcome.results) == {"1", "2"}
    assert {r.run_key for r in f.outcome.results.values()} == {today[0].run_key()}
    assert set(f.outcome.usage) == {u.id for u in of(new, UsageRecord)}
    assert f.outcome.progress is not None and f.outcome.progress.done_items == 2


async def test_a_rerun_of_a_job_id_is_not_reported_finished_before_its_own_items_are_done(tmp_path: Path) -> None:
    """The summarizer's own progress summed every plan stored under (tenant, job_id): yesterday's finished part
    made today's first progress event say `finished`, counting yesterday's item as done and its text as not
    new to the job."""
    logic = summarizer(tmp_path, Recording(), config=SummarizerConfig(pack_items=1, chunk_calls=1,
                                                                     handler_budget_s=0.0))
    progress: list[SummarizeProgress] = []

    async def collect(emission: Emission) -> None:
        progress.append(emission.progress)

    yesterday = SummarizeJob(job_id="nightly", tenant="acme", instruction="Summarize in French.",
                             items=(SummarizeItem(id="1", text="Oak table"),))
    while not isinstance(await logic.handle(yesterday, collect), Finished):
        pass
    progress.clear()
    today = SummarizeJob(job_id="nightly", tenant="acme", instruction="Summarize in English.",
                         items=(SummarizeItem(id="1", text="Oak table"), SummarizeItem(id="2", text="Blue mug")))
    try:
        assert isinstance(await logic.handle(today, collect), Continues)  # one pack, then out of handler budget
    finally:
        await logic.db.aclose()
    first = progress[0]
    assert not first.finished, f"today's job reported finished after 1 of 2 items: {first}"
    assert first.done_items <= 1 and first.unique_items == 2, first
    assert {p.run_key for p in progress} == {today.run_key()}


async def test_an_unfinished_earlier_run_never_holds_up_a_later_runs_parts(tmp_path: Path) -> None:
    """A later part waits while an earlier part of its own run is unfinished (it may pay for its repeats); an
    abandoned part of yesterday's run under the same job id is no reason to wait, ever."""
    logic = summarizer(tmp_path, Recording(), config=SummarizerConfig(pack_items=1, chunk_calls=1,
                                                                     handler_budget_s=0.0))
    yesterday = run("Summarize.", ["Oak table", "Red kettle", "Blue mug"], part_items=2)
    today = run("Summarize.", ["Pine bench", "Steel pan", "Green cup"], part_items=2)

    async def ignore(_emission: Emission) -> None:
        return None

    try:
        assert isinstance(await logic.handle(yesterday[0], ignore), Continues)  # then never redelivered
        outcome = await logic.handle(today[1], ignore)
    finally:
        await logic.db.aclose()
    assert not (isinstance(outcome, Continues) and outcome.why == "earlier_part"), outcome


async def test_a_store_from_before_runs_opens_and_its_old_parts_belong_to_no_run(tmp_path: Path) -> None:
    """A summarizer upgraded on its state directory: the plans table gains `run_key`; a part planned before it
    (NULL) is never counted in, or waited for by, a run."""
    path = tmp_path / "s.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE plans (job_key TEXT PRIMARY KEY, job_id TEXT NOT NULL, tenant TEXT NOT NULL, "
                   "part INTEGER NOT NULL, parts INTEGER NOT NULL, new_unique INTEGER NOT NULL, plan TEXT NOT NULL, "
                   "finished INTEGER NOT NULL DEFAULT 0)")
        db.execute("INSERT INTO plans VALUES ('old', 'nightly', 'acme', 0, 2, 1, '{}', 0)")
    parts = run("Summarize.", ["Oak table", "Blue mug"], part_items=1)
    logic = Summarizer.build(Settings(state_dir=tmp_path, simulated_latency_scale=0.0), Recording(),
                             store=SummaryStore(path))
    try:
        outs = await on_jobs(logic, parts)
    finally:
        await logic.db.aclose()
    last = of(outs, SummarizeProgress)[-1]
    assert (last.finished, last.done_items, last.unique_items) == (True, 2, 2), last
