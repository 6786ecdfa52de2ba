"""The cross-encoder verifier: rules before the model, one model call per batch, and the shipped artifact."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from frugalstream.llm import pair_encoder as pe


class CountingScorer:
    """Scores by word overlap and records every call, so tests see what reached the model."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str]]] = []

    def probabilities(self, a: Sequence[str], b: Sequence[str]) -> npt.NDArray[np.float64]:
        self.calls.append(list(zip(a, b, strict=True)))
        out = []
        for x, y in zip(a, b, strict=True):
            wx, wy = set(x.lower().split()), set(y.lower().split())
            out.append(len(wx & wy) / len(wx | wy))
        return np.array(out, dtype=np.float64)


def test_exact_text_and_rule_vetoes_never_reach_the_model() -> None:
    scorer = CountingScorer()
    ver = pe.CrossEncoderVerifier(scorer, threshold=0.5)
    decisions = ver.verify_batch([
        ("What are your hours?", "what are your hours", 0.99, 0.5),
        ("How do I lose 10 kg in 2 months?", "How do I lose 10 kg in 3 months?", 0.98, 0.5),
        ("Why does my card work abroad?", "Why doesn't my card work abroad?", 0.96, 0.5),
        ("Is Google buying Fitbit?", "Is Fitbit buying Google?", 0.97, 0.5),
    ])
    assert [(d.hit, d.reason) for d in decisions] == [
        (True, "exact"), (False, "number_mismatch"), (False, "negation"), (False, "order")]
    assert scorer.calls == []


def test_one_model_call_per_batch_and_each_pair_keeps_its_threshold() -> None:
    scorer = CountingScorer()
    ver = pe.CrossEncoderVerifier(scorer)
    decisions = ver.verify_batch([
        ("how can i reset my password", "how do i reset my password", 0.9, 0.5),  # overlap 5/7
        ("how can i reset my password", "how do i reset my password", 0.9, 0.75),
        ("where is the branch", "what are your hours", 0.8, 0.0),
    ])
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 3
    assert [d.hit for d in decisions] == [True, False, True]
    assert decisions[0].score == pytest.approx(5 / 7) and decisions[0].reason == "model"
    assert ver.verify("how can i reset my password", "how do i reset my password", 0.9, 0.5).hit
    assert ver.score_batch([("a b", "a b", 1.0), ("a b", "a c", 0.9)]).tolist() == pytest.approx([1.0, 1 / 3])


def test_a_stack_combines_both_models_and_the_cosine() -> None:
    from frugalstream.llm.verifier import TrainedVerifier, pair_features

    lexical, scorer = TrainedVerifier.load(), CountingScorer()
    stack = pe.Stack((0.5, 0.25, 2.0), -1.0)
    ver = pe.CrossEncoderVerifier(scorer, lexical, stack)
    q, c, cos = "how can i reset my password", "how do i reset my password", 0.9
    (decision,) = ver.verify_batch([(q, c, cos, 0.5)])
    lex = lexical.predict(np.array([pair_features(q, c, cos)[0]]))
    expected = stack.combine(np.array([5 / 7]), lex, np.array([cos]))[0]
    assert decision.score == pytest.approx(expected) and decision.hit == (expected >= 0.5)
    with pytest.raises(ValueError, match="stack"):
        pe.CrossEncoderVerifier(scorer, lexical, None)


@pytest.fixture(scope="module")
def shipped() -> pe.CrossEncoderVerifier:
    return pe.CrossEncoderVerifier.load()


def test_shipped_artifact_holds_only_fine_tuned_weights() -> None:
    from safetensors import safe_open

    assert pe.ARTIFACT_PATH.stat().st_size < 25_000_000
    with safe_open(str(pe.ARTIFACT_PATH), framework="np") as f:
        keys = list(f.keys())
    assert "head.weight" in keys and any(k.startswith("encoder.encoder.layer.5.") for k in keys)
    assert {"stack.weight", "stack.bias"} <= set(keys)
    assert not any(k.startswith("encoder.embeddings.") for k in keys)


def test_shipped_model_tells_a_rewording_from_another_question(shipped: pe.CrossEncoderVerifier) -> None:
    thr = shipped.threshold
    para = shipped.verify("How can I learn Python quickly?", "What is the fastest way to learn Python?", 0.9, thr)
    other = shipped.verify("How can I learn Python quickly?", "How can I learn Java quickly?", 0.85, thr)
    hours = shipped.verify("What are your opening hours?", "When are you open?", 0.8, thr)
    assert para.reason == other.reason == "model"
    assert para.score > other.score
    assert not other.hit
    assert hours.score > other.score


@pytest.mark.parametrize(("query", "cached"), [
    ("My top up is still pending", "My top-up is still pending"),
    ("What is the exchange rate?", "What's the exchange rate?"),
    ("How do I change my address?", "Hi, how do I change my address? Thanks!"),
])
def test_shipped_model_serves_edits_that_change_nothing(
    shipped: pe.CrossEncoderVerifier, query: str, cached: str
) -> None:
    decision = shipped.verify(query, cached, 0.95)
    assert decision.reason == "model"
    assert decision.hit, decision.score


def test_saved_artifact_loads_back_to_the_same_scores(shipped: pe.CrossEncoderVerifier, tmp_path: Path) -> None:
    model = pe.PairEncoder.load()
    path = tmp_path / "copy.safetensors"
    pe.save_artifact(model, path)
    again = pe.PairEncoder.load(path)
    a, b = ["How do I reset my password?", "Where is the branch?"], ["How can I reset my password?", "Opening hours?"]
    assert np.allclose(model.probabilities(a, b), again.probabilities(a, b), atol=1e-6)
    with pytest.raises(ValueError, match="no stack"):
        pe.load_stack(pe.read_artifact(path))


def test_an_artifact_for_another_model_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"encoder.not_a_layer.weight": np.zeros((2, 2), np.float16),
               "head.weight": np.zeros((1, 384), np.float16), "head.bias": np.zeros(1, np.float16)}, str(path))
    with pytest.raises(ValueError, match="does not fit"):
        pe.PairEncoder.load(path)
