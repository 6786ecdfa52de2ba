"""Gateway work on a batch of dispatched requests: concurrent provider calls, one terminal answer each.

Identity is (tenant, request id) (`request_key`): another tenant reusing an id is a different request, called
and answered for itself. Idempotency: every paid call (and every final provider error after a call went out) is
recorded (`CompletedCalls.record`, durable when it returns) before its answer is returned for publishing, so a
redelivered request, on this replica or another, is replayed, never paid again; copies of one request inside
a batch (a re-routed redelivery upstream) are called once. A record that cannot be made durable defers the
request (its partition is redelivered shortly and the lookup retries the record) rather than publishing an
answer whose payment a crash could forget. An error where no call went out (every circuit open) is retryable
and not recorded: nothing was paid, and the same id is called once the provider recovers.

Spend: a call billed for an answer that could not be used (a `ProviderError` carrying `usage`, e.g. malformed)
is collected across retries and fallbacks and billed as a `discarded` usage record with whatever the request
ends as, and kept in its record, so a replay re-emits it under the same id.

Rate limits: a Retry-After longer than `max_inline_wait_s` is not slept in the handler; the request is
*deferred* (the service pauses its partition, at most `max_defer_s` at a time, and gets it again later), at most
`max_deferrals` times, then it is answered with a retryable error.

Each request ends as a `Result` naming what was decided (paid, replayed, failed, deferred, unrecorded); where
the answer and its usage are published is the service's business (`frugalstream.gateway.app`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from frugalstream.gateway import spans
from frugalstream.gateway.idempotency import CompletedCalls
from frugalstream.llm.identity import request_key
from frugalstream.llm.prompt_cache import PromptCachePlanner, canonical_tools
from frugalstream.llm.providers import Completion, Provider, ProviderError
from frugalstream.llm.resilience import BreakerRegistry, FinalProviderError, RetryPolicy, call_with_fallbacks
from frugalstream.llm.usage import discarded_usage, llm_usage
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.metrics import METRICS, Metrics
from frugalstream.schemas import CompletedCall, LLMRequest, LLMResponse, RoutedRequest, UsageRecord, wire_bytes
from frugalstream.schemas.responses import error_response

log = get_logger(__name__)
MAX_ERROR_TEXT = 2000  # ResponseError.message limit: a longer reason must not make the answer invalid
RECORD_RETRY_S = 1.0  # a paid call whose record the broker did not acknowledge is redelivered after this


class RecordFailedError(Exception):
    """A paid call could not be recorded durably: its answer must not be published yet."""


# paid: a provider answered (recorded); replayed: a recorded call answered again; failed: an error answer;
# deferred: rate limited, delivered again later; unrecorded: the record was not acknowledged, delivered again;
# batched: a member of a durable provider batch job, answered when the batch is (`gateway.batch_runner`).
Outcome = Literal["paid", "replayed", "failed", "deferred", "unrecorded", "batched"]


@dataclass(frozen=True)
class Result:
    """One request's outcome: its answer (and the usage to bill when a model ran), or, with no answer, a wait
    after which it should be delivered again."""

    key: str  # request_key(tenant, request id)
    routed: RoutedRequest  # the copy that was handled: the answer goes where it asked
    outcome: Outcome
    response: LLMResponse | None = None
    usage: UsageRecord | None = None
    retry_after_s: float | None = None
    # Calls paid for this request whose answers could not be used: billed with it, whatever its outcome.
    discarded: tuple[UsageRecord, ...] = ()


#: Hears each request's result once it is decided (see `Gateway.handle`).
OnResult = Callable[["Result"], Awaitable[None]]


@dataclass
class Gateway:
    providers: Mapping[str, Provider]
    completed: CompletedCalls
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    breakers: BreakerRegistry = field(default_factory=BreakerRegistry)
    metrics: Metrics = METRICS
    model_providers: Mapping[str, str] = field(default_factory=dict)
    max_inline_wait_s: float = 1.0
    max_deferrals: int = 5
    # The longest one deferral pauses a dispatch partition (every request on it waits): a provider's Retry-After
    # of hours, a date years ahead or an infinite value is waited for in steps, at most `max_deferrals` of them.
    max_defer_s: float = 60.0
    # An answer whose record would not fit one message is recorded and published as a `too_large` error, the
    # same bytes both times: a record that could not be written would let a redelivery pay again.
    max_answer_bytes: int | None = None
    # Cache breakpoints for providers that need them (`explicit_prompt_cache`); see llm/prompt_cache.py.
    prompt_cache: PromptCachePlanner | None = None
    _deferrals: dict[str, int] = field(default_factory=dict, repr=False)

    def _provider_for(self, routed_provider: str, model: str) -> Provider:
        """A fallback model may live at another provider than the routed one (e.g. claude after gpt)."""
        return self.providers.get(self.model_providers.get(model, routed_provider), self.providers[routed_provider])

    async def handle(self, batch: Sequence[RoutedRequest], partitions: Sequence[int] | None = None, *,
                     can_defer: bool = True, on_result: OnResult | None = None) -> list[Result]:
        """One result per distinct (tenant, id). `partitions[i]` is the dispatch partition `batch[i]` came from:
        its paid-call records live there. Without `can_defer` every request is answered now (a rate-limited one
        with its retryable error) and an unacknowledged record raises. `on_result` hears each result as soon as
        it is decided (a paid call is recorded by then), while its batch-mates' calls go on."""
        parts = list(partitions) if partitions is not None else [0] * len(batch)
        if len(parts) != len(batch):
            raise ValueError("one partition per request")
        unique: dict[str, tuple[RoutedRequest, int]] = {}
        for routed, partition in zip(batch, parts, strict=True):
            unique.setdefault(request_key(routed.request.tenant, routed.request.id), (routed, partition))
        if len(batch) > len(unique):
            self.metrics.record_gateway("duplicate", len(batch) - len(unique))
        outcomes = await asyncio.gather(*(self._guarded(key, r, p, can_defer, on_result)
                                          for key, (r, p) in unique.items()), return_exceptions=True)
        return _all_or_raise(outcomes)

    async def _guarded(self, key: str, routed: RoutedRequest, partition: int, can_defer: bool,
                       on_result: OnResult | None = None) -> Result:
        try:
            result = await self._one(key, routed, partition, can_defer)
        except RecordFailedError:
            self.metrics.record_gateway("unrecorded")
            log.warning("completed_record_failed", request_id=routed.request.id, tenant=routed.request.tenant,
                        partition=partition, exc_info=True)
            if not can_defer:
                raise
            return Result(key, routed, "unrecorded", retry_after_s=RECORD_RETRY_S)
        self.metrics.record_gateway(result.outcome)
        if on_result is not None:
            await on_result(result)
        return result

    async def _lookup(self, partition: int, key: str) -> CompletedCall | None:
        try:
            return await self.completed.lookup(partition, key)
        except Exception as exc:
            raise RecordFailedError(str(exc)) from exc

    async def _record(self, partition: int, routed: RoutedRequest, response: LLMResponse,
                      usage: UsageRecord | None, discarded: Sequence[UsageRecord] = ()) -> None:
        call = CompletedCall(tenant=routed.request.tenant, request_id=routed.request.id, response=response,
                             usage=usage, discarded=tuple(discarded), completed_at=time.time())
        try:
            await self.completed.record(partition, call)
        except Exception as exc:
            raise RecordFailedError(str(exc)) from exc

    async def _one(self, key: str, routed: RoutedRequest, partition: int, can_defer: bool) -> Result:
        request = routed.request
        done = await self._lookup(partition, key)
        if done is not None:
            log.info("completed_replayed", request_id=request.id, tenant=request.tenant, partition=partition)
            return replayed(key, routed, done)
        if routed.route.refused_by_budget is not None:  # dedupe answers these; nothing upstream may make it pay
            response = error_response(request, "budget_exceeded", routed.route.refused_by_budget, routed=routed)
            return Result(key, routed, "failed", response)
        if routed.route.provider not in self.providers:
            response = error_response(request, "provider_error",
                                      f"provider {routed.route.provider!r} is not configured", routed=routed)
            return Result(key, routed, "failed", response)

        # Passed only when set, so providers written before OpenAI's tool options existed keep working.
        tool_options: dict[str, Any] = {k: v for k, v in (("tool_choice", request.tool_choice),
                                                          ("parallel_tool_calls", request.parallel_tool_calls))
                                        if v is not None}
        discarded: list[UsageRecord] = []  # every retry's and fallback's billed but unusable answer, in order

        async def call(p: Provider, model: str) -> Completion:
            with spans.model_call(p.name, model, request) as span:  # GenAI attributes, one span per attempt
                try:
                    completion = await p.complete(
                        model=model, messages=request.messages, sampling=request.sampling,
                        max_tokens=request.max_tokens, tools=canonical_tools(request.tools),
                        response_format=request.response_format, **tool_options,
                        **self.cache_options(p, model, request),
                    )
                except ProviderError as exc:
                    if exc.usage is not None:
                        discarded.append(discarded_usage(routed, model, exc.usage, len(discarded),
                                                         simulated=p.name == "simulated"))
                    raise
                spans.record(span, completion)
                return completion

        policy = dataclasses.replace(
            self.policy, max_retry_after_s=min(self.policy.max_retry_after_s, self.max_inline_wait_s))
        try:
            completion = await call_with_fallbacks(
                lambda model: self._provider_for(routed.route.provider, model),
                (routed.route.model, *routed.route.fallbacks), call, policy=policy, breakers=self.breakers,
            )
        except FinalProviderError as exc:
            wait = exc.retry_after_s
            # A deferral publishes nothing: a request with calls already paid for is answered now, billing them.
            if can_defer and exc.rate_limited and wait is not None and exc.retryable and not discarded \
                    and self._may_defer(key):
                log.info("provider_rate_limited_deferred", request_id=request.id, retry_after_s=wait)
                return Result(key, routed, "deferred", retry_after_s=min(wait, self.max_defer_s))
            return await self._failed(key, routed, partition, exc, tuple(discarded))
        self._deferrals.pop(key, None)
        # The paid-call audit line: one per completed model call, ids and counts only (never the prompt).
        log.info("provider_call", request_id=request.id, tenant=request.tenant, model=completion.model,
                 latency_ms=round(completion.latency_ms, 1), input_tokens=completion.usage.input_tokens,
                 output_tokens=completion.usage.output_tokens)
        response = llm_response(routed, completion)
        usage = llm_usage(routed, completion.model, completion.usage, simulated=completion.simulated)
        response = self._fitted(response, routed)
        # Durable before the answer is returned for publishing: a crash from here until the commit replays it.
        await self._record(partition, routed, response, usage, discarded)
        return Result(key, routed, "paid", response, usage, discarded=tuple(discarded))

    def cache_options(self, provider: object, model: str, request: LLMRequest) -> dict[str, Any]:
        """`cache_plan` for a provider whose prompt cache needs breakpoints, when a prefix repeats; else none."""
        if self.prompt_cache is None or not getattr(provider, "explicit_prompt_cache", False):
            return {}
        plan = self.prompt_cache.plan(request.tenant, model, request.messages, request.tools)
        return {"cache_plan": plan} if plan else {}

    def _fitted(self, response: LLMResponse, routed: RoutedRequest) -> LLMResponse:
        """The answer, or a `too_large` error in its place when it could not be recorded in one message (the
        usage is billed either way: the call was paid)."""
        if self.max_answer_bytes is None:
            return response
        size = wire_bytes(response)  # bytes, as the publisher counts them
        if size <= self.max_answer_bytes:
            return response
        log.warning("answer_too_large", request_id=routed.request.id, tenant=routed.request.tenant, size=size,
                    limit=self.max_answer_bytes)
        return error_response(routed.request, "too_large",
                              f"the model's answer is {size} bytes, over the {self.max_answer_bytes}-byte limit",
                              routed=routed)

    def _may_defer(self, key: str) -> bool:
        n = self._deferrals.get(key, 0)
        if n >= self.max_deferrals:
            self._deferrals.pop(key, None)
            return False
        if len(self._deferrals) > 100_000:  # bounded: ids that never come back (rebalanced away) age out
            self._deferrals.clear()
        self._deferrals[key] = n + 1
        return True

    def fitted(self, response: LLMResponse, routed: RoutedRequest) -> LLMResponse:
        return self._fitted(response, routed)

    async def _failed(self, key: str, routed: RoutedRequest, partition: int, exc: FinalProviderError,
                      discarded: tuple[UsageRecord, ...] = ()) -> Result:
        request = routed.request
        self._deferrals.pop(key, None)
        log.warning("provider_failed", request_id=request.id, reason=str(exc)[:500], kind=exc.kind)
        code = "circuit_open" if exc.kind == "circuit_open" else "timeout" if exc.kind == "timeout" else (
            "provider_error")
        called = exc.kind != "circuit_open"  # circuit_open: every breaker refused, no call went out
        response = error_response(request, code, str(exc)[:MAX_ERROR_TEXT], routed=routed,
                                  retryable=exc.rate_limited or not called)
        if called:  # recorded: a redelivery replays this error instead of trying (and maybe paying) again
            await self._record(partition, routed, response, None, discarded)
        # else nothing was paid: a redelivery or a retry under this id is called once the provider recovers
        return Result(key, routed, "failed", response, discarded=discarded)


def replayed(key: str, routed: RoutedRequest, done: CompletedCall) -> Result:
    """A recorded call answered again, with every usage it was billed (its discarded calls too)."""
    return Result(key, routed, "replayed", done.response, done.usage, discarded=done.discarded)


def _all_or_raise(outcomes: Sequence[Result | BaseException]) -> list[Result]:
    """The results, or the first exception once every call has ended: the stage retries a batch that raised
    record by record at once, and a sibling still being paid for (unrecorded) would be paid for again."""
    results: list[Result] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    return results


def llm_response(routed: RoutedRequest, completion: Completion) -> LLMResponse:
    """The answer of a model call, interactive or from a batch."""
    request = routed.request
    return LLMResponse(
        request_id=request.id, tenant=request.tenant, source="llm", content=completion.content,
        tool_calls=completion.tool_calls, model=completion.model, tier=routed.route.tier,
        task_type=routed.route.task_type,
        finish_reason=completion.finish_reason, usage=completion.usage, keys=routed.keys,
        cacheable=completion.finish_reason == "stop" and request.cache.policy != "no-store"
        and not completion.tool_calls,
        simulated=completion.simulated, created_at=request.created_at, responded_at=time.time(),
        provider_latency_ms=completion.latency_ms,
    )
