"""Runs a plan's pending packs through a provider batch API (half price, slow): submit once, keeping the batch id
in the store, so a continuation or a restarted summarizer polls the same batch instead of paying again; poll
within the handler budget; then keep each pack's answer (the orchestrator retries what it left unanswered alone,
at the standard rate, a chunk at a time)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from frugalstream.llm.providers import Completion
from frugalstream.llm.providers.openai_batch import BatchRequest
from frugalstream.schemas import SummarizeJob
from frugalstream.summarizer.answers import Answers
from frugalstream.summarizer.batching import BatchBackend, BatchPoll, chat_body
from frugalstream.summarizer.config import SummarizerConfig
from frugalstream.summarizer.packs import Packs, request
from frugalstream.summarizer.plan import JobView, Plan

Pending = list[tuple[int, list[str]]]  # (pack number, its digests still unanswered)


@dataclass
class Batches:
    backend: BatchBackend
    answers: Answers
    packs: Packs
    config: SummarizerConfig

    def applies(self, job: SummarizeJob) -> bool:
        """Only a job that may wait as long as a batch can take."""
        return (job.deadline_s or 0) >= self.config.batch_min_deadline_s

    async def run(self, view: JobView, plan: Plan, pending: Pending, started: float) -> list[str] | None:
        """The ids of the calls kept (one `p<n>` per pack: its answer, or a mark that the batch gave none), or None
        while the batch still runs past the handler budget. What the batch left unanswered is not retried here,
        where no budget binds (an expired batch of 1,000 items is 1,000 calls): the caller retries it a chunk at
        a time, and a redelivered part finds every pack's call made, so never submits it in another batch."""
        poll = await self._wait(view, pending, started)
        if poll is None:
            return None
        for n, ds in pending:
            got = poll.results.get(f"p{n}")
            if isinstance(got, Completion):
                await self.answers.accept(view, plan, f"p{n}", ds, got, batch=True)
            else:
                await self.answers.unanswered(view, plan, f"p{n}")
        await self.answers.db.drop_batch(view.key)  # only now: a part redelivered before polls the same batch
        return [f"p{n}" for n, _ in pending]

    async def _wait(self, view: JobView, pending: Pending, started: float) -> BatchPoll | None:
        db = self.answers.db
        batch_id = await db.batch(view.key)
        if batch_id is None:
            requests = []
            for n, ds in pending:
                messages, max_tokens = request(view, ds)
                requests.append(BatchRequest(f"p{n}", chat_body(view.model, messages, max_tokens)))
            batch_id = await self.backend.submit(requests, {"job_id": view.job.job_id, "part": str(view.job.part)})
            await db.save_batch(view.key, batch_id)
        while not (poll := await self.backend.poll(batch_id, view.model)).done:
            if time.monotonic() - started + self.config.batch_poll_s > self.config.handler_budget_s:
                return None
            await asyncio.sleep(self.config.batch_poll_s)
        return poll
