"""The classifier embeds a request only when a decision reads the vector (issue 13: less embedding per request)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.llm.embedder import AsyncEmbedder, HashingEmbedder, Vectors
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas.requests import CacheControl, ChatMessage, LLMRequest, SamplingParams


class CountingEmbedder(HashingEmbedder):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.seen.extend(texts)
        return super().embed(texts)


def req(rid: str, text: str, **kw: object) -> LLMRequest:
    return LLMRequest(id=rid, tenant="t", messages=(ChatMessage(role="user", content=text),), **kw)  # type: ignore[arg-type]


FAQ = "What are your business hours?"
CODE = "Write a Python function that reverses a linked list"


@pytest.mark.parametrize(("request_", "embedded"), [
    (req("a", CODE), True),  # the router scores it
    (req("b", CODE, model="gpt-4o"), False),  # pinned and not a semantic task: nothing reads a vector
    (req("c", FAQ, model="gpt-4o"), True),  # pinned, but dedupe looks for a reworded twin
    (req("d", FAQ, model="gpt-4o", sampling=SamplingParams(temperature=0.9)), False),  # sampled: never looked up
    (req("e", FAQ, model="gpt-4o", cache=CacheControl(policy="no-cache")), False),
])
async def test_only_requests_a_decision_reads_are_embedded(request_: LLMRequest, embedded: bool) -> None:
    inner = CountingEmbedder()
    embedder = AsyncEmbedder(inner)
    try:
        classifier = Classifier(Settings(), TokenCounter(), embedder=embedder)
        [result] = await classifier.handle([request_])
    finally:
        embedder.close()
    assert isinstance(result, Routed)
    assert (len(inner.seen) == 1) is embedded
    assert (result.routed.embedding is not None) is embedded


async def test_a_tenant_that_caches_sampled_answers_gets_them_embedded() -> None:
    inner = CountingEmbedder()
    embedder = AsyncEmbedder(inner)
    settings = Settings(tenants={"t": TenantPolicy(cache_sampled=True)})
    try:
        [result] = await Classifier(settings, TokenCounter(), embedder=embedder).handle(
            [req("d", FAQ, model="gpt-4o", sampling=SamplingParams(temperature=0.9))])
    finally:
        embedder.close()
    assert isinstance(result, Routed) and result.routed.embedding is not None


async def test_a_mixed_batch_scores_only_the_embedded_rows() -> None:
    class Scorer:
        def __init__(self) -> None:
            self.rows = 0

        def score(self, embeddings: np.ndarray, texts: Sequence[str]) -> np.ndarray:
            assert not np.isnan(embeddings).any()
            self.rows += len(texts)
            return np.full(len(texts), 0.9, dtype=np.float32)

    scorer = Scorer()
    embedder = AsyncEmbedder(CountingEmbedder())
    try:
        results = await Classifier(Settings(), TokenCounter(), embedder=embedder, scorer=scorer).handle(
            [req("a", CODE), req("b", CODE, model="gpt-4o-mini"), req("c", CODE)])
    finally:
        embedder.close()
    assert scorer.rows == 2
    routed = [r.routed for r in results if isinstance(r, Routed)]
    assert [r.route.escalation_score for r in routed] == [pytest.approx(0.9), None, pytest.approx(0.9)]
