"""Turns persisted calls into domain results: one SummaryResult per original item, the call's usage record, and
the job's progress; a call is marked published only after the app's `Emit` returned (its broker acked)."""

from __future__ import annotations

from frugalstream.schemas import SummarizeProgress, SummaryResult, TokenUsage, UsageRecord
from frugalstream.summarizer.plan import JobView, Plan
from frugalstream.summarizer.results import Emission, Emit
from frugalstream.summarizer.store import Resolved, SummaryStore


class Emitter:
    def __init__(self, db: SummaryStore, view: JobView, plan: Plan) -> None:
        self.db, self.view, self.plan = db, view, plan
        self.rep_of = plan.near
        self.run_key = view.job.run_key()  # once: for a one-part job it hashes every item

    def results(self, digest: str, got: Resolved) -> list[SummaryResult]:
        view, job = self.view, self.view.job
        items = [job.items[i] for i in view.groups[digest]]
        values = []
        for n, item in enumerate(items):
            common = {"job_id": job.job_id, "tenant": job.tenant, "item_id": item.id, "model": got.model,
                      "simulated": got.simulated, "run_key": self.run_key}
            if got.summary is None:
                value = SummaryResult(**common, status="error", source="error", error=got.error or "unanswered")
            elif digest in self.plan.reuse:
                value = SummaryResult(**common, status="ok", summary=got.summary, source="reused",
                                      reused_from=self.plan.reuse[digest][0])
            elif digest in self.rep_of:
                value = SummaryResult(**common, status="ok", summary=got.summary, source="near_duplicate",
                                      reused_from=view.first_id(self.rep_of[digest]))
            elif n == 0:
                value = SummaryResult(**common, status="ok", summary=got.summary, source="llm")
            else:
                value = SummaryResult(**common, status="ok", summary=got.summary, source="batch_dedupe",
                                      reused_from=items[0].id)
            values.append(value)
        return values

    async def progress(self) -> SummarizeProgress:
        job = self.view.job
        p = await self.db.progress(self.run_key)
        usage = sum((TokenUsage.model_validate_json(a) for a in p["actual"]), TokenUsage())
        return SummarizeProgress(job_id=job.job_id, tenant=job.tenant, total_items=self.view.total_items,
                                 done_items=p["done"], unique_items=p["unique"], model_calls=p["calls"],
                                 usage=usage, finished=p["finished_parts"] >= p["parts"], run_key=self.run_key)

    async def publish(self, call_ids: list[str], emit: Emit, *, force: bool = False) -> None:
        if not call_ids and not force:
            return
        wanted = set(call_ids)
        rows = [c for c in await self.db.calls(self.view.key) if c.call_id in wanted]
        resolved = await self.db.resolved(self.view.key)
        summaries: list[SummaryResult] = []
        usage: list[UsageRecord] = []
        for row in rows:
            for digest in row.digests:
                summaries.extend(self.results(digest, resolved[digest]))
            if row.usage is not None:
                usage.append(UsageRecord.model_validate_json(row.usage))
        await emit(Emission(tuple(summaries), tuple(usage), await self.progress()))
        await self.db.mark_published(self.view.key, [r.call_id for r in rows])
