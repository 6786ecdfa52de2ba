"""A backfill's job report counts its own job's spend, never another job's: job ids may contain ':', so one job
id can be a prefix of another's usage request ids."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from frugalstream.runtime.settings import Settings
from frugalstream.schemas import SummarizeItem, SummarizeJob, TokenUsage, UsageRecord
from frugalstream.schemas import topics as t
from frugalstream.summarizer.accounting import Covered, usage_record
from frugalstream.tools.job_report import JobFollower

USAGE = TokenUsage(input_tokens=10_000, output_tokens=100)


def spend(job_id: str, call_id: str = "p0", part: int = 0, tenant: str = "acme") -> UsageRecord:
    """A usage record as the summarizer publishes it for one call of a job part."""
    job = SummarizeJob(job_id=job_id, tenant=tenant, instruction="Summarize.", part=part, parts=part + 1,
                       items=(SummarizeItem(id="1", text="hello"),))
    return usage_record(job, f"key-{job_id}-{part}", call_id, model="gpt-4o-mini", baseline_model="gpt-4o",
                        covered=[Covered(single=USAGE, copies=USAGE, items=1)], actual=USAGE, packed=False,
                        batch=False, simulated=True)


@pytest.fixture
async def follow() -> AsyncIterator[Callable[[str], JobFollower]]:
    """Followers of a job fed records by hand (`_take`): never started, so no broker; closed at the end."""
    made: list[JobFollower] = []

    def make(job_id: str) -> JobFollower:
        made.append(JobFollower(Settings(), job_id, "acme"))
        return made[-1]

    yield make
    for follower in made:
        await follower.stop()


def counted(follower: JobFollower, *records: UsageRecord) -> set[str]:
    for record in records:
        follower._take(t.USAGE, record.model_dump_json().encode())
    return {r.request_id for r in follower.outcome.usage.values()}


async def test_a_job_report_never_counts_another_jobs_spend(follow: Callable[[str], JobFollower]) -> None:
    own = [spend("nightly"), spend("nightly", "p1.0a1b2c"), spend("nightly", "reuse"), spend("nightly", part=3)]
    others = [spend("nightly:eu"), spend("nightly:0"), spend("nightly:eu", part=2), spend("nightly", tenant="globex")]
    assert counted(follow("nightly"), *own, *others) == {r.request_id for r in own}


async def test_a_job_id_with_a_colon_counts_its_own_spend_only(follow: Callable[[str], JobFollower]) -> None:
    own = [spend("nightly:eu"), spend("nightly:eu", "p0.ff", part=1)]
    assert counted(follow("nightly:eu"), *own, spend("nightly"), spend("nightly:eu:x")) == {
        r.request_id for r in own}
