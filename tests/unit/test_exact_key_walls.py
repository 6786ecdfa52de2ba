"""The exact key folds only what cannot change the model's answer: case and punctuation of prose, never the
case of one line of code, a factorial's "!" or a letter that casefolding would turn into others."""

from __future__ import annotations

import pytest

from frugalstream.llm.cache_keys import normalize_text
from tests.unit.test_dedupe import ask, deduper, fill, on_routed, route, sources


async def test_one_line_code_differing_in_a_string_literals_case_never_shares_an_answer() -> None:
    d = deduper(semantic=False)
    lower, upper = await route(ask("a", "What does print('abc'.isupper()) output?"),
                               ask("b", "What does print('ABC'.isupper()) output?"))
    await fill(d, lower, content="It prints False.")
    assert sources(await on_routed(d, [upper])) == [], "served 'False' for 'ABC'.isupper()"


async def test_a_factorial_of_an_expression_is_not_the_expression() -> None:
    d = deduper(semantic=False)
    plain, fact = await route(ask("a", "Simplify (n+1)"), ask("b", "Simplify (n+1)!"))
    await fill(d, plain, content="n+1 is already simplest.")
    assert sources(await on_routed(d, [fact])) == [], "served the answer of (n+1) for (n+1)!"


async def test_casefolding_never_turns_one_word_into_another() -> None:
    d = deduper(semantic=False)
    buses, penance = await route(ask("a", "Was bedeutet das Wort Busse?"), ask("b", "Was bedeutet das Wort Buße?"))
    await fill(d, buses, content="'Busse' ist der Plural von 'Bus'.")
    assert sources(await on_routed(d, [penance])) == [], "served the answer about buses for 'Buße'"


@pytest.mark.parametrize(("first", "second"), [
    ("What does print('ABC'.isupper()) output?", "What does print('abc'.isupper()) output?"),
    ('Is "ABC".lower() == "abc"?', 'is "abc".lower() == "abc"?'),
    ("What does len(X) return?", "what does len(x) return?"),
    ("If X = 1 and x = 2, what is X?", "if x = 1 and x = 2, what is x?"),
    ("Simplify (n+1)!", "Simplify (n+1)"),
    ("What is n!", "What is n"),
    ("Compute 10!", "Compute 10"),
    ("Was bedeutet Buße?", "Was bedeutet Busse?"),
], ids=["literal", "literal-double-quotes", "call", "assignment", "expression-factorial", "letter-factorial",
        "number-factorial", "sharp-s"])
def test_what_the_model_reads_differently_keys_differently(first: str, second: str) -> None:
    assert normalize_text(first) != normalize_text(second)


@pytest.mark.parametrize(("typed", "retyped"), [
    ("What are your business hours?", "what are your business hours"),
    ("WHAT ARE YOUR BUSINESS HOURS!!", "What are your business hours?"),
    ("Don't you ship to Canada?", "don't you ship to canada"),
    ("Wie lange dauert die BUSFAHRT?", "wie lange dauert die busfahrt"),
    ("Is 3.5 > 3?", "is 3.5 > 3"),
], ids=["question-mark", "shouted", "apostrophes-are-no-literal", "umlaut-free-upper", "number"])
def test_retyping_prose_still_asks_the_same_question(typed: str, retyped: str) -> None:
    assert normalize_text(typed) == normalize_text(retyped)
