"""What the summarizer decides, in domain terms: the app alone turns these into topics and keys.

`Emission` is what one publish step hands over (the answers of some calls, their usage records, and where the
job stands); the calls are marked published only after `Emit` returns, so a redelivered part re-emits them.
`handle` ends a job part with `Finished`, or with `Continues` when the part must resume later.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from frugalstream.schemas import SummarizeJob, SummarizeProgress, SummaryResult, UsageRecord


@dataclass(frozen=True)
class Emission:
    summaries: tuple[SummaryResult, ...]
    usage: tuple[UsageRecord, ...]
    progress: SummarizeProgress


Emit = Callable[[Emission], Awaitable[None]]

# earlier_part: an earlier part of the job is unfinished and may pay for this part's repeats;
# batch_running: the provider batch is still running; budget: the handler budget is spent.
Why = Literal["earlier_part", "batch_running", "budget"]


@dataclass(frozen=True)
class Finished:
    """Every item of the part is answered and published."""

    job: SummarizeJob


@dataclass(frozen=True)
class Continues:
    """Everything done so far is published; the rest must run later (never blocking the consumer)."""

    job: SummarizeJob
    why: Why


Outcome = Finished | Continues
