"""Topic names and which contract each carries."""

from __future__ import annotations

from pydantic import BaseModel

from frugalstream.schemas.audits import AuditRecord, AuditRequest, ReviewVerdict, ThresholdChange
from frugalstream.schemas.batches import BatchJob
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
GATEWAY_BATCHES = "llm.gateway.batches"
SUMMARIZE_JOBS = "llm.summarize.jobs"
SUMMARIES = "llm.summaries"
SUMMARIZE_PROGRESS = "llm.summarize.progress"
AUDITS_DISPATCH = "llm.audits.dispatch"
AUDITS_ANSWERED = "llm.audits.answered"
AUDITS = "llm.audits"
AUDIT_REVIEWS = "llm.audits.reviews"
THRESHOLDS = "llm.thresholds"

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
    GATEWAY_BATCHES: BatchJob,
    SUMMARIZE_JOBS: SummarizeJob,
    SUMMARIES: SummaryResult,
    SUMMARIZE_PROGRESS: SummarizeProgress,
    AUDITS_DISPATCH: AuditRequest,
    AUDITS_ANSWERED: AuditRequest,
    AUDITS: AuditRecord,
    AUDIT_REVIEWS: ReviewVerdict,
    THRESHOLDS: ThresholdChange,
}
COMPACTED = frozenset({BUDGETS, CACHE, DEDUPE_WAITING, GATEWAY_COMPLETED, GATEWAY_BATCHES, THRESHOLDS})
#: Topics only frugalstream writes: no request may name them (or their DLQs) as a reply topic.
INTERNAL = frozenset(TOPIC_CONTRACTS)


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


ALL_TOPICS: tuple[str, ...] = (*TOPIC_CONTRACTS, *(dlq_topic(t) for t in TOPIC_CONTRACTS))
_MODELS: tuple[type[BaseModel], ...] = (*TOPIC_CONTRACTS.values(), DeadLetter)
CONTRACTS_BY_NAME: dict[str, type[BaseModel]] = {m.__name__: m for m in _MODELS}
