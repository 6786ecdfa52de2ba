"""The usage records of answers: the counterfactual chain (baseline, then one step per strategy) of every
stage that answers a request."""

from __future__ import annotations

import time

from frugalstream.llm.identity import usage_id
from frugalstream.llm.prompt_cache import uncached, used_cache
from frugalstream.schemas import (
    CostPoint,
    PricedStep,
    RoutedRequest,
    Strategy,
    TokenUsage,
    UsageRecord,
)


def _with_input(usage: TokenUsage, extra_input: int) -> TokenUsage:
    return usage.model_copy(update={"input_tokens": usage.input_tokens + extra_input})


def llm_usage(routed: RoutedRequest, model: str, usage: TokenUsage, *, batch: bool = False,
              simulated: bool = False) -> UsageRecord:
    """baseline --routed_down--> chosen model, full context --context_trim--> trimmed --prompt_cache--> what the
    provider billed at its standard rate --batch_api--> at its batch rate. The prompt_cache step appears only when
    the provider read or wrote its cache (its saving is negative when a cache write did not pay back)."""
    route = routed.route
    trimmed_tokens = max(route.full_input_tokens - route.input_tokens, 0)
    plain = uncached(usage)
    untrimmed = _with_input(plain, trimmed_tokens)
    steps: list[PricedStep] = []
    if model != route.baseline_model:
        steps.append(PricedStep(strategy="routed_down", model=model, usage=untrimmed))
    if trimmed_tokens:
        steps.append(PricedStep(strategy="context_trim", model=model, usage=plain))
    if used_cache(usage):
        steps.append(PricedStep(strategy="prompt_cache", model=model, usage=usage))
    if batch:
        steps.append(PricedStep(strategy="batch_api", model=model, usage=usage, batch=True))
    return UsageRecord(
        id=usage_id("gateway", routed.request.tenant, routed.request.id), request_id=routed.request.id,
        tenant=routed.request.tenant,
        stage="gateway", task_type=route.task_type, tags=routed.request.tags, source="llm",
        baseline=CostPoint(model=route.baseline_model, usage=untrimmed), steps=tuple(steps), actual_model=model,
        occurred_at=time.time(), simulated=simulated,
    )


def discarded_usage(routed: RoutedRequest, model: str, usage: TokenUsage, n: int, *, batch: bool = False,
                    simulated: bool = False) -> UsageRecord:
    """A paid call whose answer could not be used (malformed): billed for nothing, so its whole price is the
    `discarded` strategy's negative saving. `n` numbers the request's discarded calls in order: the replay of
    the recorded request re-emits the same ids, and the ledger counts each once. A batch line (`batch`: at the
    batch price) has an id of its own."""
    tenant, request_id = routed.request.tenant, routed.request.id
    kind = "gateway-discarded-batch" if batch else f"gateway-discarded-{n}"
    return UsageRecord(
        id=usage_id(kind, tenant, request_id), request_id=request_id, tenant=tenant,
        stage="gateway", task_type=routed.route.task_type, tags=routed.request.tags, source="llm",
        baseline=CostPoint(model=routed.route.baseline_model, usage=TokenUsage(estimated=True)),
        steps=(PricedStep(strategy="discarded", model=model, usage=usage, batch=batch),), actual_model=model,
        occurred_at=time.time(), simulated=simulated,
    )


def cache_usage(routed: RoutedRequest, output: int, strategy: Strategy, *, simulated: bool) -> UsageRecord:
    """A request answered without a model call: the whole routed cost is the cache strategy's saving."""
    route = routed.route
    full = TokenUsage(input_tokens=route.full_input_tokens, output_tokens=output, estimated=True)
    steps: list[PricedStep] = []
    if route.model != route.baseline_model:
        steps.append(PricedStep(strategy="routed_down", model=route.model, usage=full))
    steps.append(PricedStep(strategy=strategy, model=route.model, usage=TokenUsage()))
    return UsageRecord(
        id=usage_id("dedupe", routed.request.tenant, routed.request.id), request_id=routed.request.id,
        tenant=routed.request.tenant,
        stage="dedupe", task_type=route.task_type, tags=routed.request.tags, source=strategy,
        baseline=CostPoint(model=route.baseline_model, usage=full), steps=tuple(steps), actual_model=None,
        occurred_at=time.time(), simulated=simulated,
    )
