"""Contracts of the dead-letter topics and the compacted `llm.cache` topic."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas._base import Contract
from schemas.requests import CacheKeys


class DeadLetter(Contract):
    """What `<topic>.dlq` carries: the original bytes (base64), headers and the error, so nothing is lost."""

    schema_version: Literal[1] = 1
    topic: str
    partition: int | None = None
    offset: int | None = None
    key_b64: str | None = None
    value_b64: str
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
