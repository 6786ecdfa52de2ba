"""Gateway work on a batch of dispatched requests: concurrent provider calls, one terminal answer each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from schemas import LLMResponse, RoutedRequest, UsageRecord
from schemas import topics as t
from services.core.logging import get_logger
from services.core.messaging import Out
from services.core.outputs import error_response, llm_usage, response_outs
from services.gateway.idempotency import CompletedStore
from services.gateway.providers import Completion, Provider
from services.gateway.resilience import BreakerRegistry, FinalProviderError, RetryPolicy, call_with_fallbacks

log = get_logger(__name__)


@dataclass
class Gateway:
    providers: Mapping[str, Provider]
    completed: CompletedStore
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    breakers: BreakerRegistry = field(default_factory=BreakerRegistry)
    stats: dict[str, int] = field(default_factory=lambda: {"calls": 0, "replayed": 0, "errors": 0})
    model_providers: Mapping[str, str] = field(default_factory=dict)

    def _provider_for(self, routed_provider: str, model: str) -> Provider:
        """A fallback model may live at another provider than the routed one (e.g. claude after gpt)."""
        return self.providers.get(self.model_providers.get(model, routed_provider), self.providers[routed_provider])

    async def on_dispatch(self, batch: Sequence[RoutedRequest]) -> list[Out]:
        results = await asyncio.gather(*(self._one(r) for r in batch))
        return [out for outs in results for out in outs]

    async def _one(self, routed: RoutedRequest) -> list[Out]:
        done = await asyncio.to_thread(self.completed.get, routed.request.id)
        if done is not None:
            self.stats["replayed"] += 1
            return _outs(routed, *done)
        if routed.route.provider not in self.providers:
            response = error_response(routed.request, "provider_error",
                                      f"provider {routed.route.provider!r} is not configured", routed=routed)
            return _outs(routed, response, None)
        request = routed.request

        async def call(p: Provider, model: str) -> Completion:
            return await p.complete(
                model=model, messages=request.messages, sampling=request.sampling, max_tokens=request.max_tokens,
                tools=request.tools, response_format=request.response_format,
            )

        try:
            completion = await call_with_fallbacks(
                lambda model: self._provider_for(routed.route.provider, model),
                (routed.route.model, *routed.route.fallbacks), call,
                policy=self.policy, breakers=self.breakers,
            )
        except FinalProviderError as exc:
            self.stats["errors"] += 1
            log.warning("provider_failed", request_id=request.id, reason=str(exc), kind=exc.kind)
            code = "circuit_open" if exc.kind == "circuit_open" else "timeout" if exc.kind == "timeout" else (
                "provider_error")
            response = error_response(request, code, str(exc), routed=routed, retryable=exc.rate_limited)
            await asyncio.to_thread(self.completed.put, response, None)
            return _outs(routed, response, None)
        self.stats["calls"] += 1
        response = LLMResponse(
            request_id=request.id, tenant=request.tenant, source="llm", content=completion.content,
            tool_calls=completion.tool_calls, model=completion.model, tier=routed.route.tier,
            task_type=routed.route.task_type,
            finish_reason=completion.finish_reason, usage=completion.usage, keys=routed.keys,
            cacheable=completion.finish_reason == "stop" and request.cache.policy != "no-store"
            and not completion.tool_calls,
            simulated=completion.simulated, created_at=request.created_at, responded_at=time.time(),
            provider_latency_ms=completion.latency_ms,
        )
        usage = llm_usage(routed, completion.model, completion.usage, simulated=completion.simulated)
        # Recorded before publishing: if we crash after this, the redelivery re-publishes instead of paying again.
        await asyncio.to_thread(self.completed.put, response, usage)
        return _outs(routed, response, usage)


def _outs(routed: RoutedRequest, response: LLMResponse, usage: UsageRecord | None) -> list[Out]:
    outs = response_outs(response, routed.request, routed.keys.scope)
    if usage is not None:
        outs.append(Out(t.USAGE, usage, key=routed.request.tenant))
    return outs
