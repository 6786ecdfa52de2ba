"""The continuation header is the summarizer's own bookkeeping (how many rounds a part took), never the job: a
value a producer garbled (copied headers, a bad retry tool) never drops a valid part nor runs it twice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from frugalstream.runtime.stage import subscribe
from frugalstream.schemas import DeadLetter, SummarizeItem, SummarizeJob
from frugalstream.schemas import topics as t
from frugalstream.schemas.topics import dlq_topic
from frugalstream.summarizer.app import CONTINUATION_HEADER, SummarizerService
from frugalstream.summarizer.results import Continues
from tests.unit.test_stage import (
    CapturingBroker,
    FakeBroker,
    FakeConsumer,
    FakeMessage,
    FakeRecord,
    publisher,
    settings,
)

JOB = SummarizeJob(job_id="j1", tenant="acme", instruction="Summarize.", items=(SummarizeItem(id="1", text="x"),),
                   part=1, parts=2)


@dataclass
class HeaderBroker(FakeBroker):
    """Also records the headers of each publish."""

    published_headers: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    async def publish(self, data: bytes | None, topic: str, *, key: bytes | None = None,
                      partition: int | None = None, headers: dict[str, str] | None = None) -> None:
        await super().publish(data, topic, key=key, partition=partition, headers=headers)
        self.published_headers.append((topic, dict(headers or {})))

    def rounds_on(self, topic: str) -> list[str | None]:
        return [headers.get(CONTINUATION_HEADER) for name, headers in self.published_headers if name == topic]


class Slow:
    """A summarizer whose part must continue later (an earlier part still runs)."""

    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, job: SummarizeJob, _emit: Any) -> Continues:
        self.calls += 1
        return Continues(job, "earlier_part")

    async def aclose(self) -> None:
        return None


async def run_part(header: bytes | None) -> tuple[Slow, HeaderBroker]:
    broker, capturing, logic = HeaderBroker(), CapturingBroker(), Slow()
    pub = publisher(broker)
    svc = SummarizerService(settings(), logic)  # type: ignore[arg-type]
    svc.publisher = pub
    subscribe(capturing, pub, settings(), service="summarizer", topic=t.SUMMARIZE_JOBS,  # type: ignore[arg-type]
              model=SummarizeJob, process=svc._on_jobs, max_records=1)
    headers = () if header is None else ((CONTINUATION_HEADER, header),)
    record = FakeRecord(t.SUMMARIZE_JOBS, 0, 7, b"j1", JOB.model_dump_json().encode(), headers)
    await capturing.handler(FakeMessage((record,), FakeConsumer()))
    return logic, broker


@pytest.mark.parametrize("value", [b"abc", b"\xff\xfe", b"1.5", b"-3", b"9" * 5000],
                         ids=["word", "not-utf8", "fraction", "negative", "too-many-digits"])
async def test_a_garbled_continuation_header_does_not_drop_a_valid_job_part(value: bytes) -> None:
    with capture_logs() as logs:
        logic, broker = await run_part(value)
    letters = [DeadLetter.model_validate_json(d) for d in broker.on(dlq_topic(t.SUMMARIZE_JOBS))]
    assert not letters, [(d.error_type, d.error) for d in letters]
    assert logic.calls == 1, "the part ran more than once"
    assert broker.rounds_on(t.SUMMARIZE_JOBS) == ["1"]
    assert "summarize_continuation_header_invalid" in [e["event"] for e in logs]


@pytest.mark.parametrize(("value", "next_round"), [(None, "1"), (b"", "1"), (b"2", "3")])
async def test_a_valid_continuation_header_counts_the_rounds(value: bytes | None, next_round: str) -> None:
    with capture_logs() as logs:
        logic, broker = await run_part(value)
    assert logic.calls == 1 and not broker.on(dlq_topic(t.SUMMARIZE_JOBS))
    assert broker.rounds_on(t.SUMMARIZE_JOBS) == [next_round]
    assert "summarize_continuation_header_invalid" not in [e["event"] for e in logs]
