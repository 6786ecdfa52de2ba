"""Contracts of `llm.summarize.jobs`, `llm.summaries` and `llm.summarize.progress`."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from frugalstream.schemas._base import Contract
from frugalstream.schemas.responses import TokenUsage


class SummarizeItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=256)
    text: str = Field(max_length=200_000)


class SummarizeJob(Contract):
    """A backfill: one instruction applied to many items, of which many are usually repeats."""

    schema_version: Literal[1] = 1
    job_id: str = Field(min_length=1, max_length=128)
    tenant: str = Field(min_length=1, max_length=128)
    instruction: str = Field(min_length=1, max_length=20_000)
    items: tuple[SummarizeItem, ...] = Field(min_length=1, max_length=100_000)
    model: str | None = None
    deadline_s: int | None = Field(default=None, gt=0, description="When the job may wait this long, batch APIs apply.")
    near_duplicates: bool = Field(default=False, description="Also reuse verified near-duplicate items.")
    max_output_tokens: int = Field(default=120, gt=0, le=4096)
    tags: dict[str, str] = Field(default_factory=dict)
    part: int = Field(default=0, ge=0, description="Large jobs are split into parts; all parts share job_id.")
    parts: int = Field(default=1, ge=1)
    total_items: int | None = Field(default=None, ge=1, description="Items across all parts.")
    # Left out of the JSON when unset, so a job without it keeps the exact bytes (and `job_key`) it had before.
    run_id: str | None = Field(default=None, min_length=1, max_length=128, exclude_if=lambda v: v is None,
                               description="Names one run of a job split into parts: a producer that re-sends a "
                                           "job id with other items gives another run_id (the backfill CLI uses a "
                                           "digest of the items).")

    def run_key(self) -> str:
        """The run this part belongs to, which its results and progress carry: a job id reused with other content
        is another run, never answered or counted with the earlier one. Every field but the part's own (`part`,
        `items`) for a job in parts, so all its parts share it (`run_id` tells apart runs of the same shape); the
        whole job, items included, for a one-part job, where it equals the summarizer's `job_key`."""
        own = {"part", "items"} if self.parts > 1 else None
        return hashlib.blake2b(self.model_dump_json(exclude=own).encode(), digest_size=12).hexdigest()


class SummaryResult(Contract):
    """One message per original item, including repeats."""

    schema_version: Literal[1] = 1
    job_id: str
    tenant: str
    item_id: str
    status: Literal["ok", "error"]
    summary: str | None = None
    source: Literal["llm", "batch_dedupe", "reused", "near_duplicate", "error"]
    reused_from: str | None = Field(default=None, description="Item id whose summary this reuses.")
    model: str | None = None
    error: str | None = None
    simulated: bool = False
    run_key: str | None = Field(default=None, description="The job's run (`SummarizeJob.run_key`): a job id "
                                                          "reused with other content is another run.")


class SummarizeProgress(Contract):
    """Progress of a job, for the backfill CLI's bar and for the job report."""

    schema_version: Literal[1] = 1
    job_id: str
    tenant: str
    total_items: int
    done_items: int
    unique_items: int
    model_calls: int
    usage: TokenUsage = TokenUsage()
    finished: bool = False
    run_key: str | None = Field(default=None, description="The run these counters cover (`SummarizeJob.run_key`): "
                                                          "a job id reused with other content is another run.")
