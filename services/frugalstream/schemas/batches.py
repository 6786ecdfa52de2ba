"""Contract of the compacted `llm.gateway.batches` topic: the gateway's provider batch jobs, durable.

A deferrable request is committed off `llm.requests.dispatch` only once it is a member of a job recorded here,
so a crash never loses it; the job's provider batch id is recorded here before anyone waits on it, so a
restarted or rebalanced gateway resumes polling that batch instead of submitting its requests again.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from frugalstream.schemas._base import Contract
from frugalstream.schemas.requests import RoutedRequest

# open: gathering members; submitting: about to be (or being) submitted, the batch id not yet known;
# submitted: the provider has it (batch_id set); done: every member answered (members dropped).
BatchState = Literal["open", "submitting", "submitted", "done"]


class BatchMember(BaseModel):
    """One deferred request and the time its answer is due (its deadline, or its latency class's window)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    routed: RoutedRequest
    answer_by: float = Field(description="Unix time the answer must be published by.")


class BatchJob(Contract):
    """One provider batch job of one dispatch partition (key = job id, written to that partition number)."""

    schema_version: Literal[1] = 1
    job_id: str = Field(max_length=128, description="Ours, sent as the batch's metadata so a lost id can be found.")
    partition: int = Field(ge=0)
    provider: str
    model: str
    state: BatchState
    batch_id: str | None = Field(default=None, description="The provider's batch id, once it was submitted.")
    members: tuple[BatchMember, ...] = ()
    created_at: float
    submitted_at: float | None = None
    updated_at: float
