"""One record built to be expensive never holds a stage for seconds: the task rules, the exact key's punctuation
strip, the sentence splitters and the verifier's pair features cost time linear in (or bounded by) the text, and a
pair too long for the verifier to read whole is a miss, never a hit on a truncated comparison.

Sizes are far under max_message_bytes. Where the old code was quadratic, a test times the same work at two sizes:
eight times the text must cost well under 64 times the time (best of three runs, with slack for a noisy box)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from frugalstream.classifier.logic import INLINE_MAX_CHARS, Classifier
from frugalstream.classifier.router import structure_features
from frugalstream.classifier.task_rules import RULE_WINDOW_CHARS, classify_task
from frugalstream.llm import verifier as v
from frugalstream.llm.cache_keys import normalize_text, strip_trailing
from frugalstream.llm.embedder import AsyncEmbedder, HashingEmbedder
from frugalstream.llm.pair_encoder import CrossEncoderVerifier
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, LLMRequest
from tests.unit.test_dedupe import ask, deduper, fill, on_routed, route, sources
from tests.unit.test_pair_encoder import CountingScorer


def best_time(work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def assert_not_quadratic(work: Callable[[int], object], n: int) -> None:
    """`work(8n)` costs under 20x `work(n)` (linear: 8x, quadratic: 64x), plus 50 ms of slack for tiny times."""
    small, large = best_time(lambda: work(n)), best_time(lambda: work(8 * n))
    ratio = large / max(small, 1e-9)
    assert large < 20 * small + 0.05, f"8x the input cost {ratio:.0f}x ({small:.3f}s -> {large:.3f}s)"


def user(text: str) -> LLMRequest:
    return LLMRequest(id="a", tenant="evil", messages=(ChatMessage(role="user", content=text),))


def words(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


# --- task rules --------------------------------------------------------------------------------------------------


def test_the_math_rule_is_linear_on_a_run_of_digits() -> None:
    assert_not_quadratic(lambda n: classify_task(user("1" * n)), 1_000)
    assert classify_task(user("1" * 20_000)).rule != "math"  # a run of digits is no arithmetic
    assert classify_task(user("What is 12 *  3?")).rule == "math"
    assert classify_task(user("So 7^2 it is")).rule == "math"


def test_the_task_rules_read_a_bounded_window_of_a_long_turn() -> None:
    """`SELECT.+FROM` is quadratic in what it reads: a turn of "SELECT SELECT ..." costs the same at 10 KB and 40 KB."""
    small = best_time(lambda: classify_task(user("SELECT " * 1_500)))
    large = best_time(lambda: classify_task(user("SELECT " * 6_000)))
    assert large < 2 * small + 0.05, f"4x the text cost {large / max(small, 1e-9):.0f}x ({small:.3f}s -> {large:.3f}s)"


def test_a_long_turn_is_still_typed_by_the_instruction_at_either_end() -> None:
    document = "The quarterly numbers were flat across regions and nothing much changed at all. " * 500
    assert len(document) > 4 * RULE_WINDOW_CHARS
    assert classify_task(user(document + "\n\nSummarize the text above.")).task_type == "summarization"
    assert classify_task(user("Extract every date from this report:\n" + document)).task_type == "extraction"
    assert classify_task(user(document)).rule == "fallback"  # no window of a long turn reads as a short FAQ


def test_one_small_request_never_stalls_the_classifier_event_loop() -> None:
    """The inline path classifies a batch under INLINE_MAX_CHARS on the loop: 7,900 digits used to stall it."""
    assert INLINE_MAX_CHARS >= 7_900
    gaps: list[float] = []

    async def run(work: Coroutine[Any, Any, object]) -> None:
        done = asyncio.Event()

        async def ticker() -> None:  # the longest the loop went without running it
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        try:
            await work
        finally:
            done.set()
            await task

    classifier = Classifier(Settings(), TokenCounter(), embedder=AsyncEmbedder(HashingEmbedder()))
    try:
        asyncio.run(run(classifier.handle([user("1" * 7_900)])))
    finally:
        classifier.embedder.close()  # type: ignore[union-attr]
    assert max(gaps) < 0.5, f"the classifier's event loop stalled {max(gaps):.2f}s on one 7.9 KB request"


# --- exact key and sentence splitters ----------------------------------------------------------------------------


def test_stripping_trailing_punctuation_is_linear_on_a_run_of_it() -> None:
    assert_not_quadratic(lambda n: normalize_text("." * n + "a"), 2_500)
    assert_not_quadratic(lambda n: normalize_text(". " * n + "a"), 1_250)


@pytest.mark.parametrize(("text", "stripped"), [
    ("what are your hours?!. ", "what are your hours"),
    ("is it fine!", "is it fine"),
    ("compute 10! ", "compute 10!"),
    ("simplify (n+1)!!?", "simplify (n+1)!!"),
    ("what is n!", "what is n!"),
    ("what is n? !", "what is n"),
    ("hours\u00a0.\u2003", "hours"),
    ("...", ""),
    ("", ""),
    ("a.b", "a.b"),
])
def test_the_strip_keeps_its_rules(text: str, stripped: str) -> None:
    assert strip_trailing(text) == stripped


def test_the_sentence_splitters_are_linear_on_a_run_of_marks() -> None:
    assert_not_quadratic(lambda n: v.names("!" * n + "a Alice"), 1_000)
    assert_not_quadratic(lambda n: structure_features(["?" * n + "a"]), 1_000)
    assert v.names("Hi!!! Is Alice here?\nBob") == {"alice"}
    assert structure_features(["One. Two!! Three?"])[0].tolist() == pytest.approx(np.log1p([3, 3, 0, 0]).tolist())


# --- verifier ----------------------------------------------------------------------------------------------------


def test_pair_features_read_a_bounded_number_of_words() -> None:
    assert_not_quadratic(lambda n: v.pair_features(" ".join(words(n)), " ".join(reversed(words(n))), 0.99), 250)


def test_a_pair_longer_than_the_features_read_is_vetoed_not_approved() -> None:
    cap = v.MAX_FEATURE_TOKENS
    body = " ".join(words(cap + 20))
    assert v.pair_features(body + " order 1001?", body + " order 2044?", 0.99)[1] == "too_long"
    assert v.pair_features(body + " is it open?", body + " is it not open?", 0.99)[1] == "too_long"
    assert v.pair_features(" ".join(["x" * 40] * 120), " ".join(["x" * 40] * 120) + " y", 0.99)[1] == "too_long"
    assert v.slot_conflict(body + " order 1001?", body + " order 2044?") == "too_long"
    assert v.pair_features(" ".join(words(cap)), " ".join(words(cap)) + ".", 0.99)[1] == ""  # at the cap: read


def test_both_verifiers_miss_a_long_look_alike_and_still_serve_the_same_long_text() -> None:
    body = " ".join(words(v.MAX_FEATURE_TOKENS + 200))
    query, candidate = f"{body} is order 1001 late?", f"{body} is order 2044 late?"
    scorer = CountingScorer()
    for verifier in (v.TrainedVerifier.load(), CrossEncoderVerifier(scorer, threshold=0.0)):
        assert verifier.verify(query, candidate, 0.999, 0.0).reason == "too_long", type(verifier).__name__
        assert verifier.verify(query, query.upper(), 0.999, 0.0).reason == "exact"
    assert scorer.calls == [], "a pair the rules could not read reached the model"


async def test_one_long_look_alike_is_a_quick_miss_in_dedupe() -> None:
    """A tenant stores one long question, then asks its word-reversed twin: the semantic lookup (one worker thread
    per dedupe instance, shared by every tenant) used to spend seconds in the verifier on it."""
    d = deduper()
    first, twin = await route(ask("a", " ".join(words(2_500)), tenant="evil"),
                              ask("b", " ".join(reversed(words(2_500))), tenant="evil"))
    await fill(d, first)
    start = time.perf_counter()
    outs = await on_routed(d, [twin])
    elapsed = time.perf_counter() - start
    assert sources(outs) == [], "served a 2,500-word question's answer for its reversal"
    assert elapsed < 0.5, f"dedupe spent {elapsed:.2f}s on one ~14 KB request"
