"""Verified semantic matching: FAISS shards per (scope, earlier turns), a recall threshold, then the verifier.

A shard holds the answers of one scope whose earlier turns are identical, so a multi-turn request can only
match a conversation with exactly the same history, and scope is a hard wall by construction. Shards are
flat (exact) indexes while small and become HNSW past `hnsw_threshold`. All FAISS and verifier work runs on
one worker thread, batched across the messages of a Kafka batch, never on the event loop. A periodic sweep
(on that thread too) rebuilds the shards that hold expired or evicted entries, so the index stays bounded.

A request the verifier did not serve may still be served by its shard's answer clusters (`answer_clusters`).
A request that misses keeps its near misses, the free audit labels of each path: the verifier's best rejected
candidate and the cluster vote that fell short of its threshold.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import faiss
import numpy as np
import numpy.typing as npt

from frugalstream.dedupe.answer_clusters import AnswerClusters, ClusterModel
from frugalstream.dedupe.lookup import SemanticHit
from frugalstream.llm.embedder import DIM, AsyncEmbedder, decode_vector
from frugalstream.llm.thresholds import ThresholdBook
from frugalstream.llm.verifier import Verifier, slot_conflict
from frugalstream.schemas import CacheEntry, RoutedRequest

Vectors = npt.NDArray[np.float32]
Nears = tuple[SemanticHit, ...]  # a missed request's near misses: at most one per path


@dataclass(frozen=True)
class SemanticPolicy:
    """Per task type: cosine below which the verifier is not even asked, and the verifier's threshold."""

    recall_cosine: Mapping[str, float]
    verify_threshold: Mapping[str, float]
    candidates: int = 4  # nearest neighbours searched (some may be expired, evicted or of a lower tier)
    verify_candidates: int = 2  # servable ones sent to the verifier: the model is the expensive step
    live: ThresholdBook | None = None  # per-tenant thresholds from `llm.thresholds` (audit calibration)
    answer_clusters: ClusterModel | None = None  # the answer-cluster path's model; None turns the path off
    cluster_threshold: float | None = None  # its confidence threshold; None: the model's tuned one
    cluster_task_types: tuple[str, ...] = ()  # task types the cluster path serves
    # A vote short of the threshold but at least this confident is a near miss (a free label). Lower votes are
    # right too rarely to ever support a 1% false-hit threshold, and each label costs the audit judge's CPU.
    cluster_near_floor: float = 0.9

    def recall(self, task: str | None) -> float:
        return self.recall_cosine.get(task or "", self.recall_cosine["default"])

    def threshold(self, task: str | None, tenant: str | None = None) -> float:
        """The tenant's live threshold for the task (moved by audits, see `llm.thresholds`), else the setting."""
        live = self.live.get(tenant, task, "semantic_verify") if (self.live is not None and tenant) else None
        return live if live is not None else self.verify_threshold.get(task or "", self.verify_threshold["default"])

    def cluster_limit(self, task: str | None, tenant: str | None = None) -> float | None:
        """The answer-cluster confidence a request of this task type needs (the tenant's live threshold, moved
        by audits, else the setting, else the model's), or None when the path is off."""
        if self.answer_clusters is None or (task or "") not in self.cluster_task_types:
            return None
        live = self.live.get(tenant, task, "answer_cluster") if (self.live is not None and tenant) else None
        if live is not None:
            return live
        return self.cluster_threshold if self.cluster_threshold is not None else self.answer_clusters.threshold


@dataclass
class Shard:
    """One FAISS index over the entries of a (scope, prefix), ids = positions in `entries`; its answer clusters."""

    hnsw_threshold: int
    entries: list[CacheEntry] = field(default_factory=list)
    vectors: list[Vectors] = field(default_factory=list)
    index: faiss.Index = field(default_factory=lambda: faiss.IndexFlatIP(DIM))
    is_hnsw: bool = False
    clusters: AnswerClusters = field(default_factory=AnswerClusters)

    def add(self, entry: CacheEntry, vector: Vectors) -> None:
        self.clusters.add(len(self.entries), entry.content, vector)
        self.entries.append(entry)
        self.vectors.append(vector)
        self.index.add(vector.reshape(1, DIM))
        if not self.is_hnsw and len(self.entries) > self.hnsw_threshold:
            self._to_hnsw()

    @classmethod
    def of(cls, hnsw_threshold: int, entries: list[CacheEntry], vectors: list[Vectors]) -> Shard:
        """A shard over the given entries, built in one go (flat or HNSW by size)."""
        shard = cls(hnsw_threshold, entries=entries, vectors=vectors)
        for position, (entry, vector) in enumerate(zip(entries, vectors, strict=True)):
            shard.clusters.add(position, entry.content, vector)
        if len(entries) > hnsw_threshold:
            shard._to_hnsw()
        elif entries:
            shard.index.add(np.stack(vectors))
        return shard

    def _to_hnsw(self) -> None:
        index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 64
        index.add(np.stack(self.vectors))
        self.index, self.is_hnsw = index, True

    def search(self, queries: Vectors, k: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        scores, ids = self.index.search(queries, min(k, len(self.entries)))
        return scores, ids


def carried_vector(text: str | None) -> Vectors | None:
    """The vector a record carries, or None when it is none to use (absent, not base64 float16, another size, not
    finite, zero): its text is embedded instead. Raising would fail the batch, and on `llm.cache` every rebuild
    of the partition holding it, which then stayed unhandled for good."""
    if text is None:
        return None
    try:
        vector = decode_vector(text)
    except ValueError:  # binascii.Error is one
        return None
    return vector if vector.shape == (DIM,) and np.isfinite(vector).all() and vector.any() else None


def shard_key(entry_scope: str, prefix: str) -> str:
    return f"{entry_scope}/{prefix}"


class SemanticIndex:
    """The semantic half of the dedupe cache, shards keyed by scope and conversation prefix."""

    def __init__(self, embedder: AsyncEmbedder, verifier: Verifier, policy: SemanticPolicy, *,
                 hnsw_threshold: int = 20_000, clock: Callable[[], float] = time.time,
                 live: Callable[[str], bool] = lambda _exact: True) -> None:
        self._embedder = embedder
        self._verifier = verifier
        self._policy = policy
        self._hnsw_threshold = hnsw_threshold
        self._clock = clock
        self._live = live  # evicted from the answer store means no longer servable
        self._shards: dict[str, Shard] = {}
        #: Per request of the last `match` that missed: its near misses, one per path at most (free audit labels).
        self.near_misses: list[Nears] = []
        # One thread: FAISS and the verifier never run on the event loop, and never race each other.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semantic")
        faiss.omp_set_num_threads(1)

    def __len__(self) -> int:
        return sum(len(s.entries) for s in self._shards.values())

    async def _vectors(self, texts: Sequence[str], carried: Sequence[str | None]) -> Vectors:
        """Uses the embedding a request or entry carries when it is one (`carried_vector`); embeds the rest in
        one batch."""
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        vectors = [carried_vector(c) for c in carried]
        missing = [i for i, v in enumerate(vectors) if v is None]
        for i, v in enumerate(vectors):
            if v is not None:
                out[i] = v
        if missing:
            out[missing] = await self._embedder.embed([texts[i] for i in missing])
        return out

    async def add(self, entries: Sequence[CacheEntry]) -> None:
        """Indexes the entries a lookup may find: one whose lookup text was cut (`lookup_truncated`) is only ever
        an exact hit, since what its embedding and the verifier would read is not the whole question."""
        entries = [e for e in entries if not e.keys.lookup_truncated]
        if not entries:
            return
        vectors = await self._vectors([e.keys.lookup_text for e in entries], [e.embedding for e in entries])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self.add_vectors, list(entries), vectors)

    def add_vectors(self, entries: list[CacheEntry], vectors: Vectors) -> None:
        """Blocking: call from the worker thread (as `add` does) or from a benchmark."""
        for entry, vector in zip(entries, vectors, strict=True):
            key = shard_key(entry.keys.scope, entry.keys.prefix)
            shard = self._shards.get(key)
            if shard is None:
                shard = self._shards[key] = Shard(self._hnsw_threshold)
            shard.add(entry, vector)

    def drop_scopes(self, keep: Callable[[str], bool]) -> int:
        """Forgets shards whose scope this instance no longer owns (after a rebalance)."""
        doomed = [k for k in self._shards if not keep(k.split("/", 1)[0])]
        for k in doomed:
            del self._shards[k]
        return len(doomed)

    async def sweep(self, now: float | None = None) -> int:
        """Rebuilds, on the worker thread, the shards that hold expired or evicted entries."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.sweep_shards, now)

    def sweep_shards(self, now: float | None = None) -> int:
        """Blocking: call from the worker thread (as `sweep` does). Keeps, per shard, the entries still in the
        answer store and not expired (the latest one per exact key); an emptied shard is dropped. Returns how
        many entries left the index."""
        now = self._clock() if now is None else now
        removed = 0
        for key, shard in list(self._shards.items()):
            latest: dict[str, int] = {}
            for i, entry in enumerate(shard.entries):
                if (entry.expires_at is not None and entry.expires_at <= now) or not self._live(entry.keys.exact):
                    continue
                latest[entry.keys.exact] = i  # a later entry for the same key replaced the earlier one
            if len(latest) == len(shard.entries):
                continue
            if self._shards.get(key) is not shard:
                continue  # dropped meanwhile (a rebalance)
            removed += len(shard.entries) - len(latest)
            if not latest:
                del self._shards[key]
                continue
            kept = sorted(latest.values())
            self._shards[key] = Shard.of(self._hnsw_threshold, [shard.entries[i] for i in kept],
                                         [shard.vectors[i] for i in kept])
        return removed

    def shard_sizes(self) -> dict[str, int]:
        return {k: len(s.entries) for k, s in self._shards.items()}

    async def match(self, requests: Sequence[RoutedRequest]) -> list[SemanticHit | None]:
        if not requests:
            return []
        vectors = await self._vectors([r.keys.lookup_text for r in requests], [r.embedding for r in requests])
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.match_vectors, list(requests), vectors)

    async def match_with_near(self, requests: Sequence[RoutedRequest],
                              ) -> tuple[list[SemanticHit | None], list[Nears]]:
        """`match`, plus each missed request's near misses (read on the worker thread)."""
        if not requests:
            return [], []
        vectors = await self._vectors([r.keys.lookup_text for r in requests], [r.embedding for r in requests])

        def run() -> tuple[list[SemanticHit | None], list[Nears]]:
            return self.match_vectors(list(requests), vectors), list(self.near_misses)

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    def match_vectors(self, requests: list[RoutedRequest], vectors: Vectors) -> list[SemanticHit | None]:
        """Blocking: call from the worker thread (as `match` does) or from a benchmark.

        The nearest servable candidates of every request (up to `verify_candidates`) go to the verifier in
        one batch; each request takes its most similar accepted candidate. A request still without a hit may
        be served by its shard's answer clusters; the rest misses.
        """
        by_shard: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_shard.setdefault(shard_key(r.keys.scope, r.keys.prefix), []).append(i)
        now = self._clock()
        asks: list[tuple[int, CacheEntry, float]] = []
        for key, rows in by_shard.items():
            shard = self._shards.get(key)
            if shard is None or not shard.entries:
                continue
            scores, ids = shard.search(vectors[rows], self._policy.candidates)
            for row, request_scores, request_ids in zip(rows, scores, ids, strict=True):
                asks += [(row, entry, cos) for entry, cos in
                         self._servable(requests[row], shard, request_scores, request_ids, now)]
        out: list[SemanticHit | None] = [None] * len(requests)
        near: list[list[SemanticHit]] = [[] for _ in requests]
        limits = [self._policy.threshold(requests[row].route.task_type, requests[row].request.tenant)
                  for row, _, _ in asks]
        decisions = self._verifier.verify_batch([
            (requests[row].keys.lookup_text, entry.keys.lookup_text, cos, limit)
            for (row, entry, cos), limit in zip(asks, limits, strict=True)
        ]) if asks else []
        for (row, entry, cos), decision, limit in zip(asks, decisions, limits, strict=True):
            if decision.hit and out[row] is None:
                out[row] = SemanticHit(entry, cos, decision.score, limit)
            elif not decision.hit and (not near[row] or decision.score > (near[row][0].score or 0.0)):
                near[row] = [SemanticHit(entry, cos, decision.score, limit)]  # the best rejected candidate
        self._cluster_hits(requests, vectors, by_shard, out, near, now)
        self.near_misses = [tuple(n) if out[i] is None else () for i, n in enumerate(near)]  # a hit is no near miss
        return out

    def _cluster_hits(self, requests: list[RoutedRequest], vectors: Vectors, by_shard: dict[str, list[int]],
                      out: list[SemanticHit | None], near: list[list[SemanticHit]], now: float) -> None:
        """The second path, for requests without a verifier hit: when the model is confident enough in the winning
        answer cluster, its most similar servable member serves (no recall cosine: the cluster is the evidence).
        A vote short of the threshold but above `cluster_near_floor` is the path's near miss."""
        if (model := self._policy.answer_clusters) is None:
            return
        for key, rows in by_shard.items():
            shard = self._shards.get(key)
            asked = [(row, limit) for row in rows if out[row] is None and (limit := self._policy.cluster_limit(
                requests[row].route.task_type, requests[row].request.tenant)) is not None]
            if shard is None or not asked or not len(shard.clusters):
                continue
            sims = shard.clusters.similarities(vectors[[row for row, _ in asked]])
            for (row, limit), row_sims in zip(asked, sims, strict=True):
                vote = shard.clusters.vote(row_sims, model)
                if vote is None or vote.confidence < min(limit, self._policy.cluster_near_floor):
                    continue
                # The cluster vouches for the meaning, not for the slots: a member naming another order, date
                # or person (or negated) never serves, whatever the vote.
                query = requests[row].keys.lookup_text
                served = next(((shard.entries[i], cos) for i, cos in shard.clusters.members(vote)
                               if self._may_serve(requests[row], shard.entries[i], now)
                               and not slot_conflict(query, shard.entries[i].keys.lookup_text)), None)
                if served is None:
                    continue
                hit = SemanticHit(*served, vote.confidence, limit, rule="answer_cluster")
                if vote.confidence >= limit:
                    out[row] = hit
                else:
                    near[row].append(hit)

    def _servable(self, request: RoutedRequest, shard: Shard, scores: npt.NDArray[np.float32],
                  ids: npt.NDArray[np.int64], now: float) -> list[tuple[CacheEntry, float]]:
        """Candidates above the recall cosine that may serve this request, most similar first."""
        recall = self._policy.recall(request.route.task_type)
        out: list[tuple[CacheEntry, float]] = []
        for score, idx in zip(scores, ids, strict=True):
            if idx < 0 or float(score) < recall:
                break  # results are sorted: nothing further is close enough
            entry = shard.entries[int(idx)]
            if self._may_serve(request, entry, now):
                out.append((entry, float(score)))
            if len(out) == self._policy.verify_candidates:
                break
        return out

    def _may_serve(self, request: RoutedRequest, entry: CacheEntry, now: float) -> bool:
        """Never a cheaper tier's answer for a request routed higher; evicted, expired or too old never serve."""
        max_age = request.request.cache.ttl_s
        return (entry.keys.tier_rank >= request.keys.tier_rank and self._live(entry.keys.exact)
                and (entry.expires_at is None or entry.expires_at > now)
                and (max_age is None or now - entry.stored_at <= max_age))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
