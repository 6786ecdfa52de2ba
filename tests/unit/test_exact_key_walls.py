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


# --- Code keeps its compatibility characters; a run of '!' is kept whole -----------------------------------------

async def test_a_ligature_in_a_string_literal_never_shares_the_answer_of_its_letters() -> None:
    d = deduper(semantic=False)
    letters, ligature = await route(ask("a", "What does print(len('fi')) output?"),
                                    ask("b", "What does print(len('\ufb01')) output?"))
    await fill(d, letters, content="It prints 2.")
    assert sources(await on_routed(d, [ligature])) == [], "served '2' for len('\ufb01'), which is 1"


@pytest.mark.parametrize(("first", "second"), [
    ("What does print(len('fi')) output?", "What does print(len('\ufb01')) output?"),
    ("print(len('ABC'.encode()))", "print(len('\uff21\uff22\uff23'.encode()))"),
    ('x = "\u03bc"; print(x == "\u03bc")', 'x = "\u00b5"; print(x == "\u03bc")'),
], ids=["ligature-len", "fullwidth-bytes", "micro-sign-vs-mu"])
def test_code_computing_on_compatibility_characters_keys_apart(first: str, second: str) -> None:
    assert normalize_text(first) != normalize_text(second)


async def test_a_double_factorial_is_not_a_factorial() -> None:
    d = deduper(semantic=False)
    single, double = await route(ask("a", "What is 5!"), ask("b", "What is 5!!"))
    await fill(d, single, content="5! = 120.")
    assert sources(await on_routed(d, [double])) == [], "served 120 for 5!! (which is 15)"


@pytest.mark.parametrize(("first", "second"), [("What is 5!!", "What is 5!"), ("Simplify (2n)!!", "Simplify (2n)!"),
                                               ("Compute 7!! / 5!!", "Compute 7!! / 5!")],
                         ids=["number", "expression", "quotient"])
def test_a_double_factorial_keys_apart_from_a_factorial(first: str, second: str) -> None:
    assert normalize_text(first) != normalize_text(second)


@pytest.mark.parametrize(("first", "second"), [
    ("Sort these lines:\nZebra\napple", "Sort these lines:\nzebra\napple"),  # case sorts differently
    ("Parse this YAML:\na:\n  b: 1", "Parse this YAML:\na:\nb: 1"),  # indentation is structure
], ids=["case-in-lines", "indentation"])
def test_text_in_lines_keeps_its_case_and_layout_without_reading_as_code(first: str, second: str) -> None:
    assert normalize_text(first) != normalize_text(second)
