"""A long prompt's routed message is not twice its size: the keys carry at most `LOOKUP_TEXT_MAX` characters of the
last user turn (before, a one-turn prompt over half the message limit was accepted and then answered `too_large`).
A cut lookup text never makes a semantic hit nor a semantic candidate: two questions that share their first
8,192 characters are not the same question. Exact hits are unaffected (the exact key reads the whole turn)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.dedupe.lookup import Lookup, SemanticHit
from frugalstream.dedupe.semantic import SemanticIndex
from frugalstream.dedupe.store import AnswerStore
from frugalstream.dedupe.wiring import semantic_policy
from frugalstream.llm.cache_keys import LOOKUP_TEXT_MAX, cache_keys
from frugalstream.llm.embedder import AsyncEmbedder, HashingEmbedder
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import CacheEntry, ChatMessage, LLMRequest, RoutedRequest
from frugalstream.schemas._base import wire_bytes
from tests.unit.test_answer_belongs import entry
from tests.unit.test_answer_clusters import RejectAll

SETTINGS = Settings()


def ask(rid: str, text: str) -> LLMRequest:
    return LLMRequest(id=rid, tenant="acme", messages=(ChatMessage(role="user", content=text),))


async def test_a_prompt_over_half_the_message_limit_is_routed_within_it() -> None:
    text = "Please review this contract clause by clause. " * (int(0.6 * SETTINGS.max_message_bytes) // 47)
    [result] = await Classifier(SETTINGS, TokenCounter()).handle([ask("r1", text)])
    assert isinstance(result, Routed)
    assert wire_bytes(result.routed) < SETTINGS.max_message_bytes
    assert result.routed.keys.lookup_truncated and len(result.routed.keys.lookup_text) == LOOKUP_TEXT_MAX


def test_keys_of_turns_that_differ_after_the_cut_share_a_lookup_text_but_never_an_exact_key() -> None:
    head = "x " * LOOKUP_TEXT_MAX
    a = cache_keys(ask("a", head + "refund order 1"), "small")
    b = cache_keys(ask("b", head + "cancel order 2"), "small")
    assert a.lookup_text == b.lookup_text and a.lookup_truncated and b.lookup_truncated
    assert a.exact != b.exact
    short = cache_keys(ask("c", "When do you open?"), "small")
    assert not short.lookup_truncated and "lookup_truncated" not in short.model_dump_json()  # old readers still read it


class Recording:
    """A semantic matcher that would serve anything it is asked about, and records what it was asked and given."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def match(self, requests: Sequence[RoutedRequest]) -> list[SemanticHit | None]:
        self.asked.extend(r.request.id for r in requests)
        return [None for _ in requests]

    async def add(self, entries: Sequence[CacheEntry]) -> None:
        return None

    def drop_scopes(self, keep: Callable[[str], bool]) -> int:
        return 0

    async def sweep(self, now: float | None = None) -> int:
        return 0


async def test_a_request_whose_lookup_text_was_cut_is_never_looked_up_semantically() -> None:
    settings = Settings()
    matcher = Recording()
    lookup = Lookup(settings, AnswerStore(100), matcher)
    classifier = Classifier(settings, TokenCounter())
    results = await classifier.handle([ask("long", "What are your opening hours? " * 400), ask("short", "Hours?")])
    routed = [r.routed for r in results if isinstance(r, Routed)]
    routed = [r.model_copy(update={"route": r.route.model_copy(update={"task_type": "faq"})}) for r in routed]
    await lookup.similar(routed)
    assert matcher.asked == ["short"]


async def test_an_answer_whose_lookup_text_was_cut_is_never_indexed_for_semantic_lookups() -> None:
    index = SemanticIndex(AsyncEmbedder(HashingEmbedder()), RejectAll(), semantic_policy(SETTINGS))
    try:
        await index.add([entry("long", "What are your opening hours? " * 400, "9 to 5"),
                         entry("short", "When do you open?", "9 to 5")])
        assert len(index) == 1
    finally:
        index.close()
