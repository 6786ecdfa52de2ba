"""Contracts of `llm.requests`, `llm.requests.routed` and `llm.requests.dispatch`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from frugalstream.schemas._base import Contract

TaskType = Literal[
    "faq", "extraction", "classification", "summarization", "drafting",
    "code", "reasoning", "creative", "chat",
]
TASK_TYPES: tuple[TaskType, ...] = (
    "faq", "extraction", "classification", "summarization", "drafting",
    "code", "reasoning", "creative", "chat",
)
Tier = Literal["small", "mid", "large"]
TIERS: tuple[Tier, ...] = ("small", "mid", "large")
CachePolicy = Literal["default", "no-store", "no-cache"]


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(max_length=256)
    name: str = Field(max_length=256)
    arguments: str = Field(default="", description="JSON-encoded arguments, as the provider sent them.")


class ChatMessage(BaseModel):
    """One chat turn in the OpenAI-style format every provider adapter maps from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    name: str | None = Field(default=None, max_length=256)
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = Field(default=None, max_length=256)


class SamplingParams(BaseModel):
    """Parameters that change the answer, and therefore belong to the cache scope."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: tuple[str, ...] = ()


class CacheControl(BaseModel):
    """`no-cache` skips lookup but stores the answer; `no-store` neither reads nor writes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: CachePolicy = "default"
    ttl_s: int | None = Field(default=None, gt=0, description="Upper bound on the age of a served answer.")
    shared_scope: str | None = Field(
        default=None, max_length=128,
        description="Scope shared between tenants; the tenant's policy must grant it (read and/or write).",
    )


class LLMRequest(Contract):
    """A job an application produces to `llm.requests`."""

    schema_version: Literal[1] = 1
    id: str = Field(min_length=1, max_length=128, description="Idempotency key: redelivery never pays twice.")
    tenant: str = Field(min_length=1, max_length=128)
    messages: tuple[ChatMessage, ...] = Field(min_length=1)
    model: str | None = Field(
        default=None, max_length=128, description="Pinned model; honoured unless policy forbids it."
    )
    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = Field(default=None, gt=0, le=200_000)
    cache: CacheControl = CacheControl()
    task_hint: TaskType | None = None
    tools: tuple[dict[str, Any], ...] = ()
    response_format: dict[str, Any] | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    reply_topic: str | None = Field(
        default=None, max_length=249, pattern=r"^[A-Za-z0-9._-]+$",
        description="Also publish the answer here. Granted by the tenant's policy (by default only topics under "
                    "`<tenant>.`), never a frugalstream topic or a DLQ.",
    )
    created_at: float | None = Field(default=None, description="Producer's unix time, for end-to-end latency.")

    @field_validator("reply_topic")
    @classmethod
    def _kafka_topic_name(cls, topic: str | None) -> str | None:
        if topic in (".", ".."):
            raise ValueError("'.' and '..' are not Kafka topic names")
        return topic

    @field_validator("tags")
    @classmethod
    def _bounded_tags(cls, tags: dict[str, str]) -> dict[str, str]:
        if len(tags) > 32 or any(len(k) > 64 or len(v) > 256 for k, v in tags.items()):
            raise ValueError("at most 32 tags, keys <= 64 and values <= 256 characters")
        return tags


class Route(BaseModel):
    """What the classifier decided, carried with the request to every later stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_type: TaskType
    tier: Tier
    model: str
    provider: str
    fallbacks: tuple[str, ...] = ()
    escalation_score: float | None = None
    reason: str = Field(description="Why this tier: rule or score, for operators, never prompt text.")
    input_tokens: int = Field(ge=0, description="Tokens sent after trimming.")
    full_input_tokens: int = Field(ge=0, description="Tokens of the untrimmed request (the baseline's context).")
    trimmed_messages: int = Field(default=0, ge=0)
    baseline_model: str
    pinned: bool = False
    downgraded_by_budget: bool = False


class CacheKeys(BaseModel):
    """Keys the dedupe stage uses; also echoed on the response so the cache fills itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scope: str = Field(description="Hash of everything that must match exactly (tenant, tier, system prompt...).")
    exact: str = Field(description="Hash of the normalized conversation within the scope.")
    prefix: str = Field(description="Hash of all turns before the last user turn: multi-turn must match exactly.")
    lookup_text: str = Field(description="The last user turn, whitespace-normalized: what the semantic index embeds.")
    tier_rank: int = Field(ge=0, description="A cached answer may serve the same or a lower tier.")


class RoutedRequest(Contract):
    """`llm.requests.routed` and `llm.requests.dispatch`: the request with its route and cache keys."""

    schema_version: Literal[1] = 1
    request: LLMRequest
    route: Route
    keys: CacheKeys
    routed_at: float
    embedding: str | None = Field(
        default=None, description="base64 float16 embedding of lookup_text, computed once by the classifier."
    )
    coalesced_with: tuple[str, ...] = Field(
        default=(), description="Request ids that wait for this dispatch's answer (in-flight coalescing)."
    )
