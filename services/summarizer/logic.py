"""Summarize a job's distinct items once and fan the results out to every original item."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from schemas import (
    ChatMessage,
    CostPoint,
    PricedStep,
    SamplingParams,
    SummarizeJob,
    SummarizeProgress,
    SummaryResult,
    TokenUsage,
    UsageRecord,
)
from schemas import topics as t
from services.core.cache_keys import normalize_text
from services.core.messaging import Out
from services.core.settings import Settings
from services.gateway.providers import Completion, Provider
from services.gateway.resilience import BreakerRegistry, FinalProviderError, RetryPolicy, call_with_fallbacks

SYSTEM = "You summarize items for a catalog. Follow the instruction exactly and answer with the summary only."


def content_hash(text: str) -> str:
    return hashlib.blake2b(normalize_text(text).encode(), digest_size=12).hexdigest()


@dataclass
class Summarizer:
    settings: Settings
    provider: Provider
    policy: RetryPolicy = RetryPolicy()
    breakers: BreakerRegistry = field(default_factory=BreakerRegistry)
    concurrency: int = 16

    def model_for(self, job: SummarizeJob) -> str:
        return job.model or self.settings.tiers.small[0]

    async def on_jobs(self, jobs: Sequence[SummarizeJob]) -> list[Out]:
        outs: list[Out] = []
        for job in jobs:
            outs.extend(await self.run_job(job))
        return outs

    async def run_job(self, job: SummarizeJob) -> list[Out]:
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(job.items):
            groups.setdefault(content_hash(item.text), []).append(i)
        model = self.model_for(job)
        baseline = job.model or self.settings.default_baseline_model
        gate = asyncio.Semaphore(self.concurrency)

        async def summarize(digest: str, first: int) -> tuple[str, Completion | FinalProviderError]:
            async with gate:
                try:
                    return digest, await self._complete(job, model, job.items[first].text)
                except FinalProviderError as exc:
                    return digest, exc

        done = await asyncio.gather(*(summarize(d, idx[0]) for d, idx in groups.items()))
        outs: list[Out] = []
        total = TokenUsage()
        calls = 0
        for digest, result in done:
            members = groups[digest]
            first = job.items[members[0]]
            if isinstance(result, FinalProviderError):
                outs.extend(
                    Out(t.SUMMARIES, SummaryResult(job_id=job.job_id, tenant=job.tenant, item_id=job.items[i].id,
                                                    status="error", source="error", error=str(result)),
                        key=job.job_id) for i in members)
                continue
            calls += 1
            total = total + result.usage
            for n, i in enumerate(members):
                outs.append(Out(t.SUMMARIES, SummaryResult(
                    job_id=job.job_id, tenant=job.tenant, item_id=job.items[i].id, status="ok",
                    summary=result.content, source="llm" if n == 0 else "batch_dedupe",
                    reused_from=None if n == 0 else first.id, model=result.model, simulated=result.simulated,
                ), key=job.job_id))
            outs.append(Out(t.USAGE, self._usage(job, digest, len(members), model, baseline, result), key=job.tenant))
        outs.append(Out(t.SUMMARIZE_PROGRESS, SummarizeProgress(
            job_id=job.job_id, tenant=job.tenant, total_items=len(job.items), done_items=len(job.items),
            unique_items=len(groups), model_calls=calls, usage=total, finished=True,
        ), key=job.job_id))
        return outs

    async def _complete(self, job: SummarizeJob, model: str, text: str) -> Completion:
        messages = (ChatMessage(role="system", content=SYSTEM),
                    ChatMessage(role="user", content=f"{job.instruction}\n\n{text}"))

        async def call(p: Provider, m: str) -> Completion:
            return await p.complete(model=m, messages=messages, sampling=SamplingParams(temperature=0.0),
                                    max_tokens=job.max_output_tokens, tools=(), response_format=None)

        return await call_with_fallbacks(lambda _m: self.provider, (model,), call, policy=self.policy,
                                         breakers=self.breakers)

    def _usage(self, job: SummarizeJob, digest: str, copies: int, model: str, baseline: str,
               result: Completion) -> UsageRecord:
        """Baseline: one call per original item on the baseline model; dedupe pays for one of them."""
        per_item = result.usage
        steps: list[PricedStep] = []
        if model != baseline:
            steps.append(PricedStep(strategy="routed_down", model=model, usage=per_item.scaled(copies)))
        if copies > 1:
            steps.append(PricedStep(strategy="batch_dedupe", model=model, usage=per_item))
        return UsageRecord(
            id=f"summarizer:{job.job_id}:{digest}", request_id=f"{job.job_id}:{digest}", tenant=job.tenant,
            stage="summarizer", task_type="summarization", tags=job.tags, source="llm",
            baseline=CostPoint(model=baseline, usage=per_item.scaled(copies)), steps=tuple(steps),
            actual_model=model, items=copies, occurred_at=time.time(), simulated=result.simulated,
        )
