"""frugalstream topic contracts: pydantic v2 models are the single source of truth.

The JSON Schema files in `schemas/json/` are generated from these models (`python -m frugalstream.schemas.generate`)
and a test fails when they drift.
"""

from frugalstream.schemas._base import wire_bytes
from frugalstream.schemas.batches import BatchJob, BatchMember
from frugalstream.schemas.costs import BudgetState, CostData, CostEvent
from frugalstream.schemas.infra import CacheEntry, CompletedCall, DeadLetter
from frugalstream.schemas.requests import (
    TASK_TYPES,
    TIERS,
    CacheControl,
    CacheKeys,
    ChatMessage,
    LatencyClass,
    LLMRequest,
    Route,
    RoutedRequest,
    SamplingParams,
    TaskType,
    Tier,
    ToolCall,
)
from frugalstream.schemas.responses import (
    STRATEGIES,
    CostPoint,
    LLMResponse,
    PricedStep,
    ResponseError,
    Strategy,
    TokenUsage,
    UsageRecord,
)
from frugalstream.schemas.summaries import SummarizeItem, SummarizeJob, SummarizeProgress, SummaryResult

__all__ = [
    "STRATEGIES",
    "TASK_TYPES",
    "TIERS",
    "BatchJob",
    "BatchMember",
    "BudgetState",
    "CacheControl",
    "CacheEntry",
    "CacheKeys",
    "ChatMessage",
    "CompletedCall",
    "CostData",
    "CostEvent",
    "CostPoint",
    "DeadLetter",
    "LLMRequest",
    "LLMResponse",
    "LatencyClass",
    "PricedStep",
    "ResponseError",
    "Route",
    "RoutedRequest",
    "SamplingParams",
    "Strategy",
    "SummarizeItem",
    "SummarizeJob",
    "SummarizeProgress",
    "SummaryResult",
    "TaskType",
    "Tier",
    "TokenUsage",
    "ToolCall",
    "UsageRecord",
    "wire_bytes",
]
