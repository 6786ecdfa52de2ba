"""Dedupe decisions on batches: exact hit, verified semantic hit, coalesce, or dispatch.

Order of checks per request: exact key (no embedding needed), then the semantic matcher within the scope
(only for task types where a reworded request wants the same answer), then in-flight coalescing. Misses go
to `llm.requests.dispatch`. The store fills itself from `llm.responses`, which is keyed like the routed
topic, so a scope's answers arrive at the instance that owns the scope.

Identity is (tenant, request id) everywhere here (`request_key`): the answered-id memory, the leaders in
flight, the waiters and the `llm.dedupe.waiting` keys. Two tenants using the same id never meet through it.

Coalescing joins a request to an in-flight twin only when the twin's answer could serve it from cache: the
same exact key (whose scope holds the pin) and a tier at or below the leader's. A follower is answered from
the leader's response itself (content, tool calls and finish reason as the leader got them: a truncated
leader gives truncated followers, `finish_reason="length"`, since the follower asked the same thing under the
same `max_tokens`). A leader that fails releases its followers at once, each dispatched on its own.

Sampling above temperature 0 is a different answer each time: unless the tenant's policy sets
`cache_sampled`, such a request is never looked up, never coalesced, and its answer is never stored. The
classifier already marks it `no-store` (the gateway then answers `cacheable=False`); this module remembers
the identities it dispatched that way and refuses to store their answers too, in case it did not.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from frugalstream.dedupe.store import AnswerStore
from frugalstream.llm.identity import request_key
from frugalstream.llm.usage import cache_usage
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.records import Out
from frugalstream.runtime.replies import response_outs
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import CacheEntry, LLMResponse, RoutedRequest, Strategy
from frugalstream.schemas import topics as t

log = get_logger(__name__)


@dataclass(frozen=True)
class SemanticHit:
    entry: CacheEntry
    similarity: float


class SemanticMatcher(Protocol):
    async def match(self, requests: Sequence[RoutedRequest]) -> list[SemanticHit | None]: ...
    async def add(self, entries: Sequence[CacheEntry]) -> None: ...
    def drop_scopes(self, keep: Callable[[str], bool]) -> int: ...
    async def sweep(self, now: float | None = None) -> int: ...


def identity(routed: RoutedRequest) -> str:
    return request_key(routed.request.tenant, routed.request.id)


@dataclass
class Waiter:
    routed: RoutedRequest
    since: float
    partition: int

    @property
    def key(self) -> str:
        return identity(self.routed)

    def held(self) -> Out:
        """Waiting is state: it goes to a compacted topic, so a crash or a rebalance cannot lose the request."""
        return Out(t.DEDUPE_WAITING, self.routed, key=self.key, partition=self.partition)

    def released(self) -> Out:
        return Out(t.DEDUPE_WAITING, None, key=self.key, partition=self.partition)


@dataclass(frozen=True)
class Leader:
    """A dispatched request others may wait for: its answer can serve its exact key at or below its tier."""

    key: str  # request_key of the leader
    exact: str
    tier_rank: int
    since: float
    partition: int


def _serves(leader: LLMResponse) -> bool:
    """A model answer (text or tool calls) a follower can take as its own; an error or nothing cannot."""
    return (leader.ok and leader.source == "llm" and bool(leader.model)
            and (leader.content is not None or bool(leader.tool_calls)))


class _BoundedSet:
    """Insertion-ordered set that forgets its oldest members past `limit`."""

    def __init__(self, limit: int) -> None:
        self._items: OrderedDict[str, None] = OrderedDict()
        self.limit = limit

    def add(self, item: str) -> None:
        self._items[item] = None
        self._items.move_to_end(item)
        if len(self._items) > self.limit:
            self._items.popitem(last=False)

    def discard(self, item: str) -> bool:
        """Removes `item`; True when it was there."""
        if item not in self._items:
            return False
        del self._items[item]
        return True

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Deduper:
    settings: Settings
    store: AnswerStore
    semantic: SemanticMatcher | None = None
    inflight: dict[str, Leader] = field(default_factory=dict)       # exact key -> the leader new twins join
    leading: dict[str, Leader] = field(default_factory=dict)        # leader identity -> its record
    waiters: dict[str, list[Waiter]] = field(default_factory=dict)  # leader identity -> followers
    held: dict[str, str] = field(default_factory=dict)              # follower identity -> leader identity
    stats: dict[str, int] = field(default_factory=lambda: {"exact": 0, "semantic": 0, "coalesced": 0, "miss": 0})
    vectors: dict[str, str] = field(default_factory=dict)           # leader identity -> embedding of its request
    scope_partition: dict[str, int] = field(default_factory=dict)   # scope -> partition it lives on
    answered_max: int = 500_000
    answered: _BoundedSet = field(init=False)  # identities with a terminal answer
    unstored: _BoundedSet = field(init=False)  # identities dispatched whose answer must not be stored

    def __post_init__(self) -> None:
        self.answered = _BoundedSet(self.answered_max)
        self.unstored = _BoundedSet(self.answered_max)

    def ttl_for(self, task_type: str | None) -> int:
        return self.settings.cache_ttl_s.get(task_type or "", self.settings.cache_ttl_s.get("default", 86400))

    def may_cache(self, routed: RoutedRequest) -> bool:
        """False for an answer sampled above temperature 0 unless the tenant's policy opts in to caching it."""
        temperature = routed.request.sampling.temperature
        if temperature is None or temperature <= 0:
            return True
        return self.settings.tenants.get(routed.request.tenant, TenantPolicy()).cache_sampled

    async def on_routed(self, batch: Sequence[RoutedRequest], partitions: Sequence[int] | None = None) -> list[Out]:
        """Decides every request of the batch. State is only changed after the last await: if the semantic
        matcher fails, the batch is retried with nothing marked answered that was not published."""
        outs: list[Out] = []
        pending: list[tuple[RoutedRequest, int]] = []
        answered_now: list[str] = []
        seen: set[str] = set()
        for routed, partition in zip(batch, partitions or [0] * len(batch), strict=True):
            key = identity(routed)
            if key in self.answered or key in seen:
                continue  # a redelivered or re-routed request that already has its terminal answer
            seen.add(key)
            if not self.may_cache(routed):
                self.unstored.add(key)
                outs.append(self._dispatch(routed))  # sampled: neither looked up, coalesced nor stored
                continue
            if routed.request.cache.policy != "default" or key in self.leading or key in self.held:
                outs.append(self._pass_on(routed))  # no-cache / no-store skip the lookup
                continue
            entry = self.store.get(routed.keys.exact, routed.keys.tier_rank, routed.request.cache.ttl_s)
            if entry is not None:
                outs.extend(self._answer(routed, entry, "cache_exact", 1.0))
                answered_now.append(key)
            else:
                pending.append((routed, partition))
        semantic_ok = [i for i, (r, _) in enumerate(pending) if r.route.task_type in self.settings.semantic_task_types]
        hit_of: dict[int, SemanticHit | None] = {}
        if self.semantic is not None and semantic_ok:
            hits = await self.semantic.match([pending[i][0] for i in semantic_ok])
            hit_of = dict(zip(semantic_ok, hits, strict=True))
        for i, (routed, partition) in enumerate(pending):
            hit = hit_of.get(i)
            if hit is not None:
                outs.extend(self._answer(routed, hit.entry, "cache_semantic", hit.similarity))
                answered_now.append(identity(routed))
            else:
                outs.extend(self._coalesce_or_dispatch(routed, partition))
        for key in answered_now:
            self.answered.add(key)
        return outs

    def _pass_on(self, routed: RoutedRequest) -> Out:
        """A request that skips the lookup, or one seen again while it leads or waits (a retried batch, a
        re-routing): a leader is dispatched again (the gateway's paid-once record answers it), a follower's
        identical held record is written again; neither gets an answer here."""
        key = identity(routed)
        leader = self.held.get(key)
        if leader is not None:
            for waiter in self.waiters.get(leader, ()):
                if waiter.key == key:
                    return waiter.held()
        return self._dispatch(routed)

    def _coalesce_or_dispatch(self, routed: RoutedRequest, partition: int) -> list[Out]:
        key = identity(routed)
        leader = self.inflight.get(routed.keys.exact)
        if leader is not None and routed.keys.tier_rank <= leader.tier_rank:
            waiter = Waiter(routed, time.time(), partition)
            self.waiters.setdefault(leader.key, []).append(waiter)
            self.held[key] = leader.key
            self.stats["coalesced"] += 1
            return [waiter.held()]
        # No twin in flight, or only one routed lower (its answer could not serve this request): this one
        # leads, and as the higher tier it can serve every later twin.
        lead = Leader(key, routed.keys.exact, routed.keys.tier_rank, time.time(), partition)
        self.inflight[routed.keys.exact] = lead
        self.leading[key] = lead
        if routed.embedding is not None:
            self.vectors[key] = routed.embedding  # the answer's cache entry reuses it
        return [self._dispatch(routed)]

    def _dispatch(self, routed: RoutedRequest) -> Out:
        self.stats["miss"] += 1
        return Out(t.DISPATCH, routed, key=routed.keys.scope)

    def _answer(self, routed: RoutedRequest, entry: CacheEntry, strategy: Strategy, similarity: float) -> list[Out]:
        self.stats["exact" if strategy == "cache_exact" else "semantic"] += 1
        response = LLMResponse(
            request_id=routed.request.id, tenant=routed.request.tenant, source=strategy, content=entry.content,
            model=entry.model, tier=routed.route.tier, task_type=routed.route.task_type, finish_reason="stop",
            usage=None, served_from=_served_from(routed, entry.tenant, entry.request_id),
            similarity=round(similarity, 4), keys=routed.keys,
            simulated=entry.simulated, created_at=routed.request.created_at, responded_at=time.time(),
        )
        usage = cache_usage(routed, entry.output_tokens, strategy, simulated=entry.simulated)
        outs = response_outs(response, routed.request, routed.keys.scope)
        return [*outs, Out(t.USAGE, usage, key=routed.request.tenant)]

    def _follow(self, routed: RoutedRequest, leader: LLMResponse) -> list[Out]:
        """A follower's answer is the leader's response as the model gave it: text, tool calls, finish reason."""
        response = LLMResponse(
            request_id=routed.request.id, tenant=routed.request.tenant, source="coalesced",
            content=leader.content, tool_calls=leader.tool_calls, model=leader.model, tier=routed.route.tier,
            task_type=routed.route.task_type, finish_reason=leader.finish_reason, usage=None,
            served_from=_served_from(routed, leader.tenant, leader.request_id), similarity=1.0, keys=routed.keys,
            simulated=leader.simulated, created_at=routed.request.created_at, responded_at=time.time(),
        )
        output = leader.usage.output_tokens if leader.usage else 0
        usage = cache_usage(routed, output, "coalesced", simulated=leader.simulated)
        outs = response_outs(response, routed.request, routed.keys.scope)
        return [*outs, Out(t.USAGE, usage, key=routed.request.tenant)]

    async def on_responses(self, batch: Sequence[tuple[LLMResponse, int]]) -> list[Out]:
        """Fills the store from model answers and releases the requests that waited for them.

        Each new entry also goes to the compacted `llm.cache` topic, on the partition its answer came from,
        so whoever owns that partition after a restart or rebalance can rebuild the shard from it. Leaders are
        found by identity: an error response carries no keys.
        """
        outs: list[Out] = []
        fresh: list[CacheEntry] = []
        for response, partition in batch:
            key = request_key(response.tenant, response.request_id)
            self.answered.add(key)
            lead = self.leading.pop(key, None)
            if lead is not None and self.inflight.get(lead.exact) == lead:
                del self.inflight[lead.exact]
            vector = self.vectors.pop(key, None)
            storable = not self.unstored.discard(key)
            entry = self._entry(response, vector) if storable else None
            if entry is not None and self.store.put(entry):
                fresh.append(entry)
                self.scope_partition[entry.keys.scope] = partition
                outs.append(Out(t.CACHE, entry, key=f"{entry.keys.scope}:{entry.keys.exact}", partition=partition))
            for waiter in self.waiters.pop(key, []):
                self.held.pop(waiter.key, None)
                outs.append(waiter.released())
                if waiter.key in self.answered:
                    continue  # answered another way meanwhile (the timeout dispatched it, say)
                if _serves(response):
                    outs.extend(self._follow(waiter.routed, response))
                    self.answered.add(waiter.key)
                else:
                    outs.append(self._dispatch(waiter.routed))  # the leader failed: each follower tries itself
        if fresh and self.semantic is not None:
            try:
                await self.semantic.add(fresh)
            except Exception:  # the entries are stored and on `llm.cache`; only semantic recall is missing
                log.exception("semantic_add_failed", entries=len(fresh))
        return outs

    def _entry(self, response: LLMResponse, vector: str | None) -> CacheEntry | None:
        if (response.source != "llm" or response.keys is None or not response.cacheable
                or response.content is None or response.model is None):
            return None
        now = time.time()
        return CacheEntry(
            keys=response.keys, request_id=response.request_id, tenant=response.tenant,
            content=response.content, model=response.model,
            output_tokens=response.usage.output_tokens if response.usage else 0,
            task_type=response.task_type, stored_at=now, expires_at=now + self.ttl_for(response.task_type),
            simulated=response.simulated, embedding=vector,
        )

    async def load(self, entries: Iterable[tuple[CacheEntry, int]]) -> int:
        """Rebuilds from `llm.cache`: expired entries are skipped, the semantic index is filled in one batch."""
        now = time.time()
        fresh: list[CacheEntry] = []
        for entry, partition in entries:
            self.mark_answered(entry.tenant, entry.request_id)
            if entry.expires_at is not None and entry.expires_at <= now:
                continue
            if self.store.put(entry):
                fresh.append(entry)
                self.scope_partition[entry.keys.scope] = partition
        if fresh and self.semantic is not None:
            await self.semantic.add(fresh)
        return len(fresh)

    def mark_answered(self, tenant: str, request_id: str) -> None:
        """Every request gets one terminal answer: identities seen answered (by us, the gateway, or in a rebuilt
        entry) are never answered again, whatever a redelivery or a re-routing brings back."""
        self.answered.add(request_key(tenant, request_id))

    def forget_partitions(self, partitions: set[int]) -> int:
        """Drops what belongs to partitions this instance no longer owns; their new owner rebuilds them (and
        resumes their waiting requests from `llm.dedupe.waiting`, so they are dropped here, not dispatched)."""
        for leader, waiters in list(self.waiters.items()):
            kept = [w for w in waiters if w.partition not in partitions]
            for w in waiters:
                if w.partition in partitions:
                    self.held.pop(w.key, None)
            if kept:
                self.waiters[leader] = kept
            else:
                del self.waiters[leader]
        for lead in [lead for lead in self.leading.values() if lead.partition in partitions]:
            self._drop_leader(lead)
        scopes = {s for s, p in self.scope_partition.items() if p in partitions}
        if not scopes:
            return 0
        dropped = self.store.drop_scopes(scopes)
        if self.semantic is not None:
            self.semantic.drop_scopes(lambda scope: scope not in scopes)
        for s in scopes:
            del self.scope_partition[s]
        return dropped

    def _drop_leader(self, lead: Leader) -> None:
        self.leading.pop(lead.key, None)
        self.vectors.pop(lead.key, None)
        if self.inflight.get(lead.exact) == lead:
            del self.inflight[lead.exact]

    def expire_waiters(self, now: float | None = None) -> list[Out]:
        """Followers that waited longer than the coalescing timeout are dispatched on their own. A leader
        older than the timeout stops taking followers (they would only wait it out); it stays known by identity
        until its answer (or error) arrives, so a re-routing of it is still never answered from cache."""
        now = time.time() if now is None else now
        timeout = self.settings.coalesce_timeout_s
        outs: list[Out] = []
        for leader, waiters in list(self.waiters.items()):
            late = [w for w in waiters if now - w.since >= timeout]
            if not late:
                continue
            self.waiters[leader] = [w for w in waiters if w not in late]
            if not self.waiters[leader]:
                del self.waiters[leader]
            for w in late:
                self.held.pop(w.key, None)
            outs.extend(self._dispatch(w.routed) for w in late)
            outs.extend(w.released() for w in late)
        for exact, lead in list(self.inflight.items()):
            if now - lead.since >= timeout:
                del self.inflight[exact]
        return outs

    async def sweep(self, now: float | None = None) -> tuple[int, int]:
        """Bounded state: expired entries leave the answer store, then expired and evicted ones leave the
        semantic shards (rebuilt on the semantic worker thread). Returns (store, shard) entries dropped."""
        dropped = self.store.sweep(now)
        removed = await self.semantic.sweep(now) if self.semantic is not None else 0
        return dropped, removed

    async def restore_waiters(self, held: Sequence[tuple[RoutedRequest, int]]) -> list[Out]:
        """Requests that were waiting when their previous owner stopped: served from cache now, coalesced
        again, or dispatched. Whatever no longer waits is released from the waiting topic."""
        if not held:
            return []
        outs = await self.on_routed([r for r, _ in held], [p for _, p in held])
        outs.extend(Out(t.DEDUPE_WAITING, None, key=identity(r), partition=p)
                    for r, p in held if identity(r) not in self.held)
        return outs


def _served_from(routed: RoutedRequest, tenant: str, request_id: str) -> str | None:
    """Another tenant's request id (a shared scope) is not this tenant's business."""
    return request_id if tenant == routed.request.tenant else None
