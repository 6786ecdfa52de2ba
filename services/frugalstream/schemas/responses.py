"""Contracts of `llm.responses` and `llm.usage`."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from frugalstream.schemas._base import Contract
from frugalstream.schemas.requests import CacheKeys, LLMRequest, RoutedRequest, TaskType, Tier, ToolCall

ResponseSource = Literal["llm", "cache_exact", "cache_semantic", "coalesced", "error"]
Strategy = Literal[
    "cache_exact", "cache_semantic", "coalesced", "routed_down", "context_trim",
    "batch_dedupe", "batch_packing", "batch_api", "prompt_cache", "audit", "discarded",
]
STRATEGIES: tuple[Strategy, ...] = (
    "cache_exact", "cache_semantic", "coalesced", "routed_down", "context_trim",
    "batch_dedupe", "batch_packing", "batch_api", "prompt_cache", "audit", "discarded",
)


#: Upper bound of every token count: far above any real call or job (a summarize part holds at most 100k items
#: of 200k characters, 2e10), and low enough that one priced point fits the ledger's int64 of 1e-10 USD with
#: room for pricier catalogs (10^11 of each kind at the shipped catalog's top rates: ~$1.9e7, under ~$9.2e8).
#: Unbounded, a careless producer's 10^14 tokens overflowed the ledger, and the record (its real spend too) was
#: dead-lettered by the accountant.
MAX_TOKENS = 10**11


class TokenUsage(BaseModel):
    """Token counts in billing terms.

    `input_tokens` excludes cached reads and cache writes, and `output_tokens` excludes reasoning tokens, so
    each kind is priced once: OpenAI reports cached tokens inside prompt tokens and reasoning tokens inside
    completion tokens (the adapter subtracts them), Anthropic reports cache reads and writes on top.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS)
    cached_input_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS)
    cache_write_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS)
    output_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS)
    reasoning_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS,
                                  description="Billed at the output rate unless priced apart.")
    estimated: bool = Field(default=False, description="True when counted with tiktoken, not reported by the provider.")

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            cached_input_tokens=self.cached_input_tokens + other.cached_input_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            estimated=self.estimated or other.estimated,
        )

    def scaled(self, factor: int) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens * factor,
            cached_input_tokens=self.cached_input_tokens * factor,
            cache_write_tokens=self.cache_write_tokens * factor,
            output_tokens=self.output_tokens * factor,
            reasoning_tokens=self.reasoning_tokens * factor,
            estimated=self.estimated,
        )


class ResponseError(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    code: Literal[
        "provider_error", "timeout", "budget_exceeded", "policy_denied", "invalid_request",
        "too_large", "circuit_open", "unpriced_model", "shared_scope_denied", "reply_topic_denied",
        "delivery_failed",
    ]
    message: str = Field(max_length=2000)
    retryable: bool = False


class LLMResponse(Contract):
    """The one terminal message every request gets on `llm.responses`."""

    schema_version: Literal[1] = 1
    request_id: str
    tenant: str
    source: ResponseSource
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    model: str | None = None
    tier: Tier | None = None
    task_type: TaskType | None = None
    finish_reason: str | None = None
    usage: TokenUsage | None = None
    error: ResponseError | None = None
    served_from: str | None = Field(default=None, description="Request id whose answer was reused.")
    similarity: float | None = None
    keys: CacheKeys | None = Field(default=None, description="Lets dedupe fill its cache from this topic.")
    cacheable: bool = Field(default=False, description="Successful, complete, and the request allowed storing it.")
    simulated: bool = False
    created_at: float | None = Field(default=None, description="The request's created_at, echoed for latency.")
    responded_at: float
    provider_latency_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class CostPoint(BaseModel):
    """Work to price: a model, its tokens, and whether the batch rate applies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    usage: TokenUsage
    batch: bool = False


class PricedStep(CostPoint):
    """One point on the counterfactual chain: the work after one more strategy was applied."""

    strategy: Strategy


class UsageRecord(Contract):
    """What a stage spent (or avoided) on `llm.usage`; the accountant prices it.

    The chain starts at `baseline` (baseline model, full context, no cache, no batch) and each step applies
    one strategy; the last step is what was actually billed. Pricing each point and taking differences makes
    `baseline - actual == sum(savings)` hold by construction.
    """

    schema_version: Literal[1] = 1
    id: str = Field(description="Deterministic: a redelivered record has the same id and is counted once.")
    request_id: str
    tenant: str
    stage: Literal["dedupe", "gateway", "summarizer", "classifier", "audit"]
    task_type: TaskType | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    source: ResponseSource
    baseline: CostPoint
    steps: tuple[PricedStep, ...] = ()
    actual_model: str | None = None
    items: int = Field(default=1, ge=0, description="Original requests or items this record covers.")
    occurred_at: float
    simulated: bool = False


def error_response(request: LLMRequest, code: str, message: str, *, routed: RoutedRequest | None = None,
                   retryable: bool = False) -> LLMResponse:
    """The terminal error answer of a request (with its route, when it had one)."""
    return LLMResponse(
        request_id=request.id, tenant=request.tenant, source="error",
        error=ResponseError(code=code, message=message, retryable=retryable),
        model=routed.route.model if routed else None, tier=routed.route.tier if routed else None,
        task_type=routed.route.task_type if routed else None, created_at=request.created_at,
        responded_at=time.time(),
    )
