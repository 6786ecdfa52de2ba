"""Cache lookup and fill: the exact store, the verified semantic matcher, and which scopes live on which partition.

Order of checks per request: exact key (no embedding needed), then the semantic matcher within the scope (only
for task types where a reworded request wants the same answer). The store fills itself from `llm.responses`,
which is keyed like the routed topic, so a scope's answers arrive at the instance that owns the scope.

Sampling above temperature 0 is a different answer each time: unless the tenant's policy sets `cache_sampled`,
such a request is never looked up, never coalesced, and its answer is never stored (`may_cache`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from frugalstream.dedupe.store import AnswerStore
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import CacheEntry, LLMResponse, RoutedRequest

log = get_logger(__name__)


@dataclass(frozen=True)
class SemanticHit:
    """A semantic match. `rule` says which path found it: the verifier on the nearest candidates (score and
    threshold are the verifier's) or the shard's answer clusters (the cluster model's confidence and threshold,
    which must never label the verifier's threshold)."""

    entry: CacheEntry
    similarity: float  # cosine between the request and the serving entry's question
    score: float | None = None
    threshold: float | None = None
    rule: Literal["verifier", "answer_cluster"] = "verifier"


class SemanticMatcher(Protocol):
    async def match(self, requests: Sequence[RoutedRequest]) -> list[SemanticHit | None]: ...
    async def add(self, entries: Sequence[CacheEntry]) -> None: ...
    def drop_scopes(self, keep: Callable[[str], bool]) -> int: ...
    async def sweep(self, now: float | None = None) -> int: ...


@runtime_checkable
class NearMatcher(Protocol):
    """A matcher that also names each missed request's near misses, one per lookup path at most (free audit
    labels): the verifier's best rejected candidate, the answer-cluster vote short of its threshold."""

    async def match_with_near(self, requests: Sequence[RoutedRequest],
                              ) -> tuple[list[SemanticHit | None], list[tuple[SemanticHit, ...]]]: ...


@dataclass
class Lookup:
    settings: Settings
    store: AnswerStore
    semantic: SemanticMatcher | None = None
    scope_partition: dict[str, int] = field(default_factory=dict)  # scope -> partition it lives on
    _evicted: int = field(default=0, init=False, repr=False)  # the store's eviction count when last pruned

    def may_cache(self, routed: RoutedRequest) -> bool:
        """False for an answer sampled above temperature 0 unless the tenant's policy opts in to caching it."""
        temperature = routed.request.sampling.temperature
        if temperature is None or temperature <= 0:
            return True
        return self.settings.tenants.get(routed.request.tenant, TenantPolicy()).cache_sampled

    def exact(self, routed: RoutedRequest) -> CacheEntry | None:
        return self.store.get(routed.keys.exact, routed.keys.tier_rank, routed.request.cache.ttl_s)

    async def similar(self, requests: Sequence[RoutedRequest]) -> list[SemanticHit | None]:
        """A verified semantic hit per request, or None (always None for task types that are not semantic)."""
        return (await self.similar_with_near(requests))[0]

    async def similar_with_near(self, requests: Sequence[RoutedRequest],
                                ) -> tuple[list[SemanticHit | None], list[tuple[SemanticHit, ...]]]:
        """`similar`, and per missed request its near misses, when the matcher names them."""
        hits: list[SemanticHit | None] = [None] * len(requests)
        near: list[tuple[SemanticHit, ...]] = [()] * len(requests)
        eligible = [i for i, r in enumerate(requests)
                    if r.route.task_type in self.settings.semantic_task_types and not r.keys.lookup_truncated]
        if self.semantic is not None and eligible:
            asked = [requests[i] for i in eligible]
            if isinstance(self.semantic, NearMatcher):
                found, nears = await self.semantic.match_with_near(asked)
            else:
                found, nears = await self.semantic.match(asked), [()] * len(asked)
            for i, hit, miss in zip(eligible, found, nears, strict=True):
                hits[i], near[i] = hit, miss
        return hits, near

    def entry(self, response: LLMResponse, vector: str | None) -> CacheEntry | None:
        """The cache entry of a model's answer, or None when it is not one to store."""
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

    def ttl_for(self, task_type: str | None) -> int:
        return self.settings.cache_ttl_s.get(task_type or "", self.settings.cache_ttl_s.get("default", 86400))

    def servable(self, entry: CacheEntry) -> bool:
        """False for the simulated provider's answer when the provider is a real one: a deployment tried on the
        simulator, then switched on the same cluster, finds its placeholder answers on `llm.cache` (and from a
        simulated gateway still answering during the switch), which must never reach a real user."""
        return not entry.simulated or self.settings.provider == "simulated"

    def keep(self, entry: CacheEntry, partition: int) -> bool:
        """Stores `entry` of `partition`; False when the store keeps a higher tier's answer instead, or the entry
        may not serve here (`servable`)."""
        if not self.servable(entry) or not self.store.put(entry):
            return False
        self.scope_partition[entry.keys.scope] = partition
        if self.store.evicted != self._evicted:  # an eviction (a tenth of the store) may have emptied scopes
            self._evicted = self.store.evicted
            self._prune_scopes()
        return True

    def _prune_scopes(self) -> None:
        """Forgets the scopes with no entry left in the store: the map stays bounded by the store, however many
        scopes a producer invents (their semantic shards leave at the next sweep, their entries being gone)."""
        live = {entry.keys.scope for entry in self.store}
        for scope in [s for s in self.scope_partition if s not in live]:
            del self.scope_partition[scope]

    async def index(self, fresh: Sequence[CacheEntry]) -> None:
        """Adds new entries to the semantic index. A failure is logged: the entries are stored and on
        `llm.cache`, only semantic recall is missing."""
        if not fresh or self.semantic is None:
            return
        try:
            await self.semantic.add(fresh)
        except Exception:
            log.exception("semantic_add_failed", entries=len(fresh))

    def within_ttl(self, entry: CacheEntry, now: float) -> CacheEntry:
        """`entry` expiring by the TTL its task type has now, from a `stored_at` no later than `now`: one stored
        under a longer TTL (settings change with a restart, which rebuilds from `llm.cache`), under none, or
        stamped ahead of this clock must not be served past what the operator set."""
        stored_at = min(entry.stored_at, now)
        expires_at = stored_at + self.ttl_for(entry.task_type)
        if entry.expires_at is not None:
            expires_at = min(expires_at, entry.expires_at)
        if (stored_at, expires_at) == (entry.stored_at, entry.expires_at):
            return entry
        return entry.model_copy(update={"stored_at": stored_at, "expires_at": expires_at})

    async def load(self, entries: Sequence[tuple[CacheEntry, int]]) -> int:
        """Rebuilds from `llm.cache`: entries past their TTL (`within_ttl`) are skipped, the semantic index is
        filled in one batch."""
        now = time.time()
        fresh = [entry for entry, partition in ((self.within_ttl(e, now), p) for e, p in entries)
                 if entry.expires_at is not None and entry.expires_at > now and self.keep(entry, partition)]
        if fresh and self.semantic is not None:
            await self.semantic.add(fresh)
        return len(fresh)

    def forget_partitions(self, partitions: set[int]) -> int:
        """Drops the scopes of partitions this instance no longer owns; their new owner rebuilds them."""
        scopes = {s for s, p in self.scope_partition.items() if p in partitions}
        if not scopes:
            return 0
        dropped = self.store.drop_scopes(scopes)
        if self.semantic is not None:
            self.semantic.drop_scopes(lambda scope: scope not in scopes)
        for s in scopes:
            del self.scope_partition[s]
        return dropped

    async def sweep(self, now: float | None = None) -> tuple[int, int]:
        """Bounded state: expired entries leave the answer store (and scopes left without entries the scope map),
        then expired and evicted ones leave the semantic shards (rebuilt on the semantic worker thread). Returns
        (store, shard) entries dropped."""
        dropped = self.store.sweep(now)
        self._prune_scopes()
        removed = await self.semantic.sweep(now) if self.semantic is not None else 0
        return dropped, removed
