"""Follows one job on the broker (results, progress, usage) and prices its job report.

Shared by `frugalstream backfill` and `frugalstream bench summarize`. The report prices the job's usage
records with the same catalog and chain arithmetic as the accountant, so its baseline, actual cost and
savings by strategy are exactly what the ledger will show for the job.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.helpers import create_ssl_context
from pydantic import ValidationError

from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import price_chain
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import SummarizeJob, SummarizeProgress, SummaryResult, TokenUsage, UsageRecord
from frugalstream.schemas import topics as t
from frugalstream.summarizer.plan import job_key

OnProgress = Callable[[SummarizeProgress | None, int], None]
log = get_logger(__name__)


@dataclass
class JobOutcome:
    results: dict[str, SummaryResult] = field(default_factory=dict)
    duplicates: int = 0
    conflicts: int = 0  # a repeated result whose summary differs from the first one: must never happen
    progress: SummarizeProgress | None = None
    usage: dict[str, UsageRecord] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.progress is not None and self.progress.finished


def consumer_security(settings: Settings) -> dict[str, Any]:
    """aiokafka's own spelling of the FRUGAL_KAFKA_* security settings."""
    kw: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_sasl_mechanism:
        kw |= {"sasl_mechanism": settings.kafka_sasl_mechanism, "sasl_plain_username": settings.kafka_sasl_username,
               "sasl_plain_password": settings.kafka_sasl_password.get_secret_value()
               if settings.kafka_sasl_password else None}
    if "SSL" in settings.kafka_security_protocol:
        kw["ssl_context"] = create_ssl_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None,
            certfile=str(settings.kafka_ssl_certfile) if settings.kafka_ssl_certfile else None,
            keyfile=str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None)
    return kw


def usage_job_id(request_id: str) -> str | None:
    """The job of a summarizer usage record, whose request id is `<job_id>:<part>:<call>` (see
    `summarizer.accounting.usage_record`; call ids are `p3`, `p3.<digest>` or `reuse`, never with ':').
    Parsed from the right because a job id may itself contain ':': a prefix test would give job `nightly` the
    spend of job `nightly:eu`. None for an id not of that form."""
    head, _, call = request_id.rpartition(":")
    job_id, _, part = head.rpartition(":")
    return job_id if job_id and part.isdigit() and call else None


def usage_part_key(record_id: str) -> str | None:
    """The job part (`job_key`) of a summarizer usage record, whose id is `summarizer:<job_key>:<call_id>`."""
    stage, _, rest = record_id.partition(":")
    key, sep, _ = rest.partition(":")
    return key if stage == "summarizer" and sep else None


class JobFollower:
    """Reads results, progress and usage of one run of a job. Started before the job is published, it reads
    each topic from its beginning (Tansu's end offsets cannot be trusted) and so also meets every earlier run
    of the same job id: it keeps only what carries its run (`run_key`, and the parts' `job_key` for usage).
    Without a run (`run_key` None) it takes every run of the job id."""

    run_key: str | None = None
    part_keys: frozenset[str] = frozenset()

    def __init__(self, settings: Settings, job_id: str, tenant: str, run_key: str | None = None,
                 part_keys: Iterable[str] = ()) -> None:
        self.job_id, self.tenant = job_id, tenant
        self.run_key, self.part_keys = run_key, frozenset(part_keys)
        self.outcome = JobOutcome()
        self.unreadable = 0  # records of the followed topics that fail their contract, skipped
        self._topics = {settings.topic(n): n for n in (t.SUMMARIES, t.SUMMARIZE_PROGRESS, t.USAGE)}
        self._consumer = AIOKafkaConsumer(
            *self._topics, bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024, **consumer_security(settings))

    @classmethod
    def of_run(cls, settings: Settings, parts: Sequence[SummarizeJob]) -> JobFollower:
        """A follower of the run these parts make (all share job id, tenant and `run_key`)."""
        job = parts[0]
        return cls(settings, job.job_id, job.tenant, job.run_key(), (job_key(p) for p in parts))

    def _ours(self, job_id: str, tenant: str, run_key: str | None) -> bool:
        return job_id == self.job_id and tenant == self.tenant and self.run_key in (None, run_key)

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    def _take(self, topic: str, value: bytes) -> None:
        """One record of a followed topic. Every producer's records are read there, from the topic's beginning: one
        that fails its contract (garbage, a newer version) is no record of this run, counted and skipped, never a
        traceback that ends every backfill for as long as the topic keeps it."""
        try:
            self._take_valid(topic, value)
        except ValidationError:
            if not self.unreadable:
                log.warning("job_follower_record_unreadable", topic=topic, job_id=self.job_id)
            self.unreadable += 1

    def _take_valid(self, topic: str, value: bytes) -> None:
        out = self.outcome
        if topic == t.SUMMARIES:
            result = SummaryResult.model_validate_json(value)
            if self._ours(result.job_id, result.tenant, result.run_key):
                if result.item_id in out.results:
                    out.duplicates += 1
                    out.conflicts += out.results[result.item_id].summary != result.summary
                else:
                    out.results[result.item_id] = result
        elif topic == t.SUMMARIZE_PROGRESS:
            progress = SummarizeProgress.model_validate_json(value)
            if self._ours(progress.job_id, progress.tenant, progress.run_key) and (
                    out.progress is None or (progress.finished, progress.done_items) >= (
                    out.progress.finished, out.progress.done_items)):
                out.progress = progress
        else:
            record = UsageRecord.model_validate_json(value)
            if record.stage == "summarizer" and record.tenant == self.tenant and usage_job_id(
                    record.request_id) == self.job_id and (
                    not self.part_keys or usage_part_key(record.id) in self.part_keys):
                out.usage[record.id] = record

    async def poll(self, timeout_ms: int = 200) -> int:
        got = 0
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=5_000)
        for tp, records in batches.items():
            for rec in records:
                if rec.value is not None:
                    self._take(self._topics[tp.topic], rec.value)
                    got += 1
        return got

    async def follow(self, expected: int, timeout_s: float, on_progress: OnProgress | None = None) -> JobOutcome:
        """Until the job is finished and every expected item has a result, then drains what is in flight."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not (self.outcome.finished and len(self.outcome.results) >= expected):
            await self.poll()
            if on_progress is not None:
                on_progress(self.outcome.progress, len(self.outcome.results))
        quiet = 0
        while quiet < 2 and time.monotonic() < deadline:
            quiet = quiet + 1 if await self.poll(300) == 0 else 0
        return self.outcome


def job_report(outcome: JobOutcome, catalog: PriceCatalog) -> dict[str, Any]:
    """Items, unique items, model calls, tokens, baseline and actual cost, and savings by strategy."""
    baseline = actual = Decimal(0)
    savings: dict[str, Decimal] = {}
    for record in outcome.usage.values():
        chain = price_chain(record, catalog)
        baseline += chain.baseline
        actual += chain.actual
        for strategy, saved in chain.savings.items():
            savings[strategy] = savings.get(strategy, Decimal(0)) + saved
    progress = outcome.progress
    usage = progress.usage if progress else TokenUsage()
    return {
        "items": len(outcome.results),
        "unique_items": progress.unique_items if progress else None,
        "model_calls": progress.model_calls if progress else None,
        "input_tokens": usage.input_tokens + usage.cached_input_tokens,
        "output_tokens": usage.output_tokens + usage.reasoning_tokens,
        "errors": sum(1 for r in outcome.results.values() if r.status == "error"),
        "by_source": dict(Counter(r.source for r in outcome.results.values())),
        "duplicate_results": outcome.duplicates,
        "conflicting_results": outcome.conflicts,
        "usage_records": len(outcome.usage),
        "baseline_cost_usd": float(baseline),
        "actual_cost_usd": float(actual),
        "saved_usd": float(baseline - actual),
        "savings_pct": float((baseline - actual) / baseline * 100) if baseline else 0.0,
        "by_strategy": {s: float(v) for s, v in sorted(savings.items(), key=lambda kv: -kv[1])},
        "simulated": any(r.simulated for r in outcome.results.values()),
    }


def ordered(results: dict[str, SummaryResult], ids: Iterable[str]) -> list[SummaryResult | None]:
    return [results.get(i) for i in ids]
