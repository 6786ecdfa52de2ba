"""Topic names and which contract each carries."""

from __future__ import annotations

from pydantic import BaseModel

from frugalstream.schemas.costs import BudgetState, CostEvent
from frugalstream.schemas.infra import CacheEntry, CompletedCall, DeadLetter
from frugalstream.schemas.requests import LLMRequest, RoutedRequest
from frugalstream.schemas.responses import LLMResponse, UsageRecord
from frugalstream.schemas.summaries import SummarizeJob, SummarizeProgress, SummaryResult

REQUESTS = "llm.requests"
ROUTED = "llm.requests.routed"
DISPATCH = "llm.requests.dispatch"
RESPONSES = "llm.responses"
USAGE = "llm.usage"
COST_EVENTS = "llm.cost-events"
BUDGETS = "llm.budgets"
CACHE = "llm.cache"
DEDUPE_WAITING = "llm.dedupe.waiting"
GATEWAY_COMPLETED = "llm.gateway.completed"
SUMMARIZE_JOBS = "llm.summarize.jobs"
SUMMARIES = "llm.summaries"
SUMMARIZE_PROGRESS = "llm.summarize.progress"

TOPIC_CONTRACTS: dict[str, type[BaseModel]] = {
    REQUESTS: LLMRequest,
    ROUTED: RoutedRequest,
    DISPATCH: RoutedRequest,
    RESPONSES: LLMResponse,
    USAGE: UsageRecord,
    COST_EVENTS: CostEvent,
    BUDGETS: BudgetState,
    CACHE: CacheEntry,
    DEDUPE_WAITING: RoutedRequest,
    GATEWAY_COMPLETED: CompletedCall,
    SUMMARIZE_JOBS: SummarizeJob,
    SUMMARIES: SummaryResult,
    SUMMARIZE_PROGRESS: SummarizeProgress,
}
COMPACTED = frozenset({BUDGETS, CACHE, DEDUPE_WAITING, GATEWAY_COMPLETED})
#: Topics only frugalstream writes: no request may name them (or their DLQs) as a reply topic.
INTERNAL = frozenset(TOPIC_CONTRACTS)


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


ALL_TOPICS: tuple[str, ...] = (*TOPIC_CONTRACTS, *(dlq_topic(t) for t in TOPIC_CONTRACTS))
_MODELS: tuple[type[BaseModel], ...] = (*TOPIC_CONTRACTS.values(), DeadLetter)
CONTRACTS_BY_NAME: dict[str, type[BaseModel]] = {m.__name__: m for m in _MODELS}
