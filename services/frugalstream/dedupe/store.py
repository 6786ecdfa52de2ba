"""In-memory answer store with TTLs and a memory bound that evicts the cheapest-to-recompute entries first."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from frugalstream.schemas import CacheEntry


@dataclass
class Slot:
    entry: CacheEntry
    hits: int = 0
    last_hit: float = 0.0


class AnswerStore:
    """Entries keyed by exact key (which already embeds scope and prefix)."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self._slots: dict[str, Slot] = {}
        self._max = max_entries
        self._clock = clock
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[CacheEntry]:
        return (s.entry for s in self._slots.values())

    def put(self, entry: CacheEntry) -> bool:
        """Keeps the entry from the highest tier: it can serve every tier at or below it."""
        current = self._slots.get(entry.keys.exact)
        if current is not None and current.entry.keys.tier_rank > entry.keys.tier_rank:
            return False
        self._slots[entry.keys.exact] = Slot(entry, last_hit=self._clock())
        if len(self._slots) > self._max:
            self._evict()
        return True

    def get(self, exact: str, tier_rank: int, max_age_s: float | None = None) -> CacheEntry | None:
        slot = self._slots.get(exact)
        if slot is None:
            return None
        now = self._clock()
        entry = slot.entry
        if entry.expires_at is not None and entry.expires_at <= now:
            del self._slots[exact]
            return None
        if entry.keys.tier_rank < tier_rank:
            return None  # a cheaper tier's answer never serves a request routed higher
        if max_age_s is not None and now - entry.stored_at > max_age_s:
            return None
        slot.hits += 1
        slot.last_hit = now
        return entry

    def discard(self, exact: str) -> None:
        self._slots.pop(exact, None)

    def __contains__(self, exact: object) -> bool:
        return exact in self._slots

    def drop_scopes(self, scopes: set[str]) -> int:
        doomed = [k for k, s in self._slots.items() if s.entry.keys.scope in scopes]
        for k in doomed:
            del self._slots[k]
        return len(doomed)

    def sweep(self, now: float | None = None) -> int:
        """Drops every expired entry (a `get` only drops the one it was asked for). Returns how many."""
        now = self._clock() if now is None else now
        doomed = [k for k, s in self._slots.items() if s.entry.expires_at is not None and s.entry.expires_at <= now]
        for k in doomed:
            del self._slots[k]
        return len(doomed)

    def _evict(self) -> None:
        """Drops the lowest-value tenth: value = recompute cost x (1 + hits) / (1 + hours idle)."""
        now = self._clock()

        def value(slot: Slot) -> float:
            return slot.entry.cost_weight * (1 + slot.hits) / (1 + (now - slot.last_hit) / 3600)

        victims = sorted(self._slots.items(), key=lambda kv: value(kv[1]))[: max(1, len(self._slots) // 10)]
        for key, _ in victims:
            del self._slots[key]
        self.evicted += len(victims)
