"""Usage records of the summarizer: the counterfactual chain baseline -> routed_down -> batch_dedupe ->
batch_packing -> batch_api, so the accountant attributes every dollar saved to the strategy that saved it.

- baseline: every ORIGINAL item as its own call on the baseline model (job.model, else the default);
- routed_down: the same calls on the model actually used (only when it differs);
- batch_dedupe: only the distinct items, one call each (zero for summaries reused from the store);
- batch_packing: what the packed call really used (a single call skips this step);
- batch_api: the same tokens at the provider's batch rate.
Single-call tokens are tiktoken counts of the one-item prompt and of the item's own summary: a
counterfactual can only be counted, never observed. Ids are deterministic per (job part, call), so a
redelivered job republishes the same records and the ledger counts them once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from frugalstream.schemas import CostPoint, PricedStep, SummarizeJob, TokenUsage, UsageRecord
from frugalstream.schemas.responses import ResponseSource


@dataclass(frozen=True)
class Covered:
    """The distinct items one record covers: each as one single call, and every original item it answers."""

    single: TokenUsage
    copies: TokenUsage
    items: int


def usage_record(job: SummarizeJob, job_key: str, call_id: str, *, model: str, baseline_model: str,
                 covered: list[Covered], actual: TokenUsage | None, packed: bool, batch: bool,
                 simulated: bool) -> UsageRecord:
    """`actual` is None for summaries reused without a call (the dedupe step then costs nothing)."""
    copies = sum((c.copies for c in covered), TokenUsage())
    single = sum((c.single for c in covered), TokenUsage())
    items = sum(c.items for c in covered)
    steps: list[PricedStep] = []
    if model != baseline_model:
        steps.append(PricedStep(strategy="routed_down", model=model, usage=copies))
    deduped = single if actual is not None else TokenUsage()
    if deduped != copies:
        steps.append(PricedStep(strategy="batch_dedupe", model=model, usage=deduped))
    if actual is not None and packed:
        steps.append(PricedStep(strategy="batch_packing", model=model, usage=actual))
    if actual is not None and batch:
        steps.append(PricedStep(strategy="batch_api", model=model, usage=actual, batch=True))
    source: ResponseSource = "llm" if actual is not None else "cache_exact"
    return UsageRecord(
        id=f"summarizer:{job_key}:{call_id}", request_id=f"{job.job_id}:{job.part}:{call_id}", tenant=job.tenant,
        stage="summarizer", task_type="summarization", tags=dict(job.tags), source=source,
        baseline=CostPoint(model=baseline_model, usage=copies), steps=tuple(steps), actual_model=model,
        items=items, occurred_at=time.time(), simulated=simulated,
    )
