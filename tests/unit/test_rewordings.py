"""Synthetic positives for the cross-encoder must never change what is asked (scripts/rewordings.py)."""

from __future__ import annotations

import random

import pytest

from frugalstream.llm.verifier import _negated, _numbers, _tokens
from scripts.rewordings import reword, synthesize_rewordings

QUESTIONS = [
    "How do I top up my card with 20 euros?",
    "Why is my top-up still pending after 3 days?",
    "I cannot verify my identity, what is the reason?",
    "What is the best way to learn Python in 2024?",
    "Can I change the PIN on my card without going to the bank?",
    "It is not possible to transfer money from my e-wallet. What should I do?",
    "How long does a transfer from the UK take to arrive?",
]


@pytest.mark.parametrize("seed", range(200))
def test_rewording_keeps_numbers_and_negation(seed: int) -> None:
    rng = random.Random(seed)
    for text in QUESTIONS:
        new = reword(text, rng)
        if new is None:
            continue
        a, b = _tokens(text), _tokens(new)
        assert _numbers(a) == _numbers(b), (text, new)
        assert _negated(a) == _negated(b), (text, new)


def test_synthesized_pairs_are_positive_and_distinct() -> None:
    pairs = synthesize_rewordings(QUESTIONS * 3, 12, random.Random(7))
    assert len(pairs) == 12
    assert all(label == 1 and a != b for a, b, label in pairs)
    assert all(a in QUESTIONS or b in QUESTIONS for a, b, _ in pairs)


def test_nothing_to_edit_gives_none() -> None:
    assert reword("", random.Random(0)) is None
