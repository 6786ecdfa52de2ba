"""Dedupe decisions on batches: exact hit, verified semantic hit, coalesce, or dispatch.

Order of checks per request: exact key (no embedding needed), then the semantic matcher within the scope
(only for task types where a reworded request wants the same answer), then in-flight coalescing. Misses go
to `llm.requests.dispatch`. The store fills itself from `llm.responses`, which is keyed like the routed
topic, so a scope's answers arrive at the instance that owns the scope.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from schemas import CacheEntry, LLMResponse, RoutedRequest, Strategy
from schemas import topics as t
from services.core.messaging import Out
from services.core.outputs import cache_usage, response_outs
from services.core.settings import Settings
from services.dedupe.store import AnswerStore


@dataclass(frozen=True)
class SemanticHit:
    entry: CacheEntry
    similarity: float


class SemanticMatcher(Protocol):
    async def match(self, requests: Sequence[RoutedRequest]) -> list[SemanticHit | None]: ...
    async def add(self, entries: Sequence[CacheEntry]) -> None: ...
    def drop_scopes(self, keep: Callable[[str], bool]) -> int: ...


@dataclass
class Waiter:
    routed: RoutedRequest
    since: float
    partition: int

    def held(self) -> Out:
        """Waiting is state: it goes to a compacted topic, so a crash or a rebalance cannot lose the request."""
        return Out(t.DEDUPE_WAITING, self.routed, key=self.routed.request.id, partition=self.partition)

    def released(self) -> Out:
        return Out(t.DEDUPE_WAITING, None, key=self.routed.request.id, partition=self.partition)


@dataclass
class Deduper:
    settings: Settings
    store: AnswerStore
    semantic: SemanticMatcher | None = None
    inflight: dict[str, str] = field(default_factory=dict)          # exact key -> leader request id
    waiters: dict[str, list[Waiter]] = field(default_factory=dict)  # leader request id -> followers
    stats: dict[str, int] = field(default_factory=lambda: {"exact": 0, "semantic": 0, "coalesced": 0, "miss": 0})
    vectors: dict[str, str] = field(default_factory=dict)           # exact key -> embedding of a dispatched request
    scope_partition: dict[str, int] = field(default_factory=dict)   # scope -> partition it lives on
    answered: OrderedDict[str, None] = field(default_factory=OrderedDict)  # recent request ids with an answer
    answered_max: int = 500_000

    def ttl_for(self, task_type: str | None) -> int:
        return self.settings.cache_ttl_s.get(task_type or "", self.settings.cache_ttl_s.get("default", 86400))

    async def on_routed(self, batch: Sequence[RoutedRequest], partitions: Sequence[int] | None = None) -> list[Out]:
        outs: list[Out] = []
        pending: list[RoutedRequest] = []
        partition_of = {r.request.id: p for r, p in zip(batch, partitions or [0] * len(batch), strict=True)}
        for routed in batch:
            if routed.request.id in self.answered:
                continue  # a redelivered or re-routed request that already has its terminal answer
            if routed.request.cache.policy != "default":
                outs.append(self._dispatch(routed))  # no-cache and no-store skip the lookup
                continue
            entry = self.store.get(routed.keys.exact, routed.keys.tier_rank, routed.request.cache.ttl_s)
            if entry is not None:
                outs.extend(self._answer(routed, entry, "cache_exact", 1.0))
            else:
                pending.append(routed)
        semantic_ok = [r for r in pending if r.route.task_type in self.settings.semantic_task_types]
        hits: list[SemanticHit | None] = []
        if self.semantic is not None and semantic_ok:
            hits = await self.semantic.match(semantic_ok)
        else:
            semantic_ok = []
        by_id = {r.request.id: h for r, h in zip(semantic_ok, hits, strict=True)}
        for routed in pending:
            hit = by_id.get(routed.request.id)
            if hit is not None:
                outs.extend(self._answer(routed, hit.entry, "cache_semantic", hit.similarity))
            else:
                outs.extend(self._coalesce_or_dispatch(routed, partition_of[routed.request.id]))
        return outs

    def _coalesce_or_dispatch(self, routed: RoutedRequest, partition: int) -> list[Out]:
        leader = self.inflight.get(routed.keys.exact)
        if leader is not None and leader != routed.request.id:
            if any(w.routed.request.id == routed.request.id for w in self.waiters.get(leader, ())):
                return []  # re-routed while it waits: it is already held, and will be answered once
            waiter = Waiter(routed, time.time(), partition)
            self.waiters.setdefault(leader, []).append(waiter)
            self.stats["coalesced"] += 1
            return [waiter.held()]
        self.inflight[routed.keys.exact] = routed.request.id
        if routed.embedding is not None and routed.request.cache.policy != "no-store":
            self.vectors[routed.keys.exact] = routed.embedding  # the answer's cache entry reuses it
        return [self._dispatch(routed)]

    def _dispatch(self, routed: RoutedRequest) -> Out:
        self.stats["miss"] += 1
        return Out(t.DISPATCH, routed, key=routed.keys.scope)

    def _answer(self, routed: RoutedRequest, entry: CacheEntry, strategy: Strategy, similarity: float) -> list[Out]:
        if strategy != "coalesced":
            self.stats["exact" if strategy == "cache_exact" else "semantic"] += 1
        self.mark_answered(routed.request.id)
        response = LLMResponse(
            request_id=routed.request.id, tenant=routed.request.tenant, source=strategy, content=entry.content,
            model=entry.model, tier=routed.route.tier, task_type=routed.route.task_type, finish_reason="stop",
            usage=None, served_from=entry.request_id, similarity=round(similarity, 4), keys=routed.keys,
            simulated=entry.simulated, created_at=routed.request.created_at, responded_at=time.time(),
        )
        usage = cache_usage(routed, entry.output_tokens, strategy, simulated=entry.simulated)
        outs = response_outs(response, routed.request, routed.keys.scope)
        return [*outs, Out(t.USAGE, usage, key=routed.request.tenant)]

    async def on_responses(self, batch: Sequence[tuple[LLMResponse, int]]) -> list[Out]:
        """Fills the store from model answers and releases the requests that waited for them.

        Each new entry also goes to the compacted `llm.cache` topic, on the partition its answer came from,
        so whoever owns that partition after a restart or rebalance can rebuild the shard from it.
        """
        outs: list[Out] = []
        fresh: list[CacheEntry] = []
        for response, partition in batch:
            self.mark_answered(response.request_id)
            if response.source != "llm" or response.keys is None:
                continue
            self.inflight.pop(response.keys.exact, None)
            vector = self.vectors.pop(response.keys.exact, None)
            entry = None
            if response.cacheable and response.content is not None and response.model is not None:
                now = time.time()
                entry = CacheEntry(
                    keys=response.keys, request_id=response.request_id, tenant=response.tenant,
                    content=response.content, model=response.model,
                    output_tokens=response.usage.output_tokens if response.usage else 0,
                    task_type=response.task_type, stored_at=now, expires_at=now + self.ttl_for(response.task_type),
                    simulated=response.simulated, embedding=vector,
                )
                if self.store.put(entry):
                    fresh.append(entry)
                    self.scope_partition[entry.keys.scope] = partition
                    outs.append(Out(t.CACHE, entry, key=f"{entry.keys.scope}:{entry.keys.exact}", partition=partition))
            for waiter in self.waiters.pop(response.request_id, []):
                outs.append(waiter.released())
                if entry is not None or (response.ok and response.content is not None and response.model):
                    served = entry or _entry_from(response)
                    outs.extend(self._answer(waiter.routed, served, "coalesced", 1.0))
                else:
                    outs.append(self._dispatch(waiter.routed))  # the leader failed: each follower tries itself
        if fresh and self.semantic is not None:
            await self.semantic.add(fresh)
        return outs

    async def load(self, entries: Iterable[tuple[CacheEntry, int]]) -> int:
        """Rebuilds from `llm.cache`: expired entries are skipped, the semantic index is filled in one batch."""
        now = time.time()
        fresh: list[CacheEntry] = []
        for entry, partition in entries:
            self.mark_answered(entry.request_id)
            if entry.expires_at is not None and entry.expires_at <= now:
                continue
            if self.store.put(entry):
                fresh.append(entry)
                self.scope_partition[entry.keys.scope] = partition
        if fresh and self.semantic is not None:
            await self.semantic.add(fresh)
        return len(fresh)

    def mark_answered(self, request_id: str) -> None:
        """Every request gets one terminal answer: ids seen answered (by us, the gateway, or in a rebuilt
        entry) are never answered again, whatever a redelivery or a re-routing brings back."""
        self.answered[request_id] = None
        self.answered.move_to_end(request_id)
        if len(self.answered) > self.answered_max:
            self.answered.popitem(last=False)

    def forget_partitions(self, partitions: set[int]) -> int:
        """Drops what belongs to partitions this instance no longer owns; their new owner rebuilds them."""
        scopes = {s for s, p in self.scope_partition.items() if p in partitions}
        if not scopes:
            return 0
        dropped = self.store.drop_scopes(scopes)
        if self.semantic is not None:
            self.semantic.drop_scopes(lambda scope: scope not in scopes)
        for s in scopes:
            del self.scope_partition[s]
        return dropped

    def expire_waiters(self, now: float | None = None) -> list[Out]:
        """Followers that waited longer than the coalescing timeout are dispatched on their own."""
        now = time.time() if now is None else now
        outs: list[Out] = []
        for leader, waiters in list(self.waiters.items()):
            late = [w for w in waiters if now - w.since >= self.settings.coalesce_timeout_s]
            if not late:
                continue
            self.waiters[leader] = [w for w in waiters if w not in late]
            if not self.waiters[leader]:
                del self.waiters[leader]
            outs.extend(self._dispatch(w.routed) for w in late)
            outs.extend(w.released() for w in late)
        return outs

    async def restore_waiters(self, held: Sequence[tuple[RoutedRequest, int]]) -> list[Out]:
        """Requests that were waiting when their previous owner stopped: served from cache now, coalesced
        again, or dispatched. Whatever no longer waits is released from the waiting topic."""
        if not held:
            return []
        outs = await self.on_routed([r for r, _ in held], [p for _, p in held])
        waiting = {w.routed.request.id for ws in self.waiters.values() for w in ws}
        outs.extend(Out(t.DEDUPE_WAITING, None, key=r.request.id, partition=p)
                    for r, p in held if r.request.id not in waiting)
        return outs


def _entry_from(response: LLMResponse) -> CacheEntry:
    assert response.keys is not None and response.content is not None and response.model is not None
    return CacheEntry(
        keys=response.keys, request_id=response.request_id, tenant=response.tenant, content=response.content,
        model=response.model, output_tokens=response.usage.output_tokens if response.usage else 0,
        task_type=response.task_type, stored_at=time.time(), simulated=response.simulated,
    )
