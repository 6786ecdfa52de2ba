"""Builds the dedupe decision path (store + verified semantic index) from settings: the service and the
bench use these functions, so the bench measures exactly what production runs."""

from __future__ import annotations

from collections.abc import Sequence

from frugalstream.dedupe.answer_clusters import shipped_model
from frugalstream.dedupe.logic import Deduper
from frugalstream.dedupe.semantic import SemanticIndex, SemanticPolicy
from frugalstream.dedupe.store import AnswerStore
from frugalstream.llm import pair_encoder
from frugalstream.llm import verifier as lexical
from frugalstream.llm.embedder import AsyncEmbedder
from frugalstream.llm.thresholds import ThresholdBook
from frugalstream.llm.verifier import Verifier, VerifierDecision
from frugalstream.runtime.metrics import METRICS, Metrics
from frugalstream.runtime.settings import Settings


class CountingVerifier:
    """Counts every verifier decision (accept, reject, veto) as it passes: the semantic index stays unaware of
    metrics, and whichever verifier the settings chose is counted the same way."""

    def __init__(self, inner: Verifier, metrics: Metrics = METRICS) -> None:
        self.inner = inner
        self.metrics = metrics

    def verify(self, query: str, candidate: str, cosine: float, threshold: float) -> VerifierDecision:
        return self.verify_batch([(query, candidate, cosine, threshold)])[0]

    def verify_batch(self, pairs: Sequence[tuple[str, str, float, float]]) -> list[VerifierDecision]:
        decisions = self.inner.verify_batch(pairs)
        for decision in decisions:
            self.metrics.record_verdict(decision.hit, decision.reason)
        return decisions


def semantic_policy(settings: Settings, live: ThresholdBook | None = None) -> SemanticPolicy:
    """Per-task thresholds from settings over the chosen verifier's shipped defaults; `live` holds the
    per-tenant ones audits moved (`llm.thresholds`), consulted first. The answer-cluster path serves the
    semantic task types unless `semantic_answer_clusters` is off."""
    if settings.semantic_verifier == "cross_encoder":
        recall_cosine, threshold = pair_encoder.shipped_thresholds(settings.model_precision)
    else:
        recall_cosine, threshold = lexical.DEFAULT_RECALL_COSINE, lexical.DEFAULT_VERIFY_THRESHOLD
    return SemanticPolicy(
        recall_cosine={"default": recall_cosine, **settings.semantic_recall_cosine},
        verify_threshold={"default": threshold, **settings.semantic_verify_threshold},
        live=live,
        answer_clusters=shipped_model() if settings.semantic_answer_clusters else None,
        cluster_threshold=settings.answer_cluster_threshold,
        cluster_task_types=tuple(settings.semantic_task_types),
    )


def build_deduper(settings: Settings, embedder: AsyncEmbedder, verifier: Verifier) -> Deduper:
    store = AnswerStore(settings.cache_max_entries)
    book = ThresholdBook()
    semantic = SemanticIndex(embedder, CountingVerifier(verifier), semantic_policy(settings, book),
                             live=lambda exact: exact in store)
    return Deduper(settings, store, semantic=semantic, thresholds=book)
