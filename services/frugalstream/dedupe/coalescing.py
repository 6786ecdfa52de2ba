"""In-flight coalescing: leaders dispatched, followers waiting for them, and the coalescing timeout.

A request joins an in-flight twin only when the twin's answer could serve it from cache: the same exact key
(whose scope holds the pin) and a tier at or below the leader's. A leader that fails releases its followers at
once, each dispatched on its own; followers of a slow leader are dispatched on their own after the timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from frugalstream.dedupe.results import identity
from frugalstream.schemas import LLMResponse, RoutedRequest


@dataclass
class Waiter:
    routed: RoutedRequest
    since: float
    partition: int

    @property
    def key(self) -> str:
        return identity(self.routed)


@dataclass(frozen=True)
class Leader:
    """A dispatched request others may wait for: its answer can serve its exact key at or below its tier."""

    key: str  # identity of the leader
    exact: str
    tier_rank: int
    since: float
    partition: int


#: What an answer releases: its leader record, its request's embedding and its followers.
Released = tuple[Leader | None, str | None, list[Waiter]]


def serves(leader: LLMResponse) -> bool:
    """A model answer (text or tool calls) a follower can take as its own; an error or nothing cannot."""
    return (leader.ok and leader.source == "llm" and bool(leader.model)
            and (leader.content is not None or bool(leader.tool_calls)))


@dataclass
class Coalescer:
    timeout_s: float
    inflight: dict[str, Leader] = field(default_factory=dict)       # exact key -> the leader new twins join
    leading: dict[str, Leader] = field(default_factory=dict)        # leader identity -> its record
    waiters: dict[str, list[Waiter]] = field(default_factory=dict)  # leader identity -> followers
    held: dict[str, str] = field(default_factory=dict)              # follower identity -> leader identity
    vectors: dict[str, str] = field(default_factory=dict)           # leader identity -> embedding of its request
    #: leader identity -> what its answer released, kept until that answer's outputs are acknowledged
    releasing: dict[str, Released] = field(default_factory=dict)

    def busy(self, key: str) -> bool:
        """True while `key` leads or waits: seen again, it is neither looked up nor coalesced."""
        return key in self.leading or key in self.held

    def waiter(self, key: str) -> Waiter | None:
        """The held follower `key`, if it waits."""
        leader = self.held.get(key)
        return next((w for w in self.waiters.get(leader, ()) if w.key == key), None) if leader is not None else None

    def join(self, routed: RoutedRequest, partition: int, now: float) -> Waiter | None:
        """The follower `routed` became, or None when no twin in flight can serve it."""
        leader = self.inflight.get(routed.keys.exact)
        if leader is None or routed.keys.tier_rank > leader.tier_rank:
            return None
        waiter = Waiter(routed, now, partition)
        self.waiters.setdefault(leader.key, []).append(waiter)
        self.held[identity(routed)] = leader.key
        return waiter

    def join_or_lead(self, routed: RoutedRequest, partition: int, now: float) -> Waiter | None:
        """The follower `routed` became, or None when it leads (to be dispatched)."""
        if (waiter := self.join(routed, partition, now)) is not None:
            return waiter
        key = identity(routed)
        # No twin in flight, or only one routed lower (its answer could not serve this request): this one
        # leads, and as the higher tier it can serve every later twin.
        lead = Leader(key, routed.keys.exact, routed.keys.tier_rank, now, partition)
        self.inflight[routed.keys.exact] = lead
        self.leading[key] = lead
        if routed.embedding is not None:
            self.vectors[key] = routed.embedding  # the answer's cache entry reuses it
        return None

    def answered(self, key: str) -> Released:
        """`key` got its answer (or error): it leads no more. Returns its leader record, its request's embedding
        and its followers, released here. Leaders are found by identity: an error response carries no keys, and
        an answer under the leader's identity may be to another question (an id reused with other content), so
        the caller compares the answer's exact key with the leader's before serving or indexing by it.

        What is released stays in `releasing` until `released(key)`: if the answer's outputs are not
        acknowledged, the answer is redelivered and must find its followers again (they are neither waiting
        for the timeout meanwhile, nor forgotten)."""
        if key in self.releasing:
            return self.releasing[key]
        lead = self.leading.pop(key, None)
        if lead is not None and self.inflight.get(lead.exact) == lead:
            del self.inflight[lead.exact]
        followers = self.waiters.pop(key, [])
        for waiter in followers:
            self.held.pop(waiter.key, None)
        found = lead, self.vectors.pop(key, None), followers
        if lead is not None or followers:
            self.releasing[key] = found
        return found

    def released(self, key: str) -> None:
        """The outputs of `key`'s answer are acknowledged: what it released is forgotten."""
        self.releasing.pop(key, None)

    def expire(self, now: float) -> list[Waiter]:
        """Followers that waited past the timeout, released to be dispatched on their own. A leader older than
        the timeout stops taking followers (they would only wait it out); it stays known by identity until its
        answer (or error) arrives, so a re-routing of it is still never answered from cache."""
        late_all: list[Waiter] = []
        for leader, waiters in list(self.waiters.items()):
            late = [w for w in waiters if now - w.since >= self.timeout_s]
            if not late:
                continue
            self.waiters[leader] = [w for w in waiters if w not in late]
            if not self.waiters[leader]:
                del self.waiters[leader]
            for w in late:
                self.held.pop(w.key, None)
            late_all.extend(late)
        for exact, lead in list(self.inflight.items()):
            if now - lead.since >= self.timeout_s:
                del self.inflight[exact]
        return late_all

    def forget_partitions(self, partitions: set[int]) -> None:
        """Drops the leaders and followers of partitions handed to another owner, which resumes the followers
        from `llm.dedupe.waiting` (so they are dropped here, not dispatched)."""
        for leader, waiters in list(self.waiters.items()):
            kept = [w for w in waiters if w.partition not in partitions]
            for w in waiters:
                if w.partition in partitions:
                    self.held.pop(w.key, None)
            if kept:
                self.waiters[leader] = kept
            else:
                del self.waiters[leader]
        for key, (lead, vector, followers) in list(self.releasing.items()):
            kept = [w for w in followers if w.partition not in partitions]
            if lead.partition in partitions if lead is not None else not kept:
                del self.releasing[key]  # its answer is redelivered to the partition's new owner
            else:
                self.releasing[key] = (lead, vector, kept)
        for lead in [lead for lead in self.leading.values() if lead.partition in partitions]:
            self.leading.pop(lead.key, None)
            self.vectors.pop(lead.key, None)
            if self.inflight.get(lead.exact) == lead:
                del self.inflight[lead.exact]
