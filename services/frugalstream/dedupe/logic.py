"""Dedupe decisions on batches: exact hit, verified semantic hit, coalesce, or dispatch.

`Deduper` orchestrates three parts, one job each: `Lookup` (the cache: exact store, verified semantic matcher),
`Coalescer` (leaders in flight, followers waiting, the coalescing timeout) and `AnsweredMemory` (identities with
a terminal answer, and sampled ones whose answer must not be stored). It returns domain results
(`frugalstream.dedupe.results`); the service's app turns them into topics, keys and partitions.

Per request: the answered-id memory first (one terminal answer per identity), then the cache lookup, then
in-flight coalescing; misses are dispatched. Answers fill the cache and release the followers that waited.
A request whose spend a budget refuses (`Route.refused_by_budget`) takes only what costs nothing: a hit, or a
twin already in flight (it never leads, and `AuditSampler` buys no audit for it); where it would be dispatched,
it is answered `budget_exceeded` instead.

What says "answered" or "released" is remembered only once the decisions' outputs are acknowledged: `decide`
returns the decisions with their `Pending` memory changes, which the caller hands to `settle` after the
publish. A publish that fails changes nothing, so the redelivered batch is decided, and answered, again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from frugalstream.dedupe.answered import AnsweredMemory
from frugalstream.dedupe.audit_sampling import AuditSampler
from frugalstream.dedupe.coalescing import Coalescer, serves
from frugalstream.dedupe.lookup import Lookup, SemanticMatcher
from frugalstream.dedupe.results import (
    Answer,
    Decision,
    Dispatch,
    Hold,
    Refusal,
    Release,
    Store,
    cache_answer,
    follower_answer,
    identity,
    refused_answer,
)
from frugalstream.dedupe.store import AnswerStore
from frugalstream.llm.identity import request_key
from frugalstream.llm.thresholds import ThresholdBook
from frugalstream.runtime.metrics import METRICS, Metrics
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import CacheEntry, LLMResponse, RoutedRequest

Routed = tuple[RoutedRequest, int]  # a routed request and the partition it came from
Answered = tuple[LLMResponse, int]  # a response and the partition it came from


@dataclass
class Pending:
    """Memory changes of some decisions, applied by `Deduper.settle` once their outputs are acknowledged."""

    answered: list[str] = field(default_factory=list)  # identities given their terminal answer here
    released: list[str] = field(default_factory=list)  # leaders whose answer released their followers
    stored: list[str] = field(default_factory=list)  # identities whose answer was handled (refusals used up)

    def extend(self, other: Pending) -> None:
        self.answered.extend(other.answered)
        self.released.extend(other.released)
        self.stored.extend(other.stored)


class Deduper:
    """The orchestrator: owns the three parts and the order in which they are asked; counts its decisions."""

    def __init__(self, settings: Settings, store: AnswerStore, semantic: SemanticMatcher | None = None, *,
                 metrics: Metrics = METRICS, answered_max: int = 500_000,
                 thresholds: ThresholdBook | None = None) -> None:
        self.settings = settings
        self.lookup = Lookup(settings, store, semantic)
        self.coalescing = Coalescer(settings.coalesce_timeout_s)
        self.answered = AnsweredMemory(answered_max)
        self.audits = AuditSampler(settings)
        self.thresholds = thresholds if thresholds is not None else ThresholdBook()
        self.metrics = metrics

    @property
    def store(self) -> AnswerStore:
        return self.lookup.store

    async def handle(self, *, answers: Sequence[Answered] = (), requests: Sequence[Routed] = ()) -> list[Decision]:
        """`decide` and `settle` at once, for a caller whose outputs need no acknowledgement."""
        decisions, pending = await self.decide(answers=answers, requests=requests)
        self.settle(pending)
        return decisions

    async def decide(self, *, answers: Sequence[Answered] = (), requests: Sequence[Routed] = (),
                     ) -> tuple[list[Decision], Pending]:
        """The decisions, and what to remember once their outputs are acknowledged (`settle`). Answers first:
        a batch that holds both an answer and a repeat of its question serves the repeat."""
        decisions, done = await self._on_answers(answers) if answers else ([], Pending())
        if requests:
            more, also = await self._on_requests(requests)
            decisions.extend(more)
            done.extend(also)
        return decisions, done

    def settle(self, pending: Pending) -> None:
        """The outputs of `pending`'s decisions are acknowledged: their identities are answered for good, the
        followers their answers released are forgotten, and refusals to store are used up."""
        for key in pending.answered:
            self.answered.mark(key)
        for key in pending.released:
            self.coalescing.released(key)
        for key in pending.stored:
            self.answered.stored(key)

    async def _on_requests(self, batch: Sequence[Routed]) -> tuple[list[Decision], Pending]:
        """Decides every request of the batch but those an answer already decided (`_releasing`). Its hits are
        remembered as answered only when settled: until their answers are acknowledged, a redelivery is served
        again."""
        decisions: list[Decision] = []
        pending: list[Routed] = []
        done = Pending()
        seen = self._releasing()
        for routed, partition in batch:
            key = identity(routed)
            if key in self.answered or key in seen:
                continue  # a redelivered or re-routed request that already has (or is getting) its terminal answer
            seen.add(key)
            if not self.lookup.may_cache(routed):
                self.answered.refuse_store(key)
                decisions.append(self._send(routed, done))  # sampled: neither looked up, coalesced nor stored
                continue
            if routed.request.cache.policy != "default" or self.coalescing.busy(key):
                decisions.append(self._pass_on(routed, done))  # no-cache / no-store skip the lookup
                continue
            entry = self.lookup.exact(routed)
            if entry is not None:
                decisions.append(self._hit(cache_answer(routed, entry, "cache_exact", 1.0)))
                done.answered.append(key)
            else:
                pending.append((routed, partition))
        hits, nears = await self.lookup.similar_with_near([routed for routed, _ in pending])
        now = time.time()
        for (routed, partition), hit, near in zip(pending, hits, nears, strict=True):
            if hit is not None:
                decisions.append(self._hit(cache_answer(routed, hit.entry, "cache_semantic", hit.similarity, hit.rule)))
                decisions.extend(a for a in (self.audits.on_hit(routed, hit),) if a is not None)
                done.answered.append(identity(routed))
                continue
            for candidate in near:
                self.audits.on_near_miss(routed, candidate)
            waiter = (self.coalescing.join(routed, partition, now) if routed.route.refused_by_budget is not None
                      else self.coalescing.join_or_lead(routed, partition, now))
            if waiter is not None:
                self.metrics.record_dedupe("coalesced")
                decisions.append(Hold(routed, waiter.partition))
            else:
                decisions.append(self._send(routed, done))
        return decisions, done

    def _releasing(self) -> set[str]:
        """Followers an answer released (answered or dispatched them) whose outputs are not acknowledged yet:
        in this batch (the answers come first), or in one whose publish failed, whose redelivered answer
        releases them again. Their identity is not `answered` until then, yet a request of one must get no
        second decision (a `cache_exact` from the entry that answer just stored, after its `coalesced` one)."""
        return {w.key for _, _, followers in self.coalescing.releasing.values() for w in followers}

    def _pass_on(self, routed: RoutedRequest, done: Pending) -> Decision:
        """A request that skips the lookup, or one seen again while it leads or waits (a retried batch, a
        re-routing): a leader is dispatched again (the gateway's paid-once record answers it), a follower's
        identical held record is written again; neither gets an answer here. Refused spend is refused (`_send`)."""
        waiter = self.coalescing.waiter(identity(routed))
        return Hold(waiter.routed, waiter.partition) if waiter is not None else self._send(routed, done)

    def _send(self, routed: RoutedRequest, done: Pending) -> Dispatch | Refusal:
        """A request nothing here answers: to the gateway, or, when its spend is refused, its refusal (a terminal
        answer, remembered in `done` like a hit)."""
        if routed.route.refused_by_budget is None:
            return self._dispatch(routed)
        self.metrics.record_dedupe("refused")
        done.answered.append(identity(routed))
        return refused_answer(routed)

    def _dispatch(self, routed: RoutedRequest) -> Dispatch:
        self.metrics.record_dedupe("miss")
        return Dispatch(routed)

    def _hit(self, answer: Answer) -> Answer:
        self.metrics.record_dedupe("exact" if answer.response.source == "cache_exact" else "semantic")
        return answer

    async def _on_answers(self, batch: Sequence[Answered]) -> tuple[list[Decision], Pending]:
        """Fills the store from model answers and releases the requests that waited for them. Each new entry is
        a `Store` on the partition its answer came from, so whoever owns that partition after a restart or
        rebalance can rebuild the shard from it. The followers an answer releases are kept by the coalescer
        until settled: a redelivered answer finds them again."""
        decisions: list[Decision] = []
        fresh: list[CacheEntry] = []
        done = Pending()
        seen: set[str] = set()
        for response, partition in batch:
            key = request_key(response.tenant, response.request_id)
            if key in seen:
                continue  # a copy in the same batch: its followers are released once
            seen.add(key)
            self.answered.mark(key)  # the answer is on `llm.responses` already, whatever happens to ours
            lead, vector, followers = self.coalescing.answered(key)
            done.released.append(key)
            done.stored.append(key)
            # Under a reused id the answer may be to another question: only the leader's own is its answer.
            own = lead is not None and response.keys is not None and response.keys.exact == lead.exact
            decisions.extend(self.audits.on_answer(response))
            entry = (self.lookup.entry(response, vector if own else None)
                     if self.answered.may_store(key) else None)
            if entry is not None and self.lookup.keep(entry, partition):
                fresh.append(entry)
                decisions.append(Store(entry, partition))
            for waiter in followers:
                decisions.append(Release(waiter.key, waiter.partition))
                if waiter.key in self.answered:
                    continue  # answered another way meanwhile (the timeout dispatched it, say)
                if own and serves(response):
                    decisions.append(follower_answer(waiter.routed, response))
                    decisions.extend(a for a in (self.audits.on_follower(waiter.routed, response),) if a is not None)
                    done.answered.append(waiter.key)
                else:
                    decisions.append(self._send(waiter.routed, done))  # the leader failed: each tries itself
        await self.lookup.index(fresh)
        return decisions, done

    def expire_waiters(self, now: float | None = None) -> list[Decision]:
        """Followers that waited longer than the coalescing timeout are dispatched on their own (or refused, when
        their spend is). Their outputs are retried until published, so a refusal is remembered at once."""
        late = self.coalescing.expire(time.time() if now is None else now)
        done = Pending()
        decisions: list[Decision] = [*(self._send(w.routed, done) for w in late),
                                     *(Release(w.key, w.partition) for w in late)]
        self.settle(done)
        return decisions

    async def restore_waiters(self, held: Sequence[Routed]) -> list[Decision]:
        """`resume_waiters` and `settle` at once."""
        decisions, pending = await self.resume_waiters(held)
        self.settle(pending)
        return decisions

    async def resume_waiters(self, held: Sequence[Routed]) -> tuple[list[Decision], Pending]:
        """Requests that were waiting when their previous owner stopped: served from cache now, coalesced
        again, or dispatched. Whatever no longer waits is released."""
        if not held:
            return [], Pending()
        decisions, pending = await self.decide(requests=held)
        decisions.extend(Release(identity(r), p) for r, p in held if identity(r) not in self.coalescing.held)
        return decisions, pending

    async def load(self, entries: Iterable[tuple[CacheEntry, int]]) -> int:
        """Rebuilds from `llm.cache`: every entry's identity is answered, the unexpired ones are stored."""
        entries = list(entries)
        for entry, _ in entries:
            self.mark_answered(entry.tenant, entry.request_id)
        return await self.lookup.load(entries)

    def mark_answered(self, tenant: str, request_id: str) -> None:
        """An identity answered elsewhere (by the gateway, say) is never answered again here."""
        self.answered.mark(request_key(tenant, request_id))

    def forget_partitions(self, partitions: set[int]) -> int:
        """Drops what belongs to partitions this instance no longer owns; their new owner rebuilds them."""
        self.coalescing.forget_partitions(partitions)
        return self.lookup.forget_partitions(partitions)

    async def sweep(self, now: float | None = None) -> tuple[int, int]:
        return await self.lookup.sweep(now)
