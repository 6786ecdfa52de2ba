"""The classifier's work on a batch of requests, free of Kafka so it is testable with fakes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from schemas import LLMRequest, Route, RoutedRequest
from schemas import topics as t
from services.classifier.routing import (
    BudgetBook,
    PolicyDenied,
    TierThresholds,
    choose_model,
    decide_tier,
)
from services.classifier.task_rules import classify_task
from services.classifier.trimming import trim_to_budget
from services.core.cache_keys import cache_keys, clean_text, split_conversation
from services.core.embedder import AsyncEmbedder, encode_vector
from services.core.messaging import Out
from services.core.outputs import error_response, response_outs
from services.core.settings import Settings, TenantPolicy
from services.core.tokens import TokenCounter


class EscalationScorer(Protocol):
    def score(self, embeddings: npt.NDArray[np.float32], texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


def provider_for(model: str, settings: Settings) -> str:
    if settings.provider == "simulated":
        return "simulated"
    return "anthropic" if model.startswith("claude") else "openai"


@dataclass
class Classifier:
    settings: Settings
    counter: TokenCounter
    embedder: AsyncEmbedder | None = None
    scorer: EscalationScorer | None = None
    thresholds: TierThresholds = field(default_factory=TierThresholds)
    budgets: BudgetBook = field(default_factory=BudgetBook)

    async def handle(self, requests: Sequence[LLMRequest]) -> list[Out]:
        lookups = [clean_text(split_conversation(r.messages)[2]) for r in requests]
        vectors = await self.embedder.embed(lookups) if self.embedder is not None else None
        scores = self.scorer.score(vectors, lookups) if (self.scorer is not None and vectors is not None) else None
        outs: list[Out] = []
        for i, request in enumerate(requests):
            vector = vectors[i] if vectors is not None else None
            score = float(scores[i]) if scores is not None else None
            outs.extend(self._route_one(request, vector, score))
        return outs

    def _route_one(self, request: LLMRequest, vector: npt.NDArray[np.float32] | None,
                   score: float | None) -> list[Out]:
        task = classify_task(request)
        policy = self.settings.tenants.get(request.tenant, TenantPolicy())
        baseline = policy.baseline_model or request.model or self.settings.default_baseline_model
        full_tokens = self.counter.count_messages(request.messages, baseline)
        tier = decide_tier(task.task_type, score, full_tokens, self.thresholds)
        try:
            choice = choose_model(
                tier.tier, request.model, policy, self.budgets.verdict(request.tenant, request.tags), self.settings,
            )
        except PolicyDenied as denied:
            return response_outs(error_response(request, denied.code, str(denied)), request, None)
        budget = self.settings.context_budgets.get(task.task_type, 8_000)
        trimmed = trim_to_budget(request.messages, budget, self.counter, choice.model)
        sent = request.model_copy(update={"messages": trimmed.messages}) if trimmed.dropped else request
        keys = cache_keys(request, choice.tier)
        route = Route(
            task_type=task.task_type, tier=choice.tier, model=choice.model,
            provider=provider_for(choice.model, self.settings), fallbacks=choice.fallbacks,
            escalation_score=score, reason=f"task={task.rule} {tier.reason} {choice.note}".strip(),
            input_tokens=trimmed.tokens, full_input_tokens=trimmed.full_tokens, trimmed_messages=trimmed.dropped,
            baseline_model=baseline, pinned=choice.pinned, downgraded_by_budget=choice.downgraded_by_budget,
        )
        routed = RoutedRequest(
            request=sent, route=route, keys=keys, routed_at=time.time(),
            embedding=encode_vector(vector) if vector is not None else None,
        )
        return [Out(t.ROUTED, routed, key=keys.scope)]
