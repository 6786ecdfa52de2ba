"""Summarize a job's distinct items once, packed several per call, and fan results out to every original item.

`Summarizer.handle` runs one job part: plan it (`Planner`, persisted), re-emit what a previous delivery finished
but may not have published, then run the remaining packs, through the batch API (`Batches`) when the job may
wait that long, else a chunk of standard calls at a time (`Packs`); each call's answer is persisted the moment
it arrives (`Answers`) and each chunk's results, usage and progress are emitted before the next chunk starts.
A part that outlives the handler budget (a slow provider, a batch still running) ends as `Continues`, so the
consumer never blocks past `max_poll_interval`. A later part of a job waits (`Continues`) while an earlier
part is unfinished, so it reuses that part's answers instead of paying for the same items again.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from frugalstream.llm.providers import Provider
from frugalstream.llm.resilience import BreakerRegistry, RetryPolicy
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import SummarizeJob
from frugalstream.summarizer.answers import Answers
from frugalstream.summarizer.batches import Batches
from frugalstream.summarizer.batching import BatchBackend
from frugalstream.summarizer.config import SummarizerConfig
from frugalstream.summarizer.emit import Emitter
from frugalstream.summarizer.near import NearDuplicates
from frugalstream.summarizer.packs import Packs
from frugalstream.summarizer.plan import JobView, Planner
from frugalstream.summarizer.results import Continues, Emit, Finished, Outcome
from frugalstream.summarizer.store import SummaryStore

__all__ = ["Summarizer", "SummarizerConfig"]


@dataclass
class Summarizer:
    """The orchestrator: decides the order of the steps; each step's work lives in its own class."""

    settings: Settings
    db: SummaryStore
    planner: Planner
    packs: Packs
    batches: Batches | None
    config: SummarizerConfig

    @classmethod
    def build(cls, settings: Settings, provider: Provider, *, store: SummaryStore | None = None,
              batch: BatchBackend | None = None, near: NearDuplicates | None = None,
              config: SummarizerConfig | None = None, policy: RetryPolicy | None = None,
              breakers: BreakerRegistry | None = None, counter: TokenCounter | None = None) -> Summarizer:
        """The parts over one store (default: `summarizer.sqlite` in the state directory) and one token counter."""
        db = store or SummaryStore(settings.state_dir / "summarizer.sqlite")
        config = config or SummarizerConfig()
        counter = counter or TokenCounter()
        answers = Answers(db, counter)
        packs = Packs(provider, answers, policy or RetryPolicy(), breakers or BreakerRegistry())
        planner = Planner(db, near or NearDuplicates(), counter, config)
        batches = Batches(batch, answers, packs, config) if batch is not None else None
        return cls(settings, db, planner, packs, batches, config)

    async def aclose(self) -> None:
        await self.packs.provider.aclose()
        if self.batches is not None:
            await self.batches.backend.aclose()
        await self.db.aclose()

    def model_for(self, job: SummarizeJob) -> str:
        return job.model or self.settings.tiers.small[0]

    async def handle(self, job: SummarizeJob, emit: Emit) -> Outcome:
        """Runs one job part as far as the handler budget allows; everything done so far has gone to `emit`."""
        started = time.monotonic()
        if job.part and await self.db.earlier_part_pending(job.tenant, job.job_id, job.part):
            return Continues(job, "earlier_part")  # its repeats may be paid by the earlier part (a running batch)
        view = JobView.of(job, self.model_for(job), job.model or self.settings.default_baseline_model)
        plan = await self.planner.plan(view)
        out = Emitter(self.db, view, plan)
        calls = await self.db.calls(view.key)
        await out.publish([c.call_id for c in calls if not c.published], emit)
        if plan.reuse and not any(c.call_id == "reuse" for c in calls):
            await self.packs.answers.record_reuse(view, plan)
            await out.publish(["reuse"], emit)
        resolved = await self.db.resolved(view.key)
        pending = [(n, [d for d in p if d not in resolved]) for n, p in enumerate(plan.packs)]
        pending = [(n, ds) for n, ds in pending if ds]
        if pending and self.batches is not None and self.batches.applies(job):
            kept = await self.batches.run(view, plan, pending, started)
            if kept is None:
                return Continues(job, "batch_running")
            await out.publish(kept, emit)
            pending = []  # answered, or retried alone inside the batch path
        size = self.config.chunk_calls
        for start in range(0, len(pending), size):
            made = await asyncio.gather(*(self.packs.run(view, plan, n, ds) for n, ds in pending[start:start + size]))
            await out.publish([c for ids in made for c in ids], emit)
            if start + size < len(pending) and time.monotonic() - started > self.config.handler_budget_s:
                return Continues(job, "budget")
        await self.db.finish(view.key)
        await out.publish([], emit, force=True)
        return Finished(job)
