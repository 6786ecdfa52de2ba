"""Builds the dedupe decision path (store + verified semantic index) from settings: the service and the
bench use these functions, so the bench measures exactly what production runs."""

from __future__ import annotations

from frugalstream.dedupe.logic import Deduper
from frugalstream.dedupe.semantic import SemanticIndex, SemanticPolicy
from frugalstream.dedupe.store import AnswerStore
from frugalstream.llm import pair_encoder
from frugalstream.llm import verifier as lexical
from frugalstream.llm.embedder import AsyncEmbedder
from frugalstream.llm.verifier import Verifier
from frugalstream.runtime.settings import Settings


def semantic_policy(settings: Settings) -> SemanticPolicy:
    """Per-task thresholds from settings over the chosen verifier's shipped defaults."""
    shipped = pair_encoder if settings.semantic_verifier == "cross_encoder" else lexical
    return SemanticPolicy(
        recall_cosine={"default": shipped.DEFAULT_RECALL_COSINE, **settings.semantic_recall_cosine},
        verify_threshold={"default": shipped.DEFAULT_VERIFY_THRESHOLD, **settings.semantic_verify_threshold},
    )


def build_deduper(settings: Settings, embedder: AsyncEmbedder, verifier: Verifier) -> Deduper:
    store = AnswerStore(settings.cache_max_entries)
    semantic = SemanticIndex(embedder, verifier, semantic_policy(settings), live=lambda exact: exact in store)
    return Deduper(settings, store, semantic=semantic)
