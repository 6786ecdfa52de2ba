"""Verifier rules, features and the shipped artifact, on hand-written pairs (no embedding model needed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

from frugalstream.llm import verifier as v
from frugalstream.tools.evals.pair_eval import evaluate_pairs, qqp_split


@pytest.fixture(scope="module")
def ver() -> v.TrainedVerifier:
    return v.TrainedVerifier.load()


def test_normalize_text_folds_case_width_space_and_trailing_punct() -> None:
    assert v.normalize_text("  What ARE your\tbusiness   hours?? ") == "what are your business hours"
    assert v.normalize_text("ＡＢＣ  def.") == "abc def"
    assert v.normalize_text("Is 3.5 > 3?") == "is 3.5 > 3"


def test_artifact_loads_and_matches_module_defaults(ver: v.TrainedVerifier) -> None:
    assert v.ARTIFACT_PATH.stat().st_size < 2_000_000
    assert ver.recall_cosine == pytest.approx(v.DEFAULT_RECALL_COSINE)
    assert ver.threshold == pytest.approx(v.DEFAULT_VERIFY_THRESHOLD)


def test_identical_text_is_a_hit(ver: v.TrainedVerifier) -> None:
    d = ver.verify("What are your business hours?", "what are your business hours", 1.0, v.DEFAULT_VERIFY_THRESHOLD)
    assert d.hit and d.score == 1.0
    assert ver.score("How do I reset my password?", "How do I reset my password?", 1.0) == 1.0


def test_swapped_direction_is_a_miss(ver: v.TrainedVerifier) -> None:
    d = ver.verify("flights from Paris to London", "flights from London to Paris", 0.99, v.DEFAULT_VERIFY_THRESHOLD)
    assert not d.hit and d.reason == "order"


def test_swapped_entities_in_a_sentence_is_a_miss(ver: v.TrainedVerifier) -> None:
    d = ver.verify("Is Google buying Fitbit?", "Is Fitbit buying Google?", 0.97, v.DEFAULT_VERIFY_THRESHOLD)
    assert not d.hit


def test_symmetric_coordination_is_not_an_order_veto() -> None:
    _, reason = v.pair_features(
        "difference between a connotation and a denotation", "difference between a denotation and a connotation", 0.98
    )
    assert reason == ""


def test_number_mismatch_is_a_miss(ver: v.TrainedVerifier) -> None:
    d = ver.verify("How do I lose 10 kg in 2 months?", "How do I lose 10 kg in 3 months?", 0.98, 0.0)
    assert not d.hit and d.reason == "number_mismatch"
    d = ver.verify("Is a 2 year warranty included?", "Is a two year warranty included?", 0.97, 0.0)
    assert d.reason != "number_mismatch"


def test_negation_mismatch_is_a_miss(ver: v.TrainedVerifier) -> None:
    d = ver.verify("Why does my card work abroad?", "Why doesn't my card work abroad?", 0.96, 0.0)
    assert not d.hit and d.reason == "negation"
    assert v.pair_features("Why can't I log in?", "Why cannot I log in?", 0.99)[1] == ""


def test_close_paraphrase_scores_above_unrelated(ver: v.TrainedVerifier) -> None:
    para = ver.score("How can I learn Python quickly?", "What is the fastest way to learn Python?", 0.90)
    other = ver.score("How can I learn Python quickly?", "How can I learn Java quickly?", 0.80)
    assert para > other


def test_score_batch_matches_single_scores(ver: v.TrainedVerifier) -> None:
    pairs = [
        ("a b c d", "a b c d", 1.0),
        ("where is my card", "when will my card arrive", 0.8),
        ("price of 2 tickets", "price of 3 tickets", 0.95),
    ]
    batch = ver.score_batch(pairs)
    assert batch.shape == (3,)
    assert np.allclose(batch, [ver.score(*p) for p in pairs])
    assert batch[2] == 0.0
    assert ver.score_batch([]).shape == (0,)


def test_features_have_declared_width() -> None:
    feats, _ = v.pair_features("x y z", "z y x", 0.5)
    assert len(feats) == len(v.FEATURE_NAMES)


def test_evaluate_pairs_counts_gate_verifier_and_baseline(ver: v.TrainedVerifier) -> None:
    vecs = {"a": [1.0, 0.0], "a2": [1.0, 0.0], "b": [0.0, 1.0], "swap": [1.0, 0.01]}
    pairs = [("a", "a2", 1), ("a", "b", 0), ("a", "swap", 0)]

    class Fake:
        def score_batch(self, ps: Sequence[tuple[str, str, float]]) -> npt.NDArray[np.float64]:
            return np.array([0.0 if c == "swap" else 1.0 for _, c, _ in ps], dtype=np.float64)

    r = evaluate_pairs(pairs, lambda ts: np.array([vecs[t] for t in ts]), Fake(), 0.8, 0.5)
    assert (r["hits"], r["precision"], r["recall"], r["false_hit_rate"]) == (1, 1.0, 1.0, 0.0)
    assert r["baseline"]["hits"] == 2 and r["baseline"]["false_hit_rate"] == 0.5


def test_qqp_split_never_shares_a_question_across_splits() -> None:
    rows = [{"text_a": f"q{i}", "text_b": f"q{i + 1}"} for i in range(0, 40, 2)]
    rows += [{"text_a": "q0", "text_b": "q39"}]
    split = qqp_split(rows)
    seen: dict[str, str] = {}
    for r, s in zip(rows, split, strict=True):
        for t in (r["text_a"], r["text_b"]):
            assert seen.setdefault(t, s) == s


def test_a_fronted_clause_is_left_to_the_model_but_a_swap_is_vetoed() -> None:
    fronted = v.pair_features("Which currencies do you accept for adding money?",
                            "For adding money, which currencies do you accept?", 0.98)[1]
    swapped = v.pair_features("Which currencies do you accept for adding money?",
                            "Which money do you add for accepting currencies?", 0.95)[1]
    assert fronted == ""
    assert swapped == "order"
