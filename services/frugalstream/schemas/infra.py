"""Contracts of the dead-letter topics and the compacted `llm.cache` topic."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from frugalstream.schemas._base import Contract
from frugalstream.schemas.requests import CacheKeys
from frugalstream.schemas.responses import LLMResponse, UsageRecord


class DeadLetter(Contract):
    """What `<topic>.dlq` carries: the original bytes (base64), headers and the error.

    A value too large to copy whole is truncated (`truncated`), with the full value's size and sha256, so the
    dead letter itself always fits the producer's limit; the original stays on its topic at `offset`.
    """

    schema_version: Literal[1] = 1
    topic: str
    partition: int | None = None
    offset: int | None = None
    key_b64: str | None = None
    value_b64: str
    value_size: int | None = Field(default=None, ge=0, description="Bytes of the original value.")
    value_sha256: str | None = Field(default=None, description="sha256 of the original value, hex.")
    truncated: bool = Field(default=False, description="value_b64 holds only the first bytes of the value.")
    headers: dict[str, str] = Field(default_factory=dict)
    error_type: str
    error: str = Field(max_length=4000)
    service: str
    failed_at: float


class CacheEntry(Contract):
    """One stored answer on the compacted `llm.cache` topic (key = scope shard + exact key)."""

    schema_version: Literal[1] = 1
    keys: CacheKeys
    request_id: str
    tenant: str
    content: str
    model: str
    output_tokens: int
    task_type: str | None = None
    stored_at: float
    expires_at: float | None = None
    simulated: bool = False
    embedding: str | None = Field(default=None, description="base64 float16 vector of lookup_text: no re-embedding.")
    cost_weight: float = Field(default=1.0, description="Relative price of recomputing; eviction keeps costly entries.")


class CompletedCall(Contract):
    """A paid model call on the compacted `llm.gateway.completed` topic (key = `request_key(tenant, id)`).

    Written and acknowledged before the answer is published, on the partition number the dispatch came from,
    so whichever gateway owns that partition next (after a crash, a restart or a rebalance) replays the
    answer instead of paying for it again.
    """

    schema_version: Literal[1] = 1
    tenant: str
    request_id: str
    response: LLMResponse
    usage: UsageRecord | None = None
    discarded: tuple[UsageRecord, ...] = Field(
        default=(), exclude_if=lambda v: not v,
        description="Usage of the calls paid for this request whose answers could not be used (malformed): "
                    "replayed with the answer, so a redelivery bills them once, never loses them.")
    completed_at: float
