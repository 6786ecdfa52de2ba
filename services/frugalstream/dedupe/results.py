"""What dedupe decides, as domain results: the app turns each into topics, keys and partitions.

Identity is (tenant, request id) everywhere in dedupe (`identity`): the answered-id memory, the leaders in
flight, the waiters and what a `Hold` or a `Release` names. Two tenants using the same id never meet through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from frugalstream.llm.identity import request_key
from frugalstream.llm.usage import cache_usage
from frugalstream.schemas import CacheEntry, LLMResponse, RoutedRequest, Strategy, UsageRecord
from frugalstream.schemas.audits import AuditRequest, SemanticRule
from frugalstream.schemas.responses import error_response


def identity(routed: RoutedRequest) -> str:
    return request_key(routed.request.tenant, routed.request.id)


@dataclass(frozen=True)
class Answer:
    """A terminal answer dedupe gives itself (a cache hit or a coalesced follower), with what it saved."""

    routed: RoutedRequest
    response: LLMResponse
    usage: UsageRecord
    rule: SemanticRule | None = None  # a semantic hit's lookup path (for metrics and benches)


@dataclass(frozen=True)
class Dispatch:
    """A request the model must answer."""

    routed: RoutedRequest


@dataclass(frozen=True)
class Refusal:
    """A request a refusing budget lets have only a free answer, and none was found: answered `budget_exceeded`."""

    routed: RoutedRequest
    response: LLMResponse


@dataclass(frozen=True)
class Hold:
    """A request waiting for an in-flight twin. Waiting is state, so it is recorded durably on `partition`:
    a crash or a rebalance cannot lose the request."""

    routed: RoutedRequest
    partition: int

    @property
    def identity(self) -> str:
        return identity(self.routed)


@dataclass(frozen=True)
class Release:
    """A request that no longer waits (answered, dispatched, or resumed by this owner)."""

    identity: str
    partition: int


@dataclass(frozen=True)
class Store:
    """A new cache entry, recorded on the partition its answer came from so the partition's next owner rebuilds it."""

    entry: CacheEntry
    partition: int


@dataclass(frozen=True)
class Audit:
    """A sampled saving (or a free label): to `llm.audits.dispatch` when it needs the baseline's answer, else
    straight to `llm.audits.answered`. Never an answer to anyone."""

    request: AuditRequest


Decision = Answer | Dispatch | Refusal | Hold | Release | Store | Audit


def cache_answer(routed: RoutedRequest, entry: CacheEntry, strategy: Strategy, similarity: float,
                 rule: SemanticRule | None = None) -> Answer:
    """A request served from a stored answer (exact or verified semantic)."""
    response = LLMResponse(
        request_id=routed.request.id, tenant=routed.request.tenant, source=strategy, content=entry.content,
        model=entry.model, tier=routed.route.tier, task_type=routed.route.task_type, finish_reason="stop",
        usage=None, served_from=_served_from(routed, entry.tenant, entry.request_id),
        similarity=round(similarity, 4), keys=routed.keys,
        simulated=entry.simulated, created_at=routed.request.created_at, responded_at=time.time(),
    )
    return Answer(routed, response, cache_usage(routed, entry.output_tokens, strategy, simulated=entry.simulated),
                  rule)


def refused_answer(routed: RoutedRequest) -> Refusal:
    """The answer to a request whose spend a budget refuses (`Route.refused_by_budget`) when nothing free serves it."""
    message = routed.route.refused_by_budget or "the tenant's budget refuses spend"
    return Refusal(routed, error_response(routed.request, "budget_exceeded", message, routed=routed))


def follower_answer(routed: RoutedRequest, leader: LLMResponse) -> Answer:
    """A follower's answer is the leader's response as the model gave it: text, tool calls, finish reason (a
    truncated leader gives truncated followers, since the follower asked the same under the same `max_tokens`)."""
    response = LLMResponse(
        request_id=routed.request.id, tenant=routed.request.tenant, source="coalesced",
        content=leader.content, tool_calls=leader.tool_calls, model=leader.model, tier=routed.route.tier,
        task_type=routed.route.task_type, finish_reason=leader.finish_reason, usage=None,
        served_from=_served_from(routed, leader.tenant, leader.request_id), similarity=1.0, keys=routed.keys,
        simulated=leader.simulated, created_at=routed.request.created_at, responded_at=time.time(),
    )
    output = leader.usage.output_tokens if leader.usage else 0
    return Answer(routed, response, cache_usage(routed, output, "coalesced", simulated=leader.simulated))


def _served_from(routed: RoutedRequest, tenant: str, request_id: str) -> str | None:
    """Another tenant's request id (a shared scope) is not this tenant's business."""
    return request_id if tenant == routed.request.tenant else None
