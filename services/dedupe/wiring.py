"""Builds the dedupe decision path (store + verified semantic index) from settings: the service and the
bench use this one function, so the bench measures exactly what production runs."""

from __future__ import annotations

from services.core.embedder import AsyncEmbedder
from services.core.settings import Settings
from services.dedupe.logic import Deduper
from services.dedupe.semantic import SemanticIndex, SemanticPolicy
from services.dedupe.store import AnswerStore
from services.dedupe.verifier import DEFAULT_RECALL_COSINE, DEFAULT_VERIFY_THRESHOLD, TrainedVerifier


def semantic_policy(settings: Settings) -> SemanticPolicy:
    return SemanticPolicy(
        recall_cosine={"default": DEFAULT_RECALL_COSINE, **settings.semantic_recall_cosine},
        verify_threshold={"default": DEFAULT_VERIFY_THRESHOLD, **settings.semantic_verify_threshold},
    )


def build_deduper(settings: Settings, embedder: AsyncEmbedder) -> Deduper:
    store = AnswerStore(settings.cache_max_entries)
    semantic = SemanticIndex(embedder, TrainedVerifier.load(), semantic_policy(settings),
                             live=lambda exact: exact in store)
    return Deduper(settings, store, semantic=semantic)
