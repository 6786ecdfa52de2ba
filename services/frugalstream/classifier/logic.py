"""The classifier's work on a batch of requests, free of Kafka so it is testable with fakes.

Per batch: the walls first (reply topic, shared scope: cheap, and a denied request costs nothing more), then
the embeddings of the admitted ones, then routing. Each request ends as one result: `Routed` or `Refused`
(the app turns them into topics and keys). Token counting, trimming, text normalisation and cache-key
hashing are CPU work proportional to the prompt (24 prompts of 400 KB held the event loop 4 s), so a batch with
more message text than `INLINE_MAX_CHARS` runs them in a worker thread and the loop only awaits; a small batch
runs them on the loop, cheaper than the thread hop. Budget verdicts are read on the loop, where `llm.budgets`
updates the book, and handed to the thread as a snapshot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from frugalstream.classifier.routing import (
    PolicyDenied,
    TierThresholds,
    budget_refusal,
    choose_model,
    decide_tier,
)
from frugalstream.classifier.task_rules import classify_task
from frugalstream.classifier.trimming import trim_to_budget
from frugalstream.classifier.walls import Denial, admission_denial, unpriced_pin_denial
from frugalstream.llm.audits import audit_rate, paid_saving
from frugalstream.llm.audits import sampled as audit_sampled
from frugalstream.llm.budgets import BudgetBook
from frugalstream.llm.cache_keys import cache_keys, clean_text, split_conversation
from frugalstream.llm.embedder import AsyncEmbedder, encode_vector
from frugalstream.llm.pricing.baseline import savings_baseline
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.providers import endpoint_for
from frugalstream.llm.thresholds import ThresholdBook
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import BudgetState, ChatMessage, LLMRequest, LLMResponse, Route, RoutedRequest, wire_bytes
from frugalstream.schemas.responses import error_response

log = get_logger(__name__)


@dataclass(frozen=True)
class Routed:
    """Admitted and routed: goes on to dedupe."""

    routed: RoutedRequest


@dataclass(frozen=True)
class Refused:
    """Answered with an error. `reply_allowed` is False when the reply topic itself was refused: the answer may
    then go nowhere but the terminal topic."""

    request: LLMRequest
    response: LLMResponse
    reply_allowed: bool = True


Classified = Routed | Refused


class EscalationScorer(Protocol):
    def score(self, embeddings: npt.NDArray[np.float32], texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


def provider_for(model: str, settings: Settings) -> str:
    return "simulated" if settings.provider == "simulated" else endpoint_for(model)


def sampled(request: LLMRequest) -> bool:
    """Explicitly sampled above temperature 0: two calls may rightly give two answers."""
    return request.sampling.temperature is not None and request.sampling.temperature > 0


# Admission and routing (token counts, rules, cache keys) of a batch up to this much message text run on the
# event loop: a worker thread runs that Python under the GIL anyway, and the loop waits for the GIL instead (at
# 50 req/s, in four paired `frugalstream bench pipeline` runs, the classifier's time a record was 12-22 ms inline
# against 16-34 ms on a thread). Longer batches (tokenizing long histories) go to a worker.
INLINE_MAX_CHARS = 8_000
# What one turn or tool call costs the counter, the trimming and the keys whatever its text, as characters of text
# (about 10 us against 0.4 us a character): 60,000 empty turns (a 1 MB request) counted as no text at all, and four
# such requests held the loop 2.5 s.
ITEM_CHARS = 32


def text_chars(request: LLMRequest) -> int:
    """All the text the counter and the keys read: contents, names and tool-call arguments alike, and the fixed
    cost of each turn and call."""
    return sum(len(m.content) + len(m.name or "") + sum(len(c.name) + len(c.arguments) for c in m.tool_calls)
               + ITEM_CHARS * (1 + len(m.tool_calls))
               for m in request.messages)


@dataclass
class Classifier:
    settings: Settings
    counter: TokenCounter
    embedder: AsyncEmbedder | None = None
    scorer: EscalationScorer | None = None
    thresholds: TierThresholds = field(default_factory=TierThresholds)
    budgets: BudgetBook = field(default_factory=BudgetBook)
    live: ThresholdBook = field(default_factory=ThresholdBook)
    # Pins to models it lacks are refused (spend must be priceable); bootstrap passes the catalog with overrides.
    catalog: PriceCatalog = field(default_factory=PriceCatalog.load)
    _warned_baselines: set[tuple[str, str]] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        """Reads the audit sampling secret now: a secret file that is not mounted fails the start, not a batch."""
        self.settings.audit_sampling_key()

    def _thresholds(self, tenant: str, task: str) -> TierThresholds:
        """The tenant's live routing threshold (moved by audits, `llm.thresholds`), else the configured ones."""
        mid = self.live.get(tenant, task, "route_mid")
        return self.thresholds if mid is None else self.thresholds.model_copy(update={"mid": mid})

    def policy(self, tenant: str) -> TenantPolicy:
        return self.settings.tenants.get(tenant, TenantPolicy())

    async def handle(self, requests: Sequence[LLMRequest]) -> list[Classified]:
        """One result per request: those refused at the walls first, then the others in request order."""
        light = sum(text_chars(r) for r in requests) <= INLINE_MAX_CHARS
        admitted, lookups, denied = self._admit(requests) if light else await asyncio.to_thread(self._admit, requests)
        vectors = await self._embed(admitted, lookups)
        verdicts = [self.budgets.verdict(r.tenant, r.tags) for r in admitted]  # on the loop: the book changes here
        if not admitted:
            return denied
        if light:
            return [*denied, *self._route_all(admitted, lookups, vectors, verdicts)]
        return [*denied, *await asyncio.to_thread(self._route_all, admitted, lookups, vectors, verdicts)]

    def needs_vector(self, request: LLMRequest) -> bool:
        """Whether any decision reads this request's embedding: the router does unless a model is pinned;
        dedupe's semantic lookup does for a cacheable request of a semantic task type. Otherwise the
        embedding, most of the classifier's CPU, is skipped."""
        if request.model is None:
            return True
        return self.cacheable(request) and classify_task(request).task_type in self.settings.semantic_task_types

    def cacheable(self, request: LLMRequest) -> bool:
        """Whether dedupe may answer the request from its cache (or an in-flight twin): the only answers a
        refusing budget still lets through, since they cost nothing."""
        return (request.cache.policy == "default" and not request.opaque
                and (not sampled(request) or self.policy(request.tenant).cache_sampled))

    async def _embed(self, admitted: Sequence[LLMRequest], lookups: Sequence[str]) -> npt.NDArray[np.float32] | None:
        """Rows of the requests that need one (`needs_vector`); the others stay NaN and travel without one."""
        wanted = [i for i, r in enumerate(admitted) if self.needs_vector(r)] if self.embedder is not None else []
        if self.embedder is None or not wanted:
            return None
        vectors = np.full((len(admitted), self.embedder.dim), np.nan, dtype=np.float32)
        vectors[wanted] = await self.embedder.embed([lookups[i] for i in wanted])
        return vectors

    def _admit(self, requests: Sequence[LLMRequest]) -> tuple[list[LLMRequest], list[str], list[Classified]]:
        admitted: list[LLMRequest] = []
        denied: list[Classified] = []
        for request in requests:
            denial = admission_denial(request, self.policy(request.tenant), self.settings)
            if denial is None:
                admitted.append(request)
            else:
                denied.append(self._deny(request, denial))
        lookups = [clean_text(split_conversation(r.messages)[2]) for r in admitted]
        return admitted, lookups, denied

    def _deny(self, request: LLMRequest, denial: Denial) -> Refused:
        log.info("request_denied", tenant=request.tenant, request_id=request.id, code=denial.code)
        response = error_response(request, denial.code, denial.message)
        # A refused reply topic gets no copy of its own refusal.
        return Refused(request, response, reply_allowed=denial.code != "reply_topic_denied")

    def _route_all(self, requests: Sequence[LLMRequest], lookups: Sequence[str],
                   vectors: npt.NDArray[np.float32] | None,
                   verdicts: Sequence[BudgetState | None]) -> list[Classified]:
        scores: npt.NDArray[np.float32] | None = None
        embedded = [] if vectors is None else [i for i in range(len(requests)) if not np.isnan(vectors[i, 0])]
        if self.scorer is not None and vectors is not None and embedded:
            scores = np.full(len(requests), np.nan, dtype=np.float32)
            scores[embedded] = self.scorer.score(vectors[embedded], [lookups[i] for i in embedded])
        results: list[Classified] = []
        has_vector = set(embedded)
        for i, request in enumerate(requests):
            vector = vectors[i] if vectors is not None and i in has_vector else None
            score = float(scores[i]) if scores is not None and i in has_vector else None
            results.append(self._route_one(request, vector, score, verdicts[i]))
        return results

    def _baseline(self, request: LLMRequest, policy: TenantPolicy, *, pin_served: bool = False) -> str:
        """The savings baseline by the rule the HTTP entry's cost headers share (`savings_baseline`): the
        tenant's configured baseline unless the catalog cannot price it (then a warning, once per tenant and
        model: a baseline is a counterfactual, so an operator's typo should not refuse the tenant's traffic),
        a pin only when priced or served as asked (a pin the catalog lacks is refused, served at the
        conservative rate under `allow_unpriced_models`, or dropped by a budget: as the baseline of a dropped
        pin it would credit `routed_down` with a saving measured against the catalog's highest rates)."""
        configured = policy.baseline_model
        if (configured is not None and not self.catalog.has(configured)
                and (request.tenant, configured) not in self._warned_baselines):
            self._warned_baselines.add((request.tenant, configured))
            log.warning("unpriced_baseline_model", tenant=request.tenant, model=configured,
                        fallback=self.settings.default_baseline_model)
        return savings_baseline(self.catalog, self.settings.default_baseline_model, configured=configured,
                                pinned=request.model, pin_served=pin_served)

    def _route_one(self, request: LLMRequest, vector: npt.NDArray[np.float32] | None,
                   score: float | None, verdict: BudgetState | None) -> Classified:
        task = classify_task(request)
        policy = self.policy(request.tenant)
        baseline = self._baseline(request, policy)
        full_tokens = self.counter.count_messages(request.messages, baseline)
        tier = decide_tier(task.task_type, score, full_tokens, self._thresholds(request.tenant, task.task_type))
        refusal = budget_refusal(verdict)
        if refusal is not None and not self.cacheable(request):
            return self._deny(request, Denial("budget_exceeded", refusal))
        try:
            # Refused spend is routed as if unbudgeted: dedupe may serve it a free answer at its own tier, no lower.
            choice = choose_model(tier.tier, request.model, policy, None if refusal else verdict, self.settings)
        except PolicyDenied as denied:
            return self._deny(request, Denial(denied.code, str(denied)))
        # Checked after budgets: a pin that a budget dropped is not run, so its price does not matter.
        if choice.pinned and (denial := unpriced_pin_denial(choice.model, policy, self.catalog)) is not None:
            return self._deny(request, denial)
        if choice.pinned:
            baseline = self._baseline(request, policy, pin_served=True)
        budget = self.settings.context_budgets.get(task.task_type, 8_000)
        trimmed = trim_to_budget(request.messages, budget, self.counter, choice.model)
        sent = request.model_copy(update={"messages": trimmed.messages}) if trimmed.dropped else request
        note = choice.note
        if sampled(request) and not policy.cache_sampled and sent.cache.policy != "no-store":
            # Only the routed copy: what the producer wrote on llm.requests stays as written.
            sent = sent.model_copy(update={"cache": sent.cache.model_copy(update={"policy": "no-store"})})
            note = f"{note} sampled_no_store".strip()
        if request.opaque and sent.cache.policy != "no-store":
            # An image (audio, file) part is not in the cache key: two requests with one text are not the same.
            sent = sent.model_copy(update={"cache": sent.cache.model_copy(update={"policy": "no-store"})})
            note = f"{note} parts_no_store".strip()
        keys = cache_keys(request, choice.tier, pinned=choice.model if choice.pinned else None)
        route = Route(
            task_type=task.task_type, tier=choice.tier, model=choice.model,
            provider=provider_for(choice.model, self.settings), fallbacks=choice.fallbacks,
            escalation_score=score, reason=f"task={task.rule} {tier.reason} {note}".strip(),
            input_tokens=trimmed.tokens, full_input_tokens=trimmed.full_tokens, trimmed_messages=trimmed.dropped,
            baseline_model=baseline, pinned=choice.pinned, downgraded_by_budget=choice.downgraded_by_budget,
            refused_by_budget=refusal,
        )
        routed = RoutedRequest(
            request=sent, route=route, keys=keys, routed_at=time.time(),
            embedding=encode_vector(vector) if vector is not None else None,
            audit_messages=self._kept_for_audit(request, route) if trimmed.dropped and refusal is None else None,
        )
        return Routed(routed)

    def _kept_for_audit(self, request: LLMRequest, route: Route) -> tuple[ChatMessage, ...] | None:
        """The untrimmed history of a trimmed request whose saving is sampled for audit (the gateway's sampling,
        by the same hash), when carrying it keeps the routed message well under the size limit."""
        s = self.settings
        kind = paid_saving(route)
        if kind is None or not audit_sampled(request.tenant, request.id, kind,
                                             audit_rate(s.audit_rates, kind, s.audit_rate), s.audit_sampling_key()):
            return None
        if 2 * wire_bytes(request) > 0.7 * s.max_message_bytes:
            log.info("trim_audit_skipped_too_large", tenant=request.tenant, request_id=request.id)
            return None
        return request.messages
